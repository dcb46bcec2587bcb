"""The GPU check: Starling-LM-7B-alpha's exact shape, QLoRA 512 x 4, the pipeline beside plain TRL, on one CUDA GPU.

    python benchmarks/gpu_check.py                        # one CUDA GPU: the full 7B shape, 20 steps per run
    python benchmarks/gpu_check.py --tiny --steps 2       # the same code on a CPU, on Starling's shape shrunk (CI)

No download: a random-weight model of Starling-LM-7B-alpha's shape is built from the config the package ships
(qlora_pipeline/model/configs/berkeley-nest--Starling-LM-7B-alpha.json) with Starling's real tokenizer, written to
local disk as float16 safetensors, and each run loads it in 4-bit from there, as the pipeline loads a real checkpoint.
Each configuration runs in its own process (its peak memory is its own), one after the other:

  pipeline            recipes/starling-7b-medtuned-qlora.yaml: NF4 + double quant, LoRA r 8 all-linear, packing,
                      512 tokens x 4 rows per optimizer step, gradient checkpointing forced on (the memory goal's run)
  pipeline-auto       the same with the recipe's own `gradient_checkpointing: auto`: what the planner picks here
  trl                 plain TRL SFTTrainer + peft with their defaults, QLoRA NF4, LoRA r 8, packing, batch 4,
                      gradient checkpointing (benchmarks/throughput.py's `trl`)
  pipeline-liger      `pipeline` with `use_liger_kernel: true`, where liger-kernel is installed (it needs Triton)

Written to --out (JSON): the GPU's name, for each run non-padding tokens per second, peak
`torch.cuda.max_memory_allocated` (on a CPU: peak resident set), the planner's prediction of it for the pipeline runs
(`plan.predict(...).total` less the CUDA context, which max_memory_allocated does not count), the settings `auto`
chose, and the goals: pipeline peak <= 5.5 GiB, the planner within 10% of it, pipeline >= 1.5x plain TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from qlora_pipeline.cli.spelling import ArgumentParser  # noqa: E402

REPO = throughput.REPO
STARLING_RECIPE = REPO / "recipes" / "starling-7b-medtuned-qlora.yaml"
STARLING_CONFIG = REPO / "qlora_pipeline" / "model" / "configs" / "berkeley-nest--Starling-LM-7B-alpha.json"
CONFIGS = ("pipeline", "pipeline-auto", "trl", "pipeline-liger")
# --tiny: Starling's config with these values, so the check's whole path runs on a CPU in seconds.
TINY_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}  # fmt: skip
GOALS = {"peak_gib": 5.5, "planner_error": 0.10, "speedup_over_trl": 1.5}


# ---------------------------------------------------------------- the model, built from the shipped config


def build_model(folder: Path, tiny: bool, device: str) -> dict:
    """Starling's shape (or TINY_SHAPE) with random float16 weights and Starling's tokenizer, written to `folder`.
    Returns what was built and how long it took."""
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    from qlora_pipeline.model.tiny_builders.common import save_random_model
    from qlora_pipeline.model.tiny_builders.starling import build_starling_tokenizer

    started = time.time()
    values = json.loads(STARLING_CONFIG.read_text())
    if tiny:
        values.update(TINY_SHAPE)
    values.pop("_name_or_path", None)
    values["torch_dtype"] = "float16"
    config = MistralConfig(**{k: v for k, v in values.items() if k not in ("architectures", "transformers_version")})
    tokenizer = build_starling_tokenizer(folder)
    assert len(tokenizer) == config.vocab_size, (len(tokenizer), config.vocab_size)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # 7.2 B weights: built in float16 on the device, 14.5 GB not 29
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    parameters = sum(p.numel() for p in model.parameters())
    save_random_model(model.to("cpu"), folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return {"parameters": parameters, "bytes_on_disk": size, "build_s": round(time.time() - started, 1)}


# ---------------------------------------------------------------- one configuration, in its own process


def run_pipeline(model_dir: str, data: str, rows: int, steps: int, scratch: str, config: str) -> dict:
    from qlora_pipeline import plan
    from qlora_pipeline.plan import choose
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train

    # The Starling recipe on the built model and local rows, 4 rows per optimizer step; checkpointing forced on for
    # the memory goal's run, the recipe's own `auto` in pipeline-auto.
    liger = ("--use_liger_kernel", "true") if config == "pipeline-liger" else ()
    _, *overrides = throughput.pipeline_recipe(
        model_dir,
        data,
        rows,
        steps,
        str(Path(scratch) / "run"),
        checkpointing=config != "pipeline-auto",
        recipe=STARLING_RECIPE,
        extra=liger,
    )
    recipe = load_recipe(STARLING_RECIPE, overrides)
    timer = throughput.StepTimer()
    summary = train.run(recipe, overwrite=True, overrides=overrides, callbacks=[timer.callback()])
    chosen = summary.get("auto_settings")
    # The plan for the settings the run trained with; max_memory_allocated counts no CUDA context.
    planned = load_recipe(STARLING_RECIPE, overrides)
    if chosen:
        choose.apply(planned, choose.Choice(**chosen))
    prediction = plan.predict(planned)
    return {
        "times": timer.times,
        "tokens": summary["tokens_seen"],
        "memory": timer.memory,
        "auto_settings": chosen,
        "predicted_peak_mib": round((prediction.total - prediction.cuda_context) / 2**20, 1),
    }


def worker(config: str, model_dir: str, data: str, rows: int, steps: int, out: str) -> None:
    import torch

    started = time.time()
    record = {"config": config}
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{config}-") as scratch:
        if config == "trl":
            result = throughput.run_trl(model_dir, throughput.read_rows(data, rows), steps, scratch)
        else:
            result = run_pipeline(model_dir, data, rows, steps, scratch, config)
    cuda = torch.cuda.is_available()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else max(result["memory"].peak, throughput.peak_memory_mib())
    )
    record.update(
        steps=len(result["times"]),
        non_padding_tokens_per_second=round(result["tokens"] / sum(result["times"]), 1),
        peak_memory_mib=round(peak, 1),
        peak_memory_kind="torch.cuda.max_memory_allocated" if cuda else "resident set (CPU)",
        predicted_peak_mib=result.get("predicted_peak_mib"),
        auto_settings=result.get("auto_settings"),
        wall_time_s=round(time.time() - started, 1),
    )
    Path(out).write_text(json.dumps(record))


def skip_reason(config: str) -> str | None:
    """Why a configuration cannot run here (None: it can)."""
    import importlib.util

    import torch

    if config == "pipeline-liger":
        if not torch.cuda.is_available():
            return "Liger's kernels are Triton kernels: they need a CUDA GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
    return None


# ---------------------------------------------------------------- the check


def goals(results: dict[str, dict]) -> dict:
    """Each goal: the figure, the bound and whether it is met (None where a run is missing)."""
    pipeline, trl = results.get("pipeline"), results.get("trl")
    checks = {}
    if pipeline and "peak_memory_mib" in pipeline:
        peak_gib = pipeline["peak_memory_mib"] / 1024
        checks["pipeline peak GiB"] = {"value": round(peak_gib, 2), "goal": f"<= {GOALS['peak_gib']}",
                                       "met": peak_gib <= GOALS["peak_gib"]}  # fmt: skip
        if pipeline.get("predicted_peak_mib"):
            error = pipeline["predicted_peak_mib"] / pipeline["peak_memory_mib"] - 1
            checks["planner error"] = {"value": round(error, 3), "goal": f"within {GOALS['planner_error']:.0%}",
                                       "met": abs(error) <= GOALS["planner_error"]}  # fmt: skip
    if pipeline and trl and "non_padding_tokens_per_second" in pipeline and "non_padding_tokens_per_second" in trl:
        speedup = pipeline["non_padding_tokens_per_second"] / trl["non_padding_tokens_per_second"]
        checks["pipeline / trl"] = {"value": round(speedup, 2), "goal": f">= {GOALS['speedup_over_trl']}x",
                                    "met": speedup >= GOALS["speedup_over_trl"]}  # fmt: skip
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="Starling's shape shrunk (TINY_SHAPE): the CPU check")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    parser.add_argument("--rows", type=int, default=512, help="data rows read (default 512)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--data", default=None, help="JSONL rows; default: re_gad if present, else the bundled sample")
    parser.add_argument(
        "--model-dir", "--model_dir", default=None, help="where the model is built (default: a temp dir)"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data = args.data or str(throughput.SHARED_GAD if throughput.SHARED_GAD.is_file() else throughput.BUNDLED)
    if args.worker:
        worker(args.worker, args.worker_model, data, args.rows, args.steps, args.worker_out)
        return 0

    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("error: no CUDA GPU here; the full-size check needs one (--tiny runs the same path on a CPU)",
              file=sys.stderr)  # fmt: skip
        return 2
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU, {os.cpu_count()} cores"
    print(f"device: {device_name}; {'tiny' if args.tiny else 'Starling-LM-7B-alpha'} shape; {args.steps} steps")
    with tempfile.TemporaryDirectory(prefix="starling-random-") as scratch:
        model_dir = Path(args.model_dir or scratch)
        model_dir.mkdir(parents=True, exist_ok=True)
        built = build_model(model_dir, args.tiny, "cuda" if cuda else "cpu")
        print(f"built: {built['parameters'] / 1e9:.2f} B parameters, {built['bytes_on_disk'] / 2**30:.2f} GiB on "
              f"disk, {built['build_s']} s", flush=True)  # fmt: skip
        results: dict[str, dict] = {}
        for config in args.configs:
            reason = skip_reason(config)
            if reason:
                results[config] = {"config": config, "skipped": reason}
                print(f"{config}: skipped ({reason})", flush=True)
                continue
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                command = [sys.executable, __file__, "--worker", config, "--worker-model", str(model_dir),
                           "--worker-out", out.name, "--data", data, "--rows", str(args.rows),
                           "--steps", str(args.steps)]  # fmt: skip
                print(f"running {config} …", flush=True)
                done = subprocess.run(
                    command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                )
                if done.returncode != 0:
                    # One configuration failing (an optional kernel, say) is recorded; the others still run.
                    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
                    results[config] = {"config": config, "error": tail[0] if tail else f"exit {done.returncode}"}
                    print(f"{config}: failed: {results[config]['error']}", file=sys.stderr, flush=True)
                    continue
                results[config] = json.loads(Path(out.name).read_text())
            record = results[config]
            print(f"{config}: {record['non_padding_tokens_per_second']} tok/s, peak {record['peak_memory_mib']:.0f} MiB"
                  f" (planned {record['predicted_peak_mib']}), auto {record['auto_settings']}", flush=True)  # fmt: skip
    # The goals are for Starling's full shape on a GPU; on the tiny shape they would measure nothing.
    checks = None if args.tiny else goals(results)
    for name, check in (checks or {}).items():
        print(f"goal {name}: {check['value']} ({check['goal']}): {'met' if check['met'] else 'MISSED'}")
    report = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
        "device": device_name,
        "tiny": args.tiny,
        "model": built,
        "data": data,
        "rows": args.rows,
        "steps": args.steps,
        "versions": versions(),
        "results": list(results.values()),
        "goals": checks,
        "total_time_s": round(time.time() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written: {args.out} ({report['total_time_s']} s)")
    failed = [r for r in results.values() if "error" in r and r["config"] != "pipeline-liger"]
    return 1 if failed else 0


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


if __name__ == "__main__":
    sys.exit(main())
