"""Checkpoints: prepare.py turns the mirror's stories260K and SmolLM2 into Hugging Face folders;
resolve_model_dir finds one by name; load_model loads any checkpoint the project reads or writes."""
from pathlib import Path

import torch

MODELS_DIR = Path(__file__).resolve().parent


def resolve_model_dir(name_or_dir) -> Path:
    """A checkpoint directory (anything holding a config.json), or the name of a model that
    prepare.py knows, prepared into data/models/<name>/ on first use."""
    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return path
    from data.models.prepare import NAMES, prepare_model  # numpy, gguf: only when preparing
    if str(name_or_dir) not in NAMES:
        raise FileNotFoundError(f"--model {name_or_dir}: not a checkpoint directory (no config.json) "
                                f"and not a known model name {NAMES}")
    return prepare_model(str(name_or_dir))


def load_model(name_or_dir, dtype=torch.float32, device="cpu"):
    """(model, tokenizer, directory) for any checkpoint: the one loader behind every script's --model."""
    from data.tokenizer import Tokenizer
    path = resolve_model_dir(name_or_dir)
    return load_weights(path, dtype, device), Tokenizer(path), path


def load_weights(path, dtype=torch.float32, device="cpu"):
    """The model of a checkpoint directory with what its stages recorded beside it: a quantized one
    (quantization.json) is rebuilt from its integer codes with its quantizers and rotation, no
    calibration (data.models.quantized.load_quantized); a rotated one (rotation.json) gets its online Hadamards back
    (data.models.rotated.load_rotated); a plain one loads as it is (model.load_checkpoint)."""
    path = Path(path)
    if (path / "quantization.json").is_file():  # before rotation.json: a quantized model may be rotated too
        from data.models.quantized import load_quantized
        return load_quantized(path, dtype=dtype, device=device)
    if (path / "rotation.json").is_file():
        from data.models.rotated import load_rotated
        return load_rotated(path, dtype=dtype, device=device)[0]
    from model import load_checkpoint
    return load_checkpoint(path, dtype=dtype, device=device)
