"""quant.py: the integer grid, the straight-through estimator, RTN and GPTQ, QuantLinear,
quantize_model on tiny random models, and (slow) on stories260K and SmolLM2-135M.

    python -m pytest tests/test_quant.py -x -q            (add -m "not slow" to skip real checkpoints)
"""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_model
from quant import (ActQuantizer, HessianAccumulator, QuantConfig, QuantLinear, calibration_text,
                   calibration_windows, compute_scale_zero, fake_quantize, gptq_quantize_weight,
                   group_rows, integer_range, quantize_model, quantize_weight_rtn, weight_scale_zero)

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


def test_gptq_with_a_diagonal_hessian_is_round_to_nearest():
    """No correlation between inputs: nothing to compensate, so GPTQ must reduce to RTN."""
    w = heavy_tailed(16, 256, seed=6)
    hessian = torch.diag(torch.rand(256) + 0.5)
    for kwargs in (dict(), dict(symmetric=False), dict(group_size=32), dict(act_order=True)):
        gptq = gptq_quantize_weight(w, hessian, 4, clip_search=False, **kwargs)
        rtn = quantize_weight_rtn(w, 4, kwargs.get("group_size"), kwargs.get("symmetric", True), clip_search=False)
        assert torch.allclose(gptq, rtn, atol=1e-6), kwargs


def correlated_inputs(n_tokens, n_features, seed):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n_features, n_features, generator=g) / math.sqrt(n_features)
    return torch.randn(n_tokens, n_features, generator=g) @ (mixing + torch.eye(n_features))


@pytest.mark.parametrize("options", [dict(), dict(symmetric=False), dict(group_size=32),
                                     dict(act_order=True), dict(group_size=32, act_order=True),
                                     dict(block_size=48, group_size=32)])
def test_gptq_lowers_the_layer_output_error_and_stays_on_the_grid(options):
    x = correlated_inputs(2048, 192, seed=7)
    w = torch.randn(96, 192, generator=torch.Generator().manual_seed(8))
    acc = HessianAccumulator(192)
    acc.add(x)
    gptq = gptq_quantize_weight(w, acc.hessian(), 3, clip_search=False, **options)
    rtn = quantize_weight_rtn(w, 3, options.get("group_size"), options.get("symmetric", True), clip_search=False)
    out_error = lambda wq: ((x @ (wq - w).T) ** 2).sum()
    assert out_error(gptq) < 0.75 * out_error(rtn)  # measured: 0.54 to 0.61
    # the lazy block updates are exact: the block size does not change the result
    other_blocks = gptq_quantize_weight(w, acc.hessian(), 3, clip_search=False, **(options | dict(block_size=64)))
    assert torch.allclose(gptq, other_blocks, atol=1e-4)
    # each (row, group) holds at most 2^bits distinct values: one grid per group
    for row_group in group_rows(gptq, "group", options.get("group_size", 192)):
        assert row_group.unique().numel() <= 8


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
    ql(torch.randn(4, 32)).sum().backward()
    assert ql.weight.grad is not None and ql.weight.grad.abs().sum() > 0
    assert torch.equal(ql.weight, linear.weight)  # float weight kept; quantized in forward


LINEAR_PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def module_at(block, path):
    for part in path.split("."):
        block = getattr(block, part)
    return block


def test_quantize_model_swaps_the_block_linears_only():
    model = tiny_model(tie_word_embeddings=True)
    embed, head = model.embed_tokens.weight, model.lm_head
    quantize_model(model, w_bits=4, a_bits=4, kv_bits=4, w_clip_search=False)
    for block in model.layers:
        for path in LINEAR_PATHS:
            module = module_at(block, path)
            assert isinstance(module, QuantLinear) and module.input_quantizer.bits == 4
            row_values = [row.unique().numel() for row in module.weight]
            assert max(row_values) <= 16
        assert isinstance(block.self_attn.key_transform, ActQuantizer)
        assert not block.self_attn.value_transform.symmetric
    assert model.lm_head is head and model.embed_tokens.weight is embed and model.lm_head.weight is embed
    # lm_head's input on request: its (tied) weight stays the embedding, untouched
    quantize_model(model, a_bits=6, quantize_lm_head_input=True)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.input_quantizer.bits == 6
    assert model.lm_head.weight is embed


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


