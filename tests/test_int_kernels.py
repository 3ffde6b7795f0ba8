"""extras/int_kernels.py: a quantized linear on int8 products (torch._int_mm) equals the fake QuantLinear
within float32 rounding, at W8A8, W4A8 and W4A4, symmetric and asymmetric, per channel and in groups, on
random and (slow) SmolLM2-135M weights, rotated and not; its activation codes are ActQuantizer's, bit for
bit; every --model entry point runs it; what it cannot run is one line naming --int-kernels.

The bounds asserted, for each output y[t, o] of a linear with K inputs in n_groups groups, with
M[t, o] = sum_c |x^[t, c]| |W[o, c]| (x^ the fake-quantized input, W the weight on its grid), u = 2^-24:
    |y_int - y_fake|  <= (K + n_groups + 5) u M     (F.linear rounds K times; the integer sum is exact)
    |y_int - y_exact| <= (n_groups + 5) u M         (y_exact: x^ @ W^T in float64: the rescale's roundings)
`-s` prints the largest measured |y_int - y_fake|: 8.88 u M (3.8e-5 in absolute value), rotated W4A4,
layers.29.mlp.up_proj of SmolLM2-135M (where the bound is K + n_groups + 5 = 582 to 1637 u M).

A whole model has no such bound: a code that a rounding moves across a grid boundary moves everything
after it, so two float computations of one quantized model (the integer and the fake path, or the fake
path and itself with its embedding scaled by 1 + 2^-23) differ by as much as the model is sensitive.
The whole-model test holds stories260K to the issue's yardstick (perplexity within 0.1%, the same
choices but ties); bench/bench_int.py --ppl measures SmolLM2-135M's sensitivity, which no float
computation of it could be held to.

    ROLORA_MIRROR=../shared/assets python -m pytest tests/test_int_kernels.py -x -q -s  (-m "not slow": fast)
"""
import copy

import pytest
import torch
import torch.nn as nn

import eval as ev
import quant
import rotate
import train
from data.options import BadValue
from data.tokenizer import Tokenizer, copy_tokenizer_files
from extras import sample as sampling
from extras.int_kernels import MAX_GROUP_WIDTH, IntegerLinear, int8_matmul, use_integer_kernels
from extras.quantized_checkpoint import save_quantized
from helpers import tiny_model, tokens
from quant import ActQuantizer, QuantConfig, QuantLinear

U = 2.0 ** -24
GRIDS = ((True, True), (False, False), (True, False), (False, True))  # (weight, activation) symmetric
SETTINGS = [dict(w_bits=w, a_bits=a, w_symmetric=ws, a_symmetric=as_, w_group_size=g)
            for w, a in ((8, 8), (4, 8), (4, 4)) for ws, as_ in GRIDS for g in (None, 16)]
SETTING_IDS = [f"W{s['w_bits']}A{s['a_bits']}-w={'sym' if s['w_symmetric'] else 'asym'},"
               f"a={'sym' if s['a_symmetric'] else 'asym'}-groups={s['w_group_size']}" for s in SETTINGS]


def quant_linear(linear: nn.Linear, setting: dict) -> tuple[QuantLinear, QuantConfig]:
    config = QuantConfig(**setting, w_clip_search=False)  # the grid's choice does not matter to the arithmetic
    return QuantLinear.from_linear(linear, config.w_bits, config.a_bits, w_group_size=config.w_group_size,
                                   w_symmetric=config.w_symmetric, w_clip_search=False,
                                   a_symmetric=config.a_symmetric), config


@torch.no_grad()
def assert_within_bounds(fake: QuantLinear, integer: IntegerLinear, x: torch.Tensor,
                         y_fake: torch.Tensor | None = None) -> tuple[float, float]:
    """Both bounds of the module docstring on input x (..., K) (y_fake: fake(x) if known); returns the
    largest |y_int - y_fake| in units of u M, and in absolute value."""
    x_hat = fake.input_quantizer(x).double().reshape(-1, fake.in_features)  # (T, K)
    weight = fake.weight.double()                                          # (out, K)
    magnitude, exact = x_hat.abs() @ weight.abs().T, x_hat @ weight.T      # (T, out) each
    y_int, y_fake = (y.double().reshape(exact.shape) for y in (integer(x), fake(x) if y_fake is None else y_fake))
    n_groups = integer.weight_codes.shape[0]
    diff = (y_int - y_fake).abs()
    assert (diff <= (fake.in_features + n_groups + 5) * U * magnitude).all()
    assert ((y_int - exact).abs() <= (n_groups + 5) * U * magnitude).all()
    return (diff / (U * magnitude).clamp(min=1e-300)).max().item(), diff.max().item()


