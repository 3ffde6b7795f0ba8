"""Tests of rotate.py: exact Hadamard matrices, the fast transform, and that rotating a model
leaves its function unchanged while removing its outliers.

    python -m pytest tests/test_rotate.py -x -q              # all (real checkpoints: a minute)
    python -m pytest tests/test_rotate.py -x -q -m "not slow"
"""
import copy
import dataclasses
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model

import rotate
from rotate import load_rotated, save_rotated
from quant import QuantConfig, quantize_model
from extras import spinquant
from extras.spinquant import cayley_step, learn_rotation, orthogonality_error
from rotate import (OnlineHadamard, activation_stats, hadamard_matrix, hadamard_plan,
                    hadamard_transform_matrix, outlier_stats,
                    random_hadamard, rotate_model, walsh_hadamard_transform)

pytestmark = pytest.mark.filterwarnings("ignore:rotate.py. FALLBACK")  # asserted where it matters

# Hidden, intermediate and head sizes of the LLaMA family (PAPERS.md), and sizes of Qwen/GLM
# models that table-based tools reject. Exact unless listed in FALLBACK_ORDERS.
MODEL_ORDERS = {
    "LLaMA-2-7B": (4096, 11008, 128), "LLaMA-2-13B": (5120, 13824, 128),
    "LLaMA-2-70B / LLaMA-3-70B": (8192, 28672, 128), "LLaMA-3-8B": (4096, 14336, 128),
    "SmolLM2-135M": (576, 1536, 64), "SmolLM2-360M": (960, 2560, 64),
    "TinyLlama-1.1B": (2048, 5632, 64), "stories260K": (64, 172, 8),
    "Qwen / GLM": (896, 3584, 4864, 13696, 25600, 29568),
    "GF(p^k) Paley": (28, 52, 100, 244, 344),  # q = 27, 25, 49, 243, 343: prime powers, not primes
}
ORDERS = sorted({n for sizes in MODEL_ORDERS.values() for n in sizes})
# 172 = 4 * 43: 171 = 9 * 19 and 85 = 5 * 17 are not prime powers, 344 does not divide 172.
# 13696 = 128 * 107: 428 - 1 = 7 * 61, 214 - 1 = 3 * 71, ... no K = 107 * 2^j is reached.
FALLBACK_ORDERS = {172, 13696}


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# -----------------------------------------------------------------------------
# Hadamard matrices


@pytest.mark.parametrize("n", ORDERS)
def test_constructed_hadamard_is_exact_in_integers(n):
    plan = hadamard_plan(n)
    print(f"{n}: {plan.describe()}")
    assert plan.K * plan.power_of_two == n and plan.power_of_two & (plan.power_of_two - 1) == 0
    assert plan.exact == (n not in FALLBACK_ORDERS)
    if not plan.exact:
        return
    H_K = hadamard_matrix(plan.K)  # the dense factor, in int64 arithmetic
    assert set(H_K.unique().tolist()) <= {-1, 1}
    assert torch.equal(H_K @ H_K.T, plan.K * torch.eye(plan.K, dtype=torch.int64))
    if n <= 1536:  # the whole matrix too, while int64 matmul stays fast
        H = hadamard_matrix(n)
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64))


def test_smallest_dense_factor_is_chosen():
    # 576 = 36 * 16 (Paley II, q = 17): 9 * 64 and 18 * 32 have no Hadamard matrix
    assert hadamard_plan(576).K == 36
    # 11008 = 43 * 256: 172 is out of reach, 344 = 343 + 1 with 343 = 7^3 = 3 mod 4 (Paley I)
    assert hadamard_plan(11008).K == 344
    assert hadamard_plan(29568).K == 924  # Paley II, q = 461
    assert hadamard_plan(4096).K == 1


