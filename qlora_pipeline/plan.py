"""Memory planner: the peak memory of a training run, predicted from the recipe and the model's config alone.

The model is built on the `meta` device (shapes, no weights, no download), quantized and wrapped in LoRA on paper
as `modeling.py` would do it for real, and each part of a training step is counted:

  quantized linear weights   every nn.Linear but the output head, as bitsandbytes stores it (4-bit: two values a
                             byte + one absmax per 64-value block, itself 8-bit with double quant; 8-bit: int8 + a
                             float32 scale per row), or in the load dtype when nothing is quantized
  other weights              embeddings, norms, lm_head: in the load dtype
  fp32 upcast                peft's prepare_model_for_kbit_training casts those to float32 under 4/8-bit
  LoRA adapter               r x (in + out) per targeted Linear: bfloat16 under 4/8-bit (TRL's cast), except
                             float32 where the 4-bit layers compute in float32 (the pipeline's CPU choice)
  gradients                  one per trainable parameter, in its dtype
  optimizer states           per the recipe's `optim` (AdamW 32-bit: 2 x float32 a parameter; 8-bit: 2 x 1 byte)
  activations                what autograd keeps for the backward pass (all layers, or one checkpoint per layer +
                             one recomputed layer with gradient checkpointing), the attention masks, the final norm
  logits                     the loss's [positions, vocab] buffers at their peak (see `logits_buffer_bytes`), for
                             the positions the loss keeps: those with a label, whose share is read from the recipe's
                             data where it is local (`estimate_label_share`), else taken as 1 (an upper bound)
  freed activations kept     on CPU, what glibc's malloc keeps resident of each layer's freed tensors
  step overhead / CUDA context   what the runtime adds (calibrated on CPU; assumed on CUDA)

`predict(recipe)` returns a `MemoryPlan`; `qlora-pipeline plan RECIPE` prints it. Calibration and the exact
definitions are in docs/performance.md ("Memory planner").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qlora_pipeline import modeling, tiny
from qlora_pipeline.errors import PipelineError

KIB, MIB, GIB = 2**10, 2**20, 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit): one absmax per block of 64 values; with double
# quantization (use_bnb_nested_quant) the absmax values are themselves 8-bit, with a float32 absmax per 256 of them.
NF4_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# bitsandbytes 8-bit optimizers keep 32-bit states for tensors smaller than this (Optimizer8bit min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096

# TRL's chunked log-prob loss (trl.kernels.chunked_logprob): tiles of this many positions x this many vocab columns.
LOSS_TOKEN_TILE = 4096
LOSS_VOCAB_TILE = 32768
# The labelled share is estimated from this many examples of the recipe's data, in this many random batches.
LABEL_SAMPLE_EXAMPLES = 2000
LABEL_SAMPLE_BATCHES = 2048

# What the runtime adds beyond tensors. On CPU: the growth of a batch of 1 x 128 tokens less the tensors counted for it
# (docs/performance.md): code pages faulted in by the first backward, autograd and allocator bookkeeping.
CPU_STEP_OVERHEAD = 64 * MIB
# On CUDA: the context and cuBLAS workspaces. An assumption (not calibrated here, no GPU): typical of torch 2.x on a
# recent data-centre GPU. It counts against --gpu-memory but is not part of torch.cuda.max_memory_allocated.
CUDA_CONTEXT = 512 * MIB

# Optimizer states per trainable parameter: (number of states, bytes each; None = the parameter's own dtype).
# bitsandbytes optimizers (8bit, paged, *_bnb) keep float32 states in 32-bit mode; torch's in the parameter's dtype.
OPTIMIZER_STATES = {
    "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None),
    "adamw_torch_xla": (2, None),
    "adamw_torch_npu_fused": (2, None),
    "adamw_anyprecision": (2, None),
    "stable_adamw": (2, None),
    "grokadamw": (2, None),
    "schedule_free_adamw": (2, None),
    "schedule_free_radam": (2, None),
    "adamw_torch_8bit": (2, 1),
    "adamw_torch_4bit": (2, 0.5),
    "adamw_bnb_8bit": (2, 1),
    "adamw_8bit": (2, 1),
    "paged_adamw_8bit": (2, 1),
    "paged_adamw_32bit": (2, 4),
    "ademamix": (3, None),
    "ademamix_8bit": (3, 1),
    "paged_ademamix_8bit": (3, 1),
    "paged_ademamix_32bit": (3, 4),
    "lion_8bit": (1, 1),
    "paged_lion_8bit": (1, 1),
    "lion_32bit": (1, 4),
    "paged_lion_32bit": (1, 4),
    "sgd": (0, None),
    "adagrad": (1, None),
    "rmsprop": (1, None),
    "rmsprop_bnb": (1, 4),
    "rmsprop_bnb_32bit": (1, 4),
    "rmsprop_bnb_8bit": (1, 1),
    "adafactor": (1, 4),  # factored in truth (rows + columns): counting it whole is an upper bound
}
ASSUMED_OPTIMIZER_STATES = (2, 4)

# ---------------------------------------------------------------------------------------------- the result


@dataclass
class MemoryPlan:
    """Predicted peak memory of one training process, in bytes, one field per component.

    `total` is what the device must hold at the peak of a training step: every row added up.
    `loaded_model` is what is in memory once the model is loaded, quantized and wrapped in LoRA, before training.
    `training_growth` is what the training step adds on top of that: gradients, optimizer states, activations, logits
    and (on CPU) the step overhead. It is meant to be compared with the measured growth of memory over training:
      on CPU, the process's peak resident set during `trainer.train()` (sampled from /proc/self/statm, or
      ru_maxrss) minus its resident set right before `trainer.train()` is called (model loaded, trainer built);
      on CUDA, torch.cuda.max_memory_allocated() during training minus torch.cuda.memory_allocated() right before it.
    """

    quantized_weights: int
    other_weights: int
    kbit_upcast: int
    lora_weights: int
    gradients: int
    optimizer_states: int
    activations: int
    logits: int
    allocator_retention: int
    step_overhead: int
    cuda_context: int
    # What was planned: the settings and counts the rows come from.
    device: str
    model: str
    config_source: str
    batch_size: int
    max_length: int
    tokens_per_batch: int
    scored_positions: int
    labelled_fraction: float
    labelled_source: str
    vocab: int
    gradient_checkpointing: bool
    quantization: str
    weights_dtype: str
    mixed_precision: str | None
    optimizer: str
    loss_kernel: str
    parameters: int
    quantized_parameters: int
    other_parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)

    ROWS = (
        "quantized_weights",
        "other_weights",
        "kbit_upcast",
        "lora_weights",
        "gradients",
        "optimizer_states",
        "activations",
        "logits",
        "allocator_retention",
        "step_overhead",
        "cuda_context",
    )
    GROWTH_ROWS = ("gradients", "optimizer_states", "activations", "logits", "allocator_retention", "step_overhead")

    @property
    def total(self) -> int:
        return sum(getattr(self, row) for row in self.ROWS)

    @property
    def training_growth(self) -> int:
        return sum(getattr(self, row) for row in self.GROWTH_ROWS)

    @property
    def loaded_model(self) -> int:
        return self.total - self.training_growth

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.update(total=self.total, loaded_model=self.loaded_model, training_growth=self.training_growth)
        return values


# ---------------------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """The dtypes a run uses on its device: what the recipe says, as load_recipe adapts it on a CPU."""

    device: str  # "cpu" or "cuda"
    weights_dtype: str  # non-quantized weights as loaded (float32/float16/bfloat16)
    mixed: str | None  # autocast dtype on CUDA (float16/bfloat16), None without mixed precision
    bnb_compute_dtype: str  # dtype 4-bit layers compute in

    @property
    def autocast(self) -> bool:
        return self.mixed is not None


def this_machine() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_for(recipe, device: str) -> Precision:
    """The dtypes of a run of `recipe` on `device`. On "cuda" the recipe's precision keys are taken as written
    (`Recipe.written`), since on a machine without CUDA load_recipe has already turned them into the CPU's."""
    if device == "cuda":
        fp16, bf16 = bool(recipe.written("fp16")), bool(recipe.written("bf16"))
        mixed = "bfloat16" if bf16 else "float16" if fp16 else None
        weights = recipe.written("dtype")
        compute = recipe.written("bnb_4bit_compute_dtype") or mixed or "float32"
    else:  # what config._adapt_to_hardware does without CUDA: no mixed precision, 16-bit weights load in float32
        mixed = None
        weights = recipe.model.dtype
        weights = "float32" if weights in ("float16", "bfloat16") else weights
        compute = recipe.model.bnb_4bit_compute_dtype or "float32"
    return Precision(device, weights or "float32", mixed, compute)


