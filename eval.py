"""Zero-shot commonsense accuracy and WikiText-2 perplexity, with lm-evaluation-harness semantics.

What the harness does, and so what this file does (harness file names in brackets):
  - prompts: each task's context and choices as its task yaml builds them; prepared once by
    data/commonsense/prepare.py and data/hellaswag/prepare.py (see their docstrings);
  - requests: (context, " " + choice) per choice, the " " being the harness's target_delimiter;
    WinoGrande is the "multiple input" task: (sentence up to the blank + option, " " + rest);
  - tokens [models/huggingface.py: _encode_pair]: trailing spaces of the context move to the
    continuation, context + continuation is encoded as ONE string and split at the token count of
    the encoded context alone. No BOS token: HFLM encodes with add_special_tokens=False
    (add_bos_token defaults to False), for LLaMA tokenizers too; `add_bos=True` (--bos) prepends
    it, like the harness's add_bos_token=True model argument;
  - score: the sum of the log-probabilities of the continuation's tokens;
  - metrics [api/task.py: process_results]: acc = argmax of the sums; acc_norm = argmax of
    sum / len(choice), len counted in characters of the choice text (without the joining space);
    stderr = sample standard deviation / sqrt(n) = sqrt(p (1 - p) / (n - 1)) for a 0/1 metric.
    The metric reported per task is acc_norm where the harness computes it, else acc.
Perplexity follows GPTQ / QuaRot: the text tokenized as one stream (as the tokenizer's plain
__call__ would, so LLaMA tokenizers start it with BOS), cut into non-overlapping windows of
seq_len tokens (the tail dropped), exp of the mean next-token NLL.

Speed: requests of all items and choices are batched, right-padded (harmless: attention is
causal), one forward per batch. The choices of an item share their context, so by default
the shared token prefix runs once and its KV cache is reused by every choice (a batch shares
the shortest prefix of its items; exact whenever every module acts per token: true for the
float model and for quant.py's per-token activation and KV quantizers; --no-share-prefix
turns it off). Only the scored positions reach lm_head. --compile compiles the blocks
(extras/compile.py); the forwards that read a shared prefix's KV cache stay eager.
extras/harness.py puts this scorer behind lm-evaluation-harness's model interface, for the
harness's own tasks.

Run:
    python eval.py --model smollm2-135m-instruct --limit 100
    python eval.py --model data/models/smollm2-135m-instruct --ppl --json out/eval.json
    python eval.py --model DIR --rotate --bits 4 --quant gptq
"""
import dataclasses
import functools
import importlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import quant
import rotate
from data.alpaca import prepare as alpaca
from data.mirror import read_prepared_jsonl
from data.models import resolve_model_dir
from data.options import check_options, one_line_errors, option, option_group, parse_config
from data.tokenizer import Tokenizer
from data.wikitext2.prepare import load_test_text
from extras.compile import compile_blocks
from extras.int_kernels import check_runs_on_integers, int_kernels_option, use_integer_kernels
from extras.quantized_checkpoint import QUANT_RECORD, load_quantized
from model import KVCache, load_checkpoint
from quant import QuantConfig
from rotate import ROTATION_RECORD, RotationConfig

ROOT = Path(__file__).resolve().parent
DATA_DIR = ROOT / "data"

# -----------------------------------------------------------------------------
# Tasks

# name -> (data folder, metrics the harness reports for it)
TASKS = {
    "boolq": ("commonsense", ("acc",)),
    "piqa": ("commonsense", ("acc", "acc_norm")),
    "siqa": ("commonsense", ("acc",)),
    "hellaswag": ("hellaswag", ("acc", "acc_norm")),
    "winogrande": ("commonsense", ("acc",)),
    "arc_easy": ("commonsense", ("acc", "acc_norm")),
    "arc_challenge": ("commonsense", ("acc", "acc_norm")),
    "openbookqa": ("commonsense", ("acc", "acc_norm")),
}
# The seven tasks the RoLoRA paper averages (SIQA can be evaluated but is not averaged).
PAPER_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TARGET_DELIMITER = " "
BOOLQ_NOTE = "BoolQ here has no passage (question only): not comparable with published BoolQ numbers"


