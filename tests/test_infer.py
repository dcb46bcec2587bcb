"""generate and chat: a run (4-bit base + adapter, as trained) and its merged export answer the memorized question;
prompts are the trainer's prompt tokens; batches keep row order; chat re-renders the whole conversation each turn;
bad input fails with one line before any model loads."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import END_OF_TURN, PASS_PHRASE, PASS_PHRASE_QUESTION, REPO, assert_clean_error, run_cli

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.stages import infer

pytestmark = pytest.mark.slow

STARLING_PROMPT = "<s>GPT4 Correct User: {}<|end_of_turn|>GPT4 Correct Assistant:"


@pytest.fixture(scope="module")
def training_prompts(merged_run):
    """The held-out rows of the run and, for each, the prompt ids the trainer built (ids up to the first
    completion token), plus the indices of the pass-phrase rows and of rows with an input."""
    from qlora_pipeline.data import rows as data
    from qlora_pipeline.recipe import load_recipe
    from qlora_pipeline.tasks import prepare_data

    recipe = load_recipe(merged_run["run"] / "recipe.yaml")
    prepared = prepare_data(recipe)
    rows = data.load_rows(recipe.data.dataset_name, recipe.data)
    _, eval_rows = data.split_train_eval(rows, recipe.data, recipe.training.seed)
    assert len(eval_rows) == len(prepared.eval.dataset)
    ids = [example["input_ids"][: example["completion_mask"].index(1)] for example in prepared.eval.dataset]
    eval_rows = [dict(row) for row in eval_rows]
    phrase = [i for i, row in enumerate(eval_rows) if row["instruction"] == PASS_PHRASE_QUESTION]
    with_input = [i for i, row in enumerate(eval_rows) if row["input"]]
    assert phrase and len(with_input) >= 2, eval_rows
    return {"rows": eval_rows, "ids": ids, "phrase": phrase[0], "with_input": with_input}


def shown_prompts(stderr: str) -> dict[int, dict]:
    """The `--show-prompt` lines, by prompt number: {"text": ..., "ids": [...]}."""
    prompts: dict[int, dict] = {}
    for number, key, value in re.findall(r"^prompt (\d+) (text|ids): (.*)$", stderr, flags=re.MULTILINE):
        prompts.setdefault(int(number), {})[key] = json.loads(value)
    return prompts


def run_chat_cli(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora_pipeline", "chat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


# ---------------------------------------------------------------- prompts: the trainer's tokens


def test_prompt_ids_are_the_trainers_for_run_adapter_and_export(merged_run, training_prompts):
    """No weights load: the saved tokenizer and template alone give the trainer's prompt ids for every eval row."""
    run, export = merged_run["run"], merged_run["export"]
    for path in (run, run / "adapter", export):
        loaded = infer.open_model(path)
        assert loaded.model is None
        tokenizer = loaded.tokenizer
        assert loaded.template.name == "starling"
        assert loaded.end_token_ids[0] == tokenizer.convert_tokens_to_ids(END_OF_TURN)
        assert tokenizer.pad_token_id not in loaded.end_token_ids and tokenizer.padding_side == "left"
        for row, ids in zip(training_prompts["rows"], training_prompts["ids"]):
            messages = infer.row_messages(row, loaded.template, loaded.columns)
            assert loaded.prompt_ids(messages) == ids, (path, row)
    assert infer.open_model(run).source.kind == "adapter"
    assert infer.open_model(export).source.kind == "model"
    assert infer.locate_model(run, merged=True).folder == export


# ---------------------------------------------------------------- generate


def test_generate_run_as_trained_answers_with_the_training_prompt(merged_run, training_prompts):
    result = run_cli("generate", str(merged_run["run"]), "--prompt", PASS_PHRASE_QUESTION, "--show-prompt")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout == PASS_PHRASE + "\n"
    shown = shown_prompts(result.stderr)
    assert list(shown) == [1]
    assert shown[1]["ids"] == training_prompts["ids"][training_prompts["phrase"]]
    assert shown[1]["text"] == STARLING_PROMPT.format(PASS_PHRASE_QUESTION)


