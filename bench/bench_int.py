"""The integer path (extras/int_kernels.py, --int-kernels) against fake quantization and fp32, on SmolLM2-135M.

The model as the main job quantizes it: rotated (R1 + R4, seed 0), RTN weights with the MSE clip
search, per-token activations, symmetric. Default, in one run:
  1. forward tokens/s and memory of fp32, fake W4A4, integer W4A4 and integer W8A8 on one batch, at
     each --threads, every model in its own subprocess: the bytes its weights and buffers hold, and the
     peak resident memory of its forward (the high-water mark reset once the model is built), which
     also holds what building the model left in the heap; the forward's own is that peak minus the
     resident memory just before it;
  2. where a forward's time goes (1 thread): the block linears' matrix products, the activation
     quantization, the integer path's rescale and zero-point terms, the online Hadamard, lm_head (float
     in every model) and the rest (attention, norms, embedding);
  3. the matrix product alone, torch._int_mm on int8 against F.linear on fp32, at SmolLM2's shapes, and
     the same integer product on torch's x86 quantized engine: what the best int8 kernel here reaches.
--ppl: WikiText-2 perplexity of the fake and the integer model, W4A4 and W8A8, and of the fake model with
its embedding scaled by 1 + 2^-23 (one float32 ulp): how far any change of rounding moves it.
--main-job: one of the main job's W4A4 evaluations (train.evaluate_row: held-out loss, perplexity and the
seven tasks, on the rotated base model), fake and integer, in wall and CPU seconds (at 1 thread the CPU
seconds are what a job sharing the cores does not inflate), with the fake row's embedding nudged by one
ulp beside them; the main job runs two such rows.

    python bench/bench_int.py                       # 1. to 3., about 40 minutes on 2 quiet cores
    python bench/bench_int.py --ppl --threads 2
    python bench/bench_int.py --main-job --threads 2
"""
import contextlib
import copy
import ctypes
import gc
import io
import json
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402
import train  # noqa: E402
from data.options import one_line_errors, option, parse_config  # noqa: E402
from data.wikitext2.prepare import load_test_text  # noqa: E402
from extras import int_kernels  # noqa: E402
from extras.int_kernels import IntegerLinear, use_integer_kernels  # noqa: E402
from quant import ActQuantizer, QuantLinear, quantize_model  # noqa: E402
from rotate import OnlineHadamard, rotate_model  # noqa: E402

IMPLS = ("fp32", "fake W4A4", "int W4A4", "int W8A8")


@dataclass
class BenchIntConfig:
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    batch: int = option(4, "sequences per timed forward", at_least=1)
    seq: int = option(256, "tokens per sequence", at_least=1)
    repeats: int = option(3, "timed forwards per model (median), after a short warm-up", at_least=1)
    threads: str = option("1,2", "torch CPU threads, comma-separated: one row of the speed table each")
    ppl: bool = option(False, "print the perplexity table instead (at the last of --threads)")
    ppl_windows: int = option(4, "WikiText-2 windows of the perplexity", at_least=1)
    seq_len: int = option(512, "perplexity window in tokens", at_least=2)
    main_job: bool = option(False, "time one of the main job's W4A4 evaluations instead, fake and integer")
    impl: str | None = option(None, "internal: measure this model only and print its JSON (the subprocess)",
                              choices=IMPLS)

    def thread_counts(self) -> list[int]:
        return [int(n) for n in self.threads.split(",")]


def rotated_model(args):
    model, tokenizer, _ = ev.load_model(args.model)
    rotate_model(model, seed=0)
    return model, tokenizer


def build(impl: str, args) -> nn.Module:
    model, _ = rotated_model(args)
    if impl != "fp32":
        bits = 8 if impl.endswith("W8A8") else 4
        quantize_model(model, w_bits=bits, a_bits=bits, progress=False)
        if impl.startswith("int"):
            use_integer_kernels(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what building freed goes back to the system: the peak is the model's
    return model.eval()


@contextlib.contextmanager
def timers(model: nn.Module):
    """Seconds spent inside each piece of a forward (inclusive), by wrapping the functions that compute them."""
    spent = defaultdict(float)

    def timed(owner, name, label):
        original, own = getattr(owner, name), name in vars(owner)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - start
        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, original) if own else delattr(owner, name)
    undo = [timed(nn.Linear, "forward", "nn.Linear"), timed(QuantLinear, "forward", "QuantLinear"),
            timed(IntegerLinear, "forward", "IntegerLinear"), timed(ActQuantizer, "forward", "act quant"),
            timed(IntegerLinear, "input_codes", "act quant"), timed(int_kernels, "int8_matmul", "int matmul"),
            timed(OnlineHadamard, "forward", "online Hadamard"), timed(model.lm_head, "forward", "lm_head")]
    try:
        yield spent
    finally:
        for restore in reversed(undo):
            restore()


