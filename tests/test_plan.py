"""The memory planner (`qlora-pipeline plan`, `qlora_pipeline.plan`): counts checked by hand, offline, no training.

Each plan builds the model on the meta device (seconds for Starling-7B, no weights, no network). Whether the
predictions match measured memory is the throughput benchmark's business (benchmarks/throughput.py records the
prediction beside the measurement; docs/performance.md has the calibration), not a unit test's.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from conftest import REPO, SHARED_DATA, TINY_RECIPE, assert_clean_error, write_recipe

from qlora_pipeline import plan
from qlora_pipeline.recipe import load_recipe

STARLING_RECIPE = REPO / "recipes" / "starling-7b-medtuned-qlora.yaml"
# The recipe leaves checkpointing and the batch to the planner (`auto`, tests/test_auto_settings.py); the hand-computed
# rows are for the tutorial's 4 rows x 512 tokens with checkpointing.
TUTORIAL_BATCH = ["--per_device_train_batch_size", "4", "--gradient_checkpointing", "true"]
STARLING_CONFIG = SHARED_DATA / "starling-config" / "config.json"

# Starling-LM-7B-alpha (Mistral-7B): 32 layers of q, k, v, o, gate, up, down as (out, in).
HIDDEN, FFN, LAYERS, KV_WIDTH, VOCAB = 4096, 14336, 32, 8 * 128, 32002
LAYER_LINEARS = [(HIDDEN, HIDDEN), (KV_WIDTH, HIDDEN), (KV_WIDTH, HIDDEN), (HIDDEN, HIDDEN)] + [
    (FFN, HIDDEN),
    (FFN, HIDDEN),
    (HIDDEN, FFN),
]
LINEAR_PARAMS = LAYERS * sum(out * inp for out, inp in LAYER_LINEARS)
OTHER_PARAMS = 2 * VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # embeddings, lm_head, norms
LORA_PARAMS = LAYERS * sum(8 * (out + inp) for out, inp in LAYER_LINEARS)


def nf4_double_quant_bytes(out: int, inp: int) -> int:
    """4 bits a weight, an 8-bit absmax per 64 weights, a float32 absmax per 256 of those."""
    blocks = out * inp // 64
    return out * inp // 2 + blocks + 4 * math.ceil(blocks / 256)


@pytest.fixture(scope="module")
def starling():
    """The Starling recipe and its model facts on a GPU, as the recipe writes its precision (fp16, float16)."""
    recipe = load_recipe(STARLING_RECIPE, TUTORIAL_BATCH)
    return recipe, plan.model_facts(recipe, plan.precision_for(recipe, "cuda"))


@pytest.fixture
def tiny_plan_recipe(tmp_path):
    return write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"))


# ---------------------------------------------------------------- Starling-7B, offline, by hand


def test_starling_counts_match_the_architecture(starling):
    recipe, facts = starling
    assert facts.quantization == "nf4 + double quant"
    assert facts.quantized_parameters == LINEAR_PARAMS == 6_979_321_856  # every Linear but lm_head
    assert facts.other_parameters == OTHER_PARAMS
    assert sum(numel for _, numel in facts.trainable) == LORA_PARAMS == 20_971_520
    assert facts.trainable_dtype == "bfloat16"  # TRL's QLoRA cast, with fp16/bf16 compute on the GPU


def test_starling_rows_match_hand_computed_values(starling):
    recipe, facts = starling
    result = plan.plan_from_facts(facts, recipe)
    assert (result.device, result.weights_dtype, result.mixed_precision) == ("cuda", "float16", "float16")
    assert result.quantized_weights == LAYERS * sum(nf4_double_quant_bytes(*shape) for shape in LAYER_LINEARS)
    assert result.other_weights == 2 * OTHER_PARAMS  # 16-bit embeddings, head and norms, as loaded
    assert result.kbit_upcast == 2 * OTHER_PARAMS  # then float32 after prepare_model_for_kbit_training
    weights = (result.quantized_weights + result.other_weights) / plan.GIB
    assert 3.80 < weights < 3.90  # the "about 3.85 GiB"
    assert result.lora_weights == result.gradients == 2 * LORA_PARAMS  # bfloat16
    assert result.optimizer_states == 2 * 4 * LORA_PARAMS  # paged_adamw_32bit: two float32 states
    # The data is on the Hub, so it is not read: every position counts as labelled (an upper bound). The float32 head
    # is copied to float16 by autocast.
    assert result.labelled_fraction == 1.0 and "assumed" in result.labelled_source
    assert result.scored_positions == 4 * 511
    assert result.logits == 4 * 511 * VOCAB * 20 + VOCAB * HIDDEN * 2
    assert result.cuda_context == plan.CUDA_CONTEXT and result.step_overhead == 0
    assert result.total == sum(getattr(result, row) for row in plan.MemoryPlan.ROWS)
    assert result.training_growth == (result.gradients + result.optimizer_states + result.activations + result.logits)


def test_starling_on_this_cpu_plans_float32(starling):
    recipe, _ = starling
    result = plan.predict(recipe, device="cpu", labelled_fraction=0.5)
    assert (result.weights_dtype, result.mixed_precision) == ("float32", None)
    assert result.other_weights == 4 * OTHER_PARAMS and result.kbit_upcast == 0
    assert result.lora_weights == 4 * LORA_PARAMS  # the pipeline keeps the adapter in float32 for float32 compute
    assert result.step_overhead == plan.CPU_STEP_OVERHEAD and result.cuda_context == 0
    assert result.scored_positions == 4 * math.ceil(511 * 0.5)


@pytest.mark.shared_data
@pytest.mark.skipif(not STARLING_CONFIG.is_file(), reason="needs ../shared/data/starling-config")
def test_shipped_starling_config_equals_the_real_one():
    shipped = json.loads(plan.shipped_config_path("berkeley-nest/Starling-LM-7B-alpha").read_text())
    assert shipped == json.loads(STARLING_CONFIG.read_text())


# ---------------------------------------------------------------- batch, checkpointing, budget


def test_largest_batch_fits_and_one_more_does_not(starling):
    recipe, facts = starling
    budget = 12 * plan.GIB
    largest = plan.largest_batch_size(facts, recipe, budget)
    assert largest >= 1
    assert plan.plan_from_facts(facts, recipe, batch_size=largest).total <= budget
    assert plan.plan_from_facts(facts, recipe, batch_size=largest + 1).total > budget
    assert plan.largest_batch_size(facts, recipe, plan.GIB) == 0  # not even the 4-bit weights fit


def test_gradient_checkpointing_off_predicts_more_activations(starling):
    recipe, facts = starling
    without = copy.copy(recipe)
    without.training = copy.copy(recipe.training)
    without.training.gradient_checkpointing = False
    on = plan.plan_from_facts(facts, recipe)
    off = plan.plan_from_facts(facts, without)
    assert off.activations > 5 * on.activations  # every layer's intermediates instead of one checkpoint a layer
    assert off.logits == on.logits and off.optimizer_states == on.optimizer_states


def test_longer_sequences_and_bigger_batches_cost_more(starling):
    recipe, facts = starling
    base = plan.plan_from_facts(facts, recipe)
    assert plan.plan_from_facts(facts, recipe, max_length=1024).training_growth > base.training_growth
    assert plan.plan_from_facts(facts, recipe, batch_size=8).training_growth > base.training_growth
    assert plan.plan_from_facts(facts, recipe, batch_size=8).loaded_model == base.loaded_model


def test_labelled_share_is_read_from_local_data(tiny_plan_recipe):
    result = plan.predict(load_recipe(tiny_plan_recipe), device="cpu")
    assert "worst of the run's" in result.labelled_source and "(90% confidence)" in result.labelled_source
    assert 0 < result.labelled_fraction < 1  # the MedTuned sample's answers are a fraction of each row
    full = plan.predict(load_recipe(tiny_plan_recipe), device="cpu", labelled_fraction=1.0)
    assert full.logits > result.logits


@pytest.mark.parametrize(
    "text, size",
    [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9), ("16000MiB", 16000 * 2**20), ("1.5 gib", int(1.5 * 2**30))],
)
def test_gpu_memory_sizes(text, size):
    assert plan.parse_size(text) == size


# ---------------------------------------------------------------- the command


def test_plan_fits_in_12gib_not_in_2gib(cli_in_process):
    # Starling-7B at batch 4 x 512 plans at about 8.8 GiB with every position labelled (the upper bound it takes
    # when the data is not read), the recipe's "about 10 GiB"
    fits = cli_in_process("plan", str(STARLING_RECIPE), "--gpu-memory", "12GiB", *TUTORIAL_BATCH)
    assert fits.returncode == 0, fits.stderr
    assert "fits" in fits.stdout and "quantized linear weights (NF4 + double quant" in fits.stdout
    assert "largest per-device batch that fits:" in fits.stdout
    short = cli_in_process("plan", str(STARLING_RECIPE), "--gpu-memory", "2GiB", *TUTORIAL_BATCH)
    assert short.returncode == 1, short.stderr
    assert "does NOT fit" in short.stdout and "none, even batch 1" in short.stdout


def test_plan_json_parses(cli_in_process, tiny_plan_recipe):
    result = cli_in_process(
        "plan", str(tiny_plan_recipe), "--json", "--gpu-memory", "16000MiB", "--labelled-fraction", "0.5"
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["total"] == sum(values[row] for row in plan.MemoryPlan.ROWS)
    assert values["training_growth"] < values["total"]
    assert values["fits"] is True and values["largest_batch_size"] >= values["batch_size"] == 2
    assert values["gpu_memory"] == 16000 * 2**20 and values["labelled_fraction"] == 0.5


def test_plan_takes_recipe_overrides(cli_in_process, tiny_plan_recipe):
    result = cli_in_process("plan", str(tiny_plan_recipe), "--json", "--labelled-fraction", "1", "--max_length", "256")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["max_length"] == 256


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["no-such-recipe.yaml"], "recipe file not found"),
        ([str(TINY_RECIPE), "--no_such_key", "1"], "unknown option"),
        ([str(TINY_RECIPE), "--gpu-memory", "lots"], "--gpu-memory"),
        ([str(TINY_RECIPE), "--gpu-memory", "24"], "--gpu-memory"),
        ([str(TINY_RECIPE), "--batch-size", "0"], "--batch-size"),
        ([str(TINY_RECIPE), "--labelled-fraction", "1.5"], "--labelled-fraction"),
    ],
)
def test_bad_input_is_one_error_line(cli_in_process, args, fragment):
    result = cli_in_process("plan", *args)
    assert result.returncode == 2
    assert_clean_error(result, fragment)


def test_the_worst_batch_is_planned_at_its_confidence_not_its_expectation():
    from qlora_pipeline.plan.label_share import worst_of

    samples = list(range(1, 101))  # one batch's labelled columns: 1..100, equally likely
    assert worst_of(samples, 1, 0.9) == 90  # one batch: its 90th percentile
    # Five batches: the largest stays at or under x with probability (x/100)^5 >= 0.9, so x = 98 (0.98^5 = 0.904).
    assert worst_of(samples, 5, 0.9) == 98
    assert worst_of(samples, 1000, 0.9) == 100  # a long run meets the worst batch the data has
    # A heavy tail (9 in 10 batches light): the expected maximum of 5 (about 47) would be exceeded about 4 times in 10.
    tail = [10] * 90 + [100] * 10
    assert worst_of(tail, 5, 0.9) == 100
