"""Each GGUF file checked by llama.cpp itself (llama-cpp-python) against the merged export in transformers.

On the held-out prompts the merge's fidelity check uses, for every file:
- tokenization: llama.cpp's tokens for each rendered prompt, and prompt + answer, equal the trainer's token for
  token, with exactly one BOS (none for a template that writes none), both as llama-cpp-python tokenizes a
  rendered chat template (BOS text parsed as the BOS token) and as llama.cpp's server does (BOS text left out, the
  file's add_bos rule adds it);
- logits over the trainer's tokens: max / mean absolute difference and top-1 agreement with the export's float32
  logits, and the perplexity of the reference answers;
- greedy generations (argmax at every step, up to the fidelity length or the end token), compared with the export's.
The gate: tokenization must match; perplexity may rise by at most the recipe's threshold (one for 16/32-bit files,
one for quantized files); top-1 agreement must reach the recipe's minimum.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

# llama.cpp logs through this logger (llama-cpp-python's log callback prints what its level lets through).
LLAMA_CPP_LOGGER = "llama-cpp-python"


@dataclass(frozen=True)
class CheckExample:
    """One held-out row as training rendered and tokenized it."""

    prompt_text: str
    full_text: str
    prompt_ids: list[int]
    full_ids: list[int]

    @property
    def prompt_length(self) -> int:
        return len(self.prompt_ids)

    def as_tensors(self) -> dict:
        """The form tasks/fidelity.logit_pass takes (as fidelity_examples makes it)."""
        import torch

        mask = [0] * self.prompt_length + [1] * (len(self.full_ids) - self.prompt_length)
        return {
            "input_ids": torch.tensor(self.full_ids),
            "completion_mask": torch.tensor(mask, dtype=torch.bool),
            "prompt_length": self.prompt_length,
        }


@contextlib.contextmanager
def llama_cpp_log():
    """llama.cpp's log lines, captured instead of printed; the text is kept for an error that quotes it."""
    logger = logging.getLogger(LLAMA_CPP_LOGGER)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield captured
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def loaded(path: Path, n_ctx: int):
    """The GGUF file in llama.cpp, with logits for every position; closed on leaving."""
    from llama_cpp import Llama

    with llama_cpp_log():
        model = Llama(str(path), n_ctx=n_ctx, logits_all=True, n_threads=llama_threads(), seed=0, verbose=False)
    try:
        yield model
    finally:
        with llama_cpp_log():
            model.close()


def llama_threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def llama_cpp_pass(path: Path, examples: list[CheckExample], bos_text: str, end_id: int, max_new_tokens: int):
    """llama.cpp's tokens, logits and greedy generations for each example."""
    import numpy as np

    longest = max(len(e.full_ids) for e in examples)
    n_ctx = max(longest, max(e.prompt_length for e in examples) + max_new_tokens) + 8
    tokenization, logits, generations = [], [], []
    with loaded(path, n_ctx) as model:
        for example in examples:
            tokenization.append(_tokenization(model, example, bos_text))
            model.reset()
            model.eval(example.full_ids)
            logits.append(np.array(model.scores[: len(example.full_ids)], dtype=np.float32))
            generations.append(_greedy(model, example.prompt_ids, end_id, max_new_tokens))
    return {"tokenization": tokenization, "logits": logits, "generations": generations}


