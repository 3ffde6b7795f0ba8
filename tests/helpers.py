"""Small shared pieces for the tests: the repository on sys.path, tiny random models, the
integer-grid check, and LoRA helpers."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import ModelConfig, Transformer  # noqa: E402
from quant import integer_range  # noqa: E402
from lora import lora_modules, mark_only_lora_trainable  # noqa: E402


LINEAR_PATHS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # the seven linears of a block


def module_at(block, path: str):
    """block.self_attn.q_proj for path "self_attn.q_proj"."""
    for part in path.split("."):
        block = getattr(block, part)
    return block


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


def assert_on_integer_grid(dequantized, scale, zero, bits, symmetric):
    """Every value is scale * (k - zero) of its row and group: k an integer in integer_range(bits),
    zero an integer (0 when symmetric).

    dequantized: (rows, width); scale, zero: (rows, n_groups), group g = columns
    [g * width / n_groups, (g + 1) * width / n_groups) (n_groups = 1: one grid per row)."""
    n_rows, width = dequantized.shape
    n_groups = scale.shape[1]
    assert scale.shape == zero.shape == (n_rows, n_groups) and width % n_groups == 0
    assert (scale > 0).all()
    qmin, qmax = integer_range(bits, symmetric)
    assert torch.equal(zero, zero.round()), "the zero point must be an integer"
    if symmetric:
        assert (zero == 0).all()
    else:  # stored as one more unsigned `bits`-bit integer
        assert zero.min() >= qmin and zero.max() <= qmax
    per_column = lambda t: t.repeat_interleave(width // n_groups, dim=1)  # (rows, n_groups) -> (rows, width)
    k = dequantized / per_column(scale) + per_column(zero)
    assert (k - k.round()).abs().max() < 1e-3, "a value lies between two grid points"
    assert k.round().min() >= qmin and k.round().max() <= qmax, "a value lies outside the integer range"


# -----------------------------------------------------------------------------
# LoRA: shared by tests/test_lora.py and tests/test_reslora.py

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tokens(batch=2, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


@torch.no_grad()
def randomize_adapters(model_or_layers, seed=1, std=0.1):
    """B = 0 after init makes every adapter a no-op; give B values so merges are really tested."""
    layers = model_or_layers if isinstance(model_or_layers, list) else lora_modules(model_or_layers).values()
    g = torch.Generator().manual_seed(seed)
    for m in layers:
        m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g, dtype=torch.float64) * std)


def max_diff(a, b):
    return (a - b).abs().max().item()



def hf_llama(path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_a_few_steps(model, steps=4, lr=1e-2):
    mark_only_lora_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        idx = tokens(seed=step)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def final_adapters(out):
    """The adapters of a train.py run's last checkpoint (OUT/latest)."""
    from safetensors.torch import load_file
    return load_file(Path(out) / (Path(out) / "latest").read_text().strip() / "adapters.safetensors")
