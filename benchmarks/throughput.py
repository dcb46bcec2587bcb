"""Training throughput: the tutorial loop, plain TRL, and this pipeline, on the same model, data, length and steps.

    python benchmarks/throughput.py                       # both shapes, 30 steps, re_gad rows if present
    python benchmarks/throughput.py --shapes small --steps 5 --rows 64 --out /tmp/t.json   # CI-sized

Each configuration runs in its own process (so peak memory is its own), one after the other, in one invocation:

  a. tutorial  the loop the project started from: every example padded to max_length, full fine-tuning of the
               float32 model, plain torch.optim.Adam, batch 8, loss on every non-padding token.
  b. trl       plain TRL SFTTrainer + peft QLoRA (4-bit NF4 + double quant, LoRA r 8 on all linear layers), with
               packing, otherwise TRL's defaults; batch 4, gradient checkpointing.
  c. pipeline  `qlora_pipeline.stages.train.run` with the demo recipe's settings (the Starling recipe's, on this model):
               4-bit NF4 + double quant, LoRA r 8 all-linear, packing; 4 rows per optimizer step; gradient
               checkpointing and the batch `auto` (chosen by the memory planner against this machine's memory).
  d. pipeline-checkpointing  the same with gradient checkpointing forced on (the batch still auto), so the gain from
               `auto` and the gain from the step itself are both visible.

Measured for each: non-padding tokens per second (real tokens trained on / training time), the model FLOPs those
tokens stand for and the GFLOP/s achieved, as a share of a float32 matmul's GFLOP/s measured on this machine in the
same invocation (`model_flops_per_token`: the work of a LoRA step on the frozen model), padding fraction,
non-padding tokens per optimizer step, peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU), the growth of
memory over training (peak during training less the memory in use right before it), wall time of the process,
median step time; and the ratios pipeline/tutorial and pipeline/trl. Beside each measured growth, the memory
planner's prediction of it (`qlora_pipeline.plan.predict(...).training_growth`).

Models: Starling-shaped random-weight models built by the project (`embedded:starling-small`, 18.7 M parameters;
`embedded:starling-base`, 99.5 M) with Starling's real tokenizer. Data: the first --rows rows of
../shared/data/medtuned/re_gad-train.jsonl when present, else the bundled MedTuned-schema sample; both rendered in
Starling's chat format, the loss on the answer only where the configuration supports it (b, c).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from qlora_pipeline.cli.spelling import ArgumentParser
from qlora_pipeline.training.measures import current_memory_mib, peak_memory_mib

REPO = Path(__file__).resolve().parent.parent
SHARED_GAD = REPO.parent / "shared" / "data" / "medtuned" / "re_gad-train.jsonl"
BUNDLED = REPO / "qlora_pipeline" / "data" / "samples" / "medtuned_sample.jsonl"
DEMO_RECIPE = REPO / "recipes" / "tiny-starling-medtuned-qlora.yaml"
# tiny: the demo model, for the CI-sized run; small and base: the shapes of the measurements.
SHAPES = {"tiny": "embedded:tiny-starling", "small": "embedded:starling-small", "base": "embedded:starling-base"}
CONFIGS = ("tutorial", "trl", "pipeline", "pipeline-checkpointing")
MAX_LENGTH = 512
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
FIELDS = (
    "config",
    "shape",
    "steps",
    "non_padding_tokens_per_second",
    "padding_fraction",
    "tokens_per_step",
    "model_gflops_per_token",
    "achieved_gflops",
    "peak_memory_mib",
    "memory_growth_mib",
    "predicted_growth_mib",
    "auto_settings",
    "planned_total_mib",
    "measured_total_mib",
    "wall_time_s",
    "train_time_s",
    "median_step_s",
)


# ---------------------------------------------------------------- shared by the workers


def read_rows(data: str, rows: int) -> list[dict]:
    lines = Path(data).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()][:rows]


def messages(row: dict) -> list[dict]:
    from qlora_pipeline.data.templates import get_template

    template = get_template("starling")
    return template.messages(row["instruction"], row.get("input"), row["output"])


class PeakSampler:
    """Peak memory between start() and stop(): CUDA's own peak counter, or on a CPU the resident set sampled every
    2 ms in a thread (ru_maxrss would also count the model load's peak)."""

    def __init__(self):
        self.before = self.peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import torch

        gc.collect()
        self.before = self.peak = current_memory_mib()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            return
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, current_memory_mib())

    def stop(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_memory_mib())


class StepTimer:
    """Wall time of each optimizer step (TrainerCallback protocol, duck-typed so this file imports nothing heavy)."""

    def __init__(self):
        self.times: list[float] = []
        self.memory = PeakSampler()
        self._start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.memory.start()

            def on_train_end(self, args, state, control, **kwargs):
                timer.memory.stop()

            def on_step_begin(self, args, state, control, **kwargs):
                timer._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                timer.times.append(time.perf_counter() - timer._start)

        return _Callback()