def inputs_with_outliers(shape, seed=0) -> torch.Tensor:
    """Activations as a LLaMA's linears see them: a few channels 20x the others, an offset, one row of zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) + 0.3
    x[..., :3] *= 20
    x.view(-1, shape[-1])[0] = 0
    return x


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_an_integer_linear_equals_the_fake_quant_linear_within_float32_rounding(setting):
    torch.manual_seed(0)
    fake, config = quant_linear(nn.Linear(64, 48, bias=False), setting)
    integer = IntegerLinear.from_quant_linear(fake, config, "linear")
    assert torch.equal(integer.weight, fake.weight)  # the codes carry the very weight
    assert_within_bounds(fake, integer, inputs_with_outliers((3, 7, 64)))


@pytest.mark.parametrize("bits,symmetric,clip", [(8, True, 1.0), (8, False, 1.0), (4, True, 0.9), (4, False, 1.0)])
def test_the_activation_codes_are_act_quantizers_grid_exactly(bits, symmetric, clip):
    quantizer = ActQuantizer(bits, symmetric, clip)
    integer = IntegerLinear(torch.zeros(8, 64), torch.ones(8, 1), torch.zeros(8, 1), 8, True, quantizer)
    rows = inputs_with_outliers((40, 64))
    codes, scale, zero = integer.input_codes(rows)
    assert codes.dtype == torch.int8 and zero.dtype == torch.int32
    assert torch.equal(scale * (codes.float() - zero.float()), quantizer(rows))  # x^ = s_x (q_x - r_x)
    if bits == 8 and not symmetric:  # k = 255 occurs, which only the offset of 128 fits into int8
        assert codes.max() == 127


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (5, 576, 576), (20, 16, 8), (17, 9, 13)])
def test_the_cuda_padding_changes_no_product(m, k, n):
    """int8_matmul pads to _int_mm's CUDA shapes (m > 16, k and n multiples of 8) with zero codes: checked
    here on the CPU, where _int_mm takes every shape."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (k, n), generator=g, dtype=torch.int8)
    exact = a.long() @ b.long()
    assert torch.equal(int8_matmul(a, b).long(), exact) and torch.equal(int8_matmul(a, b, pad=True).long(), exact)


def quantized_tiny(rotated: bool, dtype=torch.float32, **setting) -> nn.Module:
    model = tiny_model(seed=4, dtype=dtype)
    if rotated:  # R1, R4 and R3 (online Hadamards on queries and keys), under a 4-bit KV cache
        rotate.rotate_model(model, seed=1, rotate_qk=True)
        setting = dict(setting, kv_bits=4)
    return quant.quantize_model(model, progress=False, **setting)


@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
@pytest.mark.parametrize("setting", SETTINGS[::3], ids=SETTING_IDS[::3])
def test_every_linear_of_a_whole_model_is_within_the_bound(rotated, setting):
    """In a forward of the fake model, each linear's own input through its integer twin."""
    fake = quantized_tiny(rotated, **setting)
    checked = []

    def compare(module, args, output):
        integer = IntegerLinear.from_quant_linear(module, fake.quant_config, "")
        checked.append(assert_within_bounds(module, integer, args[0], output))
    for module in fake.modules():
        if isinstance(module, QuantLinear) and module.weight_scale is not None:
            module.register_forward_hook(compare)
    with torch.no_grad():
        fake(tokens(3, 20))
    assert len(checked) == 7 * len(fake.layers)


