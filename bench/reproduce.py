"""The paper's experiment with error bars: LoRA vs LoRA-then-rotate (LBR) vs RoLoRA (LAR) vs
RoLoRA + QAT on SmolLM2-135M-Instruct, each at full precision, W4A4 RTN, W4A4 GPTQ and W6A6 GPTQ.

The methods (../shared/docs/PAPERS.md, "LAR vs LBR"), all with the same data, steps, seed and
hyper-parameters (train.py's, with --steps optimizer steps):
  lora        LoRA on the original weights, merged, then quantized (the paper's baseline);
  lbr         the SAME merged LoRA model, then rotated (R1 + R4), then quantized: "LoRA Before Rotation";
  rolora      rotate (R1 + R4), LoRA on the rotated weights, merge, quantize: "LoRA After Rotation";
  rolora_qat  RoLoRA with the adapters trained on the W4A4 (RTN) fake-quantized model (train.py --qat).
KV cache 16-bit, as in the paper. Every cell is saved when done and skipped when present: a
training cell leaves OUT/<method>/merged (git-ignored) and its numbers; an evaluation cell
(method x setting) appends its row to the results file, which is small and committed
(bench/reproduce_results.json). An interrupted run continues where it stopped (a training cell
from its last checkpoint), on this machine or, for the evaluation cells, on any other.

    python bench/reproduce.py                 # run or continue the grid (hours on a CPU)
    python bench/reproduce.py --status        # which cells are done, what each took, on what
    python bench/reproduce.py --table         # the README table, made from the results file
    python bench/reproduce.py --figures       # bench/reproduce_average.png and bench/reproduce_loss.png
    python bench/reproduce.py --methods lora --settings fp,w4a4_rtn   # a part of the grid
Two processes can share the results file once a training's model is there (each row has its own
--out folder, and every save re-reads the file under a lock), e.g. two 1-thread processes on a
2-core machine, with --settings split between them. Train at the thread count the recorded training used:
a training is checked to give the same adapters (sha256) when a new machine runs it again.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import lora  # noqa: E402
import rotate  # noqa: E402
import train  # noqa: E402
from data.options import BadValue, check_options, one_line_errors, option, parse_config, replace_options  # noqa: E402
from model import write_atomically  # noqa: E402

METHODS = {  # name -> (the training cell it evaluates, rotated after merging)
    "lora": ("lora", False), "lbr": ("lora", True), "rolora": ("rolora", False), "rolora_qat": ("rolora_qat", False)}
TRAININGS = {"lora": dict(rotate=False, qat=False), "rolora": dict(rotate=True, qat=False),
             "rolora_qat": dict(rotate=True, qat=True)}
SETTINGS = {  # name -> (w_bits, a_bits, weight quantizer)
    "fp": (16, 16, "rtn"), "w4a4_rtn": (4, 4, "rtn"), "w4a4_gptq": (4, 4, "gptq"), "w6a6_gptq": (6, 6, "gptq")}


@dataclass
class ReproduceConfig:
    model: str = option("smollm2-135m-instruct", "checkpoint directory or a name data/models/prepare.py knows")
    data: str = option("alpaca", "training data (train.py --data)")
    out: str = option("out/reproduce", "where the trained adapters and merged models go (git-ignored)")
    results: str = option("bench/reproduce_results.json", "the results file, one entry per finished cell")
    methods: str = option(",".join(METHODS), f"comma-separated, from {', '.join(METHODS)}")
    settings: str = option(",".join(SETTINGS), f"comma-separated, from {', '.join(SETTINGS)}")
    seed: int = option(0, "seed of the rotation, the adapter init and the data order (the same for all)")
    steps: int = option(200, "optimizer steps of every method (batch 8: 1600 examples, ~1.8 epochs of the "
                        "900-example Alpaca GPT-4 subset)", at_least=1)
    tasks: str = option("boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa", "zero-shot tasks")
    eval_limit: int | None = option(500, "first N items of each task (0 or none: all)", at_least=1,
                                    zero_means_all=True)
    ppl_windows: int | None = option(40, "WikiText-2 windows (0 or none: all)", at_least=1, zero_means_all=True)
    ppl_seq_len: int = option(2048, "perplexity window length", at_least=2)
    val_examples: int | None = option(None, "held-out examples of the loss (0 or none: all)", at_least=1,
                                      zero_means_all=True)
    calib_windows: int = option(32, "GPTQ calibration windows of the training data", at_least=1)
    calib_seq_len: int = option(512, "tokens per GPTQ calibration window", at_least=2)
    status: bool = option(False, "print which cells are done and exit")
    table: bool = option(False, "print the results table (markdown) and exit")
    figures: bool = option(False, "draw the average with error bars and the loss curves (matplotlib) and exit")

    def validate(self):
        check_options(self)
        for flag, names, known in (("--methods", self.method_list(), METHODS), ("--settings", self.setting_list(),
                                                                               SETTINGS)):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ValueError(f"{flag}={','.join(names)}: unknown {unknown}; choose from {', '.join(known)}")

    def method_list(self) -> list[str]:
        return [m for m in self.methods.split(",") if m]

    def setting_list(self) -> list[str]:
        return [s for s in self.settings.split(",") if s]


# -----------------------------------------------------------------------------
# The results file: every finished cell, written atomically after each one


def read_results(args) -> dict:
    path = Path(args.results)
    if not path.is_file():
        return {"cells": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadValue(f"{path}: not valid JSON ({e}); restore it from git or delete it to start over") from None


# the options every number depends on: a results file holds cells of one value of each
NUMBERS_DEPEND_ON = ("model", "data", "seed", "steps", "tasks", "eval_limit", "ppl_windows", "ppl_seq_len",
                     "val_examples", "calib_windows", "calib_seq_len")


def check_same_grid(args, results: dict):
    """Refuse to add cells made with other settings to a results file (its table would mix them)."""
    saved = results.get("grid", {})
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the file has {saved[k]})"
               for k in NUMBERS_DEPEND_ON if k in saved and saved[k] != getattr(args, k)]
    if changed:
        raise ValueError(f"{args.results}: its cells were made with other settings: {'; '.join(changed)}. "
                         "Use those, or another --results file")


@contextlib.contextmanager
def results_locked(path: Path):
    """Hold RESULTS.lock while reading and rewriting the results file, so that two processes of the
    grid on one machine (say --settings fp,w4a4_rtn beside --settings w4a4_gptq,w6a6_gptq, one thread
    each) add their cells to one file without losing each other's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def save_cell(args, results: dict, name: str, cell: dict | None = None):
    """Write cell `name` when finished (cell given), else only its partial row
    (results["partial"][name]); the cells and partial rows other processes wrote meanwhile are
    read back first and kept. Written atomically."""
    path = Path(args.results)
    with results_locked(path):
        on_disk = read_results(args)
        check_same_grid(args, on_disk)
        results["cells"].update({n: done for n, done in on_disk["cells"].items() if n != name})
        mine = results.get("partial", {}).get(name)
        results["partial"] = {n: p for n, p in on_disk.get("partial", {}).items()
                              if n != name and n not in results["cells"]}
        if cell is not None:
            results["cells"][name] = dict(cell, finished=time.strftime("%Y-%m-%d %H:%M:%S"), machine=machine())
        elif mine is not None:
            results["partial"][name] = mine
        if not results["partial"]:
            del results["partial"]
        results["grid"] = {k: getattr(args, k) for k in NUMBERS_DEPEND_ON}
        write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# -----------------------------------------------------------------------------
