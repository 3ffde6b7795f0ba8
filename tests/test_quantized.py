"""extras/quantized_checkpoint.py: a quantized model saved as integer codes, scales and zero points
reloads bit for bit with no calibration (plain, rotated, RTN, GPTQ, groups, odd widths, tied
embeddings), every bad file is a clear error, and what cannot reload exactly is never written;
(slow) on stories260K and SmolLM2-135M, with the bits per weight on disk.

    python -m pytest tests/test_quantized.py -x -q      (add -m "not slow" to skip real checkpoints)
"""
import copy
import json
import re

import pytest
import torch

from extras.quantized_checkpoint import load_quantized, pack_codes, save_quantized, unpack_codes
from helpers import assert_on_integer_grid, tiny_model
from quant import QuantLinear, quantize_model

def quantized_tiny_model(method="rtn", rotate_first=False, model_options=None, **options):
    model = tiny_model(seed=4, **(model_options or {}))
    if rotate_first:
        import rotate
        rotate.rotate_model(model, seed=1)
    calibration = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(3))
    return quantize_model(model, w_method=method, calibration=calibration if method == "gptq" else None,
                          progress=False, **options)


def assert_reloads_bit_identical(model, directory):
    """load_weights (every --model) gives the model back: same modules, same logits bit for bit,
    every quantized weight on its integer grid, the same grids."""
    from eval import load_weights
    loaded = load_weights(directory)
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert str(loaded) == str(model) and loaded.quant_config == model.quant_config
    config, on_grid = model.quant_config, 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.weight_scale is not None:
            reloaded = loaded.get_submodule(name)
            assert torch.equal(reloaded.weight_scale, module.weight_scale), name
            assert torch.equal(reloaded.weight_zero, module.weight_zero), name
            assert_on_integer_grid(reloaded.weight, reloaded.weight_scale, reloaded.weight_zero,
                                   config.w_bits, config.w_symmetric)
            on_grid += 1
    assert on_grid == (7 * len(model.layers) if config.w_bits < 16 else 0)
    return loaded


