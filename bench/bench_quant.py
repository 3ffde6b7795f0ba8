"""What fake quantization costs, and what it does to perplexity, on SmolLM2-135M.

Default (speed), in one run:
  1. forward time of the fp32 model and of its W4A4 RTN fake-quantized copy (weights already
     quantized; per-token activation quantizers at every linear input) on the same batch,
     interleaved repeats, median; target ratio <= 1.5;
  2. RTN (MSE clip search) time for all weights;
  3. GPTQ time for the whole model on --calib-windows windows of --calib-seq-len tokens of
     Alpaca text (the mirror's alpaca_cleaned_2000.json, tokenized with the model's tokenizer).

--kv: the same perplexity with a 4-bit KV cache, alone and under W4A4 GPTQ weights, without
rotation and with R1+R4, R1+R2+R4 and R1+R2+R3+R4 (R3: the online Hadamard on queries and keys).

--ppl: WikiText-2 perplexity (eval.py's definition, on the first --ppl-windows windows of
--seq-len tokens) under FP, W8A8, W6A6, W4A8, W4A4, each with RTN and GPTQ weights, without
and with rotation (rotate.py). GPTQ weights do not depend on the activation bits (activations
are not quantized while GPTQ collects its Hessians), so each weight setting is quantized once.

Run:  python bench/bench_quant.py --threads 2
      python bench/bench_quant.py --ppl --ppl-windows 16 --seq-len 512 --calib-windows 32
      python bench/bench_quant.py --kv --threads 1 --ppl-windows 4 --seq-len 2048 --calib-windows 32

The quantizer options of quant.py (--w-group-size, --no-w-clip-search, --gptq-damp-ratio, ...)
apply to every measurement; the bits and the weight method are set by each measurement.
"""
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402  (the evaluation's own perplexity, so the numbers match eval.py's)
from data.alpaca import prepare as alpaca  # noqa: E402
from data.options import check_options, flag_name, one_line_errors, option, option_group, parse_config  # noqa: E402
from data.wikitext2.prepare import load_test_text  # noqa: E402
from eval import load_model  # noqa: E402
from quant import QuantConfig, calibration_windows, quantize_model  # noqa: E402
from rotate import rotate_model  # noqa: E402

PPL_SETTINGS = [(8, 8), (6, 6), (4, 8), (4, 4)]  # (w_bits, a_bits)
PER_MEASUREMENT = ("w_bits", "a_bits", "kv_bits", "w_method", "quantize_weight_every_forward")  # set here, not by flags


@dataclass
class BenchQuantConfig:
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    threads: int = option(2, "torch CPU threads", at_least=1)
    batch: int = option(2, "sequences per timed forward", at_least=1)
    batch_len: int = option(256, "tokens per sequence of the timed forward", at_least=1)
    repeats: int = option(5, "timed forwards per model (median), after one warm-up", at_least=1)
    calibration: str = option("", "GPTQ calibration text (.txt or Alpaca .json); default: the mirror's "
                              "alpaca_cleaned_2000.json")
    quant: QuantConfig = option_group(QuantConfig, "quantizer options of every measurement (quant.py); the bits "
                                      "and the weight method are set by each measurement",
                                      calib_windows=128, calib_seq_len=512)
    ppl: bool = option(False, "print the perplexity table instead of the timings")
    kv: bool = option(False, "print the KV-cache table (KV4, W4A4KV4 GPTQ; each rotation, R3 included) instead")
    ppl_windows: int = option(16, "first N WikiText-2 windows of the perplexity", at_least=1)
    seq_len: int = option(512, "perplexity window in tokens", at_least=2)

    def validate(self):
        self.quant.validate()
        check_options(self)
        for name in PER_MEASUREMENT:
            value = getattr(self.quant, name)
            if value != getattr(QuantConfig(), name):
                raise ValueError(f"{flag_name(name)}={value!r}: bench_quant.py sets the bits and the weight "
                                 "method of each measurement itself")
        if self.calibration and not Path(self.calibration).is_file():
            raise FileNotFoundError(f"--calibration {self.calibration}: no such file")


def calibration(tokenizer, args) -> torch.Tensor:
    source = args.calibration or alpaca.raw_file("cleaned")
    return calibration_windows(tokenizer.encode(alpaca.calibration_text(source)), args.quant.calib_windows,
                               args.quant.calib_seq_len)


@torch.no_grad()
def forward_seconds(models: dict, batch: torch.Tensor, repeats: int) -> dict:
    """Median forward time per model, the models interleaved so that load changes hit all alike."""
    for model in models.values():
        model(batch)  # warm-up
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(batch)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def speed(model, tokenizer, args):
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.batch_len),
                          generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    w4a4 = quantize_model(copy.deepcopy(model), args.quant, w_bits=4, a_bits=4)
    rtn_seconds = time.perf_counter() - start
    seconds = forward_seconds({"fp32": model, "W4A4 RTN": w4a4}, batch, args.repeats)
    ratio = seconds["W4A4 RTN"] / seconds["fp32"]
    del w4a4

    windows = calibration(tokenizer, args)
    start = time.perf_counter()
    quantize_model(copy.deepcopy(model), args.quant, w_bits=4, w_method="gptq", calibration=windows)
    gptq_seconds = time.perf_counter() - start

    tokens = args.batch * args.batch_len
    print(f"\nSmolLM2-135M, fp32, CPU, {torch.get_num_threads()} threads\n")
    print("| measurement | value |")
    print("|---|---:|")
    print(f"| forward fp32, batch {args.batch}x{args.batch_len} (median of {args.repeats}) | {seconds['fp32']:.3f} s |")
    print(f"| forward W4A4 RTN fake-quant, same batch | {seconds['W4A4 RTN']:.3f} s |")
    print(f"| ratio W4A4 / fp32 (target <= 1.5) | {ratio:.2f} |")
    print(f"| tokens/s fp32 / W4A4 | {tokens / seconds['fp32']:.0f} / {tokens / seconds['W4A4 RTN']:.0f} |")
    print(f"| RTN W4 with MSE clip search, all weights | {rtn_seconds:.1f} s |")
    print(f"| GPTQ W4, {args.quant.calib_windows} windows x {args.quant.calib_seq_len} tokens | {gptq_seconds:.1f} s |")


