"""bench/gpu_step.py and bench/gpu_check.sh, the GPU check of the single-GPU recipe, on the CPU at a tiny size:
the training step it times on the GPU is the one bench_plan.py predicts, FLOP for FLOP; each part prints its
row of the check's table; the script documents itself and refuses a machine without CUDA."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, tiny_config

sys.path.insert(0, str(ROOT / "bench"))
import bench_plan  # noqa: E402
import gpu_step  # noqa: E402

TINY = ["--device", "cpu", "--shape", "tiny", "--batch", "2", "--seq", "32", "--rank", "4", "--iters", "1",
        "--threads", "1"]


@pytest.fixture
def tiny_shape(monkeypatch, one_thread):
    monkeypatch.setitem(bench_plan.SHAPES, "tiny", tiny_config())  # bench_train.SHAPES, which gpu_step reads too


def test_the_timed_step_does_the_flops_bench_plan_predicts_for_it(tiny_shape):
    """The step train.py runs (accumulate_gradients on make_batch's batch), counted on the device, against
    bench_plan.py's extrapolation from 1- and 2-layer models of its own loss: equal, with and without
    checkpointing, so the MFU of the GPU run and the plan's time rest on the same FLOPs."""
    args = gpu_step.parse_args(TINY)
    measured, predicted = gpu_step.measure_step(args), gpu_step.predict_step(args)
    for checkpointing in (False, True):
        assert measured[checkpointing]["flops"] == predicted[checkpointing]["flops"], checkpointing
        assert measured[checkpointing]["step_s"] > 0 and measured[checkpointing]["peak_gb"] is None  # a CPU
    assert measured[True]["flops"] > measured[False]["flops"]  # the recompute
    assert predicted[True]["peak"] < predicted[False]["peak"]


def test_each_part_prints_its_row_of_the_table(tiny_shape, tmp_path, capsys):
    rows = tmp_path / "rows.md"
    gpu_step.main(TINY + ["--rows", str(rows)])
    gpu_step.main(TINY + ["--what", "gptq", "--calib-windows", "4", "--calib-seq-len", "32", "--rows", str(rows)])
    lines = rows.read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "| tiny train step (batch 2 x 32)", "| tiny train step, grad ckpt (batch 2 x 32)",
        "| GPTQ of one tiny block (4 x 32 tokens)"]
    assert all(line.count(" | ") == 2 and line.endswith(" |") for line in lines)  # part | result | prediction
    assert all("tokens/s at 40% MFU" in line for line in lines[:2]) and "small ops" in lines[2]
    out = capsys.readouterr().out
    assert gpu_step.HEADER in out and lines[0] in out


def test_the_check_documents_itself_and_refuses_a_machine_without_cuda(tmp_path):
    script = str(ROOT / "bench" / "gpu_check.sh")
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, check=True).stdout
    for needed in ("--quick", "--out", "data/models/stories260K", "data/tinystories", "data/wikitext2",
                   "data/commonsense", "carry"):
        assert needed in usage, needed
    if torch.cuda.is_available():
        return
    run = subprocess.run(["bash", script, "--out", str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert run.returncode == 1 and "no CUDA device" in run.stderr
