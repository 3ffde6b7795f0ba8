"""data/*/prepare.py on small synthetic inputs: malformed records, empty and invalid files, and
Windows copies (CRLF line endings, a byte-order mark).

Every bad input must be a ValueError that names the file (and the record or line where there is
one), never a bare KeyError / json.JSONDecodeError / UnicodeDecodeError, and must leave no
output file. The full mirror files are parsed by the slow tests of test_eval.py; these take
milliseconds. Each synthetic mirror is a tmp folder laid out like ../shared/assets and named
by ROLORA_MIRROR."""
import bz2
import json
import re

import pytest

import helpers  # noqa: F401  (puts the repository root on sys.path)
from data import mirror as data_mirror
from data.alpaca import prepare as alpaca
from data.commonsense import prepare as commonsense
from data.hellaswag import prepare as hellaswag
from data.tinystories import prepare as tinystories
from data.wikitext2 import prepare as wikitext2


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """An empty mirror folder, named by ROLORA_MIRROR; put() fills it."""
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv("ROLORA_MIRROR", str(root))
    return root


@pytest.fixture(autouse=True)
def two_records_per_file(monkeypatch):
    """The scripts check the real record counts (1838 PIQA items...): expect 2 here instead."""
    for task, (folder, _) in list(commonsense.TASK_FILES.items()):
        monkeypatch.setitem(commonsense.TASK_FILES, task, (folder, 2))
    monkeypatch.setattr(hellaswag, "N_ITEMS", 2)


def put(root, mirror_path: str, content):
    """Write bytes, text (kept byte for byte: no newline translation) or JSON records."""
    path = root / mirror_path
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    elif not isinstance(content, bytes):
        content = json.dumps(content, indent=1).encode("utf-8")
    path.write_bytes(content)
    return path


def windows_copy(text: str, bom: bool = False) -> bytes:
    """The file as a Windows editor saves it: CRLF line endings, optionally a UTF-8 BOM."""
    return (b"\xef\xbb\xbf" if bom else b"") + text.replace("\n", "\r\n").encode("utf-8")


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def assert_refused(run, out, *patterns):
    """run() raises a ValueError whose message matches every pattern and writes nothing in out.
    JSONDecodeError and UnicodeDecodeError are ValueErrors too, but they do not name the file."""
    with pytest.raises(ValueError) as info:
        run()
    assert not isinstance(info.value, (json.JSONDecodeError, UnicodeDecodeError)), repr(info.value)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), f"{pattern!r} not in: {info.value}"
    assert files_in(out) == [], "a bad input must leave no output file"


# -----------------------------------------------------------------------------
# commonsense: records copied from the mirror's LLM-Adapters files

REAL = {
    "boolq": {
        "instruction": "Please answer the following question with true or false, question: does ethanol "
                       "take more energy make that produces?\n\nAnswer format: true/false",
        "input": "", "output": "the correct answer is false", "answer": "false"},
    "piqa": {
        "instruction": "Please choose the correct solution to the question: How do I ready a guinea pig "
                       "cage for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full "
                       "of a few inches of bedding made of ripped paper strips, you will also need to supply "
                       "it with a water bottle and a food dish.\n\nSolution2: Provide the guinea pig with a "
                       "cage full of a few inches of bedding made of ripped jeans material, you will also "
                       "need to supply it with a water bottle and a food dish.\n\nAnswer format: "
                       "solution1/solution2",
        "input": "", "output": "the correct answer is solution1", "answer": "solution1"},
    "winogrande": {
        "instruction": "Please choose the correct answer to fill in the blank to complete the given "
                       "sentence: Sarah was a much better surgeon than Maria so _ always got the easier "
                       "cases.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2",
        "input": "", "output": "the correct answer is option2", "answer": "option2"},
    "arc_easy": {
        "instruction": "Please choose the correct answer to the question: Which statement best explains "
                       "why photosynthesis is the foundation of most food webs?\n\nAnswer1: Sunlight is the "
                       "source of energy for nearly all ecosystems. Answer2: Most ecosystems are found on "
                       "land instead of in water. Answer3: Carbon dioxide is more available than other "
                       "gases. Answer4: The producers in all ecosystems are plants.\n\nAnswer format: "
                       "answer1/answer2/answer3/answer4",
        "input": "", "output": "the correct answer is answer1", "answer": "answer1"},
}

