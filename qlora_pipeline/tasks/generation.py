"""Greedy generation for scoring: many held-out prompts, answered in batches, each within its own token budget.

The generation metrics (`metrics/symptoms.py`, `metrics/medtuned.py`) prompt the model exactly as training did (the
template's generation prompt, no added special tokens: the template writes the BOS) and decode greedily until the
template's end token. What makes it fast, and why the answers stay those of a one-row loop:

- prompts are sorted by token budget, then length, so a batch holds answers of one kind (a label, an NER line per
  word) and prompts of about one length: little padding, and no row waits long for the batch's longest answer;
- left padding, so every prompt of a batch ends where generation starts; `generate` derives the positions from the
  attention mask, so a padded prompt sees the positions it would see alone;
- the KV cache is on, and a batch stops as soon as every row has produced the end token or used its budget;
- each row has its own `max_new_tokens` (what its answer can need, see the metric); a batch runs to its largest
  and each row is cut to its own, which under greedy decoding is what that row alone would have generated.

Works on any model with `generate`: the 4-bit base + adapter as trained, a merged export, a plain Hub model.
"""

from __future__ import annotations

from collections.abc import Sequence


def batch_size(recipe) -> int:
    """Rows generated at once: the recipe's metric_batch_size, else its per_device_eval_batch_size."""
    return recipe.task.metric_batch_size or recipe.training.per_device_eval_batch_size


def render_prompts(tokenizer, template, questions: Sequence[tuple[str, str | None]]) -> list[str]:
    """The training prompt of each (instruction, input) pair, up to where the answer starts."""
    return [
        template.render(tokenizer, template.messages(question, extra), add_generation_prompt=True)
        for question, extra in questions
    ]


def end_token_ids(tokenizer, template) -> list[int]:
    """The ids that end an answer: the template's end token, then the tokenizer's EOS where it differs."""
    ids = [tokenizer.convert_tokens_to_ids(template.end_token_for(tokenizer)), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


def generate(
    model,
    tokenizer,
    template,
    prompts: Sequence[str],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 8,
    sort: bool = True,
    progress: str | None = None,
) -> list[str]:
    """Greedy answers to rendered prompts, in the prompts' order: new text only, special tokens skipped, stripped.

    `max_new_tokens`: one budget for all, or one per prompt. `sort=False` keeps the given order in batches (the
    one-row loop of the benchmark is `batch_size=1, sort=False`). `progress`: a tqdm label, or None for no bar."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
    if not prompts:
        return []
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = list(range(len(prompts)))
    if sort:
        order.sort(key=lambda i: (budgets[i], len(ids[i])))
    end_ids = end_token_ids(tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    device = next(model.parameters()).device
    answers: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc=progress, leave=False, disable=progress is None)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(ids[i]) for i in batch)
        # Left padding by hand: the tokenizer's padding side belongs to training (right) and stays as it is.
        input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
        config = GenerationConfig(
            max_new_tokens=max(budgets[i] for i in batch),
            do_sample=False,
            num_beams=1,
            eos_token_id=end_ids,
            pad_token_id=pad_id,
            use_cache=True,
        )
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        for row, index in enumerate(batch):
            new = output[row, width : width + budgets[index]].tolist()
            for position, token in enumerate(new):  # up to and without the end token, as one row alone stops
                if token in end_ids:
                    new = new[:position]
                    break
            answers[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return answers
