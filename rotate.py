"""Rotate a LLaMA so its activations lose their outliers, without changing what it computes.

RoLoRA step 1 (arXiv 2407.08044, recipe in ../shared/docs/PAPERS.md): fold every RMSNorm weight
into the linears that read it, then multiply the residual stream by a random-sign Hadamard matrix
Q (R1: x -> xQ). RMSNorm only rescales a vector, so it commutes with an orthogonal Q and the
network's function is unchanged, but an outlier channel is spread over all channels. An online
Hadamard before down_proj (R4) does the same for the SwiGLU output. Two options go beyond RoLoRA
(QuaRot's): a per-head Hadamard between v_proj and o_proj (R2) for the attention values, and an
online one on queries and keys (R3) for the keys a quantized KV cache stores.

The file, top to bottom: 1. the method: fold the norms, R1, R4, R2, R3, `rotate_model`;
2. a rotated model saved and loaded back (`save_rotated`, `load_rotated`: the weights and
rotation.json); 3. the random-sign Hadamard matrix and its fast Walsh-Hadamard transform;
4. `activation_stats`, which measures the outliers before and after; 5. how the Hadamard matrices
are built, from Sylvester's and Paley's constructions (any n = K * 2^m they reach, else a reported
random orthogonal fallback): read it last, or never. R1 and R2 may also be learned instead of drawn
(SpinQuant, extras/spinquant.py); rotate_model folds such matrices in as it folds a Hadamard.

    python rotate.py --model smollm2-135m-instruct          # outlier table, original vs rotated
    python rotate.py --sizes 576,1536,11008,29568           # which Hadamard each size gets
"""
import functools
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from data.models import resolve_model_dir
from data.options import BadKey, BadValue, MissingFile, check_options, one_line_errors, option, option_group, parse_config
from data.tokenizer import Tokenizer
from data.wikitext2.prepare import load_test_text
from model import BLOCK_INPUTS, RESIDUAL_WRITERS, load_checkpoint, read_config, save_checkpoint, write_atomically

ROOT = Path(__file__).resolve().parent
FALLBACK_SEED = 0  # seed of the random orthogonal factor for orders no construction reaches

# -----------------------------------------------------------------------------
# 1. Rotating a model in place: fold the norms, R1, R4, R2, R3 (the method)


@torch.no_grad()
def _rewrite(weight: torch.Tensor, fn):
    """weight <- fn(weight in float64), cast back to its dtype."""
    weight.copy_(fn(weight.detach().double()).to(weight.dtype))


def untie_lm_head(model):
    """Give lm_head its own copy of the embedding, or R1 would be applied to the shared tensor twice."""
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone())
    model.config.tie_word_embeddings = False


def fuse_rmsnorm_into_linears(model):
    """RMSNorm(x) = g * x / rms(x), and W (g * u) = (W diag(g)) u: move g into the reading
    linears' columns and set g = 1, so the norm no longer picks out channels and commutes with Q."""
    def fuse(norm, readers):
        g = norm.weight.detach().double()
        for linear in readers:
            _rewrite(linear.weight, lambda W: W * g)  # (out, d) * (d,): scales column j by g_j
        _rewrite(norm.weight, torch.ones_like)

    for layer in model.layers:
        for shared in BLOCK_INPUTS:
            if shared.reads_residual:  # input_layernorm -> q, k, v; post_attention_layernorm -> gate, up
                fuse(layer.get_submodule(shared.source), [layer.get_submodule(p) for p in shared.linears])
    fuse(model.norm, [model.lm_head])


def residual_stream_sites(config) -> list[tuple[str, str]]:
    """(weight name, side) of every weight R1 changes: "reads" W <- W Q for the embedding and the
    readers of the residual stream (q, k, v, gate, up, lm_head: their rows live in its space),
    "writes" W <- Q^T W for o_proj and down_proj (their outputs are added to it)."""
    readers = [path for shared in BLOCK_INPUTS if shared.reads_residual for path in shared.linears]
    sites = [("embed_tokens.weight", "reads")]
    for i in range(config.num_hidden_layers):
        sites += [(f"layers.{i}.{path}.weight", "reads") for path in readers]
        sites += [(f"layers.{i}.{path}.weight", "writes") for path in RESIDUAL_WRITERS]
    return sites + [("lm_head.weight", "reads")]


def value_sites(config) -> list[tuple[int, str, str]]:
    """(layer, weight name, side) of every weight R2 changes: "values" for v_proj (each KV head's
    rows), "heads" for o_proj (each query head's columns)."""
    return [(i, f"layers.{i}.self_attn.{name}.weight", side) for i in range(config.num_hidden_layers)
            for name, side in (("v_proj", "values"), ("o_proj", "heads"))]