PARSED = {  # what the harness builds from REAL (doc_to_text, doc_to_choice, gold)
    "boolq": {"context": "Question: does ethanol take more energy make that produces?\nAnswer:",
              "choices": ["no", "yes"], "gold": 0},
    "piqa": {"context": "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
             "choices": [
                 "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                 "strips, you will also need to supply it with a water bottle and a food dish.",
                 "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans "
                 "material, you will also need to supply it with a water bottle and a food dish."],
             "gold": 0},
    "winogrande": {"contexts": ["Sarah was a much better surgeon than Maria so Sarah",
                                "Sarah was a much better surgeon than Maria so Maria"],
                   "suffix": "always got the easier cases.", "choices": ["Sarah", "Maria"], "gold": 1},
    "arc_easy": {"context": "Question: Which statement best explains why photosynthesis is the foundation "
                            "of most food webs?\nAnswer:",
                 "choices": ["Sunlight is the source of energy for nearly all ecosystems.",
                             "Most ecosystems are found on land instead of in water.",
                             "Carbon dioxide is more available than other gases.",
                             "The producers in all ecosystems are plants."],
                 "gold": 0},
}


def task_path(task: str) -> str:
    return f"data/commonsense/{commonsense.TASK_FILES[task][0]}_test.json"


def edited(task: str, old: str = "", new: str = "", **fields) -> dict:
    """REAL[task] with `old` replaced by `new` in the instruction and other fields overridden."""
    record = dict(REAL[task], **fields)
    if old:
        assert old in record["instruction"], old  # the edit must really change the record
        record["instruction"] = record["instruction"].replace(old, new)
    return record


def run_commonsense(root, out, task, content):
    """Put the task's mirror file and prepare that task alone into out."""
    raw = put(root, task_path(task), content)
    return raw, lambda: commonsense.prepare(out, tasks=[task])


