"""Start-up: how long the CLI takes to print help, to refuse a recipe's unknown key, and to validate a good recipe.

    python benchmarks/startup.py                      # 5 runs each; table on stdout, JSON to benchmarks/results/
    python benchmarks/startup.py --runs 3 --out /tmp/startup.json

Each figure is the wall time of a whole `qlora-pipeline …` process (subprocess start to exit, interpreter start-up
included), median of --runs runs, with HF_HUB_OFFLINE=1 and a cache folder (QLORA_PIPELINE_CACHE) of the benchmark's
own:

  --help                    `qlora-pipeline --help`
  train --help              `qlora-pipeline train --help`
  unknown key, cold cache   `train BAD.yaml` (a recipe with `lerning_rate`), each run with an empty cache folder: no
                            recipe-key cache yet, so the full check runs (trl, transformers, torch imported)
  unknown key, warm cache   the same, the recipe-key cache written by an earlier run: refused from the cache
  unknown option, warm      `train GOOD.yaml --not_a_key 3`, warm cache
  valid recipe, validation  `load_recipe(GOOD.yaml)` in `python -c`: every check `train` makes before loading
                            anything (the full check always imports trl and torch)
  valid recipe, preprocess  `qlora-pipeline preprocess GOOD.yaml`: validation + tokenizer + data checked and
                            tokenized (tokenizer and tokenized data already cached by a warm-up run)

"imports torch" is read from one more run of the same command under `python -X importtime`.
GOOD.yaml is recipes/tiny-starling-medtuned-qlora.yaml (the embedded tiny model and sample data, offline).
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from qlora_pipeline.cli.spelling import ArgumentParser

REPO = Path(__file__).resolve().parent.parent
GOOD = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "startup.json"
VALIDATE = "import sys; from qlora_pipeline.recipe import load_recipe; load_recipe(sys.argv[1])"


def cli() -> list[str]:
    """The installed console script beside this interpreter, as a user runs it; else `python -m qlora_pipeline`."""
    script = Path(sys.executable).with_name("qlora-pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "qlora_pipeline"]


def run(command: list[str], cache: Path, expect: int) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "QLORA_PIPELINE_CACHE": str(cache)}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if result.returncode != expect:
        raise SystemExit(f"{command}: exit {result.returncode}, expected {expect}\n{result.stdout}\n{result.stderr}")
    return elapsed, result


def imports_torch(args: list[str], python_args: list[str] | None, cache: Path, expect: int) -> bool:
    """One more run under -X importtime: did the process import torch?"""
    command = [sys.executable, "-X", "importtime", *(python_args or ["-m", "qlora_pipeline"]), *args]
    _, result = run(command, cache, expect)
    return re.search(r"\|\s+torch$", result.stderr, re.MULTILINE) is not None


def main() -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per scenario (median reported); default 5")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT})")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    bad = work / "bad.yaml"
    bad.write_text(GOOD.read_text(encoding="utf-8") + "lerning_rate: 1.0e-3\n", encoding="utf-8")
    good = work / "good.yaml"
    good.write_text(
        GOOD.read_text(encoding="utf-8").replace("output_dir: runs/", f"output_dir: {work}/runs/"), encoding="utf-8"
    )
    warm = work / "warm-cache"
    # Warm-up: writes the recipe-key cache, builds the tiny tokenizer and tokenizes the sample into `warm`.
    run([*cli(), "preprocess", str(good)], warm, 0)

    cold_index = iter(range(10**6))

    def cold() -> Path:
        return work / f"cold-cache-{next(cold_index)}"

    validate = [sys.executable, "-c", VALIDATE]
    # name, argv after the program, python-level command (None: the CLI), cache (a Path, or a function for a fresh one
    # each run), expected exit status
    scenarios = [
        ("--help", ["--help"], None, warm, 0),
        ("train --help", ["train", "--help"], None, warm, 0),
        ("unknown key, cold cache", ["train", str(bad)], None, cold, 2),
        ("unknown key, warm cache", ["train", str(bad)], None, warm, 2),
        ("unknown option, warm cache", ["train", str(good), "--not_a_key", "3"], None, warm, 2),
        ("valid recipe, validation", [str(good)], ["-c", VALIDATE], warm, 0),
        ("valid recipe, preprocess", ["preprocess", str(good)], None, warm, 0),
    ]
    results = []
    for name, args, python_args, cache, expect in scenarios:
        program = validate[:1] + python_args if python_args else cli()
        times = []
        for _ in range(options.runs):
            folder = cache() if callable(cache) else cache
            elapsed, _ = run([*program, *args], folder, expect)
            times.append(elapsed)
        torch = imports_torch(args, python_args, cache() if callable(cache) else cache, expect)
        shown = " ".join(["qlora-pipeline" if not python_args else "python -c 'load_recipe(…)'", *args])
        shown = shown.replace(str(work) + "/", "")
        results.append(
            {
                "scenario": name,
                "command": shown,
                "median_s": round(statistics.median(times), 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
                "runs_s": [round(t, 3) for t in times],
                "imports_torch": torch,
            }
        )
        print(f"  {name}: median {statistics.median(times):.3f} s", file=sys.stderr)

    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "qlora-pipeline"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    report = {
        "benchmark": "startup",
        "runs_per_scenario": options.runs,
        "statistic": "median wall time of the whole subprocess, seconds",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions,
        "results": results,
    }
    options.out.parent.mkdir(parents=True, exist_ok=True)
    options.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    width = max(len(r["scenario"]) for r in results)
    print(f"{'scenario':<{width}}  {'median s':>8}  {'min s':>7}  {'max s':>7}  imports torch  command")
    for r in results:
        print(
            f"{r['scenario']:<{width}}  {r['median_s']:>8.3f}  {r['min_s']:>7.3f}  {r['max_s']:>7.3f}  "
            f"{'yes' if r['imports_torch'] else 'no':<13}  {r['command']}"
        )
    print(f"\n{options.runs} runs each; JSON: {options.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