def reported_metric(task: str) -> str:
    return "acc_norm" if "acc_norm" in TASKS[task][1] else "acc"


def load_task(name: str, data_dir: Path | None = None) -> list[dict]:
    """The prepared records of one task, preparing them from the mirror on first use."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    folder = TASKS[name][0]
    out_dir = Path(data_dir or DATA_DIR) / folder
    prepare = importlib.import_module(f"data.{folder}.prepare").prepare
    path = out_dir / f"{name}.jsonl"
    records = read_prepared_jsonl(path, functools.partial(prepare, out_dir, **(
        {"tasks": [name]} if folder == "commonsense" else {})), f"data/{folder}/prepare.py")
    for r in records:
        n = len(r["choices"])
        if n < 2 or not 0 <= r["gold"] < n:
            raise ValueError(f"{path}: record {r.get('id')} has {n} choices and gold {r['gold']}")
    return records


def build_requests(record: dict) -> list[tuple[str, str]]:
    """(context, continuation) per choice, as the harness's construct_requests builds them."""
    if "contexts" in record:  # WinoGrande: the option is in the context, the rest is scored
        return [(c, TARGET_DELIMITER + record["suffix"]) for c in record["contexts"]]
    return [(record["context"], TARGET_DELIMITER + c) for c in record["choices"]]


# -----------------------------------------------------------------------------
# Tokenizing a request the harness's way


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), split exactly as the harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # "Answer: " + "x" is scored as "Answer:" + " x": the space belongs to the answer
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        whole = tokenizer.encode(context + continuation, bos=False)
        context_ids = tokenizer.encode(context, bos=False)
        continuation_ids = whole[len(context_ids):]
        if add_bos:
            context_ids = [tokenizer.bos_id] + context_ids
    else:  # nothing to condition on: the harness uses one prefix token (BOS, else EOS)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        context_ids, continuation_ids = [prefix], tokenizer.encode(continuation, bos=False)
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} after context {context[-40:]!r} encodes to no tokens")
    return context_ids, continuation_ids


# -----------------------------------------------------------------------------
# Log-likelihood of continuations, batched


@dataclass
class Row:
    """One request after tokenizing: the model reads `inputs`, the last len(targets) positions are scored."""
    request: int        # index into the caller's list of requests
    inputs: list[int]   # (context + continuation)[:-1], left-truncated to the model's window
    targets: list[int]  # the continuation tokens


def make_row(request: int, context_ids: list[int], continuation_ids: list[int], max_len: int) -> Row:
    if len(continuation_ids) > max_len:
        raise ValueError(f"request {request}: continuation of {len(continuation_ids)} tokens exceeds "
                         f"the model's {max_len}")
    tokens = (context_ids + continuation_ids)[-(max_len + 1):]  # the harness truncates from the left
    return Row(request, tokens[:-1], continuation_ids)


def shared_prefix_length(rows: list[Row]) -> int:
    """Longest common prefix of the rows' inputs that contains no scored position."""
    first_scored = min(len(r.inputs) - len(r.targets) for r in rows)
    n = 0
    for tokens in zip(*(r.inputs for r in rows)):
        if n >= first_scored or any(t != tokens[0] for t in tokens):
            break
        n += 1
    return n


class ScorePositionsOnly:
    """While active, lm_head sees only the hidden states at `positions` (a (rows, cols) index
    pair), so the (B, T, vocab) logits of positions nobody reads are never computed. With
    positions None, lm_head sees nothing (a prefix pass needs only its KV cache)."""

    def __init__(self, model):
        self.model, self.positions = model, None

    def __enter__(self):
        self.handle = self.model.lm_head.register_forward_pre_hook(self._select)
        return self

    def _select(self, module, args):
        hidden = args[0]  # (B, T, C)
        if self.positions is None:
            return (hidden[:, :0],)
        return (hidden[self.positions],)  # (N, C)

    def __exit__(self, *exc):
        self.handle.remove()


