"""train.py: the flags are checked before anything loads; the loss covers the response tokens only;
and end to end on stories260K (slow): it learns, it resumes exactly, it stops on NaN, and every
flag the README quotes numbers for (--qat, --quant gptq, --variant reslora, --grad-checkpointing,
--grad-accum) really changes what runs, or provably does not change the result."""
import copy
import io
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train
from extras import checkpoints
from helpers import ROOT, final_adapters, tiny_model, tokens
from data.options import option_names, replace_options


def quick_config(tmp_path, **overrides) -> train.TrainConfig:
    """Seconds-long settings: tiny model, short sequences, no zero-shot tasks unless asked."""
    settings = dict(model="stories260K", data="tinystories", out=str(tmp_path / "run"), max_steps=12,
                    batch_size=8, seq_len=96, lr=1e-3, eval_every=4, save_every=4, val_examples=32,
                    tasks="", ppl_windows=1, ppl_seq_len=128, w_bits=16, a_bits=16, calib_windows=4, calib_seq_len=64,
                    export=False)
    settings.update(overrides)
    return replace_options(train.TrainConfig(), **settings)


class WordTokenizer:
    """A toy tokenizer: one id per whitespace-separated word, BOS 1, EOS 2."""
    bos_id, eos_id = 1, 2

    def encode(self, text, bos=True, eos=False):
        ids = [3 + sum(map(ord, w)) % 120 for w in text.split()]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


def reference_loss(model, tokenized) -> float:
    """The definition, one example at a time: mean cross-entropy of the tokens after the prompt."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, n_prompt in tokenized:
            logits = model(torch.tensor([ids[:-1]]))[0]            # (T, vocab): position p predicts p + 1
            scored = range(n_prompt - 1, len(ids) - 1)             # predictions of response tokens
            targets = torch.tensor([ids[p + 1] for p in scored], dtype=torch.long)
            total += F.cross_entropy(logits[list(scored)].double(), targets, reduction="sum").item()
            count += len(scored)
    return total / count


def response_loss(model, tok, examples, seq_len) -> float:
    """reference_loss from the raw examples, not through train.tokenize_example: the scored tokens
    are those after the tokens of the prompt (BOS + prompt), up to the cutoff."""
    tokenized = []
    for e in examples:
        ids = tok.encode(e["prompt"] + e["response"], bos=True, eos=True)[:seq_len + 1]
        prompt = tok.encode(e["prompt"], bos=True)
        assert ids[:len(prompt)] == prompt  # the prompt's tokens are a prefix of the full text's
        tokenized.append((ids, len(prompt)))
    return reference_loss(model, tokenized)


def offline_run(cfg: train.TrainConfig, tmp_path) -> train.Run:
    """A Run on the CPU without open_run (no lock, the log in memory): the stages called one by one."""
    (tmp_path / "run").mkdir(exist_ok=True)
    return train.Run(cfg, tmp_path / "run", "cpu", torch.float32, nullcontext(), io.StringIO())


# -----------------------------------------------------------------------------
# Fast: flags, data, loss


def test_help_lists_every_option():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True,
                          text=True, check=True).stdout
    for name in option_names(train.TrainConfig()):  # nested LoRAConfig and QuantConfig too
        assert "--" + name.replace("_", "-") in text


BAD_FLAGS = [
    (["--seq-len", "0"], "--seq-len=0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--grad-accum", "16"], "--grad-accum=16: more micro-batches than the 8 examples"),
    (["--rank", "0"], "--rank=0"),
    (["--lr", "0"], "--lr=0.0: must be positive"),
    (["--dropout", "1"], "--dropout=1.0: must be in [0, 1)"),
    (["--w-bits", "1"], "--w-bits=1 must be an integer from 2 to 16"),
    (["--bits", "17"], "--bits=17 must be an integer from 2 to 16"),
    (["--kv-bits", "0"], "--kv-bits=0 must be an integer from 2 to 16"),
    (["--quant", "awq"], "w_method='awq' (--w-method, --quant) must be rtn or gptq"),
    (["--variant", "dora"], "--variant='dora'"),
    (["--res-type", "skip"], "--res-type='skip'"),
    (["--variant", "reslora", "--res-type", "input", "--pre-num", "2"], "exactly one previous block"),
    (["--targets", "q_proj,qproj"], "['qproj'] not among the linears of a block"),
    (["--tasks", "arc"], "--tasks='arc'"),
    (["--eval-limit", "-1"], "--eval-limit=-1: must be at least 1 (0 or none: all)"),
    (["--dtype", "float16"], "--dtype='float16'"),
    (["--data", "nope"], "--data nope: no data/nope/prepare.py"),
    (["--device", "tpu"], "--device='tpu': must be auto, cpu or cuda[:N]"),
    (["--rotation", "learned"], "--rotation learned: add --rotate"),
    (["--compile", "--fsdp"], "--compile with --fsdp: not supported"),
    (["--rotate", "--rotation", "trained"], "--kind='trained': must be one of random, learned"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("train.py: error:")


@pytest.mark.parametrize("overrides,message", [
    (dict(seq_len=0), "--seq-len=0"), (dict(w_bits=1), "--w-bits=1"), (dict(targets="qproj"), "--targets"),
    (dict(data="nope"), "--data nope"), (dict(resume=True), "--resume: no checkpoint"),
    (dict(ppl_windows=0), "--ppl-windows=0"),  # from Python, None (not 0) means all
])
def test_run_checks_its_config_before_loading_anything(overrides, message, tmp_path, monkeypatch):
    """train.run(cfg) called from Python validates too, before a model or dataset is touched."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded something before the configuration was checked")
    for name in ("load_model", "load_examples"):
        monkeypatch.setattr(train, name, must_not_load)
    cfg = replace_options(train.TrainConfig(), out=str(tmp_path / "run"), **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.run(cfg)
    assert not (tmp_path / "run").exists()  # nothing written either


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the second run started loading")
    monkeypatch.setattr(train, "load_model", must_not_load)
    cfg = replace_options(train.TrainConfig(), out=str(tmp_path / "run"))
    with train.open_run(cfg):  # the first run, still writing
        with pytest.raises(RuntimeError, match=rf"already writing this folder \(pid {os.getpid()}, started"):
            train.run(cfg)
    with pytest.raises(AssertionError, match="second run started loading"):
        train.run(cfg)  # once the first has finished, the folder is free again


@pytest.mark.parametrize("flag", ["max_steps", "eval_limit", "ppl_windows", "val_examples"])
def test_zero_or_none_means_all_for_every_count(flag):
    option = "--" + flag.replace("_", "-")
    assert getattr(train.parse_args([option, "0"]), flag) is None
    assert getattr(train.parse_args([option, "none"]), flag) is None
    assert getattr(train.parse_args([option, "3"]), flag) == 3
    # and only there: 0 is not 'all' for a size (it is an error, above)
    assert train.parse_args(["--bits", "none"]).bits is None


def test_rotating_a_rotated_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "rotated").mkdir()
    (tmp_path / "rotated" / "rotation.json").write_text("{}")
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(tmp_path / "rotated"), "--rotate"])
    assert "is already rotated" in capsys.readouterr().err.strip().splitlines()[-1]
    assert train.parse_args(["--model", str(tmp_path / "rotated")]).rotate is False  # as it is: fine


