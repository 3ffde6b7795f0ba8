"""Data-parallel fine-tuning under torchrun (train.py): 2 CPU processes on gloo train the adapters of
one process with the same global batch, and an interrupted 2-process run resumes bit for bit; both
with the whole base on each process (DDP) and with it sharded over them (--fsdp, FSDP2).
Slow: stories260K from the mirror, and each run starts two Python processes.

Run: python -m pytest tests/test_data_parallel.py -q
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, final_adapters

pytestmark = pytest.mark.slow


DDP_FLAGS = ["--model", "stories260K", "--data", "tinystories", "--max-steps", "6", "--batch-size", "8",
             "--seq-len", "64", "--lr", "1e-3", "--tasks=", "--ppl-windows", "1", "--ppl-seq-len", "64",
             "--val-examples", "8", "--w-bits", "16", "--a-bits", "16", "--no-export", "--eval-every", "3",
             "--save-every", "3", "--grad-accum", "2"]
CRASH_AT_STEP_4 = """import sys
sys.path.insert(0, {root!r})
import train
real = train.batch_for_step
def crash(step, *args):
    if step == 4:
        raise KeyboardInterrupt("simulated interruption")
    return real(step, *args)
train.batch_for_step = crash
train.run(train.parse_args(sys.argv[1:]))
"""


def launch(script, out, *flags, processes=1, check=True):
    import subprocess
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                                  if processes > 1 else []) + [str(script), *DDP_FLAGS, "--out", str(out), *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=check,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("sharding", [(), ("--fsdp",)], ids=["ddp", "fsdp2"])
def test_two_processes_train_the_adapters_of_one_with_the_same_global_batch_and_resume_bit_for_bit(
        tmp_path, stories_dir, sharding):
    """DDP: each process holds the whole base; --fsdp: each holds half of every block (FSDP2).
    The uninterrupted 2-process run is then the reference of an interrupted, resumed one."""
    assert_two_processes_train_as_one(tmp_path, sharding)
    crashing = tmp_path / "crash_at_step_4.py"
    crashing.write_text(CRASH_AT_STEP_4.format(root=str(ROOT)))
    failed = launch(crashing, tmp_path / "cut", *sharding, processes=2, check=False)
    assert failed.returncode != 0 and "simulated interruption" in failed.stderr
    assert (tmp_path / "cut" / "latest").read_text().strip() == "ckpt-000003"
    launch(ROOT / "train.py", tmp_path / "cut", "--resume", *sharding, processes=2)
    straight, resumed = final_adapters(tmp_path / "two"), final_adapters(tmp_path / "cut")
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def assert_two_processes_train_as_one(tmp_path, sharding: tuple, device_flags: tuple = ()):
    """train.py in one process and in two (with `sharding`), both with `device_flags`: the same adapters,
    losses and AdamW moments. tests/test_cuda.py runs it on two GPUs (NCCL)."""
    launch(ROOT / "train.py", tmp_path / "one", *device_flags)
    two = launch(ROOT / "train.py", tmp_path / "two", *device_flags, *sharding, processes=2)
    assert ("sharded over 2 processes (FSDP2)" in two.stdout + two.stderr) == bool(sharding)
    one, two = final_adapters(tmp_path / "one"), final_adapters(tmp_path / "two")
    assert one.keys() == two.keys() and one
    for key in one:  # each rank ran half of every step's examples; DDP summed their gradients
        assert torch.allclose(one[key], two[key], rtol=0, atol=1e-5), key
    largest = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"\n{' '.join(sharding) or 'DDP'}: largest adapter difference from one process {largest:.2g}")
    assert largest > 0  # two processes really ran (float order)
    history = lambda out: json.loads((out / "results.json").read_text())["history"]  # noqa: E731
    assert history(tmp_path / "two")["train_loss"] == pytest.approx(history(tmp_path / "one")["train_loss"],
                                                                    rel=1e-5)
    # the gradients themselves, not only AdamW's scale-free steps: its moments equal too
    moments = lambda out: load_file(out / (out / "latest").read_text().strip() / "optimizer.safetensors")  # noqa: E731
    m_one, m_two = moments(tmp_path / "one"), moments(tmp_path / "two")
    for key in m_one:
        assert (m_one[key] - m_two[key]).abs().max() <= 1e-4 * m_one[key].abs().max(), key  # float order only
    assert (tmp_path / "two" / "log.txt").read_text().count("trainable parameters") == 1  # rank 0 logs
