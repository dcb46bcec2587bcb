"""How a merged export is checked against the model as trained: the fidelity probe a task hands to the merge.

The merge (stages/merge.py) runs one sequence for every task: the probe measures the trained model (4-bit base +
adapter), then the saved export reloaded with plain transformers, then compares the two and gives the verdict.
- `MetricProbe` (QA, classification, seq2seq): the task's own metric on the held-out rows, headline metrics side by
  side; the merge fails if one moves by more than merge_max_metric_change points.
- `LogitProbe` (causal LM): on the first held-out examples, float32 logits over prompt + reference answer, the
  perplexity of the reference answers and greedy generations; fails past merge_max_ppl_increase or
  merge_max_logit_diff. Where the recipe has a generation metric (symptoms, medtuned), that metric is compared too,
  answer for answer, as `MetricProbe` does.
"""

from __future__ import annotations

import math

from qlora_pipeline.errors import PipelineError, clip
from qlora_pipeline.tasks.measure import measure, same_answers
from qlora_pipeline.tasks.metrics import generation_metric_names


def metric_changes(headline, reference: dict, candidate: dict, limit: float) -> tuple[dict, str | None]:
    """The headline metrics' change from the trained model to the export, and the failure where the largest moves by
    more than `limit` points (None: within it)."""
    changes = {
        name: round(candidate[name] - reference[name], 4)
        for name in headline
        if isinstance(reference.get(name), (int, float)) and isinstance(candidate.get(name), (int, float))
    }
    worst = max(changes, key=lambda name: abs(changes[name]), default=None)
    if worst is None or abs(changes[worst]) <= limit:
        return changes, None
    return changes, f"{worst} moved by {changes[worst]:+.2f} > allowed {limit:g} points"


def task_fidelity(recipe, reference: dict, candidate: dict) -> dict:
    """A causal LM's generation metric (symptoms, medtuned) for the export beside the trained model's: headline
    changes, answers identical row for row, and the verdict against merge_max_metric_change."""
    same, compared = same_answers(reference.pop("rows", []), candidate.pop("rows", []))
    headline = generation_metric_names(recipe)
    limit = recipe.export.merge_max_metric_change
    changes, failure = metric_changes(headline, reference, candidate, limit)
    return {
        "reference": reference,
        "export": candidate,
        "changes": changes,
        "identical_predictions": same,
        "compared": compared,
        "max_metric_change": limit,
        "passed": failure is None,
        "failure": failure and f"task metric {failure}",
    }


def _quantization(recipe) -> str:
    return "4-bit" if recipe.model.load_in_4bit else "8-bit" if recipe.model.load_in_8bit else "unquantized"


class MetricProbe:
    """The task's metric on the held-out rows, for the trained model and the export."""

    in_card = False  # the card shows the export's own scores, not a fidelity table

    def __init__(self, task, recipe, prepared):
        if prepared.eval_rows is None:
            raise PipelineError(
                f"merge: {recipe.source} holds out no rows, so the export cannot be checked; set eval_split_size"
            )
        self.task, self.recipe, self.prepared = task, recipe, prepared
        self.headline = list(task.metric_names_for(recipe))

    def describe(self) -> str:
        return "the task metric on the held-out rows"

    def measure(self, model, label: str) -> dict:
        return measure(self.task, model, self.prepared, self.recipe)

    def compare(self, reference: dict, candidate: dict) -> dict:
        limit = self.recipe.export.merge_max_metric_change
        changes, failure = metric_changes(self.headline, reference, candidate, limit)
        return {
            "task": self.task.name,
            "reference": f"{_quantization(self.recipe)} base + adapter, as trained",
            "export_class": self.task.auto_class,
            "reference_metrics": reference,
            "export_metrics": candidate,
            "metric_changes": changes,
            "thresholds": {"max_metric_change": limit},
            "passed": failure is None,
            "failure": failure,
        }

    def print(self, report: dict) -> None:
        print("\n== merge fidelity: export vs. the model as trained (task metric, held-out rows) ==")
        for name in self.headline:
            before, after = report["reference_metrics"].get(name), report["export_metrics"].get(name)
            shown = [f"{v:.2f}" if isinstance(v, (int, float)) else "n/a" for v in (before, after)]
            print(f"{name:<14} {shown[0]:>8} trained → {shown[1]:>8} export")
        print(f"verdict        {'passed' if report['passed'] else 'FAILED: ' + report['failure']}")


