"""The GGUF file types a user can ask for, as llama.cpp names them, and how each is made.

16- and 32-bit files are written directly from the export's weights with the `gguf` library (as llama.cpp's own
converter writes them: 1-D tensors such as norms stay float32). Quantized types are made from the file of the
export's own precision by llama.cpp's quantizer, the tool llama.cpp documents for it (`llama-quantize`), so the
blocks are exactly llama.cpp's, mixtures such as Q4_K_M included.
"""

from __future__ import annotations

from qlora_pipeline.errors import PipelineError

# written by the gguf library: name → llama.cpp's LlamaFileType value
DIRECT = {"f32": 0, "f16": 1, "bf16": 32}
# made by llama.cpp's quantizer: name → llama_ftype
QUANTIZED = {
    "q8_0": 7,
    "q6_k": 18,
    "q5_k_m": 17,
    "q5_k_s": 16,
    "q5_0": 8,
    "q4_k_m": 15,
    "q4_k_s": 14,
    "q4_0": 2,
    "q3_k_m": 12,
    "q2_k": 10,
}
ALL = (*DIRECT, *QUANTIZED)
# the direct type that holds an export of each dtype without rounding: the source the quantizer reads
SOURCE_FOR_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def parse_quant_types(text: str | list[str], where: str = "--quant") -> list[str]:
    """'f16,q8_0' (or a list) → ['f16', 'q8_0'], lower-cased, duplicates dropped, order kept; an unknown name is an
    error naming it and the known ones."""
    names = text.split(",") if isinstance(text, str) else list(text)
    chosen: list[str] = []
    for raw in names:
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        if name not in ALL:
            raise PipelineError(f"{where}: unknown GGUF type {raw.strip()!r}; choose from {', '.join(ALL)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise PipelineError(f"{where}: no GGUF type given; choose from {', '.join(ALL)}")
    return chosen


def is_quantized(name: str) -> bool:
    return name in QUANTIZED
