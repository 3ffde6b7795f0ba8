"""Fixtures for the real checkpoints of the offline mirror (ROLORA_MIRROR).

The prepared directories live in data/models/ (git-ignored) and are prepared on first use.
Without a mirror and without prepared directories the real-model tests are skipped."""
import os
from pathlib import Path

import pytest
import torch

from helpers import ROOT

# Two threads at most; under pytest-xdist (-n N) the N workers share them, and so do the
# processes a test starts (they read OMP_NUM_THREADS).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())

DEFAULT_MIRROR = ROOT.parent / "shared" / "assets"
if "ROLORA_MIRROR" not in os.environ and DEFAULT_MIRROR.is_dir():
    os.environ["ROLORA_MIRROR"] = str(DEFAULT_MIRROR)


def pytest_addoption(parser):
    parser.addoption("--run-recipe", action="store_true",
                     help="also run the README GPU recipe at 7B / 8B width (tests/test_recipe.py): "
                          "tens of minutes on a 2-core CPU, too long for the 10-minute suite")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-recipe"):
        return
    skip = pytest.mark.skip(reason="GPTQ at 7B width takes minutes per block on this CPU: run with --run-recipe")
    for item in items:
        if "recipe" in item.keywords:
            item.add_marker(skip)


def _prepared(name: str) -> Path:
    target = ROOT / "data" / "models" / name
    ready = (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    if not ready and "ROLORA_MIRROR" not in os.environ:
        pytest.skip(f"{name}: no ROLORA_MIRROR and no prepared {target}")
    from data.models.prepare import prepare_model
    return prepare_model(name)  # returns at once when ready


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return _prepared("stories260K")


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    return _prepared("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def stories_model(stories_dir):
    """fp32 stories260K. Shared by tests: deepcopy before changing it."""
    from model import load_checkpoint
    return load_checkpoint(stories_dir)


@pytest.fixture(scope="session")
def smollm_model(smollm_dir):
    """fp32 SmolLM2-135M-Instruct. Shared by tests: deepcopy before changing it."""
    from model import load_checkpoint
    return load_checkpoint(smollm_dir)


@pytest.fixture
def one_thread():
    """Tiny models run best on one thread: a second one only adds synchronisation (ruinous on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