class LogitProbe:
    """Logits, answer perplexity and greedy generations on the first held-out examples (training rows where none
    is held out), plus the recipe's generation metric where it has one."""

    in_card = True

    def __init__(self, task, recipe, prepared):
        self.task, self.recipe, self.prepared = task, recipe, prepared
        tokenizer = prepared.tokenizer
        self.end_id = tokenizer.convert_tokens_to_ids(prepared.template.end_token_for(tokenizer))
        self.examples, self.examples_from = fidelity_examples(prepared, recipe.export.merge_fidelity_prompts)
        self.scores = bool(task.metric_names_for(recipe)) and prepared.eval_rows is not None

    def describe(self) -> str:
        return f"{len(self.examples)} {self.examples_from} examples"

    def measure(self, model, label: str) -> dict:
        options = self.recipe.export
        figures = logit_pass(
            model, self.examples, self.end_id, self.prepared.tokenizer, options.merge_fidelity_max_new_tokens, label
        )
        figures["task"] = measure(self.task, model, self.prepared, self.recipe) if self.scores else None
        return figures

    def compare(self, reference: dict, candidate: dict) -> dict:
        report = self._logit_report(reference, candidate)
        report["examples_from"] = self.examples_from
        if reference["task"] is not None:
            report["task_metrics"] = task_fidelity(self.recipe, reference["task"], candidate["task"])
            if not report["task_metrics"]["passed"]:
                failure = report["task_metrics"]["failure"]
                report["failure"] = "; ".join(filter(None, [report["failure"], failure]))
                report["passed"] = False
        return report

    def _logit_report(self, reference: dict, candidate: dict) -> dict:
        import torch

        options, examples, tokenizer = self.recipe.export, self.examples, self.prepared.tokenizer
        answer_tokens = sum(int(e["completion_mask"][1:].sum()) for e in examples)
        per_example_max = [float((a - b).abs().max()) for a, b in zip(reference["logits"], candidate["logits"])]
        total_abs = sum(float((a - b).abs().sum()) for a, b in zip(reference["logits"], candidate["logits"]))
        total_values = sum(a.numel() for a in reference["logits"])
        ppl_reference = math.exp(float(torch.stack(reference["nll"]).sum()) / max(answer_tokens, 1))
        ppl_merged = math.exp(float(torch.stack(candidate["nll"]).sum()) / max(answer_tokens, 1))
        increase = ppl_merged / ppl_reference - 1
        max_diff = max(per_example_max)
        failures = []
        if increase > options.merge_max_ppl_increase:
            failures.append(f"perplexity +{increase:.2%} > allowed +{options.merge_max_ppl_increase:.2%}")
        if options.merge_max_logit_diff is not None and max_diff > options.merge_max_logit_diff:
            failures.append(f"max logit difference {max_diff:.3g} > allowed {options.merge_max_logit_diff:.3g}")

        def text(ids):
            return tokenizer.decode(ids, skip_special_tokens=True).strip()

        pairs = zip(examples, reference["generations"], candidate["generations"], per_example_max)
        return {
            "reference": f"{_quantization(self.recipe)} base + adapter, as trained",
            "prompts": len(examples),
            "answer_tokens": answer_tokens,
            "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": total_abs / total_values,
            "perplexity_reference": ppl_reference,
            "perplexity_merged": ppl_merged,
            "perplexity_increase": increase,
            "greedy_identical": sum(a == b for a, b in zip(reference["generations"], candidate["generations"])),
            "thresholds": {
                "max_ppl_increase": options.merge_max_ppl_increase,
                "max_logit_diff": options.merge_max_logit_diff,
            },
            "passed": not failures,
            "failure": "; ".join(failures) or None,
            "examples": [
                {
                    "prompt": text(e["input_ids"][: e["prompt_length"]].tolist()),
                    "reference_generation": text(a),
                    "merged_generation": text(b),
                    "merged_stopped_at_end_token": bool(b) and b[-1] == self.end_id,
                    "max_abs_logit_diff": d,
                }
                for e, a, b, d in pairs
            ],
        }

    def print(self, report: dict) -> None:
        print("\n== merge fidelity: export vs. the model as trained ==")
        rows = [
            ("reference", report["reference"]),
            ("export", f"merged into the {report['base_mode']} base, {report['dtype']}"),
            ("examples", f"{report['prompts']} ({report['answer_tokens']} answer tokens)"),
            ("logit diff", f"max {report['max_abs_logit_diff']:.3g}, mean {report['mean_abs_logit_diff']:.3g}"),
            (
                "perplexity",
                f"{report['perplexity_reference']:.4f} trained → {report['perplexity_merged']:.4f} export "
                f"({report['perplexity_increase']:+.3%})",
            ),
            ("greedy", f"{report['greedy_identical']} of {report['prompts']} generations identical"),
            *_task_rows(report.get("task_metrics")),
            ("verdict", "passed" if report["passed"] else f"FAILED: {report['failure']}"),
        ]
        for key, value in rows:
            print(f"{key:<11} {value}")
        for index, example in enumerate(report["examples"][:3]):
            print(f"\n-- example {index}: {clip(example['prompt'], 100)!r}")
            print(f"   trained: {clip(example['reference_generation'], 100)!r}")
            print(f"   export:  {clip(example['merged_generation'], 100)!r}")