@pytest.mark.parametrize("value,kept", [("0", 7), ("none", 7), ("3", 3)])
def test_val_examples_zero_or_none_holds_out_every_example(value, kept, tmp_path, monkeypatch):
    """What the flag's None means downstream: load_model_and_data keeps every held-out example."""
    tok = WordTokenizer()
    rows = {split: [{"prompt": f"question {i}\n", "response": " ".join(["word"] * 20)} for i in range(n)]
            for split, n in (("train", 10), ("val", 7))}
    monkeypatch.setattr(train, "load_model", lambda name, dtype, device: (tiny_model(), tok, tmp_path))
    monkeypatch.setattr(train, "load_examples", lambda data, split: rows[split])
    monkeypatch.setattr(train, "load_test_text", lambda: "")
    cfg = replace_options(train.parse_args(["--val-examples", value]), calib_windows=4, calib_seq_len=64)
    r = offline_run(cfg, tmp_path)
    train.load_model_and_data(r)
    assert r.val_set == [train.tokenize_example(tok, e, cfg.seq_len) for e in rows["val"][:kept]]


@pytest.mark.parametrize("value,steps", [("0", 6), ("none", 6), ("4", 4)])
def test_max_steps_zero_or_none_trains_for_epochs(value, steps, tmp_path, one_thread):
    """--max-steps 0/none: --epochs 1.5 over 16 examples in batches of 4 is 6 optimizer steps."""
    import lora
    tok = WordTokenizer()
    cfg = replace_options(train.parse_args(["--max-steps", value]), epochs=1.5, batch_size=4, eval_every=100,
                          save_every=100, rank=2)
    model = tiny_model(seed=1)
    cfg.lora.add_to(model)
    lora.mark_only_lora_trainable(model)
    r = offline_run(cfg, tmp_path)
    r.pad_id = tok.eos_id
    r.train_set = [train.tokenize_example(tok, {"prompt": f"q {i}\n", "response": "a b c"}, 32) for i in range(16)]
    r.val_set = r.train_set[:2]
    history = train.finetune(r, model)
    assert len(history["train_loss"]) == steps
    assert (r.out / "latest").read_text().strip() == f"ckpt-{steps:06d}"


