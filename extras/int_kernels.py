"""Real integer arithmetic: a quantized model's linears on int8 matrix products (--int-kernels).

Beyond the paper. Every quantized number of this project comes from fake quantization (quant.py):
weights and activations rounded to their integer grids, then multiplied back in float. Here the
same model runs on the integers themselves: each linear multiplies the int8 codes of its input by
the int8 codes of its weight with torch._int_mm (exact, int32 accumulation) and rescales once. Its
outputs equal the fake QuantLinear's up to float32 rounding, which shows what fake quantization
stands for: the product integer hardware computes. The online Hadamards, the norms, attention and
the KV cache are left as they are; 16-bit weights (lm_head, --w-bits 16) stay float.

    python eval.py --model out/train/quantized --int-kernels --tasks arc_easy --limit 20   # a saved one
    python eval.py --model smollm2-135m-instruct --rotate --bits 4 --int-kernels --tasks none --ppl --ppl-windows 4

The equation. A QuantLinear's weight is W[o, c] = s_w[o, g] (k_w[o, c] - z_w[o, g]), g the group of
column c (one group: per output channel), and its ActQuantizer puts token t of the input on
x^[t, c] = s_x[t] (k_x[t, c] - z_x[t]); every k and z is an integer (z = 0 on a symmetric grid). So

    y[t, o] = sum_c x^[t, c] W[o, c] = sum_g s_x[t] s_w[o, g] N[t, o, g],
    N[t, o, g] = sum_{c in g} (k_x[t, c] - z_x[t]) (k_w[o, c] - z_w[o, g])        (an integer)

N is computed exactly, on integers; only the rescale s_x s_w N and the sum over groups round (about
three float32 roundings). The fake path rounds at every product and partial sum of F.linear instead
(K of them, K = in_features): the two agree within (K + n_groups + 5) * 2^-24 * sum_c |x^_c W_oc|,
the bound tests/test_int_kernels.py asserts; of the two, the integer path is the exact one.

int8 codes. A b-bit symmetric grid has k in [-2^(b-1), 2^(b-1) - 1], which is int8 for b <= 8; an
asymmetric one has k in [0, 2^b - 1], and at 8 bits 255 is no int8. So every code is stored as
q = k - m, m = qmin + 2^(b-1) (m = 0 symmetric, 2^(b-1) asymmetric): q lies in [-2^(b-1), 2^(b-1) - 1]
either way. The zero point moves by the same m, r = z - m, and k - z = q - r exactly, so
    N = sum q_x q_w  -  r_w sum_{c in g} q_x  -  r_x sum_{c in g} (q_w - r_w)
(expand (q_x - r_x)(q_w - r_w)): torch._int_mm gives the first sum, the zero-point terms are a row
sum of the input codes and a constant of the weight; both vanish on symmetric grids.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.options import BadValue, option
from model import replace_module
from quant import ActQuantizer, QuantConfig, QuantLinear, compute_scale_zero, integer_range

FLAG = "--int-kernels"
# int32 cannot overflow: |q| <= 2^7, so each term of N's three sums is at most 2^14, 2^14 and 2^15 in
# size, and every partial sum of N at most 2^16 * width, below 2^31 while a group has < 2^15 columns
MAX_GROUP_WIDTH = 2 ** 15 - 1


def int_kernels_option():
    """The flag's field, the same in every script (eval.py, train.py, extras/sample.py)."""
    return option(False, "run the quantized linears on int8 matrix products (torch._int_mm) instead of "
                  "fake quantization (extras/int_kernels.py); the same outputs up to float32 rounding")


def check_runs_on_integers(config: QuantConfig):
    """BadValue naming --int-kernels if quantize_model(config) would give linears this path cannot run."""
    if config.w_bits > 8 or config.a_bits > 8:
        raise BadValue(f"{FLAG}: needs --w-bits and --a-bits of at most 8 (int8 codes on both sides of the "
                       f"product); got {config.label()}")
    if config.quantize_weight_every_forward:
        raise BadValue(f"{FLAG}: a weight quantized at every forward (QAT) has no fixed integer codes")


