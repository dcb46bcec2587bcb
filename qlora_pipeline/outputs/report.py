"""Run report: report.md and four PNG plots in a run folder, from its summary.json and metrics.jsonl alone.

    report.md           summary, eval loss before → after (with perplexity), data, plots, notes
    loss.png            train loss and eval loss against optimizer step (the "before" eval at step 0)
    learning_rate.png   the learning-rate schedule
    throughput.png      input tokens per second between log lines (evaluation pauses left out)
    lengths.png         training examples by token length, max_length marked
    task_scores.png     a generation metric's subtask scores before/after (medtuned), where there are subtasks

Written by `train` at the end of a run and by `qlora-pipeline report RUN_DIR` at any time after. Nothing is
reloaded (no model, tokenizer or data): every number comes from summary.json or metrics.jsonl, and the lengths
from the histogram `data.TokenizedSplit.stats()` put in summary.json. A plot with nothing to show is skipped with a
note in report.md (and an old copy of it removed); a missing optional metric never fails the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.outputs import sources_table

# file name → alt text in report.md, in report order
PLOTS = {
    "loss.png": "Loss",
    "learning_rate.png": "Learning rate",
    "throughput.png": "Throughput",
    "lengths.png": "Token lengths",
}
FIGSIZE = (8, 4.5)  # inches; at DPI this is 800 x 450 pixels
DPI = 100


@dataclass
class Metrics:
    """metrics.jsonl sorted into what the report uses."""

    train: list[dict] = field(default_factory=list)  # records with a training `loss`, in file order
    evals: dict[int, float] = field(default_factory=dict)  # step → eval_loss (the last one logged at that step)
    before: float | None = None  # eval loss before training (logged as `before_loss` at step 0)
    throughput: list[tuple[int, float]] = field(default_factory=list)  # (step, tokens/s or tokens/step)
    timed: bool = False  # throughput is per second (train_runtime was logged), not per step
    skipped_lines: list[int] = field(default_factory=list)


def load_run(run_dir: Path) -> tuple[dict, list[dict], list[int]]:
    """(summary, metric records, numbers of unreadable metrics lines). One-line PipelineError if it is no run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise PipelineError(f"{run_dir}: no such run folder")
    if not run_dir.is_dir():
        raise PipelineError(f"{run_dir}: not a folder; give the run folder that holds summary.json and metrics.jsonl")
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    for path in (summary_path, metrics_path):
        if not path.is_file():
            raise PipelineError(
                f"{run_dir}: no {path.name} in this folder; train writes it (is this a finished run folder?)"
            )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{summary_path}: not valid JSON ({exc})") from None
    if not isinstance(summary, dict):
        raise PipelineError(f"{summary_path}: expected a JSON object, got {type(summary).__name__}")
    records, skipped = [], []
    for lineno, line in enumerate(metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped.append(lineno)  # e.g. the last line of a run killed mid-write
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            skipped.append(lineno)
    return summary, records, skipped


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sort_metrics(records: list[dict]) -> Metrics:
    metrics = Metrics()
    for record in records:
        if _number(record.get("before_loss")) is not None:
            metrics.before = float(record["before_loss"])
        if _number(record.get("eval_loss")) is not None:
            metrics.evals[record["step"]] = float(record["eval_loss"])
        if _number(record.get("loss")) is not None:
            metrics.train.append(record)
    if metrics.before is None:  # under DeepSpeed the eval before training is logged as the eval at step 0
        metrics.before = metrics.evals.get(0)
    metrics.throughput, metrics.timed = _throughput(records)
    return metrics


def _tokens(record: dict) -> float | None:
    value = _number(record.get("num_input_tokens_seen"))
    return value if value is not None else _number(record.get("num_tokens"))


def _throughput(records: list[dict]) -> tuple[list[tuple[int, float]], bool]:
    """Tokens per second between consecutive training log lines, from the cumulative token count and the
    cumulative `train_runtime` the trainer logs on each line, less the evaluations run in between. Without
    `train_runtime`, tokens per optimizer step. A resumed run restarts train_runtime: that interval is skipped."""
    train = [r for r in records if _number(r.get("loss")) is not None and _tokens(r) is not None]
    timed = bool(train) and all(_number(r.get("train_runtime")) is not None for r in train)
    in_train = {id(r) for r in train}
    points: dict[int, float] = {}
    previous = {"step": 0, "tokens": 0.0, "time": 0.0}  # the start of a fresh run
    eval_time = 0.0
    for record in records:
        if _number(record.get("eval_loss")) is not None:
            eval_time += _number(record.get("eval_runtime")) or 0.0
            continue
        if id(record) not in in_train:
            continue
        step, tokens = record["step"], _tokens(record)
        now = _number(record.get("train_runtime")) if timed else None
        if step > previous["step"] and tokens >= previous["tokens"]:
            if timed:
                elapsed = now - previous["time"] - eval_time
                if now >= previous["time"] and elapsed > 0:
                    points[step] = (tokens - previous["tokens"]) / elapsed
            else:
                points[step] = (tokens - previous["tokens"]) / (step - previous["step"])
        previous = {"step": step, "tokens": tokens, "time": now}
        eval_time = 0.0
    return sorted(points.items()), timed


# ---------------------------------------------------------------- plots


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend, safe in any process

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, format="png")