def test_prompt_tokens_carry_no_loss_and_padding_neither():
    tok = WordTokenizer()
    examples = [{"prompt": "### Instruction: add two and two\n### Response:\n", "response": "four"},
                {"prompt": "### Instruction: name a colour\n### Response:\n", "response": "a deep dark blue"},
                {"prompt": "", "response": "once upon a time there was a cat"}]
    tokenized = [train.tokenize_example(tok, e, seq_len=64) for e in examples]
    x, y = train.make_batch(tokenized, pad_id=0)
    for i, ((ids, n_prompt), e) in enumerate(zip(tokenized, examples)):
        prompt = tok.encode(e["prompt"], bos=True) if e["prompt"] else [tok.bos_id]
        assert n_prompt == len(prompt) and ids[:n_prompt] == prompt
        assert ids == tok.encode(e["prompt"] + e["response"], eos=True)
        n = len(ids) - 1
        assert x[i, :n].tolist() == ids[:-1] and (x[i, n:] == 0).all()
        # position p predicts token p + 1: the targets are the response tokens and EOS, nothing else
        scored = (y[i] != -100).nonzero().flatten().tolist()
        assert scored == list(range(n_prompt - 1, n))
        assert y[i, scored].tolist() == ids[n_prompt:]
        assert train.count_targets(ids, n_prompt) == len(scored)


def test_a_prompt_longer_than_the_cutoff_leaves_no_target_and_no_nan():
    tok = WordTokenizer()
    long = {"prompt": " ".join(["word"] * 50), "response": "answer"}
    ids, n_prompt = train.tokenize_example(tok, long, seq_len=16)
    assert len(ids) == 17 and n_prompt > len(ids) and train.count_targets(ids, n_prompt) == 0
    x, y = train.make_batch([(ids, n_prompt)], pad_id=0)
    assert (y == -100).all()
    logits = torch.randn(1, x.shape[1], 128)
    assert train.summed_token_loss(logits, y).item() == 0.0  # a mean would be 0/0 = NaN


def test_heldout_loss_is_the_mean_over_response_tokens():
    model = tiny_model(seed=2)
    tok = WordTokenizer()
    examples = [{"prompt": "q: " + " ".join(["x"] * k) + "\n", "response": "a b c d"[: 2 * k + 1]} for k in range(1, 6)]
    tokenized = [train.tokenize_example(tok, e, seq_len=64) for e in examples]
    no_autocast = torch.autocast("cpu", enabled=False)
    for batch_size in (1, 2, 8):  # padding and batching change nothing
        got = train.heldout_loss(model, tokenized, 0, batch_size, "cpu", no_autocast)
        assert got == pytest.approx(reference_loss(model, tokenized), rel=1e-6)
    # counting the prompt too would give another number: the mask matters on this data
    everything = [(ids, 1) for ids, _ in tokenized]
    assert abs(reference_loss(model, everything) - reference_loss(model, tokenized)) > 1e-3


