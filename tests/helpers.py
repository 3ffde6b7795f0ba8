"""Small shared pieces for the tests: the repository on sys.path and tiny random models."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer  # noqa: E402


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA LLaMA small enough for float64 tests in milliseconds."""
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=128, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny_model(seed: int = 0, dtype=torch.float32, **overrides) -> Transformer:
    """Random weights, norm weights included (so that folding them is really tested)."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()
