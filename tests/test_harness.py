"""The lm-evaluation-harness adapter (extras/harness.py: harness_model_class, registered as "rolora"):
the harness, through it, scores exactly as eval.py does. lm_eval is optional: eval.py and
extras/harness.py import without it, and the tests that need it skip when it is missing.

The harness reads local files only: each test writes its task yaml and data into tmp_path."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import eval as ev
from extras import harness
from helpers import ROOT

needs_harness = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="optional package lm_eval not installed")
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big red ball.")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_eval_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"  # as if it were not installed
            "import eval, extras.harness\n"
            "try:\n    extras.harness.harness_model_class()\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "pip install lm_eval" in out.stdout


# -----------------------------------------------------------------------------
# Slow: stories260K through the harness


@pytest.fixture(scope="module")
def stories(stories_dir):
    """(model, tokenizer) of stories260K in float32, as the harness's pretrained= loads it."""
    from eval import load_model
    model, tokenizer, _ = load_model(stories_dir)
    return model.eval(), tokenizer


def local_tasks(folder):
    """The harness's task index of `folder` alone: indexing its own thousands of task yamls as well
    costs tens of seconds and none of them is used here (the command line test pays it once)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=str(folder), include_defaults=False)


def request(kind, *args):
    from lm_eval.api.instance import Instance
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def write_task(folder, name, records, body):
    """A local task: `records` as JSON lines, read by the harness's dataset_path: json."""
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n"
                                         f"  data_files:\n    test: {folder / name}.jsonl\n"
                                         f"  cache_dir: {folder / 'hf_cache'}\ntest_split: test\n" + body)