def rotate_weight(W: torch.Tensor, side: str, R: torch.Tensor, head_dim: int | None = None) -> torch.Tensor:
    """W rotated by a dense orthogonal R, differentiably: how a learned R1 or R2 is folded, and the
    learning's forward (section 4). R1 (hidden): "reads" W R, "writes" R^T W. R2 (head_dim), the
    value v -> v R of every head: "values" W_h <- R^T W_h on each KV head's rows of v_proj,
    "heads" W[:, h] <- W[:, h] R on each query head's columns of o_proj, so (v R) (W_h R)^T = v W_h^T."""
    if side == "reads":
        return W @ R
    if side == "writes":
        return R.T @ W
    if side == "values":
        return (R.T @ W.view(-1, head_dim, W.shape[1])).reshape(W.shape)  # (n_kv, hd, d)
    if side == "heads":
        return (W.view(W.shape[0], -1, head_dim) @ R).reshape(W.shape)   # (d, nh, hd)
    raise ValueError(f"rotate_weight: side must be reads, writes, values or heads, got {side!r}")


def rotate_residual_stream(model, seed: int, r1: torch.Tensor | None = None):
    """R1: the residual stream x -> x Q, Q = random_hadamard(hidden, seed) = M diag(s), or a given
    orthogonal r1 (a learned one, applied by dense float64 products).

    Readers: W <- W Q = (W M) diag(s). Writers: W <- Q^T W = diag(s) M^T W. Both via the fast
    transform (x @ M)."""
    if r1 is None:
        s = random_signs(model.config.hidden_size, seed).to(model.embed_tokens.weight.device)
        rotate = {"reads": lambda W: walsh_hadamard_transform(W, transpose=True) * s,              # W @ Q
                  "writes": lambda W: walsh_hadamard_transform(W.T, transpose=True).T * s[:, None]}  # Q^T @ W
    else:
        r1 = r1.to(dtype=torch.float64, device=model.embed_tokens.weight.device)
        rotate = {side: functools.partial(rotate_weight, side=side, R=r1) for side in ("reads", "writes")}
    for name, side in residual_stream_sites(model.config):
        _rewrite(model.get_parameter(name), rotate[side])


def add_online_down_proj_hadamard(model):
    """R4: down_proj sees z M^T (online) and its weight becomes W M^T, so (z M^T)(W M^T)^T = z W^T.
    W M^T is the transform of W's rows, which live in the down_proj input space."""
    for layer in model.layers:
        _rewrite(layer.mlp.down_proj.weight, walsh_hadamard_transform)
    add_online_hadamards(model, r4=True, r3=False)


def add_online_hadamards(model, r4: bool, r3: bool):
    """The run-time half of R4 and R3, the online modules (a reloaded rotated checkpoint holds the
    weights already rotated and needs only these back)."""
    for layer in model.layers:
        if r4:
            layer.mlp.down_input_transform = OnlineHadamard(model.config.intermediate_size)
        if r3:
            layer.self_attn.query_transform = OnlineHadamard(model.config.head_dim)
            layer.self_attn.key_transform = OnlineHadamard(model.config.head_dim)


def rotate_values_per_head(model, r2: torch.Tensor | None = None):
    """R2: value head v_h -> P v_h (v_proj's rows), o_proj's columns of each query head -> W_o[:, h] P^T.
    Attention mixes a head's values across tokens only, which commutes with P. One P (the
    orthonormal Hadamard of head_dim) for all heads: under GQA every query head undoes exactly the
    rotation of the KV head it reads. A given r2 (layers, head_dim, head_dim) (learned) gives each
    layer its own P^T = r2[layer] instead, applied by rotate_weight."""
    n_kv, hd = model.config.num_key_value_heads, model.config.head_dim
    n_heads = model.config.num_attention_heads
    hadamard = {  # (P W_h)^T = W_h^T P^T: transform W_h^T's rows. (n_kv * hd, d) -> (n_kv, d, hd)
        "values": lambda W: walsh_hadamard_transform(
            W.view(n_kv, hd, -1).transpose(1, 2)).transpose(1, 2).reshape(n_kv * hd, -1),
        "heads": lambda W: walsh_hadamard_transform(W.view(-1, n_heads, hd)).reshape(W.shape)}  # (d, nh, hd)
    for layer, name, side in value_sites(model.config):
        rotate = hadamard[side] if r2 is None else functools.partial(
            rotate_weight, side=side, R=r2[layer].to(model.embed_tokens.weight.device, torch.float64),
            head_dim=hd)
        _rewrite(model.get_parameter(name), rotate)


def add_online_qk_hadamards(model):
    """R3 (QuaRot, SpinQuant): one Hadamard P of head_dim on every query and key head after rotary,
    online: (q P^T)(k P^T)^T = q P^T P k^T = q k^T, so no attention score changes, but the cached
    keys are rotated before a KV-cache quantizer sees them. Rotary sits between k_proj and the
    cache, so P cannot be folded into a weight; with R2 (values) the whole KV cache is rotated."""
    add_online_hadamards(model, r4=False, r3=True)


@dataclass
class RotationConfig:
    """Which rotations besides R1; train.py, eval.py and rotate.py take each as a flag."""
    online_down_proj: bool = option(True, "R4: online Hadamard on the down_proj input")
    rotate_ov: bool = option(False, "R2: per-head Hadamard on the values, folded into v_proj and o_proj")
    rotate_qk: bool = option(False, "R3: online per-head Hadamard on queries and keys after rotary "
                             "(rotates the K cache, for a quantized KV cache)")

    def layout(self) -> dict:
        """rotate_model's options."""
        return dict(online_down_proj=self.online_down_proj, rotate_ov=self.rotate_ov, rotate_qk=self.rotate_qk)


