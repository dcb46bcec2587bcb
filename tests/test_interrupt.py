"""SIGINT/SIGTERM during training: a checkpoint is saved through the Trainer's own path, the run exits non-zero with
the command that resumes it, and the resumed run ends with the adapter an uninterrupted run trains. That run is also
the secrets check of every path a credential could take: sentinel HF_TOKEN and WANDB_API_KEY in the environment of a
run that saves a checkpoint, is interrupted, resumes, reports to W&B (offline), merges and dry-run publishes."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, SENTINELS, run_cli, write_recipe
from safetensors.torch import load_file
from test_tracking import history_and_config
from transformers import TrainerControl, TrainerState

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.training.callbacks import StopOnSignal
from qlora_pipeline.training.checkpoints import check_output_dir

pytestmark = pytest.mark.slow

MAX_STEPS = 16
# Save only on the signal; no eval split, short rows and no gradient checkpointing keep a step at ~0.3 s on two
# cores (about 1 s with other jobs running): slow enough to signal mid-run, quick enough for three runs.
STEPS = [
    "--max_steps",
    str(MAX_STEPS),
    "--per_device_train_batch_size",
    "1",
    "--max_length",
    "256",
    "--gradient_checkpointing",
    "false",
    "--eval_split_size",
    "0",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "1000",
    "--logging_steps",
    "1",
]


def _logged_steps(metrics) -> list[int]:
    if not metrics.is_file():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _sentinel_env(tmp_path) -> dict:
    """Sentinel credentials, W&B offline with its folders under tmp_path (the key is there, so it would go online)."""
    folders = {name: str(tmp_path / "wandb" / name) for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR")}
    return {**SENTINELS, "WANDB_MODE": "offline", **folders}


def _start_and_terminate(tmp_path, recipe, run_dir, after_step: int, env: dict):
    """Start `train` as a user would, send SIGTERM once step `after_step` is logged; returns (code, stdout, stderr)."""
    out, err = tmp_path / "interrupted.out", tmp_path / "interrupted.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "qlora_pipeline", "train", str(recipe), *STEPS],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, **env},
            cwd=REPO,
        )
        try:
            deadline = time.monotonic() + 600
            while not any(step >= after_step for step in _logged_steps(run_dir / "metrics.jsonl")):
                assert process.poll() is None, f"train ended before step {after_step}:\n{err.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no training step logged in 10 minutes"
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return code, out.read_text(), err.read_text()


def test_sigterm_saves_a_checkpoint_and_resume_ends_with_the_uninterrupted_adapter(tmp_path):
    env = _sentinel_env(tmp_path)
    reference = write_recipe(tmp_path / "reference.yaml", output_dir=str(tmp_path / "reference"))
    done = run_cli("train", str(reference), *STEPS)
    assert done.returncode == 0, done.stderr[-3000:]

    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), report_to="wandb")
    run_dir = tmp_path / "run"
    code, stdout, stderr = _start_and_terminate(tmp_path, recipe, run_dir, after_step=4, env=env)
    printed = stdout + stderr
    output = f"--- stdout ---\n{stdout[-3000:]}\n--- stderr ---\n{stderr[-3000:]}"
    assert code == 143, output
    assert "Traceback" not in stdout + stderr, output
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: SIGTERM"), output
    checkpoints = sorted(run_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1, checkpoints
    checkpoint = checkpoints[0]
    stopped = int(checkpoint.name.split("-")[1])
    assert 4 <= stopped < MAX_STEPS, "the run stopped at the step under way when the signal came, not at the end"
    for fragment in (f"step {stopped} of {MAX_STEPS}", str(checkpoint), "--resume"):
        assert fragment in last, f"{fragment!r} not in {last!r}"
    # Saved by the Trainer's normal path: weights, optimizer, scheduler, RNG, then trainer_state.json last.
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoint / name).is_file(), name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == stopped
    assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists(), "no export, no summary"
    assert "== qlora-pipeline train: done ==" not in stdout
    assert _logged_steps(run_dir / "metrics.jsonl") == list(range(1, stopped + 1))
    # The checkpoint as saved (the resumed run's last save rotates it out): pickled arguments, optimizer, RNG state.
    saved = [f"{checkpoint.name}/{name}" for name in ("training_args.bin", "optimizer.pt", "rng_state.pth")]
    assert_no_sentinel_anywhere(run_dir, printed, holding=[*saved, f"{checkpoint.name}/trainer_state.json"])

    # A later save that was cut short: the newest folder lacks trainer_state.json. --resume must skip it.
    shutil.copytree(checkpoint, run_dir / "checkpoint-999")
    (run_dir / "checkpoint-999" / "trainer_state.json").unlink()

    # The command the message gives, run as given.
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[:2] == ["qlora-pipeline", "train"] and command[-1] == "--resume", command
    resumed = run_cli(*command[1:], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    printed += resumed.stdout + resumed.stderr
    assert "skipping checkpoint-999" in resumed.stdout and f"resuming from {checkpoint.name}" in resumed.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped and summary["global_step"] == MAX_STEPS
    assert _logged_steps(run_dir / "metrics.jsonl") == list(range(1, MAX_STEPS + 1)), "each step logged once"

    # Optimizer, scheduler, RNG, data order and adapter dtype restored: the same adapter as without the stop.
    expected = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    diff = max((got[name].float() - expected[name].float()).abs().max().item() for name in expected)
    print(f"stopped at step {stopped} of {MAX_STEPS}; resumed adapter vs uninterrupted: max abs diff {diff}")
    assert diff < 1e-5, f"resumed adapter differs from the uninterrupted one by up to {diff}"

    # The rest of the credential's possible paths: merge (which logs to the same W&B run) and publish --dry-run.
    merged = run_cli("merge", str(run_dir), "--dtype", "fp32", "--prompts", "1", env=env)
    assert merged.returncode == 0, merged.stderr[-3000:]
    dry_run = run_cli("publish", str(run_dir), "--repo-id", "me/tiny", "--dry-run", env=env)
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    printed += merged.stdout + merged.stderr + dry_run.stdout + dry_run.stderr
    exported = ["merged/model.safetensors", "merged/README.md", "adapter/adapter_model.safetensors", "summary.json"]
    assert_no_sentinel_anywhere(tmp_path, printed, holding=[f"run/{name}" for name in exported])
    # W&B: the interrupted run, its resumption and the merge are one run (one id), three offline folders to sync;
    # the merge logged its fidelity figures into it.
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    run_id = json.loads((run_dir / "summary.json").read_text())["tracking"]["run_id"]
    assert len(offline_runs) == 3 and all(folder.name.endswith(run_id) for folder in offline_runs), offline_runs
    _, _, merge_summary = history_and_config(offline_runs[-1])
    fidelity = json.loads((run_dir / "merged" / "fidelity.json").read_text())
    assert merge_summary["merge/max_abs_logit_diff"] == pytest.approx(fidelity["max_abs_logit_diff"])


def assert_no_sentinel_anywhere(folder, printed: str, holding: list[str]) -> None:
    """Neither sentinel in any byte of any file under `folder` (binary ones too: pickled training arguments,
    optimizer and RNG state, safetensors, W&B's transaction log) or any line printed. `holding`: files (relative to
    `folder`) that must be among those scanned."""
    files = [path for path in folder.rglob("*") if path.is_file()]
    names = {path.relative_to(folder).as_posix() for path in files}
    assert not set(holding) - names, sorted(names)
    for value in SENTINELS.values():
        assert value not in printed
        for path in files:
            assert value.encode() not in path.read_bytes(), path


def test_stop_on_signal_sets_the_control_flags_at_the_next_step_end(capfd):
    stop = StopOnSignal()
    state, control = TrainerState(global_step=3, max_steps=16), TrainerControl()
    stop.on_step_end(None, state, control)
    assert not control.should_save and not control.should_training_stop, "no signal, no stop"

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        signal.raise_signal(signal.SIGTERM)
        # The handler only took note and put the previous handlers back: a second signal is a hard stop.
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
        assert not control.should_save, "nothing happens until the step under way ends"
        state.global_step = 4
        stop.on_step_end(None, state, control)
    assert control.should_save and control.should_training_stop
    assert stop.signum == signal.SIGTERM and stop.stopped_at == 4 and not stop.finished
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    assert "SIGTERM received: stopping after this step" in capfd.readouterr().err

    # Later step ends (and the epoch end) leave the stop as it was.
    state.global_step = 5
    stop.on_epoch_end(None, state, control)
    assert stop.stopped_at == 4


def test_a_signal_in_the_last_step_finishes_the_run():
    """Resuming from the last step would train one step past max_steps: the run is finished instead."""
    stop = StopOnSignal(announce=False)
    stop.received = signal.SIGINT
    state, control = TrainerState(global_step=16, max_steps=16), TrainerControl()
    stop.on_step_end(None, state, control)
    assert stop.signum == signal.SIGINT and stop.finished and control.should_save


def test_stop_on_signal_restores_the_handlers_when_no_signal_came():
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == previous
    assert not stop.received and not stop.signum


def test_stop_on_signal_leaves_an_ignored_signal_ignored():
    """A background job or nohup ignores some signals: training must not start answering them."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopOnSignal():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checkpoint(run_dir, step, state=True, weights=True, text=None):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if state:
        (folder / "trainer_state.json").write_text(text or json.dumps({"global_step": step}))
    return folder


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 2)
    good = _checkpoint(run_dir, 10)
    _checkpoint(run_dir, 12, state=False)  # killed before trainer_state.json
    _checkpoint(run_dir, 14, text='{"global_st')  # killed while writing it
    _checkpoint(run_dir, 100, weights=False)  # killed while writing the weights (state copied in by hand)
    _checkpoint(run_dir, 1, state=False)  # incomplete but older than the one resumed from: not worth a note
    (run_dir / "checkpoint-x").mkdir()  # not a checkpoint

    assert check_output_dir(run_dir, resume=True, overwrite=False) == str(good)
    note = capsys.readouterr().out
    assert "skipping checkpoint-12, checkpoint-14, checkpoint-100" in note and "resuming from checkpoint-10" in note
    assert "checkpoint-1," not in note and "checkpoint-2" not in note


def test_resume_with_only_incomplete_checkpoints_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 3, state=False)
    with pytest.raises(PipelineError, match=r"no complete checkpoint-N folder .*checkpoint-3: incomplete"):
        check_output_dir(run_dir, resume=True, overwrite=False)
    shutil.rmtree(run_dir / "checkpoint-3")
    with pytest.raises(PipelineError, match="there is no checkpoint-N folder"):
        check_output_dir(run_dir, resume=True, overwrite=False)
