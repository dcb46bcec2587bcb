"""The embedded tiny models (`embedded:NAME`): random-weight models of the real architectures that need no download.

A model is built once, in seconds, into the cache folder and reused; concurrent processes (e.g. under
`accelerate launch`) wait on a file lock so only one builds it. The builders are in model/tiny_builders/, one module
per architecture, imported only when their model is built.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from qlora_pipeline.cache import cache_root
from qlora_pipeline.data.samples import EMBEDDED_PREFIX, samples_fingerprint
from qlora_pipeline.errors import PipelineError

# Bump when a builder changes, so caches built by older code are not reused.
BUILD_VERSION = "3"


def resolve_model(name: str) -> str:
    """'embedded:tiny-starling' → a local folder holding the built model and tokenizer (built on first use)."""
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in BUILDERS:
        raise PipelineError(
            f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_PREFIX + k for k in BUILDERS)}"
        )
    target = cache_root() / f"{key}-v{BUILD_VERSION}"
    if key in TRAINED_ON_SAMPLES:  # their tokenizers are learnt from the samples: new samples, new build
        target = target.with_name(f"{target.name}-{samples_fingerprint()}")
    if (target / "config.json").is_file():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").is_file():
            # Build beside the target and rename, so a half-built folder is never taken for a model.
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
            try:
                BUILDERS[key](staging)
                if not (staging / "config.json").is_file():
                    raise PipelineError(f"building {name} wrote no config.json in {staging}")
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# Embedded models whose tokenizer the project trains on its sample files (no real one ships offline).
TRAINED_ON_SAMPLES = ("tiny-bert", "tiny-t5")


def _lazy(target: str, **options):
    """A builder in another module ("module:function"), imported only when that model is built."""

    def build(folder: Path) -> None:
        import importlib

        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(folder, **options)

    return build


BUILDERS = {
    # Starling-LM-7B-alpha's architecture at three sizes: tiny-starling is the demo and test model; the other two
    # are the shapes the throughput benchmark measures.
    **{
        name: _lazy("qlora_pipeline.model.tiny_builders.starling:build_starling_shaped", name=name)
        for name in ("tiny-starling", "starling-small", "starling-base")
    },
    # The small-model tasks' architectures, scaled down.
    "tiny-distilgpt2": _lazy("qlora_pipeline.model.tiny_builders.gpt2:build_tiny_distilgpt2"),
    "tiny-gpt-neo": _lazy("qlora_pipeline.model.tiny_builders.gpt2:build_tiny_gpt_neo"),
    "tiny-bert": _lazy("qlora_pipeline.model.tiny_builders.bert:build_tiny_bert"),
    "tiny-t5": _lazy("qlora_pipeline.model.tiny_builders.t5:build_tiny_t5"),
}
