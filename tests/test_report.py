"""The run report: train writes report.md and four plots; `qlora-pipeline report` rewrites them from the run folder."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from conftest import assert_clean_error, run_cli, write_recipe
from PIL import Image

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.outputs.report import PLOTS, write_report

pytestmark = pytest.mark.slow

SIZE = (800, 450)  # report.FIGSIZE at report.DPI


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 12-step tiny run with an eval every 6 steps (plus the one before training), logging every step."""
    root = tmp_path_factory.mktemp("report")
    recipe = write_recipe(root / "recipe.yaml", output_dir=str(root / "run"))
    result = run_cli(
        "train",
        str(recipe),
        "--max_steps",
        "12",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "6",
        "--save_strategy",
        "no",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {"run": root / "run", "stdout": result.stdout}


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _check_plots(run_dir, report: str):
    for name, alt in PLOTS.items():
        path = run_dir / name
        assert path.is_file(), f"{name} missing"
        assert f"![{alt}]({name})" in report, f"report.md does not link {name}"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == SIZE, (name, image.format, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 50, f"{name} is (nearly) blank: {colours and len(colours)}"


def test_train_writes_the_report_and_plots(trained):
    run_dir = trained["run"]
    assert f"report: {run_dir / 'report.md'}" in trained["stdout"]
    report = (run_dir / "report.md").read_text()
    assert report.startswith(f"# Run report: {run_dir.name}\n")
    _check_plots(run_dir, report)
    assert "skipped" not in report


def test_report_numbers_match_the_run_files(trained):
    run_dir = trained["run"]
    summary = json.loads((run_dir / "summary.json").read_text())
    records = _records(run_dir)
    report = (run_dir / "report.md").read_text()

    def row(label: str) -> list[str]:
        match = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", report, re.M)
        assert match, f"no row {label!r} in report.md:\n{report}"
        return [cell.strip() for cell in match.group(1).split("|")]

    assert row("optimizer steps") == [str(summary["global_step"])] and summary["global_step"] == 12
    assert row("tokens seen (non-padding)") == [f"{summary['tokens_seen']:,}"]
    assert records[-1]["num_input_tokens_seen"] == summary["tokens_seen"]
    assert row("non-padding tokens/s") == [f"{summary['non_padding_tokens_per_second']:.1f}"]
    assert row("train loss (mean over the run)") == [f"{summary['train_loss']:.4f}"]
    assert [r["train_loss"] for r in records if "train_loss" in r] == [summary["train_loss"]]
    last = [r for r in records if "loss" in r][-1]
    assert last["step"] == 12 and row("last logged train loss (step 12)") == [f"{last['loss']:.4f}"]
    assert row("peak memory") == [f"{summary['peak_memory_mib']:,.0f} MiB"]

    before = [r["before_loss"] for r in records if "before_loss" in r]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert before == [summary["eval_loss_before"]] and evals[12] == summary["eval_loss_after"] and 6 in evals
    loss, perplexity = row("before training")
    assert loss == f"{before[0]:.4f}" and perplexity == f"{math.exp(before[0]):,.2f}"
    loss, perplexity = row("after training (step 12)")
    assert loss == f"{evals[12]:.4f}" and perplexity == f"{math.exp(evals[12]):,.2f}"
    assert row("6") == [f"{evals[6]:.4f}", f"{math.exp(evals[6]):,.2f}"], "the mid-run eval is listed"

    train = summary["data"]["train"]
    assert row("examples trained on")[0] == f"{train['examples']:,}"
    assert row("95th percentile length")[0] == str(train["p95"])
    # The lengths histogram covers every tokenized row (none dropped here) and lands in summary.json.
    histogram = train["length_histogram"]
    assert len(histogram["edges"]) == len(histogram["counts"]) + 1 and 10 <= len(histogram["counts"]) <= 30
    assert sum(histogram["counts"]) == train["rows"] == train["examples"] == 216
    assert histogram["edges"][0] == 0 and histogram["edges"][-1] >= train["max"]


def test_report_command_regenerates_and_skips_what_it_cannot_plot(trained, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained["run"], run_dir, ignore=shutil.ignore_patterns("adapter"))
    for name in [*PLOTS, "report.md"]:
        (run_dir / name).unlink()
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"report: {run_dir / 'report.md'}" in result.stdout
    assert all(str(run_dir / name) in result.stdout for name in PLOTS)
    _check_plots(run_dir, (run_dir / "report.md").read_text())

    # A run without eval or timing, from before the length histogram: the report says what it skipped and
    # still draws what it can; the stale plot is removed.
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["eval_loss_before"] = summary["eval_loss_after"] = None
    del summary["data"]["train"]["length_histogram"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    kept = [
        {k: v for k, v in record.items() if k not in ("train_runtime", "learning_rate")}
        for record in _records(run_dir)
        if "eval_loss" not in record and "before_loss" not in record
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"step": 13, "lo')
    report = write_report(run_dir).read_text()
    assert "No evaluation in this run" in report
    assert "_Learning rate plot skipped: no learning_rate in metrics.jsonl._" in report
    assert "_Token lengths plot skipped:" in report and not (run_dir / "lengths.png").exists()
    assert f"1 unreadable line(s) skipped (line {len(kept) + 1})" in report
    with Image.open(run_dir / "throughput.png") as image:
        assert image.size == SIZE
    assert "![Loss](loss.png)" in report and "![Throughput](throughput.png)" in report


def test_report_on_a_missing_or_unfinished_run_is_a_clear_error(tmp_path):
    assert_clean_error(run_cli("report", str(tmp_path / "nowhere")), "nowhere", "no such run folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("")
    assert_clean_error(run_cli("report", str(tmp_path / "half")), "summary.json")
    (tmp_path / "half" / "summary.json").write_text("{}")
    (tmp_path / "half" / "metrics.jsonl").unlink()
    with pytest.raises(PipelineError, match="metrics.jsonl"):
        write_report(tmp_path / "half")