# The cells


def train_config(args, training: str, **changes) -> train.TrainConfig:
    """train.py's configuration of one training (every method shares all but rotate / qat)."""
    options = dict(
        model=args.model, data=args.data, out=str(Path(args.out) / training), seed=args.seed,
        max_steps=args.steps, eval_every=max(1, args.steps // 10), save_every=max(1, args.steps // 10),
        tasks=args.tasks, eval_limit=args.eval_limit, ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len,
        val_examples=args.val_examples, calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len,
        w_bits=4, a_bits=4, w_method="rtn", **TRAININGS[training])  # --qat trains on W4A4 RTN
    return replace_options(train.TrainConfig(), **(options | changes))


def model_is_here(args, training: str) -> bool:
    """The training's merged model is on this machine (out/ is not committed: a new one trains again)."""
    return (Path(args.out) / training / "merged").is_dir()


def adapters_digest(args, training: str) -> str:
    """sha256 of the saved adapters: the one thing a training passes to its evaluation cells."""
    path = Path(args.out) / training / "adapters" / lora.ADAPTER_WEIGHTS
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_same_training(args, results: dict, training: str, cell: dict):
    """A training run again (its adapters were lost with the machine that made them) must give the
    adapters its finished evaluation cells were made with, else the table would mix two models.
    Training is deterministic for one machine and thread count; another may round differently.
    A training no row was made from yet is simply replaced: nothing in the table mixes the two."""
    old = results["cells"].get(f"train/{training}")
    if old is None:
        return
    same = old["adapters_sha256"] == cell["adapters_sha256"] if "adapters_sha256" in old else (
        old["history"] == as_saved(cell["history"]))  # cells from before the digest was recorded: the loss curve
    if not same and not rows_made_from(results, training):  # nothing made from the old adapters: replace them
        print(f"train/{training}: trained again, it gave other adapters than the recorded ones ({old['machine']}; "
              f"this run on {machine()}); no row was made from those, so this training replaces them", flush=True)
    elif not same:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        kept = next(k for i in range(1000) if not (k := Path(args.out) / f"{training}.differs-{stamp}-{i}").exists())
        (Path(args.out) / training).rename(kept)  # kept for a look, never used by a cell
        raise ValueError(
            f"train/{training}: trained again, it gave other adapters than the ones the finished cells of "
            f"{args.results} were made with (recorded on {old['machine']}; this run on {machine()}); kept in "
            f"{kept}. Run it where those were made, or start this training's cells over: delete train/{training} "
            f"and its eval/ cells from {args.results}, or use another --results file")


def as_saved(value):
    """`value` as the results file gives it back: (step, loss) tuples become lists."""
    return json.loads(json.dumps(value))


def rows_made_from(results: dict, training: str) -> list[str]:
    """The evaluation cells, finished or cut, made from a training's adapters."""
    made = [*results["cells"], *results.get("partial", {})]
    return [n for n in made if n.startswith("eval/") and METHODS[n.split("/")[1]][0] == training]


def run_training(args, results: dict, training: str):
    """Fine-tune and merge (train.py's stages), leaving OUT/<training>/merged; resumes a cut one."""
    cfg = train_config(args, training)
    cfg = dataclasses.replace(cfg, resume=(Path(cfg.out) / "latest").is_file())
    cfg.validate()
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    with train.open_run(cfg) as r:
        model = train.load_model_and_data(r)
        train.rotate_stage(r, model)
        history = train.finetune_stage(r, model)
        train.merge_stage(r, model)
    cell = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "steps": cfg.max_steps, "history": history, "rotation": r.record, "resumed": cfg.resume,
            "adapters_sha256": adapters_digest(args, training)}
    check_same_training(args, results, training, cell)
    save_cell(args, results, f"train/{training}", cell)


