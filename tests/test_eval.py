"""eval.py and the data/*/prepare.py it reads: harness-exact scoring, metrics, perplexity, data.

Fast tests use a tiny random model in float64 and a toy word tokenizer; the slow ones parse the
full mirror files and score real items with stories260K and its sentencepiece tokenizer."""
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

import eval as ev
from data.wikitext2.prepare import load_test_text
from helpers import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run best on one thread


class WordTokenizer:
    """GPT-2-like toy: a token is a word with its leading space (" cat"), or a run of spaces.

    Ids come from a fixed hash of the piece into the vocabulary, so the same text always
    gives the same ids, and "x" + " y" tokenizes differently from "x " + "y"."""
    bos_id, eos_id = 1, 2

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def pieces(self, text: str) -> list[str]:
        return re.findall(r" ?[^\s]+|\s+", text)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [3 + sum(ord(c) * 31 ** i for i, c in enumerate(p)) % (self.vocab_size - 3) for p in self.pieces(text)]
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])


def direct_loglikelihood(model, context_ids, continuation_ids) -> float:
    """The definition: one full forward, log-softmax, the continuation tokens' log-probs summed."""
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(tokens)[0].double(), dim=-1)  # (T, vocab)
    start = len(context_ids) - 1  # position p predicts token p + 1
    return sum(logprobs[start + j, t].item() for j, t in enumerate(continuation_ids))


QUESTIONS = [
    ("Question: Which gas do plants take in?\nAnswer:", ["carbon dioxide", "oxygen", "helium gas in jars"]),
    ("Question: What melts ice fastest?\nAnswer: ", ["salt", "sand on a cold day"]),  # trailing space
    ("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "starts pulling up roofing.",
                                         "is holding a cube.", "rips tiles off."]),
]


def question_requests():
    requests, items = [], []
    for context, choices in QUESTIONS:
        items.append(list(range(len(requests), len(requests) + len(choices))))
        requests += [(context, " " + c) for c in choices]
    return requests, items


def test_encode_pair_moves_trailing_space_and_splits_one_encoding():
    tok = WordTokenizer()
    context_ids, continuation_ids = ev.encode_pair(tok, "Answer: ", "salt")
    assert context_ids == tok.encode("Answer:", bos=False)
    assert continuation_ids == tok.encode(" salt", bos=False)  # not ["Answer:", " "] + ["salt"]
    assert context_ids + continuation_ids == tok.encode("Answer: salt", bos=False)
    with_bos, _ = ev.encode_pair(tok, "Answer:", " salt", add_bos=True)
    assert with_bos == [tok.bos_id] + context_ids


@pytest.mark.parametrize("share_prefix", [True, False])
def test_scores_equal_direct_logsoftmax_for_any_batching(share_prefix):
    model = tiny_model(seed=3, dtype=torch.float64)
    tok = WordTokenizer()
    requests, items = question_requests()
    expected = [direct_loglikelihood(model, *ev.encode_pair(tok, c, x)) for c, x in requests]
    for batch_size in (1, 3, 4, 64):  # one row per forward ... everything in one padded batch
        for grouping in (items, None):  # choices grouped by question, or every request alone
            got = ev.loglikelihoods(model, tok, requests, grouping, batch_size=batch_size,
                                    share_prefix=share_prefix, progress=False)
            assert got == pytest.approx(expected, abs=1e-10, rel=0)


def rotated_w4a4kv4_model(seed: int):
    """The model every W4A4 accuracy of the README is scored on, in float64: rotated (R1, R4),
    then weights, activations and the KV cache fake-quantized."""
    import quant
    import rotate
    model = tiny_model(seed=seed, dtype=torch.float64)
    rotate.rotate_model(model, seed=seed)
    return quant.quantize_model(model, w_bits=4, a_bits=4, kv_bits=4, w_clip_search=False, progress=False)


