"""CUDA against the CPU: every path of the single-GPU recipe that only a GPU runs computes what the CPU
computes, on the same inputs and seeds, both in the same run: the Walsh-Hadamard custom op, a rotated
model, a LoRA step under bf16 autocast, GPTQ's Cholesky and column loop, zero-shot scoring with the
shared-prefix KV cache and perplexity, a packed quantized checkpoint loaded onto the GPU, --compile on
inductor's GPU backend, and DDP / FSDP2 over NCCL. Skipped where torch.cuda is not available;
bash bench/gpu_check.sh runs them on a GPU machine.

    python -m pytest tests/test_cuda.py -q -rs
    ROLORA_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py   # a dry run of this file's code: the CPU against itself
"""
import copy
import dataclasses
import io
import math
import os
import sys
from contextlib import nullcontext

import pytest
import torch

import eval as ev
import quant
import rotate
import train
from data.options import replace_options
from data.wikitext2.prepare import load_test_text
from extras.compile import compile_blocks
from extras.quantized_checkpoint import save_quantized
from helpers import ROOT, tiny_model, tokens

sys.path.insert(0, str(ROOT / "bench"))
from bench_train import SHAPES  # noqa: E402
from test_rotate import relative_error  # noqa: E402

DEVICE = os.environ.get("ROLORA_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="no CUDA device (torch.cuda.is_available() is False): these tests compare CUDA with the CPU; "
           "run them on a GPU machine (bash bench/gpu_check.sh)")]


def prepared_file(relative: str):
    """Skip where a prepared data file is missing and there is no mirror to prepare it from (a GPU machine
    gets the files carried beside the code: bash bench/gpu_check.sh --help)."""
    if not (ROOT / relative).is_file() and "ROLORA_MIRROR" not in os.environ:
        pytest.skip(f"{relative}: not prepared, and no ROLORA_MIRROR to prepare it from")


def smollm2_shaped(**overrides) -> torch.nn.Module:
    """Random weights at SmolLM2-135M's shape (bench_train.SHAPES), norms included (helpers.tiny_model), the
    others at std 0.02 as Hugging Face initialises a LLaMA: at tiny_model's 0.1 the attention of 30 layers
    saturates, and fp32 differs from float64 by 2e-5 already (by 1e-6 at 0.02)."""
    model = tiny_model(seed=0, **{**dataclasses.asdict(SHAPES["smollm2-135m"]), **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(0.2)
    return model


def rotated_stories(stories_dir, device: str, dtype=torch.float32):
    """stories260K loaded as every --model loads it, onto `device`, and rotated there (R1, R4)."""
    model, tok, _ = ev.load_model(stories_dir, dtype=dtype, device=device)
    rotate.rotate_model(model, seed=0)
    return model.eval(), tok


# -----------------------------------------------------------------------------
# The rotation


WHT_CASES = [(n, dtype) for n in (576, 1536, 4096, 11008, 14336) for dtype in (torch.float32, torch.bfloat16)]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # tests/test_rotate.py's, relative to the largest value


@pytest.mark.parametrize("n, dtype", WHT_CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in WHT_CASES])
def test_the_walsh_hadamard_transform_on_cuda_equals_the_dense_product_and_the_cpus(n, dtype):
    """Forward y = x M^T and backward dL/dx = dL/dy M of the custom op, at the hidden and intermediate sizes of
    SmolLM2, LLaMA-2-7B and LLaMA-3-8B, against the dense float64 product and the CPU's fast transform."""
    g = torch.Generator().manual_seed(n)
    x, grad = (torch.randn(16, n, generator=g).to(dtype) for _ in range(2))
    M = rotate.hadamard_transform_matrix(n)  # dense float64: 1.6 GB at 14336
    expected = (x.double() @ M.T, grad.double() @ M)
    del M
    results = {}
    for device in ("cpu", DEVICE):
        leaf = x.to(device, copy=True).requires_grad_()
        y = rotate.walsh_hadamard_transform(leaf)
        y.backward(grad.to(device))
        assert y.dtype == leaf.grad.dtype == dtype
        results[device] = (y.detach().cpu().double(), leaf.grad.cpu().double())
    for got, cpu, want in zip(results[DEVICE], results["cpu"], expected):
        assert relative_error(got, want) < TOLERANCE[dtype]
        assert relative_error(got, cpu) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", [pytest.param("stories260K", marks=pytest.mark.slow), "SmolLM2-135M shape"])
def test_a_model_rotated_on_cuda_gives_the_cpus_logits(request, case):
    """fp32 within 1e-4 relative; each model rotated where it lives (the float64 transforms of R1 and R4 on
    the GPU), then run with its online Hadamard."""
    model = copy.deepcopy(request.getfixturevalue("stories_model")) if case == "stories260K" else smollm2_shaped()
    on_device = copy.deepcopy(model).to(DEVICE)
    for m in (model, on_device):
        rotate.rotate_model(m, seed=0)
    idx = tokens(2, 64)
    with torch.no_grad():
        expected, got = model(idx), on_device(idx.to(DEVICE)).cpu()
    assert relative_error(got, expected) < 1e-4


# -----------------------------------------------------------------------------
# Fine-tuning in bf16


STORIES = ["Once upon a time, there was a little girl named Lily. She loved to play in the park with her ball.",
           "Tom had a big red truck. One day the truck broke, and Tom was sad. His dad helped him fix it.",
           "The sun was hot. A little bird sat on a tree and sang a happy song for all the animals.",
           "Sara wanted to bake a cake for her mom. She got flour, eggs and milk, and mixed them in a bowl.",
           "Ben found a shiny stone in the garden. He showed it to his friend Mia, and they both smiled.",
           "A small cat was lost in the rain. A kind boy took it home and gave it some warm milk.",
           "Lucy and her brother built a tall tower of blocks. Then the dog ran by and it fell down.",
           "The old man had a boat. Every morning he went to the sea to catch fish for his family."]


@pytest.mark.slow
def test_a_lora_step_under_bf16_autocast_on_cuda_matches_the_cpus_fp32_step(stories_dir, tmp_path):
    """train.finetune_stage as train.py runs it on CUDA (--dtype auto: bf16 base, bf16 autocast, fp32 adapters)
    against the CPU in fp32, on the rotated stories260K: the losses of 3 AdamW steps within 1% (measured on the
    CPU: bf16 moves them by 0.1%; the GPU draws LoRA's A from its own generator, and another draw by 0.07%)."""
    cfg = replace_options(train.TrainConfig(), max_steps=3, batch_size=4, seq_len=64, lr=1e-3, eval_every=100,
                          save_every=100)
    losses = {}
    for device, dtype in (("cpu", torch.float32), (DEVICE, torch.bfloat16)):
        model, tok = rotated_stories(stories_dir, device, dtype)
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if dtype == torch.bfloat16 \
            else nullcontext()
        out = tmp_path / str(dtype)
        out.mkdir()
        train_set = [train.tokenize_example(tok, {"prompt": "", "response": s}, cfg.seq_len) for s in STORIES]
        r = train.Run(cfg, out, device, dtype, autocast, io.StringIO(), tok=tok, pad_id=tok.eos_id, train_set=train_set)
        losses[dtype] = train.finetune_stage(r, model)["train_loss"]
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.01)
    for name, p in model.named_parameters():  # the model trained on the device
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
        assert p.device.type == torch.device(DEVICE).type, name