def run_evaluation(args, results: dict, method: str, setting: str):
    """One row: the merged model of the method's training (rotated first for LBR), quantized as the
    setting says, evaluated as train.py evaluates (held-out loss, perplexity, the tasks)."""
    training, rotate_after_merge = METHODS[method]
    w_bits, a_bits, w_method = SETTINGS[setting]
    merged = Path(args.out) / training / "merged"
    out = Path(args.out) / "eval" / f"{method}-{setting}"  # one folder a row: two grid processes may run at once
    cfg = train_config(args, training, model=str(merged), rotate=False, qat=False, out=str(out),
                       w_bits=w_bits, a_bits=a_bits, w_method=w_method)
    cfg.validate()
    recorded = results["cells"][f"train/{training}"].get("adapters_sha256")
    if recorded is not None and adapters_digest(args, training) != recorded:
        raise ValueError(f"{merged.parent}: its adapters are not the ones train/{training} in {args.results} "
                         "recorded; delete the folder to train them again")
    name = f"eval/{method}/{setting}"
    partial = results.get("partial", {}).get(name, {"seconds": 0.0, "cpu_seconds": 0.0, "row": {}})
    start, cpu_start = time.perf_counter(), time.process_time()

    def elapsed() -> dict:  # wall time (a paused or shared machine adds to it) and this process's CPU time
        return {"seconds": round(partial["seconds"] + time.perf_counter() - start, 1),
                "cpu_seconds": round(partial.get("cpu_seconds", 0.0) + time.process_time() - cpu_start, 1)}

    def save_partial(row: dict):  # a cut row continues from its last finished part (loss, ppl, a task)
        results.setdefault("partial", {})[name] = elapsed() | {"row": row}
        save_cell(args, results, name)

    with train.open_run(cfg) as r:
        model = train.load_model_and_data(r)
        if rotate_after_merge:  # LBR: the rotation RoLoRA applies before fine-tuning, applied after it
            rotate.rotate_model(model, seed=args.seed)
        if cfg.quant.quantizes:
            model = train.quantized_copy(r, model)
        row = train.evaluate_row(r, model, partial["row"], save_partial)
    save_cell(args, results, name, elapsed() | {"row": row, "quant": dataclasses.asdict(cfg.quant)})


