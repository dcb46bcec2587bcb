"""Templates and the embedded tokenizer, without a model."""

from __future__ import annotations

import shutil

import pytest
from conftest import SHARED_DATA
from transformers import AutoTokenizer

from qlora_pipeline.data.templates import STARLING_CHAT_TEMPLATE, PromptTemplate, get_template
from qlora_pipeline.errors import DataError
from qlora_pipeline.model import tiny


@pytest.fixture(scope="module")
def starling_tokenizer():
    return AutoTokenizer.from_pretrained(tiny.resolve_model("embedded:tiny-starling"))


def test_starling_format_is_openchat(starling_tokenizer):
    prompt, completion = get_template("starling").prompt_and_completion(
        starling_tokenizer, "Classify the relation.", "GENE causes DISEASE.", "Positive"
    )
    assert (
        prompt
        == "<s>GPT4 Correct User: Classify the relation.\n\nGENE causes DISEASE.<|end_of_turn|>GPT4 Correct Assistant:"
    )
    assert completion == " Positive<|end_of_turn|>"


def test_alpaca_format_ends_with_eos(starling_tokenizer):
    prompt, completion = get_template("alpaca").prompt_and_completion(starling_tokenizer, "Say hi.", "", "Hi")
    assert prompt.startswith("<s>Below is an instruction") and prompt.endswith(
        "### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert "### Input" not in prompt, "an empty input leaves the input section out"
    assert completion == "Hi" + starling_tokenizer.eos_token


def test_a_template_that_cannot_mask_is_rejected(starling_tokenizer):
    # Renders the generation prompt differently from the start of the assistant turn: no prompt/answer boundary.
    broken = PromptTemplate(
        "tokenizer",
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT >>' }}{% endif %}",
        "\n\n",
        None,
    )
    with pytest.raises(DataError, match="cannot be masked"):
        broken.prompt_and_completion(starling_tokenizer, "q", "", "a")


def test_tokenizer_template_needs_a_chat_template(starling_tokenizer):
    bare = AutoTokenizer.from_pretrained(tiny.resolve_model("embedded:tiny-starling"))
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat_template"):
        get_template("tokenizer").prompt_and_completion(bare, "q", "", "a")


def test_embedded_tokenizer_ships_starlings_tokens_and_trap(starling_tokenizer):
    tok = starling_tokenizer
    assert len(tok) == 32002
    assert tok.convert_tokens_to_ids("<|end_of_turn|>") == 32000 and tok.convert_tokens_to_ids("<|pad_0|>") == 32001
    assert tok.eos_token == "<|end_of_turn|>" and tok.pad_token == tok.eos_token, "as Starling ships it"
    assert tok.chat_template == STARLING_CHAT_TEMPLATE


STARLING_CONFIG = SHARED_DATA / "starling-config"


@pytest.mark.shared_data
@pytest.mark.skipif(
    not STARLING_CONFIG.is_dir(), reason="../shared/data is not here (it is in CI, not in a fresh clone)"
)
def test_embedded_tokenizer_matches_starlings_own_files(tmp_path, starling_tokenizer):
    """Starling's real tokenizer files + the SentencePiece model give the same ids as the embedded tokenizer."""
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(STARLING_CONFIG / name, tmp_path / name)
    shutil.copy(SHARED_DATA / "tokenizers" / "mistral" / "tokenizer.model", tmp_path / "tokenizer.model")
    real = AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [
        {"role": "user", "content": "Is @GENE$ linked to @DISEASE$ here? Ünïcode, 12.5 mg/dL\n\nnew paragraph"},
        {"role": "assistant", "content": "Positive"},
    ]
    for add_generation_prompt, turns in ((True, messages[:1]), (False, messages)):
        expected = real.apply_chat_template(
            turns, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        got = starling_tokenizer.apply_chat_template(
            turns, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
        )
        assert list(got) == list(expected)
    assert real.chat_template == starling_tokenizer.chat_template


# ---------------------------------------------------------------- the Ollama Modelfile's pieces (local_runtimes)

CONVERSATION = [
    {"role": "user", "content": "Name the gene."},
    {"role": "assistant", "content": "BRCA1"},
    {"role": "user", "content": "Is it a tumour suppressor?"},
]


@pytest.mark.parametrize("name", ["starling", "alpaca"])
def test_modelfile_pieces_rebuild_the_training_text_of_a_conversation(starling_tokenizer, name):
    from qlora_pipeline.local_runtimes import modelfile

    template = get_template(name)

    def render(messages, generation_prompt):
        return template.render(starling_tokenizer, messages, generation_prompt)

    bos = modelfile.leading_bos(render, starling_tokenizer.bos_token)
    pieces = modelfile.turn_text(render, bos, name)
    assert bos == "<s>" and pieces.render(CONVERSATION) == render(CONVERSATION, True)
    go = modelfile.go_template(pieces)
    assert "<s>" not in go, "llama.cpp adds the BOS token from the file, as training had it"
    assert (pieces.system is not None) == (name == "starling"), "Starling writes a system turn, alpaca drops it"


def test_a_template_that_is_not_one_wrapper_per_role_gets_no_modelfile(starling_tokenizer):
    """A template that numbers the turns cannot be a fixed Go template: refused, not approximated."""
    from qlora_pipeline.errors import PipelineError
    from qlora_pipeline.local_runtimes import modelfile

    numbered = PromptTemplate(
        "numbered",
        "{{ bos_token }}{% for m in messages %}Turn {{ loop.index }} {{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}Turn next assistant:{% endif %}",
        "\n\n",
        None,
    )

    def render(messages, generation_prompt):
        return numbered.render(starling_tokenizer, messages, generation_prompt)

    with pytest.raises(PipelineError, match="cannot be written as an Ollama template"):
        modelfile.turn_text(render, modelfile.leading_bos(render, "<s>"), "numbered")