def plot_loss(metrics: Metrics, path: Path) -> str | None:
    """None when written, else why it was skipped."""
    evals = dict(metrics.evals)
    if metrics.before is not None:
        evals.setdefault(0, metrics.before)
    if not metrics.train and not evals:
        return "no train or eval loss in metrics.jsonl"
    figure, axes = _figure("Loss", "optimizer step", "loss (cross-entropy, nats per token)")
    if metrics.train:
        steps = [r["step"] for r in metrics.train]
        many = len(steps) > 60
        axes.plot(steps, [r["loss"] for r in metrics.train], marker=None if many else ".", label="train loss")
    if evals:
        steps = sorted(evals)
        label = "eval loss (step 0: before training)" if 0 in evals else "eval loss"
        axes.plot(steps, [evals[s] for s in steps], "o--", markersize=7, label=label)
    _integer_steps(axes)
    if metrics.train and evals:
        axes.legend()
    _save(figure, path)
    return None


TASK_SCORES_PLOT = "task_scores.png"


def plot_task_scores(summary: dict, path: Path) -> bool:
    """Before/after bars per subtask of a generation metric with subtasks (medtuned): each subtask's score and the
    share of answers that parsed. False (nothing written) for a run without subtasks."""
    stages = summary.get("task_metrics") or {}
    stages = {k: v for k, v in stages.items() if isinstance(v, dict)}
    subtasks = list(dict.fromkeys(k.rsplit("/", 1)[0] for m in stages.values() for k in m if "/" in k))
    if not subtasks:
        return False
    import numpy as np
    from matplotlib.figure import Figure

    figure = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] + 0.5), dpi=DPI, layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    names = [*subtasks, "overall"]
    positions = np.arange(len(names))
    width = 0.8 / max(len(stages), 1)
    for panel, (metric, overall, title) in zip(
        panels,
        (
            ("score", "task_score", "score (NER entity F1, label macro-F1, label-set micro-F1)"),
            ("parsed", "parsed", "answers that parsed, %"),
        ),
    ):
        for number, (stage, metrics) in enumerate(stages.items()):
            values = [metrics.get(f"{name}/{metric}") for name in subtasks] + [metrics.get(overall)]
            heights = [v if isinstance(v, (int, float)) else 0 for v in values]
            panel.bar(positions + (number - (len(stages) - 1) / 2) * width, heights, width, label=stage)
        panel.set_xticks(positions, names, rotation=30, ha="right")
        panel.set_title(title, fontsize=9)
        panel.set_ylim(0, 100)
        panel.grid(True, axis="y", alpha=0.3)
    panels[0].legend()
    figure.suptitle("Task scores on the held-out rows, per subtask")
    _save(figure, path)
    return True