# ---------------------------------------------------------------------------------------------- the model


def shipped_config_path(model_id: str):
    """The architecture values shipped for a Hub model, for planning without network: model_configs/OWNER--NAME.json."""
    return resources.files("qlora_pipeline.model_configs").joinpath(model_id.replace("/", "--") + ".json")


def load_model_config(model_args, trust_remote_code: bool = False):
    """The model's config and where it came from: an embedded model, a local folder, the Hugging Face cache, the
    values shipped in qlora_pipeline/model_configs, or the Hub, in that order. No weights are read."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    revision = model_args.model_revision
    if tiny.is_embedded(name) or Path(name).expanduser().is_dir():
        folder = modeling.resolve_model_path(name)
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), f"{folder}/config.json"
    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, local_files_only=True, trust_remote_code=trust_remote_code
        )
        return config, "the Hugging Face cache"
    except (OSError, ValueError):
        pass
    shipped = shipped_config_path(name)
    if shipped.is_file():
        values = json.loads(shipped.read_text(encoding="utf-8"))
        # Shipped values equal the Hub's (tests/test_plan.py checks them), so no network round trip is needed.
        return AutoConfig.for_model(**values), f"qlora_pipeline/model_configs/{shipped.name}"
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code), "the Hub"
    except Exception as exc:
        raise PipelineError(
            f"{name}: no config in the Hugging Face cache or in qlora_pipeline/model_configs, and the Hub could not "
            f"give one: {modeling.first_line(exc)}"
        ) from None


def meta_model(config, trust_remote_code: bool = False):
    """The causal LM with every tensor on the meta device: shapes and module names, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


@dataclass
class LoraModule:
    name: str
    in_features: int


