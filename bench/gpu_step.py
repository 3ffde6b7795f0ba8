"""The paper's recipe measured on a GPU, each part beside bench_plan.py's prediction of the same run.

bench/gpu_check.sh calls it once per part on a lent GPU machine; each call prints the rows of that
script's table (part | result | bench_plan.py predicts) and appends them to --rows.

  --what step      one training step as train.py runs it (train.accumulate_gradients, then train.finetune's
                   gradient clip and AdamW step) on a random-weight model of a bench_train.py shape at full
                   depth, set up as bench_plan.py sets it up: bf16 base under bf16 autocast, R4's online
                   Hadamard, fp32 LoRA r=16 on q/v, batch 8 x 1024. Timed without, then with gradient
                   checkpointing: tokens/s, MFU against the measured bf16 peak, peak memory. Meanwhile the
                   CPU computes bench_plan.py's prediction from 1- and 2-layer models, as bench_plan.py does.
  --what gptq      GPTQ of one full-width block as train.py quantizes (quantize_model on a deep copy), on the
                   recipe's 128 x 2048 calibration tokens: seconds and peak memory, beside bench_plan.gptq_plan.
  --what pipeline  train.py --model stories260K --data tinystories --rotate --bits 4, a short run on the device.

    python bench/gpu_step.py --shape llama2-7b                   # on a GPU: about a minute
    python bench/gpu_step.py --what gptq --shape llama2-7b
    python bench/gpu_step.py --device cpu --shape smollm2-135m --batch 1 --seq 64 --iters 1   # a dry run on a CPU
"""
import copy
import dataclasses
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_plan  # noqa: E402  (bench/ is this script's folder)
import quant  # noqa: E402
import rotate  # noqa: E402
import train  # noqa: E402
from bench_plan import GB, SHAPES, BenchPlanConfig  # noqa: E402
from data.options import BadValue, check_options, one_line_errors, option, option_group, parse_config  # noqa: E402
from model import Transformer  # noqa: E402
from quant import QuantConfig  # noqa: E402

MEASURED_PEAK_TFLOPS = 790.0  # bf16 matmul of 8192^3 on random data, measured on this project's lent H200
HEADER = "| part | result | bench_plan.py predicts |\n|---|---|---|"
PLAN_THREAD = "bench_plan"  # the thread that computes the prediction
# The short stories260K run: every stage of train.run on the device (tasks without HellaSwag, whose 8 MB
# file would have to travel too)
PIPELINE = ["--model", "stories260K", "--data", "tinystories", "--rotate", "--bits", "4", "--max-steps", "30",
            "--tasks", "boolq,piqa,winogrande,arc_easy,arc_challenge,openbookqa", "--eval-limit", "25",
            "--ppl-windows", "4"]


@dataclass
class GpuStepConfig:
    what: str = option("step", "step: a training step without and with gradient checkpointing; gptq: GPTQ of "
                       "one block; pipeline: train.py --rotate --bits 4 on stories260K, a short run",
                       choices=("step", "gptq", "pipeline"))
    shape: str = option("llama2-7b", f"model shape (random weights), one of bench_train.SHAPES: {', '.join(SHAPES)}")
    iters: int = option(3, "timed steps, after a warm-up step whose FLOPs are counted", at_least=1)
    device: str = option("cuda", "cuda[:N], or cpu for a dry run at a small size")
    predict: bool = option(True, "compute bench_plan.py's prediction beside the measurement")
    plan_wait: float = option(60.0, "--what step: seconds to wait, once the device has measured, for the "
                              "prediction still computing on the CPU", at_least=0.0)
    rows: str | None = option(None, "also append the table's rows to this file (bench/gpu_check.sh collects them)")
    plan: BenchPlanConfig = option_group(
        BenchPlanConfig, "the step's sizes and bench_plan.py's assumptions (bench/bench_plan.py; its --models, "
        "--epochs, --train-examples, --gpu-gb and --reserve-gb play no part here)",
        peak_tflops=MEASURED_PEAK_TFLOPS, threads=max(1, (os.cpu_count() or 4) - 2))
    quant: QuantConfig = option_group(QuantConfig, "--what gptq: the quantization (train.py's recipe)",
                                      w_bits=4, a_bits=4, w_method="gptq")

    def validate(self):
        check_options(self)
        self.plan.validate()
        self.quant.validate()
        if self.shape not in SHAPES:
            raise ValueError(f"--shape={self.shape!r}: not one of {', '.join(SHAPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device={self.device!r}: must be cuda[:N] or cpu")


