"""The model, on paper: its config (local, shipped for offline planning, or the Hub), built on the `meta`
device (shapes, no weights), quantized and wrapped in LoRA as model/loading.py would do it, and the facts the
arithmetic needs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from qlora_pipeline.data import samples
from qlora_pipeline.errors import PipelineError, first_line
from qlora_pipeline.model import loading
from qlora_pipeline.plan.precision import Precision
from qlora_pipeline.plan.weights import DTYPE_BYTES


def shipped_config_path(model_id: str):
    """The architecture values shipped for a Hub model, for planning without network: model/configs/OWNER--NAME.json."""
    return resources.files("qlora_pipeline.model.configs").joinpath(model_id.replace("/", "--") + ".json")


def load_model_config(model_args, trust_remote_code: bool = False):
    """The model's config and where it came from: an embedded model, a local folder, the Hugging Face cache, the
    values shipped in qlora_pipeline/model/configs, or the Hub, in that order. No weights are read."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    revision = model_args.model_revision
    if samples.is_embedded(name) or Path(name).expanduser().is_dir():
        folder = loading.resolve_model_path(name)
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
        return AutoConfig.for_model(**values), f"qlora_pipeline/model/configs/{shipped.name}"
    try:
        return AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code), "the Hub"
    except Exception as exc:
        raise PipelineError(
            f"{name}: no config in the Hugging Face cache or in qlora_pipeline/model/configs, and the Hub could not "
            f"give one: {first_line(exc)}"
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
        wrapped = loading.add_lora(model, model_args)
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
