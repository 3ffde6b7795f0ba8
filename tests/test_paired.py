"""bench/paired.py's statistics and table, and bench/reproduce.py's judgement of "the same training", on
constructed rows and cells whose answers are known (fast; the real grid is tests/test_reproduce.py's)."""
import math
import sys

import pytest
import torch

from helpers import ROOT, tiny_model

sys.path.insert(0, str(ROOT / "bench"))
import lora  # noqa: E402
import paired  # noqa: E402
import reproduce  # noqa: E402


def test_paired_difference_and_its_standard_error():
    a, b = [1, 0, 1, 1], [0, 0, 1, 0]  # d = 1, 0, 0, 1: mean 1/2, sample variance 1/3
    mean, se = paired.paired(a, b)
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 3 / 4))
    assert paired.paired(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="the same n"):
        paired.paired(a, b[:3])
    assert paired.paired([2.0], [1.0])[0] == 1.0 and math.isnan(paired.paired([2.0], [1.0])[1])


def test_the_held_out_difference_is_token_weighted():
    a = [[2.0, 1], [9.0, 3]]  # examples of 1 and 3 tokens: mean loss 11 / 4
    b = [[1.0, 1], [6.0, 3]]  # 7 / 4
    mean, se = paired.paired_ratio(a, b)
    assert mean == pytest.approx((11 - 7) / 4)
    assert se == pytest.approx(0.0)  # d = 1, 3 over 1, 3 tokens: every token moved by 1, no spread
    with pytest.raises(ValueError, match="same examples"):
        paired.paired_ratio(a, [[1.0, 2], [6.0, 2]])


def row(correct: dict[str, str], window_nlls: list[float], example_losses: list[float]) -> dict:
    tasks = {t: {"correct": c, "acc": c.count("1") / len(c), "metric": "acc"} for t, c in correct.items()}
    return {"tasks": tasks, "average_tasks": list(correct), "ppl_windows": [[nll, 10] for nll in window_nlls],
            "heldout_examples": [[loss, 5] for loss in example_losses]}


def test_a_paired_row_difference_is_sharper_than_the_unpaired_one():
    """Model A gets right every item B gets right, and 10 more of 100: +10 points, and the paired
    error sqrt(0.1 * 0.9 / 99) is far below the unpaired sqrt(se_a^2 + se_b^2)."""
    b_items = "1" * 40 + "0" * 60
    a_items = "1" * 50 + "0" * 50
    a = row({"x": a_items, "y": a_items}, [20.0, 30.0, 40.0], [5.0, 6.0, 7.0])
    b = row({"x": b_items, "y": b_items}, [21.0, 31.0, 41.5], [5.5, 6.5, 7.5])
    d = paired.paired_row_difference(a, b)
    assert d["tasks"]["x"][0] == pytest.approx(10.0) and d["average"][0] == pytest.approx(10.0)
    paired_se = 100 * math.sqrt(0.1 * 0.9 / 99 / 1)
    assert d["tasks"]["x"][1] == pytest.approx(paired_se, rel=1e-6)
    assert d["average"][1] == pytest.approx(paired_se / math.sqrt(2), rel=1e-6)  # two independent tasks
    unpaired = 100 * math.hypot(math.sqrt(0.5 * 0.5 / 99), math.sqrt(0.4 * 0.6 / 99))
    assert d["tasks"]["x"][1] < unpaired / 2
    # windows of 10 tokens: per-token NLL differences -0.1, -0.1, -0.15
    assert d["log_ppl"][0] == pytest.approx(-0.35 / 3) and d["ppl_ratio"] == pytest.approx(math.exp(-0.35 / 3))
    assert d["heldout_loss"] == (pytest.approx(-0.1), pytest.approx(0.0))  # every example 0.5 lower over 5 tokens
    assert paired.has_records(a) and not paired.has_records({"tasks": {}, "ppl": 3.0})


def test_the_mean_over_seeds_is_the_mean_of_each_seeds_difference():
    a = [row({"x": "1100"}, [20.0, 30.0], [5.0, 6.0]), row({"x": "1110"}, [22.0, 31.0], [4.0, 7.0])]
    b = [row({"x": "1000"}, [21.0, 30.5], [5.5, 6.0]), row({"x": "0110"}, [22.0, 33.0], [4.0, 6.0])]
    per_seed = [paired.paired_row_difference(x, y) for x, y in zip(a, b)]
    mean = paired.paired_row_difference(paired.mean_row(a), paired.mean_row(b))
    for key in ("average", "log_ppl", "heldout_loss"):
        assert mean[key][0] == pytest.approx(sum(d[key][0] for d in per_seed) / 2)
    shorter = row({"x": "1100"}, [20.0, 30.0], [5.0, 6.0])
    shorter["heldout_examples"][1][1] = 4
    with pytest.raises(ValueError, match="same windows and examples"):
        paired.mean_row([a[0], shorter])


