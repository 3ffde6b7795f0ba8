"""quant.py: the integer grid, the straight-through estimator, RTN and GPTQ, QuantLinear and
quantize_model on tiny random models. On stories260K and SmolLM2-135M: tests/test_quant_real.py.
Saved quantized models (extras/quantized_checkpoint.py) are tests/test_quantized.py's.

    python -m pytest tests/test_quant.py -x -q
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import LINEAR_PATHS, assert_on_integer_grid, module_at, tiny_model
from quant import (ActQuantizer, HessianAccumulator, QuantConfig, QuantLinear, calibration_windows, compute_scale_zero,
                   fake_quantize, gptq_quantize_weight, group_rows, integer_range, quantize_model,
                   quantize_weight_rtn, weight_scale_zero)

GRANULARITIES = [("tensor", None), ("row", None), ("group", 8)]


def heavy_tailed(*shape, seed=0):
    """Gaussian values with a few large outliers, like real weights and activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    outliers = torch.rand(*shape, generator=g) < 0.02
    return torch.where(outliers, x * 20, x)


def grid_integers(dequantized, scale, zero, granularity, group_size):
    """(x / scale + zero) for a dequantized tensor, row by row of its grid."""
    return group_rows(dequantized, granularity, group_size) / scale + zero



def rtn_grid(weight, bits, group_size=None, symmetric=True, clip_search=True):
    """The grid quantize_weight_rtn rounds `weight` (out, in) onto, as (scale, zero) of shape (out, n_groups)."""
    scale, zero = weight_scale_zero(weight, bits, group_size, symmetric, clip_search)  # (out * n_groups, 1) each
    return scale.view(weight.shape[0], -1), zero.view(weight.shape[0], -1)


# ---------------------------------------------------------------- the integer grid

@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_every_value_lies_on_its_integer_grid(granularity, group_size, symmetric, bits):
    x = heavy_tailed(6, 32) + (0.0 if symmetric else 1.5)  # asymmetric: a shifted range
    scale, zero = compute_scale_zero(group_rows(x, granularity, group_size), bits, symmetric)
    xq = fake_quantize(x, bits, granularity, group_size, symmetric)
    assert xq.shape == x.shape
    q = grid_integers(xq, scale, zero, granularity, group_size)
    qmin, qmax = integer_range(bits, symmetric)
    assert (q - q.round()).abs().max() < 1e-3
    assert q.round().min() >= qmin and q.round().max() <= qmax
    if symmetric:
        assert (zero == 0).all()
    else:
        assert (zero == zero.round()).all() and zero.min() >= qmin and zero.max() <= qmax
    # the grid is used, not wasted: each row's extreme value lands on an end of the range
    qr = q.round()
    assert ((qr == qmin) | (qr == qmax) | (qr == -qmax)).any(dim=1).all()


def test_integer_ranges():
    assert integer_range(4, True) == (-8, 7)
    assert integer_range(4, False) == (0, 15)
    assert integer_range(8, True) == (-128, 127)


