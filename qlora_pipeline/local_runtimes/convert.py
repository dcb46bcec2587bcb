"""A merged export (safetensors + tokenizer.json) → one GGUF file of 32- or 16-bit weights, with the `gguf` library.

What llama.cpp's own converter (convert_hf_to_gguf.py) does for the Llama family, Mistral included, with the same
library pieces: `GGUFWriter` for the file, `TensorNameMap` for the tensor names, `LlamaHfVocab` for the vocabulary.
Three things are this project's own, each for a reason:
- token scores come from the ranks of tokenizer.json's merges: `LlamaHfVocab` gives every token -1000, and
  llama.cpp's SentencePiece tokenizer merges by score, so equal scores merge left to right and split words
  differently from the trained tokenizer (measured on the embedded Starling tokenizer: most prompts differ);
- EOS is the training template's end token (Starling: `<|end_of_turn|>`), so llama.cpp stops where the model learnt
  to stop, and the training chat template goes into the file's metadata;
- tensors stream into the file one at a time (header and tensor table first), so a 7B export never sits in memory
  whole.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.errors import PipelineError

# Architectures llama.cpp reads as "llama" (its converter maps both to LlamaModel).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Buffers some checkpoints carry that llama.cpp recomputes.
SKIPPED_TENSORS = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ExportFacts:
    """What the conversion reads from an export folder, checked before any weight is read."""

    folder: Path
    config: dict
    weight_files: list[Path]
    dtype: str  # float32 / float16 / bfloat16: the dtype the weights were saved in
    tokenizer: dict  # tokenizer.json, parsed

    @property
    def layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def read_export(folder: Path) -> ExportFacts:
    """The export's config, weight files and tokenizer, or one line naming what is missing or unsupported."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PipelineError(f"{folder}: no config.json; export-gguf reads a merged export (qlora-pipeline merge RUN)")
    config = json.loads(config_path.read_text())
    architectures = config.get("architectures") or ["(none)"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise PipelineError(
            f"{config_path}: architecture {architectures[0]} is not supported by export-gguf; it writes "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Starling-LM-7B-alpha is MistralForCausalLM)"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise PipelineError(
            f"{config_path}: rope type {rope['rope_type']!r} is not supported by export-gguf (only the default rope)"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise PipelineError(f"{folder}: missing tokenizer file {name}; export-gguf needs the export's tokenizer")
    try:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{folder / 'tokenizer.json'}: not valid JSON ({exc})") from None
    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        raise PipelineError(f"{folder}: no *.safetensors weights")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return ExportFacts(folder, config, weight_files, dtype, tokenizer)


@dataclass(frozen=True)
class TokenizerFacts:
    """The special tokens as training used them: the template decides EOS and whether a BOS is added."""

    bos_id: int
    eos_id: int  # the template's end token
    unk_id: int | None
    pad_id: int | None
    add_bos: bool  # the training template writes the BOS itself; llama.cpp adds it instead
    chat_template: str


def write_gguf(facts: ExportFacts, tokens: TokenizerFacts, path: Path, file_type: str, name: str) -> None:
    """Write `path` as a GGUF file of type `file_type` (f32, f16 or bf16)."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_model_metadata(writer, facts.config, file_type, name)
    _add_tokenizer(writer, facts, tokens)
    tensors = list(_tensor_names(facts))
    for _, _, gguf_name, shape, one_dim in tensors:
        dtype, raw_dtype, stored_shape = _storage(file_type, shape, one_dim)
        writer.add_tensor_info(gguf_name, stored_shape, dtype, _nbytes(dtype, stored_shape), raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _converted_tensors(facts, tensors, file_type):
            writer.write_tensor_data(data)
        writer.flush()
    finally:
        writer.close()


def _add_model_metadata(writer, config: dict, file_type: str, name: str) -> None:
    import gguf

    from qlora_pipeline.gguf_types import DIRECT

    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = config.get("rope_parameters") or {}
    writer.add_name(name)
    writer.add_file_type(DIRECT[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


def _add_tokenizer(writer, facts: ExportFacts, tokens: TokenizerFacts) -> None:
    import gguf

    folder, vocab_size = facts.folder, int(facts.config["vocab_size"])
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError) as exc:
        raise PipelineError(
            f"{folder / 'tokenizer.json'}: not a Llama/Mistral SentencePiece-style tokenizer ({exc}); export-gguf "
            f"writes that family only"
        ) from None
    texts, scores, types = [], [], []
    ranks = merge_scores(facts.tokenizer)
    for text, _, token_type in vocab.all_tokens():
        texts.append(text)
        scores.append(ranks.get(text.decode("utf-8", errors="replace"), 0.0))
        types.append(token_type)
    if len(texts) > vocab_size:
        raise PipelineError(f"{folder}: the tokenizer has {len(texts)} tokens, the model's embeddings {vocab_size}")
    for index in range(len(texts), vocab_size):  # embeddings padded past the tokenizer: named as llama.cpp names them
        texts.append(f"[PAD{index}]".encode())
        scores.append(0.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(texts)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.bos_id)
    writer.add_eos_token_id(tokens.eos_id)
    if tokens.unk_id is not None:
        writer.add_unk_token_id(tokens.unk_id)
    if tokens.pad_id is not None:
        writer.add_pad_token_id(tokens.pad_id)
    writer.add_add_bos_token(tokens.add_bos)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(adds_space_prefix(facts.tokenizer))
    writer.add_chat_template(tokens.chat_template)


def merge_scores(tokenizer: dict) -> dict[str, float]:
    """token text → score, from the order of the BPE merges: the token made by an earlier merge scores higher, so
    llama.cpp's score-ordered merging follows the trained tokenizer's merge order. Tokens no merge makes (single
    characters, bytes, specials) score 0: llama.cpp never merges into them."""
    model = tokenizer["model"]
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        scores.setdefault(left + right, -float(rank))
    return scores


def adds_space_prefix(tokenizer: dict) -> bool:
    """Whether the tokenizer puts '▁' before the text (Metaspace prepend 'always' / 'first', or the older
    Prepend normalizer); llama.cpp's add_space_prefix does the same."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step and step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never"
    normalizer = json.dumps(tokenizer.get("normalizer") or {})
    return '"Prepend"' in normalizer


def _tensor_names(facts: ExportFacts):
    """(file, key, llama.cpp name, shape, 1-D) for every weight, in file order; a tensor llama.cpp has no name for is an
    error rather than a file that loads with a part missing."""
    import gguf
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, facts.layers)
    for file in facts.weight_files:
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(SKIPPED_TENSORS):
                    continue
                gguf_name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise PipelineError(f"{file}: tensor {key} has no llama.cpp name; export-gguf cannot write it")
                shape = tuple(handle.get_slice(key).get_shape())
                yield file, key, gguf_name, shape, len(shape) == 1


