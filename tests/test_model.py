"""model.py: parity with Hugging Face transformers, the KV cache, checkpoint I/O and its errors.

The real-checkpoint tests (stories260K text, SmolLM2 answer, tokenizers) are in test_prepare.py."""
import json
import shutil

import pytest
import torch

from helpers import tiny_config, tiny_model
from model import KVCache, ModelConfig, Transformer, load_checkpoint, rope_inverse_frequencies, save_checkpoint

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
PARITY_CONFIGS = {
    "gqa-untied": {},
    "tied": dict(tie_word_embeddings=True),
    "mha": dict(num_key_value_heads=4),
    "mqa-theta": dict(num_key_value_heads=1, rope_theta=500000.0),
    "llama3-scaling": dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "linear-scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_parity_with_transformers_both_directions(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = tiny_model(seed=1, **PARITY_CONFIGS[name])
    # positions beyond original_max_position_embeddings exercise the scaled frequencies
    idx = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(0))

    save_checkpoint(ours, tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(idx).logits
        assert torch.allclose(ours(idx), expected, atol=1e-5, rtol=0)

    hf.save_pretrained(tmp_path / "theirs")
    reloaded = load_checkpoint(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(reloaded(idx), expected, atol=1e-5, rtol=0)
    assert reloaded.config == ours.config


def test_rope_scaling_changes_frequencies():
    """Guards the parity test: a scaling that silently did nothing would still match HF if HF ignored it too."""
    plain = rope_inverse_frequencies(tiny_config(rope_theta=500000.0))
    llama3 = rope_inverse_frequencies(tiny_config(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING))
    linear = rope_inverse_frequencies(tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}))
    assert torch.equal(llama3[0], plain[0])            # highest frequency untouched
    assert llama3[-1] == pytest.approx(plain[-1] / 8)  # lowest frequency slowed by `factor`
    assert torch.allclose(linear, rope_inverse_frequencies(tiny_config()) / 4)


def test_config_reads_nested_rope_parameters():
    hf = tiny_config().to_hf()
    del hf["rope_theta"], hf["rope_scaling"]
    hf["rope_parameters"] = dict(LLAMA3_SCALING, rope_theta=123.0)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 123.0 and cfg.rope_scaling["rope_type"] == "llama3"


def test_source_note_survives_save_and_load(tmp_path):
    """A model dequantized from GGUF says so in config.json "_source"; a checkpoint saved from
    it (e.g. train.py's merged export) must keep saying so."""
    model = tiny_model()
    model.config.source_note = "dequantized from a Q4_1 GGUF"
    save_checkpoint(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_source"] == "dequantized from a Q4_1 GGUF"
    assert load_checkpoint(tmp_path).config.source_note == "dequantized from a Q4_1 GGUF"
    assert "_source" not in tiny_config().to_hf()  # no note, no key


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "mistral"}, "mistral"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_settings_are_errors(change, message):
    hf = tiny_config().to_hf() | change
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(hf)


def test_kv_cache_generation_equals_full_recomputation():
    model = tiny_model(seed=2)
    prompt = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    cached = model.generate(prompt, max_new_tokens=25)
    x = prompt
    with torch.no_grad():
        for _ in range(25):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, x)


def test_chunked_prefill_with_cache_equals_one_pass():
    """A chunk after a cached prefix needs the offset causal mask: its logits must match."""
    model = tiny_model(seed=3)
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(len(model.layers))
        first = model(idx[:, :12], cache)
        second = model(idx[:, 12:], cache)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


def test_sampling_with_top_k_stays_in_top_k():
    model = tiny_model(seed=4)
    prompt = torch.randint(0, 128, (1, 5))
    gen = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 1, temperature=1.0, top_k=3, generator=gen)
    with torch.no_grad():
        top3 = model(prompt)[0, -1].topk(3).indices
    assert out[0, -1] in top3