# -----------------------------------------------------------------------------
# GPTQ


def integer_codes(model) -> torch.Tensor:
    """Every quantized weight's integer k = W / scale + zero, flattened."""
    return torch.cat([(torch.round(m.weight.float() / m.weight_scale) + m.weight_zero).flatten()
                      for m in model.modules() if isinstance(m, quant.QuantLinear)])


def test_gptq_of_a_block_on_cuda_rounds_as_the_cpus_and_errs_no_more():
    """One SmolLM2-shaped block (rotated, R4 online), 16 x 128 calibration tokens, W4: the same integer code
    for at least 99.9% of the weights (a float summation order may flip a tie, and GPTQ spreads that column's
    error on), and an output error on the calibration tokens no larger than the CPU's (1% of slack). Without
    the MSE clip search: its choice of a row's clip ratio is an argmin over float sums, whose tie, flipped,
    would move that whole row's grid (the search is plain elementwise arithmetic on either device)."""
    model = smollm2_shaped(num_hidden_layers=1)
    rotate.rotate_model(model, seed=0)
    calibration = torch.randint(0, model.config.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    config = quant.QuantConfig(w_bits=4, w_method="gptq", w_clip_search=False, calib_windows=16, calib_seq_len=128)
    on_cpu, on_device = (quant.quantize_model(copy.deepcopy(model).to(device), config, calibration=calibration,
                                              progress=False).cpu() for device in ("cpu", DEVICE))
    same = (integer_codes(on_device) == integer_codes(on_cpu)).float().mean().item()
    assert same >= 0.999, f"{same:.5f} of the codes are the CPU's"
    with torch.no_grad():
        reference = model(calibration)
        error = lambda quantized: (quantized(calibration) - reference).norm().item()  # noqa: E731
        assert error(on_device) <= 1.01 * error(on_cpu)


# -----------------------------------------------------------------------------
# Evaluation


@pytest.mark.slow
@pytest.mark.parametrize("share_prefix", [True, False], ids=["shared-prefix", "plain"])
def test_zero_shot_scores_on_cuda_equal_the_cpus(stories_dir, share_prefix):
    """The rotated stories260K on 20 ARC-Easy items: the same choices, log-likelihoods within 1e-3."""
    prepared_file("data/commonsense/arc_easy.jsonl")
    requests, items = [], []
    for record in ev.load_task("arc_easy")[:20]:
        choices = ev.build_requests(record)
        items.append(list(range(len(requests), len(requests) + len(choices))))
        requests += choices
    scores = {}
    for device in ("cpu", DEVICE):
        model, tok = rotated_stories(stories_dir, device)
        scores[device] = ev.loglikelihoods(model, tok, requests, items, share_prefix=share_prefix, progress=False)
    assert max(abs(a - b) for a, b in zip(scores[DEVICE], scores["cpu"])) < 1e-3
    chosen = {d: [ev.argmax_first([s[i] for i in item]) for item in items] for d, s in scores.items()}
    assert chosen[DEVICE] == chosen["cpu"]


@pytest.mark.slow
def test_perplexity_on_cuda_equals_the_cpus(stories_dir):
    """The rotated stories260K on 4 windows of 256 WikiText-2 tokens: the mean log-likelihood within 1e-3."""
    prepared_file("data/wikitext2/test.txt")
    text = load_test_text()
    ppl = {device: ev.perplexity(*rotated_stories(stories_dir, device), text, seq_len=256, limit_windows=4,
                                 progress=False) for device in ("cpu", DEVICE)}
    assert abs(math.log(ppl[DEVICE]) - math.log(ppl["cpu"])) < 1e-3


@pytest.mark.slow
def test_a_saved_w4a4_model_loads_onto_cuda_with_the_cpus_weights_and_outputs(stories_model, tmp_path):
    """save_quantized's packed codes, unpacked onto the GPU by the loader behind every --model: fp32 weights
    equal to the CPU's bit for bit, and the outputs within 1e-4 in float64. Not compared in fp32: there a
    last-bit difference of a matmul can carry an activation across a rounding tie of its 4-bit grid, which
    moves a logit by a whole grid step (in float64 the chance is nil)."""
    model = copy.deepcopy(stories_model)
    rotate.rotate_model(model, seed=0)
    quant.quantize_model(model, w_bits=4, a_bits=4, progress=False)
    save_quantized(model, tmp_path)
    on_cpu, on_device = (ev.load_weights(tmp_path, torch.float32, device) for device in ("cpu", DEVICE))
    assert on_device.lm_head.weight.device.type == torch.device(DEVICE).type
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_device.state_dict().items(), strict=True):
        assert torch.equal(a, b.cpu()), name
    on_cpu, on_device = (ev.load_weights(tmp_path, torch.float64, device) for device in ("cpu", DEVICE))
    idx = tokens(2, 64)
    with torch.no_grad():
        assert relative_error(on_device(idx.to(DEVICE)).cpu(), on_cpu(idx)) < 1e-4