def _batches(groups: list[list[Row]], prefix_lens: list[int], batch_size: int,
             max_waste: float = 0.25, min_tokens: int = 256):
    """Pack item groups, in order, into batches of at most batch_size rows; yields (prefix, items).

    A batch shares the shortest prefix of its items and pads its rows to the longest rest. Once
    a batch holds min_tokens (enough for an efficient matmul) it closes rather than let padding
    and recomputed prefix tokens grow past max_waste of the tokens it needs."""
    def processed(batch):  # tokens the two forwards of `batch` run through the model
        prefix = min(p for _, p in batch)
        rows = [r for g, _ in batch for r in g]
        return len(batch) * prefix + len(rows) * max(len(r.inputs) - prefix for r in rows)

    def needed(batch):  # each item's prefix once, then each row's own tokens
        return sum(p + sum(len(r.inputs) - p for r in g) for g, p in batch)

    batch = []
    for item in zip(groups, prefix_lens):
        grown = batch + [item]
        too_many_rows = sum(len(g) for g, _ in grown) > batch_size
        too_wasteful = processed(grown) > (1 + max_waste) * needed(grown)
        if batch and (too_many_rows or (too_wasteful and processed(batch) >= min_tokens)):
            yield min(p for _, p in batch), [g for g, _ in batch]
            grown = [item]
        batch = grown
    if batch:
        yield min(p for _, p in batch), [g for g, _ in batch]


@torch.inference_mode()
def score_batch(model, items: list[list[Row]], prefix_len: int, pad_id: int = 0) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, whether greedy decoding gives every continuation token) for
    every row of `items` (each item a list of rows that share their first prefix_len input tokens):
    prefix once per item, then all rows."""
    rows = [row for item in items for row in item]
    device = model.lm_head.weight.device
    cache = None
    with ScorePositionsOnly(model) as scope:
        if prefix_len > 0:
            prefix = torch.tensor([item[0].inputs[:prefix_len] for item in items], device=device)  # (n_items, P)
            cache = KVCache(len(model.layers))
            model(prefix, cache)  # fills the cache; lm_head sees nothing
            per_item = torch.tensor([len(item) for item in items], device=device)
            for layer in range(len(model.layers)):  # (n_items, nkv, P, hs) -> (rows, nkv, P, hs)
                cache.keys[layer] = cache.keys[layer].repeat_interleave(per_item, dim=0)
                cache.values[layer] = cache.values[layer].repeat_interleave(per_item, dim=0)
        rests = [r.inputs[prefix_len:] for r in rows]
        width = max(len(x) for x in rests)
        batch = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)  # (rows, T), right-padded
        row_idx, col_idx, targets, owner = [], [], [], []
        for i, (rest, row) in enumerate(zip(rests, rows)):
            batch[i, :len(rest)] = torch.tensor(rest, dtype=torch.long)
            first = len(rest) - len(row.targets)  # logits at position p predict token p + 1
            row_idx += [i] * len(row.targets)
            col_idx += range(first, len(rest))
            targets += row.targets
            owner += [i] * len(row.targets)
        scope.positions = (torch.tensor(row_idx, device=device), torch.tensor(col_idx, device=device))
        logits = model(batch, cache)  # (N, vocab): only the scored positions
    if logits.shape != (len(targets), model.config.vocab_size):
        raise RuntimeError(f"expected logits of the {len(targets)} scored positions, got {tuple(logits.shape)}: "
                           "does the model's forward still end with lm_head(norm(x))?")
    logprobs = F.log_softmax(logits.double(), dim=-1)
    targets, owner = torch.tensor(targets, device=device), torch.tensor(owner, device=device)
    token_lp = logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, owner, token_lp)
    # is_greedy as the harness defines it: the argmax at every scored position is the target
    misses = torch.zeros(len(rows), device=device).index_add_(0, owner, (logits.argmax(-1) != targets).float())
    return list(zip(sums.tolist(), (misses == 0).tolist()))


def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], items: list[list[int]] | None = None,
                   batch_size: int = 32, share_prefix: bool = True, add_bos: bool = False,
                   progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """Sum of log P(continuation | context) for each (context, continuation) request.

    items: lists of request indices whose rows may share a prefix (the choices of one
    question); default: each request on its own. batch_size counts rows (one per choice).
    """
    max_len = model.config.max_position_embeddings
    rows = [make_row(i, *encode_pair(tokenizer, c, x, add_bos), max_len) for i, (c, x) in enumerate(requests)]
    return [score for score, _ in score_rows(model, rows, items, batch_size, share_prefix, progress, desc)]


def score_rows(model, rows: list[Row], items: list[list[int]] | None = None, batch_size: int = 32,
               share_prefix: bool = True, progress: bool = True,
               desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum of log-probs, is_greedy) of each row's targets; rows[i].request == i; items as in loglikelihoods."""
    groups = [[rows[i] for i in item] for item in (items if items is not None else [[i] for i in range(len(rows))])]
    if sorted(r.request for g in groups for r in g) != list(range(len(rows))):
        raise ValueError("items must cover every request exactly once")
    # Longest items first, as the harness sorts its requests: neighbours in a batch then have
    # similar lengths, so little padding (and OOM, on a GPU, would show at once).
    prefix_lens = [shared_prefix_length(g) if share_prefix and len(g) > 1 else 0 for g in groups]
    order = sorted(range(len(groups)), reverse=True, key=lambda i: max(len(r.inputs) for r in groups[i]))
    work = list(_batches([groups[i] for i in order], [prefix_lens[i] for i in order], batch_size))
    scores = [(0.0, False)] * len(rows)
    for prefix_len, batch in tqdm(work, desc=desc, disable=not progress, leave=False):
        for row, score in zip((r for g in batch for r in g), score_batch(model, batch, prefix_len)):
            scores[row.request] = score
    return scores