def check_not_rotated(model, who: str):
    transforms = [m for layer in model.layers for m in (layer.mlp.down_input_transform,
                  layer.self_attn.query_transform, layer.self_attn.key_transform)]
    if getattr(model, "rotation", None) is not None or any(not isinstance(m, nn.Identity) for m in transforms):
        raise ValueError(f"{who}: this model is already rotated (or has a down_proj input or a query/key "
                         "transform); rotate a plain model")


@torch.no_grad()
def rotate_model(model, seed: int = 0, online_down_proj: bool = True, rotate_ov: bool = False,
                 rotate_qk: bool = False, learned: "LearnedRotation | None" = None) -> dict:
    """Rotate a plain model in place; returns the record (also kept as model.rotation).

    learned (extras/spinquant.py's learn_rotation): its R1, and its R2 if it has one, instead of the
    seed's Hadamards; it is kept as model.learned_rotation, which save_rotated saves beside the record."""
    check_not_rotated(model, "rotate_model")
    cfg = model.config
    if learned is not None:
        learned.check_fits(cfg, rotate_ov)
    untie_lm_head(model)
    fuse_rmsnorm_into_linears(model)
    rotate_residual_stream(model, seed, learned.r1 if learned is not None else None)
    if online_down_proj:
        add_online_down_proj_hadamard(model)
    if rotate_ov:
        rotate_values_per_head(model, learned.r2 if learned is not None else None)
    if rotate_qk:
        add_online_qk_hadamards(model)
    used = [(cfg.hidden_size, "R1 residual")]
    used += [(cfg.intermediate_size, "R4 down_proj input")] if online_down_proj else []
    used += [(cfg.head_dim, "R2 per-head values")] if rotate_ov else []
    used += [(cfg.head_dim, "R3 per-head queries and keys")] if rotate_qk else []
    fallbacks = [{"size": n, "used_for": what, "transform": hadamard_plan(n).describe()}
                 for n, what in used if not hadamard_plan(n).exact]
    model.rotation = {"seed": seed, "r1": "random_hadamard" if learned is None else "learned",
                      "r4": online_down_proj, "r2": rotate_ov,
                      "r3": rotate_qk, "fallbacks": fallbacks, "hidden_size": cfg.hidden_size,
                      "intermediate_size": cfg.intermediate_size, "head_dim": cfg.head_dim,
                      "transforms": {what: hadamard_plan(n).describe() for n, what in used}}
    if learned is not None:  # the matrices themselves go to LEARNED_ROTATION_FILE; the record names it
        model.rotation["learned"] = {"file": LEARNED_ROTATION_FILE, "sha256": learned.digest(),
                                     "r2": learned.r2 is not None, **learned.info}
        model.learned_rotation = learned
    return model.rotation


# -----------------------------------------------------------------------------
# 2. A rotated model saved and loaded back
#
# rotate_model changes the weights (norms folded, R1, R4's inverse in down_proj, R2) and adds online
# Hadamards: with R4 one before every down_proj (such weights are a plain LLaMA only together with
# it), with R3 one on every query and key head. So a rotated directory carries its record
# (rotation.json, one of model.STAGE_RECORDS, so model.load_checkpoint refuses it) and load_rotated
# puts the online modules back. Given matrices (a learned rotation, extras/spinquant.py) are folded
# in like a Hadamard, and kept beside the record (rotation.safetensors, float64, checksummed by the
# record): read back bit for bit, they rebuild the same rotated model from the original one.
# extras/hf_export.py writes the other form, R4 folded back, that any LLaMA loader runs unchanged.

LEARNED_ROTATION_FILE = "rotation.safetensors"  # beside rotation.json
ROTATION_RECORD = "rotation.json"                # one of model.STAGE_RECORDS


@dataclass
class LearnedRotation:
    """R1 (and R2) given as matrices, learned by extras/spinquant.py, instead of the seed's Hadamards."""
    r1: torch.Tensor          # (hidden, hidden) float64, orthogonal
    r2: torch.Tensor | None   # (layers, head_dim, head_dim) float64, one for all heads of a layer; or None
    info: dict                # how it was learned (JSON): steps, lr, windows, loss per step, seconds

    def digest(self) -> str:
        """sha256 of the matrices' float64 bytes: the record names the exact matrices it was made with."""
        h = hashlib.sha256(self.r1.double().contiguous().numpy().tobytes())
        if self.r2 is not None:
            h.update(self.r2.double().contiguous().numpy().tobytes())
        return h.hexdigest()

    def check_fits(self, config, rotate_ov: bool):
        shapes = [(self.r1, (config.hidden_size,) * 2, "r1")]
        if self.r2 is not None:
            shapes.append((self.r2, (config.num_hidden_layers, config.head_dim, config.head_dim), "r2"))
            if not rotate_ov:
                raise ValueError("rotate_model: the learned rotation has an R2; rotate with rotate_ov=True")
        for tensor, shape, name in shapes:
            if tuple(tensor.shape) != shape:
                raise ValueError(f"rotate_model: learned {name} has shape {tuple(tensor.shape)}, "
                                 f"the model needs {shape}")


