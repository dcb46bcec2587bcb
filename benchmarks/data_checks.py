"""How long the data step's checks take on a large mixture: 200,000 synthetic MedTuned-shaped rows in four sources.

    python benchmarks/data_checks.py                        # 200,000 rows (about half a minute here)
    python benchmarks/data_checks.py --rows 20000 --tokenize --out /tmp/checks.json

The rows are written as four JSONL files (weights 0.4 / 0.3 / 0.2 / 0.1) with planted copies (`--duplicates` rows,
each an earlier row of its file with its whitespace changed) and an eval file of which `--overlaps` rows ask a
training row's question. Then, in this process, each stage of the pipeline's own data step is timed:

1. read: every source read and checked row by row (rows.load_rows: JSON parsed line by line, each field checked),
   renamed to the mixture's columns (data/mixture.load_sources);
2. checks: duplicates and train/eval overlap (data/checks.check_train_and_eval) over every training row;
3. mix: the weighted interleave (datasets.interleave_datasets) and the per-source accounting;
4. with --tokenize, the tokenization of the mixed rows with Starling's tokenizer (the tiny demo model's).

The figures printed are also written to --out (benchmarks/results/data-checks.json). The planted copies and overlaps
must all be found, and nothing else: the script exits non-zero otherwise.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

from qlora_pipeline.cli.spelling import ArgumentParser

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
WEIGHTS = {"ner": 0.4, "re": 0.3, "nli": 0.2, "cls": 0.1}
INSTRUCTIONS = {
    "ner": "Tag every disease mention in the sentence with B-Disease, I-Disease or O, one word per line.",
    "re": "Does the passage state a relation between the gene and the disease? Answer Positive or Negative.",
    "nli": "Does the premise entail, contradict or stay neutral towards the hypothesis?",
    "cls": "Which hallmarks of cancer does the abstract discuss? Answer with the labels, or None.",
}


def write_sources(folder: Path, rows: int, duplicates: int, overlaps: int, seed: int) -> tuple[dict, Path]:
    """Four source files of rows × weight rows each (with `duplicates` planted copies in all) and an eval file
    whose first `overlaps` rows ask a training row's question. Returns ({name: path}, eval path)."""
    rng = random.Random(seed)
    words = "patients tumor gene expression mutation cells disease therapy receptor protein risk increased".split()
    paths, training = {}, []
    planted_left = duplicates
    for index, (name, weight) in enumerate(WEIGHTS.items()):
        count = round(rows * weight)
        planted = planted_left if index == len(WEIGHTS) - 1 else round(duplicates * weight)
        planted_left -= planted
        lines = []
        for i in range(count - planted):  # each row's input starts with its own number: no two alike by chance
            text = f"{name} {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
            lines.append({"instruction": INSTRUCTIONS[name], "input": text, "output": f"answer {i % 7}"})
        for _ in range(planted):  # a row past the first 100, its whitespace changed: the same row to the checks
            original = lines[rng.randrange(100, count - planted)]
            lines.append({**original, "input": "  " + original["input"].replace(" ", "\n", 1) + " "})
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in lines), encoding="utf-8")
        training += lines[:100]  # never copied: each planted overlap repeats one training row
    held_out = [{**row, "output": "held-out answer"} for row in rng.sample(training, overlaps)]
    held_out += [
        {"instruction": "Answer the held-out question.", "input": f"held-out {i}", "output": "yes"} for i in range(50)
    ]
    eval_path = folder / "eval.jsonl"
    eval_path.write_text("".join(json.dumps(row) + "\n" for row in held_out), encoding="utf-8")
    return paths, eval_path


