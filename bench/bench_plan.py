"""A memory and time plan for the paper's recipe on one GPU, from reduced-depth models measured on the CPU.

RoLoRA's recipe (docs PAPERS.md): LoRA r=16 on q_proj, v_proj of the rotated model (R1, and the online
Hadamard R4 on the down_proj input), bf16 base weights, fp32 adapter weights with AdamW, batch 8 x 1024
tokens, 3 epochs of 46802 alpaca-gpt4 examples; then GPTQ on 128 x 2048 calibration tokens, block by
block. For LLaMA-2-7B, LLaMA-2-13B and LLaMA-3-8B, with and without gradient checkpointing, this prints
what one GPU must hold and how long the recipe takes: a prediction, not a GPU measurement.

How: one training step of this project's code (model.py, lora.py, rotate.py's online Hadamard, train.py's
loss and gradient checkpointing) runs in bf16 on the CPU on 1- and 2-layer copies of each shape (random
weights, batch 1 x 1024). Per layer = depth 2 - depth 1; the rest (embedding, final norm, logits, and how
layer 0 differs) = depth 1 - per layer; L layers = rest + L x per layer. Measured that way: the bytes
saved for backward (saved_tensors_hooks, each storage once, parameters left out: they are the weights),
the FLOPs (FlopCounterMode) and the parameter bytes, each printed next to its formula. What a CPU step
cannot show (the loss's transient buffers, GPTQ's Hessians, a GPU's speed) is counted from the code.

    python bench/bench_plan.py                  # the three models: ~7-10 min on 2 busy CPU threads, 10.5 GB
    python bench/bench_plan.py --models llama2-7b --mfu 0.5 --peak-tflops 989
"""
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lora  # noqa: E402
import quant  # noqa: E402
import rotate  # noqa: E402
import train  # noqa: E402  (its loss and its gradient checkpointing: measured as they run)
from bench_train import SHAPES  # noqa: E402  (bench/ is this script's folder)
from data.options import check_options, one_line_errors, option, parse_config  # noqa: E402
from model import BLOCK_INPUTS, Block, ModelConfig, Transformer  # noqa: E402

GB = 1e9
aten = torch.ops.aten
# FlopCounterMode knows the CUDA flash kernel but not the CPU one, which computes the same products
CPU_FLASH_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    # rotate.py's Walsh-Hadamard transform is one custom op (for torch.compile), opaque to the counter:
    # its products are one matmul by the dense (w, w) block per row piece (the additions are not FLOPs
    # FlopCounterMode counts elsewhere either)
    torch.ops.rolora.walsh_hadamard_transform:
        lambda x_shape, transpose, out_shape=None, **kwargs: 2 * x_shape.numel() * dense_hadamard_width(x_shape[-1])}


@dataclass
class BenchPlanConfig:
    models: str = option("llama2-7b,llama2-13b,llama3-8b", "comma-separated shapes of bench_train.SHAPES")
    batch: int = option(8, "sequences per optimizer step (paper: 8)", at_least=1)
    seq: int = option(1024, "tokens per sequence: the cutoff, every batch taken as padded to it (an upper "
                      "bound: make_batch pads to the batch's longest example)", at_least=16)
    rank: int = option(16, "LoRA rank on q_proj, v_proj (alpha changes neither memory nor FLOPs)", at_least=1)
    epochs: float = option(3.0, "passes over the training examples")
    train_examples: int = option(46802, "the 52002 alpaca-gpt4 records minus the tenth held out", at_least=1)
    mfu: float = option(0.4, "model FLOP utilisation assumed on the GPU", at_most=1.0)
    peak_tflops: float = option(989.0, "the GPU's dense bf16 peak, TFLOP/s (H100 SXM: 989)")
    fp32_tflops: float = option(67.0, "its fp32 (and fp64 tensor-core) peak, TFLOP/s, for GPTQ's Hessians "
                                "and solves (H100 SXM: 67)")
    launch_us: float = option(10.0, "host time per small op (kernel launch) in GPTQ's Python loops, us")
    gpu_gb: float = option(80.0, "memory of the GPU, GB (1e9 bytes)")
    reserve_gb: float = option(3.0, "GB left out of the plan: CUDA context, allocator fragmentation, "
                               "gradients in flight")
    threads: int = option(2, "torch CPU threads for the measurement", at_least=1)

    def validate(self):
        check_options(self)
        unknown = [name for name in self.models.split(",") if name not in SHAPES]
        if unknown:
            raise ValueError(f"--models={self.models!r}: unknown {unknown}; known: {', '.join(SHAPES)}")
        for name in ("epochs", "mfu", "peak_tflops", "fp32_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be positive")