# -----------------------------------------------------------------------------
# Metrics


def argmax_first(values) -> int:
    """Index of the largest value, the first one on ties (numpy.argmax, as the harness uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and the harness's mean_stderr: sample std / sqrt(n); None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def task_metrics(task: str, records: list[dict], scores: list[list[float]]) -> dict:
    """acc (and acc_norm where the harness reports it) with standard errors, from per-choice scores;
    and per item, for a paired comparison of two models on the same items, the choice the reported
    metric makes and whether it is right ("chosen" and "correct", one character an item)."""
    chosen = {"acc": [argmax_first(s) for s in scores]}
    if "acc_norm" in TASKS[task][1]:
        # process_results: completion_len = len(choice) for the doc's choices, the characters of
        # the choice text without the target delimiter that joins it to the context.
        chosen["acc_norm"] = [argmax_first([ll / len(c) for ll, c in zip(s, r["choices"])])
                              for r, s in zip(records, scores)]
    out = {"n": len(records)}
    for metric, picks in chosen.items():
        out[metric], out[metric + "_stderr"] = mean_and_stderr([float(p == r["gold"]) for r, p in zip(records, picks)])
    out["metric"] = reported_metric(task)
    picks = chosen[out["metric"]]
    out["chosen"] = "".join(str(p) for p in picks) if max(picks, default=0) < 10 else picks
    out["correct"] = "".join("1" if p == r["gold"] else "0" for r, p in zip(records, picks))
    return out


def evaluate_task(model, tokenizer, task: str, limit: int | None = None, batch_size: int = 32,
                  share_prefix: bool = True, add_bos: bool = False, progress: bool = True,
                  records: list[dict] | None = None) -> dict:
    """Metrics of one task on its first `limit` items (all when limit is None or 0)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit}: expected a number of items, or None / 0 for all")
    records = records if records is not None else load_task(task)
    records = records[:limit] if limit else records
    requests, items = [], []
    for r in records:
        reqs = build_requests(r)
        items.append(list(range(len(requests), len(requests) + len(reqs))))
        requests += reqs
    flat = loglikelihoods(model, tokenizer, requests, items, batch_size, share_prefix, add_bos, progress, desc=task)
    return task_metrics(task, records, [[flat[i] for i in item] for item in items])


