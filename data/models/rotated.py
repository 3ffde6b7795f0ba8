"""Saved rotated models: the rotated weights in the Hugging Face layout plus rotation.json.

rotate.rotate_model changes the weights (norms folded, R1, R4's inverse in down_proj, R2) and
adds online Hadamards: with R4 one before every down_proj (such weights are a plain LLaMA only
together with it), with R3 one on every query and key head. So a rotated directory carries its
record (rotation.json, listed in model.STAGE_RECORDS so that model.load_checkpoint refuses it)
and load_rotated puts the online modules back; export_plain_llama writes the other form, R4
folded back and R3 dropped, that any LLaMA loader (transformers, lm-evaluation-harness's hf
model) runs unchanged.

A learned rotation (rotate.learn_rotation) is folded into the weights like a Hadamard, and its
matrices are kept beside the record too (rotation.safetensors, float64, named and checksummed by
the record): read back bit for bit as model.learned_rotation, they rebuild the same rotated
model from the original one (train.py --resume does).

    save_rotated(model, model.rotation, "out/rotated")
    model, record = load_rotated("out/rotated")      # the same logits
    export_plain_llama(model, "out/hf")               # for LlamaForCausalLM.from_pretrained
"""
import json
from pathlib import Path

import torch
import torch.nn as nn

from model import load_checkpoint, read_config, save_checkpoint, write_atomically
from rotate import (LEARNED_ROTATION_FILE, LearnedRotation, OnlineHadamard, add_online_hadamards,
                    walsh_hadamard_transform)

ROTATION_RECORD = "rotation.json"  # listed in model.STAGE_RECORDS


def save_rotated(model, record: dict, path):
    """save_checkpoint (HF layout, norms folded, weights rotated) + rotation.json (the record), and
    for a learned rotation rotation.safetensors (model.learned_rotation). With R4 the weights alone are not a plain LLaMA: they need the online Hadamard, so the record
    is written first (atomically): a directory never holds the weights without it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_rotation_record(path, record, getattr(model, "learned_rotation", None))
    save_checkpoint(model, path)


def write_rotation_record(path: Path, record: dict, learned: LearnedRotation | None):
    """rotation.json, and for a learned rotation its matrices (LEARNED_ROTATION_FILE) first."""
    if "learned" in record:
        if learned is None or learned.digest() != record["learned"]["sha256"]:
            digest = record["learned"]["sha256"][:12]
            raise ValueError(f"save: the rotation record names learned matrices (sha256 {digest}...) that the "
                             "model's learned_rotation does not hold")
        save_learned_rotation(learned, path)
    else:
        (path / LEARNED_ROTATION_FILE).unlink(missing_ok=True)  # an earlier save's, in this directory
    write_atomically(path / ROTATION_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))


def save_learned_rotation(learned: LearnedRotation, path):
    """DIR/rotation.safetensors: r1 (and r2) in float64, how they were learned in its metadata."""
    from safetensors.torch import save_file
    tensors = {"r1": learned.r1.double().contiguous()}
    if learned.r2 is not None:
        tensors["r2"] = learned.r2.double().contiguous()
    metadata = {"info": json.dumps(learned.info)}
    write_atomically(Path(path) / LEARNED_ROTATION_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_learned_rotation(path, record: dict | None = None) -> LearnedRotation:
    """DIR/rotation.safetensors back, bit for bit; given the record, checked against its sha256."""
    from safetensors import safe_open
    file = Path(path) / LEARNED_ROTATION_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing, but the rotation record says the rotation was learned")
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["info"])
    learned = LearnedRotation(tensors["r1"], tensors.get("r2"), info)
    if record is not None and learned.digest() != record["learned"]["sha256"]:
        raise ValueError(f"{file}: these matrices are not the ones {ROTATION_RECORD} names (sha256 "
                         f"{learned.digest()[:12]}... != {record['learned']['sha256'][:12]}...)")
    return learned


def export_plain_llama(model, path):
    """Write a rotated (merged) model as a checkpoint any LLaMA loader runs unchanged, such as
    transformers' LlamaForCausalLM: R4's online Hadamard is folded back into down_proj
    ((z M^T)(W M^T)^T = z W^T, so down_proj gets W = (W M^T) M), exact up to one rounding; R3's
    online Hadamards on queries and keys cancel in every q.k and are left out; R1, R2 and the
    fused norms are plain LLaMA weights already. The model itself is not changed."""
    leftovers = sorted({type(m).__name__ for m in model.modules()} & {"LoRALinear", "ResLoRALinear", "QuantLinear",
                                                                       "ActQuantizer"})
    if leftovers:
        raise ValueError(f"export_plain_llama: the model still has {leftovers}; merge the adapters (merge_lora) "
                         "and export the full-precision model (quantizers have no plain LLaMA form)")
    folded = {}
    for i, layer in enumerate(model.layers):
        transform = layer.mlp.down_input_transform
        if isinstance(transform, OnlineHadamard):
            W = layer.mlp.down_proj.weight.detach()
            folded[f"layers.{i}.mlp.down_proj.weight"] = walsh_hadamard_transform(W.double(), transpose=True).to(W.dtype)
        elif not isinstance(transform, nn.Identity):
            raise ValueError(f"export_plain_llama: layers.{i}.mlp.down_input_transform is a "
                             f"{type(transform).__name__}, which has no plain LLaMA form")
        for name in ("query_transform", "key_transform"):  # R3 leaves every q.k as it is: drop it
            if not isinstance(getattr(layer.self_attn, name), (nn.Identity, OnlineHadamard)):
                raise ValueError(f"export_plain_llama: layers.{i}.self_attn.{name} is a "
                                 f"{type(getattr(layer.self_attn, name)).__name__}, which has no plain LLaMA form")
    save_checkpoint(model, path, replace=folded)


def read_rotation_record(path, model_config=None) -> dict | None:
    """The rotation record of a checkpoint directory (None when it has none), checked for its keys
    and, given the directory's ModelConfig, for the sizes it was rotated at."""
    record_file = Path(path) / ROTATION_RECORD
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{record_file}: not valid JSON ({e})") from None
    missing = [k for k in ("seed", "r4", "r2", "hidden_size", "intermediate_size", "head_dim") if k not in record]
    if missing:
        raise KeyError(f"{record_file}: missing key(s) {missing}")
    record.setdefault("r3", False)  # records written before R3 existed
    for key in ("hidden_size", "intermediate_size", "head_dim") if model_config is not None else ():
        if record[key] != getattr(model_config, key):
            raise ValueError(f"{record_file}: {key}={record[key]} but config.json has {getattr(model_config, key)}")
    return record


def load_rotated(path, dtype=torch.float32, device="cpu"):
    """Load a checkpoint written by save_rotated and re-insert the online Hadamard modules the
    record names (R4, R3). The weights are already rotated: they are not rotated again."""
    path = Path(path)
    record = read_rotation_record(path, read_config(path))
    if record is None:
        raise FileNotFoundError(f"{path / ROTATION_RECORD}: no rotation record; was this saved by save_rotated?")
    model = load_checkpoint(path, dtype=dtype, device=device, stage_records_ok=True)
    add_online_hadamards(model, record["r4"], record["r3"])
    model.rotation = record
    if "learned" in record:
        model.learned_rotation = load_learned_rotation(path, record)
    return model, record