def read_jsonl(path) -> list[dict]:
    """The records, read the way train.py and eval.py read them (str.splitlines)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", sorted(REAL))
def test_commonsense_parses_a_real_record(task, mirror, tmp_path):
    _, run = run_commonsense(mirror, tmp_path / "out", task, [REAL[task], REAL[task]])
    records = read_jsonl(run()[task])
    assert records == [{"task": task, "id": f"{task}-{i}", **PARSED[task]} for i in range(2)]


BAD_INSTRUCTIONS = {
    "option marker missing": ("arc_easy", " Answer2: ", " ", r"expected ' Answer2: ' exactly once, found 0"),
    "option marker repeated": ("piqa", "paper strips,", "paper strips,\n\nSolution2: ",
                               r"expected '\n\nSolution2: ' exactly once, found 2"),
    "solution marker missing": ("piqa", "\n\nSolution1: ", "\n\n",
                                r"expected '\n\nSolution1: ' exactly once, found 0"),
    "no blank": ("winogrande", " _ ", " she ", r"expected '_' exactly once, found 0"),
    "two blanks": ("winogrande", "Maria so", "_ so", r"expected '_' exactly once, found 2"),
    "no answer format": ("arc_easy", "\n\nAnswer format: answer1/answer2/answer3/answer4", "",
                         r"no 'Answer format"),
    "answer format skips": ("arc_easy", "answer3/answer4", "answer3/answer5", r"unexpected answer format"),
    "unannounced option": ("arc_easy", "are plants.", "are plants. Answer5: rocks.",
                           r"more options than the 4 announced"),
    "text after template": ("boolq", "true/false", "true/false please", r"does not match the template"),
    "question mark missing": ("boolq", "produces?", "produces", r"does not match the template"),
}


@pytest.mark.parametrize("case", sorted(BAD_INSTRUCTIONS))
def test_commonsense_refuses_an_instruction_that_does_not_parse(case, mirror, tmp_path):
    task, old, new, reason = BAD_INSTRUCTIONS[case]
    out = tmp_path / "out"
    raw, run = run_commonsense(mirror, out, task, [REAL[task], edited(task, old, new)])
    assert_refused(run, out, re.escape(f"{raw} record 1: ") + reason)


def consistent(answer: str) -> dict:
    """An 'answer' with the 'output' sentence that agrees with it."""
    return {"answer": answer, "output": f"the correct answer is {answer}"}


BAD_GOLDS = {
    "answer disagrees with output": ("arc_easy", {"answer": "answer2"},
                                     r"answer 'answer2' disagrees with output 'the correct answer is answer1'"),
    "boolq answer disagrees with output": ("boolq", {"answer": "true"}, r"answer 'true' disagrees with output"),
    "output disagrees with answer": ("piqa", {"output": "the correct answer is solution2"},
                                     r"answer 'solution1' disagrees with output"),
    "answer5 of 4": ("arc_easy", consistent("answer5"), r"answer 'answer5' is not one of answer1\.\.answer4"),
    "answer0": ("arc_easy", consistent("answer0"), r"answer 'answer0' is not one of answer1\.\.answer4"),
    "solution3 of 2": ("piqa", consistent("solution3"), r"answer 'solution3' is not one of solution1\.\.solution2"),
    "option3 of 2": ("winogrande", consistent("option3"), r"answer 'option3' is not one of option1\.\.option2"),
    "wrong prefix": ("piqa", consistent("answer1"), r"answer 'answer1' is not one of solution1\.\.solution2"),
    "boolq yes": ("boolq", consistent("yes"), r"BoolQ answer must be true/false, got 'yes'"),
}


@pytest.mark.parametrize("case", sorted(BAD_GOLDS))
def test_commonsense_refuses_a_bad_gold_answer(case, mirror, tmp_path):
    task, fields, reason = BAD_GOLDS[case]
    out = tmp_path / "out"
    raw, run = run_commonsense(mirror, out, task, [REAL[task], edited(task, **fields)])
    assert_refused(run, out, re.escape(f"{raw} record 1: ") + reason)


@pytest.mark.parametrize("task", sorted(REAL))
@pytest.mark.parametrize("key", ["instruction", "answer", "output"])
def test_commonsense_missing_field_names_file_record_and_key(task, key, mirror, tmp_path):
    record = {k: v for k, v in REAL[task].items() if k != key}
    out = tmp_path / "out"
    raw, run = run_commonsense(mirror, out, task, [REAL[task], record])
    assert_refused(run, out, re.escape(f"{raw} record 1: missing key '{key}'"))


@pytest.mark.parametrize("record, reason", [
    ("a string", r"record 1: expected a JSON object, got str"),
    (["a", "list"], r"record 1: expected a JSON object, got list"),
    (None, r"record 1: expected a JSON object, got NoneType"),
    (dict(REAL["piqa"], instruction=None), r"record 1: 'instruction' must be a string, got NoneType"),
    (dict(REAL["piqa"], answer=1), r"record 1: 'answer' must be a string, got int"),
], ids=["str", "list", "null", "null instruction", "int answer"])
def test_commonsense_refuses_a_record_of_the_wrong_type(record, reason, mirror, tmp_path):
    out = tmp_path / "out"
    raw, run = run_commonsense(mirror, out, "piqa", [REAL["piqa"], record])
    assert_refused(run, out, re.escape(str(raw)) + " " + reason)


BAD_JSON_FILES = {
    "empty file": (b"", r"empty file"),
    "only whitespace": (b"\r\n  \n", r"empty file"),
    "empty list": (b"[]", r"no records"),
    "truncated JSON": (json.dumps([REAL["piqa"]]).encode()[:-30], r"not valid JSON"),
    "not UTF-8": (b'[{"instruction": "caf\xe9"}]', r"not UTF-8"),
    "an object, not a list": (json.dumps(REAL["piqa"]).encode(), r"expected a JSON list of records, got dict"),
    "one record of two": (json.dumps([REAL["piqa"]]).encode(), r"1 records, expected 2 for piqa"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_FILES))
def test_commonsense_refuses_a_bad_file(case, mirror, tmp_path):
    content, reason = BAD_JSON_FILES[case]
    out = tmp_path / "out"
    raw, run = run_commonsense(mirror, out, "piqa", content)
    assert_refused(run, out, re.escape(f"{raw}: ") + reason)


def test_commonsense_bad_second_task_leaves_no_file_of_the_first(mirror, tmp_path):
    """Tasks are parsed before any is written: no boolq.jsonl beside a failed piqa."""
    put(mirror, task_path("boolq"), [REAL["boolq"], REAL["boolq"]])
    out = tmp_path / "out"
    raw = put(mirror, task_path("piqa"), [REAL["piqa"], edited("piqa", **consistent("solution3"))])
    assert_refused(lambda: commonsense.prepare(out, tasks=["boolq", "piqa"]), out, re.escape(f"{raw} record 1"))


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
@pytest.mark.parametrize("task", sorted(REAL))
def test_commonsense_windows_copy_prepares_identically(task, bom, mirror, tmp_path):
    """CRLF both as the file's line endings and as "\\r\\n" escapes inside the instruction strings."""
    records = [REAL[task], REAL[task]]
    _, run = run_commonsense(mirror, tmp_path / "lf", task, records)
    lf = run()[task].read_bytes()
    crlf_records = [dict(r, instruction=r["instruction"].replace("\n", "\r\n")) for r in records]
    dumped = json.dumps(crlf_records, indent=1)
    assert "\\r\\n" in dumped and "\n" in dumped
    _, run = run_commonsense(mirror, tmp_path / "crlf", task, windows_copy(dumped, bom))
    assert run()[task].read_bytes() == lf
    assert read_jsonl(tmp_path / "lf" / f"{task}.jsonl")[0] == {"task": task, "id": f"{task}-0", **PARSED[task]}