def test_shared_prefix_scores_equal_full_recomputation_on_a_rotated_quantized_model():
    """Sharing the context's KV cache is exact only if every module acts per token: here the
    online Hadamard, the per-token activation quantizers and the per-(head, token) KV quantizer.
    A quantizer whose grid depended on other tokens (per tensor, say) would break it."""
    model = rotated_w4a4kv4_model(seed=7)
    tok = WordTokenizer()
    requests, items = question_requests()
    expected = [direct_loglikelihood(model, *ev.encode_pair(tok, c, x)) for c, x in requests]
    for batch_size in (1, 4, 64):
        shared = ev.loglikelihoods(model, tok, requests, items, batch_size=batch_size, share_prefix=True,
                                   progress=False)
        assert shared == pytest.approx(expected, abs=1e-9, rel=0)
    # and the quantized model is really another function than the float one
    float_scores = ev.loglikelihoods(tiny_model(seed=7, dtype=torch.float64), tok, requests, items, progress=False)
    assert max(abs(a - b) for a, b in zip(float_scores, expected)) > 1e-3


@pytest.mark.slow  # compiles a block's forward: ~15 s on 2 busy cores with a cold inductor cache
def test_compiled_scores_equal_eager_on_a_rotated_w4a4_model():
    """eval.py --compile scores the same: a rotated W4A4 model with compiled blocks against the eager one,
    with the shared prefix (whose KV-cache forwards stay eager: no graph) and without (one graph for
    batches of every length). In float64, and without KV4: a value on the KV grid can lie exactly on a
    rounding tie of the next activation grid (o_proj's), and a fused reduction's last-bit difference then
    moves it by a whole step (measured: 0.32 in one log-likelihood, in float64 as in float32)."""
    import copy
    import quant
    import rotate
    from extras.compile import compile_blocks
    from torch._dynamo.utils import counters
    model = tiny_model(seed=7, dtype=torch.float64)
    rotate.rotate_model(model, seed=7)
    quant.quantize_model(model, w_bits=4, a_bits=4, w_clip_search=False, progress=False)
    compiled = compile_blocks(copy.deepcopy(model))
    tok = WordTokenizer()
    requests, items = question_requests()
    for share_prefix, new_graphs in ((True, 0), (False, 1)):
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        got = ev.loglikelihoods(compiled, tok, requests, items, batch_size=4, share_prefix=share_prefix, progress=False)
        assert counters["stats"]["unique_graphs"] - graphs == new_graphs, share_prefix
        assert sum(counters["graph_break"].values()) == breaks
        expected = ev.loglikelihoods(model, tok, requests, items, batch_size=4, share_prefix=share_prefix,
                                     progress=False)
        assert got == pytest.approx(expected, abs=1e-10, rel=0)


def test_compile_flag_compiles_the_model_as_it_is_scored(monkeypatch):
    """--compile compiles the model main() scores, once it is rotated and quantized."""
    import quant
    import rotate
    monkeypatch.setattr(ev, "load_model", lambda name, dtype=torch.float32, **kwargs: (tiny_model(seed=9), WordTokenizer(),
                                                                                       Path(name)))
    scored, compiled = [], []
    monkeypatch.setattr(ev, "evaluate_tasks", lambda model, *args, **kwargs: scored.append(model) or {"tasks": {}})
    monkeypatch.setattr(ev, "compile_blocks", lambda model: compiled.append(
        (model, isinstance(model.layers[0].mlp.down_proj, quant.QuantLinear),
         isinstance(model.layers[0].mlp.down_input_transform, rotate.OnlineHadamard))) or model)
    ev.main(["--model", "tiny", "--tasks", "piqa", "--rotate", "--bits", "4", "--no-w-clip-search"])
    assert not compiled
    ev.main(["--model", "tiny", "--tasks", "piqa", "--rotate", "--bits", "4", "--no-w-clip-search", "--compile"])
    assert compiled == [(scored[-1], True, True)]


def test_long_context_is_truncated_from_the_left_as_the_harness_does():
    """A context longer than the model's window keeps its LAST tokens: the ones next to the
    continuation. Scores equal a direct forward over the last max_len + 1 tokens."""
    max_len = 24
    model = tiny_model(seed=8, dtype=torch.float64, max_position_embeddings=max_len)
    tok = WordTokenizer()
    context = "Question: " + " ".join(f"w{i}" for i in range(40)) + "\nAnswer:"
    requests = [(context, " a short answer"), (context, " another answer here")]
    context_ids = tok.encode(context, bos=False)
    assert len(context_ids) > max_len
    expected = []
    for c, x in requests:
        ctx, cont = ev.encode_pair(tok, c, x)
        kept = (ctx + cont)[-(max_len + 1):]  # the model reads kept[:-1]: exactly max_len positions
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([kept[:-1]]))[0].double(), dim=-1)
        first = len(kept) - 1 - len(cont)  # position p predicts token p + 1
        expected.append(sum(logprobs[first + j, t].item() for j, t in enumerate(cont)))
    for share_prefix in (True, False):
        got = ev.loglikelihoods(model, tok, requests, [[0, 1]], share_prefix=share_prefix, progress=False)
        assert got == pytest.approx(expected, abs=1e-10, rel=0)
    row = ev.make_row(0, *ev.encode_pair(tok, *requests[0]), max_len)
    whole = context_ids + tok.encode(" a short answer", bos=False)
    assert row.inputs == whole[-(max_len + 1):-1]  # the last max_len + 1 tokens, minus the final target
    with pytest.raises(ValueError, match="exceeds the model's 24"):
        ev.make_row(0, context_ids, list(range(3, 3 + max_len + 1)), max_len)


