"""Embedded T5 shape (`embedded:tiny-t5`), with a SentencePiece tokenizer trained by the project on its samples.

No T5 vocabulary ships offline in any package, so the tokenizer is trained here, the way T5's was: a SentencePiece
Unigram model (`sentencepiece`, NFKC normalisation) with T5's layout: `<pad>`=0, `</s>`=1, `<unk>`=2, the learned
pieces, then the 100 sentinels `<extra_id_99>` … `<extra_id_0>` at the end of the vocabulary (`<extra_id_0>` is the
last id, as in t5-base). Its corpus is the text of the samples shipped in `qlora_pipeline/data/samples/`, read in file
name order; SentencePiece runs on one thread, so the same samples give the same tokenizer, byte for byte.

The model is t5-base's architecture (T5ForConditionalGeneration: relative-position attention buckets, ReLU
feed-forward, embeddings tied to the output layer, decoder outputs scaled by d_model^-0.5) scaled down to 2 encoder
and 2 decoder layers of width 64, random weights from a fixed seed. It shows that the pipeline works on T5, not what
t5-base learns.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.model.tiny_builders.common import save_random_model, write_card

# Pieces asked of SentencePiece, the specials included (with hard_vocab_limit off it keeps fewer, rather than failing,
# where a corpus supports fewer; the samples as shipped support all 3,000).
PIECES_WANTED = 3000
SENTINELS = 100
# t5-base's vocabulary (32,100 tokens) is padded to 32,128 embedding rows; the same multiple here.
EMBEDDING_MULTIPLE = 128
SHAPE = {"d_model": 64, "d_kv": 16, "d_ff": 256, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2}
MODEL_MAX_LENGTH = 512  # t5-base's tokenizer says 512 (relative positions allow longer inputs)


def sample_texts() -> Iterator[str]:
    """Every text value of the shipped samples (CSV cells, JSON/JSONL strings), file by file in name order,
    each distinct text once."""
    seen: set[str] = set()
    folder = samples.folder()
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        suffix = Path(entry.name).suffix
        if suffix not in (".csv", ".jsonl", ".json"):
            continue
        content = entry.read_text(encoding="utf-8")
        for text in _texts_of(content, suffix):
            if text.strip() and text not in seen:
                seen.add(text)
                yield text


def _texts_of(content: str, suffix: str) -> Iterator[str]:
    if suffix == ".csv":
        for row in csv.reader(io.StringIO(content)):
            yield from row
    elif suffix == ".jsonl":
        for line in content.splitlines():
            if line.strip():
                yield from _strings(json.loads(line))
    else:
        yield from _strings(json.loads(content))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def train_sentencepiece(texts: list[str]) -> bytes:
    """A SentencePiece Unigram model with T5's special ids (no BOS), as serialized bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="unigram",
        vocab_size=PIECES_WANTED,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",  # T5's normalisation
        character_coverage=1.0,
        max_sentence_length=100_000,
        shuffle_input_sentence=False,
        num_threads=1,  # one thread: the same corpus gives the same model
        minloglevel=2,
    )
    return model.getvalue()


def build_t5_tokenizer(folder: Path):
    """The T5 tokenizer (transformers' T5Tokenizer on the trained SentencePiece model, 100 sentinels), saved in
    `folder` with its spiece.model."""
    from transformers import AutoTokenizer

    source = Path(tempfile.mkdtemp(prefix="t5-tokenizer-"))
    try:
        (source / "spiece.model").write_bytes(train_sentencepiece(list(sample_texts())))
        config = {
            "tokenizer_class": "T5Tokenizer",
            "extra_ids": SENTINELS,
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": "<pad>",
            "model_max_length": MODEL_MAX_LENGTH,
        }
        (source / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        # transformers converts spiece.model into its fast tokenizer, sentinels appended after the pieces.
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        tokenizer.save_pretrained(str(folder))
        shutil.copy(source / "spiece.model", folder / "spiece.model")
        return tokenizer
    finally:
        shutil.rmtree(source, ignore_errors=True)


def build_tiny_t5(folder: Path) -> None:
    """t5-base's architecture at 2+2 layers of width 64, with the project-trained T5 tokenizer."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    tokenizer = build_t5_tokenizer(folder)
    rows = -(-len(tokenizer) // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    config = T5Config(
        vocab_size=rows,
        **SHAPE,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        # t5-base's is 0.1. The tiny model has random frozen weights that LoRA must bend a long way in a minute:
        # without dropout its training loss falls faster (measured, LoRA r 64 at lr 2e-3: from 8.7 to 5.2 in 300 steps,
        # against 6.4 with dropout 0.1).
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=True,  # as t5-base: tied, decoder outputs scaled by d_model^-0.5
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.config.architectures = ["T5ForConditionalGeneration"]
    save_random_model(model, folder)
    write_card(
        folder,
        "tiny-t5",
        f"""A small random-weight model built by qlora-pipeline for its offline recipes and tests
(`embedded:tiny-t5`): t5-base's architecture (T5ForConditionalGeneration, relative-position attention, ReLU
feed-forward, tied embeddings) at {config.num_layers}+{config.num_decoder_layers} layers of width {config.d_model}
without dropout, random weights (seed 0). Its tokenizer is a SentencePiece Unigram model with T5's layout
(`<pad>`=0, `</s>`=1, `<unk>`=2, 100 `<extra_id_N>` sentinels at the end: {len(tokenizer)} tokens, {rows} embedding
rows), trained by qlora-pipeline on the sample texts it ships.

License: Apache-2.0 (T5's architecture: Apache-2.0; the sample texts were written for qlora-pipeline).""",
        license="apache-2.0",
        pipeline_tag="text2text-generation",
        tags=["t5"],
    )
