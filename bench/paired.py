"""Paired differences of two evaluation rows scored on the same items, windows and held-out examples.

bench/reproduce.py's `--table` compares two methods of the grid with them (LAR against LBR, RoLoRA +
QAT against RoLoRA). They are pure arithmetic on the per-item records an evaluation row saves
(`correct` strings per task, `ppl_windows`, `heldout_examples`), and the table `--table` prints
of them (paired_table), so this file imports nothing of the project.

Two rows of the grid score the very same items, so their errors correlate: the standard error
of a difference is that of the per-item differences, sd(a_i - b_i) / sqrt(n) (a paired t
statistic, the normal approximation of it at these n), much smaller than the unpaired
sqrt(se_a^2 + se_b^2) when the two models get mostly the same items right. For accuracy a_i is
0 or 1 (item i right or not); for perplexity the NLL per predicted token of window i (a difference
of log perplexities); for the held-out loss the examples carry different numbers of tokens, so
the difference of the token-weighted means sum(d_i) / sum(n_i), d_i the difference of example
i's summed losses, gets the ratio estimator's error sqrt(n / (n - 1) sum (d_i - D n_i)^2) / sum(n_i).
The seven-task average's error is sqrt(sum of the tasks' squared errors) / 7 (the tasks are
independent item sets), as eval.evaluate_tasks does for one row.

Over seeds, every seed scores the same items, so their errors correlate too: the mean over seeds
of a difference is the paired difference of the seed-averaged records (item i's correctness
averaged over the seeds, window i's NLL, example i's loss), and its error is that of those
averaged per-item differences (mean_row). It measures the item sampling only. What a seed changes
(the data order, the adapters' start, the rotation) moves a difference too, and only the per-seed
differences see it: beside the items' error the table gives the seeds' own, sd(d_s) / sqrt(k) over
the k per-seed differences d_s (a t statistic with k - 1 degrees of freedom: at k = 3 its 95%
interval is 4.3 of those errors wide either side), and whether every seed has the same sign.
"""
import math


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a_i - b_i over paired observations and its standard error sd(d) / sqrt(n)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: {len(a)} against {len(b)} observations; need the same n >= 1")
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    if len(d) == 1:  # one window, say: no spread to measure
        return mean, math.nan
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))


