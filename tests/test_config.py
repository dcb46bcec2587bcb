"""How a valid recipe is adapted to the machine and the launcher, with a note for each change."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, write_recipe

from qlora_pipeline.model.loading import quantization_config
from qlora_pipeline.recipe import load_recipe


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU adaptation; this machine has a CUDA GPU")
def test_cpu_turns_mixed_precision_off_and_really_distributes(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", fp16=True))
    args = recipe.training
    assert not args.fp16 and not args.bf16
    assert args.use_cpu, "without use_cpu, accelerate's CPU processes each train alone as rank 0 of 1"
    assert any("fp16/bf16" in note for note in recipe.notes)
    bnb = quantization_config(recipe.model, args)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.float32
    # What the recipe said stays known, for plans made for another machine.
    assert recipe.written("fp16") is True and recipe.written("use_cpu") is False
    assert recipe.written("learning_rate") == args.learning_rate


def test_trainer_settings_the_pipeline_relies_on(tmp_path):
    args = load_recipe(write_recipe(tmp_path / "r.yaml", completion_only_loss=None)).training
    assert args.completion_only_loss is True, "the prompt is masked unless the recipe says otherwise"
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.include_num_input_tokens_seen == "non_padding"


def test_packing_falls_back_to_padding_on_an_unsafe_attention_backend(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"), ["--attn_implementation", "paged|eager"])
    assert recipe.training.packing is False
    assert any("packing is off" in note and "paged|eager" in note for note in recipe.notes)
    safe = load_recipe(write_recipe(tmp_path / "s.yaml"), ["--attn_implementation", "eager"])
    assert safe.training.packing is True and not any("packing" in note for note in safe.notes)


def test_the_starling_recipe_parses_with_the_tutorial_defaults():
    recipe = load_recipe(REPO / "recipes" / "starling-7b-medtuned-qlora.yaml")
    model, data, args = recipe.model, recipe.data, recipe.training
    assert model.model_name_or_path == "berkeley-nest/Starling-LM-7B-alpha"
    assert data.dataset_name == "nlpie/Llama2-MedTuned-Instructions" and data.template == "starling"
    assert (model.lora_r, model.lora_alpha, model.lora_dropout, model.lora_bias) == (8, 16, 0.05, "none")
    assert model.load_in_4bit and model.bnb_4bit_quant_type == "nf4" and model.use_bnb_nested_quant
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "paged_adamw_32bit"
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine"
    assert args.max_length == 512 and args.packing and args.logging_steps == 10
    assert str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "epoch"
    assert str(getattr(args.save_strategy, "value", args.save_strategy)) == "epoch"