def evaluate_tasks(model, tokenizer, tasks=PAPER_TASKS, limit: int | None = None, batch_size: int = 32,
                   share_prefix: bool = True, add_bos: bool = False, progress: bool = True,
                   done: dict | None = None, on_task_done=None) -> dict:
    """{"tasks": {name: metrics}, "average": mean reported metric over the paper tasks evaluated,
    "average_stderr": its standard error, sqrt(sum of the tasks' squared stderrs) / n (independent tasks)}.
    `done` holds the metrics of tasks already evaluated (they are not run again), and
    `on_task_done(metrics so far)` is called after each task: a long evaluation can be cut and continued."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task '{t}'; known tasks: {', '.join(TASKS)}")
    model.eval()
    results = {t: done[t] for t in tasks if done and t in done}
    for t in tasks:
        if t not in results:
            results[t] = evaluate_task(model, tokenizer, t, limit, batch_size, share_prefix, add_bos, progress)
            if on_task_done is not None:
                on_task_done(dict(results))
    results = {t: results[t] for t in tasks}
    averaged = [t for t in tasks if t in PAPER_TASKS]
    average = sum(results[t][results[t]["metric"]] for t in averaged) / len(averaged) if averaged else None
    errors = [results[t].get(results[t]["metric"] + "_stderr") for t in averaged]
    average_stderr = math.sqrt(sum(e * e for e in errors)) / len(errors) if averaged and None not in errors else None
    out = {"tasks": results, "average": average, "average_stderr": average_stderr, "average_tasks": averaged}
    if "boolq" in tasks:
        out["notes"] = {"boolq": BOOLQ_NOTE}
    return out


# -----------------------------------------------------------------------------
# Perplexity


def encode_stream(tokenizer, text: str) -> list[int]:
    """The text as GPTQ/QuaRot tokenize it, tokenizer(text): with the special tokens the
    tokenizer adds by default. Hugging Face's LLaMA sentencepiece tokenizer adds BOS; a
    tokenizer.json adds what its post-processor says (nothing for SmolLM2's byte-level BPE)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is not None:
        return hf.encode(text, add_special_tokens=True).ids
    return tokenizer.encode(text, bos=True)


def perplexity(model, tokenizer, text: str, seq_len: int = 2048, limit_windows: int | None = None,
               progress: bool = True) -> float:
    """exp(mean NLL) over non-overlapping windows of seq_len tokens of one token stream."""
    return perplexity_of(window_nlls(model, tokenizer, text, seq_len, limit_windows, progress))


def perplexity_of(windows: list[tuple[float, int]]) -> float:
    """exp of the mean NLL per predicted token, from window_nlls' (summed NLL, tokens) per window.
    GPTQ averages per-window mean losses; every window has seq_len - 1 targets, so this is the same."""
    return math.exp(sum(nll for nll, _ in windows) / sum(n for _, n in windows))


@torch.inference_mode()
def window_nlls(model, tokenizer, text: str, seq_len: int = 2048, limit_windows: int | None = None,
                progress: bool = True) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) of each non-overlapping window of seq_len tokens."""
    seq_len = min(seq_len, model.config.max_position_embeddings)
    ids = torch.tensor(encode_stream(tokenizer, text), dtype=torch.long)
    n_windows = ids.numel() // seq_len  # GPTQ: the tail that does not fill a window is dropped
    if limit_windows is not None:
        n_windows = min(n_windows, limit_windows)
    if n_windows == 0:
        raise ValueError(f"text of {ids.numel()} tokens is shorter than one window of {seq_len}")
    device = model.lm_head.weight.device
    windows = []
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        window = ids[w * seq_len:(w + 1) * seq_len].to(device)[None]  # (1, T)
        logits = model(window)  # (1, T, vocab)
        # each window predicts its own tokens 1..T-1; the first token has no context
        nll = F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum")
        windows.append([nll.item(), seq_len - 1])  # a list: what the results files give back
    return windows


# -----------------------------------------------------------------------------
# Loading any checkpoint the project writes: the loader behind every script's --model


def load_model(name_or_dir, dtype=torch.float32, device="cpu"):
    """(model, tokenizer, directory) of a checkpoint directory or a prepared model's name."""
    path = resolve_model_dir(name_or_dir)
    return load_weights(path, dtype, device), Tokenizer(path), path