def plot_learning_rate(metrics: Metrics, path: Path, scheduler: str | None) -> str | None:
    points = [(r["step"], r["learning_rate"]) for r in metrics.train if _number(r.get("learning_rate")) is not None]
    if not points:
        return "no learning_rate in metrics.jsonl"
    title = f"Learning rate ({scheduler} schedule)" if scheduler else "Learning rate"
    figure, axes = _figure(title, "optimizer step", "learning rate")
    axes.plot(*zip(*points), marker="." if len(points) <= 60 else None)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _integer_steps(axes)
    _save(figure, path)
    return None


def plot_throughput(metrics: Metrics, path: Path, average: float | None) -> str | None:
    if not metrics.throughput:
        return "metrics.jsonl has too few training log lines with a token count (num_input_tokens_seen)"
    if metrics.timed:
        ylabel = "input tokens per second (all processes)"
        title = "Training throughput (evaluation pauses left out)"
    else:
        ylabel = "input tokens per optimizer step (no timing in metrics.jsonl)"
        title = "Tokens per optimizer step"
    figure, axes = _figure(title, "optimizer step", ylabel)
    steps, values = zip(*metrics.throughput)
    axes.plot(steps, values, marker="." if len(steps) <= 60 else None, label="between log lines")
    if metrics.timed and average:
        axes.axhline(average, linestyle="--", color="gray", label=f"run average, evaluation included: {average:.1f}")
        axes.legend()
    axes.set_ylim(bottom=0)
    _integer_steps(axes)
    _save(figure, path)
    return None


def plot_lengths(train: dict, path: Path, max_length: int | None, overlong_policy: str | None) -> str | None:
    histogram = train.get("length_histogram") if isinstance(train, dict) else None
    if not histogram or not histogram.get("counts") or not sum(histogram["counts"]):
        return "summary.json has no token-length histogram (runs trained before it was recorded lack it)"
    edges, counts = histogram["edges"], histogram["counts"]
    figure, axes = _figure(
        "Training examples by token length", "tokens per example (prompt + answer, before truncation)", "examples"
    )
    widths = [b - a for a, b in zip(edges, edges[1:])]
    axes.bar(edges[:-1], counts, width=widths, align="edge", edgecolor="white", label="training examples")
    axes.set_ylim(0, max(counts) * 1.3)  # headroom for the legend or the max_length note
    longest = edges[-1]
    over = train.get("overlong")
    what = {"drop": "dropped", "truncate": "truncated"}.get(overlong_policy or "", "")
    over_text = (
        f"{over} of {train.get('rows')} examples over it" + (f" ({what})" if what else "") if over is not None else ""
    )
    if max_length is None:
        axes.text(0.99, 0.95, "no max_length", transform=axes.transAxes, ha="right", va="top")
    elif max_length <= 2 * longest:
        axes.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length {max_length}: {over_text}")
        axes.set_xlim(0, max(longest, max_length) * 1.04)
        axes.legend(loc="upper left")
    else:  # far beyond the longest example: marking it on the axis would squash the bars
        axes.set_xlim(0, longest * 1.08)
        axes.text(
            0.99,
            0.95,
            f"max_length {max_length} → off the chart (longest example: {train.get('max', longest)} tokens)"
            + (f"\n{over_text}" if over_text else ""),
            transform=axes.transAxes,
            ha="right",
            va="top",
            color="tab:red",
            bbox={"facecolor": "white", "edgecolor": "tab:red", "alpha": 0.9},
        )
    _save(figure, path)
    return None


# ---------------------------------------------------------------- report.md


def _loss(value) -> str:
    return "n/a" if _number(value) is None else f"{value:.4f}"


def _perplexity(loss) -> str:
    if _number(loss) is None:
        return "n/a"
    try:
        return f"{math.exp(loss):,.2f}"
    except OverflowError:
        return "overflow"


def _int(value) -> str:
    return "n/a" if _number(value) is None else f"{int(value):,}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]


def _read_recipe(run_dir: Path) -> dict:
    """The resolved recipe saved with the run (for max_length and names); {} if it is missing or unreadable."""
    try:
        import yaml

        values = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except Exception:  # optional: the report does without it
        return {}
    return values if isinstance(values, dict) else {}


