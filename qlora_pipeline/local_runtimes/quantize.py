"""Quantized GGUF files made by llama.cpp's own quantizer (`llama_model_quantize`, what `llama-quantize` runs),
from the file that holds the export's weights unrounded."""

from __future__ import annotations

import ctypes
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.gguf_types import QUANTIZED
from qlora_pipeline.local_runtimes.check import llama_cpp_log, llama_threads

FALLBACK_WARNING = "required fallback quantization"


def quantize(source: Path, target: Path, quant_type: str) -> list[str]:
    """Write `target` as `quant_type` from `source`. Returns notes: llama.cpp quantizes a tensor whose rows do not
    split into its blocks (256 values for the K types) with a fallback type, and says how many it did."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[quant_type]
    params.nthread = llama_threads()
    with llama_cpp_log() as log:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    lines = [line.strip() for line in log.getvalue().splitlines() if line.strip()]
    if code != 0:
        reason = next((line for line in reversed(lines) if "failed" in line or "error" in line.lower()), f"code {code}")
        raise PipelineError(f"export-gguf: llama.cpp could not quantize {target.name}: {reason}")
    return [f"{quant_type}: {line.split(': ', 1)[-1]}" for line in lines if FALLBACK_WARNING in line]