def parse_args(argv=None) -> GpuStepConfig:
    return parse_config(GpuStepConfig(), argv, prog="gpu_step.py", description=__doc__)


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peak_memory(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: str) -> float | None:
    """The most the caching allocator held in tensors since the last reset (None on a CPU)."""
    return torch.cuda.max_memory_allocated(device) / GB if device.startswith("cuda") else None


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GB"


# -----------------------------------------------------------------------------
# --what step


def measure_step(args: GpuStepConfig) -> dict:
    """{grad checkpointing: False, True} -> step_s, the FLOPs of its warm-up step (FlopCounterMode, counted
    as bench_plan.py counts them) and peak memory. One model serves both: checkpointing is switched on after."""
    cfg, device, sizes = SHAPES[args.shape], args.device, args.plan
    model = bench_plan.build(cfg, cfg.num_hidden_layers, sizes.rank, False, device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    run = train.Run(train.TrainConfig(), Path("."), device, torch.bfloat16, autocast, log_file=None)
    g = torch.Generator().manual_seed(0)  # examples of seq + 1 tokens, all of them scored (as TinyStories)
    batch = [(torch.randint(0, cfg.vocab_size, (sizes.seq + 1,), generator=g).tolist(), 1) for _ in range(sizes.batch)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():  # the body of train.finetune's loop
        train.accumulate_gradients(run, model, batch)
        torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = {}
    for checkpointing in (False, True):
        if checkpointing:
            train.enable_gradient_checkpointing(model)
        reset_peak_memory(device)
        with FlopCounterMode(display=False, custom_mapping=bench_plan.CPU_FLASH_FLOPS) as counter:
            step()  # warm-up: AdamW's state, the kernels' first calls
        synchronize(device)
        t = time.perf_counter()
        for _ in range(args.iters):
            step()
        synchronize(device)
        measured[checkpointing] = {"step_s": (time.perf_counter() - t) / args.iters,
                                   "flops": counter.get_total_flops(), "peak_gb": peak_memory_gb(device)}
        # in the log at once: a part stopped at its time limit while the prediction computes still shows it
        print(f"measured {args.shape}, grad checkpointing {checkpointing}: {measured[checkpointing]}", flush=True)
    return measured


def predict_step(args: GpuStepConfig) -> dict:
    """bench_plan.py's plan of the same step: {grad checkpointing: {"peak": bytes, "flops": ...}}."""
    torch.set_num_threads(args.plan.threads)
    return bench_plan.train_plan(args.shape, bench_plan.measure_model(args.shape, args.plan), args.plan)


def step_rows(args: GpuStepConfig) -> list[str]:
    sizes = args.plan
    tokens = sizes.batch * sizes.seq
    plan = {}

    def predict():
        try:
            plan["predicted"] = predict_step(args)
        except Exception as e:  # the measurement stands without it (the traceback goes to the log)
            traceback.print_exception(e)
            plan["why"] = f"failed: {type(e).__name__}: {e}"

    # bench_plan.py measures on the CPU while the device measures; a daemon thread, which main() leaves behind
    # if it is still running when the wait is over, so that the measurement is printed in any case
    thread = threading.Thread(target=predict if args.predict else lambda: None, name=PLAN_THREAD, daemon=True)
    thread.start()
    measured = measure_step(args)
    thread.join(args.plan_wait)
    predicted = plan.get("predicted")
    why = plan.get("why", f"not done {args.plan_wait:g} s after the measurement" if args.predict else "-")
    rows = []
    for checkpointing, m in measured.items():
        # MFU counts the model's FLOPs, those of the step without checkpointing: the recompute is no useful work
        mfu = measured[False]["flops"] / m["step_s"] / (sizes.peak_tflops * 1e12)
        result = (f"{tokens / m['step_s']:,.0f} tokens/s ({m['step_s']:.2f} s a step), MFU {mfu:.1%} of "
                  f"{sizes.peak_tflops:g} TFLOP/s, peak {gb(m['peak_gb'])}; {m['flops'] / 1e12:.1f} TFLOP a step counted")
        prediction = why
        if predicted:
            p = predicted[checkpointing]
            step_s = p["flops"] / (sizes.mfu * sizes.peak_tflops * 1e12)
            prediction = (f"{tokens / step_s:,.0f} tokens/s at {sizes.mfu:.0%} MFU, peak {gb(p['peak'] / GB)}; "
                          f"{p['flops'] / 1e12:.1f} TFLOP a step")
        part = f"{args.shape} train step{', grad ckpt' if checkpointing else ''} (batch {sizes.batch} x {sizes.seq})"
        rows.append(f"| {part} | {result} | {prediction} |")
    return rows


# -----------------------------------------------------------------------------
# --what gptq


def gptq_rows(args: GpuStepConfig) -> list[str]:
    """GPTQ of a 1-layer model of the shape: one block, its inputs from the embedding, as train.quantized_copy
    quantizes (a deep copy; activations and lm_head left to RTN and untouched)."""
    cfg, device, q = dataclasses.replace(SHAPES[args.shape], num_hidden_layers=1), args.device, args.quant
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg).to(torch.bfloat16)
    rotate.add_online_hadamards(model, r4=True, r3=False)  # down_proj's Hessian is taken after R4, as in the recipe
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, cfg.vocab_size, (q.calib_windows, q.calib_seq_len), generator=g)
    synchronize(device)
    reset_peak_memory(device)
    t = time.perf_counter()
    quant.quantize_model(copy.deepcopy(model), q, calibration=calibration, progress=False)
    synchronize(device)
    seconds, peak = time.perf_counter() - t, peak_memory_gb(device)
    layers = SHAPES[args.shape].num_hidden_layers
    result = (f"{seconds:.1f} s, peak {gb(peak)}; x {layers} blocks: {seconds * layers / 60:.1f} min a run "
              "(train.py runs two)")
    prediction = "-"
    if args.predict:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        plan = bench_plan.gptq_plan(cfg, weights, q)
        minutes = bench_plan.gptq_minutes(plan, args.plan)
        prediction = (f"{60 * minutes:.1f} s ({plan['launches'] / 1e6:.2f}M small ops at {args.plan.launch_us:g} us), "
                      f"peak {gb(plan['peak_gb'])}; x {layers} blocks: {minutes * layers:.1f} min")
    return [f"| GPTQ of one {args.shape} block ({q.calib_windows} x {q.calib_seq_len} tokens) | {result} | {prediction} |"]