def breakdown(spent: dict, total: float) -> dict:
    """Exclusive seconds per piece of a forward, from the inclusive timers (lm_head is an nn.Linear)."""
    linears = spent["nn.Linear"] - spent["lm_head"] + spent["QuantLinear"] + spent["IntegerLinear"]  # the blocks'
    rescale = spent["IntegerLinear"] - spent["act quant"] - spent["int matmul"] if spent["IntegerLinear"] else 0.0
    parts = {"matmul": linears - spent["act quant"] - rescale, "act quant": spent["act quant"],
             "rescale": rescale, "online Hadamard": spent["online Hadamard"], "lm_head": spent["lm_head"]}
    return dict(parts, rest=total - sum(parts.values()))


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS), or its high-water mark (VmHWM), in MiB (Linux)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def tensor_mib(model: nn.Module) -> float:
    """What the model's parameters and buffers hold (a tied tensor once)."""
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values()) / 2 ** 20


@torch.no_grad()
def worker(args):
    torch.set_num_threads(args.thread_counts()[0])
    model = build(args.impl, args)
    idx = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    model(idx[:1, :16])  # warm-up
    before = rss_mib()  # the model, and what building it left in the heap
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux): the peak from here on
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model(idx)
        seconds.append(time.perf_counter() - start)
    result = {"tokens_per_s": idx.numel() / statistics.median(seconds), "peak_mib": rss_mib("VmHWM"),
              "forward_mib": rss_mib("VmHWM") - before, "weights_mib": tensor_mib(model)}
    if args.thread_counts()[0] == 1:
        with timers(model) as spent:
            start = time.perf_counter()
            model(idx)
            result["breakdown"] = breakdown(spent, time.perf_counter() - start)
    print(json.dumps(result))


