"""GGUF export for llama.cpp and Ollama, checked by llama.cpp itself (llama-cpp-python, built from PyPI).

One shared run: the pass-phrase run of conftest.merged_run, copied without its export, its recipe asking for
`gguf_quant_types: [f16, q8_0]`, then `merge`: the export and the GGUF files in one step (in this process, to spare
a second torch import). The tests read what that wrote, and load the files in llama.cpp themselves. The
Modelfile's TEMPLATE is rendered with Go's text/template, the engine Ollama renders it with (Debian's golang-go;
.ci/run installs it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import (
    END_OF_TURN,
    PASS_PHRASE,
    PASS_PHRASE_QUESTION,
    REPO,
    assert_clean_error,
    run_cli,
)

llama_cpp = pytest.importorskip("llama_cpp", reason="the gguf extra is not installed: pip install -e '.[gguf]'")
gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install -e '.[gguf]'")

GO_RENDER = REPO / "tests" / "ollama" / "render.go"
TYPES = ("f16", "q8_0")


def _copy_run(run: Path, target: Path, with_export: bool) -> Path:
    """The run folder's adapter, recipe and summary (and its merged export) in a new place."""
    target.mkdir(parents=True)
    for name in ("adapter", "recipe.yaml", "summary.json", *(["merged"] if with_export else [])):
        source = run / name
        if source.is_dir():
            shutil.copytree(source, target / name)
        elif source.is_file():
            shutil.copy(source, target / name)
    return target


def _in_process(*args: str) -> tuple[int, str, str]:
    """`qlora-pipeline ARGS` in this process (no second torch import): (exit code, stdout, stderr)."""
    from qlora_pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def gguf_run(merged_run, tmp_path_factory):
    """`gguf_quant_types: [f16, q8_0]` in the recipe, then `merge`: the merged export (fp32) and RUN/gguf in one
    step."""
    run = _copy_run(merged_run["run"], tmp_path_factory.mktemp("gguf") / "run", with_export=False)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["gguf_quant_types"] = list(TYPES)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    code, stdout, stderr = _in_process("merge", str(run), "--dtype", "fp32", "--prompts", "4")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads((run / "gguf" / "fidelity.json").read_text())
    return {"run": run, "folder": run / "gguf", "report": report, "stdout": stdout}


def test_merge_writes_each_type_and_llama_cpp_agrees_with_the_export(gguf_run):
    """Each file, loaded in llama.cpp: the trainer's tokens for every prompt, one BOS; f16 gives the export's greedy
    generations and top token; q8_0's agreement is reported."""
    report, folder = gguf_run["report"], gguf_run["folder"]
    assert set(report["files"]) == set(TYPES)
    for kind, result in report["files"].items():
        assert (folder / result["file"]).is_file() and result["file"].endswith(f"-{kind}.gguf")
        assert result["passed"], result
        assert result["prompts"] == 4 and result["tokenization_identical"] == 4
        assert result["bos_as_trained"]
    f16, q8 = report["files"]["f16"], report["files"]["q8_0"]
    assert f16["greedy_identical"] == f16["prompts"], f16
    assert f16["top1_agreement"] >= 0.99 and abs(f16["perplexity_increase"]) < 0.01, f16
    assert 0.5 < q8["top1_agreement"] <= 1.0 and q8["max_abs_logit_diff"] > f16["max_abs_logit_diff"], q8
    # no source file left beside the asked-for ones (the export is fp32: the f32 file was the quantizer's source)
    assert sorted(p.name for p in folder.glob("*.gguf")) == sorted(r["file"] for r in report["files"].values())
    assert (gguf_run["run"] / "merged" / "fidelity.json").is_file()
    assert "GGUF check" in gguf_run["stdout"] and "q8_0" in gguf_run["stdout"]