# -----------------------------------------------------------------------------
# Measured: one training step of a reduced-depth model on the CPU


def build(config: ModelConfig, depth: int, rank: int, checkpointing: bool, device: str = "cpu") -> Transformer:
    """A `depth`-layer copy of `config` set up for training as train.finetune_stage does it (bench/gpu_step.py
    builds it at full depth on the GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(dataclasses.replace(config, num_hidden_layers=depth)).to(torch.bfloat16)
    # R1 and R4's weight half change only the values of the weights; R4's online half is an op of its own
    rotate.add_online_hadamards(model, r4=True, r3=False)
    lora.add_lora(model, ("q_proj", "v_proj"), rank=rank, alpha=rank)
    lora.mark_only_lora_trainable(model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapter master weights
    if checkpointing:
        train.enable_gradient_checkpointing(model)
    return model


def measure(config: ModelConfig, depth: int, batch: int, seq: int, rank: int, checkpointing: bool) -> dict:
    """Forward and backward of one step under bf16 autocast, as train.accumulate_gradients runs it."""
    model = build(config, depth, rank, checkpointing)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage -> (bytes, logits-sized?): a storage that several ops save counts once

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = (storage.nbytes(), t.shape[-1:] == (config.vocab_size,))
        return t

    idx = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FLOPS) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(idx)
            loss = train.summed_token_loss(logits, idx)
        loss.backward()
    return {"saved": sum(n for n, is_logits in saved.values() if not is_logits),
            "logits": sum(n for n, is_logits in saved.values() if is_logits),
            "flops": counter.get_total_flops(),
            "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad),
            "adapter_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "attention": next(str(op) for op in counter.get_flop_counts()["Global"] if "attention" in str(op))}


def extrapolate(depth1: dict, depth2: dict, layers: int) -> tuple[dict, dict]:
    """(per layer, full depth) of every measured number: per layer = depth 2 - depth 1, and the
    full model = the rest (depth 1 - per layer) + layers x per layer."""
    per_layer = {k: depth2[k] - depth1[k] for k in depth1 if k != "attention"}
    return per_layer, {k: depth1[k] + (layers - 1) * per_layer[k] for k in per_layer}


# -----------------------------------------------------------------------------
# The formulas, from reading the code, for one block after the first (layer 0 gets no input gradient)


def dense_hadamard_width(n: int) -> int:
    """The online Hadamard is one matmul by a dense (w, w) block per row piece, then additions."""
    return rotate._dense_block(n, False, torch.float32, "cpu").shape[0]


def formula_per_layer(cfg: ModelConfig, batch: int, seq: int, rank: int, checkpointing: bool) -> dict:
    d, f, r, tokens = cfg.hidden_size, cfg.intermediate_size, rank, batch * seq
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    adapters = ((d, q), (d, kv))  # (in, out) of the q_proj and v_proj adapters
    # A frozen linear saves only its weight (an input gradient needs no input). Per token:
    per_token = (2 * (4 * d + 4)                         # each RMSNorm: its fp32 input and 1/rms
                 + sum(2 * i + 2 * r for i, _ in adapters)  # LoRA: autocast's bf16 copy of x (for A's
                 # gradient; each adapter makes its own) and A x (for B's)
                 + 2 * (2 * q + 2 * kv) + 4 * cfg.num_attention_heads  # flash: q, k, v, out, logsumexp
                 + 3 * 2 * f)                            # SwiGLU: gate x, silu(gate x), up x
    casts = sum(2 * r * (i + o) for i, o in adapters)    # autocast's bf16 copies of A and B
    base = d * q + 2 * d * kv + q * d + 3 * d * f
    lora_fwd = sum(2 * r * (i + o) for i, o in adapters)
    hadamard = 2 * f * dense_hadamard_width(f)
    attention = 4 * batch * seq * seq * q  # QK^T and PV as FlopCounterMode counts them: the whole T x T
    forward = tokens * (2 * base + lora_fwd + hadamard) + attention
    # backward: input gradients only for the base (2x its forward, not 4x), input and weight gradients
    # for the adapters, the Hadamard's transpose, attention 2.5x (the flash backward recomputes QK^T)
    backward = tokens * (2 * base + 2 * lora_fwd + hadamard) + 2.5 * attention
    # Checkpointing saves the block's input and reruns its forward in backward, but stops once the last
    # saved tensor is back (torch.utils.checkpoint's early stop): down_proj's weight, saved before its matmul.
    recompute = forward - tokens * 2 * f * d if checkpointing else 0
    return {"saved": 2 * d * tokens if checkpointing else per_token * tokens + casts,
            "flops": forward + backward + recompute,
            "param_bytes": 2 * (base + 2 * d), "adapter_params": sum(r * (i + o) for i, o in adapters)}


# -----------------------------------------------------------------------------
# GPTQ (quant.gptq_quantize_blocks inside train.quantized_copy), counted from the code


class CountOps(TorchDispatchMode):
    """The aten ops run under it: on a GPU each is a kernel launch, and GPTQ's loops are made of tiny ones."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@functools.lru_cache
