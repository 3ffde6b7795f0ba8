"""Tests of lora.py's LoRA: merge/unmerge, frozen base, dropout, a quantized base, PEFT round trips,
LoRA after rotation (RoLoRA). ResLoRA is tests/test_reslora.py's.

Run: python -m pytest tests/test_lora.py -q
"""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import ALL_TARGETS, hf_llama, max_diff, randomize_adapters, tiny_model, tokens, train_a_few_steps
from lora import (LoRALinear, add_lora, load_adapters,
                  lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora, remove_lora,
                  save_adapters)
from model import load_checkpoint, save_checkpoint


# -----------------------------------------------------------------------------
# LoRA


def test_fresh_adapters_leave_the_model_unchanged_and_A_is_kaiming():
    model = tiny_model()
    idx = tokens()
    expected = model(idx)
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)
    assert len(lora_modules(model)) == 7 * 2
    assert torch.equal(model(idx), expected)  # B = 0
    for m in lora_modules(model).values():
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.abs().max() > 0.5 * bound
        assert m.scaling == 2.0 and m.weight is m.base_layer.weight


def test_merged_forward_equals_unmerged_forward():
    model = tiny_model()
    idx = tokens()
    base_logits = model(idx)
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)
    randomize_adapters(model)
    unmerged = model(idx)
    assert max_diff(unmerged, base_logits) > 1e-2  # the adapters do change the function
    for m in lora_modules(model).values():
        m.merge()
    assert max_diff(model(idx), unmerged) < 1e-5
    merge_lora(model)  # already-merged wrappers: only unwrapped
    assert not lora_modules(model) and isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    assert max_diff(model(idx), unmerged) < 1e-5


def test_merge_twice_changes_nothing_and_unmerge_restores_the_base():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8)
    randomize_adapters(model)
    idx = tokens()
    unmerged = model(idx)
    wrappers = lora_modules(model).values()
    for m in wrappers:
        m.merge()
    once = [m.weight.clone() for m in wrappers]
    for m in wrappers:
        m.merge()
    assert all(torch.equal(w, m.weight) for w, m in zip(once, wrappers))
    assert not torch.equal(once[0], base["layers.0.self_attn.q_proj.weight"])
    for m in wrappers:
        m.unmerge()
        m.unmerge()
    for name, m in lora_modules(model).items():
        assert torch.allclose(m.weight, base[name + ".weight"], atol=1e-6, rtol=0)
    assert max_diff(model(idx), unmerged) < 1e-5
    # remove_lora puts the base linears back, unmerging a merged wrapper first: the base model again
    wrappers = lora_modules(model)
    wrappers["layers.1.mlp.down_proj"].merge()
    remove_lora(model)
    assert not lora_modules(model) and isinstance(model.layers[1].mlp.down_proj, nn.Linear)
    assert all(torch.allclose(model.get_submodule(name).weight, base[name + ".weight"], atol=1e-6, rtol=0)
               for name in wrappers)


def test_only_adapters_get_gradients_and_the_base_is_bit_identical_after_training():
    model = tiny_model()
    add_lora(model, ALL_TARGETS, rank=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    # weight decay on every parameter: a frozen one would still move if it had a gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    for step in range(3):
        idx = tokens(seed=step)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            is_adapter = ".lora_A." in name or ".lora_B." in name
            assert p.requires_grad == is_adapter, name
            assert (p.grad is not None) == is_adapter, name
        optimizer.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())  # A and B both learnt