def run_grid(args):
    results = read_results(args)
    check_same_grid(args, results)
    cells = results["cells"]
    needed = {METHODS[m][0] for m in args.method_list()}
    for method in args.method_list():
        training = METHODS[method][0]
        for setting in args.setting_list():
            if f"eval/{method}/{setting}" in cells:
                continue
            if f"train/{training}" not in cells or not model_is_here(args, training):
                print(f"== train/{training}", flush=True)
                run_training(args, results, training)
            print(f"== eval/{method}/{setting}", flush=True)
            run_evaluation(args, results, method, setting)
    print(f"all cells done for {sorted(needed)} x {args.setting_list()}: {args.results}")


# -----------------------------------------------------------------------------
# Reading the results


def part_names(row: dict) -> list[str]:
    """The finished parts of a partial row, in the order evaluate_row runs them."""
    return [k for k in ("heldout_loss", "ppl") if k in row] + list(row.get("tasks", {}))


def print_status(args):
    results = read_results(args)
    cells = results["cells"]
    trainings = list(dict.fromkeys(METHODS[m][0] for m in args.method_list()))
    wanted = [f"train/{t}" for t in trainings] + [f"eval/{m}/{s}" for m in args.method_list()
                                                   for s in args.setting_list()]
    for name in wanted:
        cell = cells.get(name)
        part = results.get("partial", {}).get(name)
        cpu = f" ({cell['cpu_seconds']:.0f} s CPU)" if cell and "cpu_seconds" in cell else ""
        lost = cell and name.startswith("train/") and not model_is_here(args, name.removeprefix("train/"))
        print(f"{name:<25} " + (f"done   {cell['seconds']:>8.0f} s{cpu}  {cell['finished']}  {cell['machine']}"
                                + ("  (its model is not here: trained again before its next row)" if lost else "")
                                if cell else f"cut    {part['seconds']:>8.0f} s  after {', '.join(part_names(part['row']))}"
                                if part else "to do"))
    done = [cells[n]["seconds"] for n in wanted if n in cells]
    print(f"{len(done)} of {len(wanted)} cells done, {sum(done) / 3600:.2f} h of compute")
    print(remaining_estimate(args, results, trainings, wanted))