# ---------------------------------------------------------------- a. the tutorial loop


def run_tutorial(model_dir: str, rows: list[dict], steps: int, batch_size: int = 8) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|pad_0|>"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    texts = [tokenizer.apply_chat_template(messages(row), tokenize=False) for row in rows]
    # As the tutorial did: every example padded (and cut) to a fixed length.
    encoded = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=MAX_LENGTH,
        add_special_tokens=False,
        return_tensors="pt",
    )
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5)
    memory = PeakSampler()
    memory.start()
    times, real_tokens, total_tokens = [], 0, 0
    for step in range(steps):
        index = [(step * batch_size + i) % len(rows) for i in range(batch_size)]
        start = time.perf_counter()
        loss = model(
            input_ids=encoded["input_ids"][index], attention_mask=encoded["attention_mask"][index], labels=labels[index]
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        real_tokens += int(encoded["attention_mask"][index].sum())
        total_tokens += encoded["input_ids"][index].numel()
    memory.stop()
    return {"times": times, "tokens": real_tokens, "padding_fraction": 1 - real_tokens / total_tokens, "memory": memory}


# ---------------------------------------------------------------- b. plain TRL


def run_trl(model_dir: str, rows: list[dict], steps: int, output_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = "<|pad_0|>"
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization, dtype=dtype)
    dataset = Dataset.from_list([{"prompt": messages(row)[:-1], "completion": messages(row)[-1:]} for row in rows])
    args = SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        max_length=MAX_LENGTH,
        packing=True,
        gradient_checkpointing=True,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
        callbacks=[timer.callback()],
    )
    padding = _padding_fraction(trainer)
    trainer.train()
    return {
        "times": timer.times,
        "tokens": trainer.state.num_input_tokens_seen,
        "padding_fraction": padding,
        "memory": timer.memory,
    }


def _padding_fraction(trainer) -> float:
    from qlora_pipeline.training.measures import non_padding_fraction

    share = non_padding_fraction(trainer)
    return 0.0 if share is None else round(1 - share, 4)


# ---------------------------------------------------------------- c. this pipeline


