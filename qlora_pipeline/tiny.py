"""The embedded default: tiny random-weight models and sample data that need no download.

`embedded:tiny-starling` is a Mistral-architecture model (Starling-LM-7B-alpha's layer types, scaled down) with
Starling's real tokenizer: the Mistral-7B SentencePiece model that the PyPI package `mistral-common` ships, plus
Starling's two added tokens and chat template. Weights are random but deterministic (fixed seed); a README.md
card gives the license (Apache-2.0, as Starling's and the Mistral tokenizer's). A model is built once, in seconds,
into the cache folder and reused; concurrent processes (e.g. under `accelerate launch`) wait on a file lock so
only one builds it.

Like Starling's own files, the tiny tokenizer sets pad = eos = `<|end_of_turn|>`, so the pipeline's pad-token fix
is exercised by the demo just as it is on the real model.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.templates import STARLING_CHAT_TEMPLATE, STARLING_END_OF_TURN

EMBEDDED_PREFIX = "embedded:"
STARLING_PAD = "<|pad_0|>"
# Bump when a builder changes, so caches built by older code are not reused.
BUILD_VERSION = "3"
# Wider than the usual 0.02: a random head that small caps every logit near 2.5 behind the frozen final norm, so a
# LoRA adapter could barely lower the loss. At 0.1 the head has the range of a trained one and the demo visibly
# learns (measured: eval loss 11.0 -> 8.5 in 30 steps, against 10.4 -> 9.8 at 0.02).
INIT_RANGE = 0.1

SAMPLES = {
    "medtuned-sample": "medtuned_sample.jsonl",  # instruction / input / output (Llama2-MedTuned-Instructions)
    "symptoms-sample": "symptoms_sample.jsonl",  # instruction / output (prognosis/symptoms_disease_v1)
    "squad-sample": "squad_sample.json",  # SQuAD v2 JSON, answerable and unanswerable questions
    "student-questions-sample": "student_questions_sample.csv",  # text / label (Biology, Chemistry, Maths, Physics)
    "context-qa-sample": "context_qa_sample.csv",  # context / question / answer
}


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_PIPELINE_CACHE", Path.home() / ".cache" / "qlora_pipeline"))


def is_embedded(name: str | None) -> bool:
    return bool(name) and name.startswith(EMBEDDED_PREFIX)


def resolve_sample(name: str) -> str:
    """'embedded:medtuned-sample' → the path of the sample file shipped in the package."""
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in SAMPLES:
        raise PipelineError(
            f"unknown embedded dataset {name!r}; available: {', '.join(EMBEDDED_PREFIX + k for k in SAMPLES)}"
        )
    return str(resources.files("qlora_pipeline.samples").joinpath(SAMPLES[key]))


def resolve_model(name: str) -> str:
    """'embedded:tiny-starling' → a local folder holding the built model and tokenizer (built on first use)."""
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in BUILDERS:
        raise PipelineError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_PREFIX + k for k in BUILDERS)}"
        )
    target = cache_root() / f"{key}-v{BUILD_VERSION}"
    if key in TRAINED_ON_SAMPLES:  # their tokenizers are learnt from the samples: new samples, new build
        target = target.with_name(f"{target.name}-{samples_fingerprint()}")
    if (target / "config.json").is_file():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            # Build beside the target and rename, so a half-built folder is never taken for a model.
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
            try:
                BUILDERS[key](staging)
                if not (staging / "config.json").is_file():
                    raise PipelineError(f"building {name} wrote no config.json in {staging}")
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def samples_fingerprint() -> str:
    """A short hash of the shipped sample files, which the trained tokenizers (BERT's, T5's) are learnt from."""
    import hashlib

    digest = hashlib.sha256()
    folder = resources.files("qlora_pipeline.samples")
    for name in sorted(SAMPLES.values()):
        digest.update(name.encode() + b"\x00" + folder.joinpath(name).read_bytes())
    return digest.hexdigest()[:10]


def _mistral_sentencepiece_model() -> Path:
    try:
        import mistral_common
    except ImportError:
        raise PipelineError(
            "the embedded Starling tokenizer needs the package mistral-common (pip install mistral-common)"
        ) from None
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise PipelineError(f"mistral-common no longer ships {path.name}; cannot build the embedded Starling tokenizer")
    return path


def build_starling_tokenizer(folder: Path):
    """Starling-LM-7B-alpha's tokenizer: Mistral-7B's SentencePiece vocabulary + `<|end_of_turn|>` (32000) and
    `<|pad_0|>` (32001), BOS added, chat template as Starling ships it."""
    from transformers import AutoTokenizer

    source = Path(tempfile.mkdtemp(prefix="starling-tokenizer-"))
    try:
        shutil.copy(_mistral_sentencepiece_model(), source / "tokenizer.model")
        special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": True,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "added_tokens_decoder": {
                "0": {"content": "<unk>", **special},
                "1": {"content": "<s>", **special},
                "2": {"content": "</s>", **special},
                "32000": {"content": STARLING_END_OF_TURN, **special},
                "32001": {"content": STARLING_PAD, **special},
            },
            "additional_special_tokens": [STARLING_END_OF_TURN, STARLING_PAD],
            "bos_token": "<s>",
            "eos_token": STARLING_END_OF_TURN,
            "pad_token": STARLING_END_OF_TURN,  # as Starling ships it: the pipeline replaces it with <|pad_0|>
            "unk_token": "<unk>",
            "chat_template": STARLING_CHAT_TEMPLATE,
            "model_max_length": 8192,
        }
        (source / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        tokenizer.save_pretrained(str(folder))
        return tokenizer
    finally:
        shutil.rmtree(source, ignore_errors=True)


# Starling-LM-7B-alpha's architecture (Mistral) at three sizes, all with its real tokenizer (vocabulary 32,002).
# tiny-starling is the demo and test model; the other two are the shapes the throughput benchmark measures.
STARLING_SHAPES = {
    "tiny-starling": {"hidden": 128, "ffn": 256, "layers": 2, "heads": 4, "kv_heads": 2},  # 8.4 M parameters
    "starling-small": {"hidden": 256, "ffn": 512, "layers": 4, "heads": 8, "kv_heads": 4},  # 18.7 M
    "starling-base": {"hidden": 768, "ffn": 2048, "layers": 8, "heads": 12, "kv_heads": 4},  # 99.5 M
}


def _build_starling_shaped(folder: Path, shape: dict, name: str) -> None:
    import torch
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    tokenizer = build_starling_tokenizer(folder)
    eot = tokenizer.convert_tokens_to_ids(STARLING_END_OF_TURN)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"],
        max_position_embeddings=4096,
        sliding_window=4096,
        rms_norm_eps=1e-5,
        initializer_range=INIT_RANGE,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eot,
        pad_token_id=None,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a seconds-long one-off build needs no progress bar
    try:
        torch.manual_seed(0)
        model = MistralForCausalLM(config)
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eot)
        save_random_model(model, folder)
    finally:
        hf_logging.enable_progress_bar()
    write_starling_shaped_card(folder, config, name)


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


def write_starling_shaped_card(folder: Path, config, name: str) -> None:
    body = f"""A small random-weight model built by qlora-pipeline for its offline demo, tests and benchmarks
