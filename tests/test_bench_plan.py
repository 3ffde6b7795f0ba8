"""bench/bench_plan.py: what it measures on reduced-depth models is what its formulas say, and its
extrapolation in depth is exact, so the GPU plan it prints for full-size models rests on both."""
import sys

import pytest

from helpers import ROOT, tiny_config

sys.path.insert(0, str(ROOT / "bench"))
import bench_plan  # noqa: E402

SEQ, RANK = 32, 4


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["MHA", "GQA"])
def test_measured_per_layer_matches_the_formula_and_extrapolates_exactly(one_thread, checkpointing, kv_heads):
    cfg = tiny_config(num_key_value_heads=kv_heads)
    depth1, depth2, depth3 = (bench_plan.measure(cfg, depth, 1, SEQ, RANK, checkpointing) for depth in (1, 2, 3))
    per_layer, extrapolated = bench_plan.extrapolate(depth1, depth2, layers=3)
    formula = bench_plan.formula_per_layer(cfg, 1, SEQ, RANK, checkpointing)
    for key in ("saved", "flops", "param_bytes", "adapter_params"):
        assert per_layer[key] == pytest.approx(formula[key], rel=1e-3), key
    # depth 3 measured = depth 3 extrapolated from depths 1 and 2, every figure, exactly
    assert extrapolated == {k: v for k, v in depth3.items() if k != "attention"}
    assert depth1["logits"] == 4 * SEQ * cfg.vocab_size  # log_softmax's fp32 output, the one logits-sized saved tensor
    assert "attention" in depth1["attention"]  # the attention kernel was seen and its FLOPs counted


def test_the_plan_prints_its_tables(one_thread, monkeypatch, capsys):
    monkeypatch.setitem(bench_plan.SHAPES, "tiny", tiny_config())
    bench_plan.main(["--models", "tiny", "--seq", "32", "--rank", str(RANK), "--threads", "1"])
    out = capsys.readouterr().out
    assert "| tiny | saved for backward, MB |" in out and "| tiny | yes |" in out and "| tiny | no |" in out
    assert "prediction (not a GPU measurement)" in out