@pytest.mark.parametrize("crash", ["writing", "cleaning up"])
def test_a_crash_while_checkpointing_leaves_latest_complete(crash, tmp_path, monkeypatch):
    """Killed while writing checkpoint 2 (its adapters) or while deleting checkpoint 1 (after
    the new one is complete): OUT/latest still names a checkpoint that loads."""
    import shutil
    import safetensors.torch
    import lora
    model = lora.add_lora(tiny_model(), rank=2)
    lora.mark_only_lora_trainable(model)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    out = tmp_path / "run"
    checkpoints.save_training_checkpoint(out, 1, model, optimizer, scheduler, {"history": {}})
    real_rmtree, real_save = shutil.rmtree, safetensors.torch.save_file

    def rmtree_then_die(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        if Path(path).name == "ckpt-000001":
            raise KeyboardInterrupt("killed after deleting the old checkpoint")

    def die_writing(tensors, filename, *args, **kwargs):
        if Path(filename).name == "adapters.safetensors":
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, filename, *args, **kwargs)

    if crash == "writing":
        monkeypatch.setattr(safetensors.torch, "save_file", die_writing)
    else:
        monkeypatch.setattr(shutil, "rmtree", rmtree_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_training_checkpoint(out, 2, model, optimizer, scheduler, {"history": {}})
    monkeypatch.undo()
    meta = checkpoints.load_training_checkpoint(out, model, optimizer, scheduler)
    assert meta["step"] == (1 if crash == "writing" else 2)


# -----------------------------------------------------------------------------
# --compile: torch.compile of the blocks (extras/compile.py)


def tiny_run(cfg: train.TrainConfig, tmp_path) -> train.Run:
    """offline_run with examples for a tiny random model: 12 of 8 to 15 tokens (3 of them prompt),
    so that each step's batch is padded to another length."""
    r = offline_run(cfg, tmp_path)
    g = torch.Generator().manual_seed(0)
    lengths = (10, 12, 14, 8, 9, 11, 13, 15, 12, 10, 9, 14)
    r.train_set = [(torch.randint(3, 128, (n,), generator=g).tolist(), 3) for n in lengths]
    r.val_set = r.train_set[:4]
    return r


def test_compile_compiles_the_model_that_trains_and_every_evaluated_one(tmp_path, monkeypatch, one_thread):
    """--compile reaches extras/compile.py: the model that trains once its adapters are on (with
    --qat the quantized copy, not the float model), and the model of every evaluated row."""
    import lora
    import quant
    compiled = []
    monkeypatch.setattr(train, "compile_blocks", lambda model: compiled.append((model, lora.lora_modules(model))) or model)
    cfg = quick_config(tmp_path, compile=True, qat=True, bits=4, w_clip_search=False, max_steps=1, rank=2)
    r = tiny_run(cfg, tmp_path)
    model = tiny_model()
    train.finetune_stage(r, model)
    [(trained, adapters)] = compiled
    assert trained is not model and len(adapters) == 2 * len(model.layers)  # q_proj, v_proj of every block
    assert isinstance(trained.layers[0].self_attn.q_proj.base_layer, quant.QuantLinear)
    r.tok, r.wikitext = WordTokenizer(), " ".join(f"w{i % 7}" for i in range(300))
    train.evaluate_row(r, model)
    assert compiled[-1][0] is model


def rotated_qat_run(tmp_path, compile: bool, device: str = "cpu"):
    """(run, model) of the compiled-against-eager test below (and of tests/test_cuda.py's on a GPU): QAT at W4A4
    with adapter dropout, 3 steps, no held-out examples, of a rotated one-block float64 model on `device`."""
    import rotate
    cfg = quick_config(tmp_path, compile=compile, qat=True, bits=4, w_clip_search=False, max_steps=3,
                       batch_size=4, eval_every=3, save_every=3, lr=1e-2, dropout=0.1)
    (tmp_path / f"compile={compile}").mkdir()
    r = tiny_run(cfg, tmp_path / f"compile={compile}")
    r.device, r.val_set = device, []
    model = tiny_model(dtype=torch.float64, num_hidden_layers=1).to(device)
    rotate.rotate_model(model, seed=0)
    return r, model


@pytest.mark.slow  # compiles a block's forward and backward: ~35 s on 2 busy cores with a cold inductor cache
def test_compiled_training_equals_eager_on_a_rotated_w4a4_model(tmp_path, monkeypatch, one_thread):
    """--compile changes no number: LoRA trained by QAT on a rotated model (R1, online R4) with W4A4 in
    every forward (the activation quantizers pass gradients by the STE), each batch padded to another
    length, with adapter dropout (the compiled run draws eager's masks), gives the eager run's losses,
    logits, saved adapters and merged weights. In float64, where a
    fused reduction's last-bit difference does not move a value across a rounding tie of the grid.
    One graph serves every step (the lengths are symbolic), and nothing breaks it (the online Hadamard
    is a custom op). No held-out examples: the graph of an evaluation would double the compile time,
    and tests/test_eval.py compiles one."""
    import quant
    import rotate
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    trained = []  # the quantized copies that train
    real_finetune = train.finetune
    monkeypatch.setattr(train, "finetune", lambda run, model: trained.append(model) or real_finetune(run, model))
    runs = {}
    for compile in (False, True):
        r, model = rotated_qat_run(tmp_path, compile)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        history = train.finetune_stage(r, model)
        torch.manual_seed(1)  # the dropout masks of this forward
        logits = trained[-1].train()(tokens(3, 11)).detach()  # with grad, in train mode: the training graph
        graphs, breaks = counters["stats"]["unique_graphs"] - graphs, sum(counters["graph_break"].values()) - breaks
        assert (graphs, breaks) == ((1, 0) if compile else (0, 0))
        assert isinstance(trained[-1].layers[0].mlp.down_proj.input_quantizer, quant.ActQuantizer)
        assert isinstance(trained[-1].layers[0].mlp.down_input_transform, rotate.OnlineHadamard)
        train.merge_stage(r, model)  # saves the adapters, then merges them into the float model
        runs[compile] = dict(history=history, logits=logits, merged=model.state_dict(),
                             adapters=load_file(r.out / "adapters" / "adapter_model.safetensors"))
    eager, compiled = runs[False], runs[True]
    assert compiled["history"]["train_loss"] == pytest.approx(eager["history"]["train_loss"], rel=1e-6, abs=0)
    torch.testing.assert_close(compiled["logits"], eager["logits"], rtol=0, atol=1e-6)
    for what in ("adapters", "merged"):
        assert compiled[what].keys() == eager[what].keys()
        for key in eager[what]:
            torch.testing.assert_close(compiled[what][key], eager[what][key], rtol=0, atol=1e-6, msg=key)


# -----------------------------------------------------------------------------
# Slow: end to end on stories260K


def first_step_examples(cfg: train.TrainConfig, tok):
    examples = [train.tokenize_example(tok, e, cfg.seq_len) for e in train.load_examples(cfg.data, "train")]
    return train.batch_for_step(0, examples, cfg.batch_size, cfg.seed)


@pytest.fixture
def stories(stories_dir):
    """stories260K (prepared from the mirror, or skipped) and its tokenizer."""
    from data.tokenizer import Tokenizer
    from model import load_checkpoint
    return load_checkpoint(stories_dir), Tokenizer(stories_dir)


@pytest.mark.slow
def test_30_step_rolora_run_lowers_heldout_loss_and_quantizes(tmp_path, capsys, stories):
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

    # the exported merged model (plus its rotation record and tokenizer) is complete on its own and
    # reproduces the run's "after / FP" row exactly through eval.py and the one loader
    import eval as ev
    from eval import load_model
    merged_dir = tmp_path / "run" / "merged"
    merged, tok, _ = load_model(merged_dir)
    assert merged.rotation["seed"] == cfg.seed
    val = [train.tokenize_example(tok, e, cfg.seq_len) for e in train.load_examples("tinystories", "val")][:32]
    loss = train.heldout_loss(merged, val, tok.eos_id, 32, "cpu", torch.autocast("cpu", enabled=False))
    assert loss == rows["after / FP"]["heldout_loss"]
    evaluated = ev.main(["--model", str(merged_dir), "--tasks", "arc_easy", "--limit", "8", "--ppl",
                         "--seq-len", str(cfg.ppl_seq_len), "--ppl-windows", str(cfg.ppl_windows)])
    assert evaluated["tasks"]["arc_easy"] == rows["after / FP"]["tasks"]["arc_easy"]
    assert evaluated["ppl"] == rows["after / FP"]["ppl"]
    from model import load_checkpoint
    with pytest.raises(ValueError, match="rotation.json"):
        load_checkpoint(merged_dir)  # a plain load would silently drop the online Hadamard
    # OUT/quantized reloads with no calibration to the very "after / W4A4" numbers
    quantized, _, _ = load_model(tmp_path / "run" / "quantized")
    loss = train.heldout_loss(quantized, val, tok.eos_id, 32, "cpu", torch.autocast("cpu", enabled=False))
    assert loss == rows["after / W4A4"]["heldout_loss"]
    again = ev.main(["--model", str(tmp_path / "run" / "quantized"), "--tasks", "arc_easy", "--limit", "8"])
    assert again["tasks"]["arc_easy"] == rows["after / W4A4"]["tasks"]["arc_easy"]
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", str(tmp_path / "run" / "quantized"), "--bits", "4"])  # quantizing twice
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.parse_args(["--model", str(merged_dir), "--rotate"])  # rotating twice is refused
    assert "already rotated" in capsys.readouterr().err


@pytest.mark.slow
def test_alpaca_training_loss_covers_the_responses_only(tmp_path, stories):
    """The main job's data: the first step's loss (adapters start as a no-op, B = 0) is the base
    model's mean loss over the response tokens of that step's examples, computed one by one."""
    model, tok = stories
    cfg = quick_config(tmp_path, data="alpaca", seq_len=256, batch_size=4, max_steps=1, val_examples=4)
    results = train.run(cfg)
    raw = train.batch_for_step(0, train.load_examples("alpaca", "train"), cfg.batch_size, cfg.seed)
    assert all(len(tok.encode(e["prompt"])) > 20 for e in raw)  # real prompts, masked
    assert results["history"]["train_loss"][0] == pytest.approx(response_loss(model, tok, raw, cfg.seq_len), rel=1e-5)
    # and the held-out loss of the table: the base model's, over the responses of the first 4 held-out examples
    heldout = response_loss(model, tok, train.load_examples("alpaca", "val")[:4], cfg.seq_len)
    assert results["rows"]["before / FP"]["heldout_loss"] == pytest.approx(heldout, rel=1e-5)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(tmp_path, stories, monkeypatch):
    """--grad-accum 4 (micro-batches of 2) must give the adapters of one batch of 8, also when
    examples have very different response lengths and some prompts fill the whole cutoff."""
    _, tok = stories
    settings = dict(data="alpaca", seq_len=160, batch_size=8, max_steps=3, val_examples=4, save_every=3)
    cut_off = [train.count_targets(ids, n) == 0 for ids, n in first_step_examples(quick_config(tmp_path, **settings), tok)]
    assert any(cut_off) and not all(cut_off)  # the case a per-micro-batch mean turns into NaN
    sizes, real_make_batch = [], train.make_batch

    def recording_make_batch(tokenized, pad_id):
        if torch.is_grad_enabled():  # a training forward (held-out losses run without grad)
            sizes.append(len(tokenized))
        return real_make_batch(tokenized, pad_id)

    monkeypatch.setattr(train, "make_batch", recording_make_batch)
    one = train.run(quick_config(tmp_path / "one", **settings))
    assert sizes == [8] * 3
    sizes.clear()
    accumulated = train.run(quick_config(tmp_path / "acc", grad_accum=4, **settings))
    assert sizes == [2] * 4 * 3  # the flag is not ignored: 4 forwards of 2 examples per step
    assert accumulated["history"]["train_loss"] == pytest.approx(one["history"]["train_loss"], rel=1e-5)
    a, b = final_adapters(tmp_path / "one" / "run"), final_adapters(tmp_path / "acc" / "run")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-4), key