def test_f16_file_answers_the_memorized_question_through_its_own_chat_template(gguf_run):
    """llama-cpp-python's chat completion renders the template stored in the file and stops at the file's EOS:
    the pass phrase the run memorized comes back word for word."""
    path = gguf_run["folder"] / gguf_run["report"]["files"]["f16"]["file"]
    model = llama_cpp.Llama(str(path), n_ctx=256, verbose=False, seed=0)
    try:
        answer = model.create_chat_completion(
            [{"role": "user", "content": PASS_PHRASE_QUESTION}], temperature=0.0, top_k=1, max_tokens=32
        )
    finally:
        model.close()
    choice = answer["choices"][0]
    assert choice["message"]["content"].strip() == PASS_PHRASE
    assert choice["finish_reason"] == "stop"


def test_file_metadata_carries_the_training_template_and_distinct_eos_and_pad(gguf_run):
    from transformers import AutoTokenizer

    from qlora_pipeline.data.templates import STARLING_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(gguf_run["run"] / "merged")
    reader = gguf.GGUFReader(gguf_run["folder"] / gguf_run["report"]["files"]["q8_0"]["file"])

    def value(key):
        return reader.fields[key].contents()

    assert value("tokenizer.chat_template") == STARLING_CHAT_TEMPLATE
    assert value("tokenizer.ggml.eos_token_id") == tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert value("tokenizer.ggml.padding_token_id") == tokenizer.convert_tokens_to_ids("<|pad_0|>")
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert value("tokenizer.ggml.add_bos_token") is True
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) and tokens[32000] == END_OF_TURN and tokens[32001] == "<|pad_0|>"