# -----------------------------------------------------------------------------
# hellaswag: the first two items of hellaswag_val_full.txt, 6 lines each

HELLASWAG_LINES = [
    "Roof shingle removal: A man is sitting on a roof. he", "3",
    "is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
    "is holding a rubik's cube.", "starts pulling up roofing on a roof.",
    "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. the lady", "3",
    "swings and lands in her arms.", "pulls the barbell forward.",
    "pulls a rope attached to the barbell.", "stands and lifts the weight over her head.",
]
HELLASWAG_PATH = "data/hellaswag/hellaswag_val_full.txt.bz2"


def hellaswag_text(lines=HELLASWAG_LINES) -> str:
    return "\n".join(lines) + "\n"


def with_line(n: int, value: str) -> list[str]:
    """HELLASWAG_LINES with line n (1-based, as the errors count) replaced."""
    lines = list(HELLASWAG_LINES)
    lines[n - 1] = value
    return lines


def test_hellaswag_parses_real_items(mirror, tmp_path):
    put(mirror, HELLASWAG_PATH, bz2.compress(hellaswag_text().encode()))
    records = read_jsonl(hellaswag.prepare(tmp_path / "out"))
    assert [r["context"] for r in records] == [
        "Roof shingle removal: A man is sitting on a roof. He",
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"]
    assert [r["choices"] for r in records] == [HELLASWAG_LINES[2:6], HELLASWAG_LINES[8:12]]
    assert [r["gold"] for r in records] == [3, 3]


@pytest.mark.parametrize("compress", [False, True], ids=["text", "bz2"])
@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
def test_hellaswag_windows_copy_prepares_identically(compress, bom, mirror, tmp_path):
    def prepared(content: bytes, out) -> bytes:
        put(mirror, HELLASWAG_PATH, bz2.compress(content) if compress else content)
        return hellaswag.prepare(out).read_bytes()

    lf = prepared(hellaswag_text().encode(), tmp_path / "lf")
    assert prepared(windows_copy(hellaswag_text(), bom), tmp_path / "crlf") == lf


BAD_HELLASWAG = {
    "no activity label": (hellaswag_text(with_line(7, "A lady walks to a barbell.")),
                          r"line 7: expected 'activity_label: context'"),
    "gold out of range": (hellaswag_text(with_line(8, "4")), r"line 8: gold must be 0\.\.3, got '4'"),
    "gold missing": (hellaswag_text(with_line(2, "")), r"line 2: gold must be 0\.\.3, got ''"),
    "empty ending": (hellaswag_text(with_line(10, "  ")), r"item 1: empty ending"),
    "an ending missing": (hellaswag_text(HELLASWAG_LINES[:-1]), r"11 lines is not a multiple of 6"),
    "one item of two": (hellaswag_text(HELLASWAG_LINES[:6]), r"1 items, expected the 2"),
    "empty file": (b"", r"empty file"),
    "only a newline": (b"\r\n", r"empty file"),
    "not UTF-8": (hellaswag_text().encode().replace(b"skis", b"sk\xefs"), r"not UTF-8"),
    "corrupt bz2": (b"BZh91AY&SY" + b"\x00" * 40, r"not a valid bz2 file"),
    "truncated bz2": (bz2.compress(hellaswag_text().encode())[:-10], r"not a valid bz2 file"),
}


@pytest.mark.parametrize("case", sorted(BAD_HELLASWAG))
def test_hellaswag_refuses_a_malformed_file(case, mirror, tmp_path):
    content, reason = BAD_HELLASWAG[case]
    raw = put(mirror, HELLASWAG_PATH, content)
    out = tmp_path / "out"
    assert_refused(lambda: hellaswag.prepare(out), out, re.escape(str(raw)) + r"\b.*" + reason)


# -----------------------------------------------------------------------------
# alpaca

ALPACA_PATH = alpaca.SOURCES["gpt4"][0]
ALPACA = [
    {"instruction": "Describe a process of making crepes.", "input": "",
     "output": "Making crepes is an easy and delicious process!\n\n1. Assemble your ingredients."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary colour.", "output": "Red."},  # 'input' is optional
]


def alpaca_splits(root, out, content) -> list[dict]:
    put(root, ALPACA_PATH, content)
    train, val = alpaca.prepare("gpt4", out)
    return read_jsonl(val) + read_jsonl(train)


def test_alpaca_builds_the_prompt_of_each_record(mirror, tmp_path):
    rows = alpaca_splits(mirror, tmp_path / "out", ALPACA)
    assert len(read_jsonl(tmp_path / "out" / "val.jsonl")) == 1
    by_response = {r["response"]: r["prompt"] for r in rows}
    assert sorted(by_response) == sorted(r["output"] for r in ALPACA)
    assert by_response["Bonjour"] == alpaca.PROMPT_WITH_INPUT.format(instruction="Translate to French.",
                                                                     input="Good morning")
    assert by_response["Red."] == alpaca.PROMPT_NO_INPUT.format(instruction="Name a primary colour.")


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
def test_alpaca_windows_copy_prepares_identically(bom, mirror, tmp_path):
    lf = alpaca_splits(mirror, tmp_path / "lf", ALPACA)
    crlf_records = [{k: v.replace("\n", "\r\n") for k, v in r.items()} for r in ALPACA]
    assert "\r\n" in crlf_records[0]["output"]
    assert alpaca_splits(mirror, tmp_path / "crlf", windows_copy(json.dumps(crlf_records, indent=1), bom)) == lf


BAD_ALPACA = {
    "empty list": (b"[]", r": no records"),
    "empty file": (b"", r": empty file"),
    "invalid JSON": (b'[{"instruction": "x", "output": "y"},', r": not valid JSON"),
    "not UTF-8": (b'[{"instruction": "caf\xe9", "output": "y"}]', r": not UTF-8"),
    "an object, not a list": (json.dumps(ALPACA[0]).encode(), r": expected a JSON list of records, got dict"),
    "record is a string": ([ALPACA[0], "Describe crepes."], r" record 1: expected a JSON object, got str"),
    "record is a list": ([ALPACA[0], ["Describe crepes.", "", "..."]], r" record 1: expected a JSON object, got list"),
    "record is null": ([ALPACA[0], None], r" record 1: expected a JSON object, got NoneType"),
    "no instruction": ([ALPACA[0], {"input": "", "output": "y"}], r" record 1: missing key 'instruction'"),
    "no output": ([ALPACA[0], {"instruction": "x", "input": ""}], r" record 1: missing key 'output'"),
    "null input": ([ALPACA[0], dict(ALPACA[1], input=None)], r" record 1: 'input' must be a string, got NoneType"),
    "numeric output": ([ALPACA[0], dict(ALPACA[1], output=5)], r" record 1: 'output' must be a string, got int"),
    "one record": ([ALPACA[0]], r": 1 examples, too few for a train and a val split"),
}


@pytest.mark.parametrize("case", sorted(BAD_ALPACA))
def test_alpaca_refuses_bad_input(case, mirror, tmp_path):
    content, reason = BAD_ALPACA[case]
    raw = put(mirror, ALPACA_PATH, content)
    out = tmp_path / "out"
    assert_refused(lambda: alpaca.prepare("gpt4", out), out, re.escape(str(raw)) + reason)


def test_alpaca_calibration_text_is_one_paragraph_per_record(tmp_path):
    """GPTQ's calibration text from Alpaca records: instruction, input (when not empty) and output
    on their own lines, a blank line between records; a Windows copy gives the same text."""
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(ALPACA, indent=1))
    expected = (f"{ALPACA[0]['instruction']}\n{ALPACA[0]['output']}\n\n"
                f"{ALPACA[1]['instruction']}\n{ALPACA[1]['input']}\n{ALPACA[1]['output']}\n\n"
                f"{ALPACA[2]['instruction']}\n{ALPACA[2]['output']}")
    assert alpaca.calibration_text(path) == expected
    crlf_records = [{k: v.replace("\n", "\r\n") for k, v in r.items()} for r in ALPACA]
    path.write_bytes(windows_copy(json.dumps(crlf_records, indent=1), bom=True))
    assert alpaca.calibration_text(path) == expected


BAD_CALIBRATION = {k: BAD_ALPACA[k] for k in ("empty file", "invalid JSON", "record is a string", "record is null",
                                             "no output", "null input", "numeric output")}
BAD_CALIBRATION.update({"empty list": (b"[]", r": expected a non-empty JSON list of Alpaca records"),
                        "an object, not a list": (json.dumps(ALPACA[0]).encode(),
                                                  r": expected a non-empty JSON list of Alpaca records")})


@pytest.mark.parametrize("case", sorted(BAD_CALIBRATION))
def test_alpaca_calibration_text_refuses_bad_input(case, tmp_path):
    """The records GPTQ calibrates on get prepare()'s checks: a ValueError naming the file and
    the record, not an AttributeError from deep inside the join (or a calibration on nothing)."""
    content, reason = BAD_CALIBRATION[case]
    path = put(tmp_path, "calibration.json", content)
    with pytest.raises(ValueError) as info:
        alpaca.calibration_text(path)
    assert not isinstance(info.value, json.JSONDecodeError), repr(info.value)
    assert re.search(re.escape(str(path)) + reason, str(info.value)), str(info.value)


# -----------------------------------------------------------------------------
# tinystories

STORIES_PATH = tinystories.MIRROR_PATH
STORIES = ["One day, a little girl named Lily found a needle in her room.",
           "Once upon a time, there was a little car named Beep.",
           "One day, a little fish named Fin was swimming near the shore.",
           'Tom said, "Look, a big red ball!" and ran to get it.']


def story_splits(root, out, content) -> list[str]:
    put(root, STORIES_PATH, content)
    train, val = tinystories.prepare(out)
    rows = read_jsonl(val) + read_jsonl(train)
    assert all(r["prompt"] == "" for r in rows)
    return [r["response"] for r in rows]


def test_tinystories_one_example_per_line(mirror, tmp_path):
    assert sorted(story_splits(mirror, tmp_path / "out", "\n".join(STORIES) + "\n\n")) == sorted(STORIES)


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
def test_tinystories_windows_copy_prepares_identically(bom, mirror, tmp_path):
    text = "\n\n".join(STORIES) + "\n"
    lf = story_splits(mirror, tmp_path / "lf", text)
    assert story_splits(mirror, tmp_path / "crlf", windows_copy(text, bom)) == lf
    assert (tmp_path / "crlf" / "train.jsonl").read_bytes() == (tmp_path / "lf" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("separator", ["\u2028", "\x0c", "\x85", "\x1e"])
def test_tinystories_splits_stories_at_newlines_only(separator, mirror, tmp_path):
    """str.splitlines() also cuts at these characters, which would split a story in two."""
    stories = [STORIES[0].replace(" found", separator + "found")] + STORIES[1:]
    assert sorted(story_splits(mirror, tmp_path / "out", "\n".join(stories))) == sorted(stories)


BAD_STORIES = {
    "empty file": (b"", r": no stories"),
    "only blank lines": (b"\r\n  \n\t\n", r": no stories"),
    "not UTF-8": ("\n".join(STORIES).encode().replace(b"needle", b"n\xeeedle"), r": not UTF-8"),
    "one story": (STORIES[0] + "\n", r": 1 examples, too few for a train and a val split"),
}


@pytest.mark.parametrize("case", sorted(BAD_STORIES))
def test_tinystories_refuses_bad_input(case, mirror, tmp_path):
    content, reason = BAD_STORIES[case]
    raw = put(mirror, STORIES_PATH, content)
    out = tmp_path / "out"
    assert_refused(lambda: tinystories.prepare(out), out, re.escape(str(raw)) + reason)


# -----------------------------------------------------------------------------
# wikitext2

WIKI_PATH = "data/wikitext2/wiki.test.raw"
WIKI = " \n = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor . \n\n"


@pytest.mark.parametrize("bom", [False, True], ids=["crlf", "crlf+bom"])
def test_wikitext2_windows_copy_prepares_identically(bom, mirror, tmp_path):
    put(mirror, WIKI_PATH, windows_copy(WIKI, bom))
    assert wikitext2.prepare(tmp_path / "out").read_bytes() == WIKI.encode("utf-8")


@pytest.mark.parametrize("content, reason", [
    (b"", r"empty WikiText-2 test file"),
    (b" \r\n \n\n", r"empty WikiText-2 test file"),
    (WIKI.encode().replace(b"actor", b"act\xf6r"), r"not UTF-8"),
], ids=["empty file", "only whitespace", "not UTF-8"])
def test_wikitext2_refuses_bad_input(content, reason, mirror, tmp_path):
    raw = put(mirror, WIKI_PATH, content)
    out = tmp_path / "out"
    assert_refused(lambda: wikitext2.prepare(out), out, re.escape(f"{raw}: ") + reason)


# -----------------------------------------------------------------------------
# data/mirror.py


def test_write_jsonl_failing_midway_keeps_the_old_file_and_leaves_no_part(tmp_path):
    path = data_mirror.write_jsonl([{"a": 1}], tmp_path / "x.jsonl")

    def rows():
        yield {"a": 2}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        data_mirror.write_jsonl(rows(), path)
    assert files_in(tmp_path) == ["x.jsonl"] and path.read_text() == '{"a": 1}\n'


def test_write_jsonl_keeps_one_record_per_line_for_splitlines_readers(tmp_path):
    """train.py and eval.py split a JSONL file with str.splitlines(), which also breaks at
    U+2028, U+2029 and U+0085: json.dumps(ensure_ascii=False) leaves those raw."""
    rows = [{"response": f"one{c}story é"} for c in "\u2028\u2029\x85\x0c\x1e"]
    assert read_jsonl(data_mirror.write_jsonl(rows, tmp_path / "x.jsonl")) == rows
