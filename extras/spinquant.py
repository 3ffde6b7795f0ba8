"""Learned rotations (SpinQuant, arXiv 2405.16406): R1 and R2 trained on the orthogonal group.

Beyond RoLoRA, which draws R1 as a random Hadamard. `learn_rotation` starts from the seed's
Hadamards and takes Cayley SGD steps that lower the quantized model's loss on calibration text;
rotate.rotate_model(..., learned=...) then folds the result in exactly as it folds a Hadamard, and
rotate.save_rotated keeps the matrices beside the record (rotation.safetensors).

    python train.py --bits 4 --rotate --rotation learned

Every orthogonal R1 leaves the full-precision function unchanged, but not the quantized one, and
some spread the outliers better than others. (A Hadamard's random signs are no such choice: a
symmetric grid rounds -x to -Q(x), so the signs change the quantized model only where values
clip at the grid's unequal ends [-8, 7]; tests/test_rotate.py.) SpinQuant starts from the
random Hadamard and follows the gradient of the quantized model's next-token loss on
calibration text with respect to R1 (and each layer's R2), every weight frozen. The quantizers
are those that will follow: activations (and KV) fake-quantized, their gradient passed by the
straight-through estimator; weights rounded by RTN when RTN follows, on the grids its MSE clip
search picks (a rotation learned on min-max grids is tuned to errors the search then removes:
bench/README.md has the perplexities), but kept at 16 bits when GPTQ follows (GPTQ
compensates its own rounding, so a rotation tuned to RTN's errors would be tuned to the wrong
ones). The rotated weights are computed from the frozen ones at every step
(W R1, R1^T W, ...: rotate_weight, the same function that folds the result), so the model
never changes while R1 does. Each step is a Cayley retraction, which keeps R exactly
orthogonal, so the learned matrices fold in as the Hadamards do:
rotate_model(..., learned=learn_rotation(...)).
"""
import copy
import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.options import option
from quant import QuantConfig, QuantLinear, quantize_model, quantize_weight_rtn, weight_clip_ratio
from rotate import (LearnedRotation, add_online_down_proj_hadamard, add_online_qk_hadamards, check_not_rotated,
                    fuse_rmsnorm_into_linears, hadamard_transform_matrix, random_hadamard, residual_stream_sites,
                    rotate_weight, untie_lm_head, value_sites)


@dataclass
class LearnedRotationConfig:
    """train.py's flags for how R1 (and R2 with --rotate-ov) are chosen."""
    kind: str = option("random", "R1 (and R2 with --rotate-ov): random, the seeded random-sign Hadamard; or "
                       "learned, Cayley SGD from it on the quantized model's calibration loss (SpinQuant)",
                       choices=("random", "learned"), aliases=("--rotation",))
    learn_steps: int = option(20, "with --rotation learned: Cayley SGD steps (SpinQuant: 100)", at_least=0)
    learn_lr: float = option(0.05, "with --rotation learned: Cayley SGD step size, cosine-decayed; a step turns R1 "
                             "by about lr x grad (the progress bar's grad)", at_least=0.0)
    learn_windows: int = option(32, "with --rotation learned: calibration windows from the training data "
                                "(SpinQuant: 800)", at_least=1)
    learn_seq_len: int = option(512, "with --rotation learned: tokens per calibration window (SpinQuant: 2048)",
                                at_least=2)
    learn_batch_size: int = option(2, "with --rotation learned: windows per step (SpinQuant: 8)", at_least=1)
    learn_clip_every: int = option(4, "with --rotation learned and RTN weights: learn under the MSE clip search, "
                                   "its per-row clip ratios searched again every N steps (0: a min-max grid)",
                                   at_least=0)


