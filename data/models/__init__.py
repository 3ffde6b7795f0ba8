"""Checkpoints: prepare.py turns the mirror's stories260K and SmolLM2 into Hugging Face folders;
resolve_model_dir finds one by name. (Loading one is model.load_checkpoint for a plain checkpoint,
eval.load_model for any checkpoint the project writes.)"""
from pathlib import Path

from data.models.prepare import NAMES, prepare_model
from data.options import MissingFile


def resolve_model_dir(name_or_dir) -> Path:
    """A checkpoint directory (anything holding a config.json), or the name of a model that
    prepare.py knows, prepared into data/models/<name>/ on first use."""
    path = Path(name_or_dir)
    if (path / "config.json").is_file():
        return path
    if str(name_or_dir) not in NAMES:
        raise MissingFile(f"--model {name_or_dir}: not a checkpoint directory (no config.json) "
                                f"and not a known model name {NAMES}")
    return prepare_model(str(name_or_dir))