def test_a_whole_model_swaps_its_seven_linears_a_block_and_keeps_lm_head_float():
    """The whole model, rotated, with KV-cache and lm_head input quantizers: the same logits. In float64,
    so that F.linear's own rounding (2^-53) decides no code; the fake weights' float32 rounding still
    differs from the exact integers by 2^-24, and at W4A4 that sometimes moves a code across a grid
    boundary on this model (the test above is the one that holds at every setting)."""
    fake = quantized_tiny(True, torch.float64, w_bits=8, a_bits=8, w_symmetric=False, a_symmetric=False,
                          w_group_size=16, quantize_lm_head_input=True)
    integer = use_integer_kernels(copy.deepcopy(fake))
    assert sum(isinstance(m, IntegerLinear) for m in integer.modules()) == 7 * len(integer.layers)
    assert isinstance(integer.lm_head, QuantLinear) and integer.lm_head.weight_scale is None
    assert isinstance(integer.layers[0].mlp.down_input_transform, rotate.OnlineHadamard)
    idx = tokens(3, 20)
    with torch.no_grad():
        assert (integer(idx) - fake(idx)).abs().max() < 1e-6
    assert torch.equal(integer.generate(idx[:1, :5], 6), fake.generate(idx[:1, :5], 6))  # the KV cache path


def rows_evaluated_with(monkeypatch, tmp_path, **overrides) -> list:
    """The models train.py's evaluate_before and evaluate_after evaluate, on a tiny run."""
    from test_train import quick_config, tiny_run
    evaluated = []
    monkeypatch.setattr(train, "evaluate_row", lambda r, model: evaluated.append(model) or {})
    monkeypatch.setattr(train, "copy_tokenizer_files", lambda source, target: None)
    cfg = quick_config(tmp_path, bits=4, w_clip_search=False, export=True, **overrides)
    r = tiny_run(cfg, tmp_path)
    model = tiny_model()
    train.evaluate_before(r, model)
    train.evaluate_after(r, model, {})
    return evaluated


def test_train_py_evaluates_its_quantized_rows_on_integers_and_saves_the_fake_model(monkeypatch, tmp_path):
    fp_before, w4a4_before, fp_after, w4a4_after = rows_evaluated_with(monkeypatch, tmp_path, int_kernels=True)
    count = lambda model: sum(isinstance(m, IntegerLinear) for m in model.modules())  # noqa: E731
    assert count(fp_before) == count(fp_after) == 0
    assert count(w4a4_before) == count(w4a4_after) == 7 * len(w4a4_after.layers)
    saved = ev.load_weights(tmp_path / "run" / "quantized")  # saved before the swap: the fake model's codes
    assert not any(isinstance(m, IntegerLinear) for m in saved.modules())
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(use_integer_kernels(saved)(idx), w4a4_after(idx))
    (tmp_path / "off").mkdir()
    without = rows_evaluated_with(monkeypatch, tmp_path / "off")
    assert not any(isinstance(m, IntegerLinear) for model in without for m in model.modules())


@pytest.fixture
def saved_stories(stories_dir, tmp_path):
    """stories260K rotated, W4A4 (asymmetric activations), saved as OUT/quantized is: (fake model, dir)."""
    model, _, _ = ev.load_model(stories_dir)
    rotate.rotate_model(model, seed=0)
    quant.quantize_model(model, w_bits=4, a_bits=4, a_symmetric=False, w_clip_search=False, progress=False)
    save_quantized(model, tmp_path / "quantized")
    copy_tokenizer_files(stories_dir, tmp_path / "quantized")
    return model, tmp_path / "quantized"


def test_every_model_entry_point_runs_on_integers(saved_stories, stories_dir):
    """eval.py on a saved quantized model and on one quantized in the run, the harness adapter and
    extras/sample.py: the same integer model, the same outputs bit for bit (the same codes)."""
    fake, saved = saved_stories
    reference = use_integer_kernels(copy.deepcopy(fake))
    idx = tokens(2, 12)
    with torch.no_grad():
        expected = reference(idx)
        loaded, _, _ = ev.load_and_quantize(ev.parse_args(["--model", str(saved), "--int-kernels"]))
        assert torch.equal(loaded(idx), expected)
        in_run, _, _ = ev.load_and_quantize(ev.parse_args([
            "--model", str(stories_dir), "--rotate", "--bits", "4", "--no-a-symmetric", "--no-w-clip-search",
            "--int-kernels"]))
        assert torch.equal(in_run(idx), expected)
    text = sampling.main(["--model", str(saved), "--int-kernels", "--max-new-tokens", "8"])
    args = sampling.SampleAnyConfig(model=str(saved), max_new_tokens=8)
    assert text == sampling.sample(reference, ev.load_model(saved)[1], args)
    pytest.importorskip("lm_eval")
    from extras.harness import HarnessModel
    harness = HarnessModel(pretrained=str(saved), int_kernels=True)
    assert sum(isinstance(m, IntegerLinear) for m in harness.model.modules()) == 7 * len(fake.layers)