def int8_matmul(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """a (m, k) int8 @ b (k, n) int8 -> (m, n) int32, exact. torch._int_mm takes any shape on the CPU;
    on CUDA it wants m > 16 and k, n multiples of 8, so there the operands are padded with zero codes
    (a zero adds nothing to a sum) and the result cut back (pad=None: only on CUDA; untested on a GPU)."""
    if not (a.is_cuda if pad is None else pad):
        return torch._int_mm(a, b)
    m, n = a.shape[0], b.shape[1]
    pad_k = -a.shape[1] % 8
    a = F.pad(a, (0, pad_k, 0, max(17 - m, 0)))  # (max(m, 17), k + pad_k)
    b = F.pad(b, (0, -n % 8, 0, pad_k))           # (k + pad_k, n rounded up to 8)
    return torch._int_mm(a, b)[:m, :n]


def _middle(bits: int, symmetric: bool) -> int:
    """m = qmin + 2^(b-1): q = k - m is int8 on either grid."""
    return integer_range(bits, symmetric)[0] + 2 ** (bits - 1)


class IntegerLinear(nn.Module):
    """A QuantLinear on integers: y = rescale(int8 input codes @ int8 weight codes), as the module
    docstring derives. An nn.Linear look-alike: `weight` is the dequantized weight, the fake one."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w_bits: int, w_symmetric: bool,
                 input_quantizer: ActQuantizer, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        n_groups = scale.shape[1]
        self.group_width = self.in_features // n_groups
        self.w_bits, self.w_symmetric = w_bits, w_symmetric
        self.input_quantizer, self.bias = input_quantizer, bias
        m_w = _middle(w_bits, w_symmetric)
        q_w = (codes - m_w).view(self.out_features, n_groups, self.group_width).transpose(0, 1)  # (groups, out, width)
        self.register_buffer("weight_codes", q_w.to(torch.int8).contiguous())  # q_w = k_w - m_w
        self.register_buffer("weight_scale", scale.float())                       # (out, groups)
        r_w = (zero - m_w).to(torch.int32)                                         # (out, groups)
        self.register_buffer("weight_zero", r_w.T.contiguous())                     # (groups, out): r_w = z_w - m_w
        # sum_{c in g} (q_w - r_w) = sum_{c in g} (k_w - z_w), the constant of the input's zero-point term
        sums = self.weight_codes.sum(2, dtype=torch.int32) - self.group_width * self.weight_zero
        self.register_buffer("weight_sums", sums)                                   # (groups, out)

    @classmethod
    def from_quant_linear(cls, linear: QuantLinear, config: QuantConfig, where: str) -> "IntegerLinear":
        """The integer codes of a QuantLinear's weight, from its weight and grid (weight_scale, weight_zero)."""
        if linear.weight_quantizer is not None:
            raise BadValue(f"{FLAG}: {where} quantizes its float weight at every forward (QAT): no fixed codes")
        aq = linear.input_quantizer
        if not isinstance(aq, ActQuantizer) or aq.bits > 8:
            bits = aq.bits if isinstance(aq, ActQuantizer) else 16
            raise BadValue(f"{FLAG}: {where} has a {config.w_bits}-bit weight but {bits}-bit inputs; the int8 "
                           "product needs activations of at most 8 bits (--a-bits 8 or less)")
        check_runs_on_integers(config)
        weight = linear.weight.detach()
        n_groups = linear.weight_scale.shape[1]
        if weight.shape[1] // n_groups > MAX_GROUP_WIDTH:
            raise BadValue(f"{FLAG}: {where} sums {weight.shape[1] // n_groups} columns per grid, more than "
                           f"int32 accumulation holds safely ({MAX_GROUP_WIDTH}); use --w-group-size")
        per_column = lambda t: t.float().repeat_interleave(weight.shape[1] // n_groups, dim=1)  # (out, in)
        scale, zero = per_column(linear.weight_scale), per_column(linear.weight_zero)
        codes = torch.round(weight.float() / scale) + zero  # k_w, (out, in)
        qmin, qmax = integer_range(config.w_bits, config.w_symmetric)
        on_grid = torch.equal(((codes - zero) * scale).to(weight.dtype), weight)  # as round_to_grid made it
        if codes.min() < qmin or codes.max() > qmax or not on_grid:
            raise BadValue(f"{FLAG}: {where}'s weight is not on its {config.w_bits}-bit grid (cast after "
                           "quantizing, e.g. --dtype bfloat16? the integer path runs float32 models)")
        return cls(codes, linear.weight_scale, linear.weight_zero, config.w_bits, config.w_symmetric,
                   aq, linear.bias)

    def input_codes(self, rows: torch.Tensor):
        """ActQuantizer's grid of each row, as integers: (q_x (T, in) int8, s_x (T, 1), r_x (T, 1) int32),
        with x^ = s_x (q_x - r_x). The very operations of quant.round_to_grid, so the same codes."""
        aq = self.input_quantizer
        scale, zero = compute_scale_zero(rows, aq.bits, aq.symmetric, aq.clip_ratio)  # (T, 1) each
        k = torch.round(rows / scale)
        if not aq.symmetric:
            k.add_(zero)
        k.clamp_(aq.qmin, aq.qmax)
        m_x = _middle(aq.bits, aq.symmetric)
        return (k - m_x).to(torch.int8), scale, (zero - m_x).to(torch.int32)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features)  # (T, in)
        if rows.dtype in (torch.float16, torch.bfloat16):  # the grid in fp32, as ActQuantizer does
            rows = rows.float()
        q_x, s_x, r_x = self.input_codes(rows)
        y = None
        for g, q_w in enumerate(self.weight_codes):  # q_w (out, width): one grid of the weight per group
            q_x_g = q_x[:, g * self.group_width:(g + 1) * self.group_width]  # (T, width)
            n = int8_matmul(q_x_g, q_w.T)  # (T, out) int32: sum q_x q_w
            if not self.w_symmetric:  # - r_w sum q_x
                n -= self.weight_zero[g] * q_x_g.sum(1, keepdim=True, dtype=torch.int32)
            if not self.input_quantizer.symmetric:  # - r_x sum (q_w - r_w)
                n -= r_x * self.weight_sums[g]
            part = n.to(s_x.dtype).mul_(s_x).mul_(self.weight_scale[:, g])  # s_x s_w N, (T, out)
            y = part if y is None else y.add_(part)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """s_w (q_w - r_w) = s_w (k_w - z_w), (out, in) float32: bit for bit the fake QuantLinear's weight."""
        q = (self.weight_codes - self.weight_zero[:, :, None]).float()  # (groups, out, width)
        return (q * self.weight_scale.T[:, :, None]).transpose(0, 1).reshape(self.out_features, self.in_features)

    def extra_repr(self):
        kind = lambda symmetric: "symmetric" if symmetric else "asymmetric"  # noqa: E731
        groups = "per channel" if self.weight_codes.shape[0] == 1 else f"groups of {self.group_width}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, W{self.w_bits} {groups} "
                f"{kind(self.w_symmetric)}, torch._int_mm")


def use_integer_kernels(model: nn.Module) -> nn.Module:
    """Swap every quantized QuantLinear of `model` (a weight on a grid, an input quantizer of at most 8
    bits) for an IntegerLinear, in place, and return the model. QuantLinears with a 16-bit weight
    (lm_head's input quantizer, --w-bits 16) stay float. What the integer path cannot run is a
    BadValue naming --int-kernels, never a silent fallback to fake quantization."""
    config = getattr(model, "quant_config", None)
    if not isinstance(config, QuantConfig) or config.w_bits == 16:
        raise BadValue(f"{FLAG}: the model has no quantized weights to run on integers; quantize it "
                       "(--bits 4, or --w-bits/--a-bits) or load a quantized checkpoint (OUT/quantized)")
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and (module.weight_scale is not None or module.weight_quantizer is not None):
            replace_module(model, name, IntegerLinear.from_quant_linear(module, config, name))
    return model