ARC_YAML = """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def arc_task(tmp_path_factory):
    """ARC-Easy's first 20 prepared records as a harness task yaml (arc_easy.yaml's metrics)."""
    folder = tmp_path_factory.mktemp("tasks")
    records = ev.load_task("arc_easy")[:20]
    write_task(folder, "arc_easy_local", records, ARC_YAML)
    return folder, records


@needs_harness
@pytest.mark.slow
def test_harness_scores_arc_easy_as_eval_py(stories, stories_dir, arc_task):
    """simple_evaluate(model="rolora", model_args="pretrained=DIR") on local ARC-Easy items: the
    requests the harness builds, the log-likelihood of every choice, acc and acc_norm are eval.py's."""
    import lm_eval
    from extras.harness import HarnessModel  # the lazy name, and the class the registry hands out
    assert lm_eval.api.registry.get_model("rolora") is HarnessModel is harness.harness_model_class()
    folder, records = arc_task
    device = "cpu" if torch.cuda.is_available() else "cuda:0"  # the command line's default: falls back to cpu
    out = lm_eval.simple_evaluate(model="rolora", model_args=f"pretrained={stories_dir}", tasks=["arc_easy_local"],
                                  device=device, task_manager=local_tasks(folder), log_samples=True)
    samples = sorted(out["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
    assert [[tuple(a) for a in s["arguments"]] for s in samples] == [ev.build_requests(r) for r in records]
    got = [[ll for ll, _ in s["filtered_resps"]] for s in samples]

    model, tokenizer = stories
    requests, items = [], []  # as evaluate_task builds them
    for r in records:
        items.append(list(range(len(requests), len(requests) + len(r["choices"]))))
        requests += ev.build_requests(r)
    flat = ev.loglikelihoods(model, tokenizer, requests, items, progress=False)
    expected = [[flat[i] for i in item] for item in items]
    diff = max(abs(a - b) for g, e in zip(got, expected) for a, b in zip(g, e))
    assert diff < 1e-6
    ours = ev.evaluate_task(model, tokenizer, "arc_easy", records=records, progress=False)
    theirs = out["results"]["arc_easy_local"]
    print(f"\nper-choice max |harness - eval.py| {diff:.2e}; harness acc {theirs['acc,none']} acc_norm "
          f"{theirs['acc_norm,none']}; eval.py acc {ours['acc']} acc_norm {ours['acc_norm']}")
    assert theirs["acc,none"] == ours["acc"] and theirs["acc_norm,none"] == ours["acc_norm"]
    assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"])
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # the two metrics really differ here


@needs_harness
@pytest.mark.slow
def test_documented_command_line_runs_the_harness(stories_dir, arc_task, tmp_path):
    """The command of extras/harness.py's docstring (and the README), as a user types it."""
    folder, records = arc_task
    code = "import extras.harness as h, lm_eval.__main__ as m; h.harness_model_class(); m.cli_evaluate()"
    subprocess.run([sys.executable, "-c", code, "--model", "rolora", "--model_args", f"pretrained={stories_dir}",
                    "--tasks", "arc_easy_local", "--include_path", str(folder), "--device", "cpu",
                    "--batch_size", "32", "--output_path", str(tmp_path / "out")],
                   cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    [path] = (tmp_path / "out").rglob("results_*.json")
    result = json.loads(path.read_text())["results"]["arc_easy_local"]
    from eval import load_model
    model, tokenizer, _ = load_model(stories_dir)
    ours = ev.evaluate_task(model, tokenizer, "arc_easy", records=records, progress=False)
    assert (result["acc,none"], result["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])


def direct_scores(model, context_ids, continuation_ids) -> tuple[float, bool]:
    """The definition: one forward, the continuation's log-probs summed, and whether the argmax
    at each of its positions is its token (the harness's is_greedy)."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context_ids + continuation_ids]))[0].double(), dim=-1)
    rows = logprobs[len(context_ids) - 1:-1]  # position p predicts token p + 1
    targets = torch.tensor(continuation_ids)
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


@needs_harness
@pytest.mark.slow
@pytest.mark.parametrize("add_bos", [False, True])
def test_loglikelihood_and_is_greedy_equal_direct_computation(stories, add_bos):
    model, tokenizer = stories
    lm = harness.harness_model_class()(model=model, tokenizer=tokenizer, add_bos_token=add_bos, batch_size=4)
    pairs = []
    for cut in (20, 30, 50, 70, 95):  # continuations the model would generate, and others
        context = STORY[:cut]
        ids = tokenizer.encode(context, bos=add_bos)
        greedy = model.generate(torch.tensor([ids]), 3)[0].tolist()
        pairs += [(context, tokenizer.decode(greedy)[len(tokenizer.decode(ids)):]), (context, STORY[cut:cut + 12])]
    pairs.append(("", " Once upon a time"))  # empty context: the prefix token (BOS) conditions it
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    expected = [direct_scores(model, *ev.encode_pair(tokenizer, c, x, add_bos)) for c, x in pairs]
    assert [g for _, g in got] == [g for _, g in expected]
    assert {g for _, g in expected} == {True, False}
    # float32 logits, batched and padded against one forward: the summation order differs, so a
    # long continuation (-38.5) moves by ~2e-5; 2e-6 relative still catches any real offset
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], rel=2e-6, abs=1e-5)


ROLLING_YAML = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@needs_harness
@pytest.mark.slow
def test_rolling_loglikelihood_is_eval_py_perplexity_nll(stories, tmp_path):
    """A text that fits one window: the harness predicts every token after the prefix token
    (BOS), which is eval.py's perplexity on a window of exactly the text's BOS + tokens. So the
    harness's word_perplexity is exp(sum of those NLLs / words)."""
    import lm_eval
    model, tokenizer = stories
    texts = [STORY, "The cat sat on the mat. It was a sunny day and the cat was happy."]
    nlls = []
    for text in texts:
        stream = ev.encode_stream(tokenizer, text)
        assert stream == [tokenizer.bos_id] + tokenizer.encode(text, bos=False)  # the same tokens both ways
        nlls.append(math.log(ev.perplexity(model, tokenizer, text, seq_len=len(stream), progress=False))
                    * (len(stream) - 1))
    lm = harness.harness_model_class()(model=model, tokenizer=tokenizer)
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    assert [-x for x in got] == pytest.approx(nlls, rel=1e-6)

    write_task(tmp_path, "rolling_local", [{"text": t} for t in texts], ROLLING_YAML)
    out = lm_eval.simple_evaluate(model=lm, tasks=["rolling_local"],
                                  task_manager=local_tasks(tmp_path))
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert out["results"]["rolling_local"]["word_perplexity,none"] == pytest.approx(math.exp(sum(nlls) / words),
                                                                                     rel=1e-6)


@needs_harness
@pytest.mark.slow
def test_rolling_windows_predict_every_token_once_with_full_context(stories):
    """Longer than max_length: chunks of max_length predicted tokens, each window the
    max_length tokens of [prefix] + text that end just before its last target."""
    model, tokenizer = stories
    L = 16
    ids = tokenizer.encode(STORY, bos=False)
    assert len(ids) % L and len(ids) > 2 * L  # a short last window, which gets a full context
    seq = [tokenizer.bos_id] + ids  # position p of seq predicts seq[p + 1] = ids[p]
    expected = sum(direct_scores(model, seq[max(0, end - L):done + 1], seq[done + 1:end + 1])[0]
                   for done in range(0, len(ids), L) for end in [min(done + L, len(ids))])
    lm = harness.harness_model_class()(model=model, tokenizer=tokenizer, max_length=L, batch_size=3)
    [got] = lm.loglikelihood_rolling([request("loglikelihood_rolling", STORY)])
    assert got == pytest.approx(expected, abs=1e-4)


@needs_harness
@pytest.mark.slow
def test_generate_until_is_greedy_generate_cut_at_the_first_stop(stories):
    model, tokenizer = stories
    lm = harness.harness_model_class()(model=model, tokenizer=tokenizer)
    prompt = "Once upon a time, there was a little girl named Lily. She"
    ids = tokenizer.encode(prompt, bos=False)
    new = model.generate(torch.tensor([ids]), 40)[0, len(ids):].tolist()
    assert tokenizer.eos_id not in new
    full = tokenizer.decode(new)  # "loved to play with her toys and her friends. One day, Lily's ..."
    assert 10 < full.index(".") < full.index(",") < len(full) - 10  # the stops really cut, the second first
    got = lm.generate_until([request("generate_until", prompt, {"until": [",", "."], "max_gen_toks": 40}),
                             request("generate_until", prompt, {"until": ["never in the text"], "max_gen_toks": 7}),
                             request("generate_until", prompt, {"until": ","})])
    assert got == [full[:full.index(".")], tokenizer.decode(new[:7]), full[:full.index(",")]]
