"""Learned rotations (SpinQuant) against random Hadamards: W4A4 perplexity of SmolLM2-135M.

The README's quantization-table windows (the first --ppl-windows windows of --seq-len WikiText-2
tokens), W4A4 with RTN weights (MSE clip search) and with GPTQ weights (calibrated on
--calib-windows x --calib-seq-len Alpaca tokens), R4 online as in RoLoRA, for:
  random    random-Hadamard R1, one row per seed of --seeds (printed as min / median / max);
  r1        R1 learned from seed --seed's Hadamard by extras/spinquant.py's learn_rotation: once for RTN (W4 RTN
            and A4 under the loss) and once for GPTQ (W16 and A4 under the loss, as SpinQuant);
  r1r2      the same with R2 (one per layer, folded into v_proj and o_proj) learned too;
  r1-w16    the R1 learned for GPTQ (W16 A4 under the loss), measured with RTN weights too;
  r1-rtn    the R1 learned for RTN (W4 RTN A4 under the loss), measured with GPTQ weights too;
  random-r2 random-Hadamard R1 and Hadamard R2, per seed (not run unless asked).
Learning reads --learn-windows x --learn-seq-len tokens of the same Alpaca text (never WikiText)
and takes --learn-steps steps of --learn-batch-size windows.

Every finished piece (a perplexity, a learned rotation) is written at once to --out: results.json,
and each learned rotation's matrices as <out>/<name>/rotation.safetensors. An interrupted run
continues where it stopped; a run with other learning flags adds rows instead of replacing them.

Run:  python bench/bench_learned_rotation.py --threads 2 --learn-steps 20 --learn-lr 0.5
      python bench/bench_learned_rotation.py --variants r1 --methods rtn --learn-steps 5   # one piece
      python bench/bench_learned_rotation.py --table       # the table from results.json, nothing run
"""
import copy
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as ev  # noqa: E402
from data.alpaca import prepare as alpaca  # noqa: E402
from eval import load_model  # noqa: E402
from rotate import load_learned_rotation, save_learned_rotation  # noqa: E402
from data.options import check_options, flag_name, one_line_errors, option, option_group, parse_config  # noqa: E402
from data.wikitext2.prepare import load_test_text  # noqa: E402
from model import write_atomically  # noqa: E402
from quant import QuantConfig, calibration_windows, quantize_model  # noqa: E402
from extras.spinquant import LearnedRotationConfig, learn_rotation  # noqa: E402
from rotate import LEARNED_ROTATION_FILE, RotationConfig, rotate_model  # noqa: E402

VARIANTS = ("random", "random-r2", "r1", "r1r2", "r1-w16", "r1-rtn")
SET_HERE = ("w_bits", "a_bits", "w_method", "quantize_weight_every_forward")  # quant options this bench sets
ROTATION_SET_HERE = ("rotate_ov", "rotate_qk")


