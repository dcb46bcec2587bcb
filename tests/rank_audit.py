"""`train` with a witness on every rank, for the DDP tests in test_scaling.py: launched by `accelerate launch
tests/rank_audit.py RECIPE [--key value ...]` in place of `-m qlora_pipeline train`, it trains through the same
`stages.train.run`, and each rank writes to $RANK_AUDIT_DIR/rank-N.jsonl, after every optimizer step, the token ids
its model was fed in training and a SHA-256 of its trainable weights. It only reads: a forward pre-hook on the input
embeddings (eval passes left out) and the weights at step end."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback


class RankAudit(TrainerCallback):
    def __init__(self, folder: Path):
        self.folder = folder
        self.fed: list[list[int]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.get_input_embeddings().register_forward_pre_hook(self._record)

    def _record(self, module, inputs):
        if module.training:
            self.fed += inputs[0].tolist()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                digest.update(name.encode())
                digest.update(parameter.detach().float().cpu().numpy().tobytes())
        line = {"step": state.global_step, "rank": args.process_index, "rows": self.fed, "weights": digest.hexdigest()}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank-{args.process_index}.jsonl", "a") as handle:
            handle.write(json.dumps(line) + "\n")
        self.fed = []


def main(argv: list[str]) -> int:
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.stages import train

    recipe_path, overrides = argv[0], argv[1:]
    audit = RankAudit(Path(os.environ["RANK_AUDIT_DIR"]))
    train.run(load_recipe(recipe_path, overrides), overrides=overrides, callbacks=[audit])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