def save_rotated(model, record: dict, path):
    """save_checkpoint (HF layout, norms folded, weights rotated) + rotation.json (the record), and
    for a learned rotation rotation.safetensors (model.learned_rotation). With R4 the weights alone
    are not a plain LLaMA: they need the online Hadamard, so the record is written first (atomically): a directory never holds the weights without it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_rotation_record(path, record, getattr(model, "learned_rotation", None))
    save_checkpoint(model, path)


def write_rotation_record(path: Path, record: dict, learned: LearnedRotation | None):
    """rotation.json, and for a learned rotation its matrices (LEARNED_ROTATION_FILE) first."""
    if "learned" in record:
        if learned is None or learned.digest() != record["learned"]["sha256"]:
            digest = record["learned"]["sha256"][:12]
            raise ValueError(f"save: the rotation record names learned matrices (sha256 {digest}...) that the "
                             "model's learned_rotation does not hold")
        save_learned_rotation(learned, path)
    else:
        (path / LEARNED_ROTATION_FILE).unlink(missing_ok=True)  # an earlier save's, in this directory
    write_atomically(path / ROTATION_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def save_learned_rotation(learned: LearnedRotation, path):
    """DIR/rotation.safetensors: r1 (and r2) in float64, how they were learned in its metadata."""
    from safetensors.torch import save_file
    tensors = {"r1": learned.r1.double().contiguous()}
    if learned.r2 is not None:
        tensors["r2"] = learned.r2.double().contiguous()
    metadata = {"info": json.dumps(learned.info)}
    write_atomically(Path(path) / LEARNED_ROTATION_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_learned_rotation(path, record: dict | None = None) -> LearnedRotation:
    """DIR/rotation.safetensors back, bit for bit; given the record, checked against its sha256."""
    from safetensors import safe_open
    file = Path(path) / LEARNED_ROTATION_FILE
    if not file.is_file():
        raise MissingFile(f"{file}: missing, but the rotation record says the rotation was learned")
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["info"])
    learned = LearnedRotation(tensors["r1"], tensors.get("r2"), info)
    if record is not None and learned.digest() != record["learned"]["sha256"]:
        raise BadValue(f"{file}: these matrices are not the ones {ROTATION_RECORD} names (sha256 "
                         f"{learned.digest()[:12]}... != {record['learned']['sha256'][:12]}...)")
    return learned


def read_rotation_record(path, model_config=None) -> dict | None:
    """The rotation record of a checkpoint directory (None when it has none), checked for its keys
    and, given the directory's ModelConfig, for the sizes it was rotated at."""
    record_file = Path(path) / ROTATION_RECORD
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as e:
        raise BadValue(f"{record_file}: not valid JSON ({e})") from None
    missing = [k for k in ("seed", "r4", "r2", "hidden_size", "intermediate_size", "head_dim") if k not in record]
    if missing:
        raise BadKey(f"{record_file}: missing key(s) {missing}")
    record.setdefault("r3", False)  # records written before R3 existed
    for key in ("hidden_size", "intermediate_size", "head_dim") if model_config is not None else ():
        if record[key] != getattr(model_config, key):
            raise BadValue(f"{record_file}: {key}={record[key]} but config.json has {getattr(model_config, key)}")
    return record


def load_rotated(path, dtype=torch.float32, device="cpu"):
    """Load a checkpoint written by save_rotated and re-insert the online Hadamard modules the
    record names (R4, R3). The weights are already rotated: they are not rotated again."""
    path = Path(path)
    record = read_rotation_record(path, read_config(path))
    if record is None:
        raise MissingFile(f"{path / ROTATION_RECORD}: no rotation record; was this saved by save_rotated?")
    model = load_checkpoint(path, dtype=dtype, device=device, stage_records_ok=True)
    add_online_hadamards(model, record["r4"], record["r3"])
    model.rotation = record
    if "learned" in record:
        model.learned_rotation = load_learned_rotation(path, record)
    return model, record


# -----------------------------------------------------------------------------
# 3. The rotation itself: a random-sign Hadamard matrix and its fast transform


def walsh_hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ M.T along the last dim (x @ M if transpose), M = hadamard_transform_matrix(n), orthonormal.

    Any leading shape; half-precision inputs are computed in float32 and cast back; differentiable.
    Costs O(n (B + log n)) per row instead of the dense O(n^2)."""
    return _walsh_hadamard(x, transpose)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 (float64) from a seeded CPU generator: the same on every machine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """R1 = H diag(s) / sqrt(n) (n, n) float64, orthogonal, s = random_signs(n, seed)."""
    return hadamard_transform_matrix(n) * random_signs(n, seed)


class OnlineHadamard(nn.Module):
    """x -> walsh_hadamard_transform(x): the run-time half of R4 (down_proj.weight holds the other)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x):
        return walsh_hadamard_transform(x)

    def extra_repr(self):
        return f"size={self.size}: {hadamard_plan(self.size).describe()}"


