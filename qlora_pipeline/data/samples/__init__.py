"""The sample datasets shipped in the package (this folder), named `embedded:NAME` in a recipe: what the demo and
the core tests train on without a download."""

from __future__ import annotations

import hashlib
from importlib import resources

from qlora_pipeline.errors import PipelineError

EMBEDDED_PREFIX = "embedded:"

SAMPLES = {
    "medtuned-sample": "medtuned_sample.jsonl",  # instruction / input / output (Llama2-MedTuned-Instructions)
    "symptoms-sample": "symptoms_sample.jsonl",  # instruction / output (prognosis/symptoms_disease_v1)
    "squad-sample": "squad_sample.json",  # SQuAD v2 JSON, answerable and unanswerable questions
    "student-questions-sample": "student_questions_sample.csv",  # text / label (Biology, Chemistry, Maths, Physics)
    "context-qa-sample": "context_qa_sample.csv",  # context / question / answer
}


def is_embedded(name: str | None) -> bool:
    """An embedded sample or tiny model: `embedded:NAME`."""
    return bool(name) and name.startswith(EMBEDDED_PREFIX)


def folder():
    """This folder, as importlib.resources gives it (inside a wheel or a source tree alike)."""
    return resources.files(__name__)


def resolve_sample(name: str) -> str:
    """'embedded:medtuned-sample' → the path of the sample file shipped in the package."""
    key = name[len(EMBEDDED_PREFIX) :]
    if key not in SAMPLES:
        raise PipelineError(
            f"unknown embedded dataset {name!r}; available: {', '.join(EMBEDDED_PREFIX + k for k in SAMPLES)}"
        )
    return str(folder().joinpath(SAMPLES[key]))


def samples_fingerprint() -> str:
    """A short hash of the shipped sample files, which the trained tokenizers (BERT's, T5's) are learnt from."""
    digest = hashlib.sha256()
    for name in sorted(SAMPLES.values()):
        digest.update(name.encode() + b"\x00" + folder().joinpath(name).read_bytes())
    return digest.hexdigest()[:10]
