"""The throughput benchmark in a CI-sized form: every configuration runs and every field of its JSON is there and
sane. (Its speed figures are read by people from a full run, never asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_throughput_benchmark_runs_all_three_configurations_and_writes_every_field(tmp_path):
    out = tmp_path / "throughput.json"
    data = REPO / "qlora_pipeline" / "data" / "samples" / "medtuned_sample.jsonl"
    command = [sys.executable, "benchmarks/throughput.py", "--shapes", "tiny", "--steps", "2", "--rows", "48"]
    result = subprocess.run(
        [*command, "--data", str(data), "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["rows"] == 48 and report["max_length"] == 512
    assert report["data"] == str(data) and report["device"]
    assert [r["config"] for r in report["results"]] == ["tutorial", "trl", "pipeline"]
    for record in report["results"]:
        assert set(record) == {
            "config", "shape", "steps", "non_padding_tokens_per_second", "padding_fraction", "tokens_per_step",
            "peak_memory_mib", "memory_growth_mib", "predicted_growth_mib", "wall_time_s", "train_time_s",
            "median_step_s",
        }  # fmt: skip
        assert record["shape"] == "tiny" and record["steps"] == 2
        assert record["non_padding_tokens_per_second"] > 0 and record["tokens_per_step"] > 0
        assert 0 < record["median_step_s"] <= record["train_time_s"] < record["wall_time_s"]
        assert 0 < record["memory_growth_mib"] < record["peak_memory_mib"]
        assert 0 <= record["padding_fraction"] < 1
    tutorial, trl, pipeline = report["results"]
    # The tutorial pads every example to 512 tokens; packed rows waste little.
    assert tutorial["padding_fraction"] > 0.5 and pipeline["padding_fraction"] < 0.2
    assert tutorial["predicted_growth_mib"] is None and pipeline["predicted_growth_mib"] > 0
    assert set(report["ratios"]) == {"tiny: pipeline/tutorial", "tiny: pipeline/trl"}
    assert report["ratios"]["tiny: pipeline/trl"] == round(
        pipeline["non_padding_tokens_per_second"] / trl["non_padding_tokens_per_second"], 2
    )
    assert "| tiny | pipeline |" in result.stdout and "pipeline/trl" in result.stdout