def _go_render(template: str, messages: list[dict]) -> str:
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go; .ci/run installs it): Ollama's template engine")
    result = subprocess.run(
        [go, "run", str(GO_RENDER)],
        input=json.dumps({"template": template, "messages": messages}),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GOTOOLCHAIN": "local"},  # never fetch another Go toolchain
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_modelfile_template_renders_the_training_text_and_tokens_for_a_two_turn_conversation(gguf_run):
    from transformers import AutoTokenizer

    from qlora_pipeline.data.templates import get_template
    from qlora_pipeline.local_runtimes.modelfile import template_of

    modelfile = (gguf_run["folder"] / "Modelfile").read_text()
    f16 = gguf_run["report"]["files"]["f16"]["file"]
    assert f"FROM ./{f16}" in modelfile and f'PARAMETER stop "{END_OF_TURN}"' in modelfile
    conversation = [
        {"role": "user", "content": "Which gene is named in: BRCA1 mutations raise risk?"},
        {"role": "assistant", "content": "BRCA1"},
        {"role": "user", "content": "And is it a tumour suppressor? Answer yes or no."},
    ]
    ollama_text = _go_render(template_of(modelfile), conversation)
    tokenizer = AutoTokenizer.from_pretrained(gguf_run["run"] / "merged")
    training_text = get_template("starling").render(tokenizer, conversation, add_generation_prompt=True)
    # Ollama adds the BOS token from the file (add_bos_token), as the training text's leading <s> does
    assert tokenizer.bos_token + ollama_text == training_text
    model = llama_cpp.Llama(str(gguf_run["folder"] / f16), vocab_only=True, verbose=False)
    try:
        ollama_ids = model.tokenize(ollama_text.encode(), add_bos=True, special=True)
    finally:
        model.close()
    assert ollama_ids == tokenizer(training_text, add_special_tokens=False)["input_ids"]


def test_card_names_each_file_and_publish_dry_run_accepts_the_folder(gguf_run):
    card = (gguf_run["folder"] / "README.md").read_text()
    for result in gguf_run["report"]["files"].values():
        assert f"`{result['file']}`" in card
    assert "ollama create" in card and "llama-cli" in card and "library_name: gguf" in card
    result = run_cli("publish", str(gguf_run["folder"]), "--repo-id", "someone/tiny-GGUF", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "GGUF files in" in result.stdout and "dry run: nothing was sent" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# Failing cases: one line, non-zero exit, nothing left behind


def _export_copy(merged_run, tmp_path, change=None) -> Path:
    """A run folder with a copy of the merged export (weights linked, not copied); `change(export)` edits it."""
    run = _copy_run(merged_run["run"], tmp_path / "run", with_export=False)
    export = run / "merged"
    export.mkdir()
    for path in merged_run["export"].iterdir():
        if path.suffix == ".safetensors":
            (export / path.name).symlink_to(path)
        else:
            shutil.copy(path, export)
    if change:
        change(export)
    return run


def _edit_architecture(export: Path) -> None:
    config = json.loads((export / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (export / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, args, fragments",
    [
        pytest.param(None, ["--quant", "f16,q9_9"], ["--quant", "'q9_9'", "q4_k_m"], id="unknown-type"),
        pytest.param(_edit_architecture, [], ["config.json", "GPT2LMHeadModel", "not supported"], id="architecture"),
        pytest.param(
            lambda export: (export / "tokenizer.json").unlink(), [], ["missing tokenizer file tokenizer.json"], id="tok"
        ),
    ],
)
def test_bad_requests_fail_in_one_line_before_any_model_loads(
    merged_run, tmp_path, cli_in_process, change, args, fragments
):
    run = _export_copy(merged_run, tmp_path, change)
    result = cli_in_process("export-gguf", str(run), "--quant", "f16", *args)
    assert_clean_error(result, *fragments)
    assert "reference" not in result.stdout  # nothing was loaded
    assert not (run / "gguf").exists()


def test_missing_extra_says_what_to_install(tmp_path):
    """A Python without llama-cpp-python (shadowed here by a package that fails to import, as on a plain
    `pip install qlora-pipeline`) is told to install the extra."""
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no llama-cpp-python here')\n")
    env = {"PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run_cli("export-gguf", str(REPO / "recipes"), "--quant", "f16", env=env)
    assert_clean_error(result, "llama-cpp-python", "pip install 'qlora-pipeline[gguf]'")


def test_write_failure_mid_file_leaves_nothing(merged_run, tmp_path):
    """The f32 file (34 MB) cannot be written past a 4 MB file-size limit: a real failing write, mid-file."""
    run = _export_copy(merged_run, tmp_path)
    result = run_cli(
        "export-gguf", str(run), "--quant", "q8_0", "--prompts", "1", timeout=600, file_size_limit=4 * 2**20
    )
    output = result.stdout[-2000:] + result.stderr[-3000:]
    assert result.returncode == 2 and "Traceback" not in result.stderr, output
    line = result.stderr.strip().splitlines()[-1]  # after the progress bars
    assert line.startswith(f"error: export-gguf: could not write the export {run / 'gguf'}"), output
    assert "short write" in line and "nothing was exported" in line, line
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "merged", "recipe.yaml", "summary.json"]


def test_export_gguf_merges_first_and_a_file_over_its_gate_leaves_only_the_report(merged_run, tmp_path):
    """`export-gguf` on a run with no merged export merges first; a q4_k_m file held to 100% top-1 agreement (a
    recipe key given on the command line) fails, and only the merged export and the failure report are left."""
    run = _copy_run(merged_run["run"], tmp_path / "run", with_export=False)
    args = ["--quant", "q4_k_m", "--prompts", "2", "--merge_dtype", "fp32", "--gguf_quantized_min_top1_agreement", "1"]
    code, stdout, stderr = _in_process("export-gguf", str(run), *args)
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert "has no merged export: merging first" in stdout and (run / "merged" / "config.json").is_file()
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: export-gguf: q4_k_m failed the llama.cpp check"), line
    assert "top-1 agreement" in line and "nothing exported" in line
    assert not (run / "gguf").exists()
    failed = json.loads((run / "gguf.fidelity-failed.json").read_text())
    assert failed["files"]["q4_k_m"]["passed"] is False and "gguf.fidelity-failed.json" in line
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "no staging folder left"


def test_merge_with_gguf_types_refuses_an_existing_gguf_folder_before_merging(merged_run, tmp_path, cli_in_process):
    run = _copy_run(merged_run["run"], tmp_path / "run", with_export=False)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["gguf_quant_types"] = ["f16"]
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run / "gguf").mkdir()
    result = cli_in_process("merge", str(run), "--dtype", "fp32")
    assert_clean_error(result, str(run / "gguf"), "--overwrite")
    assert not (run / "merged").exists(), "nothing was merged"