def orthogonality_error(R: torch.Tensor) -> float:
    """max |R R^T - I| (over a batch (..., n, n) too)."""
    return (R @ R.mT - torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)).abs().max().item()


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float) -> torch.Tensor:
    """One step of Cayley SGD on the orthogonal group (Li et al. 2020, as SpinQuant), R and the
    Euclidean gradient G (..., n, n). A = G R^T - R G^T is skew, and A R is G projected onto the
    group's tangent space at R (the Riemannian gradient). The Cayley transform of a skew matrix,
    (I + lr/2 A)^-1 (I - lr/2 A), is orthogonal, so R stays orthogonal for any lr up to float
    rounding, and to first order the step is R - lr A R: steepest descent along the group."""
    A = G @ R.mT - R @ G.mT
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(eye + lr / 2 * A, (eye - lr / 2 * A) @ R)


def _quantized_without_r1(model, quant: QuantConfig, online_down_proj: bool, rotate_qk: bool):
    """A float32 copy with the norms folded, R4 and R3 in place (they do not depend on R1 or R2) and
    the quantizers that will follow: activations (and KV) as configured, weights by RTN at every
    forward when RTN follows (on a min-max grid here; learn_rotation gives them the clip search's
    ratios, searched every few steps: a search is 80 passes over every weight), 16-bit when GPTQ
    follows. Every weight frozen."""
    work = copy.deepcopy(model).float()
    untie_lm_head(work)
    fuse_rmsnorm_into_linears(work)
    if online_down_proj:
        add_online_down_proj_hadamard(work)
    if rotate_qk:
        add_online_qk_hadamards(work)
    rtn = quant.w_method == "rtn" and quant.w_bits < 16
    quantize_model(work, quant, w_bits=quant.w_bits if rtn else 16, w_method="rtn", w_clip_search=False,
                   quantize_weight_every_forward=rtn, progress=False)
    return work.requires_grad_(False).eval()


