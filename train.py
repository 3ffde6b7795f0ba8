"""RoLoRA end to end: rotate -> LoRA fine-tune -> merge -> quantize -> evaluate.

    python train.py --bits 4 --rotate        # RoLoRA, W4A4, SmolLM2-135M-Instruct on Alpaca
    python train.py --bits 4                 # the LoRA baseline (no rotation)
    python train.py --model stories260K --data tinystories --max-steps 30   # seconds

`run` below is the paper's pipeline, one function per stage, each from its own file: model.py
(load), rotate.py (Hadamard rotation; LAR: "LoRA After Rotation"), lora.py (LoRA / ResLoRA
adapters), quant.py (RTN / GPTQ weights, per-token activations), eval.py (zero-shot tasks,
WikiText-2 perplexity). The printed table has the model before and after fine-tuning, each in
full precision and at the chosen bits. `python train.py --help` lists every option; those beyond
the paper (learned rotations, torchrun, --compile, --resume, the saved formats) call extras/.
"""
import copy
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

import eval as evaluation
import lora
import quant
import rotate
from data.mirror import read_prepared_jsonl
from data.options import BadInput, BadValue, check_options, option, option_group, parse_config
from data.tokenizer import Tokenizer, copy_tokenizer_files
from data.wikitext2.prepare import load_test_text
from eval import load_model
from extras import distributed, spinquant
from extras.checkpoints import (load_checkpoint_rotation, load_training_checkpoint, locked_output_folder,
                                save_training_checkpoint)