def _task_rows(fidelity: dict | None) -> list[tuple[str, str]]:
    if not fidelity:
        return []
    rows = [
        (name, f"{fidelity['reference'][name]:.2f} trained → {fidelity['export'][name]:.2f} export")
        for name in fidelity["changes"]
    ]
    if fidelity["compared"]:
        rows.append(("answers", f"{fidelity['identical_predictions']} of {fidelity['compared']} identical"))
    return rows


def fidelity_examples(prepared, count: int):
    """The first `count` held-out examples as tensors (training rows if nothing is held out)."""
    import torch

    split, origin = (prepared.eval, "held-out") if prepared.eval is not None else (prepared.train, "training")
    rows = split.dataset.select(range(min(count, len(split.dataset))))
    examples = []
    for row in rows:
        ids = torch.tensor(row["input_ids"])
        mask = torch.tensor(row["completion_mask"], dtype=torch.bool)
        prompt_length = int(mask.float().argmax()) if mask.any() else len(ids)
        examples.append({"input_ids": ids, "completion_mask": mask, "prompt_length": prompt_length})
    return examples, origin


def logit_pass(model, examples, end_id: int, tokenizer, max_new_tokens: int, label: str) -> dict:
    """Per example: float32 logits over prompt + reference answer, answer NLL, and the greedy continuation."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    greedy = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=end_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    logits, nll, generations = [], [], []
    with torch.no_grad():
        for example in tqdm(examples, desc=f"  {label}", leave=False):
            ids = example["input_ids"].to(device)
            out = model(input_ids=ids[None], use_cache=False).logits[0].float().cpu()
            logits.append(out)
            targets = example["completion_mask"][1:]
            nll.append(
                torch.nn.functional.cross_entropy(out[:-1][targets], example["input_ids"][1:][targets], reduction="sum")
            )
            prompt = ids[: example["prompt_length"]][None]
            generated = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy
            )[0, prompt.shape[1] :].cpu()
            generations.append(generated.tolist())
    return {"logits": logits, "nll": nll, "generations": generations}
