"""A LLaMA-family decoder in plain PyTorch that loads Hugging Face checkpoints exactly.

One file, read top to bottom: the configuration, the building blocks (RMSNorm, rotary
embeddings, grouped-query attention, SwiGLU), the Transformer with a KV-cache `generate`, the
block's structure the stages read, and loading and saving the Hugging Face layout (config.json +
safetensors).

This file knows nothing of rotation, quantization or LoRA. Those stages (rotate.py,
quant.py, lora.py) take a model and change it: they read the block's structure from
BLOCK_INPUTS below (which norm feeds which linears, which linears write to the residual
stream), rewrite or swap the linears with `replace_module`, and may plug a module into the
three identity "hook points" of Attention and MLP. Whatever replaces a linear must be an
nn.Linear look-alike: a forward of (..., in_features) -> (..., out_features) and the
attributes `weight` (out, in), `in_features` and `out_features` (save_checkpoint reads
`.weight`). The tokenizer lives in data/tokenizer.py, the command-line parser every script
uses in data/options.py.

Demo (a plain checkpoint; extras/sample.py samples from any checkpoint the project writes):
    python data/models/prepare.py stories260K
    python model.py --model data/models/stories260K --prompt "Once upon a time"
"""
import json
import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import reduce
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.models import resolve_model_dir
from data.options import BadKey, BadValue, MissingFile, one_line_errors, option, parse_config
from data.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3      # < num_attention_heads: grouped-query attention
    head_dim: int = 64
    vocab_size: int = 49152
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    # Provenance, not math: config.json's "_source" (e.g. "dequantized from a Q4_1 GGUF"). It is
    # carried into every checkpoint saved from this model so numbers measured on it can say so.
    source_note: str | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read every field of a Hugging Face LLaMA config.json that changes the math.

        Settings this model does not implement are errors, never silently ignored."""
        def need(key):
            if key not in hf:
                raise BadKey(f"{source}: missing required field '{key}'")
            return hf[key]

        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise BadValue(f"{source}: model_type '{model_type}' is not supported (only 'llama')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise BadValue(f"{source}: {flag}=true is not supported (LLaMA linears have no bias)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise BadValue(f"{source}: hidden_act '{act}' is not supported (only 'silu')")
        # pretraining_tp > 1 only changes how HF slices matmuls, not the function: ignored.

        # rope_theta and rope_scaling: legacy top-level fields, or (transformers >= 5) one
        # nested `rope_parameters` dict that carries both.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or None
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise BadValue(f"{source}: rope_scaling type '{kind}' is not supported "
                                 "(supported: 'llama3', 'linear')")
            else:  # keep only what rope_inverse_frequencies reads
                keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                scaling = {"rope_type": kind} | {k: scaling[k] for k in keep if k in scaling}

        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        return cls(
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hidden // n_heads,
            vocab_size=need("vocab_size"),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            source_note=hf.get("_source"),
        )

    def to_hf(self) -> dict:
        """The config.json that Hugging Face transformers' LlamaForCausalLM reads."""
        hf = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source_note"}
        if self.source_note:
            hf["_source"] = self.source_note
        hf.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  attention_bias=False, mlp_bias=False)
        return hf


# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in (at least) float32 as the Hugging Face reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))  # bf16 -> fp32; fp64 stays fp64
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, with LLaMA-3.1 or linear context scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":  # positions divided by `factor`
        return inv_freq / factor
    # llama3: slow down only the low frequencies (long wavelengths), blend in between
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen = old_len / scaling["low_freq_factor"]
    high_wavelen = old_len / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: the Hugging Face rotary layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    # x: (B, nh, T, hs); cos, sin: (T, hs)
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Keys and values of every token seen so far, one pair per layer, for generate()."""

    def __init__(self, n_layers: int):
        self.keys = [None] * n_layers
        self.values = [None] * n_layers

    def seen(self, layer: int) -> int:
        """How many tokens layer `layer` has cached."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def update(self, layer: int, k, v):
        # k, v: (B, n_kv, T_new, hs) -> all keys/values so far (B, n_kv, T_past + T_new, hs)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of "
                             f"num_key_value_heads={self.n_kv_heads}")
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        # Hook points on Q, K and V after rotary, K and V before the cache (rotate.py's R3 puts
        # a per-head Hadamard on Q and K, quant.py its KV-cache quantizer on K and V). Identity
        # in the plain model.
        self.query_transform = nn.Identity()
        self.key_transform = nn.Identity()
        self.value_transform = nn.Identity()

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = self.query_transform(q), self.key_transform(k), self.value_transform(v)
        past = 0
        if cache is not None:
            past = cache.seen(self.layer_idx)
            k, v = cache.update(self.layer_idx, k, v)
        if past == 0:      # a fresh sequence: plain causal mask
            mask, causal = None, True
        elif T == 1:       # one new token sees everything before it
            mask, causal = None, False
        else:              # a chunk after a prefix: token i sees the past and chunk tokens <= i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        # enable_gqa: each group of n_heads / n_kv_heads query heads shares one K/V head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # Hook point on the down_proj input. rotate.py puts the online Hadamard (R4) here,
        # so a quantizer inside down_proj sees the rotated activation. Identity by default.
        self.down_input_transform = nn.Identity()

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, intermediate)
        return self.down_proj(self.down_input_transform(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # not persistent: derived from the config, never read from a checkpoint
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config), persistent=False)

    def rotary_cos_sin(self, start: int, T: int, dtype):
        # Computed in float32 and then cast, exactly like the Hugging Face reference.
        pos = torch.arange(start, start + T, device=self.rope_inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.rope_inv_freq.float())  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)               # (T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx, cache: KVCache | None = None):
        """idx (B, T) token ids -> logits (B, T, vocab) in float32."""
        B, T = idx.shape
        start = cache.seen(0) if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        x = self.embed_tokens(idx)  # (B, T, d)
        cos, sin = self.rotary_cos_sin(start, T, x.dtype)
        # extras/compile.py compiles the forward without a cache only: the cache's lists and the layer
        # index it is read with would need a graph per layer and per prefix length
        with torch.compiler.set_stance("force_eager") if cache is not None else nullcontext():
            for block in self.layers:
                x = block(x, cos, sin, cache)
        return self.lm_head(self.norm(x)).float()

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 eos_id: int | None = None, generator: torch.Generator | None = None):
        """Append max_new_tokens tokens to idx (B, T); temperature 0 is greedy decoding.

        The prompt runs once; then every step feeds one token and reuses the cached K/V."""
        cache = KVCache(len(self.layers))
        logits = self(idx, cache)[:, -1]
        out = [idx]
        for _ in range(max_new_tokens):
            if temperature == 0.0:
                nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            out.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits = self(nxt, cache)[:, -1]
        return torch.cat(out, dim=1)


