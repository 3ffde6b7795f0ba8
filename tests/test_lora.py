"""Tests of lora.py: LoRA merge/unmerge, frozen base, PEFT round trips, ResLoRA forward and merges.

Run: python -m pytest tests/test_lora.py -q -s   (-s shows the ResLoRA merge errors it reports)
"""
import copy
import functools
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_model
from lora import (LoRALinear, ResLoRAChain, ResLoRALinear, add_lora, load_adapters, load_lora_state_dict,
                  lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora, save_adapters)
from model import load_checkpoint, save_checkpoint

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
    model = tiny_model()
    add_lora(model, ("q_proj",), rank=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    idx = tokens()
    model.train()
    assert max_diff(model(idx), model(idx)) > 0
    model.eval()
    assert torch.equal(model(idx), model(idx))


class FakeQuantLinear(nn.Module):
    """A quant.py-like base: a forward on a 3-bit grid, .weight/.in_features/.out_features."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.in_features, self.out_features = linear.weight, linear.in_features, linear.out_features

    def forward(self, x):
        return F.linear(x, torch.round(self.weight * 4) / 4)


def test_lora_on_a_quantized_base_trains_but_refuses_to_merge():
    torch.manual_seed(0)
    base = FakeQuantLinear(nn.Linear(16, 8, bias=False))
    layer = LoRALinear(base, rank=2, alpha=2)
    randomize_adapters([layer])
    x = torch.randn(3, 16)
    expected = base(x) + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert max_diff(layer(x), expected) < 1e-6
    with pytest.raises(TypeError, match="merge the adapters into the full-precision model first"):
        layer.merge()
    assert not layer.merged
    model = tiny_model()
    model.layers[1].self_attn.q_proj = FakeQuantLinear(model.layers[1].self_attn.q_proj)
    add_lora(model, ("q_proj",))
    with pytest.raises(TypeError, match="layers.1.self_attn.q_proj wraps a FakeQuantLinear"):
        merge_lora(model)
    assert not any(m.merged for m in lora_modules(model).values())  # nothing half-merged


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


def hf_llama(path):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


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
# ResLoRA


def reslora_chain(res_type, pre_num, n_layers=4, features=8, rank=2, alpha=4, seed=0):
    """A synthetic stack of one projection over n_layers layers, in float64."""
    torch.manual_seed(seed)
    chain = ResLoRAChain(res_type, pre_num)
    layers = [ResLoRALinear(nn.Linear(features, features, bias=False, dtype=torch.float64), rank, alpha, 0.0, chain)
              for _ in range(n_layers)]
    randomize_adapters(layers, seed=seed + 1, std=0.3)
    return layers


def reslora_reference(layers, xs, res_type, pre_num):
    """The equations of PAPERS.md written out with matrices."""
    W = [m.base_layer.weight for m in layers]
    A = [m.lora_A.weight for m in layers]
    B = [m.lora_B.weight for m in layers]
    s = layers[0].scaling
    outs = []
    for n, x in enumerate(xs):
        ks = range(min(pre_num, n) + 1)
        h = x @ W[n].T
        if res_type == "input":
            h = h + s * (x + (xs[n - 1] if n else x)) @ A[n].T @ B[n].T
        elif res_type == "block":
            h = h + s * sum(x @ A[n - k].T @ B[n - k].T for k in ks)
        else:
            h = h + s * sum(xs[n - k] @ A[n - k].T for k in ks) @ B[n].T
        outs.append(h)
    return outs


@pytest.mark.parametrize("res_type,pre_num", [("input", 1), ("block", 2), ("middle", 2)])
def test_reslora_forward_follows_the_equations(res_type, pre_num):
    layers = reslora_chain(res_type, pre_num)
    xs = [torch.randn(3, 5, 8, dtype=torch.float64) for _ in layers]
    outs = [m(x) for m, x in zip(layers, xs)]
    expected = reslora_reference(layers, xs, res_type, pre_num)
    assert all(max_diff(o, e) < 1e-12 for o, e in zip(outs, expected))


@pytest.mark.parametrize("res_type", ["input", "block", "middle"])
def test_gradient_flows_through_the_shortcuts(res_type):
    layers = reslora_chain(res_type, 1, n_layers=2)
    x0 = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    layers[0](x0)
    layers[1](torch.randn(2, 8, dtype=torch.float64)).sum().backward()  # loss from layer 1 only
    if res_type == "input":  # x_0 reaches layer 1 only through the shortcut
        assert x0.grad is not None and x0.grad.abs().sum() > 0
    else:  # layer 0's A reaches layer 1 only through the shortcut
        assert layers[0].lora_A.weight.grad.abs().sum() > 0


def test_reslora_layers_out_of_order_is_a_clear_error():
    layers = reslora_chain("middle", 1, n_layers=3)
    with pytest.raises(RuntimeError, match="layer 1 ran before layer 0"):
        layers[1](torch.randn(2, 8, dtype=torch.float64))


def test_input_norm_window_keeps_the_last_training_forwards():
    chain = ResLoRAChain("input", 1)
    layer = ResLoRALinear(nn.Linear(4, 4, bias=False), 2, 2, 0.0, chain, norm_window=3)
    layer.train()
    for norm in (1.0, 2.0, 3.0, 4.0):
        layer(torch.tensor([[norm, 0, 0, 0], [0, 0, norm, 0]]))
    assert layer.mean_input_norm() == pytest.approx(3.0)
    layer.eval()
    layer(torch.full((2, 4), 100.0))
    assert layer.mean_input_norm() == pytest.approx(3.0)


@pytest.mark.parametrize("res_type,pre_num", [("input", 1), ("middle", 2)])
def test_reslora_input_based_merge_is_exact_when_inputs_are_scaled_copies(res_type, pre_num):
    layers = reslora_chain(res_type, pre_num)
    c = 1.7  # x_n = c^n x: then x_{n-k} = c^-k x_n, what the merge assumes

    def scaled_copies(seed):
        x = torch.randn(2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        return [x * c ** n for n in range(len(layers))]

    for m in layers:
        m.train()
    for seed in range(5):  # training forwards record the input norms
        for m, x in zip(layers, scaled_copies(seed)):
            m(x)
    for m in layers:
        m.eval()
    xs = scaled_copies(100)
    unmerged = [m(x) for m, x in zip(layers, xs)]
    weight_based = [m.compute_merge_coefficients("weight") for m in layers]
    for m in layers:
        m.merge("input")
    assert layers[1].merge_coefficients == pytest.approx(1 / c if res_type == "input" else [1 / c])
    merged = [m(x) for m, x in zip(layers, xs)]
    # exact up to the float32 the input norms are recorded in (a wrong a or c_k costs > 1e-2 here)
    assert all(max_diff(u, v) < 1e-5 for u, v in zip(unmerged, merged))
    print(f"\n{res_type}: weight-based coefficients {weight_based} (input-based is exact here: 1/c = {1 / c:.4f})")
    for m in layers:
        m.unmerge()
    assert all(max_diff(m(x), u) < 1e-10 for m, x, u in zip(layers, xs, unmerged))


def test_reslora_block_merge_is_exact_on_a_model():
    model = tiny_model(num_hidden_layers=4)
    plain = copy.deepcopy(model)
    add_lora(model, ALL_TARGETS, rank=4, alpha=8, variant="reslora", res_type="block", pre_num=2)
    add_lora(plain, ALL_TARGETS, rank=4, alpha=8)
    randomize_adapters(model)
    plain.load_state_dict(model.state_dict(), strict=False)  # same A and B
    idx = tokens()
    unmerged = model(idx)
    assert max_diff(unmerged, plain(idx)) > 1e-2  # the shortcuts do something
    merge_lora(model)
    assert not lora_modules(model)
    assert max_diff(model(idx), unmerged) < 1e-5


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


@pytest.mark.parametrize("res_type", ["input", "middle"])
def test_reslora_approximate_merge_error_on_a_real_forward(res_type):
    """Not exact on a real model: report how far each estimate lands (the paper: ~1% task loss)."""
    model = tiny_model(num_hidden_layers=4)
    base_logits = model(tokens(seed=99))
    add_lora(model, ALL_TARGETS, rank=4, alpha=8, variant="reslora", res_type=res_type, pre_num=1)
    train_a_few_steps(model)
    idx = tokens(seed=99)
    unmerged = model(idx)
    adaptation = (unmerged - base_logits).norm().item()
    for how in ("input", "weight"):
        merged = merge_lora(copy.deepcopy(model), reslora_merge=how)(idx)
        error = (merged - unmerged).norm().item()
        assert math.isfinite(error) and max_diff(merged, base_logits) > 0
        print(f"\nResLoRA {res_type} shortcut, {how}-based merge: |merged - unmerged| / |unmerged - base| "
              f"= {error / adaptation:.3f} (logit rel. error {error / unmerged.norm().item():.2e})")


@pytest.mark.parametrize("res_type", ["input", "middle"])
def test_reslora_keeps_nothing_stale_between_forwards(res_type):
    model = tiny_model(num_hidden_layers=3)
    add_lora(model, ("q_proj", "down_proj"), rank=4, alpha=8, variant="reslora", res_type=res_type)
    randomize_adapters(model)
    fresh = copy.deepcopy(model)
    first, second = tokens(batch=2, length=9, seed=0), tokens(batch=3, length=5, seed=1)
    model(first)
    assert max_diff(model(second), fresh(second)) == 0
    model.train()  # and in training, two backwards with different shapes in a row
    for idx in (first, second):
        model(idx).sum().backward()
    copy.deepcopy(model)  # the handed-over tensors (with autograd history) are not copied
    assert max_diff(model.eval()(first), fresh(first)) == 0
    # generate: a prompt forward, then one-token forwards with the KV cache
    assert torch.equal(model.generate(second, 4), fresh.generate(second, 4))


@pytest.mark.parametrize("res_type", ["input", "middle"])
def test_reslora_gradients_are_the_same_with_gradient_checkpointing(res_type):
    from torch.utils.checkpoint import checkpoint
    model = tiny_model(num_hidden_layers=3)
    add_lora(model, ("q_proj", "up_proj"), rank=4, alpha=8, dropout=0.2, variant="reslora", res_type=res_type)
    randomize_adapters(model)
    mark_only_lora_trainable(model).train()
    checkpointed = copy.deepcopy(model)
    for block in checkpointed.layers:  # as train.py's --grad-checkpointing does it
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)

    def gradients(m):
        torch.manual_seed(0)  # the same dropout masks (checkpoint replays the RNG in recompute)
        idx = tokens()
        F.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    expected, got = gradients(model), gradients(checkpointed)
    assert all(torch.allclose(got[n], g, atol=1e-6, rtol=1e-5) and g.abs().sum() > 0 for n, g in expected.items())


def test_reslora_adapters_round_trip_through_our_peft_layout(tmp_path):
    model = tiny_model(num_hidden_layers=3)
    save_checkpoint(model, tmp_path / "base")
    add_lora(model, ("q_proj", "v_proj"), rank=4, alpha=8, variant="reslora", res_type="middle", pre_num=2)
    train_a_few_steps(model)  # B learnt, input norms recorded
    save_adapters(model, tmp_path / "adapters")
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RESLORA"  # PEFT refuses it instead of computing plain LoRA
    assert config["reslora"] == {"res_type": "middle", "pre_num": 2, "norm_window": 100}

    loaded = load_adapters(load_checkpoint(tmp_path / "base"), tmp_path / "adapters")
    idx = tokens()
    assert max_diff(loaded(idx), model(idx)) < 1e-6
    assert max_diff(merge_lora(loaded)(idx), merge_lora(copy.deepcopy(model))(idx)) < 1e-6
    # and the in-memory form train.py checkpoints with
    again = add_lora(load_checkpoint(tmp_path / "base"), ("q_proj", "v_proj"), rank=4, alpha=8,
                     variant="reslora", res_type="middle", pre_num=2)
    load_lora_state_dict(again, lora_state_dict(model))
    assert max_diff(again(idx), model(idx)) == 0


# -----------------------------------------------------------------------------
# LoRA after rotation (RoLoRA)


def test_lora_after_rotation_merges_into_the_rotated_weights():
    rotate = pytest.importorskip("rotate", reason="rotate.py not written yet")
    model = tiny_model()
    rotate.rotate_model(model, seed=0)  # in place: R1 folded in, online Hadamard before down_proj
    assert not isinstance(model.layers[0].mlp.down_input_transform, nn.Identity)
    add_lora(model, ALL_TARGETS, rank=4, alpha=8)  # down_proj's adapter sees the rotated input
    train_a_few_steps(model)
    idx = tokens(seed=7)
    unmerged = model(idx)
    merge_lora(model)
    assert not lora_modules(model)
    assert max_diff(model(idx), unmerged) < 1e-5
    quant = pytest.importorskip("quant", reason="quant.py not written yet")
    quantized = quant.quantize_model(copy.deepcopy(model), w_bits=4, a_bits=4, progress=False)(idx)
    assert torch.isfinite(quantized).all() and max_diff(quantized, unmerged) > 1e-3


@pytest.mark.slow
def test_reslora_approximate_merge_error_on_stories260K(stories_model):
    """The input/middle merge error on a trained model (the tiny random model above is a worst case)."""
    torch.manual_seed(0)
    idx = torch.randint(0, stories_model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    for res_type in ("input", "middle"):
        model = add_lora(copy.deepcopy(stories_model), ("q_proj", "v_proj"), rank=4, alpha=8,
                         variant="reslora", res_type=res_type)
        train_a_few_steps(model, steps=5, lr=1e-2)
        base = stories_model(idx)
        unmerged = model(idx)
        for how in ("input", "weight"):
            merged = merge_lora(copy.deepcopy(model), reslora_merge=how)(idx)
            error = (merged - unmerged).norm().item()
            assert math.isfinite(error)
            print(f"\nstories260K ResLoRA {res_type}, {how}-based merge: |merged - unmerged| / "
                  f"|unmerged - base| = {error / (unmerged - base).norm().item():.3f}")
