"""Model: the tokenizer (pad token fixed), the base model (4-bit, 8-bit or unquantized) and its LoRA adapter."""

from __future__ import annotations

import contextlib
import logging
import warnings

from qlora_pipeline.data import samples
from qlora_pipeline.errors import PipelineError, first_line
from qlora_pipeline.model import tiny
from qlora_pipeline.recipe import launcher

logger = logging.getLogger(__name__)

# The pad token added where a tokenizer has none a task can use.
ADDED_PAD_TOKEN = "<|pad|>"


def resolve_model_path(name: str) -> str:
    """A Hub id or local folder as is; 'embedded:NAME' → the folder of the built tiny model."""
    return tiny.resolve_model(name) if samples.is_embedded(name) else name


def load_pretrained_tokenizer(model_args, training_args, **options):
    """The one tokenizer loader: the recipe's tokenizer (or the model's own) at its revision, `options` passed to
    from_pretrained; a failure is one line naming it. Each task then gives it the pad token it needs."""
    from transformers import AutoTokenizer

    name = resolve_model_path(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    try:
        return AutoTokenizer.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code, **options
        )
    except Exception as exc:
        raise PipelineError(f"{name}: could not load the tokenizer: {first_line(exc)}") from None


def quantization_config(model_args, training_args):
    """BitsAndBytesConfig for 4-bit (NF4/FP4, double quant) or 8-bit loading; None for 16/32-bit."""
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model_args.bnb_4bit_compute_dtype or (
        "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else "float32"
    )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=model_args.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        bnb_4bit_quant_storage=getattr(torch, model_args.bnb_4bit_quant_storage or "uint8"),
    )


def load_model(
    model_args,
    training_args,
    tokenizer,
    *,
    auto_class: str = "AutoModelForCausalLM",
    keep_unquantized: list[str] | None = None,
    resize_reason: str = "",
    configure=None,
    **model_kwargs,
):
    """The one model loader of every task: the base of `auto_class`, quantized as the recipe says (a new head in
    `keep_unquantized` stays a plain layer), on the launcher's device, embeddings resized to the tokenizer, pad id
    set, then `configure(model)` (the task's own settings; returns notes), then prepared for k-bit training.
    `model_kwargs` go to from_pretrained (a classifier's labels). Returns (model, notes)."""
    import transformers

    name = resolve_model_path(model_args.model_name_or_path)
    if training_args.trust_remote_code:
        logger.warning("trust_remote_code is on: code from %s will run on this machine", name)
    quantization = quantization_config(model_args, training_args)
    if quantization is not None and keep_unquantized:
        # bitsandbytes 4-bit layers hold frozen weights: a quantized new head would stay at its random start.
        quantization.llm_int8_skip_modules = list(keep_unquantized)
    model, resized = load_base_model(
        model_args,
        training_args,
        tokenizer,
        quantization=quantization,
        dtype=training_dtype(model_args),
        device_map=launcher.device_map(training_args.use_cpu),
        model_class=getattr(transformers, auto_class),
        **model_kwargs,
    )
    notes = [f"embeddings resized to {len(tokenizer)} tokens{resize_reason}"] if resized else []
    model.config.pad_token_id = tokenizer.pad_token_id
    notes += configure(model) if configure is not None else []
    if quantization is not None:
        model = prepare_for_kbit_training(
            model, training_args.gradient_checkpointing, training_args.gradient_checkpointing_kwargs
        )
    return model, notes


def training_dtype(model_args):
    """The dtype the base loads in: the recipe's (after hardware adaptation), "auto", or float32."""
    import torch

    return model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype or "float32")


def load_base_model(
    model_args, training_args, tokenizer, *, quantization, dtype, device_map, model_class=None, **model_kwargs
):
    """`from_pretrained` of the base (safetensors only), with embeddings resized to the tokenizer as training did.

    Shared by training and by merge/inference, which rebuild the model as trained. `model_class`: the task's Auto
    class (default AutoModelForCausalLM); `model_kwargs` go to from_pretrained (num_labels, id2label…).
    Returns (model, resized)."""
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    causal = model_class.__name__ == "AutoModelForCausalLM"

    name = resolve_model_path(model_args.model_name_or_path)
    try:
        model = model_class.from_pretrained(
            name,
            revision=model_args.model_revision,
            quantization_config=quantization,
            dtype=dtype,
            # sdpa for the causal LM (packing relies on it); other tasks' classes pick their own unless the recipe
            # names one (GPT-Neo's local attention has no sdpa kernel).
            attn_implementation=model_args.attn_implementation or ("sdpa" if causal else None),
            device_map=device_map,
            trust_remote_code=training_args.trust_remote_code,
            use_safetensors=True,
            **model_kwargs,
        )
    except Exception as exc:
        raise PipelineError(f"{name}: could not load the model: {first_line(exc)}") from None
    resized = len(tokenizer) > model.get_input_embeddings().weight.shape[0]
    if resized:
        model.resize_token_embeddings(len(tokenizer))
    return model, resized


def prepare_for_kbit_training(model, use_gradient_checkpointing: bool, gradient_checkpointing_kwargs=None):
    """peft's preparation of a quantized model: float32 norms and embeddings, input gradients, checkpointing."""
    from peft import prepare_model_for_kbit_training

    with quiet_peft_deprecations():
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=use_gradient_checkpointing,
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
        )


@contextlib.contextmanager
def quiet_peft_deprecations():
    """peft 0.21 calls transformers 5's deprecated gradient_checkpointing names: a warning for peft's maintainers,
    not for our users (the recipe side already uses the new names)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*gradient_checkpointing")
        yield


def lora_config(model_args):
    """The recipe's LoRA settings (load_recipe filled in the task's peft task type and head, `modules_to_save`)."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules or "all-linear"
    task_type = model_args.lora_task_type
    if task_type == "QUESTION_ANS":
        # peft 0.21's PeftModelForQuestionAnswering.forward drops token_type_ids, so BERT would train and be scored
        # with every token in segment 0 while the merged export sees the real segments. The plain PeftModel passes
        # every input on; modules_to_save (qa_outputs, set by the task) keeps the new head trained in full.
        task_type = None
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        bias=model_args.lora_bias,
        task_type=task_type,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        use_dora=model_args.use_dora,
        use_rslora=model_args.use_rslora,
    )


def add_lora(model, model_args):
    """Wrap the base model in a LoRA adapter; only the adapter (and modules_to_save) will train. On a CPU its dropout
    draws a quarter of nn.Dropout's random numbers (model/lora_dropout.py)."""
    from peft import get_peft_model

    from qlora_pipeline.model.lora_dropout import use_word_dropout

    try:
        with quiet_peft_deprecations():
            model = get_peft_model(model, lora_config(model_args))
    except ValueError as exc:  # e.g. target_modules naming layers the model does not have
        raise PipelineError(f"LoRA: {first_line(exc)}") from None
    use_word_dropout(model)
    return model
