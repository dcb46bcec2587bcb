"""Merge: a trained LoRA adapter → a standalone model that plain `transformers` loads, checked against training.

Steps (`qlora-pipeline merge RUN_DIR`):
  1. Read the run's recipe; refuse an impossible request before loading anything.
  2. Reference pass: the model as trained (4-bit base + adapter) on held-out examples: logits, perplexity of the
     reference answers, greedy generations.
  3. Merge into unquantized weights, never into 4-bit ones (rounding the merged weights back to NF4 would lose
     most of what the adapter learned). `nf4-roundtrip` merges into the NF4-dequantized base the adapter was
     trained against, so the export computes what training saw; `original` merges into the 16-bit weights.
  4. Save to a hidden temporary folder: sharded safetensors, the tokenizer with the training chat template,
     a generation config that stops at the template's end token.
  5. Reload the saved export and repeat the pass; compare. Drift over the recipe's thresholds fails the merge.
  6. Write fidelity.json and the model card, then rename the folder into place: an interrupted merge never leaves
     a folder that looks complete.

Memory: the reference model and the merged model are never loaded together; the peak is one copy of the base in
the merge dtype plus the LoRA weights (printed before loading).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from qlora_pipeline import modeling
from qlora_pipeline.config import Recipe, load_recipe
from qlora_pipeline.errors import PipelineError

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
BYTES_PER_PARAM = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass
class MergeSource:
    adapter_dir: Path
    run_dir: Path | None  # the run folder, when the adapter sits in one (recipe.yaml, summary.json)
    recipe_path: Path


def locate(path: str | os.PathLike) -> MergeSource:
    """A run folder (holding adapter/) or an adapter folder; the recipe is recipe.yaml beside the adapter."""
    given = Path(path)
    if not given.exists():
        raise PipelineError(f"{given}: no such run or adapter folder")
    if (given / "adapter" / "adapter_config.json").is_file():
        adapter_dir, run_dir = given / "adapter", given
    elif (given / "adapter_config.json").is_file():
        adapter_dir = given
        run_dir = given.parent if (given.parent / "recipe.yaml").is_file() else None
    else:
        raise PipelineError(
            f"{given}: neither a run folder (with adapter/) nor an adapter folder (with adapter_config.json)"
        )
    for candidate in (adapter_dir / "recipe.yaml", run_dir / "recipe.yaml" if run_dir else None):
        if candidate is not None and candidate.is_file():
            return MergeSource(adapter_dir, run_dir, candidate)
    raise PipelineError(f"{adapter_dir}: no recipe.yaml beside the adapter; pass the run folder that training wrote")


def base_config(recipe: Recipe):
    """The base model's config (no weights), or None if it cannot be read here."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            modeling.resolve_model_path(recipe.model.model_name_or_path),
            revision=recipe.model.model_revision,
            trust_remote_code=recipe.training.trust_remote_code,
        )
    except Exception:  # noqa: BLE001 -- only the defaults and the memory estimate need it
        return None


def merge_dtype_name(recipe: Recipe, config) -> str:
    """fp16 / bf16 / fp32: the recipe's choice, or for 'auto' the dtype the base model was published in."""
    choice = recipe.export.merge_dtype
    if choice != "auto":
        return choice
    published = str(getattr(config, "dtype", None) or "").replace("torch.", "")
    return {v: k for k, v in DTYPES.items()}.get(published, "fp16")