def _summary_section(summary: dict, metrics: Metrics) -> list[str]:
    steps = _int(summary.get("global_step"))
    if summary.get("resumed_from_step"):
        steps += f" (resumed from step {summary['resumed_from_step']})"
    rows = [
        ["optimizer steps", steps],
        ["epochs", summary.get("epochs", "n/a")],
        ["tokens seen (non-padding)", _int(summary.get("tokens_seen"))],
        ["non-padding tokens/s", _float(summary.get("non_padding_tokens_per_second"), ".1f")],
        ["train loss (mean over the run)", _loss(summary.get("train_loss"))],
    ]
    if _number(summary.get("non_padding_fraction")) is not None:
        rows.insert(4, ["non-padding share of batch positions", f"{summary['non_padding_fraction']:.1%}"])
    if metrics.train:
        last = metrics.train[-1]
        rows.append([f"last logged train loss (step {last['step']})", _loss(last["loss"])])
    rows += [
        ["train runtime", _float(summary.get("train_runtime_s"), ".1f", " s")],
        ["wall time", _float(summary.get("wall_time_s"), ".1f", " s")],
        ["peak memory", _float(summary.get("peak_memory_mib"), ",.0f", " MiB")],
        ["processes", summary.get("processes", "n/a")],
    ]
    return ["## Summary", "", *_table(["", "value"], rows)]


def _float(value, spec: str, unit: str = "") -> str:
    return "n/a" if _number(value) is None else f"{format(value, spec)}{unit}"


def _eval_section(summary: dict, metrics: Metrics) -> list[str]:
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    lines = ["## Evaluation", ""]
    if _number(before) is None and _number(after) is None and not metrics.evals:
        return lines + ["No evaluation in this run (no eval split or eval file)."]
    rows = []
    if _number(before) is not None:
        rows.append(["before training", _loss(before), _perplexity(before)])
    if _number(after) is not None:
        rows.append([f"after training (step {summary.get('global_step', '?')})", _loss(after), _perplexity(after)])
    if _number(before) is not None and _number(after) is not None:
        change = after - before
        share = f" ({change / before:+.1%})" if before else ""
        rows.append(["change", f"{change:+.4f}{share}", ""])
    if rows:
        lines += _table(["", "eval loss", "perplexity"], rows) + [""]
    if len(metrics.evals) > 1:  # evaluations during training, not only the final one
        points = (
            [["0 (before training)", _loss(metrics.before), _perplexity(metrics.before)]]
            if metrics.before is not None
            else []
        )
        points += [[str(step), _loss(loss), _perplexity(loss)] for step, loss in sorted(metrics.evals.items())]
        lines += [
            "Eval loss at each evaluation (metrics.jsonl):",
            "",
            *_table(["step", "eval loss", "perplexity"], points),
            "",
        ]
    lines.append("Perplexity is exp(eval loss), the loss being the mean cross-entropy per token in the loss.")
    return lines


DATA_ROWS = (
    ("rows", "rows"),
    ("examples trained on", "examples"),
    ("over max_length", "overlong"),
    ("dropped", "dropped"),
    ("truncated", "truncated"),
    ("tokens (all rows)", "tokens"),
    ("min length", "min"),
    ("median length", "median"),
    ("mean length", "mean"),
    ("95th percentile length", "p95"),
    ("max length", "max"),
)


def _data_section(summary: dict, recipe: dict) -> list[str]:
    splits = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    present = [(name, splits[name]) for name in ("train", "eval") if isinstance(splits.get(name), dict)]
    lines = ["## Data", ""]
    if not present:
        return lines + ["summary.json holds no data statistics."]
    rows = []
    for label, key in DATA_ROWS:
        cells = []
        for _, stats in present:
            value = stats.get(key)
            cells.append("n/a" if _number(value) is None else (f"{value:,}" if isinstance(value, int) else str(value)))
        rows.append([label, *cells])
    lines += _table(["", *(name for name, _ in present)], rows)
    max_length, policy = recipe.get("max_length"), recipe.get("overlong")
    limit = f"max_length {max_length}" if max_length is not None else "no max_length"
    lines += [
        "",
        f"Lengths are tokens per example (prompt + answer), before truncation; {limit}"
        + (f", longer examples are {'dropped' if policy == 'drop' else 'truncated'}." if policy else "."),
    ]
    by_source = sources_table.markdown_table(splits)
    if by_source:
        lines += ["", "### Sources", "", *by_source, ""]
        lines.append(
            "Rows read = train (distinct rows in the training set) + eval + skipped + unused; draws: training "
            "examples drawn from the source; share: of the training examples; the last two columns are shares of "
            "its training examples."
        )
    checks = splits.get("checks")
    if isinstance(checks, dict):
        lines += [
            "",
            f"Data checks: duplicate training rows {checks.get('duplicates', 0)}, training rows repeating a "
            f"held-out prompt {checks.get('overlaps', 0)}, left out {checks.get('dropped', 0)}"
            + (" (listed in data_checks.json)." if checks.get("duplicates") or checks.get("overlaps") else "."),
        ]
    return lines


