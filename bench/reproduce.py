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
(bench/reproduce_results.json). A training's adapters are kept beside it, git-ignored
(bench/reproduce_adapters/, PEFT's layout; copied by hand to another machine): a checkout without
the merged model merges them again (seconds) instead of training again (half an hour). An interrupted run continues where it stopped
(a training cell from its last checkpoint), on this machine or, for the evaluation cells, on any other.

    python bench/reproduce.py                 # run or continue the grid (hours on a CPU)
    python bench/reproduce.py --status        # which cells are done, what each took, on what
    python bench/reproduce.py --table         # the README table, made from the results file
    python bench/reproduce.py --figures       # bench/reproduce_average.png and bench/reproduce_loss.png
    python bench/reproduce.py --methods lora --settings fp,w4a4_rtn   # a part of the grid
    python bench/reproduce.py --seeds 0,1,2 --methods lbr,rolora --settings w4a4_rtn,w4a4_gptq  # LAR vs LBR, paired
Two processes can share the results file once a training's model is there (each row has its own
--out folder, and every save re-reads the file under a lock), e.g. two 1-thread processes on a
2-core machine, with --settings split between them. A training made again (its model and its kept
adapters lost) is checked to be the recorded one up to float rounding (same_training).

--seeds runs the paired experiment: the cells of each seed (of data order, adapter initialisation
and rotation alike) under seed<S>/, every evaluation row with the per-item records a paired
comparison needs (each item's choice and correctness, each perplexity window's and held-out
example's summed loss and tokens); --table then adds LAR minus LBR per seed and over the seeds,
with paired standard errors.
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
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402
import lora  # noqa: E402
import rotate  # noqa: E402
import train  # noqa: E402
from data.options import BadValue, check_options, one_line_errors, option, parse_config, replace_options  # noqa: E402
from model import write_atomically  # noqa: E402
from paired import paired_table  # noqa: E402

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
    keep: str = option("bench/reproduce_adapters", "where every finished training's adapters are kept "
                       "(git-ignored; '': not kept)")
    methods: str = option(",".join(METHODS), f"comma-separated, from {', '.join(METHODS)}")
    settings: str = option(",".join(SETTINGS), f"comma-separated, from {', '.join(SETTINGS)}")
    seed: int = option(0, "seed of the rotation, the adapter init and the data order (the same for all)")
    seeds: str = option("", "comma-separated seeds of the paired experiment: each seed's cells under seed<S>/, "
                        "with per-item records ('': the grid's own cells, of --seed)")
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

        try:
            self.seed_list()
        except ValueError:
            raise ValueError(f"--seeds={self.seeds!r}: must be comma-separated integers") from None

    def seed_list(self) -> list[int]:
        return [int(s) for s in self.seeds.split(",") if s]

    def replicates(self) -> list[tuple[int, str]]:
        """(seed, cell prefix) of every set of cells to run: the grid's own (prefix ''), or one per --seeds."""
        return [(s, f"seed{s}/") for s in self.seed_list()] or [(self.seed, "")]

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
    return f"CPU {cpu_model()} ({platform.machine()}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def cpu_model() -> str:
    """The CPU's name with its family and model numbers: "AMD EPYC" alone names several
    generations, of different speeds."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        fields = {}
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or platform.processor() or "unknown"
    return name + (f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else "")


# -----------------------------------------------------------------------------
# The cells


def train_config(args, training: str, seed: int, prefix: str = "", **changes) -> train.TrainConfig:
    """train.py's configuration of one training (every method shares all but rotate / qat)."""
    options = dict(
        model=args.model, data=args.data, out=str(Path(args.out) / prefix / training), seed=seed,
        max_steps=args.steps, eval_every=max(1, args.steps // 10), save_every=max(1, args.steps // 10),
        tasks=args.tasks, eval_limit=args.eval_limit, ppl_windows=args.ppl_windows, ppl_seq_len=args.ppl_seq_len,
        val_examples=args.val_examples, calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len,
        w_bits=4, a_bits=4, w_method="rtn", **TRAININGS[training])  # --qat trains on W4A4 RTN
    return replace_options(train.TrainConfig(), **(options | changes))


def model_is_here(args, training: str, prefix: str = "") -> bool:
    """The training's merged model is on this machine (out/ is not committed: a new one merges the
    kept adapters again, or trains again without them)."""
    return (Path(args.out) / prefix / training / "merged").is_dir()


def kept_adapters(args, training: str, prefix: str = "") -> Path | None:
    """The folder of a training's kept adapters, if they are kept and there."""
    folder = Path(args.keep) / prefix / training
    return folder if args.keep and (folder / lora.ADAPTER_WEIGHTS).is_file() else None


def keep_adapters(args, training: str, prefix: str = ""):
    """Copy a finished training's adapters (weights and PEFT config) to --keep, each file atomically."""
    folder = Path(args.keep) / prefix / training
    folder.mkdir(parents=True, exist_ok=True)
    for name in (lora.ADAPTER_CONFIG, lora.ADAPTER_WEIGHTS):  # the weights last: kept_adapters looks for them
        data = (adapters_file(args, training, prefix).parent / name).read_bytes()
        write_atomically(folder / name, lambda tmp: Path(tmp).write_bytes(data))


def adapters_file(args, training: str, prefix: str = "") -> Path:
    return Path(args.out) / prefix / training / "adapters" / lora.ADAPTER_WEIGHTS


def adapters_digest(args, training: str, prefix: str = "") -> str:
    """sha256 of the saved adapters: the one thing a training passes to its evaluation cells."""
    return file_digest(adapters_file(args, training, prefix))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# A training made again on another machine sums in another order, so its adapters differ from the
# recorded ones by float rounding: bit-for-bit equality holds only where a cell was made. "The same
# training" is judged by what can be compared across machines: every loss of the curve within
# LOSS_RTOL of the recorded one, and a fingerprint of the adapters (FINGERPRINT_SIZE fixed random
# projections of all their values) within FINGERPRINT_RTOL. Another seed or other hyper-parameters
# change the very first losses and move the projections by their whole size.
LOSS_RTOL = 1e-3
FINGERPRINT_SIZE, FINGERPRINT_RTOL = 16, 1e-2


def adapters_fingerprint(path: Path) -> list[float]:
    """FINGERPRINT_SIZE projections of the adapters on fixed random directions (seeded, the same on
    every machine): small enough to record, and two adapters' largest relative difference shows in them."""
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(FINGERPRINT_SIZE, dtype=torch.float64)
    for name in sorted(tensors):
        values = tensors[name].double().flatten()
        total += torch.randn(FINGERPRINT_SIZE, values.numel(), generator=generator, dtype=torch.float64) @ values
    return total.tolist()


def training_difference(old: dict, new: dict) -> dict:
    """How far a training made again is from the recorded one: the largest relative difference of
    a loss of the curve (training and held-out), and of the fingerprint (None where it has none)."""
    old_h, new_h = old["history"], as_saved(new["history"])
    if len(old_h["train_loss"]) != len(new_h["train_loss"]) or \
            [s for s, _ in old_h["val_loss"]] != [s for s, _ in new_h["val_loss"]]:
        return {"loss": math.inf, "fingerprint": None}
    pairs = list(zip(old_h["train_loss"], new_h["train_loss"])) + [
        (a, b) for (_, a), (_, b) in zip(old_h["val_loss"], new_h["val_loss"])]
    loss = max(abs(a - b) / abs(a) for a, b in pairs)
    fingerprint = None
    if "adapters_fingerprint" in old:
        a, b = torch.tensor(old["adapters_fingerprint"]), torch.tensor(new["adapters_fingerprint"])
        fingerprint = ((a - b).abs().max() / a.abs().max()).item()
    return {"loss": loss, "fingerprint": fingerprint}


def same_training(old: dict, new: dict) -> tuple[bool, dict]:
    """(whether `new` is the recorded training `old` made again, bit for bit or within float
    rounding; the measured differences)."""
    if old.get("adapters_sha256") == new["adapters_sha256"]:
        return True, {"loss": 0.0, "fingerprint": 0.0}
    difference = training_difference(old, new)
    same = difference["loss"] <= LOSS_RTOL and (difference["fingerprint"] is None
                                                or difference["fingerprint"] <= FINGERPRINT_RTOL)
    return same, difference


def check_same_training(args, results: dict, training: str, cell: dict, prefix: str = ""):
    """A training run again (its adapters were lost with the machine that made them) must be the
    one its finished evaluation cells were made with (same_training), else the table would mix two
    models; the cell records how far it is from the recorded one. A training no row was made from
    yet is simply replaced: nothing in the table mixes the two."""
    old = results["cells"].get(f"{prefix}train/{training}")
    if old is None:
        return
    same, difference = same_training(old, cell)
    cell["same_as_recorded"] = {"adapters_sha256": old["adapters_sha256"], "machine": old["machine"],
                                **difference} if "adapters_sha256" in old else {"machine": old["machine"], **difference}
    if not same and not rows_made_from(results, training, prefix):  # nothing made from the old adapters
        print(f"{prefix}train/{training}: trained again, it gave another training than the recorded one "
              f"({old['machine']}; this run on {machine()}; {describe(difference)}); no row was made from it, "
              "so this training replaces it", flush=True)
        del cell["same_as_recorded"]
    elif not same:
        stamp = time.strftime('%Y%m%d-%H%M%S')
        folder = Path(args.out) / prefix
        kept = next(k for i in range(1000) if not (k := folder / f"{training}.differs-{stamp}-{i}").exists())
        (folder / training).rename(kept)  # kept for a look, never used by a cell
        raise ValueError(
            f"{prefix}train/{training}: trained again, it gave another training than the one the finished cells "
            f"of {args.results} were made with ({describe(difference)}; recorded on {old['machine']}; this run "
            f"on {machine()}); kept in {kept}. Start this training's cells over: delete {prefix}train/{training} "
            f"and its eval/ cells from {args.results}, or use another --results file")


def describe(difference: dict) -> str:
    fingerprint = difference["fingerprint"]
    return (f"loss curve {difference['loss']:.1e} apart (relative; same below {LOSS_RTOL:g})"
            + ("" if fingerprint is None else
               f", adapters {fingerprint:.1e} apart (relative; same below {FINGERPRINT_RTOL:g})"))


def as_saved(value):
    """`value` as the results file gives it back: (step, loss) tuples become lists."""
    return json.loads(json.dumps(value))


def rows_made_from(results: dict, training: str, prefix: str = "") -> list[str]:
    """The evaluation cells, finished or cut, made from a training's adapters."""
    made = [*results["cells"], *results.get("partial", {})]
    return [n for n in made if n.startswith(f"{prefix}eval/")
            and METHODS[n.removeprefix(prefix).split("/")[1]][0] == training]


def run_training(args, results: dict, training: str, seed: int, prefix: str = ""):
    """Fine-tune and merge (train.py's stages), leaving OUT/<training>/merged; resumes a cut one."""
    cfg = train_config(args, training, seed, prefix)
    cfg = dataclasses.replace(cfg, resume=(Path(cfg.out) / "latest").is_file())
    cfg.validate()
    resumed_at = saved_step(args, training, prefix) if cfg.resume else None
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(cfg.seed)
    with train.open_run(cfg) as r:
        model = train.load_model_and_data(r)
        train.rotate_stage(r, model)
        history = train.finetune_stage(r, model)
        train.merge_stage(r, model)
    cell = {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
            "steps": cfg.max_steps, "seed": seed, "history": history, "rotation": r.record, "resumed": cfg.resume,
            **({"resumed_at_step": resumed_at} if cfg.resume else {}),
            "adapters_sha256": adapters_digest(args, training, prefix),
            "adapters_fingerprint": adapters_fingerprint(adapters_file(args, training, prefix))}
    check_same_training(args, results, training, cell, prefix)
    twin = results["cells"].get(f"train/{training}") if prefix == f"seed{args.seed}/" else None
    if twin is not None:  # the grid's own training of this seed, made elsewhere: how far apart they are
        same, difference = same_training(twin, cell)
        cell["grid_training"] = {"same": same, "machine": twin["machine"], **difference}
    save_cell(args, results, f"{prefix}train/{training}", cell)


def merge_kept_adapters(args, results: dict, training: str, seed: int, prefix: str = ""):
    """Make OUT/<training>/merged again from the kept adapters, as the training made it: the same
    base, rotated with the same seed, plus the recorded adapters (checked by their digest), merged."""
    kept = kept_adapters(args, training, prefix)
    name = f"{prefix}train/{training}"
    if file_digest(kept / lora.ADAPTER_WEIGHTS) != results["cells"][name]["adapters_sha256"]:
        raise ValueError(f"{kept / lora.ADAPTER_WEIGHTS}: not the adapters {name} in {args.results} recorded; "
                         "restore the folder from git, or delete it to train again")
    cfg = train_config(args, training, seed, prefix)
    cfg.validate()
    with train.open_run(cfg) as r:
        model = train.load_model_and_data(r)
        train.rotate_stage(r, model)
        lora.load_adapters(model, kept)
        train.merge_stage(r, model)


def run_evaluation(args, results: dict, method: str, setting: str, seed: int, prefix: str = ""):
    """One row: the merged model of the method's training (rotated first for LBR), quantized as the
    setting says, evaluated as train.py evaluates (held-out loss, perplexity, the tasks)."""
    training, rotate_after_merge = METHODS[method]
    w_bits, a_bits, w_method = SETTINGS[setting]
    merged = Path(args.out) / prefix / training / "merged"
    out = Path(args.out) / prefix / "eval" / f"{method}-{setting}"  # one folder a row: two processes may run at once
    cfg = train_config(args, training, seed, prefix, model=str(merged), rotate=False, qat=False, out=str(out),
                       w_bits=w_bits, a_bits=a_bits, w_method=w_method)
    cfg.validate()
    recorded = results["cells"][f"{prefix}train/{training}"].get("adapters_sha256")
    if recorded is not None and adapters_digest(args, training, prefix) != recorded:
        raise ValueError(f"{merged.parent}: its adapters are not the ones {prefix}train/{training} in {args.results} "
                         "recorded; delete the folder to train them again")
    name = f"{prefix}eval/{method}/{setting}"
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
            rotate.rotate_model(model, seed=seed)
        if cfg.quant.quantizes:
            model = train.quantized_copy(r, model)
        row = train.evaluate_row(r, model, partial["row"], save_partial)
    save_cell(args, results, name, elapsed() | {"row": row, "quant": dataclasses.asdict(cfg.quant)})


def run_grid(args):
    results = read_results(args)
    check_same_grid(args, results)
    cells = results["cells"]
    for seed, prefix in args.replicates():
        for method in args.method_list():
            training = METHODS[method][0]
            for setting in args.setting_list():
                if f"{prefix}eval/{method}/{setting}" in cells:
                    continue
                trained = f"{prefix}train/{training}" in cells
                if trained and not model_is_here(args, training, prefix) and kept_adapters(args, training, prefix):
                    print(f"== {prefix}train/{training}: merged again from its kept adapters", flush=True)
                    merge_kept_adapters(args, results, training, seed, prefix)
                elif not trained or not model_is_here(args, training, prefix):
                    print(f"== {prefix}train/{training}", flush=True)
                    run_training(args, results, training, seed, prefix)
                if args.keep and not kept_adapters(args, training, prefix) and \
                        adapters_digest(args, training, prefix) == cells[f"{prefix}train/{training}"]["adapters_sha256"]:
                    keep_adapters(args, training, prefix)
                print(f"== {prefix}eval/{method}/{setting}", flush=True)
                run_evaluation(args, results, method, setting, seed, prefix)
    print(f"all cells done for {args.method_list()} x {args.setting_list()}"
          + (f" x seeds {args.seed_list()}" if args.seed_list() else "") + f": {args.results}")


# -----------------------------------------------------------------------------
# Reading the results


def part_names(row: dict) -> list[str]:
    """The finished parts of a partial row, in the order evaluate_row runs them."""
    return [k for k in ("heldout_loss", "ppl") if k in row] + list(row.get("tasks", {}))


def print_status(args):
    results = read_results(args)
    cells = results["cells"]
    trainings = list(dict.fromkeys(METHODS[m][0] for m in args.method_list()))
    wanted = [name for _, prefix in args.replicates() for name in
              [f"{prefix}train/{t}" for t in trainings] + [f"{prefix}eval/{m}/{s}" for m in args.method_list()
                                                          for s in args.setting_list()]]
    width = max(map(len, wanted))
    for name in wanted:
        cell = cells.get(name)
        part = results.get("partial", {}).get(name)
        cpu = f" ({cell['cpu_seconds']:.0f} s CPU)" if cell and "cpu_seconds" in cell else ""
        prefix, _, kind = name.rpartition("train/") if "train/" in name else ("", "", "")
        lost = cell and kind and not model_is_here(args, kind, prefix)
        again = "merged again from its kept adapters" if lost and kept_adapters(args, kind, prefix) else "trained again"
        step = saved_step(args, kind, prefix) if kind and not cell else None
        resumed = ""
        if cell and cell.get("resumed"):
            at = f" at step {cell['resumed_at_step']}" if "resumed_at_step" in cell else ""
            resumed = f"  (resumed{at}: the time of its last part only)"
        print(f"{name:<{width}} " + (f"done   {cell['seconds']:>8.0f} s{cpu}  {cell['finished']}  {cell['machine']}"
                                + resumed + (f"  (its model is not here: {again} before its next row)" if lost else "")
                                if cell else f"cut    {part['seconds']:>8.0f} s  after {', '.join(part_names(part['row']))}"
                                if part else f"cut    at step {step} of {args.steps} (its checkpoint, on this machine)"
                                if step else "to do"))
    done = [cells[n]["seconds"] for n in wanted if n in cells]
    print(f"{len(done)} of {len(wanted)} cells done, {sum(done) / 3600:.2f} h of compute")
    print(remaining_estimate(args, results, trainings, wanted))


def saved_step(args, training: str, prefix: str = "") -> int | None:
    """The step of a cut training's last checkpoint on this machine (train.py's OUT/latest), if any."""
    latest = Path(args.out) / prefix / training / "latest"
    return int(latest.read_text().strip().removeprefix("ckpt-")) if latest.is_file() else None


def remaining_estimate(args, results: dict, trainings: list[str], wanted: list[str]) -> str:
    """The hours left, at the mean wall time of the finished cells of each kind (those made on this
    CPU model where there are any: another machine's times can be a third of these): every row to
    do, and every training whose model is not on this machine while one of its rows is still to do."""
    cells = results["cells"]
    kind_of = lambda name: name.split("/")[-3 if "eval/" in name else -2] + "/"  # noqa: E731
    mean, where = {}, set()
    for kind in ("train/", "eval/"):
        finished = [c for n, c in cells.items() if kind_of(n) == kind and not c.get("resumed")]  # whole cells only
        here = [c for c in finished if f"CPU {cpu_model()} " in c["machine"]]
        mean[kind] = [c["seconds"] for c in here or finished]
        where.add("on this CPU" if here else "anywhere")
    if not mean["train/"] or not mean["eval/"]:
        return "the time left is estimated once a training and a row are done"
    mean = {kind: sum(times) / len(times) for kind, times in mean.items()}
    rows_to_do = [n for n in wanted if "eval/" in n and n not in cells]
    to_train = [prefix + t for _, prefix in args.replicates() for t in trainings
                if not model_is_here(args, t, prefix) and not (f"{prefix}train/{t}" in cells and kept_adapters(args, t, prefix))
                and any(n.startswith(prefix + "eval/") and METHODS[n.split("/")[-2]][0] == t for n in rows_to_do)]
    hours = (len(rows_to_do) * mean["eval/"] + len(to_train) * mean["train/"]) / 3600
    return (f"left: {len(rows_to_do)} rows and the trainings {to_train}, about "
            f"{hours:.1f} h at the mean of the finished ones made {' or '.join(sorted(where))} "
            f"({mean['train/']:.0f} s a training, "
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
    lines += paired_table(results["cells"], SETTINGS) + machine_noise(results)
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


# -----------------------------------------------------------------------------
# The paired experiment (issue 26): its table is paired.py's; here the machine noise of one row


def machine_noise(results: dict) -> list[str]:
    """One row evaluated from two trainings of the same seed (the grid's own, recorded on another
    machine, and the paired experiment's): how far it moves is the noise a difference must beat."""
    cells, lines = results["cells"], []
    seed = results.get("grid", {}).get("seed", 0)
    for training in TRAININGS:
        twin = cells.get(f"seed{seed}/train/{training}", {}).get("grid_training")
        if twin is not None:
            lines.append(f"- Machine noise, train/{training} made again as seed{seed}/train/{training} (recorded "
                         f"on {twin['machine']}): {describe(twin)}; {'the same' if twin['same'] else 'NOT the same'} "
                         "training by same_training.")
    for method in METHODS:
        for setting in SETTINGS:
            a, b = cells.get(f"eval/{method}/{setting}"), cells.get(f"seed{seed}/eval/{method}/{setting}")
            if a is None or b is None:
                continue
            a, b = a["row"], b["row"]
            lines.append(f"- Machine noise, {method} at {setting} from two trainings of seed {seed}: ppl "
                         f"{a['ppl']:.2f} and {b['ppl']:.2f} ({100 * (b['ppl'] / a['ppl'] - 1):+.1f}%), average "
                         f"{100 * a['average']:.2f} and {100 * b['average']:.2f}, held-out loss "
                         f"{a['heldout_loss']:.4f} and {b['heldout_loss']:.4f}.")
    return [""] + lines if lines else []


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