@pytest.mark.parametrize("n", sorted(FALLBACK_ORDERS))
def test_fallback_is_orthogonal_and_reported(n):
    hadamard_plan.cache_clear()
    with pytest.warns(UserWarning, match=f"FALLBACK.*{n}"):
        plan = hadamard_plan(n)
    assert plan.K % 2 == 1 and "FALLBACK" in plan.describe()
    with pytest.raises(ValueError, match=str(n)):
        hadamard_matrix(n)
    if n <= 2048:
        M = hadamard_transform_matrix(n)
        assert (M @ M.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-10
    x = torch.randn(4, n, dtype=torch.float64)  # orthogonal: norms are kept
    assert torch.allclose(walsh_hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12)


@pytest.mark.parametrize("n", [0, 43, 6, 1002])
def test_unreachable_size_is_a_clear_error(n):
    with pytest.raises(ValueError, match=str(n)):
        walsh_hadamard_transform(torch.zeros(2, n))


# -----------------------------------------------------------------------------
# The fast transform


@pytest.mark.parametrize("n", [1, 2, 64, 96, 80, 172, 576, 688, 1536, 2048])  # 688 = 2 * 344
def test_fast_transform_equals_dense_product(n):
    M = hadamard_transform_matrix(n)
    x = torch.randn(2, 3, n, dtype=torch.float64)  # (B, T, n)
    assert relative_error(walsh_hadamard_transform(x), x @ M.T) < 1e-10
    assert relative_error(walsh_hadamard_transform(x, transpose=True), x @ M) < 1e-10
    assert relative_error(walsh_hadamard_transform(x.float()).double(), x @ M.T) < 1e-5
    xt = x.transpose(0, 1)  # a non-contiguous view
    assert relative_error(walsh_hadamard_transform(xt), xt @ M.T) < 1e-10
    y = walsh_hadamard_transform(x.bfloat16())
    assert y.dtype == torch.bfloat16 and relative_error(y.double(), x @ M.T) < 2e-2
    if hadamard_plan(n).exact:  # entries +-1/sqrt(n): the dense matrix really is Hadamard
        assert (M * math.sqrt(n) - hadamard_matrix(n)).abs().max() < 1e-12


def test_fast_transform_stays_float32_under_autocast():
    x = torch.randn(4, 1536)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in bf16 fine-tuning: no bf16 matmul inside
        y = walsh_hadamard_transform(x)
    assert y.dtype == torch.float32
    assert relative_error(y.double(), x.double() @ hadamard_transform_matrix(1536).T) < 1e-5


def test_fast_transform_is_self_inverse_pair():
    x = torch.randn(5, 576, dtype=torch.float64)
    back = walsh_hadamard_transform(walsh_hadamard_transform(x), transpose=True)
    assert relative_error(back, x) < 1e-12


@pytest.mark.parametrize("n", [48, 92])  # 12 * 4 (Paley I) and 23 * 4 (fallback)
@pytest.mark.parametrize("transpose", [False, True])
def test_gradient_is_the_transposed_transform(n, transpose):
    x = torch.randn(2, 1, n, dtype=torch.float64, requires_grad=True)
    fn = lambda t: walsh_hadamard_transform(t, transpose)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_random_hadamard_is_seeded_orthogonal_signed_hadamard():
    Q = random_hadamard(96, seed=7)
    assert (Q @ Q.T - torch.eye(96, dtype=torch.float64)).abs().max() < 1e-12
    assert torch.equal(Q, random_hadamard(96, seed=7))
    assert not torch.equal(Q, random_hadamard(96, seed=8))
    signs = Q[0] * math.sqrt(96) / hadamard_matrix(96)[0]  # Q = H diag(s) / sqrt(n)
    assert torch.allclose(Q * math.sqrt(96), hadamard_matrix(96).double() * signs, atol=1e-12)
    assert set(signs.round().tolist()) == {-1.0, 1.0}


# -----------------------------------------------------------------------------
# Rotating a model: the function is unchanged


def float64_logits(model, idx):
    """The lm_head output itself: model() returns float32 logits, which would hide float64 errors."""
    out = {}
    hook = model.lm_head.register_forward_hook(lambda m, a, y: out.update(logits=y))
    model(idx)
    hook.remove()
    return out["logits"]


INVARIANCE_CASES = {
    "gqa-untied-R4": dict(config={}, online_down_proj=True, rotate_ov=False),
    "gqa-untied-R2-R4": dict(config={}, online_down_proj=True, rotate_ov=True),
    "tied-R2-R4-K20": dict(config=dict(tie_word_embeddings=True, intermediate_size=80),
                           online_down_proj=True, rotate_ov=True),
    "mha-tied-R1-only": dict(config=dict(tie_word_embeddings=True, num_key_value_heads=4),
                             online_down_proj=False, rotate_ov=False),
    "fallback-172-R2-R4": dict(config=dict(intermediate_size=172), online_down_proj=True, rotate_ov=True),
    "hidden48-head12-gqa4to1": dict(config=dict(hidden_size=48, head_dim=12, num_key_value_heads=1),
                                    online_down_proj=True, rotate_ov=True),
    # R3, the online Hadamard on queries and keys: GQA and MHA, with and without R2 and R4
    "gqa-R3-R4": dict(config={}, online_down_proj=True, rotate_ov=False, rotate_qk=True),
    "gqa-R2-R3-R4": dict(config={}, online_down_proj=True, rotate_ov=True, rotate_qk=True),
    "mha-R1-R3": dict(config=dict(num_key_value_heads=4), online_down_proj=False, rotate_ov=False, rotate_qk=True),
    "mha-R2-R3": dict(config=dict(num_key_value_heads=4), online_down_proj=False, rotate_ov=True, rotate_qk=True),
    "head12-gqa4to1-R2-R3-R4": dict(config=dict(hidden_size=48, head_dim=12, num_key_value_heads=1),
                                    online_down_proj=True, rotate_ov=True, rotate_qk=True),
}


@pytest.mark.parametrize("case", INVARIANCE_CASES)
def test_rotation_keeps_logits_float64(case):
    spec = INVARIANCE_CASES[case]
    model = tiny_model(seed=1, dtype=torch.float64, **spec["config"])
    idx = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    before = float64_logits(model, idx)
    record = rotate_model(model, seed=5, online_down_proj=spec["online_down_proj"],
                          rotate_ov=spec["rotate_ov"], rotate_qk=spec.get("rotate_qk", False))
    after = float64_logits(model, idx)
    err = relative_error(after, before)
    print(f"{case}: relative logit error {err:.1e}")
    assert err < 1e-9, ("rotated float64 model differs; if ~1e-7, model.py's RMSNorm computes "
                        f"float64 inputs in float32 (error {err:.1e})")
    assert model.lm_head.weight is not model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert all(torch.all(norm.weight == 1) for name, norm in model.named_modules() if name.endswith("norm"))
    assert record["r4"] == spec["online_down_proj"] and record["r2"] == spec["rotate_ov"]
    assert bool(record["fallbacks"]) == (model.config.intermediate_size == 172 and record["r4"])
    assert isinstance(model.layers[0].mlp.down_input_transform, OnlineHadamard) == record["r4"]
    assert record["r3"] == spec.get("rotate_qk", False)
    attn = model.layers[-1].self_attn
    assert isinstance(attn.query_transform, OnlineHadamard) == isinstance(attn.key_transform, OnlineHadamard) \
        == record["r3"]


def block_inputs(model, idx):
    """The residual stream entering each block and each down_proj's input, float64."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.layers]
    hooks += [b.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in model.layers]
    model(idx)
    for h in hooks:
        h.remove()
    return seen[0::2], seen[1::2]  # hooks fire in order: block i, then its down_proj


def test_residual_stream_is_rotated_by_the_recorded_R1_and_down_input_by_R4():
    model = tiny_model(seed=2, dtype=torch.float64)
    idx = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(1))
    residual, down_in = block_inputs(model, idx)
    record = rotate_model(model, seed=11)
    residual_r, down_in_r = block_inputs(model, idx)
    Q = random_hadamard(model.config.hidden_size, record["seed"])
    M = hadamard_transform_matrix(model.config.intermediate_size)
    for x, x_r in zip(residual, residual_r):
        assert relative_error(x_r, x @ Q) < 1e-12      # x -> x Q, not an identity or another Q
        assert relative_error(x_r, x) > 0.1
    for z, z_r in zip(down_in, down_in_r):
        assert relative_error(z_r, z @ M.T) < 1e-12    # what a quantizer in down_proj would see


def attention_inputs(model, idx, cache=None):
    """Per layer, the queries and the keys the attention reads (after query/key_transform, (B, h, T, hs)),
    and the cache afterwards."""
    seen = {}
    hooks = []
    for i, block in enumerate(model.layers):
        for name in ("query_transform", "key_transform"):
            hooks.append(getattr(block.self_attn, name).register_forward_hook(
                lambda m, a, y, key=(i, name): seen.setdefault(key, y)))
    model(idx, cache)
    for h in hooks:
        h.remove()
    return seen


def test_r3_rotates_queries_and_cached_keys_by_one_head_hadamard_and_keeps_every_score():
    """R3 on top of R1 + R4: what k_proj and q_proj give is unchanged by R1 (their weights absorb Q),
    then q -> q P^T and k -> k P^T with P the orthonormal Hadamard of head_dim, so the cache holds
    rotated keys while every q.k (and so every output) stays as it was."""
    from model import KVCache
    model = tiny_model(seed=6, dtype=torch.float64)
    idx = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    plain_cache, rotated_cache = KVCache(2), KVCache(2)
    plain = attention_inputs(model, idx, plain_cache)
    before = float64_logits(model, idx)
    rotate_model(model, seed=2, rotate_qk=True)
    rotated = attention_inputs(model, idx, rotated_cache)
    P = hadamard_transform_matrix(model.config.head_dim)
    for (layer, name), x in plain.items():
        x_r = rotated[(layer, name)]
        assert relative_error(x_r, x @ P.T) < 1e-12, (layer, name)  # the head's Hadamard, not identity
        assert relative_error(x_r, x) > 0.1
    for layer in range(2):
        assert relative_error(rotated_cache.keys[layer], plain_cache.keys[layer] @ P.T) < 1e-12
        assert relative_error(rotated_cache.values[layer], plain_cache.values[layer]) < 1e-12  # no R2 here
        scores = lambda seen: seen[(layer, "query_transform")][:, ::2] @ seen[(layer, "key_transform")].transpose(2, 3)
        assert relative_error(scores(rotated), scores(plain)) < 1e-12  # GQA: query heads 0, 2 read KV heads 0, 1
    assert relative_error(float64_logits(model, idx), before) < 1e-9


def test_r3_kv_cache_generation_equals_full_recomputation_and_the_original_model():
    model = tiny_model(seed=7, dtype=torch.float64)
    original = copy.deepcopy(model)
    rotate_model(model, seed=3, rotate_ov=True, rotate_qk=True)
    idx = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(6))
    generated = model.generate(idx, 9)  # prefill, then one token at a time through the KV cache
    assert torch.equal(generated, original.generate(idx, 9))
    with torch.no_grad():
        full = float64_logits(model, generated)
        from model import KVCache
        cache = KVCache(2)
        out = {}
        hook = model.lm_head.register_forward_hook(lambda m, a, y: out.update(logits=y))
        model(generated[:, :5], cache)
        steps = [out["logits"]]
        for t in range(5, generated.shape[1]):
            model(generated[:, t:t + 1], cache)
            steps.append(out["logits"])
        hook.remove()
    assert relative_error(torch.cat(steps, dim=1), full) < 1e-12


def test_r3_kv4_quantizer_sits_after_the_hadamard_and_puts_keys_on_their_grid():
    """quant.py's KV quantizer goes after R3 on K: each cached (head, token) row of keys is the
    QuaRot grid (asymmetric, clip 0.95) of the *rotated* key, k P^T, with an integer zero point."""
    import torch.nn as nn
    from model import KVCache
    from quant import ActQuantizer, compute_scale_zero, quantize_model
    model = tiny_model(seed=8)
    plain_cache = KVCache(2)
    idx = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        attention_inputs(model, idx, plain_cache)
    rotate_model(model, seed=1, rotate_ov=True, rotate_qk=True)
    quantize_model(model, kv_bits=4)
    transform = model.layers[0].self_attn.key_transform
    assert isinstance(transform, nn.Sequential) and isinstance(transform[0], OnlineHadamard) \
        and isinstance(transform[1], ActQuantizer) and not transform[1].symmetric and transform[1].clip_ratio == 0.95
    entering = {}  # what each key quantizer reads, (B, n_kv, T, hs)
    hooks = [block.self_attn.key_transform[1].register_forward_pre_hook(
        lambda m, args, i=i: entering.setdefault(i, args[0])) for i, block in enumerate(model.layers)]
    cache = KVCache(2)
    with torch.no_grad():
        model(idx, cache)
    for h in hooks:
        h.remove()
    P = hadamard_transform_matrix(model.config.head_dim, dtype=torch.float32)
    # layer 0 reads what the plain model's layer 0 reads (later layers see quantized K before them)
    assert relative_error(entering[0], plain_cache.keys[0] @ P.T) < 1e-5
    hd = model.config.head_dim
    for layer in range(2):
        rows = entering[layer].reshape(-1, hd)  # one (head, token) per row
        scale, zero = compute_scale_zero(rows, 4, symmetric=False, clip_ratio=0.95)
        k = cache.keys[layer].reshape(-1, hd) / scale + zero
        assert torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 15
        assert (k - k.round()).abs().max() < 1e-3 and k.round().min() >= 0 and k.round().max() <= 15
        nearest = (rows / scale + zero).round().clamp(0, 15)  # round to nearest, then clip
        assert (k.round() == nearest).float().mean() > 0.99  # float32: an exact tie may round either way
        assert relative_error(cache.keys[layer].reshape(-1, hd), rows) > 1e-3  # it did quantize


def test_same_seed_same_weights_other_seed_differs():
    base = tiny_model(seed=3)
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    rotate_model(a, seed=0, rotate_ov=True)
    rotate_model(b, seed=0, rotate_ov=True)
    rotate_model(c, seed=1, rotate_ov=True)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed_tokens.weight"], sc["embed_tokens.weight"])


def test_rotating_twice_is_refused():
    model = tiny_model()
    record = rotate_model(model, online_down_proj=False)  # no OnlineHadamard to give it away
    assert model.rotation == record
    with pytest.raises(ValueError, match="already"):
        rotate_model(model)


def test_rotation_keeps_dtype():
    model = tiny_model(dtype=torch.bfloat16)
    rotate_model(model, rotate_ov=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("intermediate", [96, 172])
def test_save_and_load_rotated_give_the_same_logits(tmp_path, intermediate):
    model = tiny_model(seed=4, intermediate_size=intermediate, tie_word_embeddings=True)
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    record = rotate_model(model, seed=9, rotate_ov=True)
    expected = model(idx)
    save_rotated(model, record, tmp_path / "rotated")
    loaded, loaded_record = load_rotated(tmp_path / "rotated")
    assert loaded_record == record
    assert torch.allclose(loaded(idx), expected, rtol=0, atol=1e-6)
    from model import load_checkpoint
    with pytest.raises(ValueError, match=r"rotation\.json.*eval\.load_model"):
        load_checkpoint(tmp_path / "rotated")  # a plain load would be another network, silently:
    plain = load_checkpoint(tmp_path / "rotated", stage_records_ok=True)
    assert relative_error(plain(idx), expected) > 1e-3
    from eval import load_weights  # what every --model goes through
    assert torch.allclose(load_weights(tmp_path / "rotated")(idx), expected, rtol=0, atol=1e-6)


def test_r3_is_recorded_and_restored_on_load_and_by_every_loader(tmp_path):
    from eval import load_weights
    from extras.quantized_checkpoint import save_quantized
    from quant import quantize_model
    model = tiny_model(seed=5)
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(8))
    record = rotate_model(model, seed=4, rotate_qk=True)
    assert record["r3"] and "R3 per-head queries and keys" in record["transforms"]
    expected = model(idx)
    save_rotated(model, record, tmp_path / "rotated")
    loaded, loaded_record = load_rotated(tmp_path / "rotated")
    assert loaded_record == record
    for attn in (layer.self_attn for layer in loaded.layers):
        assert isinstance(attn.query_transform, OnlineHadamard) and isinstance(attn.key_transform, OnlineHadamard)
    assert torch.allclose(loaded(idx), expected, rtol=0, atol=1e-6)
    assert torch.allclose(load_weights(tmp_path / "rotated")(idx), expected, rtol=0, atol=1e-6)
    quantize_model(model, w_bits=4, a_bits=4, kv_bits=4)  # the KV4 quantizer after R3, saved and reloaded
    save_quantized(model, tmp_path / "quantized")
    reloaded = load_weights(tmp_path / "quantized")
    assert str(reloaded) == str(model) and reloaded.rotation == record
    with torch.no_grad():
        assert torch.equal(reloaded(idx), model(idx))


def test_a_record_from_before_r3_loads_without_it(tmp_path):
    import json
    model = tiny_model(seed=5)
    record = rotate_model(model, seed=4)
    save_rotated(model, {k: v for k, v in record.items() if k != "r3"}, tmp_path / "old")
    loaded, loaded_record = load_rotated(tmp_path / "old")
    assert loaded_record["r3"] is False and isinstance(loaded.layers[0].self_attn.key_transform, torch.nn.Identity)
    assert "r3" not in json.loads((tmp_path / "old" / "rotation.json").read_text())


def test_load_rotated_needs_the_record(tmp_path):
    from model import save_checkpoint
    save_checkpoint(tiny_model(), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="rotation.json"):
        load_rotated(tmp_path / "plain")


# -----------------------------------------------------------------------------
# Learned rotations (SpinQuant): Cayley SGD on the orthogonal group


def calibration(n=8, length=33, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def learn(model, quant=QuantConfig(w_bits=4, a_bits=4), steps=3, lr=0.5, **options):
    """learn_rotation on every calibration window at every step (batch 8 of 8): one fixed loss."""
    return learn_rotation(model, calibration(), quant, steps, lr, batch_size=8, progress=False, **options)


def test_cayley_steps_stay_on_the_orthogonal_group_and_descend():
    """On f(R) = <T, R>, whose gradient is T: large steps leave R orthogonal to float64 rounding,
    a small step is the Riemannian gradient step R - lr A R, and the iteration reaches the group's
    minimum of f (-(sum of T's singular values), less 2 sigma_min in the other component)."""
    T = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = random_hadamard(64, seed=3)
    A = T @ start.T - start @ T.T
    small = cayley_step(start, T, 1e-4)
    first_order = start - 1e-4 * A @ start
    assert (small - first_order).abs().max() < 1e-3 * (small - start).abs().max()  # second order only
    R = start
    for _ in range(200):
        R = cayley_step(R, T, 0.05)
    assert orthogonality_error(R) < 1e-12 and (R - start).abs().max() > 0.1
    sigma = torch.linalg.svdvals(T)
    assert (R * T).sum() < -0.999 * (sigma.sum() - 2 * sigma[-1]) < (start * T).sum()
    batch = torch.stack([random_hadamard(16, seed) for seed in range(3)])  # one R2 per layer
    stepped = cayley_step(batch, torch.randn(3, 16, 16, dtype=torch.float64), 2.0)
    assert orthogonality_error(stepped) < 1e-13 and (stepped - batch).abs().max() > 0.1


LEARNED_CASES = {
    "R1": dict(config={}, rotate_ov=False, rotate_qk=False),
    "R1+R2": dict(config={}, rotate_ov=True, rotate_qk=False),
    "R1+R2+R3-head12-gqa4to1-tied": dict(config=dict(hidden_size=48, head_dim=12, num_key_value_heads=1,
                                                     tie_word_embeddings=True), rotate_ov=True, rotate_qk=True),
}


@pytest.mark.parametrize("case", LEARNED_CASES)
def test_learned_rotation_is_orthogonal_and_keeps_logits_float64(case):
    spec = LEARNED_CASES[case]
    model = tiny_model(seed=1, dtype=torch.float64, **spec["config"])
    original = copy.deepcopy(model.state_dict())
    learned = learn(model, seed=5, learn_r2=spec["rotate_ov"], rotate_qk=spec["rotate_qk"])
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())  # learning changed nothing
    assert orthogonality_error(learned.r1) < 1e-12
    assert (learned.r2 is not None) == spec["rotate_ov"]
    if spec["rotate_ov"]:
        assert learned.r2.shape == (2, model.config.head_dim, model.config.head_dim)
        assert orthogonality_error(learned.r2) < 1e-12
    idx = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    before = float64_logits(model, idx)
    hadamard = copy.deepcopy(model)
    rotate_model(hadamard, seed=5, rotate_ov=spec["rotate_ov"], rotate_qk=spec["rotate_qk"])
    record = rotate_model(model, seed=5, rotate_ov=spec["rotate_ov"], rotate_qk=spec["rotate_qk"], learned=learned)
    err = relative_error(float64_logits(model, idx), before)
    print(f"{case}: relative logit error {err:.1e}")
    assert err < 1e-9
    assert record["r1"] == "learned" and record["learned"]["r2"] == spec["rotate_ov"]
    assert model.learned_rotation is learned
    # the learned matrices, not the seed's Hadamards, are what got folded in
    assert relative_error(model.embed_tokens.weight, hadamard.embed_tokens.weight) > 1e-3
    if spec["rotate_ov"]:  # v_proj's R1 side is the same below; its R2 side must differ
        only_r1 = copy.deepcopy(learned)
        only_r1.r2 = None
        with_hadamard_r2 = tiny_model(seed=1, dtype=torch.float64, **spec["config"])
        rotate_model(with_hadamard_r2, seed=5, rotate_ov=True, learned=only_r1)
        v = lambda m: m.layers[0].self_attn.v_proj.weight
        assert relative_error(v(model), v(with_hadamard_r2)) > 1e-3


def test_learning_starts_at_the_seeds_hadamard_and_lowers_the_quantized_calibration_loss():
    """The first loss is that of the random-Hadamard model the pipeline builds, quantized as
    learning quantizes (weights by RTN on a min-max grid when RTN follows, 16-bit when GPTQ
    follows); ten steps later the quantized model with the learned R1 folded in has a lower loss
    on the calibration windows. (W3A4: on a 2-layer random model the 4-bit loss moves by about as
    much from one step to the next as it gains in ten, see bench/bench_learned_rotation.py for
    SmolLM2 at W4A4.)"""
    model = tiny_model(seed=1)
    windows = calibration()
    at_start = learn(model, steps=0, seed=5, learn_r2=True)  # R1 = the seed's Hadamard, R2 = rotate_ov's
    assert torch.equal(at_start.r1, random_hadamard(64, seed=5))
    assert all(torch.equal(r2, hadamard_transform_matrix(16).T) for r2 in at_start.r2)
    hadamard, dense = copy.deepcopy(model), copy.deepcopy(model)
    rotate_model(hadamard, seed=5, rotate_ov=True)
    rotate_model(dense, seed=5, rotate_ov=True, learned=at_start)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(hadamard.parameters(), dense.parameters()))

    def quantized_loss(learned, w_bits):
        rotated = copy.deepcopy(model)
        rotate_model(rotated, seed=0, learned=learned)
        quantize_model(rotated, w_bits=w_bits, a_bits=4, w_clip_search=False)
        with torch.no_grad():
            return F.cross_entropy(rotated(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()

    rtn = QuantConfig(w_bits=3, a_bits=4, w_clip_search=False)  # min-max: the RTN that follows
    learned = learn(model, rtn, steps=10, lr=1.0)
    start, end = quantized_loss(None, 3), quantized_loss(learned, 3)
    print(f"W3A4 RTN: quantized calibration loss {start:.4f} -> {end:.4f}")
    assert learned.info["loss"][0] == pytest.approx(start, rel=1e-5)
    assert end < start - 0.05
    assert learned.info["quantized_as"] == "W3 RTN min-max, A4"
    before_gptq = learn(model, dataclasses.replace(rtn, w_method="gptq"), steps=1)  # weights stay 16-bit
    assert before_gptq.info["loss"][0] == pytest.approx(quantized_loss(None, 16), rel=1e-5)
    assert before_gptq.info["quantized_as"] == "W16, A4"


def test_learning_under_the_clip_search_starts_at_its_grids_researches_them_and_lowers_its_loss(monkeypatch):
    """clip_every: the weights are rounded on the MSE clip search's grids (the RTN that follows by
    default), the per-row clip ratios searched again every clip_every steps: the first loss is that
    of the Hadamard model quantized by quantize_model's default RTN, and learning lowers it."""
    model = tiny_model(seed=1)
    windows = calibration()

    def clip_searched_loss(learned):
        rotated = copy.deepcopy(model)
        rotate_model(rotated, seed=0, learned=learned)
        quantize_model(rotated, w_bits=3, a_bits=4)  # RTN with the clip search, the default
        with torch.no_grad():
            return F.cross_entropy(rotated(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten()).item()

    rtn = QuantConfig(w_bits=3, a_bits=4)
    searches = []
    real_search = spinquant.weight_clip_ratio
    monkeypatch.setattr(spinquant, "weight_clip_ratio", lambda *a: searches.append(1) or real_search(*a))
    learned = learn(model, rtn, steps=10, lr=1.0, clip_every=4)
    n_weights = 7 * model.config.num_hidden_layers  # q, k, v, o, gate, up, down of every block
    assert len(searches) == 3 * n_weights  # at steps 0, 4 and 8
    start, end = clip_searched_loss(None), clip_searched_loss(learned)
    print(f"W3A4 RTN, clip search: quantized calibration loss {start:.4f} -> {end:.4f}")
    assert learned.info["loss"][0] == pytest.approx(start, rel=1e-5)
    min_max = learn(model, rtn, steps=1, clip_every=0).info
    assert learned.info["loss"][0] != pytest.approx(min_max["loss"][0], rel=1e-4)
    assert min_max["quantized_as"] == "W3 RTN min-max, A4"
    assert end < start - 0.05
    assert learned.info["quantized_as"] == "W3 RTN MSE clip searched every 4 steps, A4"


def test_save_and_reload_a_learned_rotation_give_identical_logits(tmp_path):
    from eval import load_weights
    from extras.quantized_checkpoint import save_quantized
    from rotate import load_learned_rotation, save_learned_rotation
    model = tiny_model(seed=4, tie_word_embeddings=True)
    learned = learn(model, steps=2, learn_r2=True)
    record = rotate_model(model, seed=0, rotate_ov=True, learned=learned)
    idx = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    expected = model(idx)
    save_rotated(model, record, tmp_path / "rotated")
    assert json.loads((tmp_path / "rotated" / "rotation.json").read_text())["learned"]["file"] == "rotation.safetensors"
    loaded, loaded_record = load_rotated(tmp_path / "rotated")
    assert loaded_record == record
    assert torch.equal(loaded(idx), expected)
    again = loaded.learned_rotation
    assert torch.equal(again.r1, learned.r1) and torch.equal(again.r2, learned.r2) and again.info == learned.info
    assert again.r1.dtype == torch.float64
    # rebuilt from the original model with the reloaded matrices: the same rotated model, bit for bit
    rebuilt = tiny_model(seed=4, tie_word_embeddings=True)
    rotate_model(rebuilt, seed=0, rotate_ov=True, learned=again)
    assert torch.equal(rebuilt(idx), expected) and rebuilt.rotation == record
    # a quantized save keeps the matrices too
    quantize_model(model, w_bits=4, a_bits=4)
    save_quantized(model, tmp_path / "quantized")
    reloaded = load_weights(tmp_path / "quantized")
    with torch.no_grad():
        assert torch.equal(reloaded(idx), model(idx))
    assert torch.equal(reloaded.learned_rotation.r1, learned.r1) and reloaded.rotation == record
    # matrices other than those the record names are refused, and so is a missing file
    save_learned_rotation(rotate.LearnedRotation(learned.r1.flip(0), learned.r2, learned.info), tmp_path / "rotated")
    with pytest.raises(ValueError, match="not the ones rotation.json names"):
        load_rotated(tmp_path / "rotated")
    (tmp_path / "rotated" / "rotation.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="rotation.safetensors: missing"):
        load_learned_rotation(tmp_path / "rotated", record)
    del rebuilt.learned_rotation  # a record naming matrices the model does not hold is not saved
    with pytest.raises(ValueError, match="learned_rotation does not hold"):
        save_rotated(rebuilt, record, tmp_path / "again")


def test_the_random_signs_change_a_min_max_quantized_model_only_where_the_grid_clips():
    """Why learning starts from one seed and why seeds differ at all: with Q = M diag(s), every
    per-token activation and per-row weight that R1 touches is the seed-free one times +-1, and a
    symmetric min-max grid rounds -x to exactly -Q(x). So all seeds give the same W4A4 model bit
    for bit; only clipping to the grid's unequal ends [-8, 7] (the MSE clip search, GPTQ's error
    feedback) lets a sign decide which end a value clips at."""
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    logits = {}
    for clip in (False, True):
        for seed in (0, 1):
            model = tiny_model(seed=2)
            rotate_model(model, seed=seed)
            quantize_model(model, w_bits=4, a_bits=4, w_clip_search=clip)
            with torch.no_grad():
                logits[clip, seed] = model(idx)
    assert torch.equal(logits[False, 0], logits[False, 1])
    assert not torch.equal(logits[True, 0], logits[True, 1])


def test_only_train_py_learns_rotations():
    with pytest.raises(SystemExit):
        rotate.parse_args(["--rotation", "learned"])
    import eval as ev
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", "stories260K", "--rotate", "--rotation", "learned"])


# -----------------------------------------------------------------------------
# Outlier statistics


def test_outlier_stats_on_known_activations():
    spike = torch.zeros(3, 64)
    spike[:, 5] = 7.0  # all energy in one channel: max/RMS = sqrt(64)
    assert outlier_stats(spike)["max_over_rms"] == pytest.approx(8.0)
    gauss = torch.randn(200, 4096, generator=torch.Generator().manual_seed(0))
    stats = outlier_stats(gauss)
    assert stats["kurtosis"] == pytest.approx(3.0, abs=0.05)
    assert 3.0 < stats["max_over_rms"] < 6.0


def test_activation_stats_rows_cover_every_layer_and_site():
    model = tiny_model()
    rows = activation_stats(model, torch.arange(10))
    assert {(r["layer"], r["site"]) for r in rows} == {
        (i, s) for i in range(2) for s in ("residual", "attn_in", "o_proj_in", "mlp_in", "down_in")}
    assert not model.layers[0]._forward_pre_hooks and not model.layers[0].mlp.down_proj._forward_pre_hooks


def test_hadamard_sizes_command(capsys):
    rotate.main(rotate.parse_args(["--sizes", "576,172"]))
    out = capsys.readouterr().out
    assert "576 =   36" in out and "FALLBACK" in out


# -----------------------------------------------------------------------------
# Real checkpoints


@pytest.mark.slow
def test_rotated_stories260K_is_the_same_model(stories_model, stories_dir):
    from data.tokenizer import Tokenizer
    idx = torch.tensor([Tokenizer(stories_dir).encode("Once upon a time, there was a")])
    rotated = copy.deepcopy(stories_model)  # the fixture is shared: never change it
    record = rotate_model(rotated, seed=0, rotate_ov=True)
    assert record["fallbacks"][0]["size"] == 172  # intermediate 172 = 4 * 43
    err = relative_error(rotated(idx), stories_model(idx))
    assert err < 1e-4
    assert torch.equal(rotated.generate(idx, 16), stories_model.generate(idx, 16))
    print(f"stories260K R1+R2+R4: float32 relative logit error {err:.1e}")


@pytest.mark.slow
def test_rotated_smollm2_is_the_same_model_and_loses_its_outliers(smollm_model, smollm_dir):
    from data.tokenizer import Tokenizer
    text = "The capital of France is Paris. The Eiffel Tower was built in 1889 for the World's Fair."
    idx = torch.tensor([Tokenizer(smollm_dir).encode(text)])
    rotated = copy.deepcopy(smollm_model)
    rotate_model(rotated, seed=0, rotate_ov=True)
    err = relative_error(rotated(idx), smollm_model(idx))
    print(f"SmolLM2-135M float32 relative logit error {err:.1e}")
    assert err < 1e-4
    assert torch.equal(rotated.generate(idx[:, :8], 8), smollm_model.generate(idx[:, :8], 8))

    linear_inputs = lambda rows: max(r["max_over_rms"] for r in rows if r["site"] != "residual")
    before = linear_inputs(activation_stats(smollm_model, idx))
    after = linear_inputs(activation_stats(rotated, idx))
    print(f"SmolLM2-135M largest max|x|/RMS over linear inputs: {before:.1f} -> {after:.1f}")
    assert after < 0.5 * before


# -----------------------------------------------------------------------------
# The per-channel outlier picture (rotate.py --plot)

OUTLIER_CHANNEL = 37


def planted_outlier_model(**overrides):
    """tiny_model whose residual stream has one dominant channel in every token (a massive
    activation: its embedding column is 5, the other entries ~0.1)."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.embed_tokens.weight[:, OUTLIER_CHANNEL] = 5.0
    return model


def test_channel_maxima_find_the_planted_outlier_and_rotation_flattens_it():
    model, idx = planted_outlier_model(), torch.arange(40)
    inputs = [(0, "residual"), (0, "attn_in"), (1, "down_in")]
    before = rotate.channel_maxima(model, idx, inputs)
    assert list(before) == inputs and before[(1, "down_in")].shape == (96,)
    expected = model.layers[0].input_layernorm(model.embed_tokens(idx)).abs().amax(0)  # by hand
    assert torch.allclose(before[(0, "attn_in")], expected.double())
    rotate_model(model)
    after = rotate.channel_maxima(model, idx, inputs)
    peak = lambda m: (m.max() / m.median()).item()  # about 21 before, 1.2 after
    for key in inputs[:2]:
        assert int(before[key].argmax()) == OUTLIER_CHANNEL, key
        assert peak(before[key]) > 10 * peak(after[key]) and peak(after[key]) < 1.5, key


def test_plot_inputs_default_is_the_worst_and_flags_choose():
    rows = activation_stats(planted_outlier_model(), torch.arange(40))
    worst = max((r for r in rows if r["site"] != "residual"), key=lambda r: r["max_over_rms"])
    assert rotate.plot_inputs(rows) == [(worst["layer"], worst["site"])]
    rows[5]["max_over_rms"] = 1e3  # layer 1's residual: plotted when asked for, else only linear inputs
    assert rows[5]["site"] == "residual" and rotate.plot_inputs(rows) == [(worst["layer"], worst["site"])]
    assert rotate.plot_inputs(rows, "residual") == [(1, "residual")]
    assert rotate.plot_inputs(rows, "down_in,attn_in", 1) == [(1, "down_in"), (1, "attn_in")]
    layer = max((r for r in rows if r["site"] == "down_in"), key=lambda r: r["max_over_rms"])["layer"]
    assert rotate.plot_inputs(rows, "down_in") == [(layer, "down_in")]
    with pytest.raises(ValueError, match="no such input"):
        rotate.plot_inputs(rows, "", 2)
    with pytest.raises(SystemExit):
        rotate.parse_args(["--plot-sites", "down_proj"])


def read_png(path):
    """(image array, number of distinct pixel colours) of a PNG, via matplotlib."""
    image = pytest.importorskip("matplotlib.image").imread(path)
    return image, len(torch.unique(torch.from_numpy(image).reshape(-1, image.shape[-1]), dim=0))


def test_plot_outliers_draws_original_and_rotated_per_channel(tmp_path):
    pytest.importorskip("matplotlib")
    model, idx = planted_outlier_model(), torch.arange(40)
    inputs = [(0, "attn_in"), (1, "down_in")]
    before = rotate.channel_maxima(model, idx, inputs)
    rotate_model(model)
    after = rotate.channel_maxima(model, idx, inputs)
    fig = rotate.plot_outliers(before, after, tmp_path / "sub" / "outliers.png", len(idx))
    image, colours = read_png(tmp_path / "sub" / "outliers.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200 and colours > 10
    assert len(fig.axes) == len(inputs)
    for ax, key in zip(fig.axes, inputs):
        assert f"layer {key[0]}, {key[1]}" in ax.get_title() and ax.get_yscale() == "log"
        original, rotated = ax.get_lines()
        assert original.get_label().startswith("original") and rotated.get_label().startswith("rotated")
        assert torch.equal(torch.as_tensor(original.get_ydata()), before[key])
        assert torch.equal(torch.as_tensor(rotated.get_ydata()), after[key])


def test_plot_outliers_without_matplotlib_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    maxima = {(0, "attn_in"): torch.ones(8, dtype=torch.float64)}
    assert rotate.plot_outliers(maxima, maxima, tmp_path / "outliers.png", 8) is None
    assert "matplotlib is not installed" in capsys.readouterr().out and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_plot_command_writes_the_chosen_layer(tmp_path, stories_dir, capsys):
    pytest.importorskip("matplotlib")
    import shutil
    from model import save_checkpoint
    save_checkpoint(planted_outlier_model(vocab_size=512), tmp_path / "ckpt")
    shutil.copy(stories_dir / "tokenizer.model", tmp_path / "ckpt")
    (tmp_path / "text.txt").write_text("Once upon a time, there was a little girl named Lily. " * 4)
    png = tmp_path / "out" / "outliers.png"
    argv = ["--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "text.txt"), "--tokens", "32"]
    rotate.main(rotate.parse_args([*argv, "--plot", str(png), "--plot-sites", "down_in,attn_in", "--plot-layer", "1"]))
    out = capsys.readouterr().out
    assert "per-channel max|x| at layer 1 attn_in" in out and "per-channel max|x| at layer 1 down_in" in out
    assert f"wrote {png}" in out
    image, colours = read_png(png)
    assert colours > 10
    png.unlink()
    rotate.main(rotate.parse_args([*argv, "--plot", str(png)]))  # default: the worst linear input
    out = capsys.readouterr().out
    layer, site = re.search(r"original: largest max\|x\|/RMS over linear inputs \S+ \(layer (\d+) (\w+)\)", out).groups()
    assert re.findall(r"per-channel max\|x\| at layer (\d+) (\w+)", out) == [(layer, site)] and png.is_file()
    original, rotated = re.search(r"per-channel .*: original (\S+) .* > rotated (\S+)", out).groups()
    assert float(original) > 2 * float(rotated)  # measured on the model before and after rotating


def test_a_rotation_record_that_does_not_fit_is_a_clear_error(tmp_path):
    import json
    model = tiny_model(seed=1)
    record = rotate_model(model, seed=2)
    save_rotated(model, record, tmp_path / "rotated")
    record_file = tmp_path / "rotated" / "rotation.json"
    record_file.write_text(json.dumps(record | {"intermediate_size": 172}))
    with pytest.raises(ValueError, match=r"rotation\.json: intermediate_size=172 but config\.json has 96"):
        load_rotated(tmp_path / "rotated")
    record_file.write_text(json.dumps({k: v for k, v in record.items() if k != "r4"}))
    with pytest.raises(KeyError, match=r"rotation\.json: missing key\(s\) \['r4'\]"):
        load_rotated(tmp_path / "rotated")
    record_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"rotation\.json: not valid JSON"):
        load_rotated(tmp_path / "rotated")