(`embedded:{name}`). It has the architecture of Starling-LM-7B-alpha (Mistral), scaled down to
{config.num_hidden_layers} layers of width {config.hidden_size}, and Starling-LM-7B-alpha's real tokenizer: the
Mistral-7B SentencePiece vocabulary shipped by the `mistral-common` package, plus `{STARLING_END_OF_TURN}` and
`{STARLING_PAD}` and Starling's chat template. The weights are random (seed 0): it writes nonsense until trained,
and even then it only shows that the pipeline works.

License: Apache-2.0, as Starling-LM-7B-alpha and the Mistral-7B tokenizer.
"""
    write_card(folder, name, body, license="apache-2.0", pipeline_tag="text-generation", tags=["mistral"])


# Embedded models whose tokenizer the project trains on its sample files (no real one ships offline).
TRAINED_ON_SAMPLES = ("tiny-bert", "tiny-t5")


def _lazy(target: str):
    """A builder in another module ("module:function"), imported only when that model is built."""

    def build(folder: Path) -> None:
        import importlib

        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(folder)

    return build


BUILDERS = {
    **{
        name: functools.partial(_build_starling_shaped, shape=shape, name=name)
        for name, shape in STARLING_SHAPES.items()
    },
    # The small-model tasks' architectures, scaled down (qlora_pipeline/tiny_builders/).
    "tiny-distilgpt2": _lazy("qlora_pipeline.tiny_builders.gpt2:build_tiny_distilgpt2"),
    "tiny-gpt-neo": _lazy("qlora_pipeline.tiny_builders.gpt2:build_tiny_gpt_neo"),
    "tiny-bert": _lazy("qlora_pipeline.tiny_builders.bert:build_tiny_bert"),
    "tiny-t5": _lazy("qlora_pipeline.tiny_builders.t5:build_tiny_t5"),
}