def test_sharded_save_and_load(tmp_path):
    model = tiny_model(seed=5)
    save_checkpoint(model, tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    reloaded = load_checkpoint(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    # saving again unsharded leaves no stale shard behind
    save_checkpoint(model, tmp_path)
    assert not list(tmp_path.glob("model-*.safetensors")) and (tmp_path / "model.safetensors").is_file()


def test_load_in_bfloat16_keeps_ties(tmp_path):
    save_checkpoint(tiny_model(tie_word_embeddings=True), tmp_path)
    model = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model(torch.zeros(1, 3, dtype=torch.long)).dtype == torch.float32


# --- every bad input names the file and the key -------------------------------------------


@pytest.fixture
def saved(tmp_path):
    save_checkpoint(tiny_model(), tmp_path)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="model.safetensors.*(unreadable|truncated)"):
        load_checkpoint(saved)


def _rewrite(saved, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(saved / "model.safetensors")
    edit(tensors)
    save_file(tensors, saved / "model.safetensors")


def test_missing_key(saved):
    _rewrite(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(saved)


def test_unexpected_key(saved):
    _rewrite(saved, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}))
    with pytest.raises(KeyError, match=r"unexpected key 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        load_checkpoint(saved)


def test_shape_mismatch(saved):
    hf = json.loads((saved / "config.json").read_text())
    hf["intermediate_size"] = 80
    (saved / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' has shape .*96.*implies .*80"):
        load_checkpoint(saved)


def test_missing_shard(saved, tmp_path_factory):
    sharded = tmp_path_factory.mktemp("sharded")
    save_checkpoint(tiny_model(), sharded, max_shard_bytes=20_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load_checkpoint(sharded)


def test_corrupt_config_json(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(saved)


def test_sequence_longer_than_max_positions():
    model = Transformer(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 9, dtype=torch.long))


# -----------------------------------------------------------------------------
# The configuration surface: one dataclass per command line, parsed by model.parse_config


def script_configs():
    """(prog, default config) of every command line built on parse_config."""
    import eval as ev
    import rotate
    import train
    from model import SampleConfig
    return [("train.py", train.TrainConfig()), ("eval.py", ev.EvalConfig(model="m")),
            ("rotate.py", rotate.RotateConfig()), ("model.py", SampleConfig())]


def options_with(meta_key):
    """(prog, config, field name, metadata) of every option that declares `meta_key`, nested included."""
    from dataclasses import fields, is_dataclass
    found = []
    def walk(prog, root, config):
        for f in fields(config):
            value = getattr(config, f.name)
            if is_dataclass(value):
                walk(prog, root, value)
            elif f.metadata.get(meta_key) not in (None, False):
                found.append((prog, root, f.name, f.metadata))
    for prog, config in script_configs():
        walk(prog, config, config)
    return found


def test_every_count_takes_0_and_none_as_all():
    from data.options import parse_config
    counts = options_with("zero_means_all")
    assert {(prog, name) for prog, _, name, _ in counts} >= {
        ("train.py", "max_steps"), ("train.py", "eval_limit"), ("train.py", "ppl_windows"),
        ("train.py", "val_examples"), ("eval.py", "limit"), ("eval.py", "ppl_windows")}
    for prog, config, name, _ in counts:
        flag = "--" + name.replace("_", "-")
        for text in ("0", "none", "None"):
            assert getattr(parse_config(config, [flag, text]), name) is None, (prog, flag, text)
        assert getattr(parse_config(config, [flag, "3"]), name) == 3, (prog, flag)


def test_every_bounded_option_refuses_a_value_below_its_bound_naming_the_flag(capsys):
    """One line naming the flag, for every option that declares a lower bound (nested ones too)."""
    from data.options import parse_config
    bounded = options_with("at_least")
    assert len(bounded) > 20
    for prog, config, name, meta in bounded:
        flag = "--" + name.replace("_", "-")
        below = meta["at_least"] - (1 if isinstance(meta["at_least"], int) else 0.5)
        if meta.get("zero_means_all") and below == 0:
            below = -1  # 0 means all there
        with pytest.raises(SystemExit):
            parse_config(config, [flag, str(below)], prog=prog)
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"{prog}: error: {flag}="), (prog, flag, err[-1])


def test_quantization_options_are_declared_once_and_shared_by_train_and_eval():
    import eval as ev
    import train
    from data.options import option_names, parse_config
    from quant import QuantConfig
    shared = option_names(QuantConfig())
    assert shared <= option_names(train.TrainConfig()) and shared <= option_names(ev.EvalConfig())
    argv = ["--w-bits", "4", "--a-bits", "6", "--kv-bits", "8", "--quant", "gptq", "--calib-windows", "7",
            "--calib-seq-len", "99", "--no-w-clip-search"]
    expected = QuantConfig(w_bits=4, a_bits=6, kv_bits=8, w_method="gptq", calib_windows=7, calib_seq_len=99,
                           w_clip_search=False)
    assert parse_config(train.TrainConfig(), argv).quant == expected
    assert parse_config(ev.EvalConfig(), argv + ["--model", "m"]).quant == expected


def test_replace_options_reaches_nested_options_and_refuses_unknown_ones():
    import train
    from data.options import replace_options
    base = train.TrainConfig()
    changed = replace_options(base, rank=4, w_bits=8, seq_len=64)
    assert (changed.lora.rank, changed.quant.w_bits, changed.seq_len) == (4, 8, 64)
    assert (base.lora.rank, base.quant.w_bits, base.seq_len) == (16, 4, 256)  # a copy: the original is unchanged
    assert replace_options(base, bits=16).quant.w_bits == 16 and base.quant.w_bits == 4
    with pytest.raises(TypeError, match="unknown option.*'rnak'"):
        replace_options(base, rnak=4)