@dataclass
class ModelFacts:
    """Everything about the model the plan needs, counted once (building a 7B meta model takes seconds)."""

    name: str
    config_source: str
    architecture: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    precision: Precision
    quantization: str  # "nf4 + double quant", "fp4", "int8" or "none"
    parameters: int
    quantized_shapes: list[tuple[int, int]]  # (out, in) of each Linear bitsandbytes quantizes (or would)
    other_parameters: int
    trainable: list[tuple[str, int]]  # (name, numel) of each trainable parameter
    trainable_dtype: str
    lora_modules: list[LoraModule]
    lora_dropout: float
    attention: str  # the recipe's attn_implementation
    # Which positions of the recipe's training rows carry a label, by max_length, once read (estimate_label_share).
    labelled_rows: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized_parameters(self) -> int:
        return sum(out * inp for out, inp in self.quantized_shapes)


def model_facts(recipe, precision: Precision) -> ModelFacts:
    """Build the model on the meta device, find which Linear layers bitsandbytes would quantize and which LoRA would
    wrap, and count them."""
    import torch.nn as nn

    trust = bool(recipe.training.trust_remote_code)
    config, source = load_model_config(recipe.model, trust)
    model = meta_model(config, trust)
    if precision.weights_dtype == "auto":  # the checkpoint's own dtype
        precision = dataclasses.replace(precision, weights_dtype=checkpoint_dtype(config))
    quantization = quantization_name(recipe.model)
    # The Linear layers bitsandbytes quantizes under 4/8-bit (without quantization they stay in the load dtype, but
    # are listed the same way, so the "other" row is the embeddings, norms and head either way).
    skipped = modules_bnb_skips(model)
    quantized_shapes = [
        (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not is_skipped(name, skipped)
    ]
    parameters = sum(p.numel() for p in model.parameters())
    quantized_parameters = sum(out * inp for out, inp in quantized_shapes)
    text = config.get_text_config()
    heads = text.num_attention_heads
    facts = ModelFacts(
        name=recipe.model.model_name_or_path,
        config_source=source,
        architecture=type(model).__name__,
        hidden=text.hidden_size,
        ffn=getattr(text, "intermediate_size", 4 * text.hidden_size),
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        precision=precision,
        quantization=quantization,
        parameters=parameters,
        quantized_shapes=quantized_shapes,
        other_parameters=parameters - quantized_parameters,
        trainable=[],
        trainable_dtype="float32",
        lora_modules=[],
        lora_dropout=float(recipe.model.lora_dropout or 0.0) if recipe.model.use_peft else 0.0,
        attention=recipe.model.attn_implementation or "sdpa",
    )
    add_trainable(facts, model, recipe.model)
    if model_type_not_decoder_like(text):
        facts.notes.append(
            f"activations are counted for a Llama/Mistral-style decoder layer; {type(model).__name__} may differ"
        )
    return facts


def checkpoint_dtype(config) -> str:
    """dtype: auto loads the checkpoint's dtype (config.json's torch_dtype/dtype), float32 if it names none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPE_BYTES else "float32"


def quantization_name(model_args) -> str:
    if model_args.load_in_4bit:
        kind = model_args.bnb_4bit_quant_type or "nf4"
        return f"{kind} + double quant" if model_args.use_bnb_nested_quant else kind
    return "int8" if model_args.load_in_8bit else "none"


def modules_bnb_skips(model) -> set[str]:
    """The modules transformers' bitsandbytes quantizer leaves unquantized: the output head (and anything tied to
    it or registered last), plus the model's _keep_in_fp32_modules (the recipe sets no llm_int8_skip_modules)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    return set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ())