def _task_metric_section(run_dir: Path) -> list[str]:
    """The task's before/after table (evaluation.md, written by train and `qlora-pipeline evaluate`), if any."""
    table = run_dir / "evaluation.md"
    if not table.is_file():
        return []
    body = table.read_text(encoding="utf-8").strip().splitlines()
    return ["## Task metric (held-out rows)", "", *body[1:], ""]  # its own title becomes this section's


def write_report(run_dir: Path) -> Path:
    """Write report.md and the PNG plots into the run folder; returns the report.md path."""
    run_dir = Path(run_dir)
    summary, records, skipped_lines = load_run(run_dir)
    metrics = sort_metrics(records)
    recipe = _read_recipe(run_dir)
    splits = summary.get("data") if isinstance(summary.get("data"), dict) else {}
    train_stats = splits.get("train") if isinstance(splits.get("train"), dict) else {}
    max_length = recipe.get("max_length") if isinstance(recipe.get("max_length"), int) else None

    makers = {
        "loss.png": lambda path: plot_loss(metrics, path),
        "learning_rate.png": lambda path: plot_learning_rate(metrics, path, recipe.get("lr_scheduler_type")),
        "throughput.png": lambda path: plot_throughput(
            metrics, path, _number(summary.get("non_padding_tokens_per_second"))
        ),
        "lengths.png": lambda path: plot_lengths(train_stats, path, max_length, recipe.get("overlong")),
    }
    plot_lines = ["## Plots", ""]
    for name, alt in PLOTS.items():
        path = run_dir / name
        reason = makers[name](path)
        if reason is None:
            plot_lines += [f"![{alt}]({name})", ""]
        else:
            path.unlink(missing_ok=True)  # an old plot would contradict this report
            plot_lines += [f"_{alt} plot skipped: {reason}._", ""]

    if plot_task_scores(summary, run_dir / TASK_SCORES_PLOT):
        plot_lines += [f"![Task scores per subtask]({TASK_SCORES_PLOT})", ""]
    else:
        (run_dir / TASK_SCORES_PLOT).unlink(missing_ok=True)

    lines = [f"# Run report: {run_dir.resolve().name}", ""]
    described = [f"Run folder `{summary.get('run_dir', run_dir)}`"]
    if recipe.get("model_name_or_path"):
        described.append(f"base model `{recipe['model_name_or_path']}`")
    if recipe.get("dataset_name"):
        described.append(f"data `{recipe['dataset_name']}`")
    elif isinstance(recipe.get("dataset_mixture"), list):
        paths = [str(entry.get("path")) for entry in recipe["dataset_mixture"] if isinstance(entry, dict)]
        described.append("data: a mixture of " + ", ".join(f"`{path}`" for path in paths))
    lines += [", ".join(described) + ".", ""]
    lines += _summary_section(summary, metrics) + [""]
    lines += _eval_section(summary, metrics) + [""]
    lines += _task_metric_section(run_dir)
    lines += plot_lines
    lines += _data_section(summary, recipe) + [""]
    notes = [str(note) for note in summary.get("notes") or []]
    if skipped_lines:
        shown = ", ".join(str(n) for n in skipped_lines[:5]) + (" …" if len(skipped_lines) > 5 else "")
        notes.append(f"metrics.jsonl: {len(skipped_lines)} unreadable line(s) skipped (line {shown})")
    lines += ["## Notes", ""] + ([f"- {note}" for note in notes] or ["None."])
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report