def remaining_estimate(args, results: dict, trainings: list[str], wanted: list[str]) -> str:
    """The hours left, at the mean wall time of the finished cells of each kind: every row to do,
    and every training whose model is not on this machine while one of its rows is still to do."""
    cells = results["cells"]
    mean = {kind: [c["seconds"] for n, c in cells.items() if n.startswith(kind)] for kind in ("train/", "eval/")}
    if not mean["train/"] or not mean["eval/"]:
        return "the time left is estimated once a training and a row are done"
    mean = {kind: sum(times) / len(times) for kind, times in mean.items()}
    rows_to_do = [n for n in wanted if n.startswith("eval/") and n not in cells]
    to_train = [t for t in trainings if not model_is_here(args, t)
                and any(METHODS[n.split("/")[1]][0] == t for n in rows_to_do)]
    hours = (len(rows_to_do) * mean["eval/"] + len(to_train) * mean["train/"]) / 3600
    return (f"left: {len(rows_to_do)} rows and the trainings {to_train}, about "
            f"{hours:.1f} h at the mean of the finished ones ({mean['train/']:.0f} s a training, "
            f"{mean['eval/']:.0f} s a row), wall time as they ran")


def rows(results: dict) -> dict:
    """{(method, setting): row} of the finished evaluation cells, in grid order."""
    cells = results["cells"]
    return {(m, s): cells[f"eval/{m}/{s}"]["row"] for m in METHODS for s in SETTINGS if f"eval/{m}/{s}" in cells}