def paired_ratio(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """sum(a_i) / sum(n_i) - sum(b_i) / sum(n_i) over [summed loss, tokens] pairs of the same
    examples (the same n_i), with the ratio estimator's standard error."""
    if [n for _, n in a] != [n for _, n in b] or len(a) < 2:
        raise ValueError("paired_ratio: the rows were not scored on the same examples")
    d = [x - y for (x, _), (y, _) in zip(a, b)]
    tokens = [n for _, n in a]
    total = sum(tokens)
    mean = sum(d) / total
    spread = sum((di - mean * n) ** 2 for di, n in zip(d, tokens)) * len(d) / (len(d) - 1)
    return mean, math.sqrt(spread) / total


def has_records(row: dict) -> bool:
    return "ppl_windows" in row and "heldout_examples" in row and all("correct" in m for m in row["tasks"].values())


def paired_row_difference(a: dict, b: dict) -> dict:
    """Row a minus row b, each measure with its paired standard error: the seven-task average
    (points), each task (points), log perplexity (and the perplexity ratio), held-out loss."""
    tasks = [t for t in a["average_tasks"]]
    per_task = {t: paired([float(c) for c in a["tasks"][t]["correct"]], [float(c) for c in b["tasks"][t]["correct"]])
                for t in tasks}
    average = sum(m for m, _ in per_task.values()) / len(tasks)
    average_se = math.sqrt(sum(se * se for _, se in per_task.values())) / len(tasks)
    log_ppl = paired([nll / n for nll, n in a["ppl_windows"]], [nll / n for nll, n in b["ppl_windows"]])
    return {"average": (100 * average, 100 * average_se), "tasks": {t: (100 * m, 100 * se) for t, (m, se) in per_task.items()},
            "log_ppl": log_ppl, "ppl_ratio": math.exp(log_ppl[0]),
            "heldout_loss": paired_ratio(a["heldout_examples"], b["heldout_examples"])}


def mean_row(rows: list[dict]) -> dict:
    """The per-item records of rows scored on the same items, averaged over the rows: each item's
    correctness becomes the fraction of rows that got it right."""
    def mean(values):
        return [sum(v) / len(rows) for v in zip(*values)]
    first = rows[0]
    if any([n for _, n in r["ppl_windows"] + r["heldout_examples"]] !=
           [n for _, n in first["ppl_windows"] + first["heldout_examples"]] for r in rows):
        raise ValueError("mean_row: the rows were not scored on the same windows and examples")
    return {"average_tasks": first["average_tasks"],
            "tasks": {t: {"correct": mean([[float(c) for c in r["tasks"][t]["correct"]] for r in rows])}
                      for t in first["average_tasks"]},
            "ppl_windows": [[nll, n] for nll, (_, n) in zip(mean([[w[0] for w in r["ppl_windows"]] for r in rows]),
                                                             first["ppl_windows"])],
            "heldout_examples": [[loss, n] for loss, (_, n) in zip(
                mean([[e[0] for e in r["heldout_examples"]] for r in rows]), first["heldout_examples"])]}


# -----------------------------------------------------------------------------
# The paired table of bench/reproduce.py --table, from its cells seed<S>/eval/<method>/<setting>

PAIRS = (("rolora", "lbr", "LAR (RoLoRA) minus LBR"), ("rolora_qat", "rolora", "RoLoRA + QAT minus RoLoRA"))


def seeded_rows(cells: dict) -> dict:
    """{(seed, method, setting): row} of the paired experiment's finished rows (cells seed<S>/eval/...)."""
    found = {}
    for name, cell in cells.items():
        head, _, rest = name.partition("/eval/")
        if head.startswith("seed") and rest:
            method, setting = rest.split("/")
            found[(int(head.removeprefix("seed")), method, setting)] = cell["row"]
    return found


def paired_table(cells: dict, settings) -> list[str]:
    """The paired experiment's answer from the results file's cells: each pair of methods (PAIRS)
    at each of `settings`, per seed and over the seeds, with paired standard errors, on the average
    and per task."""
    found = {k: row for k, row in seeded_rows(cells).items() if has_records(row)}
    lines, per_task = [], []
    for better, worse, title in PAIRS:
        for setting in settings:
            seeds = sorted(seed for seed, m, s in found if m == better and s == setting
                           and (seed, worse, setting) in found)
            if not seeds:
                continue
            if not lines:
                lines = ["", "Paired differences (the same items, WikiText-2 windows and held-out examples; "
                         "± the paired standard error; ppl ratio = exp of the log-ppl difference):", "",
                         "| difference | setting | seed | average (points) | wiki2 log ppl (ppl ratio) | held-out loss |",
                         "|---|---|---|---:|---:|---:|"]
            diffs = [paired_row_difference(found[(seed, better, setting)], found[(seed, worse, setting)])
                     for seed in seeds]
            if not per_task:
                tasks = list(diffs[0]["tasks"])
                per_task = ["", "Per task (points, paired):", "",
                            "| difference | setting | seed | " + " | ".join(tasks) + " |",
                            "|---|---|---|" + "---:|" * len(tasks)]
            for seed, d in zip(seeds, diffs):
                lines.append(f"| {title} | {setting} | {seed} | {d['average'][0]:+.2f} ± {d['average'][1]:.2f} | "
                             f"{d['log_ppl'][0]:+.4f} ± {d['log_ppl'][1]:.4f} ({d['ppl_ratio']:.3f}) | "
                             f"{d['heldout_loss'][0]:+.4f} ± {d['heldout_loss'][1]:.4f} |")
                per_task.append(f"| {title} | {setting} | {seed} | {task_cells(d)} |")
            if len(seeds) > 1:
                mean = paired_row_difference(mean_row([found[(seed, better, setting)] for seed in seeds]),
                                             mean_row([found[(seed, worse, setting)] for seed in seeds]))
                lines.append(over_seeds_row(title, setting, mean, diffs))
                per_task.append(f"| {title} | {setting} | mean of {len(diffs)} | {task_cells(mean)} |")
    return lines + per_task


def task_cells(difference: dict) -> str:
    return " | ".join(f"{m:+.1f} ± {se:.1f}" for m, se in difference["tasks"].values())


def over_seeds_row(title: str, setting: str, mean: dict, diffs: list[dict]) -> str:
    """The mean over seeds of each difference, ± its error from the items (mean_row), the seeds'
    error sd(d_s) / sqrt(k), and the signs: a method effect has the same sign on every seed."""
    cells = []
    for key, digits in (("average", 2), ("log_ppl", 4), ("heldout_loss", 4)):
        means = [d[key][0] for d in diffs]
        mean_difference, error = mean[key]
        _, seeds_error = paired(means, [0.0] * len(means))
        signs = "same sign on every seed" if all(m > 0 for m in means) or all(m < 0 for m in means) else \
            f"signs differ: {', '.join(f'{m:+.{digits}f}' for m in means)}"
        cells.append(f"{mean_difference:+.{digits}f} ± {error:.{digits}f} (seeds ± {seeds_error:.{digits}f}; {signs})")
    return f"| {title} | {setting} | mean of {len(diffs)} | " + " | ".join(cells) + " |"