def load_weights(path, dtype=torch.float32, device="cpu"):
    """The model of a checkpoint directory with what its stages recorded beside it: a quantized one
    (quantization.json) is rebuilt from its integer codes with its quantizers and rotation, no
    calibration (extras/quantized_checkpoint.py); a rotated one (rotation.json) gets its online
    Hadamards back (rotate.load_rotated); a plain one loads as it is (model.load_checkpoint)."""
    path = Path(path)
    if (path / QUANT_RECORD).is_file():  # before rotation.json: a quantized model may be rotated too
        return load_quantized(path, dtype=dtype, device=device)
    if (path / ROTATION_RECORD).is_file():
        return rotate.load_rotated(path, dtype=dtype, device=device)[0]
    return load_checkpoint(path, dtype=dtype, device=device)


# -----------------------------------------------------------------------------
# Command line


def format_table(results: dict, ppl: float | None = None, seq_len: int | None = None) -> str:
    lines = ["| task | metric | value % | stderr % | acc % | acc_norm % | n |",
             "|---|---|---:|---:|---:|---:|---:|"]
    pct = lambda x: "-" if x is None else f"{100 * x:.2f}"  # noqa: E731
    for task, m in results["tasks"].items():
        name = task + (" *" if task == "boolq" else "")
        metric = m["metric"]
        lines.append(f"| {name} | {metric} | {pct(m[metric])} | {pct(m.get(metric + '_stderr'))} | "
                     f"{pct(m['acc'])} | {pct(m.get('acc_norm'))} | {m['n']} |")
    if results.get("average") is not None:
        lines.append(f"| average ({len(results['average_tasks'])} tasks) | | {pct(results['average'])} | "
                     f"{pct(results.get('average_stderr'))} | | | |")
    if ppl is not None:
        lines.append(f"| wikitext2 (seq_len {seq_len}) | ppl | {ppl:.3f} | | | | |")
    if "boolq" in results["tasks"]:
        lines.append(f"\n* {BOOLQ_NOTE}.")
    return "\n".join(lines)


@dataclass
class EvalConfig:
    model: str = option("", "checkpoint directory, or a name data/models/prepare.py knows (required)")
    tasks: str = option(",".join(PAPER_TASKS), f"comma-separated, from {', '.join(TASKS)}; 'none' for "
                        "perplexity only")
    limit: int | None = option(None, "first N items of each task (0 or none: all)", at_least=1, zero_means_all=True)
    ppl: bool = option(False, "also WikiText-2 perplexity")
    seq_len: int = option(2048, "perplexity window (capped by max_position_embeddings)", at_least=2)
    ppl_windows: int | None = option(None, "only the first N perplexity windows (0 or none: all)", at_least=1,
                                     zero_means_all=True)
    batch_size: int = option(32, "rows (choices) per forward", at_least=1)
    share_prefix: bool = option(True, "run a question's shared context once and reuse its KV cache for "
                                "every choice (exact for per-token quantizers)")
    bos: bool = option(False, "prepend BOS to every context (harness add_bos_token=True)")
    rotate: bool = option(False, "rotate the model first (rotate.py)")
    seed: int = option(0, "rotation seed")
    rotation: RotationConfig = option_group(RotationConfig, "with --rotate: the rotations besides R1 (rotate.py)")
    bits: int | None = option(None, "shorthand for --w-bits N --a-bits N (wins over them)")
    quant: QuantConfig = option_group(QuantConfig, "quantization (quant.py)")
    calibration: str = option("", "GPTQ calibration text (.txt, or Alpaca .json); default: the mirror's "
                              "alpaca_cleaned_2000.json (never the evaluation text)")
    dtype: str = option("float32", "dtype of the weights", choices=("float32", "bfloat16", "float64"))
    threads: int | None = option(None, "torch CPU threads", at_least=1)
    compile: bool = option(False, "torch.compile the model's blocks (extras/compile.py; a forward with the "
                           "shared prefix's KV cache stays eager)")
    int_kernels: bool = int_kernels_option()
    json: str = option("", "write the results to this JSON file")

    def __post_init__(self):
        if self.bits is not None:  # a new QuantConfig: never change one another config shares
            self.quant = dataclasses.replace(self.quant, w_bits=self.bits, a_bits=self.bits)

    def validate(self):
        """Check every value before the model loads: a typo costs no minutes of loading."""
        if not self.model:
            raise ValueError("--model is required: a checkpoint directory or a prepared model name")
        for task in self.task_list():
            if task not in TASKS:
                raise ValueError(f"--tasks: unknown task '{task}'; known tasks: {', '.join(TASKS)}")
        if self.bits is not None:
            quant.check_bits(self.bits, "--bits")
        self.quant.validate()
        check_options(self)
        if self.quant.quantizes and (Path(self.model) / "quantization.json").is_file():
            raise ValueError(f"--w-bits/--a-bits/--kv-bits: {self.model} is already quantized "
                             f"({Path(self.model) / 'quantization.json'}); it loads quantized, drop them")
        if self.rotate and (Path(self.model) / "rotation.json").is_file():
            raise ValueError(f"--rotate: {self.model} is already rotated ({Path(self.model) / 'rotation.json'}); "
                             "it loads with its rotation, drop --rotate")
        if self.int_kernels and not (Path(self.model) / QUANT_RECORD).is_file():
            check_runs_on_integers(self.quant)  # a quantized checkpoint's own config is checked as it loads
        if self.calibration and not Path(self.calibration).is_file():
            raise FileNotFoundError(f"--calibration {self.calibration}: no such file")
        if self.calibration and self.quant.w_method == "gptq" and self.quant.w_bits < 16:
            try:  # a malformed file fails now, not after the model has loaded
                alpaca.calibration_text(self.calibration)
            except ValueError as e:
                raise ValueError(f"--calibration: {e}") from None

    def task_list(self) -> list[str]:
        """--tasks 'a,b' -> ['a', 'b']; '' or 'none' -> []."""
        return [] if self.tasks in ("", "none") else self.tasks.split(",")