@pytest.mark.slow
def test_qat_trains_on_the_quantized_model_and_merges_into_the_float_one(tmp_path, stories):
    import quant
    model, tok = stories
    cfg = quick_config(tmp_path, qat=True, bits=4, max_steps=4, export=True)
    results = train.run(cfg)
    # the first step's loss is that of the W4A4 model (the quantizers are active in training)
    quantized = quant.quantize_model(copy.deepcopy(model), w_bits=4, a_bits=4, progress=False)
    examples = first_step_examples(cfg, tok)
    assert results["history"]["train_loss"][0] == pytest.approx(reference_loss(quantized, examples), rel=1e-4)
    assert reference_loss(quantized, examples) > reference_loss(model, examples) + 0.05
    # the trained adapters reach the full-precision model that is merged and exported
    rows = results["rows"]
    assert abs(rows["after / FP"]["heldout_loss"] - rows["before / FP"]["heldout_loss"]) > 1e-3
    from model import load_checkpoint
    merged = load_checkpoint(tmp_path / "run" / "merged")
    val = [train.tokenize_example(tok, e, cfg.seq_len) for e in train.load_examples("tinystories", "val")][:32]
    loss = train.heldout_loss(merged, val, tok.eos_id, 32, "cpu", torch.autocast("cpu", enabled=False))
    assert loss == pytest.approx(rows["after / FP"]["heldout_loss"], rel=1e-5)