def merge(
    path: str | os.PathLike, overrides: list[str] | None = None, out: str | None = None, overwrite: bool = False
) -> dict:
    """Merge the adapter of a run into its base model and export it. Returns the fidelity report."""
    import torch

    # 1. What to merge, where to, and whether it can work, before anything loads.
    source = locate(path)
    recipe = load_recipe(source.recipe_path, overrides)
    check_adapter_base(source.adapter_dir, recipe)
    options = recipe.export
    quantized = bool(recipe.model.load_in_4bit or recipe.model.load_in_8bit)
    base_mode = options.merge_base_mode
    if base_mode == "nf4-roundtrip" and not quantized:
        if "--merge_base_mode" in (overrides or []):
            raise PipelineError(
                "merge: --base-mode nf4-roundtrip needs an adapter trained on a 4-bit base; this one was trained "
                "on unquantized weights, so merge with --base-mode original"
            )
        base_mode = "original"  # nothing was quantized: the original weights are what training saw
    if base_mode == "nf4-roundtrip" and recipe.model.load_in_8bit:
        raise PipelineError("merge: nf4-roundtrip is for 4-bit adapters; this adapter was trained on 8-bit weights")
    export_dir = Path(out or options.merge_output_dir or (source.run_dir or source.adapter_dir.parent) / "merged")
    if export_dir.exists() and not overwrite:
        raise PipelineError(f"{export_dir}: the export folder already exists; pass --overwrite to replace it")
    config = base_config(recipe)
    dtype_name = merge_dtype_name(recipe, config)
    dtype = getattr(torch, DTYPES[dtype_name])
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if recipe.task.task != "causal_lm":
        return merge_task_model(source, recipe, export_dir, base_mode, dtype_name, config, quantized)

    # 2. Held-out examples, tokenized exactly as the trainer tokenized them.
    from qlora_pipeline.train import prepare_data

    prepared = prepare_data(recipe)
    tokenizer, template = prepared.tokenizer, prepared.template
    examples, examples_from = _fidelity_examples(prepared, options.merge_fidelity_prompts)
    end_id = tokenizer.convert_tokens_to_ids(template.end_token_for(tokenizer))
    _print_memory_plan(config, dtype_name, quantized)

    # 3. Reference pass: the model as trained.
    print(
        f"[1/4] reference: {'4-bit base' if quantized else 'base'} + adapter, {len(examples)} {examples_from} examples"
    )
    reference_model = load_trained_model(recipe, source.adapter_dir, tokenizer, device)
    reference = _measure(
        reference_model, examples, end_id, tokenizer, options.merge_fidelity_max_new_tokens, "reference"
    )
    task_reference = _task_metric(recipe, reference_model, prepared)
    del reference_model
    _free_memory()

    # 4. Merge and save into a temporary folder beside the target.
    with staged_export(export_dir) as staging:
        print(f"[2/4] merge: adapter into the {base_mode} base weights in {dtype_name}")
        merged = _merged_model(recipe, source.adapter_dir, prepared, base_mode, dtype, device)
        merged.config.use_cache = True  # training turned the KV cache off; inference wants it
        merged.config.pad_token_id = tokenizer.pad_token_id
        generation = merged.generation_config
        generation.eos_token_id = end_id
        generation.pad_token_id = tokenizer.pad_token_id
        generation.bos_token_id = tokenizer.bos_token_id
        print(f"[3/4] save: {export_dir} (safetensors shards of at most {options.merge_max_shard_size})")
        merged.save_pretrained(staging, max_shard_size=options.merge_max_shard_size)
        tokenizer.chat_template = template.chat_template_for(tokenizer)
        tokenizer.save_pretrained(staging)
        del merged
        _free_memory()

        # 5. The saved export, reloaded as a user would, against the reference.
        print("[4/4] check: the saved export, reloaded, against the reference")
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(staging, dtype=dtype, device_map={"": device})
        candidate = _measure(exported, examples, end_id, tokenizer, options.merge_fidelity_max_new_tokens, "export")
        task_candidate = _task_metric(recipe, exported, prepared)
        del exported
        _free_memory()
        report = _fidelity_report(reference, candidate, examples, tokenizer, end_id, recipe, base_mode, dtype_name)
        report["examples_from"] = examples_from
        if task_reference is not None:
            report["task_metrics"] = _task_fidelity(recipe, task_reference, task_candidate)
            if not report["task_metrics"]["passed"]:
                failure = report["task_metrics"]["failure"]
                report["failure"] = "; ".join(filter(None, [report["failure"], failure]))
                report["passed"] = False
        print_report(report)
        if not report["passed"]:
            failed_report = export_dir.parent / f"{export_dir.name}.fidelity-failed.json"
            failed_report.write_text(json.dumps(report, indent=2))
            raise PipelineError(
                f"merge: fidelity check failed ({report['failure']}); nothing exported, report in {failed_report}"
            )

        # 6. Report and card, then the rename that makes the export visible.
        (staging / "fidelity.json").write_text(json.dumps(report, indent=2))
        from qlora_pipeline.card import build_card

        summary = _read_summary(source)
        repo_id = recipe.training.hub_model_id
        build_card("merged", recipe, summary, report, repo_id=repo_id).save(staging / "README.md")
    print(f"\nexported: {export_dir}")
    report["export_dir"] = str(export_dir)
    from qlora_pipeline import tracking

    where = tracking.log_fidelity(recipe, source.run_dir, report)
    if where:
        print(f"W&B: fidelity figures logged to the training's run ({tracking.describe(where)})")
    return report