# The fast transform, inside:
# M = Sylvester(2^m) (x) F_K / sqrt(n). Split 2^m = G * S: M = Sylvester(G) (x) [Sylvester(S) (x) F_K].
# The bracket is one dense block of width B = S * K <= DENSE_BLOCK, applied by one matmul over
# contiguous length-B pieces; Sylvester(G) is log2(G) butterfly passes (a, b) -> (a + b, a - b).
# Why not butterflies all the way down: each pass reads and writes the whole tensor, while a
# 128-wide block does seven passes' work in one BLAS call with the traffic of one.
DENSE_BLOCK = 128


@functools.lru_cache(maxsize=64)
def _dense_block(n: int, transpose: bool, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(B, B) right factor for the dense part: x_block @ it, the 1/sqrt(n) of M folded in."""
    plan = hadamard_plan(n)
    S = 1
    while plan.power_of_two % (2 * S) == 0 and 2 * S * plan.K <= DENSE_BLOCK:
        S *= 2
    block = torch.kron(_sylvester(S).double(), _factor_matrix(plan.K)) / math.sqrt(n)
    return (block if transpose else block.T).contiguous().to(dtype=dtype, device=device)


def _fast_transform(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """walsh_hadamard_transform without autograd: one dense-block matmul, then the butterflies."""
    n = x.shape[-1]
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    dense = _dense_block(n, transpose, compute_dtype, str(x.device))
    B = dense.shape[0]
    G = n // B  # Sylvester order left for the butterflies
    with torch.autocast(x.device.type, enabled=False):  # keep the matmul in compute_dtype under AMP
        y = torch.matmul(x.reshape(-1, B).to(compute_dtype), dense).view(-1, G, B)  # (L, G, B)
    L = y.shape[0]
    spare = torch.empty_like(y)  # butterflies ping-pong between two buffers: no allocation per pass
    h = 1
    while h < G:  # pass h pairs block g with g + h inside each group of 2h blocks
        src, dst = y.view(L, G // (2 * h), 2, h * B), spare.view(L, G // (2 * h), 2, h * B)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, spare = spare, y
        h *= 2
    return y.view(x.shape).to(x.dtype)


# A custom operator rather than an autograd.Function, for torch.compile (train.py / eval.py
# --compile): the compiler treats it as one opaque op and never traces into _dense_block, whose
# Hadamard constructions (Python loops, data-dependent branches) would break the graph at every
# online Hadamard. Eager code runs it the same way: _fast_transform, unchanged.
@torch.library.custom_op("rolora::walsh_hadamard_transform", mutates_args=())
def _walsh_hadamard(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    return _fast_transform(x, transpose)


@_walsh_hadamard.register_fake
def _(x, transpose):  # what the compiler needs to know: a new contiguous tensor of x's shape and dtype
    return x.new_empty(x.shape)


def _walsh_hadamard_setup(ctx, inputs, output):
    ctx.transpose = inputs[1]


def _walsh_hadamard_backward(ctx, grad):
    """y = x M^T is linear, so dL/dx = dL/dy M: the transposed transform (itself differentiable)."""
    return _walsh_hadamard(grad, not ctx.transpose), None


_walsh_hadamard.register_autograd(_walsh_hadamard_backward, setup_context=_walsh_hadamard_setup)


# -----------------------------------------------------------------------------
# 4. Measuring outliers


def outlier_stats(x: torch.Tensor) -> dict:
    """Per token over the channels (what a per-token quantizer sees): the largest max|x|/RMS
    over the tokens (its scale is set by the max; bounded by sqrt(channels)) and the mean
    kurtosis (3 for a Gaussian; large when a few channels dominate)."""
    x = x.detach().double().reshape(-1, x.shape[-1])  # (tokens, channels)
    rms = x.pow(2).mean(-1).sqrt()
    centered = x - x.mean(-1, keepdim=True)
    kurtosis = centered.pow(4).mean(-1) / centered.pow(2).mean(-1).pow(2)
    return {"max_over_rms": (x.abs().amax(-1) / rms).max().item(), "kurtosis": kurtosis.mean().item()}


# what each linear's input is called in the table; q, k, v share one input, gate and up another
SITES = {shared.linears[0]: name for shared, name in zip(BLOCK_INPUTS, ("attn_in", "o_proj_in", "mlp_in", "down_in"))}


@torch.no_grad()
def _watch_inputs(model, tokens: torch.Tensor, see):
    """Run the model on tokens, calling see(layer, site, x) with the residual stream entering each
    block and each SITES input (down_in after the online Hadamard, as down_proj sees it)."""
    def record(layer, site):
        def hook(module, args):
            see(layer, site, args[0])  # returns None: the input is not changed
        return hook

    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(block.register_forward_pre_hook(record(i, "residual")))
        hooks += [block.get_submodule(name).register_forward_pre_hook(record(i, site))
                  for name, site in SITES.items()]
    try:
        model(tokens.view(1, -1) if tokens.dim() == 1 else tokens)
    finally:
        for h in hooks:
            h.remove()


def activation_stats(model, tokens: torch.Tensor) -> list[dict]:
    """Rows {layer, site, max_over_rms, kurtosis} for every input _watch_inputs sees."""
    rows = []
    _watch_inputs(model, tokens, lambda layer, site, x: rows.append(
        {"layer": layer, "site": site, **outlier_stats(x)}))
    return rows


def channel_maxima(model, tokens: torch.Tensor, inputs: list[tuple[int, str]]) -> dict:
    """{(layer, site): (channels,) float64} max over the tokens of |x[token, channel]| at each asked
    input: the paper's outlier picture, where a few channels stand out before rotation."""
    maxima = {}

    def see(layer, site, x):
        if (layer, site) in inputs:
            maxima[(layer, site)] = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).double().cpu()
    _watch_inputs(model, tokens, see)
    return maxima


