"""The task plumbing shared by every task: recipe keys and checks, the evaluation table, the evaluate command's
input errors, the embedded GPT-2 family. Each task's own behaviour is in tests/test_task_*.py."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO, SHARED_DATA, assert_clean_error, write_recipe

from qlora_pipeline.errors import RecipeError
from qlora_pipeline.recipe import load_recipe


def test_unknown_task_is_refused_with_the_choices(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", task="summarization")
    with pytest.raises(RecipeError, match=r"key 'task' must be one of 'causal_lm', 'extractive_qa'"):
        load_recipe(recipe)


def test_packing_belongs_to_causal_lm_only(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", task="classification", packing=True)
    with pytest.raises(RecipeError, match=r"key 'packing'.*task 'classification' pads each batch"):
        load_recipe(recipe)


def test_a_generation_metric_belongs_to_causal_lm_only(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", task="seq2seq", packing=False, generation_metric="symptoms")
    with pytest.raises(RecipeError, match=r"key 'generation_metric': is a causal_lm setting"):
        load_recipe(recipe)


def test_the_task_sets_the_adapter_type_and_head_and_the_saved_recipe_keeps_them(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", task="extractive_qa", packing=False))
    assert recipe.model.lora_task_type == "QUESTION_ANS"
    assert recipe.model.lora_modules_to_save == ["qa_outputs"]
    recipe.save(tmp_path / "saved.yaml")
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    assert saved["task"] == "extractive_qa" and saved["lora_task_type"] == "QUESTION_ANS"
    again = load_recipe(tmp_path / "saved.yaml")  # a saved recipe loads again as it was
    assert again.task.task == "extractive_qa" and again.model.lora_modules_to_save == ["qa_outputs"]


def test_an_adapter_type_that_contradicts_the_task_is_refused(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", task="classification", packing=False, lora_task_type="SEQ_2_SEQ_LM")
    with pytest.raises(RecipeError, match=r"key 'lora_task_type': task 'classification' trains SEQ_CLS adapters"):
        load_recipe(recipe)


@pytest.mark.parametrize("key", ["doc_stride", "max_answer_length", "max_target_length", "eval_max_new_tokens"])
def test_task_lengths_must_be_positive(tmp_path, key):
    with pytest.raises(RecipeError, match=rf"key '{key}': must be a positive integer, got 0"):
        load_recipe(write_recipe(tmp_path / "r.yaml", **{key: 0}))


def test_every_shipped_recipe_parses(tmp_path):
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.task.task in ("causal_lm", "extractive_qa", "classification", "seq2seq"), path


# ---------------------------------------------------------------- the evaluation table


class _Task:
    name = "classification"

    def metric_names_for(self, recipe):
        return ("macro_f1", "accuracy")


def test_the_evaluation_table_puts_headline_metrics_first_with_the_change(tmp_path):
    from qlora_pipeline.outputs.evaluation_table import write_table

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml"))
    columns = {
        "before": {
            "model": "untrained",
            "metrics": {"n": 40, "accuracy": 25.0, "macro_f1": 10.0, "roc_auc_macro": 0.5, "note": "text"},
        },
        "after": {
            "model": "trained",
            "metrics": {
                "n": 40,
                "accuracy": 80.0,
                "macro_f1": 78.5,
                "roc_auc_macro": 0.9,
                "confusion_matrix": {"labels": ["a", "b"], "matrix": [[18, 2], [6, 14]]},
            },
        },
    }
    json_path, markdown_path = write_table(tmp_path / "run", columns, _Task(), recipe)
    saved = json.loads(json_path.read_text())
    assert saved["task"] == "classification" and saved["models"]["after"]["metrics"]["macro_f1"] == 78.5
    lines = markdown_path.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| metric")]
    assert rows[0] == "| **macro_f1** | 10.00 | 78.50 | +68.50 |"
    assert rows[1] == "| **accuracy** | 25.00 | 80.00 | +55.00 |"
    assert "| roc_auc_macro | 0.5000 | 0.9000 | +0.40 |" in rows
    assert "| n | 40 | 40 |  |" in rows  # counts get no change column
    assert not any("note" in row for row in rows)  # text is kept in the JSON only
    assert "| a | 18 | 2 |" in lines and "| b | 6 | 14 |" in lines


def test_evaluate_refuses_a_missing_target(cli_in_process, tmp_path):
    result = cli_in_process("evaluate", str(tmp_path / "nowhere"))
    assert_clean_error(result, "nowhere: no such run folder or recipe file")


def test_evaluate_refuses_a_causal_lm_recipe_without_a_task_metric(cli_in_process, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"))
    result = cli_in_process("evaluate", str(recipe))
    assert_clean_error(result, "task 'causal_lm' has no metric here beyond the eval loss")


def test_evaluate_refuses_a_model_that_is_neither_adapter_nor_model(cli_in_process, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    result = cli_in_process("evaluate", str(recipe), "--model", str(tmp_path / "empty"))
    assert_clean_error(result, "not an adapter folder (adapter_config.json) or a model folder (config.json)")


# ---------------------------------------------------------------- the embedded GPT-2 family


def test_the_embedded_gpt2_tokenizer_is_gpt2s(embedded_cache):
    from transformers import AutoTokenizer

    from qlora_pipeline.model.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-distilgpt2"))
    assert len(tokenizer) == 50257 and tokenizer.eos_token == "<|endoftext|>"
    # GPT-2's ids for these words, as the Hub's gpt2 tokenizer gives them.
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_a_classifier_built_from_the_embedded_gpt_neo_keeps_its_embeddings(embedded_cache):
    """The checkpoint stores the tied embedding under the embedding's name, so a model of another head class finds
    it (only the new head is initialised)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from qlora_pipeline.model.tiny import resolve_model

    folder = resolve_model("embedded:tiny-gpt-neo")
    stored = load_file(f"{folder}/model.safetensors")
    assert "transformer.wte.weight" in stored and "lm_head.weight" not in stored
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(model.transformer.wte.weight, stored["transformer.wte.weight"])


@pytest.mark.shared_data
def test_the_embedded_gpt2_tokenizer_files_match_the_shared_copy(embedded_cache):
    shared = SHARED_DATA / "tokenizers" / "gpt2"
    if not shared.is_dir():
        pytest.skip(f"{shared} is absent (a fresh clone has no ../shared/data)")
    from qlora_pipeline.model.tiny_builders.gpt2 import gpt2_bpe_files

    vocab, merges = gpt2_bpe_files()
    assert json.loads(vocab.read_text()) == json.loads((shared / "vocab.json").read_text())
    assert merges.read_text().split("\n")[1:] == (shared / "merges.txt").read_text().split("\n")[1:]
