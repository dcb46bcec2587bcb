"""TRL's SFTTrainer, with the loss computed only where there are labels.

TRL 1.16 computes the loss through a fused, tiled LM head that projects only the labelled positions, but only on
devices with Triton; elsewhere (every CPU) it scores every position of the batch against the whole vocabulary, plus
entropy and top-1 for its metrics. With completion-only loss most positions are prompt, so nearly all of that work is
thrown away: on the 18.7 M-parameter Starling-shaped model with 512-token rows it was about half of each CPU step.

Here the model is asked for the logits of the labelled positions only (`logits_to_keep`: the positions whose next
token has a label, shared by the rows of the batch), and the loss is plain cross-entropy over them: the same value as
TRL's (sum over labelled tokens / their count, or / `num_items_in_batch` under gradient accumulation), with the same
entropy and token-accuracy metrics, computed on those positions. The call goes through the model's own forward, so
DDP, FSDP and DeepSpeed wrappers see it. Anything this does not cover (DFT loss, label smoothing, a custom loss, MoE
auxiliary loss, returning outputs) is left to TRL's compute_loss.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer


class PipelineSFTTrainer(SFTTrainer):
    def _plain_loss_applies(self, return_outputs: bool) -> bool:
        return (
            not return_outputs
            and self.args.loss_type == "nll"
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._plain_loss_applies(return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        # Position p predicts token p + 1: keep the positions whose next token is labelled in any row.
        next_labels = labels[:, 1:]
        keep = (next_labels != -100).any(dim=0).nonzero().flatten()
        if keep.numel() == 0:  # nothing to learn in this batch: a zero that still reaches every trainable weight
            keep = torch.zeros(1, dtype=torch.long, device=labels.device)
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits.float()
        targets = next_labels[:, keep]
        labelled = targets != -100
        loss_sum = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        count = labelled.sum()
        loss = loss_sum / (count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        # As in Trainer.compute_loss: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_token_metrics(mode, logits.detach(), targets, labelled, inputs)
        return loss

    def _log_token_metrics(self, mode, logits, targets, labelled, inputs) -> None:
        """TRL's entropy, mean_token_accuracy and num_tokens, from the kept positions."""
        log_probs = logits.log_softmax(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        gather = self.accelerator.gather_for_metrics
        valid = gather(labelled.sum()).sum()
        entropy_sum = gather(entropy[labelled].sum()).sum()
        correct = gather((logits.argmax(-1) == targets)[labelled].sum()).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            real = (inputs["input_ids"] != self.processing_class.pad_token_id).sum()
            self._total_train_tokens += gather(real).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