@dataclass
class BenchLearnedConfig:
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    threads: int = option(2, "torch CPU threads", at_least=1)
    variants: str = option("random,r1,r1r2", f"comma-separated, from {', '.join(VARIANTS)}")
    methods: str = option("rtn,gptq", "comma-separated weight quantizers: rtn, gptq")
    seeds: str = option("0,1,2,3,4", "seeds of the random Hadamards")
    seed: int = option(0, "seed of the Hadamard the learned rotations start from")
    rotation: RotationConfig = option_group(RotationConfig, "the rotations besides R1 (rotate.py); R2 and R3 are "
                                            "set by each variant")
    learning: LearnedRotationConfig = option_group(LearnedRotationConfig, "how the rotations are learned "
                                                   "(extras/spinquant.py); --rotation is learned", kind="learned")
    quant: QuantConfig = option_group(QuantConfig, "quantizer options of every row (quant.py); the bits and the "
                                      "weight method are set by each row", calib_windows=32, calib_seq_len=512)
    ppl_windows: int = option(4, "first N WikiText-2 windows of the perplexity", at_least=1)
    seq_len: int = option(2048, "perplexity window in tokens", at_least=2)
    out: str = option("out/bench_learned_rotation", "folder of results.json and the learned matrices")
    table: bool = option(False, "print the table from results.json and exit")

    def validate(self):
        self.quant.validate()
        check_options(self)
        for name in SET_HERE:
            if getattr(self.quant, name) != getattr(QuantConfig(), name):
                raise ValueError(f"{flag_name(name)}: bench_learned_rotation.py sets it for each row itself")
        for name in ROTATION_SET_HERE:
            if getattr(self.rotation, name) != getattr(RotationConfig(), name):
                raise ValueError(f"{flag_name(name)}: bench_learned_rotation.py sets it for each variant itself")
        if self.learning.kind != "learned":
            raise ValueError("--rotation: bench_learned_rotation.py sets it for each variant itself")
        for flag, values, known in (("--variants", self.variants, VARIANTS), ("--methods", self.methods, ("rtn", "gptq"))):
            unknown = [v for v in values.split(",") if v not in known]
            if unknown:
                raise ValueError(f"{flag}={values!r}: unknown {unknown}; choose from {', '.join(known)}")
        try:
            [int(s) for s in self.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds={self.seeds!r}: must be comma-separated integers") from None


LEARNED_FOR = {"r1-w16": "gptq", "r1-rtn": "rtn"}  # variant -> the method its R1 was learned for


def learned_name(variant: str, method: str, args) -> str:
    """The row's key in results.json, with every setting that changes the learned matrices."""
    r = args.learning
    method_learned = LEARNED_FOR.get(variant, method)
    return (f"{variant} for {method}: {r.learn_steps} steps, lr {r.learn_lr}, {r.learn_windows}x{r.learn_seq_len} "
            f"tokens, batch {r.learn_batch_size}, from seed {args.seed}"
            + (f", clip searched every {r.learn_clip_every} steps"
               if r.learn_clip_every and method_learned == "rtn" and args.quant.w_clip_search else ""))


class Results:
    """results.json: {row name: {...}}, rewritten (atomically) after every finished piece."""

    def __init__(self, folder: Path):
        self.folder, self.file = folder, folder / "results.json"
        self.rows = json.loads(self.file.read_text()) if self.file.is_file() else {}

    def save(self, name: str, row: dict):
        self.rows[name] = row
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.file, lambda tmp: Path(tmp).write_text(json.dumps(self.rows, indent=2)))


def w4a4(base, args, perplexity, method: str, learned, seed: int, rotate_ov: bool, gptq_windows) -> dict:
    """Rotate a copy of the plain model (learned or the seed's Hadamards), quantize it W4A4, measure."""
    model = copy.deepcopy(base)
    start = time.perf_counter()
    rotate_model(model, seed=seed, rotate_ov=rotate_ov, online_down_proj=args.rotation.online_down_proj,
                 learned=learned)
    quantize_model(model, args.quant, w_bits=4, a_bits=4, w_method=method,
                   calibration=gptq_windows if method == "gptq" else None, progress=False)
    quantized = time.perf_counter() - start
    ppl = perplexity(model)
    return {"ppl": ppl, "quantize_seconds": round(quantized, 1), "ppl_seconds": round(time.perf_counter() - start - quantized, 1)}


def learned_rotation(base, args, results: Results, variant: str, method: str, learn_windows):
    """The learned rotation of this variant and method: read back from <out>/<slug>/ if an earlier run
    learned it, else learned now and saved at once."""
    if variant in LEARNED_FOR:  # the R1 learned for another weight quantizer than the one that follows
        variant, method = "r1", LEARNED_FOR[variant]
    name = learned_name(variant, method, args)
    folder = results.folder / "".join(c if c.isalnum() else "-" for c in name)
    if (folder / LEARNED_ROTATION_FILE).is_file():
        return load_learned_rotation(folder)
    r = args.learning
    print(f"learning {name}", flush=True)
    learned = learn_rotation(base, learn_windows, dataclasses.replace(args.quant, w_bits=4, a_bits=4, w_method=method),
                             r.learn_steps, r.learn_lr, args.seed, learn_r2=variant == "r1r2",
                             online_down_proj=args.rotation.online_down_proj, batch_size=r.learn_batch_size,
                             clip_every=r.learn_clip_every)
    folder.mkdir(parents=True, exist_ok=True)
    save_learned_rotation(learned, folder)
    return learned