@contextlib.contextmanager
def staged_export(export_dir: Path):
    """A hidden folder beside `export_dir` to write the export into. When the block ends without an error it is
    renamed into place (`_install`); otherwise it is removed, so an interrupted or failed merge never leaves a folder
    that looks complete. A full disk, a quota or a read-only folder ends it in one line."""
    staging = export_dir.parent / f".{export_dir.name}.partial-{os.getpid()}"
    try:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        yield staging
        _install(staging, export_dir)
    except (OSError, SafetensorError) as exc:
        raise PipelineError(
            f"merge: could not write the export {export_dir}: {describe_os_error(exc)}; nothing was exported"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once installed


def _install(staging: Path, export_dir: Path) -> None:
    """Rename the finished staging folder into place (an existing export is replaced only after that)."""
    if export_dir.exists():
        retired = export_dir.parent / f".{export_dir.name}.replaced-{os.getpid()}"
        export_dir.rename(retired)
        staging.rename(export_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(export_dir)


# Where a task's export is loaded by plain transformers (the merged model's Auto class).
TASK_AUTO_CLASSES = {
    "extractive_qa": "AutoModelForQuestionAnswering",
    "classification": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
}


def merge_task_model(
    source: MergeSource, recipe: Recipe, export_dir: Path, base_mode: str, dtype_name: str, config, quantized: bool
) -> dict:
    """Merge a QA, classification or seq2seq adapter. Fidelity is the task's own metric on the held-out rows: the
    model as trained against the saved export reloaded with plain transformers, headline metrics side by side;
    the merge fails, exporting nothing, if a headline metric moves by more than merge_max_metric_change points."""
    import dataclasses

    import torch
    import transformers
    from transformers import set_seed

    from qlora_pipeline import evaluate as evaluation
    from qlora_pipeline.tasks import get_task
    from qlora_pipeline.train import prepare_data

    task = get_task(recipe.task.task)
    options = recipe.export
    dtype = getattr(torch, DTYPES[dtype_name])
    prepared = prepare_data(recipe)
    if prepared.eval_rows is None:
        raise PipelineError(
            f"merge: {recipe.source} holds out no rows, so the export cannot be checked; set eval_split_size"
        )
    _print_memory_plan(config, dtype_name, quantized)

    def trained_base(model_args):
        set_seed(recipe.training.seed)
        model, _ = task.load_model(dataclasses.replace(recipe, model=model_args), prepared)
        return model

    print(f"[1/4] reference: {'4-bit base' if quantized else 'base'} + adapter, the task metric on the held-out rows")
    reference_model = attach_adapter(trained_base(recipe.model), source.adapter_dir, recipe)
    reference = evaluation.measure(task, reference_model, prepared, recipe)
    del reference_model
    _free_memory()

    with staged_export(export_dir) as staging:
        print(f"[2/4] merge: adapter into the {base_mode} base weights in {dtype_name}")
        if base_mode == "nf4-roundtrip":  # the NF4-dequantized weights the adapter was trained against
            base = trained_base(recipe.model).dequantize(dtype=dtype)
        else:
            base = trained_base(dataclasses.replace(recipe.model, load_in_4bit=False, load_in_8bit=False))
        model = attach_adapter(base.to(dtype), source.adapter_dir, recipe)
        merged = model.merge_and_unload(safe_merge=True, progressbar=True).to(dtype).eval()
        print(f"[3/4] save: {export_dir} (safetensors shards of at most {options.merge_max_shard_size})")
        merged.save_pretrained(staging, max_shard_size=options.merge_max_shard_size)
        prepared.tokenizer.save_pretrained(staging)
        del merged, model, base
        _free_memory()

        print("[4/4] check: the saved export, reloaded with plain transformers, against the reference")
        auto_class = getattr(transformers, TASK_AUTO_CLASSES[task.name])
        exported = auto_class.from_pretrained(staging, dtype=dtype)
        candidate = evaluation.measure(task, exported, prepared, recipe)
        del exported
        _free_memory()
        headline = list(task.metric_names_for(recipe))
        limit = options.merge_max_metric_change
        changes, failure = metric_changes(headline, reference, candidate, limit)
        passed = failure is None
        report = {
            "task": task.name,
            "base_mode": base_mode,
            "dtype": dtype_name,
            "reference": f"{'4-bit' if quantized else 'unquantized'} base + adapter, as trained",
            "export_class": TASK_AUTO_CLASSES[task.name],
            "reference_metrics": reference,
            "export_metrics": candidate,
            "metric_changes": changes,
            "thresholds": {"max_metric_change": limit},
            "passed": passed,
            "failure": failure,
        }
        print("\n== merge fidelity: export vs. the model as trained (task metric, held-out rows) ==")
        for name in headline:
            before, after = reference.get(name), candidate.get(name)
            shown = [f"{v:.2f}" if isinstance(v, (int, float)) else "n/a" for v in (before, after)]
            print(f"{name:<14} {shown[0]:>8} trained → {shown[1]:>8} export")
        print(f"verdict        {'passed' if passed else 'FAILED: ' + report['failure']}")
        if not passed:
            failed_report = export_dir.parent / f"{export_dir.name}.fidelity-failed.json"
            failed_report.write_text(json.dumps(report, indent=2))
            raise PipelineError(
                f"merge: fidelity check failed ({report['failure']}); nothing exported, report in {failed_report}"
            )
        (staging / "fidelity.json").write_text(json.dumps(report, indent=2))
        from qlora_pipeline.card import build_card

        build_card("merged", recipe, _read_summary(source), None, repo_id=recipe.training.hub_model_id).save(
            staging / "README.md"
        )
    print(f"\nexported: {export_dir}")
    report["export_dir"] = str(export_dir)
    return report


def _task_metric(recipe: Recipe, model, prepared) -> dict | None:
    """The recipe's generation metric (symptoms, medtuned) on the held-out rows, per-row answers included; None
    where the recipe has none or nothing is held out."""
    from qlora_pipeline import evaluate as evaluation
    from qlora_pipeline.tasks import get_task

    task = get_task(recipe.task.task)
    if not task.metric_names_for(recipe) or prepared.eval_rows is None:
        return None
    return evaluation.measure(task, model, prepared, recipe)


def _task_fidelity(recipe: Recipe, reference: dict, candidate: dict) -> dict:
    """The export's task scores beside the trained model's: headline changes, answers identical row for row, and
    the verdict against merge_max_metric_change."""
    from qlora_pipeline import evaluate as evaluation
    from qlora_pipeline.tasks import get_task

    same, compared = evaluation.same_answers(reference.pop("rows", []), candidate.pop("rows", []))
    headline = get_task(recipe.task.task).metric_names_for(recipe)
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


def describe_os_error(exc: Exception) -> str:
    """'File too large (path)' from an OSError; safetensors' own I/O error (not an OSError) as it words it."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _fidelity_examples(prepared, count: int):
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


def _base_model(recipe: Recipe, tokenizer, quantization, dtype, device: str):
    model, _ = modeling.load_base_model(
        recipe.model, recipe.training, tokenizer, quantization=quantization, dtype=dtype, device_map={"": device}
    )
    return model


def load_trained_model(recipe: Recipe, adapter_dir: Path, tokenizer, device: str):
    """The model exactly as training ran it: the base quantized with the same settings, plus the adapter.

    `tokenizer` is the one training used (its length sizes the embeddings); also used by `infer`."""
    check_adapter_base(adapter_dir, recipe)
    quantization = modeling.quantization_config(recipe.model, recipe.training)
    base = _base_model(recipe, tokenizer, quantization, modeling.training_dtype(recipe.model), device)
    if quantization is not None:
        # Training ran with this: it keeps norms and embeddings in float32 beside the 4-bit layers.
        base = modeling.prepare_for_kbit_training(base, use_gradient_checkpointing=False)
    return attach_adapter(base, adapter_dir, recipe).eval()


def check_adapter_base(adapter_dir: Path, recipe: Recipe) -> None:
    """Refuse, before any weights load, an adapter whose adapter_config.json names another base than the recipe."""
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
        trained_on = config.get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return  # PEFT names what is wrong with the file when it reads it
    if not trained_on:
        return
    name = recipe.model.model_name_or_path
    resolved, expected = modeling.resolve_model_path(str(trained_on)), modeling.resolve_model_path(name)
    a, b = Path(resolved).expanduser(), Path(expected).expanduser()
    same = (
        resolved == expected
        or (a.exists() and b.exists() and a.resolve() == b.resolve())
        # a local model folder that moved (a rebuilt cache, another disk) keeps its name
        or (a.is_absolute() and b.is_absolute() and a.name == b.name)
    )
    if not same:
        raise PipelineError(
            f"{adapter_dir}: the adapter was trained on '{trained_on}' (adapter_config.json base_model_name_or_path)"
            f", not on '{name}' that {recipe.source} loads; set model_name_or_path to the base it was trained on"
        )


def attach_adapter(base, adapter_dir: Path, recipe: Recipe):
    """PeftModel.from_pretrained, with a size mismatch (an adapter trained on another base) as one line."""
    from peft import PeftModel

    try:
        with modeling.quiet_peft_deprecations():
            return PeftModel.from_pretrained(base, str(adapter_dir))
    except RuntimeError as exc:
        mismatch = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        if not mismatch:
            raise
        raise PipelineError(
            f"{adapter_dir}: the adapter does not fit the base model '{recipe.model.model_name_or_path}', so it was "
            f"trained on another one ({mismatch[0].rstrip('.')})"
        ) from None


def _merged_model(recipe: Recipe, adapter_dir: Path, prepared, base_mode: str, dtype, device: str):
    """The adapter merged into unquantized base weights, in `dtype`."""
    if base_mode == "nf4-roundtrip":
        # Quantize with the training settings and dtype, then dequantize: bit for bit the weights training saw.
        quantization = modeling.quantization_config(recipe.model, recipe.training)
        base = _base_model(recipe, prepared.tokenizer, quantization, modeling.training_dtype(recipe.model), device)
        base = base.dequantize(dtype=dtype)
    else:
        base = _base_model(recipe, prepared.tokenizer, None, dtype, device)
    base = base.to(dtype)
    model = attach_adapter(base, adapter_dir, recipe)
    merged = model.merge_and_unload(safe_merge=True, progressbar=True)  # safe_merge: refuses NaN/inf weights
    return merged.to(dtype).eval()


def _measure(model, examples, end_id: int, tokenizer, max_new_tokens: int, label: str) -> dict:
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


def _fidelity_report(reference, candidate, examples, tokenizer, end_id, recipe, base_mode, dtype_name) -> dict:
    import torch

    options = recipe.export
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

    quantization = "4-bit" if recipe.model.load_in_4bit else "8-bit" if recipe.model.load_in_8bit else "unquantized"
    return {
        "base_mode": base_mode,
        "dtype": dtype_name,
        "reference": f"{quantization} base + adapter, as trained",
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
                "merged_stopped_at_end_token": bool(b) and b[-1] == end_id,
                "max_abs_logit_diff": d,
            }
            for e, a, b, d in zip(examples, reference["generations"], candidate["generations"], per_example_max)
        ],
    }


def print_report(report: dict) -> None:
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
        print(f"\n-- example {index}: {_clip(example['prompt'], 100)!r}")
        print(f"   trained: {_clip(example['reference_generation'], 100)!r}")
        print(f"   export:  {_clip(example['merged_generation'], 100)!r}")


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


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_memory_plan(config, dtype_name: str, quantized: bool) -> None:
    """What the merge will hold at its peak, from the config alone (no weights are loaded)."""
    if config is None:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            parameters = AutoModelForCausalLM.from_config(config).num_parameters()
    except Exception:  # noqa: BLE001 -- an estimate only
        return
    merged_gib = parameters * BYTES_PER_PARAM[dtype_name] / 2**30
    reference = " (the 4-bit reference pass needs about a third of that, and runs first)" if quantized else ""
    print(
        f"memory: about {merged_gib:.2f} GiB at the peak: one copy of the {parameters / 1e6:,.1f} M-parameter base "
        f"in {dtype_name}; the reference model and the merged model are never loaded together{reference}"
    )


def _read_summary(source: MergeSource) -> dict | None:
    path = source.run_dir / "summary.json" if source.run_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