def test_packing_round_trips_every_code_in_both_nibbles():
    assert torch.equal(pack_codes(torch.tensor([[1, 2, 15]])), torch.tensor([[0x21, 0x0F]], dtype=torch.uint8))
    codes = torch.stack([torch.arange(17) % 16, (torch.arange(17) + 1) % 16])  # every value at even and odd columns
    for width in (17, 16, 1):
        packed = pack_codes(codes[:, :width])
        assert packed.dtype == torch.uint8 and packed.shape == (2, (width + 1) // 2)
        assert torch.equal(unpack_codes(packed, width), codes[:, :width].to(torch.uint8))

SAVED_CASES = [dict(w_bits=4), dict(w_bits=4, w_symmetric=False, w_group_size=16, a_bits=4),
               dict(w_bits=3, w_group_size=32, kv_bits=4), dict(w_bits=3, w_symmetric=False, a_bits=8, kv_bits=3),
               dict(w_bits=8, w_symmetric=False, a_bits=4, kv_bits=4, quantize_lm_head_input=True),
               dict(w_bits=8, w_group_size=16), dict(w_bits=12, w_symmetric=False), dict(a_bits=4, kv_bits=4)]


@pytest.mark.parametrize("options", SAVED_CASES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_saved_quantized_model_reloads_bit_identical(tmp_path, method, options):
    model = quantized_tiny_model(method, **options)
    save_quantized(model, tmp_path)
    assert_reloads_bit_identical(model, tmp_path)
    assert not (tmp_path / "rotation.json").exists()
    from model import load_checkpoint
    with pytest.raises(ValueError, match=r"quantization\.json.*eval\.load_model"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("options", [dict(w_bits=4, a_bits=4, kv_bits=4),
                                     dict(w_bits=3, w_symmetric=False, w_group_size=16, a_bits=8, kv_bits=4)])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_rotated_quantized_model_reloads_with_its_online_hadamard(tmp_path, method, options):
    from rotate import OnlineHadamard
    model = quantized_tiny_model(method, rotate_first=True, **options)
    save_quantized(model, tmp_path)
    loaded = assert_reloads_bit_identical(model, tmp_path)
    assert all(isinstance(layer.mlp.down_input_transform, OnlineHadamard) for layer in loaded.layers)
    assert loaded.rotation == model.rotation


def test_odd_widths_and_tied_embeddings_save_and_reload(tmp_path):
    model = quantized_tiny_model(model_options=dict(hidden_size=63, intermediate_size=95, tie_word_embeddings=True),
                                 w_bits=4, w_symmetric=False, a_bits=4, quantize_lm_head_input=True)
    save_quantized(model, tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.qweight").get_shape() == [63, 48]  # 95 codes in 48 bytes
        assert "lm_head.weight" not in f.keys()
    loaded = assert_reloads_bit_identical(model, tmp_path)
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_saving_over_another_checkpoint_leaves_nothing_stale(tmp_path):
    from model import save_checkpoint
    save_checkpoint(tiny_model(), tmp_path, max_shard_bytes=50_000)  # sharded
    save_quantized(quantized_tiny_model(rotate_first=True, w_bits=4), tmp_path)
    model = quantized_tiny_model(w_bits=3, a_bits=4)
    save_quantized(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "quantization.json"]
    assert_reloads_bit_identical(model, tmp_path)


def rewrite_tensors(directory, change):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(directory / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def rewrite_json(file, change):
    record = json.loads(file.read_text())
    change(record)
    file.write_text(json.dumps(record))


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.scales", "model.layers.0.self_attn.k_proj.zeros",
                                 "model.layers.0.self_attn.q_proj.qweight", "model.norm.weight"])
def test_a_missing_key_is_a_clear_error(tmp_path, key):
    save_quantized(quantized_tiny_model(w_bits=4), tmp_path)
    rewrite_tensors(tmp_path, lambda tensors: tensors.pop(key))
    with pytest.raises(KeyError, match=rf"model\.safetensors: missing key '{re.escape(key)}'"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("bits,symmetric,suffix,bad", [(3, True, ".qweight", 0x80),  # high nibble 8 > 7
                                                        (6, False, ".qweight", 64), (12, True, ".qweight", 4096),
                                                        (4, False, ".zeros", 16), (4, True, ".zeros", 1)])
def test_a_code_or_zero_point_out_of_range_is_a_clear_error(tmp_path, bits, symmetric, suffix, bad):
    save_quantized(quantized_tiny_model(w_bits=bits, w_symmetric=symmetric), tmp_path)
    key = "model.layers.1.self_attn.v_proj" + suffix
    rewrite_tensors(tmp_path, lambda tensors: tensors[key].view(-1)[0].fill_(bad))
    with pytest.raises(ValueError, match=rf"model\.safetensors: key '{re.escape(key)}' holds .*out of range"):
        load_quantized(tmp_path)


def test_a_bad_scale_shape_or_dtype_is_a_clear_error(tmp_path):
    save_quantized(quantized_tiny_model(w_bits=4), tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.mlp.up_proj.scales": torch.ones(96, 2)}))
    with pytest.raises(ValueError, match=r"key 'model\.layers\.0\.mlp\.up_proj\.scales' has shape \(96, 2\), "
                                         r"config\.json implies \(96, 1\)"):
        load_quantized(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.mlp.up_proj.scales": torch.zeros(96, 1)}))
    with pytest.raises(ValueError, match=r"up_proj\.scales' holds a scale that is not positive"):
        load_quantized(tmp_path)
    rewrite_tensors(tmp_path, lambda t: t.update({"model.layers.0.mlp.up_proj.scales": torch.ones(96, 1).half()}))
    with pytest.raises(ValueError, match=r"up_proj\.scales' is torch\.float16"):
        load_quantized(tmp_path)


def test_shapes_that_do_not_match_config_json_are_a_clear_error(tmp_path):
    save_quantized(quantized_tiny_model(w_bits=4, w_group_size=16), tmp_path)
    rewrite_json(tmp_path / "config.json", lambda hf: hf.update(intermediate_size=80))
    with pytest.raises(ValueError, match=r"model\.safetensors: key 'model\.layers\.0\.mlp\.gate_proj\.qweight' "
                                         r"has shape \(96, 32\), config\.json implies \(80, 32\)"):
        load_quantized(tmp_path)


@pytest.mark.parametrize("change,error,match", [
    (lambda text: text[:-2], ValueError, "not valid JSON"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "packing"}), KeyError,
     r"missing field\(s\) \['packing'\]"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "config"}), KeyError,
     r"missing field\(s\) \['config'\]"),
    (lambda text: text.replace('"kv_bits": 16', '"kv_bit": 16'), KeyError, r"missing field\(s\) \['config\.kv_bits'\]"),
    (lambda text: text.replace('"bits": 4', '"bits": 5'), ValueError, "field 'bits' is 5; its config implies 4"),
    (lambda text: text.replace('"w_bits": 4', '"w_bits": 1'), ValueError, "invalid config"),
])
def test_a_bad_quantization_record_is_a_clear_error(tmp_path, change, error, match):
    save_quantized(quantized_tiny_model(w_bits=4), tmp_path)
    record = tmp_path / "quantization.json"
    record.write_text(change(record.read_text()))
    with pytest.raises(error, match=rf"quantization\.json: .*{match}"):
        load_quantized(tmp_path)


def test_a_rotated_checkpoint_without_its_rotation_record_is_a_clear_error(tmp_path):
    save_quantized(quantized_tiny_model(rotate_first=True, w_bits=4), tmp_path)
    (tmp_path / "rotation.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"rotation\.json: missing, but .*quantization\.json says"):
        load_quantized(tmp_path)


def lora_on_quantized(model):
    from lora import add_lora
    return add_lora(model, targets=("v_proj",), rank=2, alpha=2)


def weight_moved(model):
    with torch.no_grad():
        model.layers[1].mlp.gate_proj.weight[0, 0] += 1e-3
    return model


@pytest.mark.parametrize("make,match", [
    (lambda: lora_on_quantized(quantized_tiny_model(w_bits=4)), r"layers\.0\.self_attn\.v_proj has LoRA adapters"),
    (lambda: quantized_tiny_model(w_bits=4, quantize_weight_every_forward=True),
     r"layers\.0\.self_attn\.q_proj holds a float weight quantized at every forward"),
    (lambda: quantize_model(quantized_tiny_model(w_bits=4, kv_bits=4), a_bits=6),  # kv_bits forgotten by the 2nd call
     r"layers\.0\.self_attn\.key_transform is ActQuantizer.* has Identity\(\) there"),
    (lambda: weight_moved(quantized_tiny_model(w_bits=4)),
     r"layers\.1\.mlp\.gate_proj\.weight is not on its 4-bit grid"),
    (lambda: quantized_tiny_model(w_bits=4).half(), r"layers\.0\.self_attn\.q_proj\.weight is not on its 4-bit grid"),
    (lambda: tiny_model(), r"the model has no quant_config"),
])
def test_save_refuses_what_it_cannot_reload_exactly_and_writes_nothing(tmp_path, make, match):
    with pytest.raises(ValueError, match=rf"save_quantized: {match}"):
        save_quantized(make(), tmp_path / "saved")
    assert not (tmp_path / "saved").exists()

@pytest.mark.slow
def test_a_rotated_gptq_stories260k_saves_and_reloads_bit_identical(stories_model, tmp_path):
    import rotate
    model = copy.deepcopy(stories_model)
    rotate.rotate_model(model)
    calibration = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, w_bits=4, w_method="gptq", w_symmetric=False, a_bits=8, kv_bits=4,
                   calibration=calibration, progress=False)
    save_quantized(model, tmp_path)
    assert_reloads_bit_identical(model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name,clip_search", [("stories", True), ("smollm", False)])
def test_w4_checkpoint_bits_per_weight_on_disk(request, tmp_path, name, clip_search):
    """W4 per-channel RTN (a_bits 16) on disk against the fp16 checkpoint; the other tensors are
    fp16 in both. The sizes depend on shapes and dtypes only, not on the clip search (15 minutes
    on SmolLM2 here: off for it). Run with -s for the numbers. Measured (bits per quantized weight,
    model.safetensors W4 / fp16): stories260K 4.53, 206,952 / 524,912 bytes (39%); SmolLM2-135M
    4.06, 110,628,872 / 269,060,280 bytes (41%: the fp16 embedding is 57 MB of it)."""
    from safetensors import safe_open
    from model import save_checkpoint
    model = copy.deepcopy(request.getfixturevalue(f"{name}_model")).half()
    save_checkpoint(model, tmp_path / "fp16")
    quantize_model(model, w_bits=4, w_clip_search=clip_search)
    save_quantized(model, tmp_path / "w4")
    code_bytes, n_weights = 0, 0
    with safe_open(str(tmp_path / "w4" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith((".qweight", ".scales", ".zeros")):
                code_bytes += f.get_tensor(key).nbytes
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    n_weights = sum(m.weight.numel() for m in linears)
    bits_per_weight = 8 * code_bytes / n_weights
    fp16_bytes, w4_bytes = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("fp16", "w4"))
    print(f"\n{name}: {len(linears)} quantized linears, {n_weights:,} weights, {bits_per_weight:.3f} bits per "
          f"quantized weight (codes + fp32 scales + uint8 zeros); model.safetensors fp16 {fp16_bytes:,} bytes, "
          f"W4 {w4_bytes:,} bytes ({w4_bytes / fp16_bytes:.1%})")
    # 4 bits + a 32-bit scale and an 8-bit zero per row of in_features (odd widths: half a byte more)
    assert 4 < bits_per_weight <= 4 + max((40 + 4 * (m.in_features % 2)) / m.in_features for m in linears)
    assert w4_bytes < fp16_bytes
    reloaded = load_quantized(tmp_path / "w4", dtype=torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))