# -----------------------------------------------------------------------------
# --compile on inductor's GPU backend (the CPU's tests: tests/test_eval.py, tests/test_train.py)


@pytest.mark.slow
def test_compiled_scores_on_cuda_equal_eager_and_the_cpus():
    """A rotated W4A4 model in float64 (tests/test_eval.py's, and its tolerance), with and without the shared
    prefix: compiled on the GPU = eager on the GPU = eager on the CPU."""
    from test_eval import WordTokenizer, question_requests
    model = tiny_model(seed=7, dtype=torch.float64)
    rotate.rotate_model(model, seed=7)
    quant.quantize_model(model, w_bits=4, a_bits=4, w_clip_search=False, progress=False)
    on_device = copy.deepcopy(model).to(DEVICE)
    compiled = compile_blocks(copy.deepcopy(on_device))
    tok, (requests, items) = WordTokenizer(), question_requests()
    for share_prefix in (True, False):
        expected = ev.loglikelihoods(model, tok, requests, items, batch_size=4, share_prefix=share_prefix,
                                     progress=False)
        for m in (on_device, compiled):
            got = ev.loglikelihoods(m, tok, requests, items, batch_size=4, share_prefix=share_prefix, progress=False)
            assert got == pytest.approx(expected, abs=1e-10, rel=0), share_prefix


@pytest.mark.slow
def test_compiled_training_on_cuda_equals_eager(tmp_path):
    """tests/test_train.py's QAT of a rotated W4A4 model with adapter dropout, in float64, on the GPU: the
    compiled run's losses and merged weights are the eager run's (1e-6). Against the GPU's eager run only:
    the dropout masks come from the GPU's generator, not the CPU's."""
    from test_train import rotated_qat_run
    runs = {}
    for compile in (False, True):
        r, model = rotated_qat_run(tmp_path, compile, DEVICE)
        history = train.finetune_stage(r, model)
        train.merge_stage(r, model)
        runs[compile] = history["train_loss"], model.state_dict()
    (eager_loss, eager), (compiled_loss, compiled) = runs[False], runs[True]
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6, abs=0)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=1e-6, msg=key)


# -----------------------------------------------------------------------------
# Several GPUs: NCCL under torchrun (the gloo runs: tests/test_data_parallel.py)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP and FSDP2 over NCCL need two GPUs; this machine "
                                                          f"has {torch.cuda.device_count()}")
@pytest.mark.parametrize("sharding", [(), ("--fsdp",)], ids=["ddp", "fsdp2"])
def test_two_gpus_train_the_adapters_of_one_with_the_same_global_batch(tmp_path, stories_dir, sharding):
    """In fp32 (--dtype float32), so that the gloo tests' tolerances hold."""
    from test_data_parallel import assert_two_processes_train_as_one
    assert_two_processes_train_as_one(tmp_path, sharding, device_flags=("--device", "cuda", "--dtype", "float32"))
