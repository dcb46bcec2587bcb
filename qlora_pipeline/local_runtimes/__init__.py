"""GGUF files for llama.cpp, Ollama and LM Studio: written from a merged export, quantized, checked by llama.cpp.

One module a subject: `requirements` (the optional packages, or what to install), `quant_types` (the file types
and which tool writes each), `convert` (the export's weights and tokenizer into a GGUF file with the `gguf`
library), `quantize` (llama.cpp's own quantizer), `check` (llama.cpp against the merged export in transformers) and
`modelfile` (the Ollama Modelfile from the training template). stages/export_gguf.py runs them in order.
"""