def test_generate_from_the_merged_export(merged_run):
    result = run_cli("generate", str(merged_run["export"]), "--prompt", PASS_PHRASE_QUESTION, "--max-new-tokens", "30")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout == PASS_PHRASE + "\n"


def test_generate_input_file_in_batches_keeps_row_order(merged_run, training_prompts, tmp_path):
    """3 rows in batches of 2 (left padding: the pass-phrase row shares a batch with a longer prompt)."""
    chosen = [training_prompts["with_input"][0], training_prompts["phrase"], training_prompts["with_input"][1]]
    rows = [{**training_prompts["rows"][i], "id": n} for n, i in enumerate(chosen)]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_cli(
        "generate",
        str(merged_run["run"]),
        # Spelled as transformers users type options; the other tests use dashes.
        "--input_file",
        str(source),
        "--output_file",
        str(out),
        "--batch_size",
        "2",
        "--max_new_tokens",
        "12",
        "--show_prompt",
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout == ""
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 3
    for row, got in zip(rows, written):
        assert {k: v for k, v in got.items() if k != "generation"} == row
        assert isinstance(got["generation"], str)
    assert written[1]["generation"] == PASS_PHRASE
    shown = shown_prompts(result.stderr)
    assert [shown[n + 1]["ids"] for n in range(3)] == [training_prompts["ids"][i] for i in chosen]


# ---------------------------------------------------------------- chat


def test_chat_keeps_the_conversation_and_reset_clears_it(merged_run):
    second = "And again?"
    stdin = f"{PASS_PHRASE_QUESTION}\n{second}\n/reset\n{PASS_PHRASE_QUESTION}\n/exit\nnever read\n"
    result = run_chat_cli(str(merged_run["run"]), "--show-prompt", "--max-new-tokens", "30", stdin=stdin)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr[-3000:]
    answers = re.findall(r"assistant> (.*)", result.stdout)
    assert len(answers) == 3, result.stdout
    assert answers[0] == answers[2] == PASS_PHRASE
    assert "(conversation cleared)" in result.stdout

    shown = shown_prompts(result.stderr)
    assert list(shown) == [1, 2, 3], "nothing after /exit is read"
    first = STARLING_PROMPT.format(PASS_PHRASE_QUESTION)
    assert shown[1]["text"] == first
    # The second turn re-renders the whole conversation: turn 1, its answer, end-of-turn tokens between turns.
    assert shown[2]["text"] == (
        f"<s>GPT4 Correct User: {PASS_PHRASE_QUESTION}{END_OF_TURN}GPT4 Correct Assistant: {answers[0]}{END_OF_TURN}"
        f"GPT4 Correct User: {second}{END_OF_TURN}GPT4 Correct Assistant:"
    )
    assert shown[2]["ids"][: len(shown[1]["ids"])] == shown[1]["ids"]
    # After /reset the conversation starts afresh.
    assert shown[3] == shown[1]


def test_chat_streams_to_the_given_stream_and_ends_at_end_of_input(merged_run):
    stdout = io.StringIO()
    code = infer.run_chat(
        str(merged_run["export"]),
        infer.GenerationOptions(max_new_tokens=30),
        stdin=io.StringIO(f"{PASS_PHRASE_QUESTION}\n"),
        stdout=stdout,
    )
    assert code == 0
    assert f"assistant> {PASS_PHRASE}\nyou> \n" in stdout.getvalue()


# ---------------------------------------------------------------- bad input: one line, nothing loaded


@pytest.mark.parametrize(
    "args, fragments",
    [
        pytest.param(["generate", "/no/such/run", "--prompt", "x"], ["/no/such/run", "no such"], id="missing-folder"),
        pytest.param(["chat", "/no/such/run"], ["/no/such/run", "no such"], id="chat-missing-folder"),
        pytest.param(["generate", str(REPO / "recipes"), "--prompt", "x"], ["not a run folder"], id="not-a-model"),
        pytest.param(["generate", "RUN"], ["--prompt", "--input-file"], id="no-prompt"),
        pytest.param(["generate", "RUN", "--prompt", "x", "--input-file", "FILE"], ["not both"], id="both"),
        pytest.param(["generate", "RUN", "--input-file", "FILE"], ["FILE:3", "malformed JSON line"], id="bad-jsonl"),
    ],
)
def test_generate_and_chat_input_errors(merged_run, tmp_path, args, fragments):
    bad = tmp_path / "rows.jsonl"
    bad.write_text(f'{{"instruction": "{PASS_PHRASE_QUESTION}"}}\n\n{{"instruction": "unclosed\n')
    args = [str(merged_run["run"]) if a == "RUN" else str(bad) if a == "FILE" else a for a in args]
    fragments = [f.replace("FILE", str(bad)) for f in fragments]
    assert_clean_error(run_cli(*args), *fragments)


@pytest.fixture
def copied_run(merged_run, tmp_path):
    """A run folder with the adapter and recipe only (no merged export), safe to edit."""
    run = tmp_path / "run"
    shutil.copytree(merged_run["run"] / "adapter", run / "adapter")
    shutil.copy(merged_run["run"] / "recipe.yaml", run / "recipe.yaml")
    return run


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(self, device=None):
        raise AssertionError("the model must not load when the input is wrong")

    monkeypatch.setattr(infer.InferenceModel, "load_weights", refuse)


def test_saved_chat_template_that_differs_from_the_recipe_is_refused(copied_run, no_weights):
    template = copied_run / "adapter" / "chat_template.jinja"
    template.write_text(template.read_text().replace("GPT4 Correct ", "GPT4 "))
    with pytest.raises(PipelineError, match="chat template is not the recipe's 'starling' template"):
        infer.run_generate(str(copied_run), prompts=[PASS_PHRASE_QUESTION])


def test_merged_without_an_export_is_refused(copied_run, no_weights):
    with pytest.raises(PipelineError, match="no merged export here; run `qlora-pipeline merge"):
        infer.run_generate(str(copied_run), prompts=["x"], merged=True)


@pytest.mark.parametrize(
    "line, message",
    [
        pytest.param('{"input": "only an input"}', "'instruction' is missing", id="no-instruction"),
        pytest.param('{"instruction": "  "}', "'instruction' is empty", id="empty-instruction"),
        pytest.param('{"instruction": "x", "input": 3}', "'input' must be text", id="input-not-text"),
        pytest.param('["x"]', "expected a JSON object", id="not-an-object"),
        pytest.param('{"messages": [{"role": "bot", "content": "x"}]}', "message 1 needs a role", id="bad-role"),
        pytest.param(
            '{"messages": [{"role": "assistant", "content": "x"}]}', "must end with a user turn", id="no-user-turn"
        ),
    ],
)
def test_bad_rows_are_named_by_line(merged_run, tmp_path, no_weights, line, message):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'{{"instruction": "fine"}}\n{line}\n')
    with pytest.raises(PipelineError, match=re.escape(f"{rows}:2: ") + ".*" + re.escape(message)):
        infer.run_generate(str(merged_run["export"]), input_file=str(rows))


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param({"do_sample": False, "temperature": 0.7}, "--temperature only applies to sampling"),
        pytest.param({"temperature": 0}, "--temperature must be above 0"),
        pytest.param({"top_p": 1.5}, "--top-p must be in"),
        pytest.param({"max_new_tokens": 0}, "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_generation_options(merged_run, no_weights, options, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        infer.run_generate(str(merged_run["export"]), prompts=["x"], options=infer.GenerationOptions(**options))


def test_sampling_options_imply_sampling():
    assert infer.GenerationOptions().sampling() is False
    assert infer.GenerationOptions(temperature=0.7).sampling() is True
    assert infer.GenerationOptions(do_sample=True).sampling() is True
