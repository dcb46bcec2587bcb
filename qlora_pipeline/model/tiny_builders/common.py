"""What every tiny-model builder writes the same way: the random weights (safetensors) and a model card with the
license."""

from __future__ import annotations

from pathlib import Path


def save_random_model(model, folder: Path) -> None:
    """config.json, generation_config.json (where the model has one) and model.safetensors.

    Not save_pretrained: under `accelerate launch` it writes only on global rank 0, and whichever rank holds the
    build lock must write (the cache may be per node). A tied weight is written once, under its first name (the
    input embedding's, e.g. `transformer.wte.weight`), as transformers does: a model of another head class built
    from this checkpoint (sequence classification from a causal LM) then finds its embeddings."""
    from safetensors.torch import save_file

    model.config.save_pretrained(str(folder))
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(str(folder))
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        weights[name] = tensor.contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_card(folder: Path, name: str, body: str, *, license: str, pipeline_tag: str, tags: list[str]) -> None:
    """README.md for an embedded model, with the license in its front matter, where a model card's license is
    looked up."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=[*tags, "random-weights", "tiny", "qlora-pipeline"],
    )
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {name}\n\n{body.strip()}\n").save(folder / "README.md")