@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantizing_twice_changes_nothing(granularity, group_size, symmetric):
    x = heavy_tailed(6, 32, seed=1)
    once = fake_quantize(x, 4, granularity, group_size, symmetric)
    twice = fake_quantize(once, 4, granularity, group_size, symmetric)
    assert torch.allclose(once, twice, atol=1e-6, rtol=1e-6)  # float rounding only
    w_once = quantize_weight_rtn(x, 3, symmetric=symmetric, clip_search=True)
    assert torch.allclose(quantize_weight_rtn(w_once, 3, symmetric=symmetric, clip_search=True), w_once, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step_inside_the_clip_range(symmetric):
    x = heavy_tailed(16, 64, seed=2)
    clip = 0.6  # so that some values fall outside the range and are clamped
    scale, zero = compute_scale_zero(x, 4, symmetric, clip)
    qmin, qmax = integer_range(4, symmetric)
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    xq = fake_quantize(x, 4, "row", symmetric=symmetric, clip_ratio=clip)
    inside = (x >= low) & (x <= high)
    assert inside.any() and (~inside).any()
    err = (xq - x).abs()
    half_step = (scale / 2).expand_as(x)
    assert (err[inside] <= half_step[inside] * (1 + 1e-5)).all()
    assert torch.allclose(xq[~inside], torch.clamp(x, low, high)[~inside], atol=1e-5)


def test_all_zero_rows_get_a_nonzero_scale():
    x = torch.zeros(3, 8)
    x[1] = torch.linspace(-1, 1, 8)
    for symmetric in (True, False):
        scale, _ = compute_scale_zero(x, 4, symmetric)
        assert (scale > 0).all()
        assert torch.equal(fake_quantize(x, 4, symmetric=symmetric)[0], x[0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_straight_through_gradient_is_identity_inside_and_zero_outside(symmetric):
    x = heavy_tailed(8, 32, seed=3).requires_grad_()
    clip = 0.5
    upstream = torch.randn(8, 32)
    (fake_quantize(x, 4, "row", symmetric=symmetric, clip_ratio=clip) * upstream).sum().backward()
    scale, zero = compute_scale_zero(x.detach(), 4, symmetric, clip)
    qmin, qmax = integer_range(4, symmetric)
    unclamped = torch.round(x.detach() / scale) + zero
    inside = (unclamped >= qmin) & (unclamped <= qmax)  # where the clamp does not act
    assert inside.any() and (~inside).any()
    assert torch.equal(x.grad, upstream * inside)
    # away from the ends of the range (by more than the half step that rounds onto them)
    # inside and outside are plain intervals of x
    low, high = (qmin - zero) * scale, (qmax - zero) * scale
    assert inside[(x > low + scale) & (x < high - scale)].all()
    assert not inside[(x < low - scale) | (x > high + scale)].any()


def test_activation_quantizer_passes_gradients_for_training():
    x = torch.randn(200, 16, requires_grad=True)
    for quantizer in (ActQuantizer(4), ActQuantizer(4, symmetric=False)):
        x.grad = None
        quantizer(x).sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))  # clip ratio 1: nothing is clamped


@pytest.mark.parametrize("bits", [1, 17, 0, 4.0, True, "4"])
def test_bits_out_of_range_are_a_clear_error(bits):
    with pytest.raises(ValueError, match="from 2 to 16"):
        fake_quantize(torch.randn(4, 8), bits)
    with pytest.raises(ValueError, match="from 2 to 16"):
        quantize_model(tiny_model(), w_bits=bits)


def test_group_size_that_does_not_divide_the_width_is_a_clear_error():
    with pytest.raises(ValueError, match="group_size=5 does not divide the width 32"):
        fake_quantize(torch.randn(4, 32), 4, "group", 5)
    with pytest.raises(ValueError, match="does not divide the width 64"):
        quantize_model(tiny_model(), w_bits=4, w_group_size=24)
    with pytest.raises(ValueError, match="granularity"):
        fake_quantize(torch.randn(4, 32), 4, "channel")


def test_gptq_without_calibration_and_unknown_options_are_clear_errors():
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(tiny_model(), w_bits=4, w_method="gptq")
    with pytest.raises(ValueError, match="LongTensor of token windows"):
        quantize_model(tiny_model(), w_bits=4, w_method="gptq", calibration=torch.randn(2, 8))
    with pytest.raises(ValueError, match="w_method"):
        quantize_model(tiny_model(), w_bits=4, w_method="awq")
    with pytest.raises(TypeError, match="unknown option"):
        quantize_model(tiny_model(), wbits=4)


# ---------------------------------------------------------------- weight quantizers

@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_clip_search_never_loses_and_clips_outlier_rows(symmetric):
    w = heavy_tailed(64, 128, seed=4)
    qmin, qmax = integer_range(3, symmetric)

    def row_error(scale, zero):
        dq = torch.clamp(torch.round(w / scale) + zero, qmin, qmax).sub(zero).mul(scale)
        return (dq - w).abs().pow(2.4).sum(1)

    plain = compute_scale_zero(w, 3, symmetric)
    searched = weight_scale_zero(w, 3, symmetric=symmetric, clip_search=True)
    assert (row_error(*searched) <= row_error(*plain) * (1 + 1e-6)).all()
    assert (row_error(*searched) < row_error(*plain)).float().mean() > 0.5  # outliers: clipping pays
    assert (searched[0] <= plain[0] * (1 + 1e-6)).all()                    # it only ever shrinks


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_weights_lie_on_their_integer_grid_at_the_nearest_point(symmetric, group_size, clip_search):
    w = heavy_tailed(24, 64, seed=12) + (0.0 if symmetric else 0.5)  # asymmetric: a shifted range
    wq = quantize_weight_rtn(w, 3, group_size, symmetric, clip_search)
    scale, zero = rtn_grid(w, 3, group_size, symmetric, clip_search)  # (24, n_groups) each
    assert_on_integer_grid(wq, scale, zero, 3, symmetric)
    # round to nearest: inside the (maybe clipped) range at most half a step away, outside clamped
    qmin, qmax = integer_range(3, symmetric)
    per_column = lambda t: t.repeat_interleave(64 // scale.shape[1], dim=1)  # (24, n_groups) -> (24, 64)
    low, high = per_column((qmin - zero) * scale), per_column((qmax - zero) * scale)
    inside = (w >= low) & (w <= high)
    assert ((wq - w).abs()[inside] <= per_column(scale / 2)[inside] * (1 + 1e-5)).all()
    assert torch.allclose(wq[~inside], torch.maximum(torch.minimum(w, high), low)[~inside], atol=1e-5)
    if clip_search:  # the heavy tails make clipping pay: some values are clamped
        assert (~inside).any()


def test_per_group_weight_quantization_uses_one_grid_per_group():
    w = heavy_tailed(8, 64, seed=5)
    wq = quantize_weight_rtn(w, 3, group_size=16, clip_search=False)
    scale, zero = compute_scale_zero(group_rows(w, "group", 16), 3)
    q = group_rows(wq, "group", 16) / scale
    assert (q - q.round()).abs().max() < 1e-3
    assert not torch.allclose(wq, quantize_weight_rtn(w, 3, clip_search=False))  # differs from per channel


def test_hessian_accumulator_is_2_over_n_sum_xxT_across_batches():
    x = torch.randn(3, 10, 6)
    acc = HessianAccumulator(6)
    for part in x.split(1):
        acc.add(part)
    flat = x.reshape(-1, 6).double()
    assert torch.allclose(acc.hessian(), 2 * flat.T @ flat / 30, atol=1e-12)


@pytest.mark.parametrize("damp", [0.01, 0.1])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(damp):
    """GPTQ's factor computed without forming H^-1 (Cholesky of the flipped H) equals the textbook
    one, cholesky(inverse(H + damp mean(diag H) I), upper): a rank-deficient H, as from few tokens."""
    from quant import inverse_hessian_factor
    x = torch.randn(20, 48, dtype=torch.float64) * torch.linspace(0.1, 3.0, 48, dtype=torch.float64)
    H = 2 * x.T @ x / 20  # rank 20 < 48: the dampening makes it invertible
    damped = H + damp * H.diagonal().mean() * torch.eye(48, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    U = inverse_hessian_factor(H, damp)
    assert U.dtype == torch.float32 and torch.equal(U, U.triu())
    assert torch.allclose(U.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max())
    assert torch.allclose(U.double().T @ U.double() @ damped, torch.eye(48, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(clip_search):
    """No correlation between inputs: nothing to compensate, so GPTQ must reduce to RTN,
    grids included (returned per (row, group) in the original column order)."""
    w = heavy_tailed(16, 256, seed=6)
    hessian = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(6)) + 0.5)
    for kwargs in (dict(), dict(symmetric=False), dict(group_size=32), dict(act_order=True),
                   dict(group_size=32, act_order=True, symmetric=False)):
        group_size, symmetric = kwargs.get("group_size"), kwargs.get("symmetric", True)
        gptq, scale, zero = gptq_quantize_weight(w, hessian, 4, clip_search=clip_search, return_grid=True, **kwargs)
        rtn = quantize_weight_rtn(w, 4, group_size, symmetric, clip_search=clip_search)
        assert torch.allclose(gptq, rtn, atol=1e-6), kwargs
        rtn_scale, rtn_zero = rtn_grid(w, 4, group_size, symmetric, clip_search)
        assert torch.allclose(scale, rtn_scale) and torch.equal(zero, rtn_zero), kwargs


def correlated_inputs(n_tokens, n_features, seed):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_features, n_features, generator=g) / math.sqrt(n_features)
    return torch.randn(n_tokens, n_features, generator=g) @ (mixing + torch.eye(n_features))


@pytest.mark.parametrize("clip_search", [False, True])  # True: the default, as train.py and eval.py use it
@pytest.mark.parametrize("options", [dict(), dict(symmetric=False), dict(group_size=32),
                                     dict(symmetric=False, group_size=32), dict(act_order=True),
                                     dict(group_size=32, act_order=True),
                                     dict(symmetric=False, group_size=32, act_order=True),
                                     dict(block_size=48, group_size=32)])
def test_gptq_lowers_the_layer_output_error_and_stays_on_the_grid(options, clip_search):
    x = correlated_inputs(2048, 192, seed=7)  # (tokens, in)
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(8))  # (out, in)
    acc = HessianAccumulator(192)
    acc.add(x)
    group_size, symmetric = options.get("group_size"), options.get("symmetric", True)
    gptq, scale, zero = gptq_quantize_weight(w, acc.hessian(), 3, clip_search=clip_search, return_grid=True, **options)
    assert torch.equal(gptq, gptq_quantize_weight(w, acc.hessian(), 3, clip_search=clip_search, **options))
    # both with the same grid search: GPTQ's gain is the error compensation, not a better grid
    rtn = quantize_weight_rtn(w, 3, group_size, symmetric, clip_search=clip_search)
    out_error = lambda wq: ((x @ (wq - w).T) ** 2).sum()
    # measured GPTQ/RTN: 0.54 to 0.61 without the clip search, 0.59 to 0.65 with it
    assert out_error(gptq) < 0.75 * out_error(rtn)
    # the lazy block updates are exact: the block size does not change the result
    other_blocks = gptq_quantize_weight(w, acc.hessian(), 3, clip_search=clip_search, **(options | dict(block_size=64)))
    assert torch.allclose(gptq, other_blocks, atol=1e-4)
    # every value on the integer grid GPTQ reports for its (row, group)
    assert scale.shape == zero.shape == (96, 1 if group_size is None else 192 // group_size)
    assert_on_integer_grid(gptq, scale, zero, 3, symmetric)
    if group_size is None or options.get("act_order"):
        # per channel, and act_order's static groups: grids chosen up front from the weight itself
        rtn_scale, rtn_zero = rtn_grid(w, 3, group_size, symmetric, clip_search)
        assert torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)


def textbook_gptq(weight, hessian, order, grid_of, bits, symmetric, damp_ratio=0.01):
    """GPTQ without its speed-ups, straight from the OBS update it is built on (Frantar et al.
    2022, eq. 2-3): quantize one column at a time in `order`; after each, give the columns not
    yet quantized, F, the update -(w_q - q) / [H_F^-1]_qq * [H_F^-1]_q,: that minimises the
    layer output error, re-inverting H restricted to F every step (no Cholesky, no blocks).
    grid_of(col, W) -> (scale, zero), each (out,): the grid of column `col`, given W as updated so far.
    Float64 throughout; the dampening is quant.py's (a fraction of the mean diagonal)."""
    qmin, qmax = integer_range(bits, symmetric)
    W, H = weight.double().clone(), hessian.double().clone()  # (out, in), (in, in)
    H += damp_ratio * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Q = torch.zeros_like(W)
    remaining = list(order)  # F, in quantization order: remaining[0] is the next column
    for col in order:
        H_inv = torch.linalg.inv(H[remaining][:, remaining])  # (|F|, |F|); row 0 is col's
        scale, zero = (t.double() for t in grid_of(col, W))
        Q[:, col] = scale * (torch.clamp(torch.round(W[:, col] / scale) + zero, qmin, qmax) - zero)
        W[:, remaining] -= ((W[:, col] - Q[:, col]) / H_inv[0, 0])[:, None] * H_inv[0][None, :]
        remaining = remaining[1:]
    return Q


def outlier_channel_inputs(n_tokens, n_features, seed):
    """Correlated inputs whose channels differ in scale (1x to 10x, shuffled), as real
    activations do: diag(H) is far from sorted, so the order of the columns matters."""
    g = torch.Generator().manual_seed(seed)
    channel_scales = torch.logspace(0, 1, n_features)[torch.randperm(n_features, generator=g)]
    return correlated_inputs(n_tokens, n_features, seed) * channel_scales


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,act_order", [(None, False), (None, True), (16, False), (16, True)])
def test_gptq_equals_the_column_by_column_obs_reference(group_size, act_order, symmetric):
    """The Cholesky form, the lazy block updates, the column order and the choice of each
    group's grid all reproduce the textbook algorithm (block_size=32 < 64 columns: two blocks)."""
    x = outlier_channel_inputs(1024, 64, seed=10)  # (tokens, in)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(11))  # (out, in)
    acc = HessianAccumulator(64)
    acc.add(x)
    H = acc.hessian()
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else list(range(64))
    if group_size is None:  # one grid per row, chosen from the whole row before any update
        scale, zero = weight_scale_zero(w, 3, None, symmetric)  # (24, 1) each
        grid_of = lambda col, W: (scale[:, 0], zero[:, 0])
    elif act_order:  # static groups: each column keeps the grid of its original group of w
        scale, zero = rtn_grid(w, 3, group_size, symmetric)  # (24, 4) each
        grid_of = lambda col, W: (scale[:, col // group_size], zero[:, col // group_size])
    else:  # a group's grid is chosen when its first column comes, from the group as updated so far
        grids = {}

        def grid_of(col, W):
            if col % group_size == 0:
                group_scale, group_zero = weight_scale_zero(W[:, col:col + group_size].float(), 3, None, symmetric)
                grids[col // group_size] = group_scale[:, 0], group_zero[:, 0]
            return grids[col // group_size]
    expected = textbook_gptq(w, H, order, grid_of, 3, symmetric)
    got = gptq_quantize_weight(w, H, 3, group_size, symmetric, act_order=act_order, block_size=32)
    assert torch.allclose(got.double(), expected, atol=1e-5)  # measured: 1e-6 at most


@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_act_order_is_gptq_on_columns_sorted_by_decreasing_hessian_diagonal(clip_search):
    x = outlier_channel_inputs(1024, 64, seed=10)  # (tokens, in)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(11))  # (out, in)
    acc = HessianAccumulator(64)
    acc.add(x)
    H = acc.hessian()
    perm = torch.argsort(H.diagonal(), descending=True)
    # permute w's columns and H's rows and columns, run plain GPTQ, put the columns back
    expected = gptq_quantize_weight(w[:, perm], H[perm][:, perm], 3, clip_search=clip_search)[:, torch.argsort(perm)]
    act_order = gptq_quantize_weight(w, H, 3, clip_search=clip_search, act_order=True)
    assert torch.allclose(act_order, expected, atol=1e-6)
    # and the order matters: left to right gives another weight (measured: 40 to 45% of the values differ)
    in_input_order = gptq_quantize_weight(w, H, 3, clip_search=clip_search)
    assert (act_order != in_input_order).float().mean() > 0.2


def test_gptq_dead_inputs_get_zero_weights():
    x = correlated_inputs(512, 32, seed=9)
    x[:, 5] = 0
    acc = HessianAccumulator(32)
    acc.add(x)
    wq = gptq_quantize_weight(torch.randn(8, 32), acc.hessian(), 4)
    assert (wq[:, 5] == 0).all() and torch.isfinite(wq).all()


# ---------------------------------------------------------------- QuantLinear and quantize_model

def test_quant_linear_is_the_linear_of_the_quantized_input_and_weight():
    linear = nn.Linear(32, 12, bias=True)
    ql = QuantLinear.from_linear(linear, w_bits=4, a_bits=6, w_clip_search=False)
    assert (ql.in_features, ql.out_features, ql.weight.shape) == (32, 12, (12, 32))
    x = torch.randn(3, 5, 32)
    expected = F.linear(fake_quantize(x, 6), quantize_weight_rtn(linear.weight, 4, clip_search=False), linear.bias)
    assert torch.allclose(ql(x), expected, atol=1e-6)
    stored = ql.weight.detach().clone()
    ql(x)
    assert torch.equal(ql.weight, stored)  # the weight is quantized once, not at every forward


def test_quant_linear_weight_qat_mode_trains_the_float_weight():
    linear = nn.Linear(32, 12, bias=False)
    ql = QuantLinear.from_linear(linear, w_bits=4, quantize_weight_every_forward=True, w_clip_search=False)
    assert torch.equal(ql.weight, linear.weight) and ql.weight is not linear.weight  # the float weight, copied
    # a real optimizer, built before the forward as a training loop builds it: it must hold the very
    # Parameter the forward quantizes
    optimizer = torch.optim.SGD(ql.parameters(), lr=0.1)
    x, upstream = torch.randn(4, 32), torch.randn(4, 12)
    out = ql(x)  # (4, 12)
    assert torch.allclose(out, F.linear(x, quantize_weight_rtn(linear.weight, 4, clip_search=False)), atol=1e-6)
    (out * upstream).sum().backward()
    # straight-through: with clip ratio 1 nothing is clamped, so the float linear's gradient
    assert torch.allclose(ql.weight.grad, upstream.T @ x, atol=1e-5)
    before = ql.weight.detach().clone()
    optimizer.step()
    assert torch.allclose(ql.weight, before - 0.1 * upstream.T @ x, atol=1e-6)  # the float weight moved
    with torch.no_grad():  # the next forward quantizes the new float weight
        after = ql(x)
        assert torch.allclose(after, F.linear(x, quantize_weight_rtn(ql.weight, 4, clip_search=False)), atol=1e-6)
        assert not torch.allclose(after, out)

    # without quantize_weight_every_forward the stored quantized weight is frozen: nothing to train
    frozen = QuantLinear.from_linear(linear, w_bits=4, w_clip_search=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    optimizer = torch.optim.SGD(frozen.parameters(), lr=0.1)
    x.requires_grad_()  # so that backward runs at all
    (frozen(x) * upstream).sum().backward()
    assert frozen.weight.grad is None
    stored = frozen.weight.detach().clone()
    optimizer.step()
    assert torch.equal(frozen.weight, stored)


@pytest.mark.parametrize("options", [dict(w_clip_search=False), dict(w_group_size=16, w_symmetric=False)],
                         ids=["per-channel", "asymmetric-groups-clip-search"])
def test_weight_qat_model_requantizes_every_trained_float_weight_on_its_configured_grid(options):
    """quantize_model(quantize_weight_every_forward=True), then AdamW steps on the whole model: every
    block linear keeps a trainable float weight, each forward quantizes it by RTN with the config's
    grid (bits, groups, symmetry, clip search), and the optimizer moves the float weights."""
    model = quantize_model(tiny_model(seed=5), w_bits=4, quantize_weight_every_forward=True, progress=False, **options)
    group_size, symmetric = options.get("w_group_size"), options.get("w_symmetric", True)
    clip_search = options.get("w_clip_search", True)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 7 * len(model.layers)

    def assert_forward_quantizes_the_float_weight():
        g = torch.Generator().manual_seed(0)
        for name, m in linears.items():
            float_weight = m.weight.detach()
            on_grid = m.weight_quantizer(float_weight)
            grid = rtn_grid(float_weight, 4, group_size, symmetric, clip_search)
            assert_on_integer_grid(on_grid, *grid, 4, symmetric)
            x = torch.randn(3, m.in_features, generator=g)
            with torch.no_grad():
                expected = F.linear(x, quantize_weight_rtn(float_weight, 4, group_size, symmetric, clip_search))
                assert torch.allclose(m(x), expected, atol=1e-6), name

    assert_forward_quantizes_the_float_weight()
    before = {name: m.weight.detach().clone() for name, m in linears.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in linears.values())
        optimizer.step()
    model.eval()
    assert all(not torch.equal(m.weight, before[name]) for name, m in linears.items())
    assert_forward_quantizes_the_float_weight()


def test_quantize_model_swaps_the_block_linears_only():
    model = tiny_model(tie_word_embeddings=True)
    float_model = copy.deepcopy(model)
    embed, head = model.embed_tokens.weight, model.lm_head
    quantize_model(model, w_bits=4, a_bits=4, kv_bits=4, w_clip_search=False)
    for block, float_block in zip(model.layers, float_model.layers):
        for path in LINEAR_PATHS:
            module = module_at(block, path)
            assert isinstance(module, QuantLinear) and module.input_quantizer.bits == 4
            float_weight = module_at(float_block, path).weight.detach()
            assert_on_integer_grid(module.weight, *rtn_grid(float_weight, 4, clip_search=False), 4, symmetric=True)
        assert isinstance(block.self_attn.key_transform, ActQuantizer)
        assert not block.self_attn.value_transform.symmetric
    assert model.lm_head is head and model.embed_tokens.weight is embed and model.lm_head.weight is embed
    # lm_head's input on request: its (tied) weight stays the embedding, untouched
    quantize_model(model, a_bits=6, quantize_lm_head_input=True)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.input_quantizer.bits == 6
    assert model.lm_head.weight is embed


@pytest.mark.parametrize("options", [dict(w_bits=4), dict(w_bits=4, w_symmetric=False, w_group_size=16),
                                     dict(w_bits=3, w_clip_search=False)])
def test_quantize_model_rtn_weights_are_their_float_weights_on_the_integer_grid(options):
    """Each QuantLinear holds RTN of the float weight it replaced, with the config's grid
    (bits, groups, symmetry, clip search: the default searches)."""
    float_model = tiny_model(seed=1)
    model = quantize_model(copy.deepcopy(float_model), **options)
    bits, group_size = options["w_bits"], options.get("w_group_size")
    symmetric, clip_search = options.get("w_symmetric", True), options.get("w_clip_search", True)
    for block, float_block in zip(model.layers, float_model.layers):
        for path in LINEAR_PATHS:
            weight, float_weight = module_at(block, path).weight, module_at(float_block, path).weight.detach()
            assert isinstance(module_at(block, path), QuantLinear)
            assert_on_integer_grid(weight, *rtn_grid(float_weight, bits, group_size, symmetric, clip_search),
                                   bits, symmetric)
            assert torch.equal(weight, quantize_weight_rtn(float_weight, bits, group_size, symmetric, clip_search))


def test_sixteen_bits_means_no_quantizer_at_all():
    model = tiny_model()
    reference = copy.deepcopy(model)
    quantize_model(model, w_bits=16, a_bits=16, kv_bits=16)
    idx = torch.randint(0, 128, (2, 12))
    assert all(isinstance(module_at(b, p), nn.Linear) for b in model.layers for p in LINEAR_PATHS)
    assert torch.equal(model(idx), reference(idx))
    # weights only: no input quantizer
    quantize_model(model, w_bits=8, w_clip_search=False)
    assert isinstance(model.layers[0].self_attn.q_proj.input_quantizer, nn.Identity)


def test_a_weight_quantized_model_saves_and_reloads_as_a_plain_checkpoint(tmp_path):
    from model import load_checkpoint, save_checkpoint
    model = quantize_model(tiny_model(), w_bits=4, w_clip_search=False)
    save_checkpoint(model, tmp_path)
    idx = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path)(idx), model(idx))


@pytest.mark.parametrize("a_symmetric,a_clip_ratio,kv_clip_ratio", [(False, 0.9, 0.8), (True, 0.75, 1.0)])
def test_quantize_model_activation_and_kv_options_reach_every_quantizer(a_symmetric, a_clip_ratio, kv_clip_ratio):
    """a_symmetric and a_clip_ratio shape every block linear's input grid, kv_clip_ratio every K/V grid
    (always asymmetric): each quantizer computes fake_quantize per row with exactly these options."""
    model = quantize_model(tiny_model(seed=6), a_bits=4, kv_bits=4, a_symmetric=a_symmetric,
                           a_clip_ratio=a_clip_ratio, kv_clip_ratio=kv_clip_ratio, progress=False)
    with torch.no_grad():
        for i, block in enumerate(model.layers):
            for j, path in enumerate(LINEAR_PATHS):
                linear = module_at(block, path)
                x = heavy_tailed(2, 5, linear.in_features, seed=10 * i + j) + 0.5  # shifted: asymmetry matters
                quantized_input = fake_quantize(x, 4, "row", symmetric=a_symmetric, clip_ratio=a_clip_ratio)
                assert torch.allclose(linear(x), F.linear(quantized_input, linear.weight), atol=1e-6), (i, path)
                # the options make a difference: the default grid (symmetric, no clipping) is another input
                assert not torch.allclose(quantized_input, fake_quantize(x, 4, "row"), atol=1e-3)
            for name in ("key_transform", "value_transform"):
                kv = heavy_tailed(2, 2, 7, 16, seed=100 + i)  # (B, n_kv, T, head_dim): a row per head and token
                expected = fake_quantize(kv, 4, "row", symmetric=False, clip_ratio=kv_clip_ratio)
                assert torch.equal(getattr(block.self_attn, name)(kv), expected), (i, name)
                if kv_clip_ratio < 1:
                    assert not torch.allclose(expected, fake_quantize(kv, 4, "row", symmetric=False), atol=1e-3)


def test_quantized_kv_cache_generation_equals_full_recomputation():
    """Per-token quantizers make each token's K/V independent of the others, so the
    cache must give exactly what recomputing the whole sequence gives."""
    from model import KVCache
    model = tiny_model()
    model.layers[1].self_attn.key_transform = nn.Tanh()  # a transform another stage put there stays first
    kv16 = quantize_model(copy.deepcopy(model), w_bits=4, a_bits=4, w_clip_search=False)
    quantize_model(model, w_bits=4, a_bits=4, kv_bits=4, w_clip_search=False)
    assert isinstance(model.layers[1].self_attn.key_transform[0], nn.Tanh)
    assert isinstance(model.layers[1].self_attn.key_transform[1], ActQuantizer)
    idx = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        generated = model.generate(idx, 10)
        full = model(generated[:, :-1]).argmax(-1)[:, idx.shape[1] - 1:]
    assert torch.equal(generated[:, idx.shape[1]:], full)

    # The quantizer acts: what reaches the cache lies on a 4-bit asymmetric grid of its own
    # per (head, token) row, computed from that row as it entered the quantizer.
    entering = {}  # (layer, "keys" / "values") -> the quantizer's inputs, (B, n_kv, T, hs) per call
    handles = []
    for i, block in enumerate(model.layers):
        for name, transform in (("keys", block.self_attn.key_transform), ("values", block.self_attn.value_transform)):
            quantizer = transform[-1] if isinstance(transform, nn.Sequential) else transform  # after the Tanh
            handles.append(quantizer.register_forward_pre_hook(
                lambda module, args, key=(i, name): entering.setdefault(key, []).append(args[0])))
    cache = KVCache(len(model.layers))
    with torch.no_grad():
        model(generated[:, :6], cache)    # the prompt
        model(generated[:, 6:7], cache)   # one decoding step
    for handle in handles:
        handle.remove()
    head_dim = model.layers[0].self_attn.head_dim
    for i in range(len(model.layers)):
        for name, cached in (("keys", cache.keys[i]), ("values", cache.values[i])):
            rows = torch.cat(entering[(i, name)], dim=2).reshape(-1, head_dim)  # (B * n_kv * T, hs)
            assert cached.shape[2] == 7
            scale, zero = compute_scale_zero(rows, 4, symmetric=False,  # (rows, 1) each
                                             clip_ratio=model.quant_config.kv_clip_ratio)  # 0.95, as QuaRot
            assert_on_integer_grid(cached.reshape(-1, head_dim), scale, zero, 4, symmetric=False)
    # and it changes what the model computes (same weights and activation quantizers otherwise)
    with torch.no_grad():
        assert not torch.allclose(model(generated), kv16(generated), atol=1e-4)


def test_down_proj_quantizer_sees_the_transformed_input():
    """rotate.py puts the online Hadamard in mlp.down_input_transform; the quantizer must come after it."""
    model = quantize_model(tiny_model(), a_bits=4)

    class Scale(nn.Module):
        def forward(self, h):
            return 100 * h

    seen = {}
    mlp = model.layers[0].mlp
    mlp.down_input_transform = Scale()
    mlp.down_proj.input_quantizer.register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    mlp.gate_proj.register_forward_hook(lambda m, args, out: seen.update(gate=out))
    mlp.up_proj.register_forward_hook(lambda m, args, out: seen.update(up=out))
    model(torch.randint(0, 128, (1, 8)))
    assert torch.allclose(seen["x"], 100 * F.silu(seen["gate"]) * seen["up"])


def test_quantize_model_accepts_a_merged_wrapper_and_refuses_unmerged_adapters():
    """RoLoRA's pairing: merge the LoRA adapters (lora.py), then quantize W + s B A. A wrapper
    merged in place (still there, .merged=True) is quantized through its effective weight."""
    from lora import LoRALinear, add_lora, lora_modules, merge_lora
    model = add_lora(tiny_model(), targets=("q_proj", "down_proj"), rank=4, alpha=8)
    with torch.no_grad():
        for wrapper in lora_modules(model).values():
            wrapper.lora_B.weight.normal_(0.0, 0.1)  # as after training (B = 0 would merge to W itself)
    base_weights = {name: m.weight.detach().clone() for name, m in lora_modules(model).items()}  # (out, in)
    merged_weights = {name: base_weights[name] + m.scaling * (m.lora_B.weight @ m.lora_A.weight).detach()
                      for name, m in lora_modules(model).items()}  # W + s B A
    merged_elsewhere = merge_lora(copy.deepcopy(model))  # a plain model holding W + s B A, for GPTQ below
    for wrapper in lora_modules(model).values():
        wrapper.merge()
    assert isinstance(model.layers[1].mlp.down_proj, LoRALinear)  # still wrapped
    for_gptq = copy.deepcopy(model)

    quantize_model(model, w_bits=4)
    assert len(merged_weights) == 4 and not lora_modules(model)
    for name, merged in merged_weights.items():
        quantized = model.get_submodule(name)
        assert isinstance(quantized, QuantLinear)
        assert torch.equal(quantized.weight, quantize_weight_rtn(merged, 4)), name
        assert not torch.equal(quantized.weight, quantize_weight_rtn(base_weights[name], 4)), name
    # GPTQ reads the merged weight too: the same as on the model with the wrappers removed
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    gptq = dict(w_bits=4, w_method="gptq", w_clip_search=False, calibration=windows, progress=False)  # no search: faster
    quantize_model(for_gptq, **gptq)
    quantize_model(merged_elsewhere, **gptq)
    for name in merged_weights:
        assert torch.allclose(for_gptq.get_submodule(name).weight, merged_elsewhere.get_submodule(name).weight,
                              atol=1e-6), name

    # unmerged adapters would be silently dropped: refused, naming the module
    model = add_lora(tiny_model(), targets=("layers.1.mlp.up_proj",), rank=4, alpha=8)
    with pytest.raises(TypeError, match=r"layers\.1\.mlp\.up_proj"):
        quantize_model(model, w_bits=4)


def linear_input_hessian(model, windows, layer_idx, path, batch_size):
    """H of one linear's input in `model`, collected the way quant.py's GPTQ batches it."""
    acc = HessianAccumulator(module_at(model.layers[layer_idx], path).weight.shape[1])
    handle = module_at(model.layers[layer_idx], path).register_forward_pre_hook(lambda m, args: acc.add(args[0]))
    with torch.no_grad():
        for batch in windows.split(batch_size):
            model(batch)
    handle.remove()
    return acc.hessian()


def test_gptq_is_sequential_each_hessian_comes_from_the_quantized_layers_before():
    fp = tiny_model(seed=3)
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    config = QuantConfig(w_bits=3, w_method="gptq", w_clip_search=False, gptq_batch_size=4)
    quantized = quantize_model(copy.deepcopy(fp), config, calibration=windows, progress=False)
    gptq = lambda weight, H: gptq_quantize_weight(weight, H, 3, clip_search=False)

    # layer 0, q/k/v: Hessian of the float model's input (nothing quantized before)
    H = linear_input_hessian(fp, windows, 0, "self_attn.q_proj", 4)
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        expected = gptq(module_at(fp.layers[0], path).weight, H)
        assert torch.allclose(module_at(quantized.layers[0], path).weight, expected, atol=1e-5)
    # layer 0, o_proj: from a model whose q/k/v already hold their GPTQ weights
    partial = copy.deepcopy(fp)
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        module_at(partial.layers[0], path).weight.data = module_at(quantized.layers[0], path).weight.data
    H = linear_input_hessian(partial, windows, 0, "self_attn.o_proj", 4)
    assert torch.allclose(quantized.layers[0].self_attn.o_proj.weight, gptq(fp.layers[0].self_attn.o_proj.weight, H), atol=1e-5)
    # layer 1, gate_proj: after all of layer 0 and layer 1's attention are quantized
    for path in LINEAR_PATHS:
        module_at(partial.layers[0], path).weight.data = module_at(quantized.layers[0], path).weight.data
    for path in LINEAR_PATHS[:4]:
        module_at(partial.layers[1], path).weight.data = module_at(quantized.layers[1], path).weight.data
    H = linear_input_hessian(partial, windows, 1, "mlp.gate_proj", 4)
    assert torch.allclose(quantized.layers[1].mlp.gate_proj.weight, gptq(fp.layers[1].mlp.gate_proj.weight, H), atol=1e-5)
    # GPTQ's model gives closer logits than RTN's on the calibration windows
    rtn = quantize_model(copy.deepcopy(fp), w_bits=3, w_clip_search=False)
    with torch.no_grad():
        ref = fp(windows)
        assert (quantized(windows) - ref).norm() < (rtn(windows) - ref).norm()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_factors_each_hessian_once_for_all_the_linears_that_read_its_input(monkeypatch, act_order):
    """q/k/v share one Hessian and gate/up another: 4 factors per block, not 7, and the same weights
    as quantizing each linear from the raw Hessian."""
    import quant
    fp = tiny_model(seed=3)
    windows = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    config = QuantConfig(w_bits=3, w_method="gptq", gptq_act_order=act_order, gptq_batch_size=4)
    factored = []
    real_factor = quant.inverse_hessian_factor
    monkeypatch.setattr(quant, "inverse_hessian_factor", lambda *a: factored.append(a[0].shape) or real_factor(*a))
    quantized = quantize_model(copy.deepcopy(fp), config, calibration=windows, progress=False)
    d, ff = fp.config.hidden_size, fp.config.intermediate_size
    assert factored == [(d, d), (d, d), (d, d), (ff, ff)] * fp.config.num_hidden_layers
    H = linear_input_hessian(fp, windows, 0, "self_attn.q_proj", 4)
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        alone = gptq_quantize_weight(module_at(fp.layers[0], path).weight, H, 3, act_order=act_order)
        assert torch.equal(module_at(quantized.layers[0], path).weight, alone)


def test_calibration_windows_are_seeded_slices_of_the_stream():
    tokens = torch.arange(1000)
    windows = calibration_windows(tokens, 5, 64, seed=3)
    assert windows.shape == (5, 64) and windows.dtype == torch.long
    assert (windows[:, 1:] - windows[:, :-1] == 1).all()  # contiguous slices
    assert torch.equal(windows, calibration_windows(tokens, 5, 64, seed=3))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_returns_the_grid_it_rounded_onto(symmetric, group_size):
    w = heavy_tailed(24, 64, seed=13)
    wq, scale, zero = quantize_weight_rtn(w, 3, group_size, symmetric, return_grid=True)
    assert torch.equal(wq, quantize_weight_rtn(w, 3, group_size, symmetric))
    assert_on_integer_grid(wq, scale, zero, 3, symmetric)
    linear = QuantLinear.from_linear(nn.Linear(64, 24, bias=False), 3, w_group_size=group_size, w_symmetric=symmetric)
    assert linear.weight_scale.shape == linear.weight_zero.shape == (24, 1 if group_size is None else 4)
    assert QuantLinear.from_linear(linear, 16, 4).weight_scale is linear.weight_scale  # kept with the weight
