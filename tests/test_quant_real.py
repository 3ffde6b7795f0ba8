"""quant.py on real checkpoints (slow): stories260K and SmolLM2-135M perplexity under W8, W4A4 and
rotation, and GPTQ against RTN on real activations, layer by layer and on held-out text.

    python -m pytest tests/test_quant_real.py -x -q       (-m "not slow" skips them)
"""
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.alpaca import prepare as alpaca
from helpers import LINEAR_PATHS, module_at
from quant import HessianAccumulator, gptq_quantize_weight, quantize_model, quantize_weight_rtn


def mirror_file(relative: str) -> Path:
    path = Path(os.environ.get("ROLORA_MIRROR", "")) / relative
    if not path.is_file():
        pytest.skip(f"{relative} not in the mirror (ROLORA_MIRROR)")
    return path


def text_windows(model_dir, relative: str, n_windows: int, seq_len: int, n_chars: int = 200_000) -> torch.Tensor:
    from data.tokenizer import Tokenizer
    ids = Tokenizer(model_dir).encode(alpaca.calibration_text(mirror_file(relative))[:n_chars])
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


def assert_gptq_beats_rtn_layer_by_layer(model, windows, layer_indices, clip_search, bits=4):
    """Layer output error ||X (Wq - W)^T||^2 on the calibration inputs X themselves, GPTQ and
    RTN with the same grid search. Measured GPTQ/RTN at 4 bits (without / with the clip search):
    stories260K 0.50-0.72 / 0.55-0.74 over all 35 linears; SmolLM2 layers 0 and 29 0.015-0.14 /
    0.05-0.39 (4 x 128 = 512 tokens < 576 features: H is singular there and GPTQ can hide most
    of its error in the directions these inputs do not span)."""
    for (i, path), x in linear_inputs(model, windows, layer_indices).items():
        weight = module_at(model.layers[i], path).weight.detach()
        hessian = HessianAccumulator(x.shape[1])
        hessian.add(x)
        errors = {}
        for method, wq in (("gptq", gptq_quantize_weight(weight, hessian.hessian(), bits, clip_search=clip_search)),
                           ("rtn", quantize_weight_rtn(weight, bits, clip_search=clip_search))):
            errors[method] = ((x @ (wq - weight).T) ** 2).sum().item()
        assert errors["gptq"] < 0.85 * errors["rtn"], (i, path, errors)


@pytest.mark.slow
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_beats_rtn_on_real_activations_stories260k(stories_model, stories_dir, clip_search):
    windows = text_windows(stories_dir, "data/tinystories/tinystories_sample.txt", 8, 128)
    assert_gptq_beats_rtn_layer_by_layer(stories_model, windows, range(len(stories_model.layers)), clip_search)


@pytest.mark.slow
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_beats_rtn_on_real_activations_smollm(smollm_model, smollm_dir, clip_search):
    windows = text_windows(smollm_dir, "data/alpaca/alpaca_cleaned_2000.json", 4, 128)
    assert_gptq_beats_rtn_layer_by_layer(smollm_model, windows, [0, 29], clip_search)


@pytest.mark.slow
@pytest.mark.parametrize("clip_search", [False, True])  # True: the default, as train.py and eval.py use it
def test_gptq_model_beats_rtn_on_held_out_text_stories260k(stories_model, stories_dir, clip_search):
    """End to end: calibrated on one part of TinyStories, measured on another.
    Measured perplexity, fp 4.197: without the clip search RTN 4.735, GPTQ 4.686;
    with it RTN 4.748, GPTQ 4.587."""
    windows = text_windows(stories_dir, "data/tinystories/tinystories_sample.txt", 24, 128)
    calibration, held_out = windows[:16], windows[16:]
    options = dict(w_bits=4, w_clip_search=clip_search)
    gptq = quantize_model(copy.deepcopy(stories_model), w_method="gptq", calibration=calibration, progress=False, **options)
    rtn = quantize_model(copy.deepcopy(stories_model), **options)
    fp, gptq_ppl, rtn_ppl = (perplexity(m, held_out) for m in (stories_model, gptq, rtn))
    print(f"stories260K W4 held-out perplexity (clip search {clip_search}): "
          f"fp {fp:.3f}, RTN {rtn_ppl:.3f}, GPTQ {gptq_ppl:.3f}")
    assert fp < gptq_ppl < rtn_ppl

