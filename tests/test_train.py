"""train.py end to end on stories260K + TinyStories: it learns, it resumes exactly, it stops on NaN."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from helpers import ROOT

pytestmark = pytest.mark.slow


def quick_config(tmp_path, **overrides) -> train.TrainConfig:
    """Seconds-long settings: tiny model, short sequences, no zero-shot tasks unless asked."""
    settings = dict(model="stories260K", data="tinystories", out=str(tmp_path / "run"), max_steps=12,
                    batch_size=8, seq_len=96, lr=1e-3, eval_every=4, save_every=4, val_examples=32,
                    tasks="", ppl_windows=1, ppl_seq_len=128, bits=16, calib_windows=4, calib_seq_len=64,
                    export=False)
    settings.update(overrides)
    return train.TrainConfig(**settings)


@pytest.fixture(autouse=True)
def _stories_ready(stories_dir):
    """Prepares stories260K from the mirror (or skips) before train.py looks for it."""


def test_30_step_rolora_run_lowers_heldout_loss_and_quantizes(tmp_path, capsys):
    cfg = quick_config(tmp_path, max_steps=30, rotate=True, bits=4, tasks="arc_easy", eval_limit=8,
                       save_every=10, eval_every=10, export=True)
    results = train.run(cfg)
    rows = results["rows"]
    assert set(rows) == {"before / FP", "before / W4A4", "after / FP", "after / W4A4"}
    assert rows["after / FP"]["heldout_loss"] < rows["before / FP"]["heldout_loss"] - 0.02
    assert rows["before / W4A4"]["heldout_loss"] > rows["before / FP"]["heldout_loss"]  # 4 bits cost something
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["rows"]["after / W4A4"]["tasks"]["arc_easy"]["n"] == 8
    assert set(on_disk["timings_s"]) >= {"load", "rotate", "finetune", "merge", "evaluate_after"}
    assert "| after / W4A4 |" in capsys.readouterr().out

    # the exported merged model (plus its rotation record) reloads to the same held-out loss
    import rotate
    merged, record = rotate.load_rotated(tmp_path / "run" / "merged")
    assert record["seed"] == cfg.seed
    from model import Tokenizer, resolve_model_dir
    tok = Tokenizer(resolve_model_dir("stories260K"))
    val = [train.tokenize_example(tok, e, cfg.seq_len) for e in train.load_examples("tinystories", "val")][:32]
    loss = train.heldout_loss(merged, val, tok.eos_id, 32, "cpu", torch.autocast("cpu", enabled=False))
    assert loss == pytest.approx(rows["after / FP"]["heldout_loss"], rel=1e-5)


def _final_adapters(out):
    latest = (out / "latest").read_text().strip()
    return load_file(out / latest / "adapters.safetensors")


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    straight = quick_config(tmp_path / "a", dropout=0.1)  # dropout: the RNG state must be restored too
    expected = train.run(straight)

    interrupted = quick_config(tmp_path / "b", dropout=0.1)
    real_batch_for_step = train.batch_for_step

    def crash_at_step_6(step, *args):
        if step == 6:
            raise KeyboardInterrupt("simulated interruption")
        return real_batch_for_step(step, *args)

    monkeypatch.setattr(train, "batch_for_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.run(interrupted)
    assert (tmp_path / "b" / "run" / "latest").read_text().strip() == "ckpt-000004"
    monkeypatch.setattr(train, "batch_for_step", real_batch_for_step)
    resumed = train.run(quick_config(tmp_path / "b", dropout=0.1, resume=True))

    a, b = _final_adapters(tmp_path / "a" / "run"), _final_adapters(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU
    assert resumed["history"]["train_loss"] == expected["history"]["train_loss"]
    assert resumed["rows"]["after / FP"] == expected["rows"]["after / FP"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = train.lm_loss

    def loss_turning_nan(logits, targets):
        calls["n"] += 1
        loss = real_loss(logits, targets)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(train, "lm_loss", loss_turning_nan)
    cfg = quick_config(tmp_path, save_every=3)
    with pytest.raises(train.NonFiniteLoss, match="step 7.*last good checkpoint"):
        train.run(cfg)
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "ckpt-000006"
    adapters = _final_adapters(out)
    assert adapters and all(torch.isfinite(t).all() for t in adapters.values())
    # and the run can go on from there
    monkeypatch.setattr(train, "lm_loss", real_loss)
    resumed = train.run(quick_config(tmp_path, save_every=3, resume=True))
    assert len(resumed["history"]["train_loss"]) == cfg.max_steps


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data nope"):
        train.run(quick_config(tmp_path, data="nope"))


def test_unknown_target_module_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="qproj"):
        train.run(quick_config(tmp_path, targets="qproj"))


def test_bits_out_of_range_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--w-bits"):
        train.run(quick_config(tmp_path, w_bits=1))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        train.run(quick_config(tmp_path, resume=True))


def test_help_lists_every_option():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True,
                          text=True, check=True).stdout
    for f in train.TrainConfig.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in text