def _tokenization(model, example: CheckExample, bos_text: str) -> dict:
    """Both ways llama.cpp's users tokenize a rendered prompt, against the trainer's ids."""

    def tokens(text: str) -> list[list[int]]:
        parsed = model.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # BOS text → the BOS token
        if not (bos_text and text.startswith(bos_text)):
            return [parsed]
        added = model.tokenize(text[len(bos_text) :].encode("utf-8"), add_bos=True, special=True)
        return [parsed, added]

    result = {"prompt_equal": True, "full_equal": True, "first_difference": None}
    prompt_tokens = tokens(example.prompt_text)
    for key, candidates, expected in (
        ("prompt_equal", prompt_tokens, example.prompt_ids),
        ("full_equal", tokens(example.full_text), example.full_ids),
    ):
        for got in candidates:
            if got != expected:
                result[key] = False
                at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                result["first_difference"] = result["first_difference"] or {
                    "position": at,
                    "llama_cpp": got[max(0, at - 2) : at + 3],
                    "trainer": expected[max(0, at - 2) : at + 3],
                }
    # One BOS where the template writes it (none where it does not), however llama.cpp's user tokenizes the prompt.
    bos_id, expected = model.token_bos(), 1 if bos_text else 0
    result["bos_as_trained"] = all(ids.count(bos_id) == expected for ids in prompt_tokens)
    return result


def _greedy(model, prompt_ids: list[int], end_id: int, max_new_tokens: int) -> list[int]:
    """Argmax at every step, as the export's greedy `generate` does; the end token is kept when reached."""
    import numpy as np

    model.reset()
    model.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        generated.append(token)
        if token == end_id:
            break
        model.eval([token])
    return generated


def compare(reference: dict, candidate: dict, examples: list[CheckExample], gates: dict) -> dict:
    """One file's figures against the export's (`reference`: tasks.fidelity.logit_pass on the same examples) and
    the verdict. `gates`: max_ppl_increase and min_top1_agreement for this file's kind."""
    import numpy as np

    tokenization = candidate["tokenization"]
    max_diff, total_abs, values, agree, positions = 0.0, 0.0, 0, 0, 0
    nll_reference, nll_file, answer_tokens = 0.0, 0.0, 0
    for example, ref, got in zip(examples, reference["logits"], candidate["logits"]):
        ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
        diff = np.abs(ref - got)
        max_diff = max(max_diff, float(diff.max()))
        total_abs += float(diff.sum())
        values += diff.size
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ref.shape[0]
        targets = np.asarray(example.full_ids[1:])
        answer = slice(example.prompt_length - 1, len(example.full_ids) - 1)
        nll_reference += _nll(ref[answer], targets[answer])
        nll_file += _nll(got[answer], targets[answer])
        answer_tokens += len(targets[answer])
    ppl_reference = math.exp(nll_reference / max(answer_tokens, 1))
    ppl_file = math.exp(nll_file / max(answer_tokens, 1))
    increase = ppl_file / ppl_reference - 1
    top1 = agree / max(positions, 1)
    greedy_same = sum(a == b for a, b in zip(reference["generations"], candidate["generations"]))
    failures = []
    mismatched = [i for i, t in enumerate(tokenization) if not (t["prompt_equal"] and t["full_equal"])]
    if mismatched:
        first = tokenization[mismatched[0]]["first_difference"]
        failures.append(f"tokenization differs from training on {len(mismatched)} prompts (first: {first})")
    if not all(t["bos_as_trained"] for t in tokenization):
        failures.append("a prompt does not carry exactly one BOS token as in training")
    if increase > gates["max_ppl_increase"]:
        failures.append(f"perplexity +{increase:.2%} > allowed +{gates['max_ppl_increase']:.2%}")
    if top1 < gates["min_top1_agreement"]:
        failures.append(f"top-1 agreement {top1:.2%} < required {gates['min_top1_agreement']:.2%}")
    return {
        "prompts": len(examples),
        "tokenization_identical": len(examples) - len(mismatched),
        "bos_as_trained": all(t["bos_as_trained"] for t in tokenization),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": total_abs / max(values, 1),
        "top1_agreement": top1,
        "answer_tokens": answer_tokens,
        "perplexity_export": ppl_reference,
        "perplexity_gguf": ppl_file,
        "perplexity_increase": increase,
        "greedy_identical": greedy_same,
        "gates": gates,
        "passed": not failures,
        "failure": "; ".join(failures) or None,
    }


def _nll(logits, targets) -> float:
    """Summed negative log-likelihood of `targets` under `logits` (float64 log-softmax)."""
    import numpy as np

    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())