def test_quantized_kv_cache_generation_equals_full_recomputation():
    """Per-token quantizers make each token's K/V independent of the others, so the
    cache must give exactly what recomputing the whole sequence gives."""
    model = tiny_model()
    model.layers[1].self_attn.key_transform = nn.Tanh()  # a transform another stage put there stays first
    quantize_model(model, w_bits=4, a_bits=4, kv_bits=4, w_clip_search=False)
    assert isinstance(model.layers[1].self_attn.key_transform[0], nn.Tanh)
    assert isinstance(model.layers[1].self_attn.key_transform[1], ActQuantizer)
    idx = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        generated = model.generate(idx, 10)
        full = model(generated[:, :-1]).argmax(-1)[:, idx.shape[1] - 1:]
    assert torch.equal(generated[:, idx.shape[1]:], full)


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
    class Adapter(nn.Module):  # stands in for lora.py's LoRALinear: base + extra parameters
        def __init__(self, base, merged):
            super().__init__()
            self.base, self.merged = base, merged
            self.lora_A = nn.Parameter(torch.zeros(2, base.in_features))
            self.in_features, self.out_features = base.in_features, base.out_features

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            return self.base(x)

    model = tiny_model()
    q = model.layers[0].self_attn.q_proj
    model.layers[0].self_attn.q_proj = Adapter(q, merged=True)
    quantize_model(model, w_bits=4, w_clip_search=False)
    assert torch.equal(model.layers[0].self_attn.q_proj.weight, quantize_weight_rtn(q.weight, 4, clip_search=False))
    model = tiny_model()
    model.layers[1].mlp.up_proj = Adapter(model.layers[1].mlp.up_proj, merged=False)
    with pytest.raises(TypeError, match="layers.1.mlp.up_proj"):
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


def test_calibration_windows_are_seeded_slices_of_the_stream():
    tokens = torch.arange(1000)
    windows = calibration_windows(tokens, 5, 64, seed=3)
    assert windows.shape == (5, 64) and windows.dtype == torch.long
    assert (windows[:, 1:] - windows[:, :-1] == 1).all()  # contiguous slices
    assert torch.equal(windows, calibration_windows(tokens, 5, 64, seed=3))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64)


# ---------------------------------------------------------------- real checkpoints (slow)

def mirror_file(relative: str) -> Path:
    path = Path(os.environ.get("ROLORA_MIRROR", "")) / relative
    if not path.is_file():
        pytest.skip(f"{relative} not in the mirror (ROLORA_MIRROR)")
    return path


def text_windows(model_dir, relative: str, n_windows: int, seq_len: int, n_chars: int = 200_000) -> torch.Tensor:
    from model import Tokenizer
    ids = Tokenizer(model_dir).encode(calibration_text(mirror_file(relative))[:n_chars])
    assert len(ids) >= n_windows * seq_len
    return torch.tensor(ids[:n_windows * seq_len]).view(n_windows, seq_len)


def perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL over non-overlapping windows (as eval.py computes it)."""
    with torch.no_grad():
        logits = model(windows)
    return math.exp(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.fixture(scope="module")
def wikitext_smollm(smollm_dir):
    """A small slice of WikiText-2, 4 windows of 256 tokens (a forward costs seconds on CPU;
    at 128 tokens per window the perplexity is too noisy to resolve 1%)."""
    return text_windows(smollm_dir, "data/wikitext2/wiki.test.raw", 4, 256)


@pytest.fixture(scope="module")
def smollm_fp_perplexity(smollm_model, wikitext_smollm):
    return perplexity(smollm_model, wikitext_smollm)


@pytest.fixture(scope="module")
def rotated_smollm(smollm_model):
    rotate = pytest.importorskip("rotate", reason="rotate.py (the rotation issue) has not landed")
    model = copy.deepcopy(smollm_model)
    rotate.rotate_model(model)
    return model


@pytest.mark.slow
def test_w8_and_rotated_w8a8_barely_change_smollm_perplexity(smollm_model, rotated_smollm, wikitext_smollm,
                                                               smollm_fp_perplexity):
    """8-bit per-channel weights (and, on the rotated model, 8-bit per-token activations too)
    change perplexity by < 1%. Not tested because it does not hold: without rotation,
    SmolLM2's massive activations (down_proj inputs that are ~one channel, max|x|/rms = 39)
    cost per-token 8-bit activations about 4% (measured 37.01 -> 38.23 on 4 x 256 tokens)."""
    fp = smollm_fp_perplexity
    w8 = quantize_model(copy.deepcopy(smollm_model), w_bits=8, w_clip_search=False)
    assert abs(perplexity(w8, wikitext_smollm) / fp - 1) < 0.01
    w8a8 = quantize_model(copy.deepcopy(rotated_smollm), w_bits=8, a_bits=8, w_clip_search=False)
    assert abs(perplexity(w8a8, wikitext_smollm) / fp - 1) < 0.01


@pytest.mark.slow
def test_4bit_activations_hurt_far_more_without_rotation(smollm_model, rotated_smollm, wikitext_smollm,
                                                         smollm_fp_perplexity):
    fp = smollm_fp_perplexity
    plain = perplexity(quantize_model(copy.deepcopy(smollm_model), a_bits=4), wikitext_smollm)
    rotated = perplexity(quantize_model(copy.deepcopy(rotated_smollm), a_bits=4), wikitext_smollm)
    print(f"A4 perplexity: fp {fp:.2f}, without rotation {plain:.1f}, with rotation {rotated:.2f}")
    # measured on 4 x 256 tokens: 37.0 -> 12131 without rotation, -> 75 with it
    assert math.log(plain / fp) > 3 * math.log(rotated / fp)


def linear_inputs(model, windows, layer_indices):
    """The float model's input to each linear of the given blocks, (tokens, in) each."""
    inputs, handles = {}, []
    for i in layer_indices:
        for path in LINEAR_PATHS:
            hook = lambda m, args, key=(i, path): inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(module_at(model.layers[i], path).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {key: torch.cat(xs) for key, xs in inputs.items()}


def assert_gptq_beats_rtn_layer_by_layer(model, windows, layer_indices, bits=4):
    for (i, path), x in linear_inputs(model, windows, layer_indices).items():
        weight = module_at(model.layers[i], path).weight.detach()
        hessian = HessianAccumulator(x.shape[1])
        hessian.add(x)
        errors = {}
        for method, wq in (("gptq", gptq_quantize_weight(weight, hessian.hessian(), bits, clip_search=False)),
                           ("rtn", quantize_weight_rtn(weight, bits, clip_search=False))):
            errors[method] = ((x @ (wq - weight).T) ** 2).sum().item()
        assert errors["gptq"] < errors["rtn"], (i, path, errors)


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_activations_stories260k(stories_model, stories_dir):
    windows = text_windows(stories_dir, "data/tinystories/tinystories_sample.txt", 8, 128)
    assert_gptq_beats_rtn_layer_by_layer(stories_model, windows, range(len(stories_model.layers)))


@pytest.mark.slow
def test_gptq_beats_rtn_on_real_activations_smollm(smollm_model, smollm_dir):
    windows = text_windows(smollm_dir, "data/alpaca/alpaca_cleaned_2000.json", 4, 128)
    assert_gptq_beats_rtn_layer_by_layer(smollm_model, windows, [0, 29])


@pytest.mark.slow
def test_gptq_model_beats_rtn_on_held_out_text_stories260k(stories_model, stories_dir):
    """End to end: calibrated on one part of TinyStories, measured on another."""
    windows = text_windows(stories_dir, "data/tinystories/tinystories_sample.txt", 24, 128)
    calibration, held_out = windows[:16], windows[16:]
    options = dict(w_bits=4, w_clip_search=False)
    gptq = quantize_model(copy.deepcopy(stories_model), w_method="gptq", calibration=calibration, progress=False, **options)
    rtn = quantize_model(copy.deepcopy(stories_model), **options)
    fp, gptq_ppl, rtn_ppl = (perplexity(m, held_out) for m in (stories_model, gptq, rtn))
    print(f"stories260K W4 held-out perplexity: fp {fp:.3f}, RTN {rtn_ppl:.3f}, GPTQ {gptq_ppl:.3f}")
    assert fp < gptq_ppl < rtn_ppl
