"""Batches of packed rows that keep every example to itself.

TRL packs the tokenized examples into rows of at most max_length tokens (best-fit decreasing: no example is cut, and
each row records the lengths of the examples in it as `seq_lengths`). How the rows become a batch decides both speed
and correctness:

- TRL's padding-free collator concatenates the whole batch into ONE row (batch 4 x 512 → one row of ~2,000 tokens).
  Attention then runs over that whole row under a block mask: on a CPU, or anywhere without a varlen kernel, every
  query is scored against all ~2,000 keys, 4 times the work of attending within 512-token rows.
- A padded batch with a 2-D attention mask (the usual collator) lets each example attend to the examples packed
  before it in its row: the mask says which positions are real, not where one example ends.

Here each row stays a row (at most max_length), rows are right-padded to the batch's longest, and there is NO
attention mask: position ids restart at 0 for every example, and transformers builds the causal mask per example from
them (`masking_utils.find_packed_sequence_indices`), which isolates examples on SDPA and eager attention alike. The
padding at the end of a row gets its own positions from 0, so it is a block of its own that no real token attends to.
The model must run without a KV cache (`use_cache=False`): with one, positions no longer make the mask.

The pipeline packs and labels the rows itself (`pack`) and hands TRL the finished rows, so TRL neither re-packs nor
flattens them.
"""

from __future__ import annotations

from dataclasses import dataclass


def pack(dataset, max_length: int, completion_only_loss: bool):
    """Tokenized examples (input_ids, completion_mask) → rows of at most max_length (TRL's best-fit decreasing; no
    example is cut) with their `seq_lengths` and `labels`: the example's own tokens where it is trained on (its
    completion, under completion-only loss), -100 elsewhere, including each example's first token, which would
    otherwise be "predicted" from the end of the previous example."""
    from trl.data_utils import pack_dataset

    packed = pack_dataset(dataset.select_columns(["input_ids", "completion_mask"]), max_length, strategy="bfd")

    def add_labels(row):
        starts, offset = set(), 0
        for length in row["seq_lengths"]:
            starts.add(offset)
            offset += length
        trained = row["completion_mask"] if completion_only_loss else [1] * len(row["input_ids"])
        return {
            "labels": [
                token if keep and i not in starts else -100
                for i, (token, keep) in enumerate(zip(row["input_ids"], trained))
            ]
        }

    return packed.map(add_labels, remove_columns=["completion_mask"], desc="Labelling packed rows")


@dataclass
class PackedRowsCollator:
    """Packed rows (input_ids, labels, seq_lengths) → a batch: right-padded to the longest row, position ids restarting
    at 0 for each example and for the padding, no attention mask."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = torch.as_tensor(row["input_ids"])
            labels[i, :length] = torch.as_tensor(row["labels"])
            lengths = list(row["seq_lengths"]) + ([longest - length] if longest > length else [])
            position_ids[i] = torch.cat([torch.arange(n) for n in lengths])
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
