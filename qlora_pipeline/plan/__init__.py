"""Memory planner: the peak memory of a training run, predicted from the recipe and the model's config alone.

The model is built on the `meta` device (shapes, no weights, no download), quantized and wrapped in LoRA on paper
as model/loading.py would do it for real, and each part of a training step is counted:

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
definitions are in docs/performance.md ("Memory planner"). One module a subject: result (the plan), precision,
model_facts (the meta model), weights (quantized storage, optimizer states), activations, logits, label_share (the
labelled share from the recipe's data), predict (the sum and the largest batch a budget allows), show (sizes and the
printed table).
"""

from qlora_pipeline.plan.model_facts import model_facts, shipped_config_path
from qlora_pipeline.plan.precision import precision_for, this_machine
from qlora_pipeline.plan.predict import CPU_STEP_OVERHEAD, CUDA_CONTEXT, largest_batch_size, plan_from_facts, predict
from qlora_pipeline.plan.result import MemoryPlan
from qlora_pipeline.plan.show import format_plan, parse_size
from qlora_pipeline.sizes import GIB, MIB

__all__ = [
    "CPU_STEP_OVERHEAD",
    "CUDA_CONTEXT",
    "GIB",
    "MIB",
    "MemoryPlan",
    "format_plan",
    "largest_batch_size",
    "model_facts",
    "parse_size",
    "plan_from_facts",
    "precision_for",
    "predict",
    "shipped_config_path",
    "this_machine",
]