def pipeline_recipe(
    model: str,
    data: str,
    rows: int,
    steps: int,
    output_dir: str,
    checkpointing: bool = False,
    memory_budget: str | None = None,
    recipe: Path = DEMO_RECIPE,
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The recipe (default: the demo's) on this model and data, and the command-line overrides that set the run
    length: 4 rows per optimizer step, split by the planner (`auto`); gradient checkpointing `auto` too unless forced
    on; the budget `auto` chooses against (default: this machine's free memory less 10%); `extra` overrides."""
    forced = ["--gradient_checkpointing", "true"] if checkpointing else []
    if memory_budget:
        forced += ["--memory_budget", memory_budget]
    return [
        str(recipe),
        "--model_name_or_path", model,
        "--dataset_name", data,
        "--max_train_samples", str(rows),
        "--eval_split_size", "0",
        "--output_dir", output_dir,
        "--max_steps", str(steps),
        "--effective_batch_size", "4",
        *forced,
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--report_to", "none",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def run_pipeline(
    model: str, data: str, rows: int, steps: int, output_dir: str, checkpointing: bool, memory_budget: str | None
) -> dict:
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train

    source, *overrides = pipeline_recipe(model, data, rows, steps, output_dir, checkpointing, memory_budget)
    recipe = load_recipe(source, overrides)
    timer = StepTimer()
    before = current_memory_mib()
    summary = train.run(recipe, overwrite=True, overrides=overrides, callbacks=[timer.callback()])
    share = summary.get("non_padding_fraction")
    auto = summary.get("auto_settings")
    return {
        "times": timer.times,
        "tokens": summary["tokens_seen"],
        "padding_fraction": 0.0 if share is None else round(1 - share, 4),
        "memory": timer.memory,
        # What the planner chose and planned for the whole run (weights + training), beside what the process grew by
        # from before the data and model loaded to its peak.
        "auto_settings": None
        if auto is None
        else {
            k: auto[k] for k in ("gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps")
        },
        "planned_total_mib": None if auto is None else round(auto["planned_bytes"] / 2**20, 1),
        "measured_total_mib": round(peak_memory_mib() - before, 1),
    }


def model_flops_per_token(model_dir: str, length: int) -> float:
    """The work of one LoRA training step per token, in FLOPs: each frozen linear weight of the decoder twice forward
    and backward (the input's gradient; no weight gradient: 4 x its weights), each LoRA weight 6 times (forward,
    input and weight gradients), attention's two products over the causal context (on average half a packed row of
    `length`) forward and twice that backward. Recomputation under gradient checkpointing is not counted: it is
    overhead, not the model's work. The output head, scored at the labelled positions only, is left out."""
    import json as _json

    config = _json.loads((Path(model_dir) / "config.json").read_text())
    hidden, layers, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    q_o = 2 * hidden * heads * head_dim
    k_v = 2 * hidden * kv_heads * head_dim
    linear = layers * (q_o + k_v + 3 * hidden * ffn)
    lora_r = LORA["r"]
    shapes = [(hidden, heads * head_dim), (hidden, kv_heads * head_dim), (hidden, kv_heads * head_dim),
              (heads * head_dim, hidden), (hidden, ffn), (hidden, ffn), (ffn, hidden)]  # fmt: skip
    lora = layers * sum(lora_r * (inp + out) for inp, out in shapes)
    attention_forward = layers * 2 * 2 * heads * head_dim * (length / 2)
    return 4 * linear + 6 * lora + 3 * attention_forward


def matmul_gflops(seconds: float = 3.0) -> float:
    """float32 matmul GFLOP/s on this machine (all threads), on the shapes of a 768-wide layer's 4 x 512 tokens."""
    import torch

    a, b = torch.randn(2048, 768), torch.randn(768, 2048)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * 2048 * 768 * 2048 * count / (time.perf_counter() - start) / 1e9


def predicted_growth_mib(recipe_args: list[str], chosen: dict | None) -> float | None:
    """The memory planner's prediction of what training adds, for the pipeline's recipe with the settings the run
    chose."""
    try:
        from qlora_pipeline import plan
        from qlora_pipeline.recipe import load_recipe
    except ImportError:
        return None
    source, *overrides = recipe_args
    try:
        recipe = load_recipe(source, overrides)
        if chosen:
            recipe.training.per_device_train_batch_size = chosen["per_device_train_batch_size"]
            recipe.training.gradient_accumulation_steps = chosen["gradient_accumulation_steps"]
            recipe.training.gradient_checkpointing = chosen["gradient_checkpointing"]
        prediction = plan.predict(recipe)
    except Exception as exc:  # a planner bug must not lose the measurements
        print(f"warning: no memory plan: {exc}", file=sys.stderr)
        return None
    return round(prediction.training_growth / 2**20, 1)


# ---------------------------------------------------------------- one configuration, in its own process


def worker(config: str, shape: str, data: str, rows_n: int, steps: int, out: str, memory_budget: str | None) -> None:
    from qlora_pipeline.model import tiny

    started = time.time()
    rows = read_rows(data, rows_n)
    model_dir = tiny.resolve_model(SHAPES[shape])
    with tempfile.TemporaryDirectory(prefix=f"bench-{config}-") as scratch:
        if config == "tutorial":
            result = run_tutorial(model_dir, rows, steps)
        elif config == "trl":
            result = run_trl(model_dir, rows, steps, scratch)
        else:
            checkpointing = config == "pipeline-checkpointing"
            run_dir = str(Path(scratch) / "run")
            result = run_pipeline(SHAPES[shape], data, rows_n, steps, run_dir, checkpointing, memory_budget)
    times = result["times"]
    memory = result["memory"]
    tokens_per_second = result["tokens"] / sum(times)
    flops = model_flops_per_token(model_dir, MAX_LENGTH)
    record = {
        "config": config,
        "shape": shape,
        "steps": len(times),
        "non_padding_tokens_per_second": round(tokens_per_second, 1),
        "model_gflops_per_token": round(flops / 1e9, 4),
        "achieved_gflops": round(tokens_per_second * flops / 1e9, 1),
        "padding_fraction": round(result["padding_fraction"], 4),
        "tokens_per_step": round(result["tokens"] / len(times), 1),
        "peak_memory_mib": round(max(memory.peak, peak_memory_mib()), 1),
        "memory_growth_mib": round(memory.peak - memory.before, 1),
        "predicted_growth_mib": None,
        "auto_settings": result.get("auto_settings"),
        "planned_total_mib": result.get("planned_total_mib"),
        "measured_total_mib": result.get("measured_total_mib"),
        "wall_time_s": round(time.time() - started, 1),
        "train_time_s": round(sum(times), 2),
        "median_step_s": round(statistics.median(times), 3),
    }
    if config.startswith("pipeline"):
        with tempfile.TemporaryDirectory() as scratch:
            recipe_args = pipeline_recipe(
                SHAPES[shape], data, rows_n, steps, scratch, config != "pipeline", memory_budget
            )
            record["predicted_growth_mib"] = predicted_growth_mib(recipe_args, result.get("auto_settings"))
    Path(out).write_text(json.dumps(record))


# ---------------------------------------------------------------- the table


def ratio(numerator: dict, denominator: dict) -> float:
    return round(numerator["non_padding_tokens_per_second"] / denominator["non_padding_tokens_per_second"], 2)


def settings(record: dict) -> str:
    """The pipeline's batch x accumulation and checkpointing as it trained (auto or forced)."""
    chosen = record.get("auto_settings")
    if not chosen:
        return ""
    checkpointing = "ckpt" if chosen["gradient_checkpointing"] else "no ckpt"
    return f"{chosen['per_device_train_batch_size']}x{chosen['gradient_accumulation_steps']}, {checkpointing}"


def table(results: list[dict], peak_gflops: float) -> str:
    header = (
        "| shape | config | settings | non-padding tok/s | GFLOP/s (share of matmul) | padding | tokens/step "
        "| median step s | peak MiB | growth MiB (planned) | run MiB (planned) | wall s |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in results:
        planned = f" ({r['predicted_growth_mib']:.0f})" if r.get("predicted_growth_mib") is not None else ""
        total = ""
        if r.get("planned_total_mib") is not None:
            total = f"{r['measured_total_mib']:.0f} ({r['planned_total_mib']:.0f})"
        lines.append(
            f"| {r['shape']} | {r['config']} | {settings(r)} | {r['non_padding_tokens_per_second']:.1f} "
            f"| {r['achieved_gflops']:.1f} ({r['achieved_gflops'] / peak_gflops:.0%}) | {r['padding_fraction']:.1%} "
            f"| {r['tokens_per_step']:.0f} | {r['median_step_s']:.3f} | {r['peak_memory_mib']:.0f} "
            f"| {r['memory_growth_mib']:.0f}{planned} | {total} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["small", "base"])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration (default 30)")
    parser.add_argument("--rows", type=int, default=512, help="rows of the data used (default 512)")
    parser.add_argument(
        "--data", default=None, help="JSONL rows (instruction/input/output); default: re_gad if present"
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "throughput.json"))
    parser.add_argument(
        "--memory-budget", "--memory_budget", default=None,
        help="the pipeline's memory_budget, e.g. 3GiB (default: this machine's free memory less 10%%)",
    )  # fmt: skip
    parser.add_argument(
        "--matmul-seconds", "--matmul_seconds", type=float, default=3.0,
        help="how long the float32 matmul reference is timed, before and after the runs (default 3)",
    )  # fmt: skip
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    data = args.data or str(SHARED_GAD if SHARED_GAD.is_file() else BUNDLED)
    if args.worker:
        worker(args.worker, args.worker_shape, data, args.rows, args.steps, args.worker_out, args.memory_budget)
        return 0

    import torch  # only for the device line

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"device: {device}; data: {data} (first {args.rows} rows); {args.steps} steps; max length {MAX_LENGTH}")
    peak = matmul_gflops(args.matmul_seconds)
    print(f"float32 matmul (2048x768 @ 768x2048): {peak:.1f} GFLOP/s", flush=True)
    results = []
    for shape in args.shapes:
        for config in args.configs:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                command = [
                    sys.executable, __file__, "--worker", config, "--worker-shape", shape, "--worker-out", out.name,
                    "--data", data, "--rows", str(args.rows), "--steps", str(args.steps),
                    *(["--memory-budget", args.memory_budget] if args.memory_budget else []),
                ]  # fmt: skip
                print(f"running {shape}/{config} …", flush=True)
                done = subprocess.run(
                    command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
                )
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                results.append(json.loads(Path(out.name).read_text()))
                print(table(results[-1:], peak).splitlines()[-1], flush=True)
    ratios = {}
    for shape in args.shapes:
        by_config = {r["config"]: r for r in results if r["shape"] == shape}
        for mine, other in (
            ("pipeline", "tutorial"),
            ("pipeline", "trl"),
            ("pipeline-checkpointing", "trl"),
            ("pipeline", "pipeline-checkpointing"),
        ):
            if mine in by_config and other in by_config:
                ratios[f"{shape}: {mine}/{other}"] = ratio(by_config[mine], by_config[other])
    peak_after = matmul_gflops(args.matmul_seconds)
    print()
    print(table(results, peak))
    print(f"float32 matmul: {peak:.1f} GFLOP/s before the runs, {peak_after:.1f} after")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x non-padding tokens per second")
    report = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/throughput.py", *(argv or sys.argv[1:])]),
        "device": device,
        "data": data,
        "rows": args.rows,
        "steps": args.steps,
        "max_length": MAX_LENGTH,
        "memory_budget": args.memory_budget,
        "matmul_gflops": {"before": round(peak, 1), "after": round(peak_after, 1)},
        "results": results,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