# -----------------------------------------------------------------------------
# The structure of a block, stated once for the stages
#
# Block.forward in words: the residual stream x goes through input_layernorm into q, k and v;
# attention mixes the heads' values into o_proj, whose output is added to x; x goes through
# post_attention_layernorm into gate and up; silu(gate) * up goes through the down_input_transform
# hook into down_proj, whose output is added to x. rotate.py (norm fusion, R1), quant.py (GPTQ's
# groups of linears that share one input, hence one Hessian) and lora.py (the targets) read it here.


class SharedInput(NamedTuple):
    """Linears of a block that read one and the same input, and the module that produces it."""
    source: str               # path in the block of the module whose output they read
    linears: tuple[str, ...]  # paths in the block
    reads_residual: bool      # the input is the residual stream, through the RMSNorm `source`


BLOCK_INPUTS = (  # in forward order
    SharedInput("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), True),
    SharedInput("self_attn", ("self_attn.o_proj",), False),  # the heads' outputs, (B, T, nh * hs)
    SharedInput("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), True),
    SharedInput("mlp.down_input_transform", ("mlp.down_proj",), False),  # silu(gate) * up
)
BLOCK_LINEARS = tuple(path for shared in BLOCK_INPUTS for path in shared.linears)
RESIDUAL_WRITERS = ("self_attn.o_proj", "mlp.down_proj")  # their outputs are added to the stream
# Outside the blocks: embed_tokens writes the residual stream, norm -> lm_head reads it.


def replace_module(root: nn.Module, path: str, module: nn.Module):
    """Put `module` at the dotted `path` under `root` (e.g. 'layers.3.self_attn.q_proj')."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


# -----------------------------------------------------------------------------
# Checkpoints in the Hugging Face layout

# Our parameter names are Hugging Face's minus the "model." prefix (lm_head has none).
# A block's weights in forward order: each RMSNorm that reads the residual stream, then its readers.
LAYER_WEIGHTS = tuple(name for shared in BLOCK_INPUTS
                      for name in ((shared.source,) if shared.reads_residual else ()) + shared.linears)
# Present in some older checkpoints, derived from the config: skipped on load.
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_state_dict_names(config: ModelConfig) -> dict[str, str]:
    """Every HF name a checkpoint of this config holds -> our name."""
    ours = ["embed_tokens.weight"]
    ours += [f"layers.{i}.{w}.weight" for i in range(config.num_hidden_layers) for w in LAYER_WEIGHTS]
    ours += ["norm.weight"]
    names = {f"model.{name}": name for name in ours}
    if not config.tie_word_embeddings:  # tied: lm_head.weight is embed_tokens.weight, not stored
        names["lm_head.weight"] = "lm_head.weight"
    return names


def read_config(path: Path) -> ModelConfig:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise MissingFile(f"{config_file}: no config.json; expected a Hugging Face-layout "
                                "checkpoint directory (config.json + model.safetensors)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise BadValue(f"{config_file}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(hf, source=str(config_file))


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint: one model.safetensors or the shards of an index."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadValue(f"{index}: not a safetensors index (JSON with a 'weight_map'): {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise MissingFile(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    for f in files:
        if not f.is_file():
            raise MissingFile(f"{f}: shard listed in {index.name} is missing")
    return files


# Records another stage writes beside the weights when they compute the right function only with
# that stage's online transforms (rotate.py's Hadamards, quant.py's quantizers): a plain load of
# such a directory would silently give another network, so load_checkpoint refuses it.
STAGE_RECORDS = ("rotation.json", "quantization.json")


def load_checkpoint(path, dtype=torch.float32, device="cpu", *, stage_records_ok: bool = False) -> Transformer:
    """Load a Hugging Face-layout LLaMA directory into our Transformer.

    The model is built on the meta device (no memory), then each shard's tensors are
    assigned into it, so peak memory is about one copy of the weights. A directory with a
    stage record (STAGE_RECORDS) is refused unless that stage's loader asks (stage_records_ok)."""
    from safetensors import safe_open
    from safetensors import SafetensorError

    path = Path(path)
    for record in STAGE_RECORDS:
        if not stage_records_ok and (path / record).is_file():
            raise BadValue(f"{path / record}: these weights need the online transforms recorded there, "
                             "which model.load_checkpoint does not add; load the directory with "
                             "eval.load_model (what every script's --model does)")
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = hf_state_dict_names(config)
    ours_shapes = {k: v.shape for k, v in model.state_dict().items()}
    loaded = set()
    for file in safetensors_files(path):
        shard = {}
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    if hf_name.endswith(HF_IGNORED_SUFFIXES):
                        continue
                    ours = expected.get(hf_name)
                    if ours is None:
                        raise BadKey(f"{file}: unexpected key '{hf_name}' for this config "
                                       f"({config.num_hidden_layers} layers, tied={config.tie_word_embeddings})")
                    tensor = f.get_tensor(hf_name)
                    if tensor.shape != ours_shapes[ours]:
                        raise BadValue(f"{file}: key '{hf_name}' has shape {tuple(tensor.shape)}, "
                                         f"config.json implies {tuple(ours_shapes[ours])}")
                    shard[ours] = tensor.to(device=device, dtype=dtype)
                    loaded.add(hf_name)
        except (SafetensorError, OSError) as e:
            raise BadValue(f"{file}: unreadable or truncated safetensors file ({e})") from None
        model.load_state_dict(shard, strict=False, assign=True)
        del shard
    missing = sorted(set(expected) - loaded)
    if missing:
        raise BadKey(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope_inv_freq = rope_inverse_frequencies(config).to(device)
    return model.eval()


def write_atomically(path: Path, write):
    """Call write(tmp_path), then rename: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(model: Transformer, path, max_shard_bytes: int = 2 * 1024**3, replace: dict | None = None):
    """Write config.json + safetensors (sharded above max_shard_bytes) in the HF layout.

    Each weight is read by attribute path (model.layers[3].self_attn.q_proj.weight), so a
    module another stage swapped in for a linear only needs a `.weight` attribute.
    `replace` ({our name: tensor}) writes other tensors for some weights, the model untouched."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    tensors, replace = {}, replace or {}
    for hf_name, ours in hf_state_dict_names(config).items():
        weight = replace[ours] if ours in replace else reduce(getattr, ours.split("."), model)
        tensors[hf_name] = weight.detach().to("cpu").contiguous()
    dtype = next(iter(tensors.values())).dtype

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)

    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()  # never leave a stale shard next to the new ones
    if len(shards) == 1:
        write_atomically(path / "model.safetensors",
                          lambda tmp: save_file(shards[0], tmp, metadata={"format": "pt"}))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_atomically(path / name, lambda tmp, s=shard: save_file(s, tmp, metadata={"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomically(path / "model.safetensors.index.json",
                          lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    hf = config.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_atomically(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2)))


# -----------------------------------------------------------------------------
# Demo: python model.py --model DIR --prompt "..."


@dataclass
class SampleConfig:
    model: str = option("stories260K", "plain checkpoint directory or a name data/models/prepare.py knows")
    prompt: str = option("Once upon a time", "text to continue")
    chat: bool = option(False, "wrap the prompt in the ChatML template (SmolLM2-Instruct)")
    max_new_tokens: int = option(100, "tokens to generate", at_least=0)
    temperature: float = option(0.0, "sampling temperature; 0 is greedy", at_least=0.0)
    top_k: int | None = option(None, "sample from the k most likely tokens only", at_least=1)
    seed: int = option(0, "seed of the sampler")


def sample(model: Transformer, tok: Tokenizer, args: SampleConfig) -> str:
    """The continuation of args.prompt (ChatML-wrapped with args.chat), decoded."""
    torch.manual_seed(args.seed)
    prompt = args.prompt
    if args.chat:
        prompt = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    idx = torch.tensor([tok.encode(prompt, bos=not args.chat)], device=model.lm_head.weight.device)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, eos_id=tok.eos_id)
    return tok.decode(out[0, idx.shape[1]:].tolist())


if __name__ == "__main__":
    args = parse_config(SampleConfig(), prog="model.py", description="Sample text from a LLaMA-family checkpoint.")
    with one_line_errors("model.py"):
        model_dir = resolve_model_dir(args.model)
        print(sample(load_checkpoint(model_dir), Tokenizer(model_dir), args))