from extras.compile import compile_blocks
from extras.hf_export import export_plain_llama
from extras.int_kernels import check_runs_on_integers, int_kernels_option, use_integer_kernels
from extras.quantized_checkpoint import save_quantized
from extras.spinquant import LearnedRotationConfig
from lora import LoRAConfig
from model import save_checkpoint, write_atomically
from quant import QuantConfig
from rotate import RotationConfig

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    # what
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    data: str = option("alpaca", "training data: alpaca (instructions, loss on responses) or tinystories (plain LM)")
    out: str = option("out/train", "output folder: checkpoints, merged model, results.json")
    seed: int = option(0, "seed of the rotation, the adapter init and the data order")
    # rotation (rotate.py)
    rotate: bool = option(False, "rotate the model before fine-tuning (RoLoRA); without it: the LoRA baseline")
    rotation: RotationConfig = option_group(RotationConfig, "with --rotate: the rotations besides R1 "
                                            "(rotate.py; RoLoRA: R1 and R4 only)")
    spinquant: LearnedRotationConfig = option_group(LearnedRotationConfig, "with --rotate: how R1 is chosen "
                                                    "(extras/spinquant.py)")
    # adapters (lora.py)
    lora: LoRAConfig = option_group(LoRAConfig, "adapters (lora.py)")
    # optimisation
    lr: float = option(2e-4, "peak learning rate of AdamW (paper: 1e-4 for 3 epochs on 52k examples)")
    weight_decay: float = option(0.0, "AdamW weight decay", at_least=0.0)
    warmup_ratio: float = option(0.01, "share of the steps spent warming up linearly", at_least=0.0, at_most=1.0)
    batch_size: int = option(8, "examples per optimizer step (split into micro-batches by --grad-accum)", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    seq_len: int = option(256, "cutoff length of a training example in tokens (paper: 1024)", at_least=1)
    epochs: float = option(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = option(40, "optimizer steps (default: a short run; 0 or none: use --epochs)",
                                   at_least=1, zero_means_all=True)
    grad_clip: float = option(1.0, "clip the adapter gradient norm to this")
    qat: bool = option(False, "keep activation quantizers active during fine-tuning (straight-through estimator)")
    dtype: str = option("auto", "auto (bf16 on CUDA, fp32 on CPU), float32 or bfloat16 (bf16 weights, bf16 "
                        "autocast, fp32 adapters and quantizer arithmetic, on CPU as on CUDA)",
                        choices=("auto", "float32", "bfloat16"))
    grad_checkpointing: bool = option(False, "recompute block activations in the backward pass (saves memory)")
    fsdp: bool = option(False, "under torchrun: shard the frozen base over the processes for fine-tuning "
                        "(FSDP2 fully_shard, one unit per block) instead of a whole copy on each; the adapters "
                        "stay replicated under DDP")
    compile: bool = option(False, "torch.compile the blocks of the model that trains and of every evaluated one "
                           "(extras/compile.py)")
    device: str = option("auto", "auto, cpu or cuda[:N]")
    # checkpoints
    eval_every: int = option(20, "held-out loss every N steps", at_least=1)
    save_every: int = option(20, "checkpoint every N steps", at_least=1)
    resume: bool = option(False, "continue from the last checkpoint in --out")
    export: bool = option(True, "save the merged model to OUT/merged (with its rotation record) and the "
                                "quantized one to OUT/quantized")
    export_hf: bool = option(False, "also save OUT/hf: the merged model as a plain LLaMA checkpoint (online "
                             "Hadamard folded back) that transformers and lm-evaluation-harness load unchanged")
    # quantization after merging (quant.py)
    bits: int | None = option(None, "shorthand for --w-bits N --a-bits N (wins over them)")
    quant: QuantConfig = option_group(QuantConfig, "quantization after merging (quant.py)",
                                            w_bits=4, a_bits=4, calib_windows=32, calib_seq_len=512)
    # evaluation (eval.py)
    tasks: str = option("boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa", "zero-shot tasks")
    eval_limit: int | None = option(25, "items per task (0 or none: the full test sets)", at_least=1,
                                    zero_means_all=True)
    ppl_windows: int | None = option(4, "WikiText-2 windows for perplexity (0 or none: the whole text)",
                                     at_least=1, zero_means_all=True)
    ppl_seq_len: int = option(512, "perplexity window length (paper: 2048)", at_least=2)
    val_examples: int | None = option(32, "held-out examples for the validation loss (0 or none: all)",
                                      at_least=1, zero_means_all=True)
    eval_batch_size: int = option(32, "evaluation batch size", at_least=1)
    int_kernels: bool = int_kernels_option()

    def __post_init__(self):
        if self.bits is not None:  # a new QuantConfig: never change one another config shares
            self.quant = dataclasses.replace(self.quant, w_bits=self.bits, a_bits=self.bits)

    def validate(self):
        """Check every value before anything is loaded: a bad flag is one line that names it,
        not a traceback minutes later (ValueError, or FileNotFoundError for --data/--resume)."""
        if not (ROOT / "data" / self.data / "prepare.py").is_file() and \
                not (ROOT / "data" / self.data / "train.jsonl").is_file():
            raise FileNotFoundError(f"--data {self.data}: no data/{self.data}/prepare.py "
                                    "(choose alpaca or tinystories)")
        if self.bits is not None:
            quant.check_bits(self.bits, "--bits")
        self.quant.validate()
        self.lora.validate()
        check_options(self)
        for name in ("lr", "alpha", "epochs", "grad_clip"):
            value = getattr(self.lora if name == "alpha" else self, name)
            if not value > 0:
                raise ValueError(f"--{name.replace('_', '-')}={value}: must be positive")
        if self.grad_accum > self.batch_size:
            raise ValueError(f"--grad-accum={self.grad_accum}: more micro-batches than the {self.batch_size} "
                             "examples of a step (--batch-size)")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"--device={self.device!r}: must be auto, cpu or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device={self.device}: this machine's torch has no CUDA device (use auto or cpu)")
        unknown = [t for t in self.task_list() if t not in evaluation.TASKS]
        if unknown:
            raise ValueError(f"--tasks={self.tasks!r}: unknown {unknown}; known tasks: {', '.join(evaluation.TASKS)}")
        if self.int_kernels:  # the quantized rows are evaluated on int8 products (--qat trains on fake ones)
            check_runs_on_integers(self.quant)
        if self.compile and self.fsdp:  # FSDP2's hooks under torch.compile have not run in this project
            raise ValueError("--compile with --fsdp: not supported (untested together); drop one of them")
        if self.spinquant.kind == "learned" and not self.rotate:
            raise ValueError("--rotation learned: add --rotate (--rotation says how R1 is chosen)")
        if self.rotate and (Path(self.model) / "rotation.json").is_file():
            raise ValueError(f"--rotate: {self.model} is already rotated ({Path(self.model) / 'rotation.json'}); "
                             "drop --rotate to fine-tune it as it is")
        if self.resume and not (Path(self.out) / "latest").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out} (no {Path(self.out) / 'latest'})")

    def task_list(self) -> list[str]:
        return [t for t in self.tasks.split(",") if t]


def parse_args(argv=None) -> TrainConfig:
    """Every field of TrainConfig (and of its LoRAConfig and QuantConfig) as a flag, validated."""
    return parse_config(TrainConfig(), argv, prog="train.py", description=__doc__)


# -----------------------------------------------------------------------------
# Data: prompt + response, loss on the response tokens only


def load_examples(data: str, split: str) -> list[dict]:
    """{prompt, response} records of data/<data>/<split>.jsonl, prepared on first use."""
    return read_prepared_jsonl(ROOT / "data" / data / f"{split}.jsonl",
                               importlib.import_module(f"data.{data}.prepare").prepare, f"data/{data}/prepare.py")


def tokenize_example(tok: Tokenizer, example: dict, seq_len: int) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens), as alpaca-lora does it: the full text is encoded
    once, and the prompt alone tells how many leading tokens carry no loss."""
    ids = tok.encode(example["prompt"] + example["response"], bos=True, eos=True)[:seq_len + 1]
    n_prompt = len(tok.encode(example["prompt"], bos=True)) if example["prompt"] else 1
    return ids, n_prompt


def make_batch(tokenized: list[tuple[list[int], int]], pad_id: int):
    """Right-padded inputs x (B, T) and targets y (B, T) with -100 on prompt and padding."""
    T = max(len(ids) for ids, _ in tokenized) - 1
    x = torch.full((len(tokenized), T), pad_id, dtype=torch.long)
    y = torch.full((len(tokenized), T), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(tokenized):
        ids = torch.tensor(ids)
        x[i, :len(ids) - 1] = ids[:-1]
        y[i, :len(ids) - 1] = ids[1:]
        y[i, :n_prompt - 1] = -100  # position j predicts token j+1: no loss on prompt tokens
    return x, y


def batch_for_step(step: int, dataset: list, batch_size: int, seed: int):
    """The examples of optimizer step `step`: a pure function of (seed, epoch, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    per_epoch = max(1, len(dataset) // batch_size)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return [dataset[i] for i in order[k * batch_size:(k + 1) * batch_size].tolist()]


def count_targets(ids: list[int], n_prompt: int) -> int:
    """How many positions of make_batch's targets carry a loss: the response tokens that
    survived the cutoff (none when the prompt alone fills it)."""
    return max(0, len(ids) - n_prompt)


def summed_token_loss(logits, targets):
    """Sum of the cross-entropies over the target tokens (-100 ignored), in float32.
    A sum, not a mean: a micro-batch of prompts cut off before their response adds 0, not NaN."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


def heldout_loss(model, examples, pad_id, batch_size, device, autocast) -> float:
    """Mean per-token loss on the held-out responses."""
    return heldout_losses(model, examples, pad_id, batch_size, device, autocast)[0]


@torch.no_grad()
def heldout_losses(model, examples, pad_id, batch_size, device, autocast) -> tuple[float, list]:
    """(mean per-token loss on the held-out responses, [summed loss, tokens] of each example)."""
    total, count, per_example = 0.0, 0, []
    model.eval()
    for i in range(0, len(examples), batch_size):
        x, y = make_batch(examples[i:i + batch_size], pad_id)
        y = y.to(device)
        with autocast:
            logits = model(x.to(device))
        total += summed_token_loss(logits, y).item()
        count += int((y != -100).sum())
        token_losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                       reduction="none").view(y.shape)  # (B, T), 0 where ignored
        per_example += [[loss, n] for loss, n in zip(token_losses.sum(1).tolist(), (y != -100).sum(1).tolist())]
    return total / max(1, count), per_example


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class NonFiniteLoss(RuntimeError):
    pass


def finetune(run: "Run", model) -> dict:
    """AdamW on the adapters only, cosine schedule with warm-up, clipping, accumulation,
    validation and atomic checkpoints; returns the training history."""
    cfg, out = run.cfg, run.out
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or max(1, int(cfg.epochs * len(run.train_set) // cfg.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total, warmup_steps=max(1, int(cfg.warmup_ratio * total))))
    step, history = 0, {"train_loss": [], "val_loss": []}
    if cfg.resume:
        meta = load_training_checkpoint(out, model, optimizer, scheduler)
        step, history = meta["step"], meta["history"]
        run.log(f"resumed from {out / 'latest'} at step {step}")
    trained = distributed.data_parallel(model) if run.world > 1 else model
    sharded = run.world > 1 and cfg.fsdp  # then a forward needs every rank: all compute the held-out loss
    bar = tqdm(total=total, initial=step, desc="fine-tune", dynamic_ncols=True, disable=not run.is_main)
    while step < total:
        model.train()
        t0 = time.perf_counter()
        batch = batch_for_step(step, run.train_set, cfg.batch_size, cfg.seed)
        loss_sum, tokens = accumulate_gradients(run, trained, batch)
        if not math.isfinite(loss_sum):  # the same on every rank: the loss is summed over them
            bar.close()
            raise NonFiniteLoss(f"loss is {loss_sum} at step {step + 1}: stopped. The last good checkpoint is "
                                f"{out / 'latest'} (resume with --resume after lowering --lr)")
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train_loss"].append(loss_sum)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        if (run.is_main or sharded) and (step % cfg.eval_every == 0 or step == total):  # the others wait
            history["val_loss"].append((step, run.heldout_loss(model)))  # in the next step
            if sharded:  # a no-grad forward leaves the root's weights gathered; rank 0's state_dict()
                model.reshard()  # alone would reshard them, and the ranks' next forwards would differ
            run.log(f"step {step}: train loss {loss_sum:.4f}, held-out loss {history['val_loss'][-1][1]:.4f}")
        if run.is_main and (step % cfg.save_every == 0 or step == total):
            save_training_checkpoint(out, step, model, optimizer, scheduler, {
                "history": history, "rotation": run.record, "config": dataclasses.asdict(cfg)}, run.learned)
    bar.close()
    return history


def accumulate_gradients(run: "Run", trained, batch: list) -> tuple[float, int]:
    """Forward and backward of one optimizer step: this rank's share of the batch (all of it in one
    process) in --grad-accum micro-batches. Returns (the step's loss, tokens this rank ran).

    Each micro-batch's summed loss is divided by the target count of the whole step, not its own:
    the step's gradient is then that of the mean over all its target tokens, however the batch is
    split into micro-batches and ranks. DDP averages the ranks' gradients, hence * world: the sum."""
    n_targets = max(1, sum(count_targets(ids, n_prompt) for ids, n_prompt in batch))
    shard = batch[run.rank::run.world]
    micro = max(1, math.ceil(len(shard) / run.cfg.grad_accum))
    starts = list(range(0, len(shard), micro))
    loss_sum, tokens = 0.0, 0
    for i in starts:
        x, y = make_batch(shard[i:i + micro], run.pad_id)
        x, y = x.to(run.device), y.to(run.device)
        # DDP all-reduces the gradients in the backward of the last micro-batch only
        with nullcontext() if run.world == 1 or i == starts[-1] else trained.no_sync():
            with run.autocast:
                logits = trained(x)
            loss = summed_token_loss(logits, y) * run.world / n_targets
            loss.backward()
        loss_sum += loss.item() / run.world
        tokens += x.numel()
    if run.world > 1:
        loss_sum = distributed.sum_over_ranks(loss_sum, run.device)
    return loss_sum, tokens


def enable_gradient_checkpointing(model):
    """Recompute each block's activations during backward instead of storing them."""
    for block in model.layers:
        block.forward = partial(checkpointed, block.forward)


def checkpointed(forward, *args):
    # The block's forward is this function, not torch's checkpoint itself: called from eager code,
    # checkpoint turns the compiler off for all it runs (--compile would compile nothing); called
    # from here, a frame the compiler traces, it is compiled with the block.
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)


# -----------------------------------------------------------------------------
# The pipeline: what one run shares, then one function per stage


@dataclass
class Run:
    """What the stages of one run share: the settings, where and how to compute, the data."""
    cfg: TrainConfig
    out: Path
    device: str
    dtype: torch.dtype          # of the base weights: bf16 when training under bf16 autocast
    autocast: object            # a context manager: torch.autocast or nullcontext
    log_file: object
    timings: dict = dataclasses.field(default_factory=dict)
    model_dir: Path | None = None   # the checkpoint the run started from
    tok: Tokenizer | None = None
    pad_id: int = 0
    train_set: list = dataclasses.field(default_factory=list)  # (token ids, prompt length) per example
    val_set: list = dataclasses.field(default_factory=list)
    wikitext: str = ""
    calibration: torch.Tensor | None = None                     # GPTQ windows (N, T) from the training data
    record: dict | None = None                                  # the rotation record, when rotated
    learned: rotate.LearnedRotation | None = None               # --rotation learned: R1 (and R2)
    rank: int = 0                                               # under torchrun: this process's rank
    world: int = 1                                              # ... and how many processes train
    clock: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        """Rank 0 evaluates and writes everything (checkpoints, exports, results); the others train."""
        return self.rank == 0

    def wait_for_main(self):
        if self.world > 1:
            distributed.barrier()

    def log(self, msg: str):
        if not self.is_main:  # under torchrun one process speaks
            return
        tqdm.write(msg)
        self.log_file.write(msg + "\n")
        self.log_file.flush()

    def phase_done(self, name: str):
        """Record the wall time since the previous phase ended."""
        now = time.perf_counter()
        self.timings[name] = round(now - self.clock, 2)
        self.clock = now

    def heldout_loss(self, model) -> float:
        return self.heldout_losses(model)[0]

    def heldout_losses(self, model) -> tuple[float, list]:
        return heldout_losses(model, self.val_set, self.pad_id, self.cfg.eval_batch_size, self.device, self.autocast)


@contextmanager
def open_run(cfg: TrainConfig):
    """The Run of a validated config: device and precision chosen, the processes of a torchrun
    joined, the output folder locked (one run at a time may write it) and its log open (rank 0)."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    rank, world = distributed.start(device)
    if world > 1:
        device = distributed.local_device(device, rank)
    if cfg.fsdp and world == 1:
        raise BadValue("--fsdp: shards the base over several processes; start them with "
                         "torchrun --nproc_per_node N train.py ...")
    if cfg.batch_size < world * cfg.grad_accum:
        raise BadValue(f"--batch-size={cfg.batch_size}: fewer examples than the {world} processes x "
                         f"{cfg.grad_accum} micro-batches (--grad-accum) of a step")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.startswith("cuda"))
    # bf16 the same way on a CPU as on CUDA: base weights in bf16, matmuls under autocast, the
    # adapters' master weights (finetune_stage) and the quantizers' arithmetic (quant.py) in fp32
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    try:
        if rank == 0:
            with locked_output_folder(out), (out / "log.txt").open("a") as log_file:
                yield Run(cfg, out, device, dtype, autocast, log_file, rank=rank, world=world)
        else:
            with open(os.devnull, "w") as log_file:
                yield Run(cfg, out, device, dtype, autocast, log_file, rank=rank, world=world)
    finally:
        if world > 1:
            distributed.stop()


def run(cfg: TrainConfig) -> dict | None:
    """RoLoRA (Huang et al. 2024, Figure 2): rotate, fine-tune LoRA on the rotated weights, merge,
    quantize; the model is evaluated before and after, in full precision and quantized. Under
    torchrun every rank trains on its share of each batch and rank 0 does the rest (None elsewhere)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    with open_run(cfg) as r:
        model = load_model_and_data(r)
        r.phase_done("load")
        rotate_stage(r, model)
        r.phase_done("rotate")
        rows = evaluate_before(r, model) if r.is_main else {}
        r.wait_for_main()
        r.phase_done("evaluate_before")
        history = finetune_stage(r, model)
        r.phase_done("finetune")
        if not r.is_main:  # under torchrun the other ranks only train
            return None
        merge_stage(r, model)
        r.phase_done("merge")
        rows |= evaluate_after(r, model, rows)
        r.phase_done("evaluate_after")
        return report(r, rows, history)


def load_model_and_data(r: Run):
    """The checkpoint, its tokenizer, the tokenized training and held-out examples, WikiText-2
    and the GPTQ calibration windows (from the training data, never the evaluation text)."""
    cfg = r.cfg
    model, r.tok, r.model_dir = load_model(cfg.model, dtype=r.dtype, device=r.device)
    r.record = getattr(model, "rotation", None)  # a rotated checkpoint (e.g. an earlier run's OUT/merged)
    r.pad_id = r.tok.eos_id if r.tok.eos_id is not None else 0
    r.train_set = [tokenize_example(r.tok, e, cfg.seq_len) for e in load_examples(cfg.data, "train")]
    r.val_set = [tokenize_example(r.tok, e, cfg.seq_len) for e in load_examples(cfg.data, "val")]
    r.val_set = r.val_set[:cfg.val_examples or None]
    r.wikitext = load_test_text()
    stream = [i for ids, _ in r.train_set for i in ids]
    r.calibration = quant.calibration_windows(stream, cfg.quant.calib_windows, cfg.quant.calib_seq_len, cfg.seed)
    r.log(f"model {r.model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on {r.device}, "
          f"data {cfg.data}: {len(r.train_set)} train / {len(r.val_set)} held-out examples")
    return model


def rotate_stage(r: Run, model):
    """RoLoRA step 1, exact: the rotated model computes the same function (rotate.py)."""
    cfg = r.cfg
    if not cfg.rotate:
        return
    if cfg.spinquant.kind == "learned":
        r.learned = learned_rotation(r, model)
    r.record = rotate.rotate_model(model, seed=cfg.seed, **cfg.rotation.layout(), learned=r.learned)
    r.log(f"rotated: {json.dumps({k: v for k, v in r.record.items() if k != 'learned'})}")


def learned_rotation(r: Run, model) -> rotate.LearnedRotation:
    """Beyond RoLoRA (extras/spinquant.py): R1 (and R2) learned under the quantizers that follow
    (--quant) on windows of the training data; a resumed run reads them from its checkpoint."""
    cfg, how = r.cfg, r.cfg.spinquant
    if cfg.resume and (learned := load_checkpoint_rotation(r.out)) is not None:
        r.log(f"learned rotation read back from {r.out / 'latest'}: not learned again")
        return learned
    stream = [i for ids, _ in r.train_set for i in ids]
    calibration = quant.calibration_windows(stream, how.learn_windows, how.learn_seq_len, cfg.seed)
    learned = spinquant.learn_rotation(
        model, calibration, cfg.quant, how.learn_steps, how.learn_lr, cfg.seed, learn_r2=cfg.rotation.rotate_ov,
        online_down_proj=cfg.rotation.online_down_proj, rotate_qk=cfg.rotation.rotate_qk,
        batch_size=how.learn_batch_size, progress=r.is_main, clip_every=how.learn_clip_every)
    if r.world > 1:  # GPU arithmetic need not agree to the last bit: every rank takes rank 0's matrices
        distributed.broadcast_from_main((learned.r1, learned.r2), r.device)
    loss = learned.info["loss"] or [float("nan")]
    r.log(f"learned R1{'+R2' if cfg.rotation.rotate_ov else ''} in {how.learn_steps} steps "
          f"({learned.info['seconds']:.0f} s): calibration loss {loss[0]:.4f} -> {loss[-1]:.4f}")
    return learned


def quantized_copy(r: Run, model):
    """A fake-quantized copy (quant.py); the original stays full precision for the next stages."""
    gptq = r.cfg.quant.w_method == "gptq" and r.cfg.quant.w_bits < 16
    return quant.quantize_model(copy.deepcopy(model), r.cfg.quant, calibration=r.calibration if gptq else None)


def evaluate_row(r: Run, model, partial: dict | None = None, save_partial=None) -> dict:
    """Held-out loss, WikiText-2 perplexity and zero-shot accuracy of one model (eval.py).
    `partial` is a row cut short (its finished parts are kept), and `save_partial(row so far)` is
    called after each part: bench/reproduce.py uses them to continue an hour-long row."""
    cfg = r.cfg
    model.eval()
    if cfg.compile:  # every evaluated model is another object (a quantized copy is eager again)
        compile_blocks(model)
    row = dict(partial or {})
    save = save_partial or (lambda row: None)
    if "heldout_loss" not in row:  # each part with what a paired comparison of two rows needs
        row["heldout_loss"], row["heldout_examples"] = r.heldout_losses(model)
        save(row)
    with r.autocast:
        if "ppl" not in row:
            row["ppl_windows"] = evaluation.window_nlls(model, r.tok, r.wikitext, cfg.ppl_seq_len, cfg.ppl_windows)
            row["ppl"] = evaluation.perplexity_of(row["ppl_windows"])
            save(row)
        if cfg.task_list():
            row.update(evaluation.evaluate_tasks(model, r.tok, cfg.task_list(), cfg.eval_limit, cfg.eval_batch_size,
                                                 done=row.get("tasks"),
                                                 on_task_done=lambda tasks: save(dict(row, tasks=tasks))))
    return row


def evaluate_before(r: Run, model) -> dict:
    """The base model (rotated or not) in full precision and quantized; a resumed run reads them back."""
    saved = r.out / "results_before.json"
    if r.cfg.resume and saved.is_file():
        return json.loads(saved.read_text())
    rows = {"before / FP": evaluate_row(r, model)}
    if r.cfg.quant.quantizes:
        quantized = quantized_copy(r, model)
        rows[f"before / {r.cfg.quant.label()}"] = evaluate_row(r, use_integer_kernels(quantized) if r.cfg.int_kernels
                                                                else quantized)
    saved.write_text(json.dumps(rows))
    return rows


def finetune_stage(r: Run, model) -> dict:
    """RoLoRA step 2, LoRA After Rotation: adapters trained on the (rotated) weights. With --qat
    they train on a fake-quantized copy (straight-through estimator) and then move onto `model`,
    whose adapters merge_stage merges."""
    cfg = r.cfg
    sharded = cfg.fsdp and r.world > 1
    if sharded and r.device.startswith("cuda"):
        model.to("cpu")  # the whole model waits in CPU memory; its sharded copy goes to the GPUs
    trained = quantized_copy(r, model) if cfg.qat else copy.deepcopy(model) if sharded else model
    torch.manual_seed(cfg.seed)  # the adapter init depends on the seed only
    cfg.lora.add_to(trained)
    lora.mark_only_lora_trainable(trained)
    for p in trained.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights for the adapters, even under bf16
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(trained)
    if sharded:
        distributed.shard_frozen_base(trained, r.device)
    if cfg.compile:  # last: what is compiled is the block as it trains, adapters and checkpointing included
        compile_blocks(trained)
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    r.log(f"{cfg.lora.variant} on {cfg.lora.targets}: {n_train / 1e6:.3f}M trainable parameters"
          + (f"; the base sharded over {r.world} processes (FSDP2)" if sharded else ""))
    history = finetune(r, trained)
    if trained is not model:  # the same adapters, now on the whole full-precision model
        cfg.lora.add_to(model)
        lora.load_lora_state_dict(model, lora.lora_state_dict(trained))
        model.to(r.device)
    return history


def merge_stage(r: Run, model):
    """RoLoRA step 3: W' = W + (alpha / r) B A, still in the rotated basis. The adapters are saved
    first (PEFT layout), the merged model after (with its rotation record when rotated)."""
    lora.save_adapters(model, r.out / "adapters", base_model_name_or_path=str(r.model_dir))
    lora.merge_lora(model, reslora_merge=r.cfg.lora.reslora_merge)
    for p in model.parameters():
        p.requires_grad_(False)
    if r.cfg.export and r.record is not None:
        rotate.save_rotated(model, r.record, r.out / "merged")
    elif r.cfg.export:
        save_checkpoint(model, r.out / "merged")
    if r.cfg.export:
        copy_tokenizer_files(r.model_dir, r.out / "merged")
    if r.cfg.export_hf:
        export_plain_llama(model, r.out / "hf")
        copy_tokenizer_files(r.model_dir, r.out / "hf")


def evaluate_after(r: Run, model, rows: dict) -> dict:
    """RoLoRA step 4: the merged model in full precision, then post-training quantized; the
    quantized model is saved (OUT/quantized) to be evaluated again without calibrating."""
    after = {"after / FP": evaluate_row(r, model)}
    if r.cfg.quant.quantizes:
        quantized = quantized_copy(r, model)
        if r.cfg.export:  # before --int-kernels swaps its linears: the saved codes are the fake model's grid
            save_quantized(quantized, r.out / "quantized")
            copy_tokenizer_files(r.model_dir, r.out / "quantized")
        after[f"after / {r.cfg.quant.label()}"] = evaluate_row(r, use_integer_kernels(quantized) if r.cfg.int_kernels
                                                               else quantized)
    return after


def format_results(rows: dict, tasks: list[str]) -> str:
    head = ["model", "held-out loss", "wiki2 ppl"] + [t + (" *" if t == "boolq" else "") for t in tasks] + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows.items():
        cells = [label, f"{row['heldout_loss']:.4f}", f"{row['ppl']:.2f}"]
        cells += [f"{100 * row['tasks'][t][row['tasks'][t]['metric']]:.1f}" for t in tasks]
        cells.append(f"{100 * row['average']:.1f}" if row.get("average") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(r: Run, rows: dict, history: dict) -> dict:
    """Print the table and write OUT/results.json (atomically) with every number and setting."""
    cfg, tasks = r.cfg, r.cfg.task_list()
    table = format_results(rows, tasks)
    title = (f"{'RoLoRA (rotated)' if cfg.rotate else 'LoRA baseline (not rotated)'}: {Path(cfg.model).name}, "
             f"{cfg.lora.variant} r={cfg.lora.rank} on {cfg.lora.targets}, {cfg.data}, "
             f"{len(history['train_loss'])} steps; {cfg.quant.label()} {cfg.quant.w_method.upper()}; "
             f"tasks on {cfg.eval_limit or 'all'} items each, ppl on {cfg.ppl_windows or 'all'} x {cfg.ppl_seq_len} tokens")
    notes = []
    if "boolq" in tasks:
        notes.append("* BoolQ from a copy without passages: not comparable with published BoolQ numbers.")
    if "smollm2" in cfg.model.lower():
        notes.append("SmolLM2's 'full precision' is its dequantized Q4_1 GGUF release.")
    results = {"title": title, "rows": rows, "table": table, "history": history, "rotation": r.record,
               "config": dataclasses.asdict(cfg), "timings_s": r.timings}
    write_atomically(r.out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2)))
    print(f"\n{title}\n{table}\n" + "\n".join(notes) + f"\nwall time per phase (s): {json.dumps(r.timings)}\n"
          f"results: {r.out / 'results.json'}")
    return results


if __name__ == "__main__":
    try:
        run(parse_args())
    except (NonFiniteLoss, BadInput) as e:
        sys.exit(f"train.py: {e}")