def gptq_ops(rows: int, cols: int) -> int:
    with CountOps() as counter:
        quant.gptq_quantize_weight(torch.randn(rows, cols), torch.eye(cols), bits=4)
    return counter.ops


def gptq_launches(linears: list) -> float:
    """Ops of gptq_quantize_weight on linears [(in, out)]: one loop step per column, and the MSE clip
    search's 80 passes over each chunk of 2^18 // in rows (quant.weight_scale_zero's chunks)."""
    per_column = (gptq_ops(1, 256) - gptq_ops(1, 128)) / 128  # (1 row: one clip-search chunk)
    per_chunk = gptq_ops(2 * 2 ** 18 // 128, 128) - gptq_ops(2 ** 18 // 128, 128)  # two chunks vs one
    return sum(n * per_column + math.ceil(out / max(1, 2 ** 18 // n)) * per_chunk for n, out in linears)


def gptq_plan(cfg: ModelConfig, weight_bytes: float, q: quant.QuantConfig | None = None) -> dict:
    q = q or quant.QuantConfig()  # the recipe's calibration: 128 windows x 2048 tokens, 8 windows per forward
    d, f, T, L = cfg.hidden_size, cfg.intermediate_size, q.calib_seq_len, cfg.num_hidden_layers
    tokens = q.calib_windows * T
    with torch.device("meta"):
        block = Block(cfg, 0)
    groups = [[(block.get_submodule(p).in_features, block.get_submodule(p).out_features) for p in shared.linears]
              for shared in BLOCK_INPUTS]  # linears that read one input share its Hessian
    linears = [lin for group in groups for lin in group]
    n = max(i for i, _ in linears)  # the widest input (down_proj's): the largest Hessian, (n, n) fp64
    # Memory. Alive throughout: the merged model and its deep copy being quantized, and the block inputs
    # of all windows (bf16). Factoring down_proj's Hessian: about 8 (n, n) fp64 matrices at once (the
    # accumulator, hessian(), prepare_hessian's copy, the identity, the flipped damped copy, its Cholesky
    # factor, the triangular solve's result and its flip) and the weight and its result in fp32.
    inputs = tokens * d * 2
    during = 2 * weight_bytes + inputs + 8 * n * n * 8 + 2 * 4 * d * f
    # Computing the next block's inputs: both lists, two Hessians still referenced, one batch's MLP
    # (gate, up, silu, product in bf16; the Hadamard's fp32 input, output and butterfly buffer).
    between = 2 * weight_bytes + 2 * inputs + 2 * n * n * 8 + q.gptq_batch_size * T * f * (4 * 2 + 3 * 4)
    # Time. Each group's Hessian reruns the block up to its first linear (q/k/v: the norm only; o: q/k/v
    # and attention; gate/up: + o; down: + gate/up and the Hadamard), then one full pass gives the next inputs.
    qkv, o, gate_up, down = (2 * sum(i * out for i, out in g) for g in groups)
    attention = 4 * T * cfg.num_attention_heads * cfg.head_dim  # per token, the whole T x T
    hadamard = 2 * f * dense_hadamard_width(f)
    forwards = tokens * (4 * (qkv + attention) + 3 * o + 2 * (gate_up + hadamard) + down)
    hessians = sum(2 * tokens * g[0][0] ** 2 for g in groups)  # x^T x in fp32 (HessianAccumulator.add)
    # per shared Hessian, one factor (quant.prepare_hessian, fp64): a Cholesky (n^3 / 3) and a triangular
    # solve against the identity (n^3); per linear, the error spreading of GPTQ's column loop (fp32)
    solves = sum(4 * g[0][0] ** 3 / 3 for g in groups) + sum(out * i * i for i, out in linears)
    return {"hessians_gb": 8 * n * n * 8 / GB, "peak_gb": max(during, between) / GB,
            "bf16_flops": L * forwards, "fp32_flops": L * (hessians + solves), "launches": L * gptq_launches(linears)}


def gptq_minutes(gptq: dict, args: BenchPlanConfig) -> float:
    """gptq_plan's run in minutes: bf16 FLOPs at the MFU, fp32/fp64 FLOPs at the fp32 peak x MFU, and the small ops."""
    return (gptq["bf16_flops"] / (args.mfu * args.peak_tflops * 1e12)
            + gptq["fp32_flops"] / (args.mfu * args.fp32_tflops * 1e12) + gptq["launches"] * args.launch_us * 1e-6) / 60


# -----------------------------------------------------------------------------
# The plan


def measure_model(name: str, args: BenchPlanConfig) -> dict:
    """Both training setups of one shape: measured per layer and at full depth (batch 1), the formula."""
    cfg, t0, out = SHAPES[name], time.perf_counter(), {}
    for ckpt in (False, True):
        depth1, depth2 = (measure(cfg, depth, 1, args.seq, args.rank, ckpt) for depth in (1, 2))
        per_layer, full = extrapolate(depth1, depth2, cfg.num_hidden_layers)
        out[ckpt] = {"per_layer": per_layer, "full": full, "attention": depth1["attention"], "depth1": depth1,
                     "formula": formula_per_layer(cfg, 1, args.seq, args.rank, ckpt)}
    print(f"{name}: measured in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


CHECKS = ((False, "saved", "saved for backward, MB", 1e6), (True, "saved", "saved, checkpointed, MB", 1e6),
          (False, "flops", "step GFLOP", 1e9), (True, "flops", "step GFLOP, checkpointed", 1e9),
          (False, "param_bytes", "base weights, MB", 1e6))


def check_rows(name: str, m: dict) -> list[str]:
    return [f"| {name} | {label} | {m[ckpt]['per_layer'][key] / unit:.2f} | {m[ckpt]['formula'][key] / unit:.2f} | "
            f"{m[ckpt]['per_layer'][key] / m[ckpt]['formula'][key]:.4f} |" for ckpt, key, label, unit in CHECKS]


def train_plan(name: str, m: dict, args: BenchPlanConfig) -> dict:
    """{grad checkpointing: False, True} -> the step of batch x seq: what it holds at its peak (bytes) and its FLOPs."""
    cfg, B, T = SHAPES[name], args.batch, args.seq
    weights = m[False]["full"]["param_bytes"]
    adapters = 16 * m[False]["full"]["adapter_params"]  # fp32 weight, its gradient, AdamW's two moments
    # The loss, train.summed_token_loss on model.forward's logits: lm_head's bf16 logits live only until
    # forward's .float() (summed_token_loss's .float() is then a no-op); accumulate_gradients holds those fp32
    # logits through the whole backward; log_softmax saves its fp32 output (measured); nll_loss's gradient
    # and log_softmax's input gradient are fp32 (B T, V) too: 16 bytes a logit when backward starts.
    logits = B * T * cfg.vocab_size
    plans = {}
    for ckpt in (False, True):
        full = m[ckpt]["full"]
        saved, loss = B * full["saved"], B * full["logits"] + 12 * logits  # batch 1 -> B: linear
        peak = weights + adapters + saved + loss
        if ckpt:  # or later: the last block recomputed (its activations unsaved) and the fp32 logits
            peak = max(peak, weights + adapters + saved + B * m[False]["per_layer"]["saved"] + 4 * logits)
        plans[ckpt] = {"weights": weights, "adapters": adapters, "saved": saved, "loss": loss, "peak": peak,
                       "flops": B * full["flops"]}
    return plans


def plan_rows(name: str, m: dict, args: BenchPlanConfig, steps: int) -> tuple[list[str], str]:
    cfg, weights = SHAPES[name], m[False]["full"]["param_bytes"]
    tflops, room = args.mfu * args.peak_tflops * 1e12, args.gpu_gb - args.reserve_gb
    gptq = gptq_plan(cfg, weights)
    gptq_min = gptq_minutes(gptq, args)
    rows = []
    for ckpt, p in train_plan(name, m, args).items():
        peak, flops = p["peak"] / GB, p["flops"]
        fits = "yes" if max(peak, gptq["peak_gb"]) <= room else "NO (train)" if peak > room else "NO (GPTQ)"
        cells = [name, "yes" if ckpt else "no", f"{p['weights'] / GB:.1f}", f"{p['adapters'] / GB:.2f}",
                 f"{p['saved'] / GB:.1f}", f"{p['loss'] / GB:.1f}", f"{gptq['hessians_gb']:.1f}", f"{peak:.1f}",
                 f"{gptq['peak_gb']:.1f}", f"{flops / 1e12:.1f}", fits, f"{steps * flops / tflops / 3600:.1f}",
                 f"{gptq_min:.0f}"]
        rows.append("| " + " | ".join(cells) + " |")
    rotation_gb = (weights + 3 * 8 * cfg.vocab_size * cfg.hidden_size) / GB  # the fp64 embedding, transform, buffer
    note = (f"{name}: GPTQ {gptq['bf16_flops'] / 1e15:.1f} PFLOP bf16 + {gptq['fp32_flops'] / 1e15:.1f} PFLOP "
            f"fp32/fp64 + {gptq['launches'] / 1e6:.0f}M small ops; rotating (R1 in fp64, one weight at a time) "
            f"peaks near {rotation_gb:.0f} GB")
    return rows, note


def linearity_note(name: str, m: dict, args: BenchPlanConfig) -> str:
    """Batch 2 against twice batch 1 (depth 1, not checkpointed): the FLOPs scale exactly, the saved bytes
    but for a few that do not depend on the batch (rotary cos/sin tables, autocast's copies of the adapters)."""
    batch2, batch1 = measure(SHAPES[name], 1, 2, args.seq, args.rank, False), m[False]["depth1"]
    constant = 2 * batch1["saved"] - batch2["saved"]
    too_much = (args.batch - 1) * constant * SHAPES[name].num_hidden_layers / GB
    return (f"linearity ({name}, depth 1, batch 2 against 2 x batch 1): "
            f"FLOPs x{batch2['flops'] / batch1['flops']:.4f}; "
            f"saved bytes 2 x batch 1 - {constant / 1e6:.2f} MB that do not grow with the batch, so batch 1 x "
            f"{args.batch} counts at most {too_much:.2f} GB too much at full depth")


def main(argv=None):
    args = parse_config(BenchPlanConfig(), argv, prog="bench_plan.py", description=__doc__)
    torch.set_num_threads(args.threads)
    names = args.models.split(",")
    steps = int(args.epochs * args.train_examples // args.batch)  # as train.finetune counts them
    measured = {name: measure_model(name, args) for name in names}
    print(f"Per layer, measured on 1- and 2-layer models (CPU, bf16 autocast, batch 1 x {args.seq}) against the "
          "formula:\n\n| model | per layer | measured | formula | ratio |\n|---|---|---:|---:|---:|")
    print("\n".join(row for name in names for row in check_rows(name, measured[name])))
    plans = [plan_rows(name, measured[name], args, steps) for name in names]
    print(f"\nPlan, a prediction (not a GPU measurement): batch {args.batch} x {args.seq}, LoRA r={args.rank} on q,v, "
          f"R1 + R4; {steps} steps ({args.epochs:g} epochs of {args.train_examples} examples) at {args.mfu:.0%} MFU "
          f"of {args.peak_tflops:g} TFLOP/s; GB = 1e9 bytes; fits: both peaks <= {args.gpu_gb:g} - "
          f"{args.reserve_gb:g} GB\n")
    print("| model | grad ckpt | weights GB | adapters+grads+AdamW GB | saved activations GB | logits GB | "
          "GPTQ Hessians GB | peak train GB | peak GPTQ GB | step TFLOP | fits | 3 epochs h | GPTQ min |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(row for rows, _ in plans for row in rows) + "\n")
    print("\n".join(note for _, note in plans))
    print(linearity_note(names[0], measured[names[0]], args))
    print(f"attention on this CPU: {measured[names[0]][False]['attention']}; it saves q, k, v, out and the "
          "(B, heads, T) logsumexp, as FlashAttention does on CUDA (assumed chosen there: bf16, causal, no mask).\n"
          "FLOPs are FlopCounterMode's: matmuls only (norms, SwiGLU, the Hadamard's butterflies and AdamW are "
          "left to the MFU), attention over the whole T x T (the causal kernel does about half).\n"
          "logits GB: log_softmax's saved fp32 output, the fp32 logits and two fp32 gradients as backward starts.\n"
          f"GPTQ min: bf16 FLOPs at the MFU, fp32/fp64 at {args.fp32_tflops:g} TFLOP/s x MFU, {args.launch_us:g} us "
          "per small op; train.py runs GPTQ twice (its before and after rows).")


if __name__ == "__main__":
    with one_line_errors("bench/bench_plan.py"):
        main()