def test_right_padding_does_not_change_a_score():
    """A short request batched with a much longer one scores exactly as it does alone."""
    model = tiny_model(seed=4, dtype=torch.float64)
    tok = WordTokenizer()
    short = ("Question: Hot or cold?\nAnswer:", " hot")
    long = ("Question: " + " ".join(f"w{i}" for i in range(60)) + "\nAnswer:", " a long answer of many words")
    alone = ev.loglikelihoods(model, tok, [short], progress=False)[0]
    padded = ev.loglikelihoods(model, tok, [short, long], batch_size=2, share_prefix=False, progress=False)[0]
    assert padded == pytest.approx(alone, abs=1e-10, rel=0)


def test_context_is_shared_only_up_to_the_first_scored_token():
    tok = WordTokenizer()
    rows = [ev.make_row(i, *ev.encode_pair(tok, "Q: a b c\nA:", x), 256) for i, x in enumerate([" yes", " no"])]
    n_context = len(tok.encode("Q: a b c\nA:", bos=False))
    assert ev.shared_prefix_length(rows) == n_context - 1  # the last context token predicts the answer
    same = [ev.make_row(i, *ev.encode_pair(tok, "Q: a\nA:", " same answer"), 256) for i in range(2)]
    assert ev.shared_prefix_length(same) == len(tok.encode("Q: a\nA:", bos=False)) - 1


def test_acc_norm_divides_by_characters_of_the_choice():
    records = [{"choices": ["no", "a very long answer"], "gold": 1}]
    # sums -2.0 vs -9.0: acc picks 0; per character -1.0 vs -0.5: acc_norm picks 1
    m = ev.task_metrics("arc_easy", records, [[-2.0, -9.0]])
    assert (m["acc"], m["acc_norm"]) == (0.0, 1.0)
    # The length is the choice's own characters, not those of " " + choice: here
    # -3.3/2 = -1.65 < -8/5 = -1.6 picks 1, while -3.3/3 = -1.1 > -8/6 = -1.33 would pick 0.
    records = [{"choices": ["ab", "abcde"], "gold": 1}]
    assert ev.task_metrics("piqa", records, [[-3.3, -8.0]])["acc_norm"] == 1.0
    assert "acc_norm" not in ev.task_metrics("winogrande", records, [[-3.3, -8.0]])  # acc only, as the harness


def test_stderr_is_the_harness_sample_stderr():
    records = [{"choices": ["a", "b"], "gold": 0}] * 10
    scores = [[0.0, -1.0]] * 7 + [[-1.0, 0.0]] * 3  # 7 of 10 right
    m = ev.task_metrics("boolq", records, scores)
    assert m["acc"] == pytest.approx(0.7)
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.7 * 0.3 / 9))
    assert m["metric"] == "acc" and ev.task_metrics("hellaswag", records, scores)["metric"] == "acc_norm"


def test_average_stderr_combines_the_tasks_stderrs(monkeypatch):
    """The seven-task average of independent tasks: mean of the metrics, stderr sqrt(sum se^2) / n."""
    metrics = {"piqa": (0.6, 0.03), "arc_easy": (0.5, 0.04), "siqa": (0.9, 0.5)}  # SIQA is not averaged
    monkeypatch.setattr(ev, "evaluate_task", lambda model, tok, task, *a: {
        "metric": "acc_norm" if task != "siqa" else "acc", "acc": 0.0, "acc_norm": metrics[task][0],
        f"{'acc_norm' if task != 'siqa' else 'acc'}_stderr": metrics[task][1], "n": 100})
    out = ev.evaluate_tasks(torch.nn.Linear(1, 1), None, ["piqa", "arc_easy", "siqa"])
    assert out["average_tasks"] == ["piqa", "arc_easy"]
    assert out["average"] == pytest.approx(0.55)
    assert out["average_stderr"] == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2) / 2)


