"""W&B tracking for real: a tiny run with no API key writes an offline run (wandb's own files), and reading those
files back shows the recipe config and the train loss history, with no credential anywhere."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from conftest import run_cli, write_recipe

pytestmark = pytest.mark.slow

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) framed records
HEADER = 7


def read_wandb_records(path: Path) -> list:
    """Every protobuf Record in an offline run's .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "a wandb transaction log"
    records, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:  # zero padding at a block's end
            position += left_in_block
            continue
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == 1:  # full record
            records.append(chunk)
        elif kind == 2:  # first fragment
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def history_and_config(run_folder: Path):
    (log_file,) = run_folder.glob("run-*.wandb")
    history, config, summary = [], {}, {}
    for record in read_wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                if item.key:
                    summary[item.key] = json.loads(item.value_json)
    return history, config, summary


@pytest.mark.parametrize(
    "env, expect_auto_offline",
    [
        # No key and no WANDB_MODE: the pipeline itself decides on offline, without a prompt. (A key in the
        # environment with WANDB_MODE=offline: test_interrupt.py's interrupted and resumed run, scanned for it.)
        pytest.param({"HF_TOKEN": "hf_SENTINEL_tracking"}, True, id="no-key"),
    ],
)
def test_offline_wandb_run_holds_recipe_and_loss_history_and_no_secret(tmp_path, env, expect_auto_offline):
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        report_to="wandb",
        wandb_project="tiny-tests",
        wandb_tags=["ci", "tiny"],
        wandb_notes="tracking test",
    )
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    base_env.update(
        {
            "WANDB_DIR": str(tmp_path / "wandb-home"),
            "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
            **env,
        }
    )
    result = run_cli(
        "train",
        str(recipe),
        "--max_steps",
        "4",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        env=base_env,
        replace_env=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    where = summary["tracking"]
    assert where["mode"] == "offline"
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert Path(where["dir"]) == offline_run
    assert f"wandb sync {offline_run}" in result.stdout
    assert ("logged offline" in result.stdout) == expect_auto_offline

    history, config, run_summary = history_and_config(offline_run)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([row["loss"] for row in logged if "loss" in row]) and len(losses) == 4
    assert any("train/tokens_per_second" in row for row in history)
    assert config["recipe"]["learning_rate"] == pytest.approx(0.01) and config["recipe"]["lora_r"] == 8
    assert config["recipe"]["report_to"] == ["wandb"] and "hub_token" not in config["recipe"]
    assert "transformers" in config["versions"] and config["data"]["train"]["examples"] == 216
    assert run_summary["final/train_loss"] == pytest.approx(summary["train_loss"])
    assert run_summary["final/non_padding_fraction"] == pytest.approx(summary["non_padding_fraction"])

    # merge logging its fidelity figures into the same W&B run: test_interrupt.py, whose run is also resumed.

    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in env.values():
                if "SENTINEL" in value:
                    assert value.encode() not in data, path
    for value in env.values():
        if "SENTINEL" in value:
            assert value not in output


def test_missing_tracker_package_is_a_recipe_error(tmp_path):
    from conftest import assert_clean_error

    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), report_to="tensorboard")
    result = run_cli("train", str(recipe))
    assert_clean_error(result, str(recipe), "report_to", "tensorboard", "pip install")
