"""Bytes of the activations autograd keeps for the backward pass, per layer and for the whole model (with or without
gradient checkpointing), and what the CPU allocator keeps of the freed ones."""

from __future__ import annotations

from dataclasses import dataclass

from qlora_pipeline.plan.model_facts import ModelFacts
from qlora_pipeline.plan.weights import DTYPE_BYTES


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