def test_ties_go_to_the_first_choice_like_numpy_argmax():
    records = [{"choices": ["x", "y"], "gold": 1}]
    assert ev.task_metrics("piqa", records, [[-1.0, -1.0]])["acc"] == 0.0


def test_winogrande_scores_only_the_shared_suffix():
    record = {"task": "winogrande", "id": "w", "contexts": ["The cup beat the pot because the cup",
                                                            "The cup beat the pot because the pot"],
              "suffix": "was hotter.", "choices": ["the cup", "the pot"], "gold": 0}
    requests = ev.build_requests(record)
    assert requests == [(record["contexts"][0], " was hotter."), (record["contexts"][1], " was hotter.")]
    model = tiny_model(seed=5, dtype=torch.float64)
    tok = WordTokenizer()
    got = ev.loglikelihoods(model, tok, requests, [[0, 1]], progress=False)
    for (context, suffix), score in zip(requests, got):
        context_ids = tok.encode(context, bos=False)
        suffix_ids = tok.encode(context + suffix, bos=False)[len(context_ids):]
        assert len(suffix_ids) == 2  # " was", " hotter."
        assert score == pytest.approx(direct_loglikelihood(model, context_ids, suffix_ids), abs=1e-10)
        # scoring the option too would add its tokens' log-probs: a different number
        option_ids = context_ids[-2:]
        assert score != pytest.approx(direct_loglikelihood(model, context_ids[:-2], option_ids + suffix_ids))