def run(args):
    results = Results(ROOT / args.out)
    base, tokenizer, _ = load_model(args.model)
    text = load_test_text()
    perplexity = lambda m: ev.perplexity(m, tokenizer, text, args.seq_len, args.ppl_windows, progress=False)  # noqa: E731
    alpaca_tokens = tokenizer.encode(alpaca.calibration_text(alpaca.raw_file("cleaned")))
    gptq_windows = calibration_windows(alpaca_tokens, args.quant.calib_windows, args.quant.calib_seq_len)
    learn_windows = calibration_windows(alpaca_tokens, args.learning.learn_windows, args.learning.learn_seq_len, seed=1)
    for variant in args.variants.split(","):
        for method in args.methods.split(","):
            if variant.startswith("random"):
                for seed in map(int, args.seeds.split(",")):
                    name = f"{variant} seed {seed} {method}"
                    if name not in results.rows:
                        results.save(name, w4a4(base, args, perplexity, method, None, seed, variant == "random-r2", gptq_windows))
                        print(f"{name}: {results.rows[name]}", flush=True)
                continue
            name = learned_name(variant, method, args)
            if name in results.rows or LEARNED_FOR.get(variant) == method:  # the latter: the r1 row
                continue
            learned = learned_rotation(base, args, results, variant, method, learn_windows)
            row = w4a4(base, args, perplexity, method, learned, args.seed, variant == "r1r2", gptq_windows)
            loss = learned.info["loss"] or [float("nan")]
            results.save(name, row | {"learn_seconds": learned.info["seconds"], "loss_first": loss[0],
                                      "loss_last": loss[-1], "quantized_as": learned.info["quantized_as"]})
            print(f"{name}: {results.rows[name]}", flush=True)
    print_table(results, args)


def print_table(results: Results, args):
    rows = results.rows
    print(f"\n{args.model}: W4A4 WikiText-2 perplexity, first {args.ppl_windows} windows of {args.seq_len} tokens; "
          f"GPTQ calibrated on {args.quant.calib_windows} x {args.quant.calib_seq_len} Alpaca tokens; R4 online\n")
    print("| rotation | W4A4 RTN | W4A4 GPTQ | learning time (RTN / GPTQ) | calibration loss first -> last (RTN / GPTQ) |")
    print("|---|---:|---:|---:|---|")
    for variant in ("random", "random-r2"):
        ppl = {m: [row["ppl"] for name, row in rows.items() if name.startswith(f"{variant} seed ") and name.endswith(m)]
               for m in ("rtn", "gptq")}
        if any(ppl.values()):
            spread = lambda v: f"{min(v):.2f} / {statistics.median(v):.2f} / {max(v):.2f} ({len(v)} seeds)" if v else "-"
            label = "random Hadamard R1" + (" + R2" if variant == "random-r2" else "")
            print(f"| {label}, min / median / max | {spread(ppl['rtn'])} | {spread(ppl['gptq'])} | - | - |")
    learned = {}
    for name, row in rows.items():
        if name.startswith(("r1 for ", "r1r2 for ", "r1-w16 for ", "r1-rtn for ")):
            variant, rest = name.split(" for ", 1)
            method, settings = rest.split(": ", 1)
            learned.setdefault((variant, settings), {})[method] = row
    formats = {"ppl": lambda r: f"{r['ppl']:.2f}", "time": lambda r: f"{r['learn_seconds']:.0f} s",
               "loss": lambda r: f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"}
    for (variant, settings), by_method in sorted(learned.items()):
        cell = {what: [fmt(by_method[m]) if m in by_method else "-" for m in ("rtn", "gptq")]
                for what, fmt in formats.items()}
        label = {"r1": "R1", "r1r2": "R1+R2", "r1-w16": "R1 for GPTQ (W16)", "r1-rtn": "R1 for RTN"}[variant]
        print(f"| learned {label} ({settings}) | {cell['ppl'][0]} | {cell['ppl'][1]} "
              f"| {' / '.join(cell['time'])} | {' / '.join(cell['loss'])} |")
    print(f"\nresults: {results.file}")


def main(argv=None):
    args = parse_config(BenchLearnedConfig(), argv, prog="bench_learned_rotation.py", description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)
    if args.table:
        print_table(Results(ROOT / args.out), args)
    else:
        run(args)


if __name__ == "__main__":
    with one_line_errors("bench/bench_learned_rotation.py"):
        main()
