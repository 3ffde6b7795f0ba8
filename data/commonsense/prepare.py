"""Prepare the commonsense multiple-choice tasks in lm-evaluation-harness form.

Reads the instruction-format test files of LLM-Adapters (BoolQ, PIQA, SIQA, WinoGrande,
ARC-Easy, ARC-Challenge, OpenBookQA), parses the question and the options back out of the
instruction text, and writes one JSONL per task into data/commonsense/ (git-ignored):

    {"task": "arc_easy", "id": "arc_easy-0", "context": "Question: ...\\nAnswer:",
     "choices": ["...", ...], "gold": 0}

`context` and `choices` are what the harness's task yaml produces (doc_to_text, doc_to_choice);
eval.py scores each choice as the continuation " " + choice (the harness's target_delimiter).
WinoGrande is the harness's "multiple input" task: each option fills the blank and becomes its
own context, and the shared rest of the sentence is scored, so its records carry
`contexts` (one per option) and `suffix` instead of `context`; `choices` holds the options.

BoolQ: the LLM-Adapters copy has NO passage, only the question. The harness prompt is
"{passage}\\nQuestion: {question}?\\nAnswer:"; we drop the passage line and keep the rest, so
BoolQ accuracy from this data is not comparable with published BoolQ numbers.

Run:  ROLORA_MIRROR=../shared/assets python data/commonsense/prepare.py
"""
import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python data/commonsense/prepare.py` finds data/mirror.py
    sys.path.insert(0, str(ROOT))
from data.mirror import fetch_raw, read_json, write_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
LLM_ADAPTERS_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/dataset/{}/test.json"

# task name -> (file name in the mirror / LLM-Adapters folder, number of test records)
TASK_FILES = {
    "boolq": ("boolq", 3270),
    "piqa": ("piqa", 1838),
    "siqa": ("social_i_qa", 1954),
    "winogrande": ("winogrande", 1267),
    "arc_easy": ("ARC-Easy", 2376),
    "arc_challenge": ("ARC-Challenge", 1172),
    "openbookqa": ("openbookqa", 500),
}

# The instruction templates of LLM-Adapters, as regular expressions over the whole text.
CHOOSE_ANSWER = "Please choose the correct answer to the question: "
BOOLQ_RE = re.compile(
    re.escape("Please answer the following question with true or false, question: ")
    + r"(?P<question>.*)\?\n\nAnswer format: true/false", re.S)
PIQA_RE = re.compile(
    re.escape("Please choose the correct solution to the question: ")
    + r"(?P<goal>.*)\n\nSolution1: (?P<sol1>.*)\n\nSolution2: (?P<sol2>.*)"
    r"\n\nAnswer format: solution1/solution2", re.S)
WINOGRANDE_RE = re.compile(
    re.escape("Please choose the correct answer to fill in the blank to complete the given sentence: ")
    + r"(?P<sentence>.*)\n\nOption1: (?P<option1>.*) Option2: (?P<option2>.*)"
    r" Answer format: option1/option2", re.S)


def _fail(where: str, why: str, text: str):
    raise ValueError(f"{where}: {why}; instruction was:\n{text!r}")


def _match(pattern: re.Pattern, text: str, where: str, markers: list[str]) -> dict:
    """Full-match one template. Each marker must occur exactly once, or the split is ambiguous."""
    for marker in markers:
        if text.count(marker) != 1:
            _fail(where, f"expected '{marker}' exactly once, found {text.count(marker)}", text)
    m = pattern.fullmatch(text)
    if m is None:
        _fail(where, f"does not match the template {pattern.pattern!r}", text)
    return m.groupdict()


def parse_numbered_options(text: str, where: str) -> tuple[str, list[str]]:
    """ARC / OpenBookQA / SIQA: 'question\\n\\nAnswer1: a Answer2: b ...\\n\\nAnswer format: answer1/...'.

    The number of options comes from the "Answer format" line (a few ARC items have 3 or 5).
    """
    fmt = re.fullmatch(re.escape(CHOOSE_ANSWER) + r".*\n\nAnswer format: (answer\d+(?:/answer\d+)*)", text, re.S)
    if fmt is None:
        _fail(where, "no 'Answer format: answer1/...' line", text)
    n_options = len(fmt.group(1).split("/"))
    if fmt.group(1) != "/".join(f"answer{k}" for k in range(1, n_options + 1)):
        _fail(where, f"unexpected answer format '{fmt.group(1)}'", text)
    if f"Answer{n_options + 1}: " in text:
        _fail(where, f"more options than the {n_options} announced by the answer format", text)
    option_groups = " ".join(f"Answer{k}: (?P<option{k}>.*)" for k in range(1, n_options + 1))
    pattern = re.compile(re.escape(CHOOSE_ANSWER) + r"(?P<question>.*)\n\n" + option_groups
                         + r"\n\nAnswer format: .*", re.S)
    markers = ["\n\nAnswer1: "] + [f" Answer{k}: " for k in range(2, n_options + 1)]
    doc = _match(pattern, text, where, markers)
    return doc["question"], [doc[f"option{k}"] for k in range(1, n_options + 1)]


def field(record: dict, key: str, where: str) -> str:
    """record[key], which must be a string: a missing or mistyped field is a ValueError naming
    the file, the record and the key (a bare KeyError('answer') names none of them)."""
    if key not in record:
        raise ValueError(f"{where}: missing key '{key}' (record has {sorted(record)})")
    if not isinstance(record[key], str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


def checked_answer(record: dict, where: str) -> str:
    """The 'answer' field, which must agree with the 'output' sentence: when they disagree the
    gold label is ambiguous, so the record is refused rather than one of them trusted."""
    answer, output = field(record, "answer", where), field(record, "output", where)
    if output != f"the correct answer is {answer}":
        raise ValueError(f"{where}: answer '{answer}' disagrees with output '{output}'")
    return answer


def gold_index(record: dict, prefix: str, n_choices: int, where: str) -> int:
    """'answer3' -> 2, checked against the 'output' sentence and the number of choices."""
    answer = checked_answer(record, where)
    m = re.fullmatch(re.escape(prefix) + r"(\d+)", answer)
    if m is None or not 1 <= int(m.group(1)) <= n_choices:
        raise ValueError(f"{where}: answer '{answer}' is not one of {prefix}1..{prefix}{n_choices}")
    return int(m.group(1)) - 1


def to_harness_record(task: str, index: int, record: dict, where: str) -> dict:
    """Parse one LLM-Adapters record and build the harness's context and choices for it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    text = field(record, "instruction", where)
    out = {"task": task, "id": f"{task}-{index}"}
    if task == "boolq":
        question = _match(BOOLQ_RE, text, where, ["question: "])["question"]
        answer = checked_answer(record, where)
        if answer not in ("true", "false"):
            raise ValueError(f"{where}: BoolQ answer must be true/false, got '{answer}'")
        # super_glue/boolq: "{{passage}}\nQuestion: {{question}}?\nAnswer:" with choices no/yes.
        # No passage in this copy, so its line (and the newline that ends it) is left out.
        out.update(context=f"Question: {question}?\nAnswer:", choices=["no", "yes"],
                   gold=int(answer == "true"))
    elif task == "piqa":
        doc = _match(PIQA_RE, text, where, ["\n\nSolution1: ", "\n\nSolution2: "])
        out.update(context=f"Question: {doc['goal']}\nAnswer:", choices=[doc["sol1"], doc["sol2"]],
                   gold=gold_index(record, "solution", 2, where))
    elif task == "winogrande":
        doc = _match(WINOGRANDE_RE, text, where, ["\n\nOption1: ", " Option2: ", "_"])
        sentence = doc["sentence"]
        blank = sentence.index("_")
        # preprocess_winogrande.py: partial_context = sentence[:blank] + option,
        # partial_target = sentence[blank + 1:].strip(); the scored continuation is " " + target.
        options = [doc["option1"], doc["option2"]]
        out.update(contexts=[sentence[:blank] + option for option in options],
                   suffix=sentence[blank + 1:].strip(), choices=options,
                   gold=gold_index(record, "option", 2, where))
    else:  # arc_easy, arc_challenge, openbookqa, siqa share the "Answer1: ..." layout
        question, options = parse_numbered_options(text, where)
        if task.startswith("arc_"):
            context = f"Question: {question}\nAnswer:"   # arc_easy.yaml / arc_challenge.yaml
        elif task == "siqa":
            # siqa.yaml: "Q: {{context}} {{question}}\nA:"; LLM-Adapters already joined
            # context and question with one space.
            context = f"Q: {question}\nA:"
        else:
            context = question  # openbookqa.yaml: doc_to_text is question_stem alone
        out.update(context=context, choices=options, gold=gold_index(record, "answer", len(options), where))
    return out


def convert_task(task: str, raw_path: Path) -> list[dict]:
    """All records of one task; raises on the first record that does not parse or a wrong count.
    read_json names the file on invalid JSON and turns Windows "\\r\\n" into "\\n"."""
    records = read_json(raw_path)
    if not isinstance(records, list):
        raise ValueError(f"{raw_path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{raw_path}: no records")
    expected = TASK_FILES[task][1]
    if len(records) != expected:
        raise ValueError(f"{raw_path}: {len(records)} records, expected {expected} for {task}")
    return [to_harness_record(task, i, r, f"{raw_path} record {i}") for i, r in enumerate(records)]


def prepare(out_dir: Path | None = None, tasks: list[str] | None = None) -> dict[str, Path]:
    """Write <out_dir>/<task>.jsonl for each task (default all seven); return task -> path.
    Every task is parsed before any file is written, so a bad input file leaves no output."""
    out_dir = Path(out_dir) if out_dir is not None else HERE
    tasks = tasks or list(TASK_FILES)
    for task in tasks:
        if task not in TASK_FILES:
            raise ValueError(f"unknown commonsense task '{task}'; known: {', '.join(TASK_FILES)}")
    converted = {}
    for task in tasks:
        folder = TASK_FILES[task][0]
        raw = fetch_raw(f"data/commonsense/{folder}_test.json", [LLM_ADAPTERS_URL.format(folder)],
                        HERE / "raw" / folder)
        converted[task] = convert_task(task, raw)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {task: write_jsonl(records, out_dir / f"{task}.jsonl") for task, records in converted.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default data/commonsense/)")
    parser.add_argument("--tasks", default=",".join(TASK_FILES), help="comma-separated task names")
    args = parser.parse_args()
    for task, path in prepare(args.out, args.tasks.split(",")).items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{task:14s} {n:6d} records -> {path}")