def test_perplexity_equals_hand_computation():
    model = tiny_model(seed=6, dtype=torch.float64)
    tok = WordTokenizer()
    text = " ".join(f"word{i % 17}" for i in range(45))  # 45 words + BOS = 46 tokens
    ids = tok.encode(text, bos=True)
    seq_len = 8
    nll, count = 0.0, 0
    for w in range(len(ids) // seq_len):  # 5 full windows, the last 6 tokens dropped
        window = ids[w * seq_len:(w + 1) * seq_len]
        with torch.no_grad():
            logits = model(torch.tensor([window]))[0]
        for p in range(seq_len - 1):
            row = logits[p].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            nll += log_z - row[window[p + 1]]
            count += 1
    assert count == 5 * 7
    got = ev.perplexity(model, tok, text, seq_len=seq_len, progress=False)
    # model() returns float32 logits and cross_entropy sums in float32: agreement to ~1e-7
    assert got == pytest.approx(math.exp(nll / count), rel=1e-6)
    assert ev.perplexity(model, tok, text, seq_len=seq_len, limit_windows=2, progress=False) != pytest.approx(got)
    with pytest.raises(ValueError, match="shorter than one window"):
        ev.perplexity(model, tok, "too short", seq_len=seq_len, progress=False)


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task 'hellaswag2'.*known tasks: boolq"):
        ev.load_task("hellaswag2")


@pytest.mark.parametrize("flags,message", [
    (["--tasks", "arc"], "unknown task 'arc'"),
    (["--bits", "1"], "--bits=1 must be an integer from 2 to 16"),
    (["--kv-bits", "17"], "--kv-bits=17 must be an integer from 2 to 16"),
    (["--seq-len", "0"], "--seq-len=0: must be at least 2"),
    (["--limit", "-3"], "--limit=-3: must be at least 1 (0 or none: all)"),
    (["--batch-size", "0"], "--batch-size=0"),
    (["--calib-windows", "0"], "--calib-windows=0"),
    (["--calibration", "/no/such/file.json"], "--calibration /no/such/file.json: no such file"),
    (["--dtype", "float16"], "--dtype='float16': must be one of float32, bfloat16, float64"),
    (["--threads", "0"], "--threads=0: must be at least 1"),
    (["--ppl-windows", "-1"], "--ppl-windows=-1: must be at least 1 (0 or none: all)"),
    (["--a-clip-ratio", "0"], "--a-clip-ratio=0.0: must be in (0, 1]"),
    (["--quant", "awq"], "--w-method"),  # --quant is an alias of --w-method
])
def test_bad_flags_are_one_line_errors_before_anything_loads(flags, message, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(ev, "load_model", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", "unused"] + flags)
    assert exit_info.value.code == 2  # argparse's usage error
    assert message in capsys.readouterr().err.strip().splitlines()[-1]  # one line: "eval.py: error: ..."


@pytest.mark.parametrize("record_file, flags, message", [
    ("quantization.json", ["--bits", "4"], "is already quantized"),
    ("quantization.json", ["--kv-bits", "8"], "is already quantized"),
    ("rotation.json", ["--rotate"], "is already rotated"),
])
def test_flags_the_checkpoint_already_applied_are_errors_before_loading(record_file, flags, message, tmp_path,
                                                                         monkeypatch, capsys):
    """A quantized (rotated) checkpoint loads quantized (rotated): quantizing (rotating) it again
    would score another network, so the flag is refused before the model loads; without the
    flag the same checkpoint gets past the checks and loads."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded")
    monkeypatch.setattr(ev, "load_model", must_not_load)
    (tmp_path / record_file).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--model", str(tmp_path)] + flags)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last_line and str(tmp_path / record_file) in last_line
    with pytest.raises(AssertionError, match="loaded"):
        ev.main(["--model", str(tmp_path)])


def test_malformed_gptq_calibration_file_is_an_error_before_loading(tmp_path, monkeypatch, capsys):
    """GPTQ reads --calibration after the model has loaded; a record it cannot use is refused
    before, in one line naming the flag, the file and the record. A good file gets past the checks."""
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded")
    monkeypatch.setattr(ev, "load_model", must_not_load)
    calibration = tmp_path / "calibration.json"
    flags = ["--model", "unused", "--bits", "4", "--quant", "gptq", "--calibration", str(calibration)]
    calibration.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Red."}, "Name a fruit."]))
    with pytest.raises(SystemExit) as exit_info:
        ev.main(flags)
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--calibration: {calibration} record 1: expected a JSON object, got str" in last_line
    calibration.write_text(json.dumps([{"instruction": "Name a colour.", "output": "Red."}]))
    with pytest.raises(AssertionError, match="loaded"):
        ev.main(flags)


def test_main_scores_the_model_its_rotate_seed_and_bits_flags_describe(monkeypatch, capsys):
    """The network main() evaluates is the loaded one rotated (--rotate, --seed) and then W/A
    quantized (--bits): the same function as rotate.rotate_model and quant.quantize_model
    applied by hand. A main() that dropped a step (or a flag) on the way scores another network."""
    import quant
    import rotate
    tok = WordTokenizer()
    monkeypatch.setattr(ev, "load_model",
                        lambda name, dtype=torch.float32, **kwargs: (tiny_model(seed=9, dtype=dtype), tok, Path(name)))
    scored = []
    monkeypatch.setattr(ev, "evaluate_tasks",
                        lambda model, *args, **kwargs: scored.append(model) or {"tasks": {}, "average": None})
    idx = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(0))

    def by_hand(rotated: bool, bits: int | None):
        model = tiny_model(seed=9)
        if rotated:
            rotate.rotate_model(model, seed=5)
        if bits:
            quant.quantize_model(model, w_bits=bits, a_bits=bits, w_clip_search=False, progress=False)
        with torch.no_grad():
            return model(idx)

    logits = {}
    for flags, rotated, bits in [([], False, None), (["--rotate"], True, None),
                                 (["--bits", "4"], False, 4), (["--rotate", "--bits", "4"], True, 4)]:
        ev.main(["--model", "tiny", "--tasks", "piqa", "--seed", "5", "--no-w-clip-search"] + flags)
        model = scored[-1]
        assert isinstance(model.layers[0].mlp.down_input_transform, rotate.OnlineHadamard) == rotated, flags
        linears = [m for m in model.layers.modules() if isinstance(m, quant.QuantLinear)]
        assert len(linears) == (7 * len(model.layers) if bits else 0), flags
        assert all(m.input_quantizer.bits == bits for m in linears), flags  # A4, not only W4
        with torch.no_grad():
            logits[rotated, bits] = model(idx)
        torch.testing.assert_close(logits[rotated, bits], by_hand(rotated, bits), rtol=0, atol=1e-6)
    # the four networks really differ: W4A4 costs something, and what it costs depends on the rotation
    assert (logits[False, 4] - logits[False, None]).abs().max() > 1e-2
    assert (logits[True, 4] - logits[False, 4]).abs().max() > 1e-2


def test_zero_perplexity_windows_means_all():
    assert ev.parse_args(["--model", "m", "--ppl-windows", "0"]).ppl_windows is None
    assert ev.parse_args(["--model", "m", "--ppl-windows", "3"]).ppl_windows == 3


def test_empty_dataset_file_is_a_clear_error(tmp_path):
    (tmp_path / "commonsense").mkdir()
    (tmp_path / "commonsense" / "boolq.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"boolq\.jsonl: no records"):
        ev.load_task("boolq", data_dir=tmp_path)


@pytest.mark.parametrize("choices, gold", [(["no", "yes"], 2), (["no", "yes"], -1), (["only one"], 0)])
def test_prepared_record_with_a_gold_outside_its_choices_is_a_clear_error(choices, gold, tmp_path):
    """A gold index that names no choice would be scored as always wrong (or, negative, as the
    last choice): the record is refused, by file and id, before anything is scored."""
    good = {"task": "piqa", "id": "piqa-0", "context": "Question: q\nAnswer:", "choices": ["a", "b"], "gold": 1}
    bad = dict(good, id="piqa-1", choices=choices, gold=gold)
    (tmp_path / "commonsense").mkdir()
    path = tmp_path / "commonsense" / "piqa.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    message = f"{path}: record piqa-1 has {len(choices)} choices and gold {gold}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ev.load_task("piqa", data_dir=tmp_path)
    path.write_text(json.dumps(good) + "\n")
    assert ev.load_task("piqa", data_dir=tmp_path) == [good]


@pytest.mark.parametrize("task", ["piqa", "hellaswag"])
def test_missing_mirror_file_is_a_clear_error(task, tmp_path, monkeypatch):
    monkeypatch.setenv("ROLORA_MIRROR", str(tmp_path / "empty_mirror"))
    (tmp_path / "empty_mirror").mkdir()
    expected = "piqa_test.json" if task == "piqa" else "hellaswag_val_full.txt.bz2"
    with pytest.raises(FileNotFoundError, match=f"{expected} not found in the mirror"):
        ev.load_task(task, data_dir=tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="wiki.test.raw not found in the mirror"):
        load_test_text(tmp_path / "data" / "wikitext2")


# -----------------------------------------------------------------------------
# Slow: the full mirror files, and real items scored with stories260K

MIRROR = Path(os.environ.get("ROLORA_MIRROR", "/nonexistent"))
EXPECTED_CHOICES = {"boolq": {2}, "piqa": {2}, "siqa": {3}, "winogrande": {2}, "arc_easy": {3, 4, 5},
                    "arc_challenge": {3, 4, 5}, "openbookqa": {4}, "hellaswag": {4}}
EXPECTED_COUNTS = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "winogrande": 1267, "arc_easy": 2376,
                   "arc_challenge": 1172, "openbookqa": 500, "hellaswag": 10042}


def llm_adapters_instruction(record: dict) -> str:
    """Render a prepared record back into the LLM-Adapters instruction it was parsed from."""
    task, choices = record["task"], record["choices"]
    if task == "boolq":
        question = record["context"].removeprefix("Question: ").removesuffix("?\nAnswer:")
        return f"Please answer the following question with true or false, question: {question}?\n\nAnswer format: true/false"
    if task == "piqa":
        goal = record["context"].removeprefix("Question: ").removesuffix("\nAnswer:")
        return (f"Please choose the correct solution to the question: {goal}\n\nSolution1: {choices[0]}\n\n"
                f"Solution2: {choices[1]}\n\nAnswer format: solution1/solution2")
    if task == "winogrande":
        sentence = record["contexts"][0][:-len(choices[0])] + "_ " + record["suffix"]
        return ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                f"{sentence}\n\nOption1: {choices[0]} Option2: {choices[1]} Answer format: option1/option2")
    question = {"siqa": lambda c: c.removeprefix("Q: ").removesuffix("\nA:"),
                "openbookqa": lambda c: c}.get(task, lambda c: c.removeprefix("Question: ").removesuffix("\nAnswer:"))
    options = " ".join(f"Answer{k + 1}: {c}" for k, c in enumerate(choices))
    fmt = "/".join(f"answer{k + 1}" for k in range(len(choices)))
    return (f"Please choose the correct answer to the question: {question(record['context'])}\n\n{options}"
            f"\n\nAnswer format: {fmt}")


@pytest.mark.slow
def test_every_mirror_record_parses(tmp_path):
    """All records of the full files: counts, choice counts, gold in range, and a round trip:
    rendering the parsed record again gives back the raw instruction, character for character."""
    if not MIRROR.is_dir():
        pytest.skip("no ROLORA_MIRROR")
    from data.commonsense import prepare as commonsense
    paths = commonsense.prepare(tmp_path)
    from data.hellaswag import prepare as hellaswag
    paths["hellaswag"] = hellaswag.prepare(tmp_path)
    assert set(paths) == set(EXPECTED_COUNTS)
    for task, path in paths.items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == EXPECTED_COUNTS[task], task
        assert len({r["id"] for r in records}) == len(records)
        golds = [r["gold"] for r in records]
        assert all(0 <= g < len(r["choices"]) for g, r in zip(golds, records)), task
        assert {len(r["choices"]) for r in records} <= EXPECTED_CHOICES[task], task
        assert set(golds) >= set(range(min(EXPECTED_CHOICES[task]))), task  # no constant gold
        assert all(c.strip() for r in records for c in r["choices"]), task
        if task == "hellaswag":
            continue
        raw_file = MIRROR / "data" / "commonsense" / f"{commonsense.TASK_FILES[task][0]}_test.json"
        for r, original in zip(records, json.loads(raw_file.read_text())):
            expected = original["instruction"]
            if task == "winogrande":  # the harness strips the text after the blank
                expected = re.sub(r"_\s*(.*?)\s*\n\nOption1", r"_ \1\n\nOption1", expected, flags=re.S)
            assert llm_adapters_instruction(r) == expected, r["id"]


@pytest.mark.slow
def test_hellaswag_context_restores_the_harness_capital(tmp_path):
    if not MIRROR.is_dir():
        pytest.skip("no ROLORA_MIRROR")
    from data.hellaswag import prepare as hellaswag
    records = [json.loads(x) for x in hellaswag.prepare(tmp_path).read_text().splitlines()]
    lines = hellaswag.read_text(MIRROR / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2").split("\n")
    assert records[0]["context"] == "Roof shingle removal: A man is sitting on a roof. He"  # "he".capitalize()
    assert records[0]["choices"] == lines[2:6] and records[0]["gold"] == int(lines[1])
    changed = 0
    for i, r in enumerate(records):
        raw = lines[6 * i]
        if r["context"] != raw:  # only the case of one letter, ctx_b's first, may change
            changed += 1
            diff = [j for j, (a, b) in enumerate(zip(raw, r["context"])) if a != b]
            assert len(diff) == 1 and raw[diff[0]].upper() == r["context"][diff[0]], r["id"]
        assert r["choices"] == lines[6 * i + 2:6 * i + 6]
    activitynet = sum(not lines[6 * i].split(": ", 1)[1].startswith("How to") for i in range(len(records)))
    assert 0.9 * activitynet < changed <= activitynet  # WikiHow contexts (empty ctx_b) untouched


@pytest.mark.slow
def test_real_items_score_as_direct_logsoftmax(stories_dir):
    """stories260K in float64 with its sentencepiece tokenizer on real items of four tasks."""
    from data.tokenizer import Tokenizer
    from model import load_checkpoint
    model, tok = load_checkpoint(stories_dir, dtype=torch.float64), Tokenizer(stories_dir)
    requests, items = [], []
    for task in ("arc_challenge", "winogrande", "boolq", "hellaswag"):
        for record in ev.load_task(task)[:2]:
            reqs = ev.build_requests(record)
            items.append(list(range(len(requests), len(requests) + len(reqs))))
            requests += reqs
    expected = []
    for context, continuation in requests:
        context_ids, continuation_ids = ev.encode_pair(tok, context, continuation)
        assert context_ids + continuation_ids == tok.encode(context + continuation, bos=False)
        expected.append(direct_loglikelihood(model, context_ids, continuation_ids))
    for batch_size, share in ((1, False), (5, True), (64, True), (64, False)):
        got = ev.loglikelihoods(model, tok, requests, items, batch_size, share, progress=False)
        assert got == pytest.approx(expected, abs=1e-9, rel=0)


@pytest.mark.slow
def test_command_line_writes_the_json(stories_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    ev.main(["--model", str(stories_dir), "--tasks", "boolq,arc_easy,winogrande", "--limit", "4",
             "--ppl", "--seq-len", "128", "--ppl-windows", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["tasks"]) == {"boolq", "arc_easy", "winogrande"}
    for name, m in result["tasks"].items():
        assert m["n"] == 4 and 0 <= m["acc"] <= 1
        assert ("acc_norm" in m) == (name == "arc_easy")
    reported = [result["tasks"][t][result["tasks"][t]["metric"]] for t in ("boolq", "arc_easy", "winogrande")]
    assert result["average"] == pytest.approx(sum(reported) / 3)
    assert result["ppl"] > 1 and result["ppl_seq_len"] == 128
    printed = capsys.readouterr().out
    assert "no passage" in printed and "| boolq * |" in printed


@pytest.mark.slow
def test_rotate_and_quantize_flags_reach_the_model(stories_dir, monkeypatch):
    """--rotate really rotates (the weights change, the online Hadamard is in place, the function
    does not change), and --bits 4 quantizes a different network with and without it."""
    rotate = pytest.importorskip("rotate")
    common = ["--model", str(stories_dir), "--tasks", "arc_easy,piqa", "--limit", "4"]
    idx = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))

    def prepared(*flags):
        model, _, _ = ev.load_and_quantize(ev.parse_args(common + list(flags)))
        with torch.no_grad():
            return model, model(idx)

    plain, plain_logits = prepared()
    rotated, rotated_logits = prepared("--rotate")
    assert isinstance(rotated.layers[0].mlp.down_input_transform, rotate.OnlineHadamard)
    assert rotated.rotation["seed"] == 0
    assert not torch.allclose(rotated.layers[0].self_attn.q_proj.weight, plain.layers[0].self_attn.q_proj.weight)
    assert (rotated_logits - plain_logits).abs().max() < 1e-4  # rotation is exact (fp32 rounding)

    args = ev.parse_args(common + ["--rotate", "--bits", "4"])
    assert (args.quant.w_bits, args.quant.a_bits, args.quant.kv_bits) == (4, 4, 16)
    quantized, quantized_logits = prepared("--rotate", "--bits", "4")
    linears = [m for m in quantized.layers.modules() if type(m).__name__ == "QuantLinear"]
    assert len(linears) == 7 * len(quantized.layers)
    assert all(m.input_quantizer.bits == 4 for m in linears)  # --bits 4 is W4 *and* A4
    _, unrotated_quantized_logits = prepared("--bits", "4")
    # W4A4 costs something, and what it costs depends on the rotation
    assert (quantized_logits - plain_logits).abs().max() > 1e-2
    assert (quantized_logits - unrotated_quantized_logits).abs().max() > 1e-2
    # the whole command runs, scores the rotated model, and rotation alone leaves every accuracy as it was
    scored = []
    evaluate_tasks = ev.evaluate_tasks
    monkeypatch.setattr(ev, "evaluate_tasks",
                        lambda model, *a, **k: scored.append(model) or evaluate_tasks(model, *a, **k))
    plain_results, rotated_results = ev.main(common), ev.main(common + ["--rotate"])
    assert [isinstance(m.layers[0].mlp.down_input_transform, rotate.OnlineHadamard) for m in scored] == [False, True]
    for task in ("arc_easy", "piqa"):
        assert rotated_results["tasks"][task]["acc_norm"] == plain_results["tasks"][task]["acc_norm"]


def test_batches_cover_every_item_once_in_order():
    groups = [[ev.Row(0, list(range(n)), [0])] * k for n, k in [(90, 4), (80, 4), (30, 2), (29, 5), (5, 3), (4, 1)]]
    prefix_lens = [60, 10, 25, 20, 3, 0]
    for batch_size in (1, 4, 8, 64):
        batches = list(ev._batches(groups, prefix_lens, batch_size, min_tokens=50))
        assert [g for _, b in batches for g in b] == groups
        for prefix, batch in batches:
            assert prefix == min(prefix_lens[groups.index(g)] for g in batch)
            assert len(batch) == 1 or sum(len(g) for g in batch) <= batch_size
    # with room for everything, the waste bound still splits the 90-token items from the short ones
    assert len(list(ev._batches(groups, prefix_lens, 64, min_tokens=50))) > 1
