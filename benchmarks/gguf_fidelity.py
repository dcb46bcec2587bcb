"""How faithful each GGUF type is, measured by llama.cpp against the merged export, on a small Starling-shaped model.

    python benchmarks/gguf_fidelity.py                         # train, merge (fp32), export every type (about 5 min)
    python benchmarks/gguf_fidelity.py --dtype fp16 --types f16,q8_0,q4_k_m --out /tmp/g.json

Steps, each the real command in a fresh process:
1. `qlora-pipeline train` of the demo recipe (NF4 + double quantization, LoRA r 8, packing) on `--model` (default
   `embedded:starling-small`: 4 layers of width 256, so llama.cpp's K-quant blocks of 256 fit every matrix; the demo's
   width-128 model makes llama.cpp fall back to other types for most tensors) for `--steps` steps;
2. `qlora-pipeline merge --dtype fp32` (or `--dtype`);
3. `qlora-pipeline export-gguf --quant ALL --prompts 16`, with every gate opened (0 / 100%), so that every type is
   measured and none stops the export.

Prints the table of export-gguf's llama.cpp check per type; writes the figures to --out
(benchmarks/results/gguf-fidelity.json) and a plot beside it (top-1 agreement and perplexity change against file size).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from qlora_pipeline.cli.spelling import ArgumentParser
from qlora_pipeline.gguf_types import ALL

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
RUN_NAME = "starling-medtuned"  # the files are RUN_NAME-TYPE.gguf
OPEN_GATES = [
    "--gguf_max_ppl_increase",
    "100",
    "--gguf_quantized_max_ppl_increase",
    "100",
    "--gguf_min_top1_agreement",
    "0",
    "--gguf_quantized_min_top1_agreement",
    "0",
]


def run(*args: str) -> str:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "qlora_pipeline", *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args[:2])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    print(f"  {args[0]}: {time.perf_counter() - started:.0f} s", flush=True)
    return result.stdout


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(figures["files"])
    sizes = [figures["files"][k]["size_bytes"] / 2**20 for k in kinds]
    fig, (top1, ppl) = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label, scale in (
        (top1, "top1_agreement", "top-1 agreement with the export (%)", 100),
        (ppl, "perplexity_increase", "answer perplexity vs the export (%)", 100),
    ):
        values = [figures["files"][k][key] * scale for k in kinds]
        axis.scatter(sizes, values)
        for kind, x, y in zip(kinds, sizes, values):
            axis.annotate(kind, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel("file size (MiB)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    ppl.axhline(0, color="grey", linewidth=0.8)
    fig.suptitle(f"GGUF types in llama.cpp vs the merged export ({figures['model']}, {figures['prompts']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:starling-small")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="merge dtype")
    parser.add_argument("--types", default=",".join(ALL), help="GGUF types (default: all)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gguf-fidelity.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gguf-fidelity-") as scratch:
        recipe = yaml.safe_load(DEMO_RECIPE.read_text())
        recipe.update(
            model_name_or_path=args.model,
            output_dir=str(Path(scratch) / RUN_NAME),
            generation_metric="none",
            per_device_train_batch_size=2,
            gradient_checkpointing=True,
            eval_strategy="no",
            save_strategy="no",
            max_steps=args.steps,
        )
        recipe.pop("effective_batch_size", None)
        recipe_path = Path(scratch) / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        print(f"{args.model}: train {args.steps} steps, merge {args.dtype}, export {args.types}", flush=True)
        run("train", str(recipe_path))
        run("merge", str(Path(scratch) / RUN_NAME), "--dtype", args.dtype, "--prompts", "2")
        stdout = run(
            "export-gguf",
            str(Path(scratch) / RUN_NAME),
            "--quant",
            args.types,
            "--prompts",
            str(args.prompts),
            *OPEN_GATES,
        )
        report = json.loads((Path(scratch) / RUN_NAME / "gguf" / "fidelity.json").read_text())
    print(stdout[stdout.index("== GGUF check") :])
    figures = {"model": args.model, "steps": args.steps, "merge_dtype": args.dtype, "prompts": args.prompts, **report}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    plot(figures, out.with_suffix(".png"))
    print(f"figures: {out}\nplot:    {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
