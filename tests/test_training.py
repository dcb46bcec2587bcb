"""In-process checks of what the trainer is given and what training changes, on the embedded tiny Starling."""

from __future__ import annotations

import pytest
import torch
from conftest import write_recipe

from qlora_pipeline.recipe import load_recipe
from qlora_pipeline.stages.train import build_trainer
from qlora_pipeline.tasks import prepare_data

pytestmark = pytest.mark.slow


def _trainer(tmp_path, **changes):
    path = write_recipe(
        tmp_path / "recipe.yaml",
        output_dir=str(tmp_path / "run"),
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        **changes,
    )
    recipe = load_recipe(path)
    prepared = prepare_data(recipe)
    trainer, _ = build_trainer(recipe, prepared)
    return recipe, prepared, trainer


@pytest.mark.parametrize("template", ["starling", "alpaca", "tokenizer"])
def test_prompt_tokens_masked_answer_and_eos_trained(tmp_path, template):
    recipe, prepared, trainer = _trainer(tmp_path, template=template, packing=False, max_train_samples=8)
    tokenizer, tmpl = prepared.tokenizer, prepared.template
    rows = prepared_rows(recipe)
    end_id = tokenizer.convert_tokens_to_ids(tmpl.end_token_for(tokenizer))
    for index in range(4):
        row = rows[index]
        example = trainer.train_dataset[index]
        ids, labels = example["input_ids"], example["labels"]
        prompt, completion = tmpl.prompt_and_completion(tokenizer, row["instruction"], row["input"], row["output"])
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert ids[:n] == prompt_ids
        assert labels[:n] == [-100] * n, "every prompt token is masked"
        assert labels[n:] == ids[n:], "every answer token is trained"
        assert labels[-1] == end_id, "the closing end-of-turn token is trained, so the model learns to stop"
        assert ids == tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
        # (decoding a slice drops SentencePiece's leading space, hence the strip)
        assert tokenizer.decode(ids[n:]).strip() == completion.strip()
        assert completion.rstrip().endswith(
            tmpl.end_token_for(tokenizer) if template != "alpaca" else tokenizer.eos_token
        )
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id, "exactly one BOS"
        # What inference will build from the same chat template, token for token.
        messages = tmpl.messages(row["instruction"], row["input"])
        inference_ids = tokenizer.apply_chat_template(
            messages,
            chat_template=tmpl.chat_template_for(tokenizer),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        assert list(inference_ids) == prompt_ids


def prepared_rows(recipe):
    """The training rows in the order the trainer sees them (same split as prepare_data, no shuffling)."""
    from qlora_pipeline.data import rows as data

    rows = data.load_rows(recipe.data.dataset_name, recipe.data)
    train, _ = data.split_train_eval(rows, recipe.data, recipe.training.seed)
    return train


def test_packed_batch_matches_examples_run_alone(tmp_path):
    """Every example of a packed batch (rows of at most max_length, padded to the longest, no attention mask) gets
    exactly the logits it gets run alone, padding included as a block of its own."""
    recipe, prepared, trainer = _trainer(tmp_path, per_device_train_batch_size=3)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch, "a 2-D mask would make packed examples attend to each other"
    rows, width = batch["input_ids"].shape
    assert rows == 3 and width <= recipe.training.max_length, "rows stay rows, never one flattened row per batch"
    pad = prepared.tokenizer.pad_token_id
    assert (batch["input_ids"] == pad).any(), "rows are padded to the longest (the control below needs padding)"

    model = trainer.model.eval()
    worst, examples = 0.0, 0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for row in range(rows):
            positions = batch["position_ids"][row]
            real = int((batch["input_ids"][row] != pad).sum())
            starts = [i for i in (positions[:real] == 0).nonzero().flatten().tolist()] + [real]
            for begin, end in zip(starts[:-1], starts[1:]):
                alone = model(input_ids=batch["input_ids"][row : row + 1, begin:end], use_cache=False).logits[0]
                worst = max(worst, (packed[row, begin:end] - alone).abs().max().item())
                examples += 1
        # Control: the same rows with an all-ones 2-D mask let later examples see earlier ones.
        leaky = model(
            input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]), use_cache=False
        ).logits
    assert examples > rows, "the rows hold several examples each"
    assert worst < 1e-4, f"packed logits differ from per-example logits by {worst}"
    first_row = batch["position_ids"][0]
    second = slice(*(first_row == 0).nonzero().flatten().tolist()[1:3])
    assert (leaky[0, second] - packed[0, second]).abs().max().item() > 1e-2


def test_labels_skip_prompts_and_each_examples_first_token(tmp_path):
    recipe, prepared, trainer = _trainer(tmp_path, per_device_train_batch_size=2)
    batch = next(iter(trainer.get_train_dataloader()))
    labels, positions = batch["labels"], batch["position_ids"]
    assert (labels[positions == 0] == -100).all(), "no example is predicted from the end of the one before it"
    trained = labels != -100
    assert (batch["input_ids"][trained] == labels[trained]).all()
    assert 0 < trained.sum() < (batch["input_ids"] != prepared.tokenizer.pad_token_id).sum(), "prompts are masked"


def test_loss_on_labelled_positions_equals_the_full_logits_loss(tmp_path):
    """The trainer's loss (logits of labelled positions only) is the cross-entropy of the full logits."""
    recipe, prepared, trainer = _trainer(tmp_path, per_device_train_batch_size=2)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.eval()
    with torch.no_grad():
        ours = trainer.compute_loss(model, dict(batch))
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        full = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )
    assert abs(ours.item() - full.item()) < 1e-5, (ours.item(), full.item())


def test_training_changes_lora_only_through_4bit_layers(tmp_path):
    import bitsandbytes as bnb

    recipe, prepared, trainer = _trainer(tmp_path, max_steps=6, per_device_train_batch_size=1)
    model = trainer.model
    four_bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7, "q/k/v/o/gate/up/down of both layers are real bitsandbytes 4-bit layers"
    assert all(m.weight.quant_type == "nf4" for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert all(m.weight.quant_state.nested for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))

    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    trainer.train()

    after = dict(model.named_parameters())
    unchanged = [n for n, p in base.items() if torch.equal(p, after[n].detach())]
    assert len(unchanged) == len(base), "base weights (4-bit and the rest) stay exactly as loaded"
    changed = [n for n, p in lora.items() if not torch.equal(p, after[n].detach())]
    assert len(changed) == len(lora), f"every LoRA matrix moved; unchanged: {set(lora) - set(changed)}"
