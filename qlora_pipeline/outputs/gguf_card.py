"""The model card of a GGUF folder: which file is which, how faithful each is (the llama.cpp check), how to run
them; rendered from gguf_card_template.md with huggingface_hub's `ModelCard.from_template`."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from qlora_pipeline.outputs.card import base_license, base_reference, training_method
from qlora_pipeline.outputs.names import display_name, is_hub_id, scrub

TEMPLATE = Path(__file__).with_name("gguf_card_template.md")


def build_gguf_card(recipe, report: dict, name: str, prompt_example: str, has_modelfile: bool = True) -> ModelCard:
    """The card for the files in `report` (export_gguf's fidelity report); `prompt_example`: one prompt as training
    rendered it."""
    from qlora_pipeline import __version__

    model_name = recipe.model.model_name_or_path
    files = list(report["files"].items())
    data = ModelCardData(
        base_model=model_name if is_hub_id(model_name) else None,
        library_name="gguf",
        pipeline_tag="text-generation",
        tags=["qlora-pipeline", "gguf", "llama.cpp", "ollama"],
        license=recipe.export.hub_license or base_license(recipe),
    )
    card = ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        title=f"{name} (GGUF)",
        base=display_name(model_name),
        base_reference=base_reference(recipe),
        method=training_method(recipe),
        template_name=recipe.data.template,
        dataset=" + ".join(display_name(path) for path in recipe.data.dataset_paths),
        version=__version__,
        gguf_version=_version("gguf"),
        llama_cpp_version=_version("llama-cpp-python"),
        prompts=files[0][1]["prompts"],
        files=[_row(kind, result) for kind, result in files],
        notes=report["notes"],
        end_token=report["end_token"],
        first_file=files[0][1]["file"],
        ollama_name=name.lower(),
        has_modelfile=has_modelfile,
        prompt_example=prompt_example,
    )
    return ModelCard(scrub(str(card).rstrip("\n") + "\n"))


def _row(kind: str, result: dict) -> dict:
    return {
        "file": result["file"],
        "kind": kind,
        "size": f"{result['size_bytes'] / 2**20:,.1f} MiB",
        "tokenization": f"{result['tokenization_identical']} of {result['prompts']}",
        "top1": f"{result['top1_agreement']:.2%}",
        "ppl": f"{result['perplexity_increase']:+.3%}",
        "greedy": f"{result['greedy_identical']} of {result['prompts']}",
    }


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
