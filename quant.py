"""Fake quantization of a LLaMA: weights (RTN or GPTQ), activations and the KV cache.

"Fake" means quantize then dequantize in floating point: every value is moved onto
its integer grid, scale * (q - zero), exactly as the RoLoRA / QuaRot evaluation
simulates W4A4, so any model from model.py (rotated or not, LoRA merged or not)
can be measured at any bit width on a CPU.

The pieces, top to bottom:
  1. the integer grid: `compute_scale_zero`, `fake_quantize` (per tensor, per row, per
     group of columns; symmetric or asymmetric) with a straight-through estimator;
  2. the weight quantizer round-to-nearest, with an optional MSE clip search;
  3. modules: `ActQuantizer` (dynamic per token), `QuantLinear` (input quantizer, then
     the linear with its stored quantized weight);
  4. `quantize_model(model, w_bits=4, a_bits=4, ...)`: swaps the seven linears of every
     block for QuantLinears in place;
  5. GPTQ, the other weight quantizer: block by block on calibration windows.
A quantized model can be saved as integer codes and reloaded without calibration
(extras/quantized_checkpoint.py).

Run it through eval.py, which quantizes a checkpoint and measures what it costs:
    python eval.py --model smollm2-135m-instruct --w-bits 4 --a-bits 4 --quant gptq --ppl
"""
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data.options import check_options, flag_name, option
from model import BLOCK_INPUTS, BLOCK_LINEARS, replace_module



# ----------------------------------------------------------------------------------
# 1. The integer grid

def check_bits(bits, flag: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"quant.py: {flag}={bits!r} must be an integer from 2 to 16 "
                         f"(16 means no quantization)")
    return bits


def integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integers a quantized value may take: signed for symmetric, unsigned otherwise."""
    check_bits(bits)
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def group_rows(x: torch.Tensor, granularity: str = "row", group_size: int | None = None) -> torch.Tensor:
    """View x as (n_groups, group_width): each row of the result shares one scale.

    "tensor": one scale for everything; "row": one per row of the last dim (a weight's
    output channel, an activation's token); "group": one per `group_size` consecutive
    columns of each row.
    """
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "row":
        return x.reshape(-1, x.shape[-1])
    if granularity == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"quant.py: granularity 'group' needs a positive group_size, got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(f"quant.py: group_size={group_size} does not divide the width "
                             f"{x.shape[-1]} of a tensor of shape {tuple(x.shape)}")
        return x.reshape(-1, group_size)
    raise ValueError(f"quant.py: granularity must be 'tensor', 'row' or 'group', got {granularity!r}")


@torch.no_grad()
def compute_scale_zero(rows: torch.Tensor, bits: int, symmetric: bool = True,
                       clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point, each (n_groups, 1), of the grid for every row of `rows`.

    Symmetric: scale = clip * max|x| / (2^(b-1) - 1), zero = 0, q in [-2^(b-1), 2^(b-1) - 1].
    Asymmetric: the range [min(x, 0), max(x, 0)] shrunk by clip is cut into 2^b - 1 steps,
    zero = round(-min / scale), so that 0.0 is exactly on the grid; q in [0, 2^b - 1].
    A row of zeros gets scale 1 (never 0: we divide by it).
    """
    xmin, xmax = torch.aminmax(rows, dim=1, keepdim=True)
    return _grid_of_range(xmin * clip_ratio, xmax * clip_ratio, bits, symmetric)


def _grid_of_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    _, qmax = integer_range(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.zeros_like(scale)
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = (xmax - xmin) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(-xmin / scale)


def round_to_grid(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  qmin: int, qmax: int) -> torch.Tensor:
    """scale * (clamp(round(x / scale) + zero, qmin, qmax) - zero), row by row.

    zero=None means a symmetric grid (saves two passes over the tensor). Under autograd
    this is a straight-through estimator: the gradient is the identity where the clamp
    does not act (x inside the clip range, give or take the half step that rounds onto
    its ends) and 0 where it does; the scale is treated as a constant.
    """
    needs_grad = rows.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():  # rounding has no useful gradient: the STE below supplies one
        q = torch.round(rows / scale)
        if zero is not None:
            q.add_(zero)
        if needs_grad:
            inside = (q >= qmin) & (q <= qmax)
        q.clamp_(qmin, qmax)
        if zero is not None:
            q.sub_(zero)
        q.mul_(scale)
    if not needs_grad:
        return q
    passed = rows * inside
    return passed + (q - passed).detach()


def fake_quantize(x: torch.Tensor, bits: int, granularity: str = "row", group_size: int | None = None,
                  symmetric: bool = True, clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize x onto a `bits`-bit integer grid and return the dequantized tensor (same shape).

    granularity: "tensor", "row" (last dim) or "group" (with group_size columns per group).
    """
    check_bits(bits)
    rows = group_rows(x, granularity, group_size)
    scale, zero = compute_scale_zero(rows, bits, symmetric, clip_ratio)
    qmin, qmax = integer_range(bits, symmetric)
    return round_to_grid(rows, scale, None if symmetric else zero, qmin, qmax).reshape(x.shape)


# ----------------------------------------------------------------------------------
# 2. Weight quantizer: round-to-nearest, with the MSE clip search

@torch.no_grad()
def mse_clip_ratio(rows: torch.Tensor, bits: int, symmetric: bool = True, norm: float = 2.4,
                   grid: int = 100, max_shrink: float = 0.8) -> torch.Tensor:
    """Per row (rows, 1), the clip ratio p in 1.00, 0.99, ..., 0.21 whose grid gives the least
    sum |x - Q(x)|^norm, as GPTQ/QuaRot's Quantizer.find_params(mse=True): clipping a few
    large weights buys a finer grid for all the others."""
    qmin, qmax = integer_range(bits, symmetric)
    xmin, xmax = torch.aminmax(rows, dim=1, keepdim=True)
    best_ratio = torch.ones_like(xmin)
    best_err = torch.full_like(xmin, float("inf"))
    for i in range(int(max_shrink * grid)):
        shrink = 1 - i / grid
        scale, zero = _grid_of_range(xmin * shrink, xmax * shrink, bits, symmetric)
        err = round_to_grid(rows, scale, None if symmetric else zero, qmin, qmax)
        err = err.sub_(rows).abs_().pow_(norm).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, shrink, best_ratio)
    return best_ratio


def weight_clip_ratio(weight: torch.Tensor, bits: int, group_size: int | None = None,
                      symmetric: bool = True) -> torch.Tensor:
    """mse_clip_ratio of a weight (out, in), per output channel or group: (rows, 1). The search
    makes 80 passes over the weight, so it runs on chunks of rows that stay in cache."""
    rows = group_rows(weight, "row" if group_size is None else "group", group_size).float()
    return torch.cat([mse_clip_ratio(chunk, bits, symmetric) for chunk in rows.split(max(1, 2 ** 18 // rows.shape[1]))])


def weight_scale_zero(weight: torch.Tensor, bits: int, group_size: int | None = None,
                      symmetric: bool = True, clip_search: bool = True, clip_ratio: torch.Tensor | None = None):
    """Grid of a weight (out, in): per output channel, or per group of `group_size` inputs;
    clipped by the MSE search, or by given per-row ratios `clip_ratio` (rows, 1), or not at all."""
    rows = group_rows(weight, "row" if group_size is None else "group", group_size).float()
    if clip_ratio is None and not clip_search:
        return compute_scale_zero(rows, bits, symmetric)
    if clip_ratio is None:
        clip_ratio = weight_clip_ratio(weight, bits, group_size, symmetric)
    xmin, xmax = torch.aminmax(rows, dim=1, keepdim=True)
    return _grid_of_range(xmin * clip_ratio, xmax * clip_ratio, bits, symmetric)


def quantize_weight_rtn(weight: torch.Tensor, bits: int, group_size: int | None = None,
                        symmetric: bool = True, clip_search: bool = True,
                        return_grid: bool = False, clip_ratio: torch.Tensor | None = None) -> "torch.Tensor | WeightOnGrid":
    """Round-to-nearest weight quantization; returns the dequantized weight (same dtype), or
    with return_grid a WeightOnGrid of a weight (out, in). clip_ratio (rows, 1): fixed clip
    ratios instead of the search (extras/spinquant.py re-searches them now and then).
    Differentiable by the straight-through estimator (the grid is chosen without gradient)."""
    check_bits(bits, "w_bits")
    rows = group_rows(weight, "row" if group_size is None else "group", group_size)
    scale, zero = weight_scale_zero(weight.detach(), bits, group_size, symmetric, clip_search, clip_ratio)  # (rows, 1)
    qmin, qmax = integer_range(bits, symmetric)
    out = round_to_grid(rows.float(), scale, None if symmetric else zero, qmin, qmax)
    out = out.reshape(weight.shape).to(weight.dtype)
    if not return_grid:
        return out
    return WeightOnGrid(out, scale.view(weight.shape[0], -1), zero.view(weight.shape[0], -1))


class WeightOnGrid(NamedTuple):
    """A quantized weight and its integer grid, one (scale, zero) per output channel and
    group of `in / n_groups` consecutive input columns (n_groups = 1: per channel):
        dequantized[o, c] = scale[o, g] * (k - zero[o, g]),  g = c // (in / n_groups),
    with k an integer in integer_range(bits, symmetric) and zero an integer (0 if symmetric).
    """
    dequantized: torch.Tensor  # (out, in)
    scale: torch.Tensor        # (out, n_groups), > 0
    zero: torch.Tensor         # (out, n_groups), integer-valued floats


# ----------------------------------------------------------------------------------
# 3. Modules: the activation quantizer and the quantized linear

class ActQuantizer(nn.Module):
    """Dynamic per-token fake quantization: each row of the last dim gets its own grid,
    computed from the row itself at run time (nothing is calibrated). Also the KV-cache
    quantizer: on K/V of shape (B, n_kv, T, head_dim) a row is one head of one token."""

    def __init__(self, bits: int, symmetric: bool = True, clip_ratio: float = 1.0):
        super().__init__()
        self.bits, self.symmetric, self.clip_ratio = check_bits(bits), symmetric, clip_ratio
        if not 0 < clip_ratio <= 1:
            raise ValueError(f"quant.py: clip_ratio={clip_ratio} must be in (0, 1]")
        self.qmin, self.qmax = integer_range(bits, symmetric)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])  # (tokens, features)
        if rows.dtype in (torch.float16, torch.bfloat16):  # the grid in fp32: bf16 has 8 bits of mantissa
            rows = rows.float()
        scale, zero = compute_scale_zero(rows, self.bits, self.symmetric, self.clip_ratio)
        out = round_to_grid(rows, scale, None if self.symmetric else zero, self.qmin, self.qmax)
        return out.reshape(x.shape).to(x.dtype)

    def extra_repr(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, per token, {kind}, clip_ratio={self.clip_ratio}"


class QuantLinear(nn.Module):
    """y = F.linear(input_quantizer(x), weight, bias): an nn.Linear look-alike.

    `weight` is stored already quantized (dequantized values on the grid), so a forward
    costs one activation quantization more than nn.Linear. Its grid, `grid` = (scale, zero)
    of shape (out, n_groups) as in WeightOnGrid, is kept as `weight_scale` and `weight_zero`
    (None for a 16-bit weight), so that save_quantized can store integer codes. With a
    `weight_quantizer`, a function such as partial(quantize_weight_rtn, bits=4) (QAT of full
    weights), `weight` holds the float weight, quantized at every forward.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 input_quantizer: nn.Module | None = None, weight_quantizer=None,
                 grid: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # an existing Parameter is kept as it is (a tied lm_head stays tied)
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.input_quantizer = input_quantizer or nn.Identity()
        self.weight_quantizer = weight_quantizer
        # buffers follow the weight's device; not persistent: state_dict() stays an nn.Linear's
        scale, zero = grid if grid is not None else (None, None)
        self.register_buffer("weight_scale", scale, persistent=False)  # (out, n_groups)
        self.register_buffer("weight_zero", zero, persistent=False)    # (out, n_groups)

    @classmethod
    def from_linear(cls, linear: nn.Module, w_bits: int = 16, a_bits: int = 16, *,
                    w_group_size: int | None = None, w_symmetric: bool = True, w_clip_search: bool = True,
                    a_symmetric: bool = True, a_clip_ratio: float = 1.0,
                    quantize_weight_every_forward: bool = False) -> "QuantLinear":
        """Wrap a linear (nn.Linear or any module exposing its effective `.weight`, e.g. a
        merged LoRALinear or an earlier QuantLinear); the weight is quantized by RTN now."""
        weight, bias = linear.weight, getattr(linear, "bias", None)
        input_quantizer = ActQuantizer(a_bits, a_symmetric, a_clip_ratio) if a_bits < 16 else None
        weight_quantizer = None
        # a weight kept as it is keeps its grid (GPTQ's, or an earlier QuantLinear's)
        grid = (linear.weight_scale, linear.weight_zero) if isinstance(linear, QuantLinear) else None
        if w_bits < 16 and quantize_weight_every_forward:
            weight_quantizer = partial(quantize_weight_rtn, bits=w_bits, group_size=w_group_size,
                                       symmetric=w_symmetric, clip_search=w_clip_search)
            weight, grid = nn.Parameter(weight.detach().clone()), None  # the float weight stays trainable
        elif w_bits < 16:
            weight, *grid = quantize_weight_rtn(weight.detach(), w_bits, w_group_size, w_symmetric, w_clip_search,
                                                return_grid=True)
        return cls(weight, bias, input_quantizer, weight_quantizer, grid)

    def forward(self, x):
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return F.linear(self.input_quantizer(x), weight, self.bias)

    def extra_repr(self):
        requantized = "" if self.weight_quantizer is None else ", weight quantized at every forward"
        return f"in_features={self.in_features}, out_features={self.out_features}{requantized}"



# ----------------------------------------------------------------------------------
# 4. The whole model

@dataclass
class QuantConfig:
    """Everything quantize_model needs; train.py and eval.py take every field as a flag
    (model.parse_config), and the GPTQ calibration size too."""
    w_bits: int = option(16, "weight bits, 2..16 (16: weights untouched)")
    a_bits: int = option(16, "activation bits at the input of q,k,v,o,gate,up,down (16: none)")
    kv_bits: int = option(16, "KV-cache bits, one grid per head and token (16: none)")
    w_method: str = option("rtn", "weight quantizer: rtn (round to nearest, MSE clip search) or gptq",
                           choices=("rtn", "gptq"), aliases=("--quant",))
    w_group_size: int | None = option(None, "weight group size in input columns (default: per output channel)",
                                      at_least=1)
    w_symmetric: bool = option(True, "symmetric weight grid (else asymmetric with a zero point)")
    w_clip_search: bool = option(True, "MSE search of each weight row's clip ratio (1.00 down to 0.21)")
    a_symmetric: bool = option(True, "symmetric activation grid")
    a_clip_ratio: float = option(1.0, "activation clip ratio in (0, 1]", at_most=1.0)
    kv_symmetric: bool = option(False, "symmetric KV-cache grid (QuaRot: asymmetric, a zero point per head and token)")
    kv_clip_ratio: float = option(0.95, "KV-cache clip ratio in (0, 1] (QuaRot: 0.95 for K and V)", at_most=1.0)
    quantize_lm_head_input: bool = option(False, "also quantize lm_head's input (its weight stays 16-bit)")
    gptq_block_size: int = option(128, "GPTQ columns per lazy-update block", at_least=1)
    gptq_damp_ratio: float = option(0.01, "GPTQ dampening, a fraction of the mean Hessian diagonal", at_least=0.0)
    gptq_act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal")
    gptq_batch_size: int = option(8, "calibration windows per forward during GPTQ", at_least=1)
    calib_windows: int = option(128, "GPTQ calibration windows (paper: 128)", at_least=1)
    calib_seq_len: int = option(2048, "tokens per GPTQ calibration window (paper: 2048)", at_least=2)
    quantize_weight_every_forward: bool = option(
        False, "QAT: keep float weights and fake-quantize them at every forward (RTN + STE)")

    def validate(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            check_bits(getattr(self, name), flag_name(name))
        if self.w_method not in ("rtn", "gptq"):
            raise ValueError(f"quant.py: w_method={self.w_method!r} (--w-method, --quant) must be rtn or gptq")
        if self.w_group_size is not None and not isinstance(self.w_group_size, int):
            raise ValueError(f"quant.py: --w-group-size={self.w_group_size!r} must be a positive integer or None")
        check_options(self)
        for name in ("a_clip_ratio", "kv_clip_ratio"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag_name(name)}={getattr(self, name)}: must be in (0, 1]")
        if self.w_method == "gptq" and self.quantize_weight_every_forward:
            raise ValueError("quant.py: quantize_weight_every_forward re-rounds by RTN at every "
                             "forward, which would undo GPTQ; use w_method='rtn' for QAT")

    @property
    def quantizes(self) -> bool:
        return min(self.w_bits, self.a_bits, self.kv_bits) < 16

    def label(self) -> str:
        """'W4A4', 'W4A4KV4', 'W16A16'."""
        return f"W{self.w_bits}A{self.a_bits}" + (f"KV{self.kv_bits}" if self.kv_bits < 16 else "")


def _quantizable_linear(block: nn.Module, path: str, where: str) -> nn.Module:
    """The module at block.<path>: an nn.Linear, a QuantLinear, or a wrapper whose extra
    parameters are merged into its effective `.weight` (a LoRALinear after merge)."""
    module = block.get_submodule(path)
    if isinstance(module, (nn.Linear, QuantLinear)):
        return module
    weight = getattr(module, "weight", None)
    extra = [n for n, _ in module.named_parameters() if n not in ("weight", "bias")]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or (extra and not getattr(module, "merged", False)):
        raise TypeError(f"quant.py: {where} is a {type(module).__name__} with parameters {extra}; expected "
                        "nn.Linear, QuantLinear or a wrapper with its adapters merged (.merged=True, "
                        "effective .weight). Merge LoRA first, or quantize before adding LoRA for QAT.")
    return module


def _with_kv_quantizer(current: nn.Module, quantizer: ActQuantizer) -> nn.Module:
    """Put the quantizer after whatever transform another stage placed on K or V."""
    if isinstance(current, (nn.Identity, ActQuantizer)):
        return quantizer
    return nn.Sequential(current, quantizer)


def quantize_model(model: nn.Module, config: QuantConfig | None = None, *, calibration: torch.Tensor | None = None,
                   progress: bool = True, **overrides) -> nn.Module:
    """Fake-quantize a model.py Transformer in place and return it.

    `quantize_model(model, w_bits=4, a_bits=4)` or `quantize_model(model, QuantConfig(...))`;
    keyword overrides are QuantConfig fields. The seven linears of every block are replaced
    by QuantLinears (accepted: nn.Linear, QuantLinear, or a merged wrapper such as lora.py's
    LoRALinear, through its effective `.weight`). Bits of 16 add no quantizer at all.
    GPTQ needs `calibration`, a LongTensor (N, T) of token windows (not the evaluation text).
    On a rotated model the down_proj quantizer sees the input after mlp.down_input_transform,
    the online Hadamard, because it sits inside down_proj.
    For QAT (train.py --qat): the activation quantizers pass gradients by the STE; with
    LoRA, quantize first and add the adapters on top (the frozen base keeps its stored
    quantized weight, the adapter path is not quantized); for full-weight QAT set
    quantize_weight_every_forward=True.
    """
    unknown = set(overrides) - {f.name for f in dataclasses.fields(QuantConfig)}
    if unknown:
        raise TypeError(f"quant.py: quantize_model got unknown option(s) {sorted(unknown)}")
    config = dataclasses.replace(config or QuantConfig(), **overrides)
    config.validate()
    if config.w_method == "gptq" and config.w_bits < 16:
        if calibration is None:
            raise ValueError("quant.py: w_method='gptq' needs calibration data: pass calibration=<LongTensor "
                             "(N, T) of token windows> (e.g. calibration_windows(tokens, 128, 2048))")
        gptq_quantize_blocks(model, calibration, config, progress)
    rtn_bits = config.w_bits if config.w_method == "rtn" else 16  # GPTQ weights are already on the grid
    activation = dict(a_symmetric=config.a_symmetric, a_clip_ratio=config.a_clip_ratio)
    for layer_idx, block in enumerate(model.layers):
        if rtn_bits < 16 or config.a_bits < 16:
            for path in BLOCK_LINEARS:
                linear = _quantizable_linear(block, path, f"layers.{layer_idx}.{path}")
                replace_module(block, path, QuantLinear.from_linear(
                    linear, rtn_bits, config.a_bits, w_group_size=config.w_group_size,
                    w_symmetric=config.w_symmetric, w_clip_search=config.w_clip_search,
                    quantize_weight_every_forward=config.quantize_weight_every_forward, **activation))
        if config.kv_bits < 16:  # after R3 on K (rotate_qk) and on V after R2 (folded into v_proj)
            attn = block.self_attn
            kv_quantizer = lambda: ActQuantizer(config.kv_bits, config.kv_symmetric, config.kv_clip_ratio)
            attn.key_transform = _with_kv_quantizer(attn.key_transform, kv_quantizer())
            attn.value_transform = _with_kv_quantizer(attn.value_transform, kv_quantizer())
    if config.quantize_lm_head_input and config.a_bits < 16:  # lm_head's weight (maybe tied) untouched
        model.lm_head = QuantLinear.from_linear(model.lm_head, 16, config.a_bits, **activation)
    model.quant_config = config
    return model


def calibration_windows(tokens, n_windows: int = 128, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """n_windows random windows of seq_len tokens from one token stream, (N, T) LongTensor
    (GPTQ's reference samples its calibration this way)."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() <= seq_len:
        raise ValueError(f"quant.py: calibration stream has {tokens.numel()} tokens, fewer than one "
                         f"window of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_windows,), generator=generator)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


# ----------------------------------------------------------------------------------
# 5. GPTQ (Frantar et al. 2022): the weight quantizer that spreads each rounding error over the
#    columns not yet rounded, block by block on calibration windows

def inverse_hessian_factor(H: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), float32: its row i says how
    quantizing column i moves the columns after it. Dampening (a share of the mean diagonal) keeps
    H invertible.

    H^-1 is never formed. With J the order-reversing permutation, Cholesky of the flipped matrix
    J H J = L L^T gives H = (J L J)(J L J)^T, J L J upper triangular; so H^-1 = U^T U with
    U = (J L J)^-1 = J L^-1 J, upper triangular with a positive diagonal: the factor (it is unique).
    One Cholesky and one triangular solve instead of a Cholesky, an inverse and a second Cholesky."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky((H + damp_ratio * H.diagonal().mean() * eye).flip(0, 1))
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1).float()


class PreparedHessian(NamedTuple):
    """What GPTQ needs of a Hessian, whatever the weight: computed once for all the linears that
    read one input (q/k/v, gate/up), since the factor is the costly part (a Cholesky and a
    triangular solve of in x in)."""
    factor: torch.Tensor       # (in, in) inverse_hessian_factor, rows and columns in quantization order
    dead: torch.Tensor         # (in,) bool: inputs that were always zero
    perm: torch.Tensor | None  # (in,) the quantization order (act_order), or None: left to right


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, damp_ratio: float = 0.01, act_order: bool = False) -> PreparedHessian:
    H = hessian.detach().double().clone()  # (in, in)
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    perm = None
    if act_order:  # quantize the columns with the largest inputs first
        perm = torch.argsort(H.diagonal(), descending=True)
        H = H[perm][:, perm]
    return PreparedHessian(inverse_hessian_factor(H, damp_ratio), dead, perm)


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, bits: int,
                         group_size: int | None = None, symmetric: bool = True,
                         clip_search: bool = True, block_size: int = 128,
                         damp_ratio: float = 0.01, act_order: bool = False,
                         return_grid: bool = False) -> torch.Tensor | WeightOnGrid:
    """GPTQ (Frantar et al. 2022, Algorithm 1) for one linear; returns the dequantized weight.

    weight: (out, in); hessian: (in, in) = 2/n sum_tokens x x^T of this linear's inputs, or
    prepare_hessian's result for it (then damp_ratio and act_order are the ones it was prepared with).
    Columns are quantized left to right; each column's rounding error is spread over
    the columns not yet quantized, weighted by the inverse Hessian, so that the layer's
    output on the calibration inputs (not the weight itself) stays close.

    act_order: quantize the columns in order of decreasing diag(H) instead; with groups
    their grids are then "static", chosen up front from the weight's original groups.
    return_grid: return a WeightOnGrid (dequantized, scale, zero) with the grid every
    value was rounded onto. Needed because a group's grid is chosen during the algorithm,
    from its columns after the earlier errors were spread onto them: it cannot be
    recomputed from the weight afterwards.
    """
    check_bits(bits, "w_bits")
    qmin, qmax = integer_range(bits, symmetric)
    W = weight.detach().float().clone()  # (out, in)
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, damp_ratio, act_order)
    H_inv, dead, perm = prepared
    act_order = perm is not None
    n_cols = W.shape[1]
    if group_size is not None:
        group_rows(W, "group", group_size)  # checks that group_size divides the width
        # groups must not straddle a block, so that a group's grid is chosen from its
        # columns after all earlier errors have been spread onto them
        block_size = max(group_size, block_size // group_size * group_size)

    W[:, dead] = 0
    # grids[g] = (scale, zero), each (out, 1): the grid of the g-th group of original columns
    n_groups = 1 if group_size is None else n_cols // group_size
    grids = [None] * n_groups
    if group_size is None:  # one grid per output channel, from the whole row
        scale, zero = weight_scale_zero(W, bits, None, symmetric, clip_search)
        grids[0] = (scale, zero)
    elif act_order:  # static groups: fixed up front in the original column order
        grids = [weight_scale_zero(W[:, c:c + group_size], bits, None, symmetric, clip_search)
                 for c in range(0, n_cols, group_size)]
    if act_order:  # in prepare_hessian's order: the columns with the largest inputs first
        W = W[:, perm]
    Q = torch.zeros_like(W)
    for b1 in range(0, n_cols, block_size):
        b2 = min(b1 + block_size, n_cols)
        W_block = W[:, b1:b2].clone()
        err_block = torch.zeros_like(W_block)
        H_inv_block = H_inv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if group_size is not None:
                if act_order:
                    scale, zero = grids[int(perm[col]) // group_size]
                elif col % group_size == 0:  # a new group: its grid from its columns as updated so far
                    scale, zero = weight_scale_zero(W_block[:, i:i + group_size], bits, None,
                                                    symmetric, clip_search)
                    grids[col // group_size] = (scale, zero)
            w = W_block[:, i:i + 1]  # (out, 1)
            q = round_to_grid(w, scale, None if symmetric else zero, qmin, qmax)
            Q[:, col:col + 1] = q
            err = (w - q) / H_inv_block[i, i]
            W_block[:, i:] -= err * H_inv_block[i:i + 1, i:]  # rank-1 update, (out, 1) * (1, rest)
            err_block[:, i:i + 1] = err
        W[:, b2:] -= err_block @ H_inv[b1:b2, b2:]  # lazy batch update of the later columns
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    if not return_grid:
        return Q.to(weight.dtype)
    scales = torch.cat([group_scale for group_scale, _ in grids], dim=1)  # (out, n_groups)
    zeros = torch.cat([group_zero for _, group_zero in grids], dim=1)     # (out, n_groups)
    return WeightOnGrid(Q.to(weight.dtype), scales, zeros)


class HessianAccumulator:
    """H = 2/n sum x x^T over every token x fed to `add`; sums in float64 so that many
    calibration batches do not lose precision."""

    def __init__(self, n_features: int, device=None):
        self.sum_xxt = torch.zeros(n_features, n_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sum_xxt += (x.T @ x).double()
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum_xxt * (2.0 / max(self.n_tokens, 1))


class _StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not run."""


@torch.no_grad()
def gptq_quantize_blocks(model: nn.Module, calibration: torch.Tensor, config: QuantConfig, progress: bool = True):
    """GPTQ on every linear of model.layers, block by block, in place (each becomes a
    QuantLinear holding its GPTQ weight, with no input quantizer yet).

    Sequential: the calibration windows go through the embedding once; each block then
    sees the outputs of the already-quantized blocks before it. Inside a block the
    groups are quantized in forward order (q/k/v, o, gate/up, down: GPTQ's "true
    sequential"), so o_proj's Hessian already reflects the quantized q/k/v. Activations
    are not quantized while GPTQ collects its Hessians (as in QuaRot). Embeddings and
    lm_head are untouched.
    """
    if not (isinstance(calibration, torch.Tensor) and calibration.dim() == 2 and not calibration.is_floating_point()):
        raise ValueError("quant.py: calibration must be a LongTensor of token windows (N, T), e.g. from "
                         f"calibration_windows(); got {type(calibration).__name__} "
                         f"{tuple(getattr(calibration, 'shape', ()))}")
    device = next(model.parameters()).device
    block_inputs = []  # (hidden (B, T, d), other positional args, kwargs) per calibration batch

    def catch_block_input(module, args, kwargs):
        block_inputs.append((args[0], args[1:], kwargs))
        raise _StopForward

    handle = model.layers[0].register_forward_pre_hook(catch_block_input, with_kwargs=True)
    try:
        for batch in calibration.split(config.gptq_batch_size):
            try:
                model(batch.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()

    for layer_idx, block in enumerate(tqdm(model.layers, desc="GPTQ blocks", disable=not progress)):
        for shared in BLOCK_INPUTS:  # linears that read one input share its Hessian
            linears = {path: _quantizable_linear(block, path, f"layers.{layer_idx}.{path}")
                       for path in shared.linears}
            first = linears[shared.linears[0]]
            # the linears of a group share one input, hence one Hessian
            hessian = HessianAccumulator(first.weight.shape[1], device)

            def accumulate(module, args):
                hessian.add(args[0])
                raise _StopForward  # nothing after this input is needed

            handle = first.register_forward_pre_hook(accumulate)
            try:
                for x, args, kwargs in block_inputs:
                    try:
                        block(x, *args, **kwargs)
                    except _StopForward:
                        pass
            finally:
                handle.remove()
            H = prepare_hessian(hessian.hessian(), config.gptq_damp_ratio, config.gptq_act_order)
            for path, linear in linears.items():
                weight, *grid = gptq_quantize_weight(
                    linear.weight, H, config.w_bits, config.w_group_size, config.w_symmetric,
                    config.w_clip_search, config.gptq_block_size, config.gptq_damp_ratio, config.gptq_act_order,
                    return_grid=True)
                replace_module(block, path, QuantLinear(weight, getattr(linear, "bias", None), grid=grid))
        # this block's outputs, with its quantized weights, are the next block's inputs
        block_inputs = [(block(x, *args, **kwargs), args, kwargs) for x, args, kwargs in block_inputs]
