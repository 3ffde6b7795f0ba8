"""The README's GPU recipe, run as written except the model and the sizes: a LLaMA-2-7B-shaped and a
LLaMA-3-8B-shaped checkpoint cut to 2 layers (random weights, every width of the real model), in
bf16 on this CPU, through rotation, LoRA, a few steps, merge, GPTQ, perplexity and the seven tasks.
What it proves: the 4096 / 11008 / 14336 Hadamards, GPTQ on 4096 x 11008 and 4096 x 14336 weights,
GQA 32/8, a 128256-token vocabulary and llama3 rope scaling all run inside the pipeline.
Minutes of GPTQ per block on a 2-core CPU (its inverse-Hessian factor at 11008 or 14336, the MSE
clip search, the column loop; twice per run, before and after fine-tuning), and 3-7 GB of memory
per model: too long for the 10-minute suite, so these two run only with --run-recipe; the suite
checks every time that the README command parses and validates. No LLaMA-3 tokenizer is in the mirror: the 8B shape
reads the LLaMA-2 tokenizer (its ids are a subset of the 128256 rows).

Run: python -m pytest tests/test_recipe.py -q --run-recipe
"""
import dataclasses
import json
import math
import re
import shlex
import shutil

import pytest
import torch

from helpers import ROOT
import train
from data.mirror import mirror_root
from model import ModelConfig, Transformer, save_checkpoint

pytestmark = pytest.mark.slow

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, vocab_size=32000, max_position_embeddings=4096)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# the recipe's sizes that a CPU cannot afford, and what the test uses instead; every other flag as written
SIZES = {"--max-steps": "2", "--seq-len": "64", "--calib-windows": "2", "--calib-seq-len": "64",
         "--eval-limit": "2", "--ppl-windows": "1", "--ppl-seq-len": "64"}


def readme_recipe() -> list[str]:
    """The train.py command of README.md's "The paper's recipe on a GPU", as argv."""
    section = (ROOT / "README.md").read_text().split("## The paper's recipe on a GPU", 1)[1]
    command = re.search(r"^python train\.py .*?(?<!\\)$", section, re.M | re.S).group(0)
    return shlex.split(command.replace("\\\n", " "))[2:]


def random_checkpoint(path, shape: dict, layers: int = 2):
    """A bf16 checkpoint of `shape` with `layers` blocks and random weights (std 0.02, as LLaMA's
    init), with the LLaMA-2 tokenizer; built on the meta device so no fp32 copy is ever made."""
    config = ModelConfig(num_hidden_layers=layers, **shape)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    tokenizer = (mirror_root() or ROOT / "missing") / "tokenizers" / "llama2" / "tokenizer.model"
    if not tokenizer.is_file():
        pytest.skip(f"the LLaMA-2 tokenizer of the mirror is not at {tokenizer} (set ROLORA_MIRROR)")
    save_checkpoint(model, path)
    shutil.copy(tokenizer, path / "tokenizer.model")
    return path


def recipe_argv(model_dir, out) -> list[str]:
    argv = readme_recipe()
    assert argv[argv.index("--model") + 1] == "path/to/Llama-2-7b-hf"
    argv[argv.index("--model") + 1] = str(model_dir)
    for flag, value in SIZES.items():
        assert flag in argv, f"README's recipe no longer has {flag}"
        argv[argv.index(flag) + 1] = value
    return argv + ["--dtype", "bfloat16", "--out", str(out)]  # bf16 on a CPU, as --dtype auto on CUDA


def test_the_readme_gpu_recipe_parses_and_validates_as_written(tmp_path):
    """What the suite can afford every time: the command as written (the real sizes) is a valid
    configuration, and the test's changes are only the model and the sizes."""
    cfg = train.parse_args(readme_recipe())
    assert (cfg.rotate, cfg.quant.w_bits, cfg.quant.a_bits, cfg.quant.w_method) == (True, 4, 4, "gptq")
    assert (cfg.max_steps, cfg.eval_limit, cfg.ppl_windows) == (None, None, None)  # 0: epochs, all items, all text
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lr, cfg.batch_size, cfg.seq_len, cfg.epochs) == (16, 16, 1e-4, 8, 1024, 3)
    changed = train.parse_args(recipe_argv(tmp_path, tmp_path / "out"))
    differs = {f for f in ("model", "max_steps", "seq_len", "eval_limit", "ppl_windows", "ppl_seq_len", "dtype", "out")
               if getattr(changed, f) != getattr(cfg, f)}
    assert differs == {"model", "max_steps", "seq_len", "eval_limit", "ppl_windows", "ppl_seq_len", "dtype", "out"}
    assert (changed.quant.calib_windows, changed.quant.calib_seq_len) == (2, 64)
    assert dataclasses.replace(changed, **{f: getattr(cfg, f) for f in differs}, quant=cfg.quant) == cfg


@pytest.mark.recipe
@pytest.mark.parametrize("shape", [LLAMA2_7B, LLAMA3_8B], ids=["llama2-7b", "llama3-8b"])
def test_the_readme_gpu_recipe_runs_at_full_width_in_bf16(shape, tmp_path, monkeypatch):
    model_dir = random_checkpoint(tmp_path / "model", shape)
    argv = recipe_argv(model_dir, tmp_path / "out")
    assert {"--rotate", "--bits", "--quant", "--epochs", "--rank"} <= set(argv)  # the recipe, not a variant
    gptq_widths = []
    real_gptq = train.quant.gptq_quantize_weight

    def recording_gptq(weight, *args, **kwargs):
        gptq_widths.append(tuple(weight.shape))
        return real_gptq(weight, *args, **kwargs)

    monkeypatch.setattr(train.quant, "gptq_quantize_weight", recording_gptq)
    results = train.run(train.parse_args(argv))

    d, ff, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_key_value_heads"] * shape["head_dim"]
    record = results["rotation"]
    assert record["fallbacks"] == [] and record["hidden_size"] == d and record["intermediate_size"] == ff
    # GPTQ on every linear of both blocks, before and after fine-tuning: down_proj is (4096, 11008 or 14336)
    assert sorted(set(gptq_widths)) == sorted({(d, d), (kv, d), (ff, d), (d, ff)})
    assert len(gptq_widths) == 2 * 2 * 7
    assert results["config"]["dtype"] == "bfloat16" and len(results["history"]["train_loss"]) == 2
    rows = results["rows"]
    assert set(rows) == {"before / FP", "before / W4A4", "after / FP", "after / W4A4"}
    vocab = shape["vocab_size"]
    for label, row in rows.items():
        # random weights of std 0.02: logits of std about 0.02 sqrt(hidden) = 1.28 around a uniform
        # prediction, so a loss near log(vocab) + 1.28^2 / 2 (11.2 for 32000, measured 11.17)
        expected = math.log(vocab) + (0.02 * math.sqrt(d)) ** 2 / 2
        assert abs(math.log(row["ppl"]) - expected) < 0.5, (label, row["ppl"])
        assert math.isfinite(row["heldout_loss"]) and len(row["tasks"]) == 7, label
    # what the run wrote loads back: the merged model with its rotation, the quantized one with its codes
    saved = json.loads((tmp_path / "out" / "merged" / "config.json").read_text())
    assert saved["intermediate_size"] == ff and saved.get("rope_scaling") == shape.get("rope_scaling")
    assert (tmp_path / "out" / "quantized" / "quantization.json").is_file()
