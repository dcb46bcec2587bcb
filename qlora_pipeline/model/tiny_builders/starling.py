"""Embedded Starling shapes (`embedded:tiny-starling`, `starling-small`, `starling-base`): Starling-LM-7B-alpha's
architecture (Mistral) scaled down, with Starling's real tokenizer: the Mistral-7B SentencePiece model that the PyPI
package `mistral-common` ships, plus Starling's two added tokens and chat template. Weights are random but
deterministic (seed 0); a README.md card gives the license (Apache-2.0, as Starling's and the Mistral tokenizer's).

Like Starling's own files, the tiny tokenizer sets pad = eos = `<|end_of_turn|>`, so the pipeline's pad-token fix
is exercised by the demo just as it is on the real model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from qlora_pipeline.data.templates import STARLING_CHAT_TEMPLATE, STARLING_END_OF_TURN
from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model.tiny_builders.common import save_random_model, write_card

STARLING_PAD = "<|pad_0|>"


# Wider than the usual 0.02: a random head that small caps every logit near 2.5 behind the frozen final norm, so a
# LoRA adapter could barely lower the loss. At 0.1 the head has the range of a trained one and the demo visibly
# learns (measured: eval loss 11.0 -> 8.5 in 30 steps, against 10.4 -> 9.8 at 0.02).
INIT_RANGE = 0.1


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


def build_starling_shaped(folder: Path, name: str, shape: dict | None = None) -> None:
    """The Starling shape `name` (STARLING_SHAPES, or `shape` given in the same keys), tokenizer and random weights,
    into `folder`."""
    shape = shape or STARLING_SHAPES[name]
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