def perplexities(model, tokenizer, args):
    text = load_test_text()
    ppl = lambda m: ev.perplexity(m, tokenizer, text, args.seq_len, args.ppl_windows, progress=False)  # noqa: E731
    windows = calibration(tokenizer, args)
    bases = {"no rotation": model}
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    bases["rotation"] = rotated
    rows = []
    for base_name, base in bases.items():
        rows.append((base_name, "FP", "-", ppl(base)))
        for method in ("rtn", "gptq"):
            for w_bits in sorted({w for w, _ in PPL_SETTINGS}, reverse=True):
                start = time.perf_counter()
                weights_only = quantize_model(copy.deepcopy(base), args.quant, w_bits=w_bits, w_method=method,
                                              calibration=windows if method == "gptq" else None)
                print(f"[{base_name}] {method} W{w_bits}: {time.perf_counter() - start:.0f} s", flush=True)
                for w, a_bits in PPL_SETTINGS:
                    if w == w_bits:
                        quantized = quantize_model(copy.deepcopy(weights_only), args.quant, a_bits=a_bits)
                        rows.append((base_name, f"W{w_bits}A{a_bits}", method.upper(), ppl(quantized)))
                        print(f"  {rows[-1]}", flush=True)
                del weights_only
    print(f"\nSmolLM2-135M WikiText-2 perplexity, first {args.ppl_windows} windows of {args.seq_len} tokens; "
          f"GPTQ calibrated on {args.quant.calib_windows} x {args.quant.calib_seq_len} Alpaca tokens\n")
    print("| model | bits | weights | perplexity |")
    print("|---|---|---|---:|")
    for base_name, bits, method, value in rows:
        print(f"| {base_name} | {bits} | {method} | {value:.2f} |")


KV_ROTATIONS = {  # name -> rotate_model options (None: not rotated)
    "no rotation": None,
    "R1+R4": dict(online_down_proj=True),
    "R1+R2+R4": dict(online_down_proj=True, rotate_ov=True),
    "R1+R2+R3+R4": dict(online_down_proj=True, rotate_ov=True, rotate_qk=True),
}


def kv_perplexities(model, tokenizer, args):
    """The 4-bit KV cache (QuaRot's quantizer: asymmetric per head and token, --kv-clip-ratio) alone
    and under W4A4 GPTQ weights, for each rotation of KV_ROTATIONS: R3 rotates the keys, R2 the values."""
    text = load_test_text()
    ppl = lambda m: ev.perplexity(m, tokenizer, text, args.seq_len, args.ppl_windows, progress=False)  # noqa: E731
    windows = calibration(tokenizer, args)
    rows = []
    for name, rotation in KV_ROTATIONS.items():
        base = copy.deepcopy(model)
        if rotation is not None:
            rotate_model(base, seed=0, **rotation)
        start = time.perf_counter()
        gptq = quantize_model(copy.deepcopy(base), args.quant, w_bits=4, w_method="gptq", calibration=windows)
        print(f"[{name}] GPTQ W4: {time.perf_counter() - start:.0f} s", flush=True)
        settings = {"FP (KV16)": (base, {}), "KV4": (base, dict(kv_bits=4)),
                    "W4A4 GPTQ (KV16)": (gptq, dict(a_bits=4)), "W4A4KV4 GPTQ": (gptq, dict(a_bits=4, kv_bits=4))}
        for label, (weights, bits) in settings.items():
            quantized = quantize_model(copy.deepcopy(weights), args.quant, **bits) if bits else weights
            rows.append((name, label, ppl(quantized)))
            print(f"  {rows[-1]}", flush=True)
        del base, gptq
    print(f"\nSmolLM2-135M WikiText-2 perplexity, first {args.ppl_windows} windows of {args.seq_len} tokens; "
          f"GPTQ calibrated on {args.quant.calib_windows} x {args.quant.calib_seq_len} Alpaca tokens; KV cache "
          f"{'symmetric' if args.quant.kv_symmetric else 'asymmetric'}, clip {args.quant.kv_clip_ratio}\n")
    by_rotation = {}
    for name, label, value in rows:
        by_rotation.setdefault(name, {})[label] = value
    labels = list(next(iter(by_rotation.values())))
    print("| rotation | " + " | ".join(labels) + " | KV4 / KV16 | W4A4KV4 / W4A4 |")
    print("|---|" + "---:|" * (len(labels) + 2))
    for name, values in by_rotation.items():
        kv_cost = values["KV4"] / values["FP (KV16)"]
        kv_cost_w4a4 = values["W4A4KV4 GPTQ"] / values["W4A4 GPTQ (KV16)"]
        print(f"| {name} | " + " | ".join(f"{values[label]:.2f}" for label in labels)
              + f" | {kv_cost:.3f} | {kv_cost_w4a4:.3f} |")


def main(argv=None):
    args = parse_config(BenchQuantConfig(), argv, prog="bench_quant.py", description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    model, tokenizer, _ = load_model(args.model)
    if args.kv:
        kv_perplexities(model, tokenizer, args)
    elif args.ppl:
        perplexities(model, tokenizer, args)
    else:
        speed(model, tokenizer, args)


if __name__ == "__main__":
    with one_line_errors("bench/bench_quant.py"):
        main()
