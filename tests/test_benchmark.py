"""The benchmarks in a CI-sized form: they run, and every field of their JSON is there and sane. (Their speed figures
are read by people from a full run, never asserted here.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_throughput_benchmark_runs_and_writes_every_field(tmp_path):
    out = tmp_path / "throughput.json"
    data = REPO / "qlora_pipeline" / "data" / "samples" / "medtuned_sample.jsonl"
    command = [sys.executable, "benchmarks/throughput.py", "--shapes", "tiny", "--steps", "2", "--rows", "48"]
    # pipeline-checkpointing is `pipeline` with --gradient_checkpointing true, the setting most tests train with
    # (conftest.write_recipe): left out to keep the suite's time.
    command += ["--configs", "tutorial", "trl", "pipeline", "--matmul-seconds", "0.3"]
    result = subprocess.run(
        [*command, "--data", str(data), "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 2 and report["rows"] == 48 and report["max_length"] == 512
    assert report["data"] == str(data) and report["device"]
    assert [r["config"] for r in report["results"]] == ["tutorial", "trl", "pipeline"]
    assert 0 < report["matmul_gflops"]["before"] and 0 < report["matmul_gflops"]["after"]
    for record in report["results"]:
        assert set(record) == {
            "config", "shape", "steps", "non_padding_tokens_per_second", "padding_fraction", "tokens_per_step",
            "peak_memory_mib", "memory_growth_mib", "predicted_growth_mib", "wall_time_s", "train_time_s",
            "median_step_s", "model_gflops_per_token", "achieved_gflops", "auto_settings", "planned_total_mib",
            "measured_total_mib",
        }  # fmt: skip
        assert record["shape"] == "tiny" and record["steps"] == 2
        assert record["non_padding_tokens_per_second"] > 0 and record["tokens_per_step"] > 0
        assert 0 < record["median_step_s"] <= record["train_time_s"] < record["wall_time_s"]
        assert 0 < record["memory_growth_mib"] < record["peak_memory_mib"]
        assert 0 <= record["padding_fraction"] < 1
        # Every configuration is credited with the same model work per token; what differs is how fast it is done.
        assert record["model_gflops_per_token"] == report["results"][0]["model_gflops_per_token"] > 0
        assert record["achieved_gflops"] == pytest.approx(
            record["non_padding_tokens_per_second"] * record["model_gflops_per_token"], rel=0.01, abs=0.2
        )
    tutorial, trl, pipeline = report["results"]
    # auto: on this machine's memory, 4 rows at once without checkpointing.
    assert pipeline["auto_settings"] == {
        "gradient_checkpointing": False, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1
    }  # fmt: skip
    assert 0 < pipeline["measured_total_mib"] and 0 < pipeline["planned_total_mib"]
    # The tutorial pads every example to 512 tokens; packed rows waste little.
    assert tutorial["padding_fraction"] > 0.5 and pipeline["padding_fraction"] < 0.2
    assert tutorial["predicted_growth_mib"] is None and pipeline["predicted_growth_mib"] > 0
    assert set(report["ratios"]) == {"tiny: pipeline/tutorial", "tiny: pipeline/trl"}
    assert report["ratios"]["tiny: pipeline/trl"] == round(
        pipeline["non_padding_tokens_per_second"] / trl["non_padding_tokens_per_second"], 2
    )
    assert "| tiny | pipeline |" in result.stdout and "pipeline/trl" in result.stdout


def test_gpu_check_runs_its_whole_path_on_a_cpu_at_tiny_scale(tmp_path):
    """benchmarks/gpu_check.py --tiny: Starling's shipped config shrunk, built with random weights and Starling's
    tokenizer, written to disk, loaded in 4-bit by each run; the JSON the GPU check writes, with every run's
    figures (the goals are for the full shape on a GPU, so none here)."""
    out = tmp_path / "gpu_check.json"
    data = REPO / "qlora_pipeline" / "data" / "samples" / "medtuned_sample.jsonl"
    command = [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--steps", "2", "--rows", "48", "--data", str(data)]
    # `pipeline` (checkpointing forced on) is `pipeline-auto` with one override more, and `trl` is the throughput
    # benchmark's run_trl: the test above runs both paths, so they are left out here to keep the suite's time.
    command += ["--configs", "pipeline-auto", "pipeline-liger"]
    result = subprocess.run(
        [*command, "--model-dir", str(tmp_path / "model"), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["goals"] is None and report["steps"] == 2
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (config["vocab_size"], config["num_key_value_heads"], config["hidden_size"]) == (32002, 2, 128)
    assert (tmp_path / "model" / "model.safetensors").stat().st_size == report["model"]["bytes_on_disk"] - sum(
        f.stat().st_size for f in (tmp_path / "model").iterdir() if f.name != "model.safetensors"
    )
    runs = {record["config"]: record for record in report["results"]}
    assert set(runs) == {"pipeline-auto", "pipeline-liger"}
    assert "CUDA GPU" in runs["pipeline-liger"]["skipped"]
    record = runs["pipeline-auto"]
    assert record["steps"] == 2 and record["non_padding_tokens_per_second"] > 0 and record["peak_memory_mib"] > 0
    assert record["predicted_peak_mib"] > 0
    # The Starling recipe's own `auto`, chosen on this machine's memory: 4 rows at once, no checkpointing.
    chosen = runs["pipeline-auto"]["auto_settings"]
    assert chosen["auto"] == ["gradient_checkpointing", "per_device_train_batch_size"]
    assert (chosen["gradient_checkpointing"], chosen["per_device_train_batch_size"]) == (False, 4)
    assert report["versions"]["torch"] and report["versions"]["bitsandbytes"]


def test_data_checks_benchmark_finds_exactly_what_it_planted(tmp_path):
    """Its measurement in this process (the script's own start-up, importing trl, would double the time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_checks_benchmark", REPO / "benchmarks" / "data_checks.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    report = benchmark.measure(tmp_path, rows=4000, duplicates=40, overlaps=10)
    assert report["rows"] == 4000 and report["duplicates_found"] == 40 and report["overlaps_found"] == 10
    assert report["read_and_check_s"] > 0 and set(report["shares"]) == {"ner", "re", "nli", "cls"}
    assert abs(report["shares"]["ner"] - 0.4) < 0.05, "the weighted draw follows the weights"
