"""Checkpoints: prepare.py turns the mirror's stories260K and SmolLM2 into Hugging Face folders."""
from pathlib import Path

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
