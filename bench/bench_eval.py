"""Items per second of the commonsense evaluation: eval.py's batched scorer against one forward
per choice (what the harness does at batch size 1), in the same run, on the same items.

Scores the first --items items of each of the seven paper tasks, task by task as eval.py does, with
  1. baseline: one forward per (item, choice) on context + choice, full logits, log-softmax;
  2. eval.py batched: all choices of all items in right-padded batches, one forward per batch,
     only the scored positions through lm_head;
  3. eval.py batched + shared prefix (the default): as 2, and the context's KV cache computed
     once per item and reused by its choices;
checks that all three give the same log-likelihoods, and prints a table and the speedup.

Run:  python bench/bench_eval.py --model smollm2-135m-instruct --items 20 --threads 1
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as ev  # noqa: E402
from eval import load_model  # noqa: E402
from data.options import one_line_errors, option, parse_config  # noqa: E402


@dataclass
class BenchEvalConfig:
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    items: int = option(20, "first N items of each task", at_least=1)
    batch_size: int = option(32, "rows (choices) per forward", at_least=1)
    threads: int = option(2, "torch CPU threads", at_least=1)


@torch.inference_mode()
def one_forward_per_choice(model, tokenizer, requests) -> list[float]:
    """The unbatched reference: every request alone, full (1, T, vocab) logits."""
    scores = []
    for context, continuation in requests:
        context_ids, continuation_ids = ev.encode_pair(tokenizer, context, continuation)
        tokens = torch.tensor([context_ids + continuation_ids])
        logprobs = F.log_softmax(model(tokens[:, :-1])[0], dim=-1)  # (T - 1, vocab)
        scored = logprobs[-len(continuation_ids):]
        scores.append(scored.gather(1, torch.tensor(continuation_ids)[:, None]).sum().item())
    return scores


def main(argv=None):
    args = parse_config(BenchEvalConfig(), argv, prog="bench_eval.py", description=__doc__.split("\n\n")[0])
    torch.set_num_threads(args.threads)

    model, tokenizer, _ = load_model(args.model)
    tasks = []  # per task, as evaluate_task scores them: (requests, choices of each item)
    for task in ev.PAPER_TASKS:
        requests, items = [], []
        for record in ev.load_task(task)[:args.items]:
            reqs = ev.build_requests(record)
            items.append(list(range(len(requests), len(requests) + len(reqs))))
            requests += reqs
        tasks.append((requests, items))
    n_items = sum(len(items) for _, items in tasks)
    n_requests = sum(len(requests) for requests, _ in tasks)

    methods = {
        "one forward per choice": lambda reqs, items: one_forward_per_choice(model, tokenizer, reqs),
        "batched": lambda reqs, items: ev.loglikelihoods(model, tokenizer, reqs, items, args.batch_size,
                                                         share_prefix=False, progress=False),
        "batched + shared prefix": lambda reqs, items: ev.loglikelihoods(model, tokenizer, reqs, items,
                                                                         args.batch_size, progress=False),
    }
    runs = {}
    for name, score in methods.items():
        start = time.perf_counter()
        scores = [s for requests, items in tasks for s in score(requests, items)]
        runs[name] = (time.perf_counter() - start, scores)

    base_seconds, base_scores = runs["one forward per choice"]
    print(f"{args.model}: {n_items} items ({args.items} per task x {len(ev.PAPER_TASKS)} tasks), "
          f"{n_requests} choices, {args.threads} threads, batch {args.batch_size}\n")
    print("| method | seconds | items/s | speedup | max abs diff of log-likelihoods |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, scores) in runs.items():
        diff = max(abs(a - b) for a, b in zip(scores, base_scores))
        print(f"| {name} | {seconds:.1f} | {n_items / seconds:.2f} | {base_seconds / seconds:.2f}x | {diff:.1e} |")
    best = runs["batched + shared prefix"][0]
    print(f"\nspeedup of eval.py's default over one forward per choice: {base_seconds / best:.2f}x")


if __name__ == "__main__":
    with one_line_errors("bench/bench_eval.py"):
        main()
