"""Generative QA (tasks/seq2seq.py, tiny_builders/t5.py): the answer metric against hand-computed cases, the features
(labels, -100 padding, truncation counted), the project-trained T5 tokenizer, a real tiny training run that beats its
own "before" on held-out questions, and the recipe on the real SQuAD rows (CI only)."""

from __future__ import annotations

import csv

import pytest
import yaml
from conftest import REPO, SHARED_DATA

from qlora_pipeline.errors import DataError, RecipeError
from qlora_pipeline.recipe import load_recipe
from qlora_pipeline.tasks import seq2seq
from qlora_pipeline.tasks.seq2seq import Seq2SeqTask, answer_scores

TINY_T5_RECIPE = REPO / "recipes" / "tiny-t5-generative-qa.yaml"
SQUAD_CSV = SHARED_DATA / "squad" / "context_question_answer.csv"
SAMPLE = REPO / "qlora_pipeline" / "data" / "samples" / "context_qa_sample.csv"


def _recipe(tmp_path, **changes):
    """The tiny T5 recipe with some keys changed (None removes one), its run folder under tmp_path."""
    values = yaml.safe_load(TINY_T5_RECIPE.read_text())
    values["output_dir"] = str(tmp_path / "run")
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return load_recipe(path)


def _csv(path, rows, header=("context", "question", "answer")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [
    ("Insulin is made by the beta cells of the pancreas.", "Which cells make insulin?", "the beta cells"),
    ("The femur, in the thigh, is the longest bone of the body.", "What is the longest bone?", "The femur"),
    ("Light travels at about 300,000 kilometers per second.", "How fast does light travel?", "about 300,000 km/s"),
    ("Bile is kept in the gallbladder.", "Where is bile kept?", "in the gallbladder"),
]


# ---------------------------------------------------------------- the metric, by hand


def test_identical_answers_score_100_and_disjoint_ones_0():
    assert answer_scores(["the beta cells"], ["the beta cells"]) == {
        "f1": 100.0,
        "exact_match": 100.0,
        "rougeL": 100.0,
        "n": 1,
    }
    assert answer_scores(["glucagon"], ["the beta cells"]) == {"f1": 0.0, "exact_match": 0.0, "rougeL": 0.0, "n": 1}


def test_rouge_l_on_a_partial_answer_by_hand():
    # ROUGE-L tokens (lower case, letters and digits; articles kept): prediction "the beta cells of the pancreas"
    # (6), gold "the beta cells" (3); longest common subsequence 3 → P = 3/6, R = 3/3, F = 2PR/(P+R) = 2/3.
    # Token F1 (SQuAD: articles dropped): "beta cells of pancreas" vs "beta cells" → P = 2/4, R = 1 → also 2/3.
    scores = answer_scores(["The beta cells of the pancreas."], ["the beta cells"])
    assert scores["rougeL"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(200 / 3)
    assert scores["exact_match"] == 0.0


def test_rouge_l_counts_order_where_token_f1_does_not():
    # Same bag of words, reversed: token F1 is 1; the longest common subsequence is one word → P = R = 1/2.
    scores = answer_scores(["cells beta"], ["beta cells"])
    assert scores["f1"] == pytest.approx(100.0)
    assert scores["rougeL"] == pytest.approx(50.0)


def test_scores_are_means_over_the_rows_in_percent():
    # Row 1 exact (1, 1, 1); row 2 disjoint (0, 0, 0); row 3 "insulin" vs "insulin resistance": F1 and ROUGE-L
    # both P = 1, R = 1/2 → 2/3, exact 0. Means: f1 = rougeL = (1 + 0 + 2/3) / 3 = 5/9; exact = 1/3.
    scores = answer_scores(["1980", "Jupiter", "insulin"], ["1980", "Mars", "insulin resistance"])
    assert scores["f1"] == pytest.approx(500 / 9)
    assert scores["rougeL"] == pytest.approx(500 / 9)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["n"] == 3


# ---------------------------------------------------------------- features


def test_labels_are_the_answer_ids_ending_with_eos_and_padding_becomes_minus_100(tmp_path):
    from transformers import DataCollatorForSeq2Seq

    data = _csv(tmp_path / "qa.csv", ROWS)
    recipe = _recipe(tmp_path, dataset_name=str(data), eval_split_size=0)
    prepared = Seq2SeqTask().prepare_data(recipe)
    tokenizer, dataset = prepared.tokenizer, prepared.train.dataset
    assert prepared.eval is None and prepared.eval_rows is None
    assert set(dataset.column_names) == {"input_ids", "attention_mask", "labels", "n_tokens"}
    by_answer = {tokenizer.decode(row["labels"], skip_special_tokens=True): row for row in dataset}
    for context, question, answer in ROWS:
        row = by_answer[answer]
        assert row["labels"] == tokenizer(text_target=answer)["input_ids"]
        assert row["labels"][-1] == tokenizer.eos_token_id == 1
        assert row["input_ids"] == tokenizer(f"question: {question} context: {context}")["input_ids"]
        assert row["n_tokens"] == len(row["input_ids"])  # nothing padded at tokenization
    # The collator pads each batch to its longest input (with <pad> = 0, masked) and longest answer (with -100).
    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest")([dataset[i] for i in range(len(dataset))])
    lengths = [len(row["labels"]) for row in dataset]
    assert batch["labels"].shape == (len(ROWS), max(lengths))
    for i, length in enumerate(lengths):
        assert batch["labels"][i, :length].tolist() == dataset[i]["labels"]
        assert (batch["labels"][i, length:] == -100).all()
        n = len(dataset[i]["input_ids"])
        assert batch["attention_mask"][i].sum() == n and (batch["input_ids"][i, n:] == 0).all()


def test_inputs_over_max_length_follow_overlong_and_are_counted(tmp_path):
    long_context = "The heart has four chambers. " * 20
    rows = [*ROWS, (long_context, "How many chambers does the heart have?", "four")]
    data = _csv(tmp_path / "qa.csv", rows)
    task = Seq2SeqTask()

    truncated = task.prepare_data(_recipe(tmp_path, dataset_name=str(data), eval_split_size=0, max_length=32))
    stats = truncated.train.stats()
    assert stats["examples"] == 5 and stats["overlong"] == 1 and stats["truncated"] == 1 and stats["dropped"] == 0
    assert stats["max"] > 32  # the data's own length, before truncation
    cut = [row for row in truncated.train.dataset if row["n_tokens"] > 32][0]
    assert len(cut["input_ids"]) == 32 and cut["input_ids"][-1] == 1  # cut by the tokenizer: </s> kept
    assert any("1 of 5 inputs over max_length 32 tokens: truncated" in note for note in truncated.notes)

    dropped = task.prepare_data(
        _recipe(tmp_path, dataset_name=str(data), eval_split_size=0, max_length=32, overlong="drop")
    )
    assert dropped.train.stats()["examples"] == 4 and dropped.train.dropped == 1
    assert dropped.accounting == {"rows_read": 5, "skipped": 0, "unused": 0, "repaired": {}}

    with pytest.raises(DataError, match=rf"{data}:6: input of \d+ tokens .* over max_length 32 \(overlong: error"):
        task.prepare_data(_recipe(tmp_path, dataset_name=str(data), eval_split_size=0, max_length=32, overlong="error"))


def test_answers_over_max_target_length_are_truncated_and_counted(tmp_path):
    data = _csv(tmp_path / "qa.csv", ROWS)
    prepared = Seq2SeqTask().prepare_data(
        _recipe(tmp_path, dataset_name=str(data), eval_split_size=0, max_target_length=3)
    )
    labels = prepared.train.dataset["labels"]
    assert max(len(ids) for ids in labels) == 3 and all(ids[-1] == 1 for ids in labels)
    cut = sum(1 for _, _, answer in ROWS if len(prepared.tokenizer(text_target=answer)["input_ids"]) > 3)
    assert cut >= 2 and prepared.train.truncated == 0  # `truncated` counts inputs; answers are in the notes
    assert any(f"{cut} of 4 answers over max_target_length 3 tokens: truncated" in n for n in prepared.notes)


def test_a_missing_column_or_an_empty_answer_is_named_before_any_model_loads(tmp_path):
    data = _csv(tmp_path / "qa.csv", [row[:2] for row in ROWS], header=("context", "question"))
    with pytest.raises(DataError, match=r"'answer'.*answer_column"):
        Seq2SeqTask().prepare_data(_recipe(tmp_path, dataset_name=str(data)))
    data = _csv(tmp_path / "empty.csv", [*ROWS[:2], (ROWS[2][0], ROWS[2][1], ""), ROWS[3]])
    with pytest.raises(DataError, match=rf"{data}:4: .*'answer'"):
        Seq2SeqTask().prepare_data(_recipe(tmp_path, dataset_name=str(data)))


def test_one_column_cannot_be_both_question_and_answer(tmp_path):
    with pytest.raises(RecipeError, match=r"key 'answer_column': names the same column as question_column"):
        _recipe(tmp_path, question_column="answer")


# ---------------------------------------------------------------- the embedded T5 and its tokenizer


@pytest.fixture(scope="module")
def tiny_t5(embedded_cache):
    from qlora_pipeline.model import tiny

    return tiny.resolve_model("embedded:tiny-t5")


def test_the_tiny_tokenizer_is_a_t5_tokenizer_with_t5s_layout(tiny_t5):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    assert type(tokenizer).__name__ == "T5Tokenizer"
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    # As in t5-base: the 100 sentinels close the vocabulary, <extra_id_0> last.
    assert sentinels == list(range(len(tokenizer) - 1, len(tokenizer) - 101, -1))
    assert tokenizer.convert_tokens_to_ids("<extra_id_100>") == tokenizer.unk_token_id
    assert tokenizer("The femur.")["input_ids"][-1] == 1  # </s> closes every encoded text


def test_the_tiny_tokenizer_round_trips_the_sample_text(tiny_t5):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    with open(SAMPLE, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    texts = [row[key] for row in rows[::10] for key in ("context", "question", "answer")]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Sentinels stay whole pieces inside text, as T5's span-corruption inputs use them.
    ids = tokenizer("Insulin is made by <extra_id_0> of the pancreas.")["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") in ids


def test_the_tokenizer_is_trained_the_same_every_time():
    from qlora_pipeline.model.tiny_builders.t5 import sample_texts, train_sentencepiece

    texts = list(sample_texts())
    assert any("beta cells" in text for text in texts)  # the context/QA sample is part of the corpus
    assert train_sentencepiece(texts) == train_sentencepiece(texts)


def test_the_tiny_model_is_t5_base_scaled_down(tiny_t5):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    config = model.config
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert (config.num_layers, config.num_decoder_layers, config.d_model) == (2, 2, 64)
    assert config.feed_forward_proj == "relu" and config.relative_attention_num_buckets == 32
    assert model.lm_head.weight is model.shared.weight  # tied, as t5-base
    assert config.vocab_size % 128 == 0 and config.vocab_size >= len(AutoTokenizer.from_pretrained(tiny_t5))
    assert (config.decoder_start_token_id, config.pad_token_id, config.eos_token_id) == (0, 0, 1)


def test_all_linear_lora_leaves_the_tied_output_layer_alone(tiny_t5):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules="all-linear", r=4))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q", "k", "v", "o", "wi", "wo"}


# ---------------------------------------------------------------- training, for real


class WeightWatch:
    """A TrainerCallback (duck-typed) that copies every parameter when training starts and compares at the end."""

    def __init__(self):
        self.start: dict = {}
        self.changed: dict[str, bool] = {}
        self.trainable: dict[str, bool] = {}

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for name, p in model.named_parameters():
            self.changed[name] = not bool((p.detach() == self.start[name]).all())
            self.trainable[name] = p.requires_grad


# Margins from the recipe as shipped, seeds 42, 1, 2, 3 (each seed also draws its own held-out 47 rows), measured
# through train.run (the numbers were the same on 1 and 2 CPU threads):
#   ROUGE-L before → after: 0 → 0.43, 0 → 5.44, 0 → 0.76, 0 → 4.41
#   token F1 before → after: 0 → 0.53, 0 → 1.77, 0 → 0,    0 → 0
#   eval loss before → after: 8.68 → 7.07, 8.70 → 6.89, 8.69 → 7.10, 8.73 → 7.32 (drops 1.62, 1.80, 1.59, 1.41)
# A random tiny T5 cannot read in a minute: it learns the answers' form and words (ROUGE-L counts "of", "the"), not
# where an answer is. So exact match and token F1 are asserted not to fall and to agree with each other, not to
# rise (token F1 0 for two seeds; it stays near 0 after 3,000 steps too; exact match 0 for every seed), as
# docs/recipe-t5-generative-qa.md says. The ROUGE-L and eval-loss margins are about half the smallest gains seen.
ROUGE_MARGIN = 0.25
EVAL_LOSS_MARGIN = 0.7


@pytest.mark.slow
def test_training_beats_the_untrained_model_on_held_out_questions(tmp_path):
    from qlora_pipeline.stages import train

    watch = WeightWatch()
    recipe = load_recipe(TINY_T5_RECIPE, ["--output_dir", str(tmp_path / "run")])
    summary = train.run(recipe, callbacks=[watch])

    before, after = summary["task_metrics"]["before"], summary["task_metrics"]["after"]
    assert after["n"] == before["n"] == summary["data"]["eval"]["examples"] > 0
    assert after["rougeL"] - before["rougeL"] >= ROUGE_MARGIN, (before, after)
    assert summary["eval_loss_before"] - summary["eval_loss_after"] >= EVAL_LOSS_MARGIN, summary
    for metrics in (before, after):
        # An exact answer has token F1 100, so the mean exact match cannot exceed the mean F1.
        assert 0 <= metrics["exact_match"] <= metrics["f1"] <= 100, metrics
    assert after["exact_match"] >= before["exact_match"] and after["f1"] >= before["f1"], (before, after)
    assert after["exact_match"] < 10, "it answers exactly now: update the docs' claim"
    # The base stays as it was (its 4-bit weights included); every LoRA B matrix moved.
    frozen = [name for name, trainable in watch.trainable.items() if not trainable]
    assert any(".base_layer." in name for name in frozen) and not any(watch.changed[name] for name in frozen)
    lora_b = [name for name in watch.changed if "lora_B" in name]
    # 2 encoder layers x (q, k, v, o, wi, wo) + 2 decoder layers x (self q, k, v, o, cross q, k, v, o, wi, wo)
    assert len(lora_b) == 32 and all(watch.changed[name] for name in lora_b)
    table = (tmp_path / "run" / "evaluation.md").read_text()
    assert "| **f1** |" in table and "| **exact_match** |" in table and "| **rougeL** |" in table


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not SQUAD_CSV.is_file(), reason="../shared/data is not here (it is in CI, not in a fresh clone)")
def test_the_recipe_runs_on_the_real_squad_rows(tmp_path):
    from qlora_pipeline.stages import train

    overrides = ["--dataset_name", str(SQUAD_CSV), "--output_dir", str(tmp_path / "run")]
    overrides += ["--max_train_samples", "128", "--max_eval_samples", "32", "--num_train_epochs", "1"]
    overrides += ["--max_length", "384", "--eval_strategy", "no"]
    recipe = load_recipe(TINY_T5_RECIPE, overrides)
    summary = train.run(recipe)

    assert summary["data"]["rows_read"] == 2910  # every row of the file was read and checked
    assert any("'title'" in note and "not used" in note for note in summary["notes"])
    after = summary["task_metrics"]["after"]
    assert after["n"] == 32 and set(seq2seq.METRIC_NAMES) <= set(after)
    assert all(0 <= after[name] <= 100 for name in seq2seq.METRIC_NAMES)
    table = (tmp_path / "run" / "evaluation.md").read_text()
    assert "| **f1** |" in table and "| **rougeL** |" in table
