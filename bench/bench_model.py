"""Our model.py against Hugging Face transformers' LlamaForCausalLM: speed and peak memory.

Same config (SmolLM2-135M shape by default), same weights, same dtype, same inputs, measured
in the same run. Each implementation runs in its own subprocess so that its peak resident
memory (ru_maxrss) is its own. "ours compiled" is ours with compiled blocks (extras/compile.py compile_blocks,
eval.py/train.py --compile); its first forward and first forward+backward, which compile (from a
cold cache, as a first run does), are reported apart from the timed iterations.

    python bench/bench_model.py                      # fp32, CPU, batch 4 x 256 tokens
    python bench/bench_model.py --batch 1 --seq 512 --threads 2
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.options import one_line_errors, option, option_group, parse_config  # noqa: E402
from extras.compile import compile_blocks  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

SMOLLM2_135M = ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                           vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                           max_position_embeddings=8192)


@dataclass
class MeasureConfig:
    """What a timed run measures; bench_train.py times its training steps with the same options."""
    batch: int = option(4, "sequences per forward (or step)", at_least=1)
    seq: int = option(256, "tokens per sequence", at_least=1)
    iters: int = option(3, "timed iterations (after one warm-up)", at_least=1)
    threads: int = option(2, "torch CPU threads", at_least=1)
    dtype: str = option("float32", "dtype of the weights", choices=("float32", "bfloat16", "float16", "float64"))


@dataclass
class BenchModelConfig:
    measure: MeasureConfig = option_group(MeasureConfig, "what is timed")
    impl: str | None = option(None, "internal: measure this implementation only and print its JSON (how "
                              "the script re-invokes itself in a subprocess)", choices=("ours", "ours+compile", "transformers"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_worker(script: str, impl: str, argv=None) -> dict:
    """`script --impl impl` in a subprocess: the JSON it prints. ours+compile gets an empty inductor
    cache of its own, so that its first call measures a cold compile, as a first run pays it."""
    cmd = [sys.executable, script, "--impl", impl] + (sys.argv[1:] if argv is None else list(argv))
    with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache) if impl == "ours+compile" else None
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def build(impl: str, config: ModelConfig, dtype):
    torch.manual_seed(0)
    ours = Transformer(config).to(dtype)
    if impl == "ours":
        return ours, lambda idx: ours(idx)
    if impl == "ours+compile":
        compile_blocks(ours)
        return ours, lambda idx: ours(idx)
    from transformers import LlamaConfig, LlamaForCausalLM
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).to(dtype)
    hf.load_state_dict({("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                        for k, v in ours.state_dict().items()}, strict=False)
    del ours
    return hf, lambda idx: hf(idx).logits.float()


def worker(args):
    torch.set_num_threads(args.measure.threads)
    dtype = getattr(torch, args.measure.dtype)
    model, run = build(args.impl, SMOLLM2_135M, dtype)
    idx = torch.randint(0, SMOLLM2_135M.vocab_size, (args.measure.batch, args.measure.seq),
                        generator=torch.Generator().manual_seed(0))
    tokens = idx.numel()
    result = {"rss_after_load_mib": peak_rss_mib()}

    model.eval()
    with torch.no_grad():
        t = time.perf_counter()
        run(idx)  # warm-up; for ours+compile, the compile of the forward
        result["forward_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(args.measure.iters):
            logits = run(idx)
        result["forward_tok_s"] = tokens * args.measure.iters / (time.perf_counter() - t)
        result["checksum"] = float(logits[0, -1, :8].sum())
    result["peak_rss_forward_mib"] = peak_rss_mib()

    model.train()
    loss_fn = torch.nn.functional.cross_entropy
    for p in model.parameters():
        p.grad = None
    t = time.perf_counter()
    loss_fn(run(idx).flatten(0, 1), idx.flatten()).backward()  # warm-up; ours+compile: forward+backward's compile
    result["fwd_bwd_first_s"] = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(args.measure.iters):
        for p in model.parameters():
            p.grad = None
        loss_fn(run(idx).flatten(0, 1), idx.flatten()).backward()
    result["fwd_bwd_tok_s"] = tokens * args.measure.iters / (time.perf_counter() - t)
    result["peak_rss_train_mib"] = peak_rss_mib()
    print(json.dumps(result))


def main(argv=None):
    args = parse_config(BenchModelConfig(), argv, prog="bench_model.py", description=__doc__)
    if args.impl:
        return worker(args)

    results = {impl: run_worker(__file__, impl, argv) for impl in ("ours", "ours+compile", "transformers")}
    ours, compiled, hf = results["ours"], results["ours+compile"], results["transformers"]
    print(f"SmolLM2-135M shape, {args.measure.dtype}, batch {args.measure.batch} x {args.measure.seq} tokens, "
          f"{args.measure.threads} threads, {args.measure.iters} iterations")
    print(f"{'metric':<28}{'ours':>12}{'ours compiled':>15}{'transformers':>14}{'ratio':>8}{'ratio compiled':>16}")
    for key, better in [("forward_tok_s", "higher"), ("fwd_bwd_tok_s", "higher"),
                        ("peak_rss_forward_mib", "lower"), ("peak_rss_train_mib", "lower")]:
        ratios = [x[key] / hf[key] if better == "higher" else hf[key] / x[key] for x in (ours, compiled)]
        print(f"{key:<28}{ours[key]:>12.1f}{compiled[key]:>15.1f}{hf[key]:>14.1f}{ratios[0]:>8.2f}{ratios[1]:>16.2f}")
    print("ratio > 1 means ours is better (faster, or less memory); "
          f"same weights: logits checksum {ours['checksum']:.4f} (compiled {compiled['checksum']:.4f}) "
          f"vs {hf['checksum']:.4f}")
    print(f"first call, compiling: forward {compiled['forward_first_s']:.1f} s, forward+backward "
          f"{compiled['fwd_bwd_first_s']:.1f} s (eager: {ours['forward_first_s']:.1f} s, {ours['fwd_bwd_first_s']:.1f} s)")


if __name__ == "__main__":
    with one_line_errors("bench/bench_model.py"):
        main()
