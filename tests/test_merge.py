"""Merge and export: the merged folder loads with plain transformers, prompts tokenize exactly as in training,
the merged model computes what the trained one did, a memorized answer survives, and failures leave nothing behind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import (
    END_OF_TURN,
    PASS_PHRASE,
    PASS_PHRASE_QUESTION,
    REPO,
    SENTINELS,
    assert_clean_error,
    run_cli,
    write_recipe,
)

pytestmark = pytest.mark.slow


def test_export_loads_with_plain_transformers_and_prompts_match_training(merged_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = merged_run["export"]
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {"README.md", "fidelity.json"} <= names
    assert any(n.endswith(".safetensors") for n in names) and not any(
        n.endswith((".bin", ".pt", ".pkl")) for n in names
    )
    assert not list(export.parent.glob(".merged.partial-*")), "the staging folder is gone"

    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert not any("4bit" in type(m).__name__ for m in model.modules()), "the export holds no quantized layers"
    assert model.dtype == torch.float32
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert model.generation_config.eos_token_id == end_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != end_id
    assert model.config.use_cache is True

    # For every eval example: the export's chat template gives exactly the trainer's prompt ids.
    from qlora_pipeline.data import rows as data
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import prepare_data

    recipe = load_recipe(merged_run["run"] / "recipe.yaml")
    prepared = prepare_data(recipe)
    rows = data.load_rows(recipe.data.dataset_name, recipe.data)
    _, eval_rows = data.split_train_eval(rows, recipe.data, recipe.training.seed)
    assert len(eval_rows) == len(prepared.eval.dataset) == 8
    for row, example in zip(eval_rows, prepared.eval.dataset):
        content = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]
        prompt_length = example["completion_mask"].index(1)
        assert ids == example["input_ids"][:prompt_length]
        assert ids.count(tokenizer.bos_token_id) == 1


def test_fidelity_report_nf4_roundtrip_matches_the_trained_model(merged_run):
    report = json.loads((merged_run["export"] / "fidelity.json").read_text())
    assert report["base_mode"] == "nf4-roundtrip" and report["dtype"] == "fp32" and report["passed"]
    assert report["prompts"] == 8 and report["answer_tokens"] > 0
    assert report["max_abs_logit_diff"] < 1e-3, report["max_abs_logit_diff"]
    assert abs(report["perplexity_increase"]) < 1e-4
    assert report["greedy_identical"] == report["prompts"]
    assert "logit diff" in merged_run["logs"] and "passed" in merged_run["logs"]


def test_merged_logits_match_4bit_base_plus_adapter_recomputed(merged_run):
    """Independent of the report: the 4-bit model with the adapter against the export, on one training prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qlora_pipeline.model.tiny import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(merged_run["export"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PASS_PHRASE_QUESTION}, {"role": "assistant", "content": PASS_PHRASE}],
        return_tensors="pt",
    )
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    quantized = AutoModelForCausalLM.from_pretrained(
        resolve_model("embedded:tiny-starling"),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
    )
    trained = PeftModel.from_pretrained(quantized, merged_run["run"] / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_run["export"]).eval()
    with torch.no_grad():
        difference = (trained(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    assert difference < 1e-3


def test_memorized_answer_survives_merge_and_stops_at_end_of_turn(merged_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_run["export"])
    model = AutoModelForCausalLM.from_pretrained(merged_run["export"]).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PASS_PHRASE_QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    max_new_tokens = 30
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1] :].tolist()
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip() == PASS_PHRASE
    # The generation config alone (no eos argument) stops it at the end-of-turn token.
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids(END_OF_TURN) and len(new_tokens) < max_new_tokens