# -----------------------------------------------------------------------------
# --what pipeline


def pipeline_rows(args: GpuStepConfig) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as out:  # its checkpoints are not kept
        t = time.perf_counter()
        results = train.run(train.parse_args(PIPELINE + ["--device", args.device, "--out", out]))
        seconds = time.perf_counter() - t
    label = next(label for label in results["rows"] if label.startswith("after /") and label != "after / FP")
    row = results["rows"][label]
    phases = ", ".join(f"{name} {s:.0f}" for name, s in results["timings_s"].items())
    result = (f"{seconds:.0f} s (s per phase: {phases}); {label}: held-out loss {row['heldout_loss']:.4f}, "
              f"wiki2 ppl {row['ppl']:.2f}, average {100 * row['average']:.1f}")
    steps = len(results["history"]["train_loss"])
    return [f"| stories260K pipeline: train.py --rotate --bits 4, {steps} steps, on {args.device} | {result} | - |"]


PARTS = {"step": step_rows, "gptq": gptq_rows, "pipeline": pipeline_rows}


def main(argv=None):
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():  # here, not in validate(): a command
        # line that names no device still parses on a CPU (tests/test_readme.py parses the READMEs' commands)
        raise BadValue(f"--device={args.device}: no CUDA device here (torch.cuda.is_available() is False); "
                       "--device cpu runs a dry run")
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    rows = PARTS[args.what](args)
    print(f"\n{where}, torch {torch.__version__}\n{HEADER}\n" + "\n".join(rows))
    if args.rows:
        with open(args.rows, "a") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    with one_line_errors("bench/gpu_step.py"):
        main()
    if any(t.name == PLAN_THREAD and t.is_alive() for t in threading.enumerate()):
        # Everything is written: leave the unfinished prediction behind. A normal exit would stop its daemon
        # thread inside a torch op, which can abort the interpreter (and the part would count as failed).
        sys.stdout.flush()
        os._exit(0)