@pytest.mark.slow
def test_quant_gptq_runs_gptq_on_calibration_from_the_training_data(tmp_path, monkeypatch, stories):
    import quant
    _, tok = stories
    calls, windows = [], []
    real_gptq = quant.gptq_quantize_blocks

    def spy(model, calibration, config, progress=True):
        calls.append((tuple(calibration.shape), config.w_bits))
        windows.append(calibration.clone())
        return real_gptq(model, calibration, config, progress)

    monkeypatch.setattr(quant, "gptq_quantize_blocks", spy)
    common = dict(w_bits=4, a_bits=16, max_steps=2, calib_windows=8, calib_seq_len=64)
    cfg = quick_config(tmp_path / "gptq", w_method="gptq", **common)
    gptq = train.run(cfg)["rows"]
    assert calls == [((8, 64), 4), ((8, 64), 4)]  # before and after fine-tuning
    # every window is 64 consecutive tokens of the tokenized training examples (never the evaluation text)
    stream = torch.tensor([i for e in train.load_examples("tinystories", "train")
                           for i in train.tokenize_example(tok, e, cfg.seq_len)[0]])
    for window in windows[0]:
        starts = (stream[:-63] == window[0]).nonzero().flatten()  # where the window could begin
        assert (stream[starts[:, None] + torch.arange(64)] == window).all(dim=1).any()
    assert torch.equal(windows[0], windows[1])
    rtn = train.run(quick_config(tmp_path / "rtn", w_method="rtn", **common))["rows"]
    assert len(calls) == 2
    for row in ("before / W4A16", "after / W4A16"):  # measured: 1.907 vs 1.941, 1.914 vs 1.925
        print(f"{row}: held-out loss GPTQ {gptq[row]['heldout_loss']:.4f}, RTN {rtn[row]['heldout_loss']:.4f}")
        assert gptq[row]["heldout_loss"] < rtn[row]["heldout_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["input", "weight"])
def test_reslora_variant_trains_reslora_adapters(tmp_path, merge, stories):
    cfg = quick_config(tmp_path, variant="reslora", res_type="middle", pre_num=2, max_steps=4, reslora_merge=merge)
    rows = train.run(cfg)["rows"]
    config = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "RESLORA" and config["reslora"]["res_type"] == "middle"
    assert config["reslora"]["pre_num"] == 2
    assert rows["after / FP"]["heldout_loss"] < rows["before / FP"]["heldout_loss"]
    if merge == "weight":  # needs no training statistics: the saved adapters, merged again, give the same model
        import lora
        model, tok = stories
        merged = lora.merge_lora(lora.load_adapters(copy.deepcopy(model), tmp_path / "run" / "adapters"), "weight")
        val = [train.tokenize_example(tok, e, cfg.seq_len) for e in train.load_examples("tinystories", "val")][:32]
        loss = train.heldout_loss(merged, val, tok.eos_id, 32, "cpu", torch.autocast("cpu", enabled=False))
        assert loss == pytest.approx(rows["after / FP"]["heldout_loss"], rel=1e-5)


@pytest.mark.slow
def test_grad_checkpointing_recomputes_and_changes_no_number(tmp_path, monkeypatch, stories_dir):
    import torch.utils.checkpoint
    calls = {"n": 0}
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(*args, **kwargs):
        if torch.is_grad_enabled():  # training forwards only (evaluations run without grad)
            calls["n"] += 1
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    settings = dict(max_steps=3, save_every=3, dropout=0.1)  # dropout: recomputation must replay the RNG
    plain = train.run(quick_config(tmp_path / "plain", **settings))
    assert calls["n"] == 0
    recomputed = train.run(quick_config(tmp_path / "ckpt", grad_checkpointing=True, **settings))
    assert calls["n"] == 3 * 5  # every block of every training forward (stories260K: 5 blocks)
    assert recomputed["history"]["train_loss"] == pytest.approx(plain["history"]["train_loss"], rel=1e-6)
    a, b = final_adapters(tmp_path / "plain" / "run"), final_adapters(tmp_path / "ckpt" / "run")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=1e-5), key
    # with --qat the model that trains is the quantized copy: that is the one that recomputes
    calls["n"] = 0
    train.run(quick_config(tmp_path / "qat", grad_checkpointing=True, qat=True, bits=4, **settings))
    assert calls["n"] == 3 * 5


