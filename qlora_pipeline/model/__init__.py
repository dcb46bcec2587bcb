"""The model: loading the tokenizer and the base model, quantized or not, and LoRA (loading.py); finding and
attaching a trained adapter (adapters.py); the embedded tiny models (tiny.py, tiny_builders/) and the architecture
values shipped for planning offline (configs/)."""