def test_no_secret_reaches_the_run_the_export_or_the_logs(merged_run):
    for path in merged_run["run"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in SENTINELS.values():
                assert value.encode() not in data, path
    for value in SENTINELS.values():
        assert value not in merged_run["logs"]


def test_drift_over_the_threshold_fails_and_exports_nothing(merged_run, tmp_path):
    """Merging into the original 16-bit weights moves the logits (the adapter was trained on NF4 ones)."""
    out = tmp_path / "original"
    result = run_cli(
        "merge",
        str(merged_run["run"]),
        "--base-mode",
        "original",
        "--dtype",
        "fp32",
        "--max-logit-diff",
        "1e-3",
        "--out",
        str(out),
    )
    # This failure comes after the models ran, so their progress bars precede it on stderr; the error is the
    # last line, alone, with no traceback.
    output = result.stdout[-2000:] + result.stderr[-3000:]
    assert result.returncode == 2 and "Traceback" not in result.stderr, output
    line = result.stderr.strip().splitlines()[-1]
    for fragment in ("error: merge: fidelity check failed", "max logit difference", "nothing exported"):
        assert fragment in line, output
    assert not out.exists() and not list(tmp_path.glob(".original.partial-*"))
    failed = json.loads((tmp_path / "original.fidelity-failed.json").read_text())
    assert failed["passed"] is False and failed["max_abs_logit_diff"] > 1e-3
    assert failed["base_mode"] == "original"


def _fingerprint(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def test_existing_export_is_not_replaced_without_overwrite(merged_run, cli_in_process):
    before = _fingerprint(merged_run["export"])
    result = cli_in_process("merge", str(merged_run["run"]), "--dtype", "fp32")
    assert_clean_error(result, str(merged_run["export"]), "--overwrite")
    assert _fingerprint(merged_run["export"]) == before


def test_interrupted_merge_leaves_no_complete_looking_folder(merged_run, tmp_path, monkeypatch):
    """A failure while the export is being written (here: raised inside the tokenizer save, after the weights are
    on disk) leaves neither the export folder nor its staging folder."""
    from transformers import PreTrainedTokenizerBase

    from qlora_pipeline.stages import merge

    def broken_save(self, *args, **kwargs):
        raise RuntimeError("killed midway (simulated)")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", broken_save)
    out = tmp_path / "export"
    with pytest.raises(RuntimeError, match="killed midway"):
        merge.merge(merged_run["run"], ["--merge_dtype", "fp32", "--merge_fidelity_prompts", "1"], out=str(out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, fragments",
    [
        pytest.param(["/no/such/run"], ["/no/such/run", "no such run"], id="missing-folder"),
        pytest.param([str(REPO / "recipes")], ["neither a run folder"], id="not-a-run"),
        pytest.param(["RUN", "--dtype", "int4"], ["--dtype", "int4"], id="bad-dtype"),
        pytest.param(["RUN", "--prompts", "0"], ["merge_fidelity_prompts", "at least 1"], id="zero-prompts"),
    ],
)
def test_merge_input_errors(merged_run, args, fragments, cli_in_process):
    args = [str(merged_run["run"]) if a == "RUN" else a for a in args]
    if "--dtype" in args:  # argparse's own message for a bad choice: usage plus one error line, and its exit
        result = run_cli("merge", *args)
        assert result.returncode == 2 and "invalid choice: 'int4'" in result.stderr and "Traceback" not in result.stderr
        return
    # Refused before any model loads: in this process (a subprocess would only add its torch import).
    assert_clean_error(cli_in_process("merge", *args), *fragments)


def test_push_to_hub_recipe_trains_merges_then_fails_cleanly_offline(tmp_path):
    """push_to_hub: true runs train → merge → publish; offline, the publish step fails with exit code 3 and one
    error line, and the run and its export stay complete for a rerun of `qlora-pipeline publish`."""
    recipe = write_recipe(
        tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), push_to_hub=True, hub_model_id="me/tiny-starling"
    )
    result = run_cli(
        "train",
        str(recipe),
        "--max_steps",
        "2",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--merge_fidelity_prompts",
        "2",
        "--merge_dtype",
        "fp32",
        env=SENTINELS,
    )
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 3 and "Traceback" not in result.stderr, output
    assert result.stderr.strip().splitlines()[-1].startswith("error: publish:"), output
    export = tmp_path / "run" / "merged"
    assert (export / "fidelity.json").is_file() and (export / "README.md").is_file(), output
    assert json.loads((export / "fidelity.json").read_text())["passed"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    for value in SENTINELS.values():
        assert value not in result.stdout + result.stderr


def test_publish_dry_run_accepts_the_real_export(merged_run):
    before = _fingerprint(merged_run["export"])
    result = run_cli("publish", str(merged_run["run"]), "--repo-id", "me/tiny-starling-merged", "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    for path in merged_run["export"].iterdir():
        assert path.name in result.stdout
    assert "model card: valid" in result.stdout
    card = (merged_run["export"] / "README.md").read_text()
    assert "max_abs_logit_diff" in card or "logit" in card.lower()
    assert "GPT4 Correct User:" in card and "license: apache-2.0" in card
    assert _fingerprint(merged_run["export"]) == before