def is_skipped(name: str, skipped: set[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(name, list(skipped))


def add_trainable(facts: ModelFacts, model, model_args) -> None:
    """The trainable parameters and LoRA-wrapped modules, by wrapping the meta model exactly as training does."""
    import torch

    if not model_args.use_peft:  # full fine-tuning: every weight trains, in the dtype it loaded in
        facts.trainable = [(name, p.numel()) for name, p in model.named_parameters()]
        facts.trainable_dtype = facts.precision.weights_dtype
        return
    from peft.tuners.lora import LoraLayer

    with torch.device("meta"):
        wrapped = modeling.add_lora(model, model_args)
    facts.trainable = [(name, p.numel()) for name, p in wrapped.named_parameters() if p.requires_grad]
    facts.lora_modules = [
        LoraModule(name, module.in_features)
        for name, module in wrapped.named_modules()
        if isinstance(module, LoraLayer)
    ]
    facts.trainable_dtype = adapter_dtype(facts)


def adapter_dtype(facts: ModelFacts) -> str:
    """Under 4/8-bit, SFTTrainer casts the trainable parameters to bfloat16 (QLoRA paper), and the pipeline casts them
    back to float32 where the 4-bit layers compute in float32 (train.match_adapter_to_compute_dtype). Otherwise
    peft keeps the adapter in float32 (autocast_adapter_dtype)."""
    if facts.quantization == "none":
        return "float32"
    four_bit_in_float32 = facts.quantization != "int8" and facts.precision.bnb_compute_dtype == "float32"
    return "float32" if four_bit_in_float32 else "bfloat16"


def model_type_not_decoder_like(text_config) -> bool:
    return getattr(text_config, "model_type", "") not in ("mistral", "llama", "qwen2", "qwen3", "gemma", "phi3")


# ---------------------------------------------------------------------------------------------- weights


def quantized_linear_bytes(shapes: list[tuple[int, int]], quantization: str, weights_dtype: str) -> int:
    """Bytes bitsandbytes stores for the quantized Linear weights (code tables of ~100 bytes per layer left out)."""
    if quantization == "int8":  # int8 weights + a float32 scale per output row (SCB)
        return sum(out * inp + 4 * out for out, inp in shapes)
    if quantization == "none":
        return sum(out * inp for out, inp in shapes) * DTYPE_BYTES[weights_dtype]
    return sum(four_bit_bytes(out * inp, nested="double quant" in quantization) for out, inp in shapes)


def four_bit_bytes(numel: int, nested: bool) -> int:
    """NF4/FP4: two values a byte, one absmax per 64-value block: float32, or with double quantization 8-bit plus a
    float32 second-level absmax per 256 blocks."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    absmax = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) if nested else 4 * blocks
    return math.ceil(numel / 2) + absmax


# ---------------------------------------------------------------------------------------------- training state


def optimizer_name(optim) -> str:
    """The recipe's optim as its name ('paged_adamw_32bit'), whether given as a string or transformers' enum."""
    return str(getattr(optim, "value", optim))


def optimizer_state_bytes(optim: str, trainable: list[tuple[str, int]], param_bytes: int) -> tuple[int, str | None]:
    """Bytes of the optimizer's states for the trainable tensors, and a note if the optimizer is not in the table."""
    states, size = OPTIMIZER_STATES.get(optim, ASSUMED_OPTIMIZER_STATES)
    note = None
    if optim not in OPTIMIZER_STATES:
        note = f"optimizer '{optim}' is not in the planner's table: assumed 2 float32 states per parameter"
    total = 0
    for _, numel in trainable:
        # bitsandbytes keeps 32-bit states for small tensors even in its 8-bit optimizers
        each = 4 if size == 1 and numel < BNB_MIN_8BIT_SIZE else (param_bytes if size is None else size)
        total += states * numel * each
    return int(total), note


# ---------------------------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Batch:
    """The shape of one micro-batch: `rows` sequences of `length` tokens (packed rows, or examples padded to the
    longest), each with its own [length, length] attention mask; flattened into one row under padding_free (TRL's
    collator), with one block-diagonal mask over all of them."""

    rows: int
    length: int
    flattened: bool

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def positions(self) -> int:
        """Positions that predict a next token: the last of each row has none."""
        return self.tokens - 1 if self.flattened else self.rows * (self.length - 1)

    @property
    def mask_entries(self) -> int:
        """Entries of the [query, key] attention mask SDPA gets: one (rows*length)^2 block-diagonal mask when
        flattened, one length^2 mask per row when padded."""
        return self.tokens**2 if self.flattened else self.rows * self.length**2


def stream_bytes(facts: ModelFacts) -> int:
    """Bytes of a value in the residual stream: float32 under 4/8-bit (prepare_model_for_kbit_training upcasts the
    embeddings and norms, and bitsandbytes casts each layer's output back to its input's dtype), else the weights'."""
    if facts.quantization != "none":
        return 4
    return DTYPE_BYTES[facts.precision.weights_dtype]


def attention_bytes(facts: ModelFacts) -> int:
    """Bytes of q, k, v and the attention output as SDPA keeps them: autocast runs it in 16-bit."""
    return 2 if facts.precision.autocast else stream_bytes(facts)


def lora_input_bytes(facts: ModelFacts) -> int:
    """Bytes a LoRA layer keeps per input feature: its dropout mask (1 byte, when dropout > 0) and lora_A's input
    (cast to the adapter's dtype, or by autocast to 16-bit)."""
    mask = 1 if facts.lora_dropout > 0 else 0
    kept = 2 if facts.precision.autocast else DTYPE_BYTES[facts.trainable_dtype]
    return mask + kept


def layer_saved_bytes(facts: ModelFacts, batch: Batch) -> int:
    """What autograd keeps for the backward pass of one decoder layer (Mistral/Llama layer).

    Per token: the layer's input and the post-attention residual (kept by the two RMSNorms); q, and k and v repeated to
    every query head (a mask makes transformers repeat_kv), and the attention output; the SiLU gate's input and output
    and the up projection (kept by the SwiGLU product); each LoRA layer's dropout mask and lora_A input. Per layer:
    the attention mask as SDPA converts it to the attention dtype; eager attention keeps its scores and
    probabilities instead; flash attention takes no mask."""
    s, a = stream_bytes(facts), attention_bytes(facts)
    q_width = facts.heads * facts.head_dim
    per_token = (
        2 * s * facts.hidden  # the two norms' inputs
        + 4 * a * q_width  # q, k and v at every head, attention output
        + 4 * facts.heads  # the attention's float32 logsumexp
        + 3 * s * facts.ffn  # gate, SiLU(gate), up
        + lora_input_bytes(facts) * sum(m.in_features for m in facts.lora_modules) // facts.layers
    )
    if facts.attention.startswith("flash"):
        per_layer = 0
    elif facts.attention == "eager":
        per_layer = 2 * a * facts.heads * batch.mask_entries
    else:
        per_layer = a * batch.mask_entries
    return per_token * batch.tokens + per_layer


def layer_transient_bytes(facts: ModelFacts, batch: Batch) -> int:
    """The working set one layer's forward allocates and frees (the norm's float32 copy, each projection's output
    and the clone peft makes of it, the RoPE products, the SwiGLU product). Once freed it stays with the allocator
    (glibc's heap on CPU, the caching allocator on CUDA), so it counts at the peak."""
    s = stream_bytes(facts)
    q_width = facts.heads * facts.head_dim
    kv_width = facts.kv_heads * facts.head_dim
    per_token = s * (2 * facts.hidden + 3 * (q_width + 2 * kv_width) + 2 * facts.ffn)
    return per_token * batch.tokens


def activation_bytes(facts: ModelFacts, batch: Batch, checkpointing: bool) -> int:
    """Activations at the peak of the step. With gradient checkpointing: each layer's input, plus one layer's saved
    tensors as it is recomputed in the backward pass; without: every layer's saved tensors. Either way: one layer's
    forward working set, the boolean attention mask, the final norm's input and output, and the last hidden state
    with its float32 gradient as the loss keeps them."""
    s = stream_bytes(facts)
    if checkpointing:
        layers = facts.layers * s * facts.hidden * batch.tokens + layer_saved_bytes(facts, batch)
    else:
        layers = facts.layers * layer_saved_bytes(facts, batch)
    # the final norm's input and output, the loss's copy of the hidden states and their float32 gradient
    head = (3 * s + 4) * facts.hidden * batch.tokens
    boolean_mask = 0 if facts.attention.startswith("flash") else batch.mask_entries
    return layers + layer_transient_bytes(facts, batch) + boolean_mask + head


def allocator_retention_bytes(facts: ModelFacts, batch: Batch) -> int:
    """On CPU: freed activations glibc's malloc keeps resident. Each layer's forward frees tensors of a few MiB that
    the heap keeps (the next layer's do not fit the holes), so the resident set grows by about one layer's saved
    tensors per layer, checkpointed or not: with checkpointing that is memory autograd no longer holds, without it
    the layers' freed temporaries, about as large. Measured: with MALLOC_MMAP_THRESHOLD_=131072 (freed memory goes
    back to the system) the base shape's growth falls from 2,336 to 898 MiB. Counted here: every layer's saved
    tensors less the one layer's working set `activation_bytes` already holds."""
    return max(0, facts.layers * layer_saved_bytes(facts, batch) - layer_transient_bytes(facts, batch))


# ---------------------------------------------------------------------------------------------- logits


@dataclass(frozen=True)
class LossKernel:
    """How the loss materializes logits: for which positions it projects the hidden state onto the vocabulary, in
    tiles of how many positions, and how many bytes per [position, vocab] entry are live at its peak.

    positions: "all" (every position), "labelled" (only positions whose next token has a label), or
    "labelled-columns" (every row of the batch at each position where some row has a label)."""

    name: str
    positions: str
    tile_positions: int | None  # None: all at once
    bytes_per_logit: float | None  # None: the size of the compute dtype (one tile, worked on in place)


# The pipeline's loss (qlora_pipeline/trainer.py): logits_to_keep = the labelled columns, float32 logits, plain
# cross-entropy; its peak is in the forward, as the metrics run: the logits, the log-softmax cross-entropy keeps,
# and the metrics' log-softmax, its exp and their product: 5 float32 values a logit (measured: 5.05-5.09).
PIPELINE_LOSS = LossKernel(
    "cross-entropy on the labelled positions (qlora_pipeline/trainer.py)", "labelled-columns", None, 5 * 4
)
# TRL 1.16 SFTTrainer.compute_loss → add_fused_lm_head → ChunkedLogProbFunction, for what the pipeline's loss leaves to
# it. Without Triton (CPU) it projects every position and its torch backward (_backward_tile) holds 8 float32
# [positions, vocab] tensors and a boolean one at once (measured: 8.8-9.3).
TRL_CHUNKED_TORCH = LossKernel("TRL chunked log-probs, torch tiles (no Triton)", "all", LOSS_TOKEN_TILE, 8 * 4 + 1)
# With Triton (CUDA) only labelled positions are projected, and the kernels work on one tile in place.
TRL_CHUNKED_TRITON = LossKernel("TRL chunked log-probs, Triton tiles", "labelled", LOSS_TOKEN_TILE, None)


def logits_buffer_bytes(positions: int, vocab: int, bytes_per_logit: float) -> int:
    """The loss's logits at their peak: positions x vocab entries, each holding `bytes_per_logit` bytes across every
    buffer live at once (logits, softmax, gradient, temporaries). The one term to recalibrate if the loss changes."""
    return int(positions * vocab * bytes_per_logit)


def scored_positions(kernel: LossKernel, batch: Batch, labelled_fraction: float) -> int:
    """Positions the loss projects at once (in its largest tile). `labelled_fraction`: the share of positions with
    a label ("labelled"), or of columns where some row has one ("labelled-columns")."""
    if kernel.positions == "all":
        positions = batch.positions
    elif kernel.positions == "labelled" or batch.flattened:
        positions = math.ceil(batch.positions * labelled_fraction)
    else:
        positions = batch.rows * math.ceil((batch.length - 1) * labelled_fraction)
    return min(positions, kernel.tile_positions) if kernel.tile_positions else positions


def loss_bytes(facts: ModelFacts, kernel: LossKernel, batch: Batch, labelled_fraction: float) -> int:
    """The logits buffers, plus the 16-bit copy of the output head autocast makes (the head is float32 after
    prepare_model_for_kbit_training) and keeps for the backward pass."""
    compute = DTYPE_BYTES[facts.precision.mixed or "float32"]
    per_logit = kernel.bytes_per_logit if kernel.bytes_per_logit is not None else compute
    vocab = min(facts.vocab, LOSS_VOCAB_TILE) if kernel.tile_positions else facts.vocab
    logits = logits_buffer_bytes(scored_positions(kernel, batch, labelled_fraction), vocab, per_logit)
    head_bytes = 4 if facts.quantization != "none" else DTYPE_BYTES[facts.precision.weights_dtype]
    head_copy = facts.vocab * facts.hidden * compute if facts.precision.autocast and compute != head_bytes else 0
    return logits + head_copy


@dataclass(frozen=True)
class LabelShare:
    """How much of a batch carries a label, in the worst of many batches drawn from the recipe's data."""

    columns: float  # share of next-token columns where some row of the batch has a label
    positions: float  # share of next-token positions with a label
    source: str

    def for_kernel(self, kernel: LossKernel) -> float:
        return self.columns if kernel.positions == "labelled-columns" else self.positions


def estimate_label_share(recipe, rows: int, length: int, cache: dict | None = None) -> LabelShare:
    """The labelled share of the run's worst batch, expected: LABEL_SAMPLE_BATCHES random batches of `rows` rows
    (seeded by the recipe) drawn from the first LABEL_SAMPLE_EXAMPLES training examples, as the pipeline's own code
    tokenizes, templates, masks and packs them, give the distribution of one batch; the largest of as many batches
    as the run trains on is expected at `expected_maximum`. A short run meets fewer batches, so its worst one is
    milder. Raises PipelineError where the data or tokenizer cannot be had locally. `cache` keeps the tokenized rows
    by length, for planning many batch sizes."""
    import numpy as np

    name = recipe.data.dataset_name
    if not (tiny.is_embedded(name) or Path(name).expanduser().exists()):
        raise PipelineError(f"{name} is on the Hub, not downloaded to plan")
    cache = {} if cache is None else cache
    if length not in cache:
        try:
            cache[length] = labelled_matrix(recipe, length)
        except PipelineError as exc:  # remembered too: planning many batch sizes tries once
            cache[length] = exc
    if isinstance(cache[length], PipelineError):
        raise cache[length]
    labelled, truncated = cache[length]
    rng = np.random.default_rng(recipe.training.seed)
    columns, positions = [], []
    for _ in range(LABEL_SAMPLE_BATCHES):
        batch = labelled[rng.choice(len(labelled), size=min(rows, len(labelled)), replace=False)]
        columns.append(int(batch.any(axis=0).sum()))
        positions.append(int(batch.sum()))
    run = batches_in_run(recipe.training, len(labelled), rows, truncated)
    source = (
        f"the expected worst of the run's {run} batches of {rows}, from {len(labelled)} "
        f"{'packed rows' if recipe.training.packing else 'examples'} of {name}"
    )
    return LabelShare(
        expected_maximum(columns, run) / (length - 1), expected_maximum(positions, run) / (rows * (length - 1)), source
    )


def expected_maximum(samples: list[int], draws: int) -> float:
    """E[max of `draws` independent values] under the samples' empirical distribution: the i-th smallest of M
    samples is the maximum with probability (i/M)^draws - ((i-1)/M)^draws."""
    ordered = sorted(samples)
    size = len(ordered)
    return sum(value * ((i / size) ** draws - ((i - 1) / size) ** draws) for i, value in enumerate(ordered, start=1))


def batches_in_run(training, rows_in_sample: int, rows: int, truncated: bool) -> int:
    """Micro-batches the run trains on: max_steps x accumulation, else epochs over the rows (over the sample's rows
    when it holds all the data; else at least LABEL_SAMPLE_BATCHES)."""
    if training.max_steps and training.max_steps > 0:
        return training.max_steps * (training.gradient_accumulation_steps or 1)
    batches = math.ceil(training.num_train_epochs * math.ceil(rows_in_sample / rows))
    return max(batches, LABEL_SAMPLE_BATCHES) if truncated else max(1, batches)


def labelled_matrix(recipe, length: int):
    """[rows, length - 1] booleans: which next-token positions of each training row have a label, as the trainer
    sees them (packed rows under packing, else examples); and whether the sample left training rows out."""
    import copy

    import numpy as np

    from qlora_pipeline import packing, train

    limit = recipe.data.max_train_samples
    capped = limit is None or limit > LABEL_SAMPLE_EXAMPLES
    sample = dataclasses.replace(
        recipe,
        data=dataclasses.replace(recipe.data, max_train_samples=LABEL_SAMPLE_EXAMPLES if capped else limit),
        training=copy.copy(recipe.training),
    )
    sample.training.max_length = length
    with quiet_datasets():
        prepared = train.prepare_data(sample)
        dataset = prepared.train.dataset.remove_columns(["n_tokens"])
        completion_only = recipe.training.completion_only_loss is not False
        if recipe.training.packing:
            rows = packing.pack(dataset, length, completion_only)["labels"]
        else:
            rows = [
                [token if keep or not completion_only else -100 for token, keep in zip(ids, mask)]
                for ids, mask in zip(dataset["input_ids"], dataset["completion_mask"])
            ]
    labelled = np.zeros((len(rows), length - 1), dtype=bool)
    for index, labels in enumerate(rows):
        next_labels = np.asarray(labels[1:length], dtype=np.int64)  # position p predicts token p + 1
        labelled[index, : len(next_labels)] = next_labels != -100
    truncated = capped and bool((prepared.accounting or {}).get("unused"))
    return labelled, truncated


@contextlib.contextmanager
def quiet_datasets():
    """No progress bars while the planner tokenizes its sample."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def label_share(
    recipe, kernel: LossKernel, batch: Batch, labelled_fraction: float | None, cache: dict | None = None
) -> tuple[float, str]:
    """The labelled share to plan with and where it came from: as given, else read from the data, else 1."""
    if labelled_fraction is not None:
        return labelled_fraction, "given"
    if kernel.positions == "all":
        return 1.0, "every position is scored"
    if recipe.training.completion_only_loss is False:
        return 1.0, "completion_only_loss is off: every position has a label"
    try:
        share = estimate_label_share(recipe, batch.rows, batch.length, cache)
    except PipelineError as exc:
        return 1.0, f"assumed, an upper bound: {exc}"
    return share.for_kernel(kernel), share.source


# ---------------------------------------------------------------------------------------------- the plan


def predict(
    recipe,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    max_length: int | None = None,
    labelled_fraction: float | None = None,
    precision: Precision | None = None,
    loss_kernel: LossKernel | None = None,
) -> MemoryPlan:
    """Predict the peak memory of training `recipe` on one device, from its model's config alone (meta device).

    device: "cpu" or "cuda" (default: this machine's). On "cuda" the recipe's fp16/bf16 and dtype are taken as the
    recipe file and command line give them (on a CPU machine load_recipe has switched them off); pass `precision`
    (see `precision_for`) to plan other values. batch_size, max_length: the per-device batch and sequence length
    (default: the recipe's). labelled_fraction: the share of a batch's positions the loss computes logits for (with
    the pipeline's loss: the columns where some row of the batch has a label); default: estimated from the recipe's
    data where it is local (`estimate_label_share`), else 1.0, an upper bound. loss_kernel: PIPELINE_LOSS (default)
    or one of TRL's (TRL_CHUNKED_TORCH, TRL_CHUNKED_TRITON).

    The returned plan's `training_growth` is meant to be compared with the measured growth of memory over training:
    on CPU the peak resident set during `trainer.train()` minus the resident set right before it; on CUDA
    torch.cuda.max_memory_allocated() during training minus torch.cuda.memory_allocated() right before it."""
    device = device or this_machine()
    facts = model_facts(recipe, precision or precision_for(recipe, device))
    return plan_from_facts(
        facts,
        recipe,
        batch_size=batch_size,
        max_length=max_length,
        labelled_fraction=labelled_fraction,
        loss_kernel=loss_kernel,
    )


def plan_from_facts(
    facts: ModelFacts,
    recipe,
    *,
    batch_size: int | None = None,
    max_length: int | None = None,
    labelled_fraction: float | None = None,
    loss_kernel: LossKernel | None = None,
) -> MemoryPlan:
    """The plan for one batch shape, from model facts counted once (see `predict`)."""
    training = recipe.training
    precision = facts.precision
    notes = list(facts.notes)
    length = max_length or training.max_length
    if length is None:
        length = 1024
        notes.append(f"the recipe sets no max_length: planned for {length} tokens")
    rows = batch_size or training.per_device_train_batch_size
    batch = Batch(rows, length, flattened=bool(training.padding_free))
    kernel = loss_kernel or PIPELINE_LOSS
    fraction, fraction_source = label_share(recipe, kernel, batch, labelled_fraction, facts.labelled_rows)
    checkpointing = bool(training.gradient_checkpointing)

    weights_bytes = DTYPE_BYTES[precision.weights_dtype]
    trainable_bytes = DTYPE_BYTES[facts.trainable_dtype]
    trainable = sum(numel for _, numel in facts.trainable)
    optim = optimizer_name(training.optim)
    optimizer, note = optimizer_state_bytes(optim, facts.trainable, trainable_bytes)
    if note:
        notes.append(note)
    upcast = 0
    if facts.quantization != "none":  # prepare_model_for_kbit_training: 16-bit non-quantized weights → float32
        upcast = facts.other_parameters * max(0, 4 - weights_bytes)
    return MemoryPlan(
        quantized_weights=quantized_linear_bytes(facts.quantized_shapes, facts.quantization, precision.weights_dtype),
        other_weights=facts.other_parameters * weights_bytes,
        kbit_upcast=upcast,
        lora_weights=trainable * trainable_bytes if recipe.model.use_peft else 0,
        gradients=trainable * trainable_bytes,
        optimizer_states=optimizer,
        activations=activation_bytes(facts, batch, checkpointing),
        logits=loss_bytes(facts, kernel, batch, fraction),
        allocator_retention=allocator_retention_bytes(facts, batch) if precision.device == "cpu" else 0,
        step_overhead=CPU_STEP_OVERHEAD if precision.device == "cpu" else 0,
        cuda_context=CUDA_CONTEXT if precision.device == "cuda" else 0,
        device=precision.device,
        model=facts.name,
        config_source=facts.config_source,
        batch_size=rows,
        max_length=length,
        tokens_per_batch=batch.tokens,
        scored_positions=scored_positions(kernel, batch, fraction),
        labelled_fraction=fraction,
        labelled_source=fraction_source,
        vocab=facts.vocab,
        gradient_checkpointing=checkpointing,
        quantization=facts.quantization,
        weights_dtype=precision.weights_dtype,
        mixed_precision=precision.mixed,
        optimizer=optim,
        loss_kernel=kernel.name,
        parameters=facts.parameters,
        quantized_parameters=facts.quantized_parameters,
        other_parameters=facts.other_parameters,
        trainable_parameters=trainable,
        notes=notes,
    )


def largest_batch_size(facts: ModelFacts, recipe, budget: int, **kwargs) -> int:
    """The largest per-device batch whose plan fits in `budget` bytes (0 if not even one row fits)."""

    def fits(rows: int) -> bool:
        return plan_from_facts(facts, recipe, batch_size=rows, **kwargs).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):  # the total grows with the batch: double until it no longer fits, then bisect
        low, high = high, high * 2
        if high > 1 << 20:
            return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


# ---------------------------------------------------------------------------------------------- sizes and output


SIZE_UNITS = {"kib": KIB, "mib": MIB, "gib": GIB, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """'24GiB', '24GB', '16000MiB', '1.5 TiB' → bytes. GiB/MiB are powers of 2, GB/MB powers of 10."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise PipelineError(f"--gpu-memory: {text!r} is not a size; write it as e.g. 24GiB, 24GB or 16000MiB")
    value = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if value <= 0:
        raise PipelineError(f"--gpu-memory: {text!r} must be more than 0")
    return int(value)


def human(size: float) -> str:
    if abs(size) >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / MIB:.1f} MiB"


def count(number: int) -> str:
    """A parameter count: 6.98 B, 262.4 M, 131.1 K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= size:
            return f"{number / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(number)


def linear_weights_label(plan: MemoryPlan) -> str:
    params = f"{count(plan.quantized_parameters)} params"
    if plan.quantization == "none":
        return f"linear weights ({plan.weights_dtype}, not quantized, {params})"
    if plan.quantization == "int8":
        return f"quantized linear weights (int8 + row scales, {params})"
    kind = plan.quantization.replace("nf4", "NF4").replace("fp4", "FP4")
    return f"quantized linear weights ({kind}, {params})"


def row_labels(plan: MemoryPlan) -> dict[str, str]:
    return {
        "quantized_weights": linear_weights_label(plan),
        "other_weights": f"embeddings, norms, lm_head ({plan.weights_dtype}, {count(plan.other_parameters)})",
        "kbit_upcast": "  + their float32 upcast (prepare_model_for_kbit_training)",
        "lora_weights": f"LoRA adapter ({count(plan.trainable_parameters)} params)",
        "gradients": "gradients (trainable parameters)",
        "optimizer_states": f"optimizer states ({plan.optimizer})",
        "activations": "activations ("
        + ("gradient checkpointing" if plan.gradient_checkpointing else "no gradient checkpointing")
        + f", {plan.tokens_per_batch} tokens)",
        "logits": f"logits ({plan.scored_positions} positions x vocab)",
        "allocator_retention": "freed activations malloc keeps resident (CPU)",
        "step_overhead": "runtime overhead of a training step (CPU)",
        "cuda_context": "CUDA context and workspaces (assumed)",
    }


def format_plan(plan: MemoryPlan, budget: int | None = None, largest: int | None = None) -> str:
    labels = row_labels(plan)
    precision = f"{plan.mixed_precision} mixed precision" if plan.mixed_precision else "no mixed precision"
    lines = [
        f"model       {plan.model} ({count(plan.parameters)} parameters; config from {plan.config_source})",
        f"device      {plan.device}: {precision}, weights load in {plan.weights_dtype}",
        f"batch       {plan.batch_size} per device x {plan.max_length} tokens, gradient checkpointing "
        + ("on" if plan.gradient_checkpointing else "off"),
        f"loss        {plan.loss_kernel}: {plan.scored_positions} positions x {plan.vocab} vocab at once",
        f"labelled    {plan.labelled_fraction:.0%} of the positions ({plan.labelled_source})",
        "",
    ]
    width = max(len(label) for label in labels.values())
    for row in MemoryPlan.ROWS:
        value = getattr(plan, row)
        if value:
            lines.append(f"{labels[row]:<{width}}  {human(value):>11}")
    lines.append("-" * (width + 13))
    lines.append(f"{'total (peak of a training step)':<{width}}  {human(plan.total):>11}")
    lines.append(f"{'  loaded model':<{width}}  {human(plan.loaded_model):>11}")
    lines.append(f"{'  training growth':<{width}}  {human(plan.training_growth):>11}")
    if budget is not None:
        verdict = (
            f"fits ({human(budget - plan.total)} to spare)"
            if plan.total <= budget
            else f"does NOT fit ({human(plan.total - budget)} short)"
        )
        lines += ["", f"GPU memory  {human(budget)}: {verdict}"]
        lines.append(
            f"largest per-device batch that fits: {largest} (at {plan.max_length} tokens)"
            if largest
            else f"largest per-device batch that fits: none, even batch 1 at {plan.max_length} tokens is too large"
        )
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)