def measure(folder: Path, rows: int, duplicates: int, overlaps: int, tokenize_too: bool = False) -> dict:
    """Write the sources under `folder` and time each stage; returns the figures."""
    from qlora_pipeline.data import checks as data_checks
    from qlora_pipeline.data import mixture
    from qlora_pipeline.data import rows as data_rows
    from qlora_pipeline.recipe import load_recipe

    figures: dict = {"rows": rows, "planted_duplicates": duplicates, "planted_overlaps": overlaps}
    started = time.perf_counter()
    paths, eval_path = write_sources(folder, rows, duplicates, overlaps, seed=0)
    figures["write_s"] = round(time.perf_counter() - started, 2)
    values = yaml.safe_load(DEMO_RECIPE.read_text())
    values.pop("dataset_name")
    values.update(
        dataset_mixture=[{"path": str(path), "weight": WEIGHTS[name]} for name, path in paths.items()],
        eval_file=str(eval_path),
        on_eval_overlap="warn",
        generation_metric="none",
        output_dir=str(folder / "run"),
    )
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(values))
    recipe = load_recipe(recipe_path)
    data, seed = recipe.data, recipe.training.seed

    started = time.perf_counter()
    parts = mixture.load_sources(data, seed, hold_out=False)
    eval_source = data_rows.load_rows(str(eval_path), data)
    held_out = data_rows.held_out_rows(eval_source, data, locate=True)
    figures["read_s"] = round(time.perf_counter() - started, 2)

    started = time.perf_counter()
    found = data_checks.check_train_and_eval(mixture.candidates(parts), held_out, data)
    figures["checks_s"] = round(time.perf_counter() - started, 2)
    figures["duplicates_found"], figures["overlaps_found"] = len(found.duplicates), len(found.overlaps)

    started = time.perf_counter()
    mixed = mixture.mix(parts, data, seed)
    counts = mixture.accounting(parts, mixed, held_out, eval_source)
    figures["mix_s"] = round(time.perf_counter() - started, 2)
    figures["mixed_rows"] = len(mixed)
    figures["shares"] = {name: round(c["draws"] / len(mixed), 4) for name, c in counts["sources"].items()}

    if tokenize_too:
        from qlora_pipeline.data import tokenize
        from qlora_pipeline.data.templates import get_template
        from qlora_pipeline.tasks import get_task

        task = get_task("causal_lm")
        tokenizer, _ = task.load_tokenizer(recipe)
        started = time.perf_counter()
        template = get_template(data.template)
        tokenized = tokenize.tokenize(mixed, tokenizer, template, data, recipe.training.max_length, "train")
        figures["tokenize_s"] = round(time.perf_counter() - started, 2)
        figures["tokens"] = int(sum(tokenized.lengths))
    figures["read_and_check_s"] = round(figures["read_s"] + figures["checks_s"] + figures["mix_s"], 2)
    figures["device"] = f"{os.cpu_count()} CPU cores"
    return figures


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="training rows in all four sources")
    parser.add_argument("--duplicates", type=int, default=1_000, help="planted duplicate rows")
    parser.add_argument("--overlaps", type=int, default=40, help="planted eval rows asking a training question")
    parser.add_argument("--tokenize", action="store_true", help="also time the tokenization of the mixed rows")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data-checks.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets-cache")  # nothing from an earlier run's cache
        figures = measure(Path(scratch), args.rows, args.duplicates, args.overlaps, args.tokenize)

    print(f"{args.rows:,} rows in 4 sources (+ an eval file of {args.overlaps + 50} rows)")
    for key in ("write_s", "read_s", "checks_s", "mix_s", "tokenize_s"):
        if key in figures:
            print(f"  {key[:-2]:<9} {figures[key]:>7.2f} s")
    print(f"  read + checks + mix: {figures['read_and_check_s']:.2f} s")
    print(
        f"  found {figures['duplicates_found']} of {args.duplicates} planted duplicates, "
        f"{figures['overlaps_found']} of {args.overlaps} planted overlaps; shares {figures['shares']}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {args.out}")
    exact = figures["duplicates_found"] == args.duplicates and figures["overlaps_found"] == args.overlaps
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