def test_dropout_acts_on_the_adapter_input_in_training_only():
    """h = W x + s B A dropout(x): dropout hits the adapter's input, in train mode only; never the base path."""
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False)
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.5).train()
    x = torch.randn(6, 32)
    with torch.no_grad():
        base_out = base(x)
    # Fresh adapters (B = 0) add exactly zero, so even in train mode the output is the base output
    # bit for bit; dropout applied to x before base_layer would change it.
    assert torch.equal(layer(x), base_out)

    randomize_adapters([layer])
    A, B, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)  # the same RNG state draws the same mask for an input of x's shape
    dropped = F.dropout(x, 0.5, training=True)
    assert (dropped == 0).any() and (dropped != 0).any()
    assert max_diff(out, base_out + s * dropped @ A.T @ B.T) < 1e-6
    no_dropout = base_out + s * x @ A.T @ B.T
    assert max_diff(out, no_dropout) > 1e-2  # the mask above really changed the update
    layer.eval()  # no dropout at all in eval mode
    assert max_diff(layer(x), no_dropout) < 1e-6

    # The same on a model, for every variant (the ResLoRA forwards apply dropout in their own code):
    # fresh adapters leave train-mode logits bit-identical.
    model = tiny_model()
    idx = tokens()
    expected = model(idx)
    for variant, res_type in (("lora", "block"), ("reslora", "input"), ("reslora", "block"), ("reslora", "middle")):
        adapted = add_lora(copy.deepcopy(model), ALL_TARGETS, rank=4, alpha=8, dropout=0.5, variant=variant,
                           res_type=res_type).train()
        assert torch.equal(adapted(idx), expected), (variant, res_type)
    add_lora(model, ("q_proj",), rank=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    model.train()
    assert max_diff(model(idx), model(idx)) > 0
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_lora_on_a_quantized_base_trains_but_refuses_to_merge():
    """QAT with LoRA (train.py --qat): quant.quantize_model first, then adapters on the QuantLinears."""
    quant = pytest.importorskip("quant")
    model = quant.quantize_model(tiny_model(), w_bits=4, a_bits=4, w_clip_search=False, progress=False)
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)
    randomize_adapters(model)  # B != 0: A gets a gradient at the first step too
    wrapper = model.layers[0].mlp.down_proj
    assert isinstance(wrapper.base_layer, quant.QuantLinear)
    # h = QuantLinear(x) + s B A x: the adapter path sees the unquantized x
    x = torch.randn(3, 5, wrapper.in_features, generator=torch.Generator().manual_seed(0))
    A, B, s = wrapper.lora_A.weight, wrapper.lora_B.weight, wrapper.scaling
    assert max_diff(wrapper(x), wrapper.base_layer(x) + s * x @ A.T @ B.T) < 1e-5
    x_quantized = wrapper.base_layer.input_quantizer(x)  # what the base path multiplies
    assert max_diff(wrapper(x), wrapper.base_layer(x) + s * x_quantized @ A.T @ B.T) > 1e-3  # tells them apart

    # a training step moves A and B only; the stored quantized weights stay bit-identical
    mark_only_lora_trainable(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    assert "layers.0.mlp.down_proj.base_layer.weight" in frozen
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    # weight decay on every parameter: a frozen one would still move if it had a gradient
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    idx = tokens()
    F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name
    optimizer.step()
    model.eval()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in adapters.items())

    # merging refuses (s B A would move the weight off its 4-bit grid), naming the module
    before = model(idx)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"LoRALinear layers\.0\.mlp\.down_proj: cannot merge into a "
                                        r"QuantLinear base.*merge the adapters into the full-precision model first"):
        wrapper.merge()
    with pytest.raises(TypeError, match=r"merge_lora: layers\.0\.self_attn\.q_proj wraps a QuantLinear"):
        merge_lora(model)
    assert len(lora_modules(model)) == 14 and not any(m.merged for m in lora_modules(model).values())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(idx), before)

    # one quantized linear among full-precision ones: merge_lora checks them all before changing
    # any (layers.0's q_proj is merged first in a loop that stops at the first error)
    model = tiny_model()
    model.layers[1].self_attn.q_proj = quant.QuantLinear.from_linear(model.layers[1].self_attn.q_proj, 4, 4,
                                                                     w_clip_search=False)
    add_lora(model, ("q_proj",))
    randomize_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"merge_lora: layers\.1\.self_attn\.q_proj wraps a QuantLinear"):
        merge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())  # nothing half-merged
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_unknown_target_and_bad_options_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"'qproj' matches no linear.*valid names: down_proj, gate_proj, "
                                         r"k_proj, o_proj, q_proj, up_proj, v_proj"):
        add_lora(model, ("q_proj", "qproj"))
    assert not lora_modules(model)  # nothing half-done
    with pytest.raises(ValueError, match="variant"):
        add_lora(model, variant="dora")
    with pytest.raises(ValueError, match="res_type"):
        add_lora(model, variant="reslora", res_type="skip")
    with pytest.raises(ValueError, match="exactly 1 for the input"):
        add_lora(model, variant="reslora", res_type="input", pre_num=2)
    add_lora(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model)
    with pytest.raises(ValueError, match="reslora_merge"):
        merge_lora(model, reslora_merge="norm")


def test_save_checkpoint_of_a_merged_wrapped_model_reloads_as_plain(tmp_path):
    model = tiny_model()
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)
    randomize_adapters(model)
    idx = tokens()
    expected = model(idx)
    for m in lora_modules(model).values():
        m.merge()  # still wrapped: save_checkpoint reads wrapper.weight
    save_checkpoint(model, tmp_path)
    assert max_diff(load_checkpoint(tmp_path)(idx), expected) < 1e-5


# -----------------------------------------------------------------------------
# PEFT layout




def test_our_adapters_load_in_peft_with_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_model()
    add_lora(model, ("q_proj", "v_proj", "down_proj"), rank=4, alpha=8)
    randomize_adapters(model)
    save_checkpoint(model, tmp_path / "base")  # unmerged wrappers expose the base weight
    save_adapters(model, tmp_path / "adapters", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]

    base = hf_llama(tmp_path / "base")
    idx = tokens()
    with torch.no_grad():
        base_logits = base(idx).logits
        peft_logits = peft.PeftModel.from_pretrained(base, tmp_path / "adapters").eval()(idx).logits
    ours = model(idx)
    assert max_diff(peft_logits, base_logits) > 1e-2  # PEFT really applied them
    assert max_diff(peft_logits, ours) < 1e-5


