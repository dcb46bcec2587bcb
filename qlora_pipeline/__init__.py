"""qlora-pipeline: recipe-driven QLoRA / LoRA fine-tuning on transformers, peft, trl and bitsandbytes."""

__version__ = "0.1.0"
