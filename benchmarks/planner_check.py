"""The memory planner judged out of sample: its prediction of what training adds to memory, beside the measurement,
on model shapes and settings that fitted none of its constants.

    python benchmarks/planner_check.py                      # every case, 5 steps each (about 7 minutes on 2 cores)
    python benchmarks/planner_check.py --cases deep long-2048 --out /tmp/p.json

The planner's constants (CPU runtime overhead, what glibc keeps of freed activations, bytes per logit) were fitted on
`embedded:starling-small` (4 layers of width 256, 8 query heads on 4 key-value heads) and `embedded:starling-base` (8
layers of width 768, 12 query heads on 4), at 4 x 512, 8 x 512 and 1 x 128 tokens (docs/performance.md,
"Calibration"). The out-of-sample cases differ in depth (16 layers), in width and grouped-query ratio (width 512, 16
query heads on 2 key-value heads), and in sequence length (1,024 and 2,048 tokens), each with gradient checkpointing on
and off; the calibration's 4 x 512 cases on both shapes are measured again in the same invocation, for comparison.
Each case trains the demo recipe's settings (NF4 + double quantization, LoRA r 8 on every linear layer, packing,
completion-only loss) on the bundled MedTuned sample for 5 steps, in a fresh process, and compares:

- measured: the resident set's growth from right before `trainer.train()` (model loaded, LoRA added, trainer built,
  after `gc.collect()`) to its peak during it (sampled every 2 ms, and `ru_maxrss`), as in the calibration;
- predicted: `plan.predict(recipe).training_growth` for the same recipe, from the model's config alone.

The models are Starling-shaped random-weight models with Starling's tokenizer (`model/tiny_builders/starling.py`),
built into a scratch folder. Results: benchmarks/results/planner-check.json and the table printed.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from qlora_pipeline.cli.spelling import ArgumentParser  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
SMALL = {"hidden": 256, "ffn": 512, "layers": 4, "heads": 8, "kv_heads": 4}  # = embedded:starling-small
BASE = {"hidden": 768, "ffn": 2048, "layers": 8, "heads": 12, "kv_heads": 4}  # = embedded:starling-base
# The calibration's own cases, measured again beside the others in the same invocation.
IN_SAMPLE = {
    "small-ckpt": (SMALL, 4, 512, True),
    "small": (SMALL, 4, 512, False),
    "base-ckpt": (BASE, 4, 512, True),
    "base": (BASE, 4, 512, False),
}
# name → (model shape, per-device batch, max_length, gradient checkpointing)
CASES = {
    **IN_SAMPLE,
    "deep-ckpt": ({**SMALL, "layers": 16}, 4, 512, True),
    "deep": ({**SMALL, "layers": 16}, 4, 512, False),
    "wide-gqa-ckpt": ({"hidden": 512, "ffn": 1536, "layers": 6, "heads": 16, "kv_heads": 2}, 4, 512, True),
    "wide-gqa": ({"hidden": 512, "ffn": 1536, "layers": 6, "heads": 16, "kv_heads": 2}, 4, 512, False),
    "long-1024-ckpt": (SMALL, 2, 1024, True),
    "long-1024": (SMALL, 2, 1024, False),
    "long-2048-ckpt": (SMALL, 1, 2048, True),
    "long-2048": (SMALL, 1, 2048, False),
}
STEPS = 5


def shape_name(shape: dict) -> str:
    return f"h{shape['hidden']}-f{shape['ffn']}-l{shape['layers']}-q{shape['heads']}-kv{shape['kv_heads']}"


def build_model(shape: dict, scratch: Path) -> Path:
    """A Starling-shaped random model of this shape, built once per shape into the scratch folder."""
    from qlora_pipeline.model.tiny_builders.starling import build_starling_shaped

    folder = scratch / shape_name(shape)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_starling_shaped(folder, shape_name(shape), shape=shape)
    return folder


def write_recipe(case: str, model: Path, scratch: Path) -> Path:
    """The demo recipe with this case's model, batch, length and checkpointing (numbers, not `auto`)."""
    import yaml

    _, batch, length, checkpointing = CASES[case]
    recipe = yaml.safe_load(DEMO_RECIPE.read_text())
    recipe.pop("effective_batch_size", None)
    recipe.update(
        model_name_or_path=str(model),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=length,
        gradient_checkpointing=checkpointing,
        max_steps=STEPS,
        eval_split_size=0,
        eval_strategy="no",
        save_strategy="no",
        generation_metric="none",
        report_to="none",
        disable_tqdm=True,
        output_dir=str(scratch / f"run-{case}"),
    )
    path = scratch / f"recipe-{case}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measure(case: str, scratch: Path) -> dict:
    """In this (fresh) process: build the trainer as `train` does, then the growth of the resident set over
    trainer.train(), and the planner's prediction for the same recipe."""
    import torch

    from qlora_pipeline import plan
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train
    from qlora_pipeline.tasks import prepare_data

    shape, batch, length, checkpointing = CASES[case]
    path = write_recipe(case, build_model(shape, scratch), scratch)
    predicted = plan.predict(load_recipe(path))
    recipe = load_recipe(path)
    trainer, _ = train.build_trainer(recipe, prepare_data(recipe))
    sampler = throughput.PeakSampler()  # gc.collect(), then the resident set every 2 ms (CUDA: its peak counter)
    sampler.start()
    started = time.time()
    trainer.train()
    sampler.stop()
    peak = sampler.peak
    if not torch.cuda.is_available():  # as in the calibration: ru_maxrss too, in case a peak fell between samples
        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    measured = peak - sampler.before
    growth = predicted.training_growth / 2**20
    return {
        "case": case,
        "out_of_sample": case not in IN_SAMPLE,
        "shape": shape_name(shape),
        "parameters_m": round(sum(p.numel() for p in trainer.model.parameters()) / 1e6, 1),
        "batch": batch,
        "max_length": length,
        "gradient_checkpointing": checkpointing,
        "labelled_fraction": predicted.labelled_fraction,
        "measured_growth_mib": round(measured, 1),
        "predicted_growth_mib": round(growth, 1),
        "error_percent": round(100 * (growth - measured) / measured, 1),
        "train_seconds": round(time.time() - started, 1),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| case | sample | shape | batch x length | checkpointing | measured growth | predicted | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['case']} | {'out' if r['out_of_sample'] else 'in'} | {r['shape']} | "
            f"{r['batch']} x {r['max_length']} | "
            f"{'on' if r['gradient_checkpointing'] else 'off'} | {r['measured_growth_mib']:,.0f} MiB | "
            f"{r['predicted_growth_mib']:,.0f} MiB | {r['error_percent']:+.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--scratch", help="folder for the built models and runs (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "planner-check.json"))
    parser.add_argument("--worker", choices=list(CASES), help="measure one case in this process (internal)")
    parser.add_argument("--worker-out", help="(internal)")
    args = parser.parse_args(argv)
    if args.worker:
        result = measure(args.worker, Path(args.scratch))
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    from tqdm import tqdm

    results = []
    with tempfile.TemporaryDirectory(prefix="planner-check-") as temporary:
        scratch = Path(args.scratch or temporary)
        for case in tqdm(args.cases, desc="planner check", unit="case"):
            out = scratch / f"{case}.json"
            command = [sys.executable, __file__, "--worker", case, "--scratch", str(scratch), "--worker-out", str(out)]
            environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
            done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    record = {
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "steps": STEPS,
        "results": results,
        "error_percent_range": {
            sample: [min(errors), max(errors)]
            for sample, errors in (
                ("in", [r["error_percent"] for r in results if not r["out_of_sample"]]),
                ("out", [r["error_percent"] for r in results if r["out_of_sample"]]),
            )
            if errors
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    for sample, (low, high) in record["error_percent_range"].items():
        print(f"{sample} of sample: predicted growth from {low:+.1f}% to {high:+.1f}% of the measured")
    print(f"({args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