def _fixed_clip_ratios(work, quant: QuantConfig) -> dict:
    """{weight name: per-row clip ratios (rows, 1)}, one tensor per weight that is quantized at every
    forward, which its quantizer reads from now on (learn_rotation fills them in place)."""
    ratios = {}
    for name, module in work.named_modules():
        if isinstance(module, QuantLinear) and module.weight_quantizer is not None:
            n_rows = module.weight.shape[0] * (1 if quant.w_group_size is None else
                                               module.weight.shape[1] // quant.w_group_size)
            ratios[f"{name}.weight"] = ratio = torch.ones(n_rows, 1, device=module.weight.device)
            module.weight_quantizer = functools.partial(quantize_weight_rtn, bits=quant.w_bits, group_size=quant.w_group_size,
                                              symmetric=quant.w_symmetric, clip_ratio=ratio)
    return ratios


def rotated_weights(frozen: dict, config, r1: torch.Tensor, r2: torch.Tensor | None) -> dict:
    """{name: rotated weight} for every weight R1 (and R2) change, differentiable in r1 and r2."""
    dtype = frozen["embed_tokens.weight"].dtype
    weights = {name: rotate_weight(frozen[name], side, r1.to(dtype))
               for name, side in residual_stream_sites(config)}
    for layer, name, side in value_sites(config) if r2 is not None else ():  # v_proj, o_proj: after R1
        weights[name] = rotate_weight(weights[name], side, r2[layer].to(dtype), config.head_dim)
    return weights


def learn_rotation(model, calibration: torch.Tensor, quant: QuantConfig, steps: int = 20, lr: float = 0.05,
                   seed: int = 0, learn_r2: bool = False, online_down_proj: bool = True, rotate_qk: bool = False,
                   batch_size: int = 2, progress: bool = True, clip_every: int = 4) -> LearnedRotation:
    """R1 (and with learn_r2 one R2 per layer), learned from the seed's Hadamards by `steps` Cayley
    SGD steps (step size lr, cosine-decayed to 0) on the quantized model's mean next-token loss
    over `batch_size` windows of `calibration` (N, T) per step (training text, never the
    evaluation text). `model` is a plain model and is not changed; rotate it with
    rotate_model(..., rotate_ov=learn_r2, learned=...).
    clip_every > 0 (RTN weights with quant.w_clip_search): the weights are rounded on the grids the
    MSE clip search would give, their per-row clip ratios searched again every clip_every steps
    (a search is 80 passes over every weight, too slow for every step); 0: a min-max grid."""
    check_not_rotated(model, "learn_rotation")
    start = time.perf_counter()
    work = _quantized_without_r1(model, quant, online_down_proj, rotate_qk)
    cfg, device = work.config, work.embed_tokens.weight.device
    frozen = {name: p for name, p in work.named_parameters()}
    searched = quant.w_method == "rtn" and quant.w_bits < 16 and quant.w_clip_search and clip_every > 0
    clip_ratios = _fixed_clip_ratios(work, quant) if searched else {}
    # float64 master copies: thousands of Cayley steps would not move them off the group either
    r1 = random_hadamard(cfg.hidden_size, seed).to(device)
    # R2's start is rotate_values_per_head's Hadamard: v -> v M^T for every head of every layer
    r2 = hadamard_transform_matrix(cfg.head_dim).T.to(device).repeat(cfg.num_hidden_layers, 1, 1) \
        if learn_r2 else None
    calibration = calibration.to(device)
    losses, sizes = [], []  # per step: the loss, |A| of R1
    bar = tqdm(range(steps), desc="learn rotation", dynamic_ncols=True, disable=not progress)
    for step in bar:
        if clip_ratios and step % clip_every == 0:  # the grids the clip search gives the weights of now
            with torch.no_grad():
                now = rotated_weights(frozen, cfg, r1, r2)
                for name, ratio in clip_ratios.items():
                    ratio.copy_(weight_clip_ratio(now.get(name, frozen[name]), quant.w_bits, quant.w_group_size,
                                                  quant.w_symmetric))
        rows = [(step * batch_size + j) % len(calibration) for j in range(batch_size)]  # cycle the windows
        batch = calibration[rows]
        leaves = [r.clone().requires_grad_() for r in (r1, r2) if r is not None]
        weights = rotated_weights(frozen, cfg, leaves[0], leaves[1] if learn_r2 else None)
        logits = torch.func.functional_call(work, weights, (batch[:, :-1],))  # the model with these weights
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        step_lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay, as SpinQuant's schedule
        with torch.no_grad():
            G1 = leaves[0].grad
            # the step turns R1 by about step_lr * |A| (Frobenius): what --learn-lr is to be chosen by
            sizes.append((G1 @ r1.T - r1 @ G1.T).norm().item())
            r1 = cayley_step(r1, G1, step_lr)
            r2 = cayley_step(r2, leaves[1].grad, step_lr) if learn_r2 else None
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", grad=f"{sizes[-1]:.3g}")
    for name, r in (("r1", r1), ("r2", r2)):
        if r is not None and orthogonality_error(r) > 1e-8:  # float64: ~1e-14 after hundreds of steps
            raise AssertionError(f"learn_rotation: {name} left the orthogonal group ({orthogonality_error(r):.1e})")
    info = {"steps": steps, "lr": lr, "seed": seed, "batch_size": batch_size, "windows": len(calibration),
            "seq_len": calibration.shape[1], "quantized_as": _learned_under(quant, clip_every if searched else 0),
            "loss": losses,
            "r1_gradient": sizes, "seconds": round(time.perf_counter() - start, 1)}
    return LearnedRotation(r1.cpu(), r2.cpu() if r2 is not None else None, info)


def _learned_under(quant: QuantConfig, clip_every: int = 0) -> str:
    clip = f"MSE clip searched every {clip_every} steps" if clip_every else "min-max"
    weights = f"W{quant.w_bits} RTN {clip}" if quant.w_method == "rtn" and quant.w_bits < 16 else "W16"
    return f"{weights}, A{quant.a_bits}" + (f", KV{quant.kv_bits}" if quant.kv_bits < 16 else "")