def _storage(file_type: str, shape: tuple, one_dim: bool):
    """(numpy dtype, raw GGML type or None, stored shape) of one tensor: norms and other 1-D tensors stay float32."""
    import gguf
    import numpy as np

    if file_type == "f32" or one_dim:
        return np.float32, None, shape
    if file_type == "f16":
        return np.float16, None, shape
    return (
        np.uint8,
        gguf.GGMLQuantizationType.BF16,
        gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType.BF16),
    )


def _nbytes(dtype, shape) -> int:
    import numpy as np

    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _converted_tensors(facts: ExportFacts, tensors, file_type: str):
    """Each tensor as the file stores it, read one at a time; q and k projections in llama.cpp's rotary layout."""
    import gguf
    from safetensors import safe_open
    from tqdm.auto import tqdm

    heads = int(facts.config["num_attention_heads"])
    kv_heads = int(facts.config.get("num_key_value_heads") or heads)
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in facts.weight_files}
        for file, key, gguf_name, shape, one_dim in tqdm(tensors, desc=f"  writing {file_type}", leave=False):
            data = handles[file].get_tensor(key).float().numpy()
            if gguf_name.endswith("attn_q.weight"):
                data = rotary_permute(data, heads)
            elif gguf_name.endswith("attn_k.weight"):
                data = rotary_permute(data, kv_heads)
            dtype, raw_dtype, _ = _storage(file_type, shape, one_dim)
            yield gguf.quants.quantize(data, raw_dtype) if raw_dtype is not None else data.astype(dtype)


def rotary_permute(weights, heads: int):
    """Hugging Face's rotary layout (halves) → llama.cpp's (interleaved pairs), per head: llama.cpp's
    LlamaModel.permute."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