@pytest.mark.parametrize("targets", [list(ALL_TARGETS), r".*\.(q_proj|v_proj)"], ids=["list", "regex"])
def test_peft_saved_adapters_load_in_ours_with_the_same_logits(tmp_path, targets):
    peft = pytest.importorskip("peft")
    save_checkpoint(tiny_model(), tmp_path / "base")
    torch.manual_seed(0)
    # init_lora_weights=False: B random too, so the adapters change the logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                             task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf_llama(tmp_path / "base"), config).eval()
    peft_model.save_pretrained(tmp_path / "adapters")
    idx = tokens()
    with torch.no_grad():
        expected = peft_model(idx).logits

    ours = load_adapters(load_checkpoint(tmp_path / "base"), tmp_path / "adapters")
    assert len(lora_modules(ours)) == (14 if isinstance(targets, list) else 4)
    assert max_diff(ours(idx), expected) < 1e-5
    merge_lora(ours)
    assert max_diff(ours(idx), expected) < 1e-5


def test_load_adapters_names_the_file_and_key_on_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_model()
    add_lora(model, rank=4, alpha=8)
    save_adapters(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors = load_file(weights)
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{m}.weight"
                                     for i in range(2) for p in ("q_proj", "v_proj") for m in "AB")
    del tensors[missing_key]
    save_file(tensors, weights)
    fresh = tiny_model()
    with pytest.raises(KeyError, match=rf"adapter_model.safetensors: missing key '{missing_key}'"):
        load_adapters(fresh, tmp_path)
    assert not lora_modules(fresh)  # the failed load left the model as it was

    save_adapters(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: key 'base_model.model.model.layers.0"
                                         r".self_attn.q_proj.lora_A.weight' has shape \(4, 64\)"):
        load_adapters(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="adapter_config.json: use_dora=True is not supported"):
        load_adapters(tiny_model(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapters(tiny_model(), tmp_path / "nowhere")


# -----------------------------------------------------------------------------
# LoRA after rotation (RoLoRA)


def test_lora_after_rotation_merges_into_the_rotated_weights():
    rotate = pytest.importorskip("rotate", reason="rotate.py not written yet")
    quant = pytest.importorskip("quant", reason="quant.py not written yet")
    model = tiny_model()
    rotate.rotate_model(model, seed=0)  # in place: R1 folded in, online Hadamard before down_proj
    assert isinstance(model.layers[0].mlp.down_input_transform, rotate.OnlineHadamard)
    rotated = copy.deepcopy(model)  # W_rot: LoRA freezes these weights, so they are the merge's base
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)
    train_a_few_steps(model)
    idx = tokens(seed=7)
    # down_proj's adapter trains on the rotated input: the Hadamard transform of the MLP's hidden h
    seen = record_inputs(model, idx, {"h": model.layers[0].mlp.down_input_transform,
                                      "down_proj": model.layers[0].mlp.down_proj})
    assert torch.equal(seen["down_proj"], rotate.walsh_hadamard_transform(seen["h"]))
    unmerged = model(idx)
    adapters = {name: (m.scaling, m.lora_B.weight.detach(), m.lora_A.weight.detach())
                for name, m in lora_modules(model).items()}
    merge_lora(model)
    assert not lora_modules(model)
    assert max_diff(model(idx), unmerged) < 1e-5

    # The merged linears hold W_rot + s B A, computed here by hand from the adapters (float32, as merge does)
    by_hand = copy.deepcopy(rotated)
    with torch.no_grad():
        for name, (s, B, A) in adapters.items():
            by_hand.get_submodule(name).weight.copy_(rotated.get_submodule(name).weight + s * (B @ A))
    assert all(torch.equal(model.get_submodule(name).weight, by_hand.get_submodule(name).weight)
               for name in adapters)
    # so W4A4 quantization of the merged model is that of W_rot + s B A: the same logits, bit for bit,
    # and not those of the rotated model without the adapters (they survive the 4-bit grid)
    def quantized(m):
        return quant.quantize_model(copy.deepcopy(m), w_bits=4, a_bits=4, w_clip_search=False, progress=False)
    merged_q, by_hand_q = quantized(model), quantized(by_hand)
    assert torch.equal(merged_q(idx), by_hand_q(idx))
    assert max_diff(merged_q(idx), quantized(rotated)(idx)) > 1e-2
    # and the down_proj input quantizer sees the rotated input (the online Hadamard sits before it)
    seen = record_inputs(merged_q, idx, {"h": merged_q.layers[0].mlp.down_input_transform,
                                         "quantizer": merged_q.layers[0].mlp.down_proj.input_quantizer})
    assert torch.equal(seen["quantizer"], rotate.walsh_hadamard_transform(seen["h"]))
    assert max_diff(seen["quantizer"], seen["h"]) > 1e-2


def record_inputs(model, idx, modules):
    """{label: the first input of module} in one forward of model on idx."""
    seen = {}

    def recorder(label):
        def hook(module, args):  # returns None: the input goes on unchanged
            seen.setdefault(label, args[0])
        return hook

    handles = [module.register_forward_pre_hook(recorder(label)) for label, module in modules.items()]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return seen
