"""Export GGUF: a merged export → GGUF files for llama.cpp, Ollama and LM Studio, each checked by llama.cpp itself.

Steps (`qlora-pipeline export-gguf RUN_OR_EXPORT --quant f16,q8_0`; the command merges first when a run has no
merged export yet):
  1. Read the run's recipe and the export's config and tokenizer; refuse an unknown type, an architecture
     llama.cpp is not given here, a missing tokenizer file or an existing output folder before anything loads.
  2. Held-out rows rendered and tokenized exactly as the trainer did (the merge's fidelity prompts), and the
     training template's text around each message (for the Modelfile).
  3. Reference pass: the merged export in plain transformers (float32 on a CPU): logits, answer perplexity and
     greedy generations.
  4. Write into a hidden folder: the file of the export's own precision with the `gguf` library, other 16/32-bit
     types the same way, quantized types with llama.cpp's quantizer from that file.
  5. Check every file in llama.cpp (local_runtimes/check.py) against the reference; any file over its gate fails
     the export, and nothing is left behind (the figures go to GGUF.fidelity-failed.json beside the target).
  6. The Ollama Modelfile, fidelity.json and the model card; then the rename that makes the folder visible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.gguf_types import DIRECT, SOURCE_FOR_DTYPE, is_quantized, parse_quant_types
from qlora_pipeline.model.adapters import saved_merge_output_dir
from qlora_pipeline.outputs.staging import staged_folder
from qlora_pipeline.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class ExportRequest:
    """What to write, from which export, where: all checked before anything loads."""

    export_dir: Path
    recipe: Recipe
    types: list[str]
    out_dir: Path

    @property
    def name(self) -> str:
        """The run's name, which the files carry: RUN-f16.gguf."""
        return Path(self.recipe.training.output_dir).name


def locate_export(path: str | os.PathLike) -> tuple[Path, Path]:
    """(export folder, recipe.yaml) of a run folder (its merged/ export, or the recipe's merge_output_dir) or of a
    merged export inside a run folder. The recipe is needed: the check uses the held-out rows as training rendered
    them."""
    given = Path(path)
    if not given.exists():
        raise PipelineError(f"{given}: no such run or export folder")
    if (given / "recipe.yaml").is_file():  # where the merge puts (or will put) its export
        return saved_merge_output_dir(given) or given / "merged", given / "recipe.yaml"
    if (given / "config.json").is_file():
        if not (given.parent / "recipe.yaml").is_file():
            raise PipelineError(
                f"{given}: no recipe.yaml in the folder above the export; export-gguf needs the run folder the "
                f"export was merged from (its held-out rows and template)"
            )
        return given, given.parent / "recipe.yaml"
    raise PipelineError(f"{given}: neither a run folder (with recipe.yaml) nor a merged export (with config.json)")


def check_request(
    export_dir: Path,
    recipe_path: Path,
    quant: str | list[str] | None,
    out: str | None,
    overwrite: bool,
    overrides: list[str] | None = None,
) -> ExportRequest:
    """The packages, the recipe, the types and the output folder; the export itself is read later (it may not be
    merged yet)."""
    from qlora_pipeline.local_runtimes.requirements import require_gguf_packages

    require_gguf_packages()
    recipe = load_recipe(recipe_path, overrides)
    if recipe.task.task != "causal_lm":
        raise PipelineError(f"export-gguf writes causal language models; this run's task is '{recipe.task.task}'")
    types = parse_quant_types(quant or recipe.export.gguf_quant_types or ["f16"])
    out_dir = Path(out or recipe.export.gguf_output_dir or export_dir.parent / "gguf")
    if out_dir.exists() and not overwrite:
        raise PipelineError(f"{out_dir}: the GGUF folder already exists; pass --overwrite to replace it")
    return ExportRequest(export_dir, recipe, types, out_dir)


