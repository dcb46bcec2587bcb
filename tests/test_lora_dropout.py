"""model/lora_dropout.py: the CPU's LoRA dropout draws a quarter of the random numbers and is still dropout: the
Bernoulli(keep) mask at the rounded p, the expectation kept, the same mask from the same seed, the same mask in
gradient checkpointing's recomputation, nothing in eval mode; peft's dropout is replaced only where it would run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_pipeline.model.lora_dropout import WordDropout, use_word_dropout


def test_mask_is_bernoulli_at_the_rounded_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    dropout = WordDropout(0.05).train()
    x = torch.ones(4, 512, 768)
    out = dropout(x)
    kept = out != 0
    assert dropout.threshold == 1638 and abs(dropout.threshold / 32768 - 0.05) < 2e-5
    # 1.57 M elements: the kept share's standard error is 1.7e-4; 1e-3 is six of them.
    assert abs(kept.float().mean().item() - (1 - dropout.threshold / 32768)) < 1e-3
    assert torch.allclose(out[kept], torch.full_like(out[kept], dropout.scale))
    assert abs(out.mean().item() - 1.0) < 2e-3  # the kept values are scaled: E[out] = x
    # Each of the four 15-bit fields of a word drops alike (no field is biased by the word's sign bit).
    fields = kept.flatten()[: (kept.numel() // 4) * 4].view(-1, 4).float().mean(0)
    assert (fields - fields.mean()).abs().max() < 3e-3


def test_same_seed_same_mask_and_gradient_is_the_mask():
    x = torch.randn(2, 64, 32, requires_grad=True)
    dropout = WordDropout(0.1).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    second = dropout(x)
    assert torch.equal(first, second)
    first.sum().backward()
    assert torch.equal(x.grad, (first != 0).float() * dropout.scale)
    assert torch.equal(dropout.eval()(x), x)  # eval: identity


def test_checkpoint_recomputation_replays_the_same_mask():
    """Gradient checkpointing reruns the forward in the backward: the mask must be the one the forward used, or the
    gradient belongs to another network. torch's checkpoint restores the CPU generator, which WordDropout draws from."""
    torch.manual_seed(1)
    layer = nn.Sequential(WordDropout(0.3), nn.Linear(32, 32)).train()
    x = torch.randn(3, 16, 32, requires_grad=True)

    def gradient(use_checkpoint: bool):
        torch.manual_seed(11)
        x.grad = None
        out = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        out.square().sum().backward()
        return x.grad.clone()

    assert torch.equal(gradient(True), gradient(False))


@pytest.mark.parametrize("p, replaced", [(0.05, 2), (0.0, 0)])
def test_peft_dropout_replaced_on_cpu_only_where_it_drops(p, replaced):
    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_dropout=p, target_modules=["0", "2"]))
    assert use_word_dropout(peft_model) == replaced
    dropouts = [m for m in peft_model.modules() if isinstance(m, WordDropout)]
    assert len(dropouts) == replaced and all(d.p == p for d in dropouts)