INT_KERNELS_BAD_FLAGS = [
    (["--w-bits", "16", "--a-bits", "16"], "needs --w-bits and --a-bits of at most 8 (int8 codes on both sides"),
    (["--w-bits", "4", "--a-bits", "16"], "got W4A16"),
    (["--bits", "12"], "got W12A12"),
    (["--bits", "4", "--quantize-weight-every-forward"], "quantized at every forward"),
]


@pytest.mark.parametrize("flags,message", INT_KERNELS_BAD_FLAGS, ids=[" ".join(f) for f, _ in INT_KERNELS_BAD_FLAGS])
@pytest.mark.parametrize("script", [ev, train])
def test_flags_the_integer_path_cannot_run_are_one_line_naming_it(script, flags, message, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--model", "somewhere", "--int-kernels"] + flags)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--int-kernels" in err and message in err


def bf16_copy(model):
    return model.to(torch.bfloat16)


def too_wide_group():
    fake = QuantLinear.from_linear(nn.Linear(MAX_GROUP_WIDTH + 1, 1, bias=False), 4, 4, w_clip_search=False)
    model = nn.Module()
    model.linear, model.quant_config = fake, QuantConfig(w_bits=4, a_bits=4)
    return model


@pytest.mark.parametrize("make,message", [
    (lambda: tiny_model(), "no quantized weights"),
    (lambda: quantized_tiny(False, a_bits=4), "no quantized weights"),  # W16A4: nothing to run on integers
    (lambda: quantized_tiny(False, w_bits=4), "4-bit weight but 16-bit inputs"),
    (lambda: quantized_tiny(False, w_bits=4, a_bits=12), "4-bit weight but 12-bit inputs"),
    (lambda: quantized_tiny(False, w_bits=12, a_bits=8), "got W12A8"),
    (lambda: quantized_tiny(False, w_bits=4, a_bits=4, quantize_weight_every_forward=True), "at every forward"),
    (lambda: bf16_copy(quantized_tiny(False, w_bits=4, a_bits=4)), "not on its 4-bit grid"),
    (too_wide_group, "more than int32 accumulation holds"),
])
def test_what_the_integer_path_cannot_run_is_a_bad_value_naming_the_flag(make, message):
    with pytest.raises(BadValue, match=rf"^--int-kernels: .*{message}"):
        use_integer_kernels(make())


def test_eval_py_says_it_in_one_line_for_a_saved_model(stories_dir, tmp_path):
    from test_errors import one_line_exit
    model, _, _ = ev.load_model(stories_dir)
    save_quantized(quant.quantize_model(model, w_bits=4, w_clip_search=False, progress=False), tmp_path)
    copy_tokenizer_files(stories_dir, tmp_path)
    message = one_line_exit(["--model", str(tmp_path), "--tasks", "none", "--ppl", "--int-kernels"])
    assert "--int-kernels: layers.0.self_attn.q_proj has a 4-bit weight but 16-bit inputs" in message


# -----------------------------------------------------------------------------
# SmolLM2-135M (slow)


@pytest.fixture(scope="module")
def smollm_inputs(smollm_model, smollm_dir):
    """{rotated: (model, {linear path: its input on 32 WikiText-2 tokens})} for three linears."""
    from data.wikitext2.prepare import load_test_text
    ids = torch.tensor(ev.encode_stream(Tokenizer(smollm_dir), load_test_text()[:2000])[:32])[None]
    paths = ("layers.0.self_attn.q_proj", "layers.14.mlp.down_proj", "layers.29.mlp.up_proj")
    found = {}
    for rotated in (False, True):
        model = copy.deepcopy(smollm_model)
        if rotated:  # down_proj then reads its input through the online Hadamard (R4)
            rotate.rotate_model(model, seed=0)
        captured = {}
        hooks = [model.get_submodule(path).register_forward_hook(
            lambda module, args, out, path=path: captured.__setitem__(path, args[0])) for path in paths]
        with torch.no_grad():
            model(ids)
        for hook in hooks:
            hook.remove()
        found[rotated] = (model, captured)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("rotated", [False, True], ids=["plain", "rotated"])
def test_on_smollm2_weights_and_activations_every_setting_is_within_the_bound(smollm_inputs, rotated):
    model, captured = smollm_inputs[rotated]
    worst = (0.0, 0.0, "")
    for setting, name in zip(SETTINGS, SETTING_IDS):
        for path, x in captured.items():
            fake, config = quant_linear(model.get_submodule(path), setting)
            in_units, absolute = assert_within_bounds(fake, IntegerLinear.from_quant_linear(fake, config, path), x)
            worst = max(worst, (in_units, absolute, f"{name} {path}"))
    print(f"\nSmolLM2-135M {'rotated' if rotated else 'plain'}: largest |y_int - y_fake| = {worst[0]:.2f} u M "
          f"({worst[1]:.2e}) at {worst[2]}")


def choices_and_loglikelihoods(model, tokenizer, records):
    requests, items = [], []
    for record in records:
        built = ev.build_requests(record)
        items.append(list(range(len(requests), len(requests) + len(built))))
        requests += built
    flat = ev.loglikelihoods(model, tokenizer, requests, items, progress=False)
    scores = [[flat[i] for i in item] for item in items]
    return [ev.argmax_first(s) for s in scores], scores


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_a_whole_real_model_gives_the_fake_models_perplexity_and_arc_easy_choices(stories_dir, bits):
    """stories260K rotated at W4A4 and W8A8 RTN: WikiText-2 perplexity on 4 windows of 64 tokens within
    0.1% of the fake model's, and the same choice on 20 ARC-Easy items but where the fake model's best two
    are closer than the largest log-likelihood difference between the two paths (a tie). Measured: the
    same perplexity to 2e-7 and the same 20 choices at both settings. SmolLM2-135M at W4A4 moves its
    perplexity by up to 9% when its embedding is scaled by 1 + 2^-23 alone, so no float computation of it
    can be held to 0.1%: bench/bench_int.py --ppl measures that."""
    from data.wikitext2.prepare import load_test_text
    model, tokenizer, _ = ev.load_model(stories_dir)
    rotate.rotate_model(model, seed=0)
    fake = quant.quantize_model(model, w_bits=bits, a_bits=bits, progress=False)
    integer = use_integer_kernels(copy.deepcopy(fake))
    text, records = load_test_text(), ev.load_task("arc_easy")[:20]
    ppl = {name: ev.perplexity(m, tokenizer, text, 64, 4, progress=False) for name, m in (("fake", fake), ("int", integer))}
    (fake_choices, fake_scores), (int_choices, int_scores) = (choices_and_loglikelihoods(m, tokenizer, records)
                                                              for m in (fake, integer))
    moved = max(abs(a - b) for item_a, item_b in zip(fake_scores, int_scores) for a, b in zip(item_a, item_b))
    ties = {i for i, scores in enumerate(fake_scores) if sorted(scores)[-1] - sorted(scores)[-2] <= moved}
    differ = {i for i, (a, b) in enumerate(zip(fake_choices, int_choices)) if a != b}
    print(f"\nstories260K W{bits}A{bits}: perplexity fake {ppl['fake']:.4f}, integer {ppl['int']:.4f}; choices "
          f"differing {sorted(differ)} of 20, ties {sorted(ties)} (log-likelihoods moved by up to {moved:.2e})")
    assert abs(ppl["int"] / ppl["fake"] - 1) <= 1e-3
    assert differ <= ties and len(ties) < len(records) // 2  # the comparison says something