def test_the_paired_table_answers_per_seed_and_over_the_seeds():
    same = "1" * 30 + "0" * 70
    better = "1" * 35 + "0" * 65
    cells = {}
    for seed, lar_items in ((0, better), (1, better), (2, same)):
        for method, items, nll in (("rolora", lar_items, 20.0), ("lbr", same, 21.0)):
            r = row({"arc_easy": items}, [nll, nll + 1], [5.0, 5.0])
            r.update(ppl=math.exp(nll / 10), average=items.count("1") / 100, heldout_loss=1.0)
            cells[f"seed{seed}/eval/{method}/w4a4_rtn"] = {"row": r}
    lines = paired.paired_table(cells, reproduce.SETTINGS)
    overall, per_task = lines[:lines.index("Per task (points, paired):")], lines[lines.index("Per task (points, paired):"):]
    rows = [line for line in overall if line.startswith("| LAR (RoLoRA) minus LBR | w4a4_rtn |")]
    assert [r.split(" | ")[2] for r in rows] == ["0", "1", "2", "mean of 3"]
    assert "| +5.00 ± " in rows[0] and "| +0.00 ± 0.00 |" in rows[2]
    assert "signs differ" in rows[3].split(" | ")[3] and "same sign on every seed" in rows[3].split(" | ")[4]
    # the seeds' error: the averages +5, +5, 0 have sd sqrt(25 / 3) and mean +3.33; the perplexity
    # differences are the same on every seed, so their spread is none
    assert rows[3].split(" | ")[3].startswith(f"+3.33 ± ") and f"(seeds ± {math.sqrt(25 / 3 / 3):.2f}; " in rows[3]
    assert "(seeds ± 0.0000; same sign on every seed)" in rows[3].split(" | ")[4]
    assert per_task[2] == "| difference | setting | seed | arc_easy |"
    assert per_task[4:8] == ["| LAR (RoLoRA) minus LBR | w4a4_rtn | 0 | +5.0 ± 2.2 |",
                             "| LAR (RoLoRA) minus LBR | w4a4_rtn | 1 | +5.0 ± 2.2 |",
                             "| LAR (RoLoRA) minus LBR | w4a4_rtn | 2 | +0.0 ± 0.0 |",
                             "| LAR (RoLoRA) minus LBR | w4a4_rtn | mean of 3 | +3.3 ± 1.5 |"]
    # the same 5 items moved on two seeds: per-item mean differences 2/3 (5 items) and 0 (95),
    # sd 0.146; seeds taken as independent, sqrt(2 * 0.022^2) / 3 = 0.010 would understate it


def history(scale: float = 1.0, steps: int = 4) -> dict:
    return {"train_loss": [scale * (2.0 - 0.1 * i) for i in range(steps)], "val_loss": [[steps, scale * 1.5]]}


def cell(sha: str = "a" * 64, fingerprint=(1.0, -2.0, 3.0), **history_options) -> dict:
    return {"adapters_sha256": sha, "adapters_fingerprint": list(fingerprint), "history": history(**history_options),
            "machine": "CPU somewhere"}


def test_a_training_made_again_is_judged_by_what_crosses_machines():
    recorded = cell()
    assert reproduce.same_training(recorded, cell())[0]  # bit for bit
    rounding = cell(sha="b" * 64, fingerprint=(1.0 + 1e-6, -2.0, 3.0 - 1e-6), scale=1 + 1e-7)
    same, difference = reproduce.same_training(recorded, rounding)
    assert same and 0 < difference["loss"] < 1e-6 and 0 < difference["fingerprint"] < 1e-6
    another_seed = cell(sha="c" * 64, fingerprint=(-0.7, 2.5, 0.1))
    assert not reproduce.same_training(recorded, another_seed)[0]  # the curve alone would pass
    other_lr = cell(sha="d" * 64, fingerprint=(1.0, -2.0, 3.0), scale=1.05)
    assert not reproduce.same_training(recorded, other_lr)[0]
    assert not reproduce.same_training(recorded, cell(sha="e" * 64, steps=5))[0]
    legacy = {k: v for k, v in recorded.items() if k != "adapters_fingerprint"}  # recorded before fingerprints
    assert reproduce.same_training(legacy, rounding)[0] and not reproduce.same_training(legacy, other_lr)[0]


def test_the_fingerprint_sees_a_float_rounding_apart_from_another_seed(tmp_path):
    def adapters(seed: int, noise: float = 0.0):
        model = tiny_model()
        torch.manual_seed(seed)
        lora.add_lora(model, ("q_proj", "v_proj"), rank=4, alpha=4)
        with torch.no_grad():
            for m in lora.lora_modules(model).values():
                m.lora_B.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
                for p in (m.lora_A.weight, m.lora_B.weight):
                    p.mul_(1 + noise * torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
        folder = tmp_path / f"{seed}-{noise}"
        lora.save_adapters(model, folder)
        return reproduce.adapters_fingerprint(folder / lora.ADAPTER_WEIGHTS)

    def apart(a, b):
        a, b = torch.tensor(a), torch.tensor(b)
        return ((a - b).abs().max() / a.abs().max()).item()
    base = adapters(0)
    assert len(base) == reproduce.FINGERPRINT_SIZE and base == adapters(0)  # the same on every call
    assert apart(base, adapters(0, noise=1e-6)) < 1e-5 < reproduce.FINGERPRINT_RTOL
    assert apart(base, adapters(1)) > 0.3 > reproduce.FINGERPRINT_RTOL
