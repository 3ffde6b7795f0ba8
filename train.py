"""RoLoRA end to end: rotate -> LoRA fine-tune -> merge -> quantize -> evaluate.

    python train.py --bits 4 --rotate        # RoLoRA, W4A4, SmolLM2-135M-Instruct on Alpaca
    python train.py --bits 4                 # the LoRA baseline (no rotation)
    python train.py --model stories260K --data tinystories --max-steps 30   # seconds

Stages, each from its own file: model.py (load), rotate.py (Hadamard rotation, LAR: "LoRA
After Rotation"), lora.py (LoRA / ResLoRA adapters), quant.py (RTN / GPTQ weights,
per-token activations), eval.py (zero-shot tasks, WikiText-2 perplexity). The printed table
has the model before and after fine-tuning, each in full precision and at the chosen bits.
`python train.py --help` lists every option.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import eval as evaluation
import lora
import quant
import rotate
from model import LAYER_WEIGHTS, Tokenizer, load_checkpoint, resolve_model_dir, save_checkpoint

ROOT = Path(__file__).resolve().parent


def _opt(default, help_text, **kw):
    return field(default=default, metadata={"help": help_text, **kw})


def _count(default, help_text):
    """An optional count where 0 or 'none' on the command line means 'all' (None)."""
    return _opt(default, help_text, zero_means_all=True)


@dataclass
class TrainConfig:
    # what
    model: str = _opt("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    data: str = _opt("alpaca", "training data: alpaca (instructions, loss on responses) or tinystories (plain LM)")
    out: str = _opt("out/train", "output folder: checkpoints, merged model, results.json")
    seed: int = _opt(0, "seed of the rotation, the adapter init and the data order")
    # rotation (rotate.py)
    rotate: bool = _opt(False, "rotate the model before fine-tuning (RoLoRA); without it: the LoRA baseline")
    online_down_proj: bool = _opt(True, "with --rotate: online Hadamard on the down_proj input (R4)")
    rotate_ov: bool = _opt(False, "with --rotate: also rotate V/O per head (R2, beyond RoLoRA)")
    # adapters (lora.py)
    variant: str = _opt("lora", "lora or reslora")
    targets: str = _opt("q_proj,v_proj", "comma-separated linears to adapt")
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(16.0, "LoRA alpha (scaling alpha / r)")
    dropout: float = _opt(0.0, "dropout on the adapter input")
    res_type: str = _opt("block", "ResLoRA shortcut: input, block or middle")
    pre_num: int = _opt(1, "ResLoRA: how many previous blocks feed the shortcut")
    reslora_merge: str = _opt("input", "ResLoRA merge estimate for input/middle shortcuts: input or weight")
    # optimisation
    lr: float = _opt(2e-4, "peak learning rate of AdamW (paper: 1e-4 for 3 epochs on 52k examples)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_ratio: float = _opt(0.01, "share of the steps spent warming up linearly")
    batch_size: int = _opt(8, "examples per optimizer step (split into micro-batches by --grad-accum)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    seq_len: int = _opt(256, "cutoff length of a training example in tokens (paper: 1024)")
    epochs: float = _opt(1.0, "passes over the training data (ignored when --max-steps is set)")
    max_steps: int | None = _count(40, "optimizer steps (default: a short run; 0 or none: use --epochs)")
    grad_clip: float = _opt(1.0, "clip the adapter gradient norm to this")
    qat: bool = _opt(False, "keep activation quantizers active during fine-tuning (straight-through estimator)")
    dtype: str = _opt("auto", "auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16")
    grad_checkpointing: bool = _opt(False, "recompute block activations in the backward pass (saves memory)")
    device: str = _opt("auto", "auto, cpu or cuda")
    # checkpoints
    eval_every: int = _opt(20, "held-out loss every N steps")
    save_every: int = _opt(20, "checkpoint every N steps")
    resume: bool = _opt(False, "continue from the last checkpoint in --out")
    export: bool = _opt(True, "save the merged full-precision model (and rotation record) to OUT/merged")
    # quantization after merging (quant.py)
    bits: int = _opt(4, "weight and activation bits (16: no quantization)")
    w_bits: int | None = _opt(None, "weight bits (overrides --bits)")
    a_bits: int | None = _opt(None, "activation bits (overrides --bits)")
    kv_bits: int = _opt(16, "KV-cache bits (16: none, as in the paper)")
    quant: str = _opt("rtn", "weight quantizer: rtn (with MSE clip search) or gptq")
    calib_windows: int = _opt(32, "GPTQ calibration windows from the training data (paper: 128)")
    calib_seq_len: int = _opt(512, "GPTQ calibration window length (paper: 2048)")
    # evaluation (eval.py)
    tasks: str = _opt("boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa", "zero-shot tasks")
    eval_limit: int | None = _count(25, "items per task (0 or none: the full test sets)")
    ppl_windows: int | None = _count(4, "WikiText-2 windows for perplexity (0 or none: the whole text)")
    ppl_seq_len: int = _opt(512, "perplexity window length (paper: 2048)")
    val_examples: int | None = _count(32, "held-out examples for the validation loss (0 or none: all)")
    eval_batch_size: int = _opt(32, "evaluation batch size")


    def validate(self):
        """Check every value before anything is loaded: a bad flag is one line that names it,
        not a traceback minutes later (ValueError, or FileNotFoundError for --data/--resume)."""
        def need(ok: bool, flag: str, why: str):
            if not ok:
                raise ValueError(f"--{flag.replace('_', '-')}={getattr(self, flag)!r}: {why}")

        if not (ROOT / "data" / self.data / "prepare.py").is_file() and \
                not (ROOT / "data" / self.data / "train.jsonl").is_file():
            raise FileNotFoundError(f"--data {self.data}: no data/{self.data}/prepare.py "
                                    "(choose alpaca or tinystories)")
        need(self.variant in lora.VARIANTS, "variant", f"must be one of {lora.VARIANTS}")
        need(self.res_type in lora.RES_TYPES, "res_type", f"must be one of {lora.RES_TYPES}")
        need(self.reslora_merge in lora.RESLORA_MERGES, "reslora_merge", f"must be one of {lora.RESLORA_MERGES}")
        need(self.pre_num >= 1, "pre_num", "must be >= 1")
        need(not (self.variant == "reslora" and self.res_type == "input" and self.pre_num != 1), "pre_num",
             "the input shortcut takes exactly one previous block")
        targets = self.targets.split(",")
        unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in ADAPTABLE_LINEARS]
        need(not unknown, "targets", f"{unknown} not among the linears of a block: {', '.join(ADAPTABLE_LINEARS)}")
        for flag in ("rank", "batch_size", "grad_accum", "seq_len", "eval_every", "save_every",
                     "calib_windows", "eval_batch_size"):
            need(getattr(self, flag) >= 1, flag, "must be a positive integer")
        for flag in ("calib_seq_len", "ppl_seq_len"):
            need(getattr(self, flag) >= 2, flag, "a window needs at least 2 tokens")
        for flag in ("max_steps", "eval_limit", "ppl_windows", "val_examples"):
            need(getattr(self, flag) is None or getattr(self, flag) >= 1, flag, "must be positive (0 or none: all)")
        need(self.grad_accum <= self.batch_size, "grad_accum", f"more micro-batches than the {self.batch_size} "
             "examples of a step (--batch-size)")
        for flag in ("lr", "alpha", "epochs", "grad_clip"):
            need(getattr(self, flag) > 0, flag, "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(0 <= self.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
        need(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        need(self.dtype in ("auto", "float32", "bfloat16"), "dtype", "must be auto, float32 or bfloat16")
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", "must be auto, cpu or cuda[:N]")
        need(self.quant in ("rtn", "gptq"), "quant", "must be rtn or gptq")
        for flag in ("bits", "w_bits", "a_bits", "kv_bits"):
            if getattr(self, flag) is not None:
                quant.check_bits(getattr(self, flag), "--" + flag.replace("_", "-"))
        tasks = [t for t in self.tasks.split(",") if t]
        need(all(t in evaluation.TASKS for t in tasks), "tasks", f"known tasks: {', '.join(evaluation.TASKS)}")
        if self.resume and not (Path(self.out) / "latest").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {self.out} (no {Path(self.out) / 'latest'})")


# The linears of a block LoRA can adapt (model.py's checkpoint names ending in _proj).
ADAPTABLE_LINEARS = tuple(w.rsplit(".", 1)[-1] for w in LAYER_WEIGHTS if w.endswith("_proj"))


def parse_args(argv=None) -> TrainConfig:
    """argparse built from the dataclass: one flag per field, with its help text; the values are
    validated before they are returned (argparse's one-line error naming the flag)."""
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        optional = type(None) in typing.get_args(f.type)  # int | None
        kind = typing.get_args(f.type)[0] if optional else f.type
        if f.metadata.get("zero_means_all"):
            kind = zero_or_none_means_all(kind)
        elif optional:
            kind = none_or(kind)
        p.add_argument(flag, type=kind, default=f.default, help=help_text)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return cfg


def none_or(kind):
    """'none' on an optional value means None (e.g. --w-bits none: use --bits)."""
    def parse(text):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def zero_or_none_means_all(kind):
    """'none' or 0 on an optional count means 'no limit' (None)."""
    def parse(text):
        value = none_or(kind)(text)
        return None if value == 0 else value
    parse.__name__ = kind.__name__
    return parse


# -----------------------------------------------------------------------------
# Data: prompt + response, loss on the response tokens only


def load_examples(data: str, split: str) -> list[dict]:
    path = ROOT / "data" / data / f"{split}.jsonl"
    if not path.is_file():
        script = ROOT / "data" / data / "prepare.py"
        if not script.is_file():
            raise FileNotFoundError(f"--data {data}: no data/{data}/prepare.py (choose alpaca or tinystories)")
        prepare = evaluation._load_prepare_script(data)
        prepare.prepare()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing after data/{data}/prepare.py ran")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


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


@torch.no_grad()
def heldout_loss(model, examples, pad_id, batch_size, device, autocast) -> float:
    """Mean per-token loss on the held-out responses."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(examples), batch_size):
        x, y = make_batch(examples[i:i + batch_size], pad_id)
        with autocast:
            logits = model(x.to(device))
        total += summed_token_loss(logits, y.to(device)).item()
        count += int((y != -100).sum())
    return total / max(1, count)


# -----------------------------------------------------------------------------
# Checkpoints: adapters + optimizer + scheduler + RNG, in safetensors and JSON (never pickle)


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Flatten AdamW's state into tensors (safetensors) and everything else (JSON)."""
    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def save_training_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict):
    """Write OUT/ckpt-STEP completely, then point OUT/latest at it (an atomic rename), then
    delete the older checkpoints: an interruption at any moment leaves a complete one."""
    from safetensors.torch import save_file
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, tmp / "adapters.safetensors")
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    meta = dict(extra, step=step, optimizer=opt_rest,
                scheduler={"last_epoch": scheduler.last_epoch, "_step_count": scheduler._step_count})
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = out / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, out / "latest")
    for old in out.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(out: Path, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file
    pointer = out / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out} (no {pointer})")
    ckpt = out / pointer.read_text().strip()
    meta = json.loads((ckpt / "state.json").read_text())
    lora.load_lora_state_dict(model, load_file(ckpt / "adapters.safetensors"),
                              source=str(ckpt / "adapters.safetensors"))
    flat = load_file(ckpt / "optimizer.safetensors")
    state = {}
    for key, v in flat.items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.last_epoch = meta["scheduler"]["last_epoch"]
    scheduler._step_count = meta["scheduler"]["_step_count"]
    torch.set_rng_state(load_file(ckpt / "rng.safetensors")["torch_cpu"])
    return meta


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class NonFiniteLoss(RuntimeError):
    pass