@pytest.mark.slow
def run_interrupted_at_step_6(cfg, monkeypatch):
    """train.run(cfg), cut by a KeyboardInterrupt when step 6's batch is drawn (its checkpoints stay)."""
    real_batch_for_step = train.batch_for_step

    def crash_at_step_6(step, *args):
        if step == 6:
            raise KeyboardInterrupt("simulated interruption")
        return real_batch_for_step(step, *args)

    monkeypatch.setattr(train, "batch_for_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.setattr(train, "batch_for_step", real_batch_for_step)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch, stories):
    straight = quick_config(tmp_path / "a", dropout=0.1)  # dropout: the RNG state must be restored too
    expected = train.run(straight)

    run_interrupted_at_step_6(quick_config(tmp_path / "b", dropout=0.1), monkeypatch)
    assert (tmp_path / "b" / "run" / "latest").read_text().strip() == "ckpt-000004"
    resumed = train.run(quick_config(tmp_path / "b", dropout=0.1, resume=True))

    a, b = final_adapters(tmp_path / "a" / "run"), final_adapters(tmp_path / "b" / "run")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU
    assert resumed["history"]["train_loss"] == expected["history"]["train_loss"]
    assert resumed["rows"]["after / FP"] == expected["rows"]["after / FP"]


LEARNED = dict(rotate=True, kind="learned", learn_steps=3, learn_windows=4, learn_seq_len=64, learn_batch_size=2,
               learn_clip_every=2, w_bits=4, a_bits=4, rotate_ov=True)


@pytest.mark.slow
def test_learned_rotation_is_saved_with_the_run_and_resume_reuses_it(tmp_path, monkeypatch, stories):
    straight = quick_config(tmp_path / "a", export=True, **LEARNED)
    expected = train.run(straight)
    record = expected["rotation"]
    assert record["r1"] == "learned" and record["learned"]["r2"] and len(record["learned"]["loss"]) == 3
    assert record["learned"]["quantized_as"] == "W4 RTN MSE clip searched every 2 steps, A4"
    ckpt = tmp_path / "a" / "run" / (tmp_path / "a" / "run" / "latest").read_text().strip()
    learned = checkpoints.load_checkpoint_rotation(tmp_path / "a" / "run")
    assert (ckpt / "rotation.safetensors").is_file() and learned.digest() == record["learned"]["sha256"]
    from eval import load_model
    for saved in ("merged", "quantized"):  # the exported models carry the same matrices
        model, _, _ = load_model(tmp_path / "a" / "run" / saved)
        assert model.rotation == record and torch.equal(model.learned_rotation.r2, learned.r2)

    run_interrupted_at_step_6(quick_config(tmp_path / "b", **LEARNED), monkeypatch)
    run_b = tmp_path / "b" / "run"
    recorded = json.loads((run_b / (run_b / "latest").read_text().strip() / "state.json").read_text())["rotation"]
    assert recorded["learned"]["sha256"] == record["learned"]["sha256"]  # on a CPU: the same matrices again

    def not_again(*args, **kwargs):
        raise AssertionError("--resume learned the rotation again")

    monkeypatch.setattr(train.spinquant, "learn_rotation", not_again)
    resumed = train.run(quick_config(tmp_path / "b", resume=True, **LEARNED))
    assert resumed["rotation"] == recorded  # its learning time included: read back, not learned again
    a, b = final_adapters(tmp_path / "a" / "run"), final_adapters(tmp_path / "b" / "run")
    assert all(torch.equal(a[key], b[key]) for key in a)  # bit-identical on CPU
    assert resumed["history"]["train_loss"] == expected["history"]["train_loss"]
    assert resumed["rows"] == expected["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, stories, bad):
    calls = {"n": 0}
    real_loss = train.summed_token_loss

    def loss_turning_nan(logits, targets):
        loss = real_loss(logits, targets)
        if torch.is_grad_enabled():  # a training step (held-out evaluations run without grad)
            calls["n"] += 1
            if calls["n"] == 7:
                return loss * bad
        return loss

    monkeypatch.setattr(train, "summed_token_loss", loss_turning_nan)
    cfg = quick_config(tmp_path, save_every=3)
    with pytest.raises(train.NonFiniteLoss, match="step 7.*last good checkpoint"):
        train.run(cfg)
    out = tmp_path / "run"
    assert (out / "latest").read_text().strip() == "ckpt-000006"
    adapters = final_adapters(out)
    assert adapters and all(torch.isfinite(t).all() for t in adapters.values())
    # and the run can go on from there
    monkeypatch.setattr(train, "summed_token_loss", real_loss)
    resumed = train.run(quick_config(tmp_path, save_every=3, resume=True))
    assert len(resumed["history"]["train_loss"]) == cfg.max_steps


@pytest.mark.slow
def test_bfloat16_on_cpu_is_bf16_weights_under_autocast_with_fp32_adapters(tmp_path, monkeypatch, stories_dir):
    """--dtype bfloat16 on a CPU works as on CUDA: bf16 base weights, matmuls under bf16 autocast,
    fp32 adapter master weights; the numbers stay close to the fp32 run's."""
    seen = {}
    real_finetune = train.finetune

    def spy(run, model):
        seen["autocast"] = run.autocast
        seen["base"] = model.layers[0].mlp.up_proj.weight.dtype
        seen["adapters"] = {p.dtype for p in model.parameters() if p.requires_grad}
        hook = model.layers[0].mlp.up_proj.register_forward_hook(lambda m, a, y: seen.setdefault("matmul", y.dtype) and None)
        try:
            return real_finetune(run, model)
        finally:
            hook.remove()
    monkeypatch.setattr(train, "finetune", spy)
    fp32 = train.run(quick_config(tmp_path / "fp32", max_steps=4, bits=4))
    assert seen["matmul"] == torch.float32
    seen.clear()
    bf16 = train.run(quick_config(tmp_path / "bf16", max_steps=4, bits=4, dtype="bfloat16"))
    assert isinstance(seen["autocast"], torch.autocast) and seen["autocast"].device == "cpu"
    assert seen["base"] == torch.bfloat16 and seen["adapters"] == {torch.float32}
    assert seen["matmul"] == torch.bfloat16
    for label in ("after / FP", "after / W4A4"):
        assert bf16["rows"][label]["heldout_loss"] == pytest.approx(fp32["rows"][label]["heldout_loss"], rel=0.03)


def test_activation_quantizer_computes_its_grid_in_float32_for_bf16_inputs():
    from quant import ActQuantizer
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    quantizer = ActQuantizer(4, symmetric=False, clip_ratio=0.95)
    out = quantizer(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, quantizer(x.float()).to(torch.bfloat16))  # the fp32 grid, rounded once at the end



def test_a_batch_smaller_than_the_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(train.distributed, "start", lambda device: (0, 4))
    with pytest.raises(ValueError, match="--batch-size=2: fewer examples than the 4 processes"):
        with train.open_run(quick_config(tmp_path, batch_size=2)):
            pass


def test_fsdp_in_one_process_is_refused_naming_torchrun(tmp_path):
    with pytest.raises(ValueError, match="--fsdp: .*torchrun --nproc_per_node"):
        with train.open_run(quick_config(tmp_path, fsdp=True)):
            pass