def plot_inputs(rows: list[dict], sites: str = "", layer: int | None = None) -> list[tuple[int, str]]:
    """The (layer, site) pairs to plot: the comma-separated sites (default: the worst one) at
    `layer` (default: the layer of the largest max|x|/RMS in `rows` among those sites)."""
    names = [s for s in sites.split(",") if s]
    candidates = [r for r in rows if (r["site"] in names if names else r["site"] != "residual")
                  and layer in (None, r["layer"])]
    if not candidates:
        raise ValueError(f"--plot-layer={layer} --plot-sites={sites!r}: no such input; layers "
                         f"0..{max(r['layer'] for r in rows)}, sites {', '.join(['residual', *SITES.values()])}")
    worst = max(candidates, key=lambda r: r["max_over_rms"])
    return [(worst["layer"], site) for site in names or [worst["site"]]]


def print_table(before: list[dict], after: list[dict]):
    sites = ["residual", *SITES.values()]
    print("max|x|/RMS of the worst token and mean kurtosis, original > rotated")
    print(f"{'layer':>5} " + " ".join(f"{s:>19}" for s in sites))
    table = {(r["layer"], r["site"], tag): r for tag, rows in (("a", before), ("b", after)) for r in rows}
    for layer in sorted({r["layer"] for r in before}):
        cells = []
        for s in sites:
            a, b = table[(layer, s, "a")], table[(layer, s, "b")]
            cells.append(f"{a['max_over_rms']:5.1f}>{b['max_over_rms']:4.1f} "
                         f"k{a['kurtosis']:4.0f}>{b['kurtosis']:2.0f}")
        print(f"{layer:>5} " + " ".join(f"{c:>19}" for c in cells))
    for tag, rows in (("original", before), ("rotated", after)):
        worst = max((r for r in rows if r["site"] != "residual"), key=lambda r: r["max_over_rms"])
        print(f"{tag:>8}: largest max|x|/RMS over linear inputs {worst['max_over_rms']:.1f} "
              f"(layer {worst['layer']} {worst['site']}), "
              f"mean kurtosis {sum(r['kurtosis'] for r in rows) / len(rows):.1f}")