def finetune(cfg: TrainConfig, model, train_set, val_set, pad_id, device, autocast, record, log) -> dict:
    """AdamW on the adapters only, cosine schedule with warm-up, clipping, accumulation,
    validation and atomic checkpoints; returns the training history."""
    out = Path(cfg.out)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or max(1, int(cfg.epochs * len(train_set) // cfg.batch_size))
    warmup = max(1, int(cfg.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup))
    step, history = 0, {"train_loss": [], "val_loss": []}
    if cfg.resume:
        meta = load_training_checkpoint(out, model, optimizer, scheduler)
        step, history = meta["step"], meta["history"]
        log(f"resumed from {out / 'latest'} at step {step}")
    bar = tqdm(total=total, initial=step, desc="fine-tune", dynamic_ncols=True)
    while step < total:
        model.train()
        t0 = time.perf_counter()
        batch = batch_for_step(step, train_set, cfg.batch_size, cfg.seed)
        micro = max(1, math.ceil(len(batch) / cfg.grad_accum))
        n_targets = sum(count_targets(ids, n_prompt) for ids, n_prompt in batch)
        loss_sum, tokens = 0.0, 0
        for i in range(0, len(batch), micro):
            x, y = make_batch(batch[i:i + micro], pad_id)
            x, y = x.to(device), y.to(device)
            with autocast:
                logits = model(x)
            # divide by the step's target count, not the micro-batch's: the step's loss is the
            # mean over all its target tokens, however it is split into micro-batches
            loss = summed_token_loss(logits, y) / max(1, n_targets)
            if not torch.isfinite(loss):
                bar.close()
                raise NonFiniteLoss(
                    f"loss is {loss.item()} at step {step + 1}: stopped. The last good checkpoint is "
                    f"{out / 'latest'} (resume with --resume after lowering --lr)")
            loss.backward()
            loss_sum += loss.item()
            tokens += x.numel()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history["train_loss"].append(loss_sum)
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        bar.update(1)
        if step % cfg.eval_every == 0 or step == total:
            history["val_loss"].append((step, heldout_loss(model, val_set, pad_id, cfg.eval_batch_size, device, autocast)))
            log(f"step {step}: train loss {loss_sum:.4f}, held-out loss {history['val_loss'][-1][1]:.4f}")
        if step % cfg.save_every == 0 or step == total:
            save_training_checkpoint(out, step, model, optimizer, scheduler,
                                     {"history": history, "rotation": record, "config": dataclasses.asdict(cfg)})
    bar.close()
    return history


# -----------------------------------------------------------------------------
# The pipeline


def quant_settings(cfg: TrainConfig) -> dict:
    w_bits = cfg.w_bits if cfg.w_bits is not None else cfg.bits
    a_bits = cfg.a_bits if cfg.a_bits is not None else cfg.bits
    return dict(w_bits=w_bits, a_bits=a_bits, kv_bits=cfg.kv_bits, w_method=cfg.quant)


def quantized_copy(model, cfg: TrainConfig, calibration):
    """A fake-quantized copy (the original stays full precision for the next stages)."""
    q = copy.deepcopy(model)
    settings = quant_settings(cfg)
    needs_calibration = settings["w_method"] == "gptq" and settings["w_bits"] < 16
    return quant.quantize_model(q, calibration=calibration if needs_calibration else None, **settings)


def evaluate_row(model, tok, cfg, val_set, pad_id, device, autocast, wikitext) -> dict:
    """Held-out loss, WikiText-2 perplexity and zero-shot accuracy of one model."""
    model.eval()
    row = {"heldout_loss": heldout_loss(model, val_set, pad_id, cfg.eval_batch_size, device, autocast)}
    with autocast:
        row["ppl"] = evaluation.perplexity(model, tok, wikitext, cfg.ppl_seq_len, cfg.ppl_windows)
        tasks = [t for t in cfg.tasks.split(",") if t]
        if tasks:
            row.update(evaluation.evaluate_tasks(model, tok, tasks, cfg.eval_limit, cfg.eval_batch_size))
    return row


def format_results(rows: dict, tasks: list[str]) -> str:
    head = ["model", "held-out loss", "wiki2 ppl"] + [t + (" *" if t == "boolq" else "") for t in tasks] + ["average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        cells = [label, f"{r['heldout_loss']:.4f}", f"{r['ppl']:.2f}"]
        for t in tasks:
            m = r["tasks"][t]
            cells.append(f"{100 * m[m['metric']]:.1f}")
        cells.append(f"{100 * r['average']:.1f}" if r.get("average") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def enable_gradient_checkpointing(model):
    """Recompute each block's activations during backward instead of storing them."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for block in model.layers:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def run(cfg: TrainConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a")

    def log(msg):
        tqdm.write(msg)
        log_file.write(msg + "\n")
        log_file.flush()

    timings, t = {}, time.perf_counter()

    def phase(name):
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and device == "cuda" else nullcontext()
    load_dtype = torch.bfloat16 if use_bf16 else torch.float32
    settings = quant_settings(cfg)
    bits_label = f"W{settings['w_bits']}A{settings['a_bits']}" + (f"KV{cfg.kv_bits}" if cfg.kv_bits < 16 else "")
    tasks = [t for t in cfg.tasks.split(",") if t]
    torch.manual_seed(cfg.seed)

    # 1. model and data
    model_dir = resolve_model_dir(cfg.model)
    model = load_checkpoint(model_dir, dtype=load_dtype, device=device)
    tok = Tokenizer(model_dir)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    train_set = [tokenize_example(tok, e, cfg.seq_len) for e in load_examples(cfg.data, "train")]
    val_set = [tokenize_example(tok, e, cfg.seq_len) for e in load_examples(cfg.data, "val")][:cfg.val_examples or None]
    wikitext = evaluation.load_wikitext2_test()
    stream = [i for ids, _ in train_set for i in ids]
    calibration = quant.calibration_windows(stream, cfg.calib_windows, cfg.calib_seq_len, cfg.seed)
    log(f"model {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) on {device}, "
        f"data {cfg.data}: {len(train_set)} train / {len(val_set)} held-out examples")
    phase("load")

    # 2. rotation (RoLoRA) — exact: the rotated model computes the same function
    record = None
    if cfg.rotate:
        record = rotate.rotate_model(model, seed=cfg.seed, online_down_proj=cfg.online_down_proj,
                                     rotate_ov=cfg.rotate_ov)
        log(f"rotated: {json.dumps(record)}")
    phase("rotate")

    # 3. before fine-tuning: full precision and quantized
    rows = {}
    if not cfg.resume or not (out / "results_before.json").is_file():
        rows["before / FP"] = evaluate_row(model, tok, cfg, val_set, pad_id, device, autocast, wikitext)
        if settings["w_bits"] < 16 or settings["a_bits"] < 16 or cfg.kv_bits < 16:
            q = quantized_copy(model, cfg, calibration)
            rows[f"before / {bits_label}"] = evaluate_row(q, tok, cfg, val_set, pad_id, device, autocast, wikitext)
            del q
        (out / "results_before.json").write_text(json.dumps(rows))
    else:  # a resumed run does not evaluate the base model again
        rows = json.loads((out / "results_before.json").read_text())
    phase("evaluate_before")

    # 4. LoRA after rotation: adapters on the rotated weights
    trained = model
    if cfg.qat:  # train the adapters on top of the fake-quantized base (STE through the quantizers)
        trained = quantized_copy(model, cfg, calibration)
    torch.manual_seed(cfg.seed)  # the adapter init depends on the seed only
    lora.add_lora(trained, targets=tuple(cfg.targets.split(",")), rank=cfg.rank, alpha=cfg.alpha,
                  dropout=cfg.dropout, variant=cfg.variant, res_type=cfg.res_type, pre_num=cfg.pre_num)
    lora.mark_only_lora_trainable(trained)
    for p in trained.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master weights for the adapters, even under bf16
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(trained)
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    log(f"{cfg.variant} on {cfg.targets}: {n_train / 1e6:.3f}M trainable parameters")
    history = finetune(cfg, trained, train_set, val_set, pad_id, device, autocast, record, log)
    phase("finetune")

    # 5. merge: W' = W + (alpha/r) B A, still in the rotated basis
    if cfg.qat:  # move the adapters onto the full-precision base before merging
        adapters = lora.lora_state_dict(trained)
        lora.add_lora(model, targets=tuple(cfg.targets.split(",")), rank=cfg.rank, alpha=cfg.alpha,
                      dropout=cfg.dropout, variant=cfg.variant, res_type=cfg.res_type, pre_num=cfg.pre_num)
        lora.load_lora_state_dict(model, adapters)
        del trained
    lora.save_adapters(model, out / "adapters", base_model_name_or_path=str(model_dir))
    model = lora.merge_lora(model, reslora_merge=cfg.reslora_merge)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.export:
        if record is not None:
            rotate.save_rotated(model, record, out / "merged")
        else:
            save_checkpoint(model, out / "merged")
    phase("merge")

    # 6. after fine-tuning: full precision, then quantized (post-training quantization)
    rows["after / FP"] = evaluate_row(model, tok, cfg, val_set, pad_id, device, autocast, wikitext)
    if f"before / {bits_label}" in rows:
        q = quantized_copy(model, cfg, calibration)
        rows[f"after / {bits_label}"] = evaluate_row(q, tok, cfg, val_set, pad_id, device, autocast, wikitext)
    phase("evaluate_after")

    table = format_results(rows, tasks)
    title = (f"{'RoLoRA (rotated)' if cfg.rotate else 'LoRA baseline (not rotated)'}: {model_dir.name}, "
             f"{cfg.variant} r={cfg.rank} on {cfg.targets}, {cfg.data}, {len(history['train_loss'])} steps; "
             f"{bits_label} {cfg.quant.upper()}; tasks on {cfg.eval_limit or 'all'} items each, "
             f"ppl on {cfg.ppl_windows or 'all'} x {cfg.ppl_seq_len} tokens")
    notes = []
    if "boolq" in tasks:
        notes.append("* BoolQ from a copy without passages: not comparable with published BoolQ numbers.")
    if "smollm2" in str(model_dir).lower():
        notes.append("SmolLM2's 'full precision' is its dequantized Q4_1 GGUF release.")
    notes = "\n".join(notes)
    results = {"title": title, "rows": rows, "table": table, "history": history, "rotation": record,
               "config": dataclasses.asdict(cfg), "timings_s": timings}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    print(f"\n{title}\n{table}\n{notes}\nwall time per phase (s): {json.dumps(timings)}\n"
          f"results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    cfg = parse_args()
    try:
        run(cfg)
    except NonFiniteLoss as e:
        sys.exit(f"train.py: {e}")
