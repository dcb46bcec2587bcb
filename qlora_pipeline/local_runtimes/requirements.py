"""The packages a GGUF export needs, which a plain `pip install qlora-pipeline` leaves out: llama-cpp-python builds
llama.cpp from source (minutes on a small machine), so it comes with the `gguf` extra."""

from __future__ import annotations

from qlora_pipeline.errors import PipelineError

INSTALL = "pip install 'qlora-pipeline[gguf]'"


def require_gguf_packages() -> None:
    """The `gguf` writer and llama.cpp's Python binding, or one line saying what to install; before anything loads."""
    missing = []
    for module, package in (("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise PipelineError(
            f"export-gguf needs {' and '.join(missing)}, not installed here: {INSTALL} (llama-cpp-python compiles "
            f"llama.cpp, about 7 minutes on 2 cores)"
        )