def export_gguf(request: ExportRequest) -> dict:
    """Write and check the GGUF files; returns the fidelity report."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_pipeline.local_runtimes import check, convert, modelfile, quantize
    from qlora_pipeline.tasks import prepare_data
    from qlora_pipeline.tasks.fidelity import logit_pass

    # 1. The export's config and tokenizer, checked before anything loads (the request was checked already).
    recipe, types, out_dir, name = request.recipe, request.types, request.out_dir, request.name
    facts = convert.read_export(request.export_dir)
    source_type = SOURCE_FOR_DTYPE.get(facts.dtype, "f32")

    # 2. Held-out rows as training rendered and tokenized them; the template's text around each message.
    prepared = prepare_data(recipe)
    tokenizer, template = prepared.tokenizer, prepared.template
    examples = check_examples(prepared, recipe)
    end_token = template.end_token_for(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end_token)

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return template.render(tokenizer, messages, generation_prompt)

    bos_text = modelfile.leading_bos(render, tokenizer.bos_token)
    notes: list[str] = []
    try:
        pieces = modelfile.turn_text(render, bos_text, template.name)
        modelfile.go_template(pieces)  # text a Go template cannot hold is found here, not after the files are written
    except PipelineError as exc:  # the GGUF files do not need it: written without a Modelfile, and said so
        pieces = None
        notes.append(f"no Modelfile: {exc}")
    tokens = convert.TokenizerFacts(
        bos_id=tokenizer.bos_token_id,
        eos_id=end_id,
        unk_id=tokenizer.unk_token_id,
        pad_id=tokenizer.pad_token_id,
        add_bos=bool(bos_text),
        chat_template=template.chat_template_for(tokenizer),
    )

    # 3. Reference pass: the merged export, as plain transformers loads it.
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if device == "cpu" else getattr(torch, facts.dtype)
    print(f"[1/4] reference: the merged export {request.export_dir} in transformers, {len(examples)} held-out examples")
    model = AutoModelForCausalLM.from_pretrained(request.export_dir, dtype=dtype, device_map={"": device}).eval()
    max_new_tokens = recipe.export.merge_fidelity_max_new_tokens
    reference = logit_pass(model, [e.as_tensors() for e in examples], end_id, tokenizer, max_new_tokens, "export")
    del model

    with staged_folder(out_dir, "export-gguf") as staging:
        # 4. Write: the export's own precision first (the quantizer's source), then every other type asked for.
        print(f"[2/4] write: {', '.join(types)} into {out_dir}")
        files = {kind: staging / f"{name}-{kind}.gguf" for kind in dict.fromkeys([source_type, *types])}
        for kind in files:
            if kind in DIRECT:
                convert.write_gguf(facts, tokens, files[kind], kind, name)
        for kind in types:
            if is_quantized(kind):
                notes += quantize.quantize(files[source_type], files[kind], kind)
        if source_type not in types:
            files.pop(source_type).unlink()

        # 5. Each file in llama.cpp against the reference.
        print(f"[3/4] check: each file in llama.cpp against the export ({len(examples)} prompts)")
        results = {}
        for kind, file in files.items():
            figures = check.llama_cpp_pass(file, examples, bos_text, end_id, max_new_tokens)
            results[kind] = {
                "file": file.name,
                "size_bytes": file.stat().st_size,
                **check.compare(reference, figures, examples, gates_for(recipe, kind)),
            }
        report = {
            "export": request.export_dir.name,
            "export_dtype": facts.dtype,
            "end_token": end_token,
            "files": results,
            "notes": notes,
        }
        print_report(report)
        failed = [kind for kind, result in results.items() if not result["passed"]]
        if failed:
            failed_report = out_dir.parent / f"{out_dir.name}.fidelity-failed.json"
            failed_report.write_text(json.dumps(report, indent=2))
            raise PipelineError(
                f"export-gguf: {', '.join(failed)} failed the llama.cpp check ({results[failed[0]]['failure']}); "
                f"nothing exported, report in {failed_report}"
            )

        # 6. Modelfile, report and card, then the rename that makes the folder visible.
        print("[4/4] Modelfile, fidelity.json, README.md")
        if pieces is not None:
            (staging / "Modelfile").write_text(modelfile.modelfile_text(files[types[0]].name, pieces, end_token))
        (staging / "fidelity.json").write_text(json.dumps(report, indent=2))
        from qlora_pipeline.outputs.gguf_card import build_gguf_card

        card = build_gguf_card(recipe, report, name, examples[0].prompt_text, has_modelfile=pieces is not None)
        card.save(staging / "README.md")
    print(f"\nexported: {out_dir}")
    report["gguf_dir"] = str(out_dir)
    return report


def check_examples(prepared, recipe: Recipe):
    """The first merge_fidelity_prompts held-out rows, rendered with the training template and tokenized as the
    trainer tokenizes them (data/tokenize.py: the rendered text, no special tokens added)."""
    from qlora_pipeline.data.rows import columns_of
    from qlora_pipeline.local_runtimes.check import CheckExample

    rows = prepared.eval_rows
    if rows is None or len(rows) == 0:
        raise PipelineError(
            f"export-gguf: {recipe.data.data_label} holds out no rows, so the files cannot be checked; set "
            f"eval_split_size"
        )
    instruction, input_column, output = columns_of(recipe.data)
    tokenizer, template = prepared.tokenizer, prepared.template
    examples = []
    for row in rows.select(range(min(recipe.export.merge_fidelity_prompts, len(rows)))):
        prompt, completion = template.prompt_and_completion(
            tokenizer, row[instruction], row[input_column] if input_column else None, row[output]
        )
        ids = tokenizer([prompt, prompt + completion], add_special_tokens=False)["input_ids"]
        examples.append(CheckExample(prompt, prompt + completion, ids[0], ids[1]))
    return examples


def gates_for(recipe: Recipe, kind: str) -> dict:
    options = recipe.export
    if is_quantized(kind):
        return {
            "max_ppl_increase": options.gguf_quantized_max_ppl_increase,
            "min_top1_agreement": options.gguf_quantized_min_top1_agreement,
        }
    return {"max_ppl_increase": options.gguf_max_ppl_increase, "min_top1_agreement": options.gguf_min_top1_agreement}


def print_report(report: dict) -> None:
    print("\n== GGUF check: each file in llama.cpp vs. the merged export in transformers ==")
    header = f"{'file':<34} {'MiB':>7} {'tokens':>7} {'max diff':>9} {'top-1':>7} {'ppl':>9} {'greedy':>7}  verdict"
    print(header)
    for result in report["files"].values():
        print(
            f"{result['file']:<34} {result['size_bytes'] / 2**20:>7.1f} "
            f"{result['tokenization_identical']:>3}/{result['prompts']:<3} {result['max_abs_logit_diff']:>9.3g} "
            f"{result['top1_agreement']:>7.2%} {result['perplexity_increase']:>+9.3%} "
            f"{result['greedy_identical']:>3}/{result['prompts']:<3}  "
            f"{'passed' if result['passed'] else 'FAILED: ' + result['failure']}"
        )
    for note in report["notes"]:
        print(f"note: {note}")
