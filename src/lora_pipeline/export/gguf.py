"""GGUF export (`export --gguf TYPE`): a merged model written with PyPI's `gguf` writer for llama.cpp and Ollama.

The `gguf` package has a writer and a quantizer but no Hugging Face converter, so the tensor names come from its
own name table (`gguf.get_tensor_name_map`) and the metadata is mapped here for the architectures llama.cpp
reads the same way: Llama, Mistral (written as llama, as llama.cpp's converter does) and Qwen2.
Only the types `gguf` can quantize in Python are offered; K-quants need llama.cpp's `llama-quantize`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_pipeline.errors import ConfigError, StageError

GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_0")
# model_type -> the gguf architecture llama.cpp loads it as
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# llama.cpp's pre-tokenizer names for the byte-level BPE tokenizers of these families
_PRE_TOKENIZERS = {"qwen2": "qwen2", "llama": "llama-bpe", "mistral": "llama-bpe"}
# gguf token types (llama.cpp's llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def check_gguf_type(name: str) -> str:
    """`name` lower-cased if the export can write it; one ConfigError naming the choices otherwise."""
    if name.lower() not in GGUF_TYPES:
        raise ConfigError(
            f"unknown GGUF type {name!r}: expected one of {', '.join(GGUF_TYPES)} "
            "(K-quants: quantize the f16 file with llama.cpp's llama-quantize)",
            field="--gguf",
        )
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise StageError("the GGUF export needs the gguf package: pip install 'lora-pipeline[export]'") from None
    return name.lower()


def check_architecture(model_type: str) -> str:
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise StageError(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not {model_type!r}: export --merged "
            "and convert it with llama.cpp's convert_hf_to_gguf.py",
            field="--gguf",
        )
    return arch


def write_gguf(model: Any, tokenizer: Any, path: Path, gguf_type: str, name: str) -> Path:
    """Write `model` (a transformers causal LM, unquantized) and its `tokenizer` to `path` as one GGUF file."""
    import gguf

    config = model.config
    arch = check_architecture(config.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_hparams(writer, config, name, gguf_type)
    _add_tokenizer(writer, tokenizer, config)
    for gguf_name, data, qtype in _tensors(model, arch, gguf_type):
        if qtype is None:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _rope_theta(config: Any) -> float:
    """rope_theta moved into `rope_parameters` in transformers 5; scaled RoPE (llama3, yarn) is not mapped."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise StageError(
            f"GGUF export does not map RoPE scaling {rope_type!r}: export --merged and convert it with llama.cpp's "
            "convert_hf_to_gguf.py",
            field="--gguf",
        )
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _add_hparams(writer: Any, config: Any, name: str, gguf_type: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer.add_file_type(getattr(gguf.LlamaFileType, file_types[gguf_type]))


def _add_tokenizer(writer: Any, tokenizer: Any, config: Any) -> None:
    """The byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer model (Qwen2, Llama 3); a SentencePiece-style
    BPE (byte fallback: Llama 2, Mistral) as its "llama" model, scored by merge rank."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise StageError("GGUF export needs a fast tokenizer (tokenizer.json)", field="--gguf")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise StageError(f"GGUF export maps BPE tokenizers, not {model.get('type')!r}", field="--gguf")
    vocab = tokenizer.get_vocab()
    size = max(config.vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(size):
        token = by_id.get(i)
        if token is None:  # the embedding is padded beyond the tokenizer (as Qwen2's is): llama.cpp's filler
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
        else:
            tokens.append(token)
            types.append(_NORMAL if token not in added else _CONTROL if added[token] else _USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(i) for i in range(size)])
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(config.model_type, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_special_tokens(writer, tokenizer)


def _add_special_tokens(writer: Any, tokenizer: Any) -> None:
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model: Any, arch: str, gguf_type: str) -> Any:
    """(gguf name, array, raw ggml type or None) per weight. Vectors (norms, biases) stay F32 as llama.cpp keeps
    them; a matrix whose rows do not split into quantization blocks falls back to F16."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    target = {"f16": None, "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[gguf_type]
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for hf_name, tensor in model.state_dict().items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = names.get_name(base)
        if gguf_base is None:
            if "rotary_emb" in hf_name:  # computed, not stored
                continue
            raise StageError(f"GGUF export: no GGUF name for tensor {hf_name!r}", field="--gguf")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch == "llama" and base.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            # llama.cpp's rotary layout interleaves each head's halves (convert_hf_to_gguf's permute)
            data = _permute(data, n_head if base.endswith("q_proj") else n_kv)
        yield f"{gguf_base}.{suffix}", *_encode(data, target, gguf, np)


def _permute(weights: Any, n_head: int) -> Any:
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _encode(data: Any, target: str | None, gguf: Any, np: Any) -> tuple[Any, Any]:
    if data.ndim < 2:
        return data.astype(np.float32), None
    if target is None:
        return data.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, target)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype
