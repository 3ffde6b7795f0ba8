"""A training run's folder: its checkpoints (adapters, AdamW state, scheduler, RNG), --resume, and its lock.

Beyond the paper, whose runs start and finish in one go; a student can skip this file.

train.py writes OUT/ckpt-STEP/ every --save-every steps: adapters.safetensors, optimizer.safetensors
(AdamW's moments), rng.safetensors (the CPU generator), state.json (step, scheduler, history,
rotation record, configuration) and, with --rotation learned, rotation.safetensors (the learned
R1 and R2, so that --resume rebuilds the same rotated base model without learning it again).
Tensors go to safetensors and everything else to JSON: nothing is pickled, so a checkpoint from
elsewhere cannot run code. The folder is completed under a temporary name, renamed, and only
then does OUT/latest (an atomic rename) point to it: an interruption at any moment leaves a
complete checkpoint that --resume continues from.
"""
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import lora
from data.options import BadInput
from model import write_atomically
from rotate import load_learned_rotation, save_learned_rotation


class FolderInUse(BadInput, RuntimeError):
    """Another run holds the lock on this --out."""


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Flatten AdamW's state into tensors (safetensors) and everything else (JSON)."""
    state = optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in state["state"].items() for k, v in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def save_training_checkpoint(out: Path, step: int, model, optimizer, scheduler, extra: dict, learned=None):
    """Write OUT/ckpt-STEP completely, then point OUT/latest at it (an atomic rename), then
    delete the older checkpoints: an interruption at any moment leaves a complete one.
    learned: the run's rotate.LearnedRotation, saved beside (rotation.safetensors)."""
    from safetensors.torch import save_file
    final = out / f"ckpt-{step:06d}"
    tmp = out / f".ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in lora.lora_state_dict(model).items()}, tmp / "adapters.safetensors")
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    if learned is not None:
        save_learned_rotation(learned, tmp)
    meta = dict(extra, step=step, optimizer=opt_rest,
                scheduler={"last_epoch": scheduler.last_epoch, "_step_count": scheduler._step_count})
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_atomically(out / "latest", lambda tmp: Path(tmp).write_text(final.name))
    for old in out.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_training_checkpoint(out: Path, model, optimizer, scheduler) -> dict:
    """Load OUT/latest's adapters, AdamW state, scheduler and RNG state into the run's objects;
    returns its state.json (step, history, ...)."""
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


def load_checkpoint_rotation(out: Path):
    """The learned rotation of OUT/latest, checked against its state.json's record (None if the run's
    rotation was not learned)."""
    ckpt = out / (out / "latest").read_text().strip()
    record = json.loads((ckpt / "state.json").read_text()).get("rotation") or {}
    return load_learned_rotation(ckpt, record) if "learned" in record else None


@contextmanager
def locked_output_folder(out: Path):
    """Hold an exclusive lock on OUT/.lock while the run writes OUT: a second train.py on the same
    --out (a --resume started too early, say) stops at once, naming the running one, instead of
    both writing the same checkpoints. The operating system drops the lock if the holder dies."""
    import fcntl
    handle = (out / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(f"--out {out}: a run is already writing this folder ({holder}); wait for it to "
                           "finish, or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # closing the file releases the lock
