"""The fast Walsh-Hadamard transform against the dense product, and what R4 costs a forward.

1. walsh_hadamard_transform(x) vs x @ H (H the dense orthonormal matrix of the same transform)
   for n = 576, 1536, 4096, 11008, 14336 on 2048 rows: float32 on CPU, and bfloat16 on CUDA
   when a GPU is present. Target: the fast transform wins for n >= 4096.
2. The share of a SmolLM2-135M forward spent in the online Hadamard before down_proj (R4), two
   ways: the time inside the OnlineHadamard modules during the forward (hooks), and the rotated
   model with R4 against the same model rotated without it (interleaved runs, medians; noisier).
   Target: < 10%. On a machine shared with other jobs, 1 thread gives steadier numbers than 2:
   an op split over 2 threads waits whenever either thread is descheduled.
   Timing does not depend on the weights: random weights of SmolLM2-135M's shape are used.

    python bench/bench_rotate.py
    python bench/bench_rotate.py --rows 512 --sizes 576,4096    # quicker
"""
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.options import check_options, one_line_errors, option, parse_config  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from rotate import hadamard_plan, hadamard_transform_matrix, rotate_model, walsh_hadamard_transform  # noqa: E402

SMOLLM2_135M = ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                           rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)


@dataclass
class BenchRotateConfig:
    sizes: str = option("576,1536,4096,11008,14336", "comma-separated transform sizes")
    rows: int = option(2048, "rows of x for the transform benchmark", at_least=1)
    batch: int = option(1, "batch of the SmolLM2-135M forward", at_least=1)
    seq: int = option(512, "sequence length of the SmolLM2-135M forward", at_least=1)
    pairs: int = option(9, "interleaved with/without-R4 forward pairs", at_least=1)
    threads: int = option(2, "CPU threads", at_least=1)

    def validate(self):
        check_options(self)
        try:
            sizes = self.size_list()
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--sizes={self.sizes!r}: must be comma-separated positive integers")

    def size_list(self) -> list[int]:
        return [int(s) for s in self.sizes.split(",")]


def wall(fn, device) -> float:
    """Seconds of one call of fn(), the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def seconds(fn, device, min_repeats=3, budget_s=3.0) -> float:
    """Median wall time of fn() after one warm-up call; at least min_repeats, within ~budget_s."""
    first = wall(fn, device)  # warm-up (caches, allocator, kernels)
    repeats = max(min_repeats, min(50, int(budget_s / max(first, 1e-6))))
    return statistics.median(wall(fn, device) for _ in range(repeats))


@torch.no_grad()
def transform_vs_dense(sizes, rows, dtype, device):
    print(f"\n{rows} rows, {str(dtype).removeprefix('torch.')} on {device}: walsh_hadamard_transform vs x @ H")
    print(f"{'n':>6} {'plan':<44} {'fast ms':>9} {'dense ms':>9} {'dense/fast':>10}")
    for n in sizes:
        x = torch.randn(rows, n, device=device, dtype=dtype)
        H = hadamard_transform_matrix(n, torch.float32).to(device=device, dtype=dtype).T.contiguous()
        t_fast = seconds(lambda: walsh_hadamard_transform(x), device)
        t_dense = seconds(lambda: x @ H, device, min_repeats=1)
        plan = hadamard_plan(n)
        desc = f"{plan.power_of_two} x {plan.K}" + ("" if plan.exact else " (fallback)")
        print(f"{n:>6} {desc:<44} {t_fast * 1e3:>9.2f} {t_dense * 1e3:>9.2f} {t_dense / t_fast:>9.1f}x")
        del H


@torch.no_grad()
def online_hadamard_share(batch, seq, dtype, device, pairs):
    cfg = SMOLLM2_135M
    torch.manual_seed(0)
    plain = Transformer(cfg).to(device=device, dtype=dtype).eval()
    with_r4 = copy.deepcopy(plain)
    rotate_model(with_r4, seed=0, online_down_proj=True)  # OnlineHadamard(1536) before every down_proj
    rotate_model(plain, seed=0, online_down_proj=False)   # the same model without it
    idx = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    # (a) time spent inside the OnlineHadamard modules during the real forward
    inside = []
    def start(module, args):
        if device.type == "cuda":
            torch.cuda.synchronize()
        module.started = time.perf_counter()
    def stop(module, args, out):
        if device.type == "cuda":
            torch.cuda.synchronize()
        inside.append(time.perf_counter() - module.started)
    hooks = [h for layer in with_r4.layers for h in (
        layer.mlp.down_input_transform.register_forward_pre_hook(start),
        layer.mlp.down_input_transform.register_forward_hook(stop))]
    wall(lambda: with_r4(idx), device)  # warm-up
    shares = []
    for _ in range(pairs):
        inside.clear()
        total = wall(lambda: with_r4(idx), device)
        shares.append(sum(inside) / total)
    for h in hooks:
        h.remove()

    # (b) with R4 against without, interleaved so that load from other processes hits both alike
    wall(lambda: plain(idx), device)  # warm-up
    times = [(wall(lambda: with_r4(idx), device), wall(lambda: plain(idx), device)) for _ in range(pairs)]
    t_r4 = statistics.median(a for a, _ in times)
    t_plain = statistics.median(b for _, b in times)
    print(f"\nSmolLM2-135M forward, batch {batch} x {seq} tokens, {str(dtype).removeprefix('torch.')} "
          f"on {device}, online Hadamard of size {cfg.intermediate_size} "
          f"({hadamard_plan(cfg.intermediate_size).describe()}) in {cfg.num_hidden_layers} layers")
    print(f"  time inside the {cfg.num_hidden_layers} OnlineHadamard modules: {statistics.median(shares):.1%} "
          f"of the forward (median of {pairs} forwards)")
    print(f"  forward with R4 {t_r4 * 1e3:.1f} ms, without {t_plain * 1e3:.1f} ms (medians of {pairs} "
          f"interleaved pairs): {(t_r4 - t_plain) / t_r4:+.1%}")


def main(argv=None):
    args = parse_config(BenchRotateConfig(), argv, prog="bench_rotate.py", description=__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    sizes = args.size_list()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    transform_vs_dense(sizes, args.rows, torch.float32, cpu)
    online_hadamard_share(args.batch, args.seq, torch.float32, cpu, args.pairs)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        transform_vs_dense(sizes, args.rows, torch.bfloat16, gpu)
        online_hadamard_share(args.batch, args.seq, torch.bfloat16, gpu, args.pairs)


if __name__ == "__main__":
    with one_line_errors("bench/bench_rotate.py"):
        main()