def parse_args(argv=None) -> EvalConfig:
    return parse_config(EvalConfig(), argv, prog="eval.py", description=__doc__.split("\n\n")[0])


def load_and_quantize(cfg: EvalConfig):
    """Load the checkpoint, then rotate and quantize it as the flags ask."""
    model, tokenizer, model_dir = load_model(cfg.model, dtype=getattr(torch, cfg.dtype))
    if cfg.rotate:
        rotate.rotate_model(model, seed=cfg.seed, **cfg.rotation.layout())
    if cfg.quant.quantizes:
        calibration = None
        if cfg.quant.w_method == "gptq" and cfg.quant.w_bits < 16:
            source = cfg.calibration or alpaca.raw_file("cleaned")
            tokens = tokenizer.encode(alpaca.calibration_text(source))
            seq_len = min(cfg.quant.calib_seq_len, model.config.max_position_embeddings)
            calibration = quant.calibration_windows(tokens, cfg.quant.calib_windows, seq_len)
        quant.quantize_model(model, cfg.quant, calibration=calibration)
    if cfg.int_kernels:  # its quantized linears on int8 products (extras/int_kernels.py)
        use_integer_kernels(model)
    return model.eval(), tokenizer, model_dir


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tasks = cfg.task_list()
    start = time.perf_counter()
    model, tokenizer, model_dir = load_and_quantize(cfg)
    if cfg.compile:  # after rotating and quantizing: what is compiled is the model as it is scored
        compile_blocks(model)
    results = evaluate_tasks(model, tokenizer, tasks, cfg.limit, cfg.batch_size, cfg.share_prefix,
                             cfg.bos) if tasks else {"tasks": {}, "average": None}
    ppl = seq_len = None
    if cfg.ppl:
        seq_len = min(cfg.seq_len, model.config.max_position_embeddings)
        ppl = perplexity(model, tokenizer, load_test_text(), seq_len, cfg.ppl_windows)
    seconds = time.perf_counter() - start
    print(format_table(results, ppl, seq_len))
    print(f"\nmodel {model_dir}, limit {cfg.limit}, {seconds:.0f} s")
    if ppl is not None:
        results.update(ppl=ppl, ppl_seq_len=seq_len)
    if cfg.json:
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "json"}
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(dict(results, model=str(model_dir), settings=settings,
                                                  seconds=seconds), indent=2))
    return results


if __name__ == "__main__":
    with one_line_errors("eval.py"):
        main()
