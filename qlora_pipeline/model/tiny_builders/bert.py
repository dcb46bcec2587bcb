"""Embedded BERT shape (`embedded:tiny-bert`), with a WordPiece tokenizer learnt from the project's own sample text.

No BERT vocabulary ships offline in a package, so the project learns one from its own sample text, in
bert-base-uncased's form: lower-cased, accents stripped, BERT's normaliser and pre-tokenizer from the `tokenizers`
library (split on whitespace and punctuation), WordPiece with `##` continuations, and the special tokens [PAD] [UNK]
[CLS] [SEP] [MASK]. Its corpus is every text value of the samples shipped in `qlora_pipeline/data/samples/`, plus
printable ASCII as the base alphabet (so no ASCII word is wholly unknown). The choice of pieces is deterministic
(see `train_wordpiece`): the same samples always build the same vocabulary.

The checkpoint is a `BertForMaskedLM` (architectures: BertForMaskedLM, as bert-base-uncased's config says): its
`bert.*` encoder loads into `AutoModelForQuestionAnswering` (or sequence classification), whose head is then new,
exactly as with bert-base-uncased. Random weights from a fixed seed: it shows that the pipeline works on BERT, not
what BERT learns.
"""

from __future__ import annotations

import csv
import io
import json
import string
from pathlib import Path

from qlora_pipeline.data import samples

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# The samples' frequent words and word pieces; rarer words split into pieces, unknown characters become [UNK].
VOCAB_SIZE = 4000
INIT_RANGE = 0.02
SHAPE = {"hidden": 64, "layers": 2, "heads": 4, "ffn": 256, "positions": 512}


def sample_texts() -> list[str]:
    """Every string value in the shipped samples (JSON, JSONL, CSV), in sorted file order."""
    folder = samples.folder()
    texts: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        suffix = Path(entry.name).suffix.lower()
        if suffix not in (".json", ".jsonl", ".csv"):
            continue
        text = entry.read_text(encoding="utf-8")
        if suffix == ".json":
            _strings(json.loads(text), texts)
        elif suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    _strings(json.loads(line), texts)
        else:
            texts += [cell for row in csv.reader(io.StringIO(text)) for cell in row if cell.strip()]
    return texts


def _strings(value, into: list[str]) -> None:
    if isinstance(value, str):
        if value.strip():
            into.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _strings(item, into)
    elif isinstance(value, list):
        for item in value:
            _strings(item, into)


def train_wordpiece(texts: list[str], vocab_size: int = VOCAB_SIZE) -> dict[str, int]:
    """A lower-cased WordPiece vocabulary (token → id; the special tokens first, [PAD] = 0) learnt from `texts`.

    Not the `tokenizers` WordPieceTrainer: it breaks ties between equally frequent merges in hash-map order, which
    differs from process to process, so two builds of the same samples would get different vocabularies (measured:
    about 10 of 4,000 tokens differ between runs, and ids are shuffled). Here the choice is deterministic: the text is
    normalised and split exactly as BERT's tokenizer does (the `tokenizers` BertNormalizer and BertPreTokenizer), every
    character is kept (alone and as a `##` continuation), and the rest of the vocabulary goes to the pieces that cover
    the most text: whole words, word starts and `##` word endings of 2 to 8 characters, scored by occurrences times
    length (ties: alphabetical), each seen at least twice."""
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted(set(string.ascii_lowercase + string.digits + string.punctuation) | set("".join(words)))
    vocab = [*SPECIAL_TOKENS, *characters, *(f"##{c}" for c in characters)]
    pieces: Counter = Counter()
    for word, count in words.items():
        if len(word) > 1:
            pieces[word] += count
        for size in range(2, min(len(word), 9)):
            pieces[word[:size]] += count
            pieces[f"##{word[-size:]}"] += count
    taken = set(vocab)
    ranked = sorted(
        (p for p, n in pieces.items() if n >= 2 and p not in taken),
        key=lambda p: (-pieces[p] * len(p.removeprefix("##")), p),
    )
    vocab += ranked[: max(0, vocab_size - len(vocab))]
    return {token: index for index, token in enumerate(vocab)}


def build_bert_tokenizer(folder: Path):
    """The trained vocabulary as transformers' BertTokenizer (uncased), saved into `folder`."""
    from transformers import BertTokenizer

    vocab = train_wordpiece(sample_texts())
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=SHAPE["positions"])
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def build_tiny_bert(folder: Path) -> None:
    """BERT's architecture (post-norm encoder, learned positions, token types) at 2 layers of width 64."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from qlora_pipeline.model.tiny_builders.common import save_random_model, write_card

    folder = Path(folder)
    tokenizer = build_bert_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=SHAPE["hidden"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        intermediate_size=SHAPE["ffn"],
        max_position_embeddings=SHAPE["positions"],
        type_vocab_size=2,
        initializer_range=INIT_RANGE,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config)
    save_random_model(model, folder)
    write_card(
        folder,
        "tiny-bert",
        f"""A small random-weight model built by qlora-pipeline for its offline recipes and tests
(`embedded:tiny-bert`): bert-base-uncased's architecture (BERT encoder, masked-LM head) at {SHAPE["layers"]} layers
of width {SHAPE["hidden"]}, with an uncased WordPiece tokenizer of {len(tokenizer)} tokens that qlora-pipeline learns
from its own shipped sample text (BERT's normaliser and pre-tokenizer from the `tokenizers` library). Random
weights (seed 0). Its encoder loads into AutoModelForQuestionAnswering and AutoModelForSequenceClassification with a
new head, as bert-base-uncased does.

License: Apache-2.0 (as bert-base-uncased; the sample text was written for qlora-pipeline).""",
        license="apache-2.0",
        pipeline_tag="fill-mask",
        tags=["bert"],
    )