def format_table(results: dict) -> str:
    table = rows(results)
    if not table:
        return "(no evaluation cell done yet)"
    tasks = list(next(iter(table.values()))["tasks"])
    head = ["method", "setting"] + [t + (" *" if t == "boolq" else "") for t in tasks] + [
        "average ± stderr", "wiki2 ppl", "held-out loss"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for (method, setting), row in table.items():
        cells = [f"{100 * row['tasks'][t][row['tasks'][t]['metric']]:.1f}" for t in tasks]
        average = f"{100 * row['average']:.2f} ± {100 * row['average_stderr']:.2f}"
        lines.append(f"| {method} | {setting} | " + " | ".join(cells) + f" | {average} | {row['ppl']:.2f} | "
                     f"{row['heldout_loss']:.4f} |")
    answers = readings(table)
    chance = chance_average(results)
    if chance is not None:
        answers.append(f"- Guessing at random scores {100 * chance:.2f} on these items (the mean over tasks of "
                       "1 / the number of choices).")
    lines += [""] + answers if answers else []
    lines.append("\n* BoolQ without its passages (the mirror has none): not comparable with published numbers.")
    return "\n".join(lines)


def difference(table: dict, better: tuple, worse: tuple) -> str:
    """The seven-task average of one row minus another's, in points, with the standard error of the
    difference as if the rows were independent, sqrt(se1^2 + se2^2): conservative, since both rows
    score the same items (their errors correlate, and a paired error would be smaller)."""
    a, b = table[better], table[worse]
    diff = 100 * (a["average"] - b["average"])
    stderr = 100 * math.hypot(a["average_stderr"], b["average_stderr"])
    return f"{diff:+.2f} ± {stderr:.2f} points ({diff / stderr:+.1f} standard errors)"


def chance_average(results: dict) -> float | None:
    """The seven-task average of guessing at random on the grid's items: the mean over tasks of
    the mean of 1 / (number of choices). None where the task data cannot be read here."""
    grid = results.get("grid", {})
    try:
        per_task = [evaluation.load_task(t)[:grid.get("eval_limit")] for t in grid["tasks"].split(",")]
    except (OSError, ValueError, KeyError):
        return None
    return sum(sum(1 / len(r["choices"]) for r in items) / len(items) for items in per_task) / len(per_task)


def readings(table: dict) -> list[str]:
    """The issue's three questions, answered from the finished rows (a question whose rows are not
    all done yet is left out): RoLoRA's share of the gap between quantized LoRA and full-precision
    LoRA; LAR (RoLoRA) against LBR; RoLoRA + QAT against RoLoRA."""
    lines = []
    for setting in ("w4a4_rtn", "w4a4_gptq", "w6a6_gptq"):
        if {("lora", "fp"), ("lora", setting), ("rolora", setting)} <= set(table):
            fp, lora_q, rolora_q = (table[k]["average"] for k in (("lora", "fp"), ("lora", setting),
                                                                   ("rolora", setting)))
            recovered = (rolora_q - lora_q) / (fp - lora_q) if fp != lora_q else math.nan
            lines.append(f"- {setting}: RoLoRA recovers {100 * recovered:.0f}% of the gap between LoRA at "
                         f"{setting} ({100 * lora_q:.2f}) and LoRA at full precision ({100 * fp:.2f}).")
    for setting in SETTINGS:
        if {("rolora", setting), ("lbr", setting)} <= set(table):
            lines.append(f"- {setting}: LAR (RoLoRA) minus LBR: "
                         f"{difference(table, ('rolora', setting), ('lbr', setting))}.")
    for setting in SETTINGS:
        if {("rolora_qat", setting), ("rolora", setting)} <= set(table):
            lines.append(f"- {setting}: RoLoRA + QAT minus RoLoRA: "
                         f"{difference(table, ('rolora_qat', setting), ('rolora', setting))}.")
    return lines


def draw_figures(args):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return print("matplotlib is not installed: no figures drawn")
    results = read_results(args)
    table = rows(results)
    folder = Path(args.results).parent
    if table:
        fig = Figure(figsize=(8, 4), layout="tight")
        ax = fig.subplots()
        settings = [s for s in SETTINGS if any(s == k[1] for k in table)]
        methods = [m for m in METHODS if any(m == k[0] for k in table)]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            done = [(j, s) for j, s in enumerate(settings) if (method, s) in table]
            ax.bar([j + i * width for j, _ in done], [100 * table[(method, s)]["average"] for _, s in done], width,
                   yerr=[100 * table[(method, s)]["average_stderr"] for _, s in done], capsize=3,
                   color=f"C{list(METHODS).index(method)}", label=method)  # one colour per method in every figure
        chance = chance_average(results)
        if chance is not None:
            ax.axhline(100 * chance, color="grey", ls="--", lw=1, label=f"chance ({100 * chance:.1f})")
        ax.set_xticks([j + (len(methods) - 1) * width / 2 for j in range(len(settings))], settings)
        ax.set_ylim(25, None)  # the differences live between chance (~36) and full precision (~44)
        ax.set(ylabel="seven-task average (%) ± stderr",
               title=f"{Path(results['grid']['model']).name}: {results['grid']['steps']} steps, then quantized")
        ax.legend(fontsize=8)
        fig.savefig(folder / "reproduce_average.png", dpi=110)
        print(f"wrote {folder / 'reproduce_average.png'}")
    trainings = {t: results["cells"][f"train/{t}"]["history"] for t in ("lora", "rolora")
                 if f"train/{t}" in results["cells"]}
    if trainings:
        fig = Figure(figsize=(8, 3.5), layout="tight")
        ax = fig.subplots()
        for name, history in trainings.items():
            colour = f"C{list(METHODS).index(name)}"  # the method's colour in the average figure
            ax.plot(range(1, len(history["train_loss"]) + 1), history["train_loss"], lw=0.7, alpha=0.6,
                    color=colour, label=f"{name}: training loss")
            steps, losses = zip(*history["val_loss"])
            ax.plot(steps, losses, "o-", color=colour, label=f"{name}: held-out loss")
        ax.set(xlabel="optimizer step", ylabel="loss (response tokens)", title="LoRA vs RoLoRA fine-tuning")
        ax.legend(fontsize=8)
        fig.savefig(folder / "reproduce_loss.png", dpi=110)
        print(f"wrote {folder / 'reproduce_loss.png'}")


def main(argv=None):
    args = parse_config(ReproduceConfig(), argv, prog="bench/reproduce.py", description=__doc__.split("\n\n")[0])
    if args.status:
        print_status(args)
    elif args.table:
        print(format_table(read_results(args)))
    elif args.figures:
        draw_figures(args)
    else:
        run_grid(args)


if __name__ == "__main__":
    with one_line_errors("bench/reproduce.py"):
        main()
