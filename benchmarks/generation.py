"""Generation for scoring: batched (sorted by token budget then length, left padding, KV cache, per-row budgets)
against one row at a time, on the same held-out rows and model, in one invocation.

    python benchmarks/generation.py                           # starling-small, 64 held-out rows, batch 16
    python benchmarks/generation.py --model embedded:starling-base --rows 32 --out /tmp/generation.json

The rows are the MedTuned metric's: the first --rows scorable rows held out from the bundled sample
(`embedded:medtuned-sample`: NER, relation extraction, NLI, yes/no QA, hallmark labels and label sets), or from
--data; each with the token budget its answer can need (medtuned_metric.token_budget). The model is loaded as the
pipeline loads it for the "before" column of a run: the embedded Starling-shaped model in real 4-bit NF4 (the
recipe's settings), untrained, so every answer runs to its budget (a trained model stops at its end token sooner,
which batching gains from less). Both ways call `qlora_pipeline.tasks.generation.generate`: batched with
`--batch-size` and sorting, the loop with batch 1 in the rows' order. Prints the seconds and rows/s of each, the
speed-up, and how many answers are identical (greedy); writes the figures as JSON (default
benchmarks/results/generation.json).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from qlora_pipeline.cli.spelling import ArgumentParser

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded:starling-small", help="model id or folder (default %(default)s)")
    parser.add_argument("--data", default="embedded:medtuned-sample", help="MedTuned-style rows to hold out from")
    parser.add_argument("--rows", type=int, default=64, help="held-out rows to generate for (default %(default)s)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "generation.json"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import generation, get_task, prepare_data
    from qlora_pipeline.tasks.metrics import medtuned as mm

    overrides = [
        "--model_name_or_path", args.model,
        "--dataset_name", args.data,
        "--eval_split_size", str(min(2 * args.rows, 200)),  # enough to find --rows scorable ones
        "--generation_metric", "medtuned",
        "--output_dir", str(REPO / "runs" / "benchmark-generation"),
    ]  # fmt: skip
    recipe = load_recipe(RECIPE, overrides)
    prepared = prepare_data(recipe)
    found = [row for row in prepared.extra["medtuned_rows"] if row.subtask is not None][: args.rows]
    sets = mm.label_sets(found)
    tokenizer, template = prepared.tokenizer, prepared.template
    prompts = generation.render_prompts(tokenizer, template, [(row.instruction, row.input) for row in found])
    budgets = [mm.token_budget(row, sets.get(row.subtask), tokenizer) for row in found]
    model, _ = get_task("causal_lm").load_model(recipe, prepared)
    model.eval()
    print(
        f"{len(found)} held-out rows, "
        f"budgets {min(budgets)}–{max(budgets)} tokens, model {args.model} in 4-bit, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )

    def timed(batch_size: int, sort: bool, label: str):
        started = time.perf_counter()
        answers = generation.generate(model, tokenizer, template, prompts, budgets, batch_size, sort, progress=label)
        return answers, time.perf_counter() - started

    generation.generate(model, tokenizer, template, prompts[:2], 4, 2)  # warm-up: first-call set-up off the clock
    batched, batched_s = timed(args.batch_size, True, f"batched ({args.batch_size})")
    alone, alone_s = timed(1, False, "one row at a time")
    identical = sum(a == b for a, b in zip(batched, alone))
    result = {
        "model": args.model,
        "rows": len(found),
        "batch_size": args.batch_size,
        "budget_tokens_total": sum(budgets),
        "batched_s": round(batched_s, 2),
        "one_row_s": round(alone_s, 2),
        "batched_rows_per_s": round(len(found) / batched_s, 3),
        "one_row_rows_per_s": round(len(found) / alone_s, 3),
        "speedup": round(alone_s / batched_s, 2),
        "identical_answers": identical,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }
    print(f"\n{'way':<22}{'seconds':>10}{'rows/s':>10}")
    for label, seconds in ((f"batched ({args.batch_size})", batched_s), ("one row at a time", alone_s)):
        print(f"{label:<22}{seconds:>10.1f}{len(found) / seconds:>10.2f}")
    print(f"\nspeed-up {result['speedup']}x; identical answers {identical} of {len(found)} (greedy)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved: {args.out}")
    return result


if __name__ == "__main__":
    main()