def plot_outliers(before: dict, after: dict, path: Path, n_tokens: int):
    """One panel per input of channel_maxima's {(layer, site): maxima}, original vs rotated;
    returns the figure, or None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no display, no global state
    except ImportError:
        return print(f"matplotlib is not installed: no plot written (would be {path})")
    reads = {site: "/".join(p.rsplit(".", 1)[-1] for p in shared.linears) + " input"
             for shared, site in zip(BLOCK_INPUTS, SITES.values())} | {"residual": "residual stream"}
    fig = Figure(figsize=(10, 3.4 * len(before)), layout="tight")
    axes = fig.subplots(len(before), 1, squeeze=False)
    for ax, (layer, site) in zip(axes[:, 0], before):
        for tag, maxima in (("original", before), ("rotated", after)):
            m = maxima[(layer, site)]
            ax.plot(m, lw=0.8, label=f"{tag}: max {m.max():.3g} (channel {int(m.argmax())}), median {m.median():.3g}")
        ax.set(title=f"layer {layer}, {site} ({reads[site]})",
               xlabel="channel", ylabel="max over tokens of |x|", yscale="log", xlim=(0, len(m) - 1))
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.4)  # headroom: the legend hides no spike
        ax.legend(loc="upper right")
    fig.suptitle(f"Per-channel max |x| over {n_tokens} tokens: outlier channels before rotation, spread after")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return fig



# -----------------------------------------------------------------------------
# 5. Hadamard matrices: H H^T = n I with entries +-1, built, never stored.
# A Hadamard matrix can exist only for n = 1, 2 or a multiple of 4. We write n = K * 2^m,
# build H_K from Paley's constructions (or Kronecker products of them) and take
# H_n = H_{2^m} (x) H_K with Sylvester's H_{2^m}: the 2^m part then costs only butterflies.


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q, k = q // p, k + 1
    return (p, k) if q == 1 else None


def _quadratic_character(p: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GF(q), q = p^k: the base-p digits of each element (q, k) and chi (q,) = +1 square, -1 not, 0 zero.

    Element e stands for the polynomial sum_i digits[e, i] x^i modulo a primitive polynomial f of
    degree k. Then x generates the multiplicative group, x^0 .. x^(q-2) are all nonzero elements,
    and the squares are exactly the even powers: chi needs no multiplication table."""
    q = p**k
    weights = [p**i for i in range(k)]
    for code in range(p**k):  # f = x^k + c_{k-1} x^(k-1) + ... + c_0, tried in order
        c = [(code // w) % p for w in weights]
        if c[0] == 0:
            continue
        chi = torch.zeros(q, dtype=torch.int64)
        power = [1] + [0] * (k - 1)  # x^0
        for exponent in range(q - 1):
            element = sum(a * w for a, w in zip(power, weights))
            if chi[element] != 0:  # x has order < q - 1: f is not primitive
                break
            chi[element] = 1 if exponent % 2 == 0 else -1
            top = power[-1]  # multiply by x, then replace x^k by -(c_0 + ... + c_{k-1} x^(k-1))
            power = [((power[i - 1] if i else 0) - top * c[i]) % p for i in range(k)]
        else:
            digits = torch.tensor([[(e // w) % p for w in weights] for e in range(q)])
            return digits, chi
    raise AssertionError(f"no primitive polynomial of degree {k} over GF({p})")  # cannot happen


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = chi(a - b) over GF(q) (q, q): skew-symmetric if q = 3 mod 4, symmetric if q = 1 mod 4."""
    p, k = _prime_power(q)
    digits, chi = _quadratic_character(p, k)
    diff = (digits[:, None, :] - digits[None, :, :]) % p          # (q, q, k) digits of a - b
    return chi[diff @ torch.tensor([p**i for i in range(k)])]      # (q, q)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime power q = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, Q]] skew."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return S + torch.eye(q + 1, dtype=torch.int64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime power q = 1 mod 4: S = [[0, 1^T], [1, Q]] symmetric, each
    0 -> [[1, -1], [-1, -1]] and each +-1 -> +-[[1, 1], [1, -1]]."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, 1, _jacobsthal(q)
    one, zero = torch.tensor([[1, 1], [1, -1]]), torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(S, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)


def _sylvester(n: int) -> torch.Tensor:
    """Order 2^m: H_2n = [[H_n, H_n], [H_n, -H_n]], the matrix the butterflies apply."""
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=None)
def _recipe(order: int) -> tuple | None:
    """How to build a Hadamard matrix of this order, as a nested tuple, or None if we cannot."""
    if order in (1, 2):
        return ("sylvester", order)
    if order % 4:
        return None
    if _prime_power(order - 1) and (order - 1) % 4 == 3:
        return ("paley1", order - 1)
    if _prime_power(order // 2 - 1) and (order // 2 - 1) % 4 == 1:
        return ("paley2", order // 2 - 1)
    for a in range(2, math.isqrt(order) + 1):  # Kronecker product of two smaller ones
        if order % a == 0 and _recipe(a) and _recipe(order // a):
            return ("kron", _recipe(a), _recipe(order // a))
    return None


def _build(recipe: tuple) -> torch.Tensor:
    kind, *args = recipe
    if kind == "kron":
        return torch.kron(_build(args[0]), _build(args[1]))
    return {"sylvester": _sylvester, "paley1": _paley1, "paley2": _paley2}[kind](args[0])


def _describe(recipe: tuple) -> str:
    kind, *args = recipe
    if kind == "kron":
        return f"{_describe(args[0])} x {_describe(args[1])}"
    if kind == "sylvester":
        return f"Sylvester({args[0]})"
    p, k = _prime_power(args[0])
    return f"Paley{'I' if kind == 'paley1' else 'II'}(q={args[0]}{f'={p}^{k}' if k > 1 else ''})"


@dataclass(frozen=True)
class HadamardPlan:
    """n = K * power_of_two; the transform is Sylvester(power_of_two) (x) factor_K / sqrt(n).

    exact: factor_K is a constructed Hadamard matrix (recipe). Otherwise it is the fallback,
    a seeded random orthogonal matrix of the odd order K: orthogonal, but not +-1."""
    n: int
    K: int
    power_of_two: int
    recipe: tuple | None

    @property
    def exact(self) -> bool:
        return self.recipe is not None

    def describe(self) -> str:
        if self.exact and self.K == 1:
            return f"Sylvester({self.n})"
        if self.exact:
            return f"Sylvester({self.power_of_two}) x Hadamard({self.K}) = {_describe(self.recipe)}"
        return (f"FALLBACK: Sylvester({self.power_of_two}) x random orthogonal({self.K}, "
                f"seed {FALLBACK_SEED}); no construction here reaches a Hadamard order {self.n}")


@functools.lru_cache(maxsize=None)
def hadamard_plan(n: int) -> HadamardPlan:
    """The smallest constructible K with n = K * 2^m (the cheapest dense part), else the fallback."""
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    odd = n // (n & -n)  # n & -n is the largest power of two dividing n
    K = odd
    while n % K == 0:
        if _recipe(K):
            return HadamardPlan(n, K, n // K, _recipe(K))
        K *= 2
    if n % 4:
        raise ValueError(f"no Hadamard transform of size {n}: Hadamard matrices exist only for "
                         "orders 1, 2 and multiples of 4")
    plan = HadamardPlan(n, odd, n // odd, None)
    warnings.warn(f"rotate.py: {plan.describe()}")  # once per size: this function is cached
    return plan


def hadamard_matrix(n: int, dtype=torch.int64) -> torch.Tensor:
    """The +-1 matrix H (n, n) with H H^T = n I, for every n our constructions reach:
    H = Sylvester(2^m) (x) H_K, so element k of a length-K block is the fastest-moving index."""
    plan = hadamard_plan(n)
    if not plan.exact:
        raise ValueError(f"no construction here reaches a Hadamard matrix of order {n} "
                         f"(= {plan.K} * {plan.power_of_two}); walsh_hadamard_transform and "
                         "random_hadamard use a random orthogonal factor for it instead")
    return torch.kron(_sylvester(plan.power_of_two), _build(plan.recipe)).to(dtype)


@functools.lru_cache(maxsize=64)
def _factor_matrix(K: int) -> torch.Tensor:
    """The K-part of the transform (K, K) float64, unnormalised: H_K, or the fallback for odd K > 1."""
    recipe = _recipe(K)
    if recipe is not None:
        return _build(recipe).double()
    g = torch.Generator().manual_seed(FALLBACK_SEED)
    A = torch.randn(K, K, generator=g, dtype=torch.float64)
    Qr, R = torch.linalg.qr(A)
    Qr = Qr * torch.sign(torch.diagonal(R))  # sign fix: a unique, uniformly (Haar) random orthogonal Q
    # scaled to the +-1 matrices' norm (rows of length sqrt(K)) so that one 1/sqrt(n) fits both
    return (Qr * math.sqrt(K)).contiguous()


def hadamard_transform_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal (n, n) matrix M that walsh_hadamard_transform applies: x -> x @ M.T.

    Built densely by a Kronecker product (independently of the fast transform)."""
    plan = hadamard_plan(n)
    M = torch.kron(_sylvester(plan.power_of_two).double(), _factor_matrix(plan.K)) / math.sqrt(n)
    return M.to(dtype)


# -----------------------------------------------------------------------------
# Command line


@dataclass
class RotateConfig:
    model: str = option("stories260K", "checkpoint dir or prepared model name")
    seed: int = option(0, "seed of R1's random signs")
    rotation: RotationConfig = option_group(RotationConfig, "rotations besides R1")
    tokens: int = option(256, "how many WikiText-2 tokens to measure on", at_least=1)
    text: str = option("", "text file to measure on (default: WikiText-2 test)")
    plot: str = option("out/rotate_outliers.png", "PNG of per-channel max|x|, original vs rotated ('': none)")
    plot_sites: str = option("", "comma-separated inputs to plot: residual, " + ", ".join(SITES.values())
                             + " ('': the one with the largest original max|x|/RMS)")
    plot_layer: int | None = option(None, "layer to plot (none: the one with the largest original "
                                    "max|x|/RMS among the plotted sites)", at_least=0)
    sizes: str = option("", "comma-separated sizes: print their plans, exit")

    def validate(self):
        check_options(self)
        unknown = [s for s in self.plot_sites.split(",") if s and s not in ("residual", *SITES.values())]
        if unknown:
            raise ValueError(f"--plot-sites: unknown {unknown}; choose from residual, {', '.join(SITES.values())}")


def parse_args(argv=None) -> RotateConfig:
    return parse_config(RotateConfig(), argv, prog="rotate.py", description=__doc__.splitlines()[0])


def main(args: RotateConfig):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.sizes:
        for n in (int(s) for s in args.sizes.split(",")):
            plan = hadamard_plan(n)
            print(f"{n:>7} = {plan.K:>4} * {plan.power_of_two:<5} {plan.describe()}")
        return
    model_dir = resolve_model_dir(args.model)
    model, tok = load_checkpoint(model_dir), Tokenizer(model_dir)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else load_test_text()
    tokens = torch.tensor(tok.encode(text[: 20 * args.tokens])[: args.tokens])
    print(f"{model_dir.name}: {len(tokens)} tokens of {args.text or 'WikiText-2 test'}")
    before = activation_stats(model, tokens)
    inputs = plot_inputs(before, args.plot_sites, args.plot_layer)
    maxima_before = channel_maxima(model, tokens, inputs)
    logits = model(tokens[None])
    record = rotate_model(model, args.seed, **args.rotation.layout())
    after = activation_stats(model, tokens)
    maxima_after = channel_maxima(model, tokens, inputs)
    error = (model(tokens[None]) - logits).abs().max() / logits.abs().max()
    print(f"rotation: {json.dumps({k: record[k] for k in ('seed', 'r4', 'r2', 'r3', 'fallbacks')})}")
    print(f"max |logits rotated - original| / max |logits| = {error:.2e} (float32)")
    print_table(before, after)
    for (layer, site), a in maxima_before.items():
        b = maxima_after[(layer, site)]
        print(f"per-channel max|x| at layer {layer} {site}: original {a.max():.3g} (channel {int(a.argmax())}, "
              f"median {a.median():.3g}) > rotated {b.max():.3g} (channel {int(b.argmax())}, median {b.median():.3g})")
    if args.plot:
        plot_outliers(maxima_before, maxima_after, ROOT / args.plot, len(tokens))


if __name__ == "__main__":
    with one_line_errors("rotate.py"):
        main(parse_args())