def run_worker(impl: str, threads: int, argv) -> dict:
    cmd = [sys.executable, __file__, *argv, "--impl", impl, "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def x86_engine_product(qx_unsigned: torch.Tensor, qw: torch.Tensor):
    """The same integer product on torch's x86 quantized engine (FBGEMM's uint8 x int8 kernels, which AVX2
    has), or None where torch has no such engine. Scales of 1 make its float input the codes themselves and
    its float output the exact int32 sums (below 2^24 at 4 bits)."""
    if "x86" not in torch.backends.quantized.supported_engines:
        return None
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized tensors; the kernel is what we time
        ones, zeros = torch.ones(qw.shape[0], dtype=torch.double), torch.zeros(qw.shape[0], dtype=torch.long)
        packed = torch.ops.quantized.linear_prepack(
            torch._make_per_channel_quantized_tensor(qw, ones, zeros, 0), None)
    codes = qx_unsigned.float()
    return lambda: torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(codes, 1.0, 0, packed)


@torch.no_grad()
def kernel_table(args):
    """torch._int_mm on int8 codes, and the x86 quantized engine's kernel, against F.linear on fp32, one
    thread, on a block's two shapes; each integer product is checked equal to the exact one."""
    torch.set_num_threads(1)
    tokens = args.batch * args.seq
    print(f"\nThe matrix product alone, {tokens} tokens, 1 thread (G multiply-adds x 2 per second):\n")
    print("| shape (tokens x in) @ (in x out) | fp32 F.linear | int8 torch._int_mm | int / fp32 "
          "| uint8 x int8, x86 engine | x86 / fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for n_in, n_out in ((576, 1536), (1536, 576)):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(tokens, n_in, generator=g), torch.randn(n_out, n_in, generator=g)
        qx = torch.randint(0, 16, (tokens, n_in), generator=g, dtype=torch.uint8)  # 4-bit codes, asymmetric
        qw = torch.randint(-8, 8, (n_out, n_in), generator=g, dtype=torch.int8)
        qx_signed, exact = qx.to(torch.int8), qx.long() @ qw.long().T
        products = {"fp32": lambda: F.linear(x, w), "int_mm": lambda: torch._int_mm(qx_signed, qw.T),
                    "x86": x86_engine_product(qx, qw)}
        rates = {}
        for name, product in products.items():
            if product is None:
                continue
            warm_up = product()  # the integer products' warm-up call is also their exactness check
            if name != "fp32":
                assert torch.equal(warm_up.long(), exact), name
            start = time.perf_counter()
            product()
            rates[name] = 2 * tokens * n_in * n_out / (time.perf_counter() - start) / 1e9
        x86 = (f"{rates['x86']:.1f} | {rates['x86'] / rates['fp32']:.2f}" if "x86" in rates else "n/a | n/a")
        print(f"| {tokens} x {n_in} @ {n_in} x {n_out} | {rates['fp32']:.1f} | {rates['int_mm']:.2f} | "
              f"{rates['int_mm'] / rates['fp32']:.3f} | {x86} |")


def speed(args, argv):
    results = {(impl, n): run_worker(impl, n, argv) for n in args.thread_counts() for impl in IMPLS}
    print(f"\nRotated SmolLM2-135M, RTN, batch {args.batch} x {args.seq}, median of {args.repeats} forward(s)\n")
    print("| model | threads | forward tokens/s | vs fp32 | weights (MiB) | peak RSS (MiB) | vs fp32 | "
          "the forward's own (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.thread_counts():
        fp32 = results[("fp32", n)]
        for impl in IMPLS:
            r = results[(impl, n)]
            print(f"| {impl} | {n} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / fp32['tokens_per_s']:.2f}x | "
                  f"{r['weights_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_mib'] / fp32['peak_mib']:.2f} | "
                  f"{r['forward_mib']:.0f} |")
    if 1 in args.thread_counts():
        pieces = list(results[("fp32", 1)]["breakdown"])
        print("\nWhere one forward's time goes, 1 thread (seconds):\n")
        print("| model | " + " | ".join(pieces) + " | total |")
        print("|---|" + "---:|" * (len(pieces) + 1))
        for impl in IMPLS:
            parts = results[(impl, 1)]["breakdown"]
            print(f"| {impl} | " + " | ".join(f"{parts[p]:.2f}" for p in pieces) + f" | {sum(parts.values()):.2f} |")
    kernel_table(args)


NUDGE = "embedding x (1 + 2^-23)"


@torch.no_grad()
def nudged(model):
    """The model with every embedding value moved by one float32 ulp, in place: a change as small as
    any rounding, to show how far a row moves for reasons that have nothing to do with the kernels."""
    model.embed_tokens.weight.mul_(1 + 2 ** -23)
    return model


def perplexities(args):
    torch.set_num_threads(args.thread_counts()[-1])
    model, tokenizer = rotated_model(args)
    text = load_test_text()
    ppl = lambda m: ev.perplexity(m, tokenizer, text, args.seq_len, args.ppl_windows, progress=False)  # noqa: E731
    rows = []
    for bits in (4, 8):
        fake = quantize_model(copy.deepcopy(model), w_bits=bits, a_bits=bits, progress=False)
        base = ppl(fake)
        rows += [(f"fake W{bits}A{bits}", base, base),
                 (f"fake W{bits}A{bits}, {NUDGE}", ppl(nudged(copy.deepcopy(fake))), base),
                 (f"int W{bits}A{bits}", ppl(use_integer_kernels(fake)), base)]
        print(rows[-3:], flush=True)
    print(f"\nRotated SmolLM2-135M, RTN, WikiText-2, {args.ppl_windows} windows of {args.seq_len} tokens\n")
    print("| model | perplexity | vs fake |")
    print("|---|---:|---:|")
    for name, value, base in rows:
        print(f"| {name} | {value:.2f} | {value / base - 1:+.2%} |")


def main_job(args):
    """train.py's own stages on its default configuration: the rotated base model's W4A4 row."""
    torch.set_num_threads(args.thread_counts()[-1])
    cfg = train.TrainConfig(rotate=True, export=False)
    r = train.Run(cfg, Path("out/bench_int"), "cpu", torch.float32, contextlib.nullcontext(), io.StringIO())
    model = train.load_model_and_data(r)
    train.rotate_stage(r, model)
    rows = {}
    for name in ("fake W4A4", f"fake W4A4, {NUDGE}", "int W4A4"):
        quantized = train.quantized_copy(r, model)
        if name.endswith(NUDGE):
            quantized = nudged(quantized)
        start, cpu_start = time.perf_counter(), time.process_time()
        row = train.evaluate_row(r, use_integer_kernels(quantized) if name.startswith("int") else quantized)
        rows[name] = dict(row, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
        print(name, json.dumps({k: rows[name][k] for k in ("seconds", "cpu_seconds", "heldout_loss", "ppl", "average")}),
              flush=True)
    print(f"\nOne of the main job's two W4A4 evaluations ({cfg.eval_limit} items x {len(cfg.task_list())} tasks, "
          f"{cfg.ppl_windows} x {cfg.ppl_seq_len} WikiText-2 tokens, {cfg.val_examples} held-out examples), "
          f"{torch.get_num_threads()} threads\n")
    print("| model | seconds | CPU seconds | vs fake (CPU) | held-out loss | wiki2 ppl | average | items chosen "
          "otherwise than fake |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    fake = rows["fake W4A4"]
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.0f} | {row['cpu_seconds']:.0f} | {row['cpu_seconds'] / fake['cpu_seconds']:.2f}x | "
              f"{row['heldout_loss']:.4f} | {row['ppl']:.2f} | {100 * row['average']:.1f} | "
              f"{choices_differing(row, fake)} of {sum(len(t['chosen']) for t in fake['tasks'].values())} |")


def choices_differing(row: dict, base: dict) -> int:
    """Items of the tasks whose chosen answer differs between two rows."""
    return sum(a != b for task in base["tasks"] for a, b in zip(row["tasks"][task]["chosen"], base["tasks"][task]["chosen"]))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_config(BenchIntConfig(), argv, prog="bench_int.py", description=__doc__.split("\n\n")[0])
    if args.impl:
        worker(args)
    elif args.ppl:
        perplexities(args)
    elif args.main_job:
        main_job(args)
    else:
        speed(args, argv)


if __name__ == "__main__":
    with one_line_errors("bench/bench_int.py"):
        main()
