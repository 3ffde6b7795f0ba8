"""Alpaca instruction data -> data/alpaca/{train,val}.jsonl of {"prompt", "response"}.

The prompt is the standard Alpaca template (Taori et al. 2023); train.py computes the loss
on the response tokens only. 10% of the records are held out (seeded shuffle), as RoLoRA does.

    ROLORA_MIRROR=../shared/assets python data/alpaca/prepare.py            # alpaca-gpt4 demo (999)
    python data/alpaca/prepare.py --source cleaned                          # alpaca-cleaned subset (2000)
    python data/alpaca/prepare.py --source gpt4_full                        # the paper's 52k (download)
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python data/<name>/prepare.py` finds the data package
    sys.path.insert(0, str(ROOT))
from data.mirror import fetch_raw, read_json, read_text, write_splits  # noqa: E402

HERE = Path(__file__).resolve().parent

# mirror path, canonical download locations
SOURCES = {
    # GPT-4 answers, the closest to RoLoRA's alpaca_gpt4_en (the full 52k file is the first URL)
    "gpt4": ("data/alpaca/alpaca_gpt4_demo_999.json", [
        "https://raw.githubusercontent.com/hiyouga/LLaMA-Factory/main/data/alpaca_en_demo.json"]),
    # the full 52k alpaca-gpt4 of the paper (not in the offline mirror: needs the download)
    "gpt4_full": ("data/alpaca/alpaca_gpt4_data.json", [
        "https://raw.githubusercontent.com/Instruction-Tuning-with-GPT-4/GPT-4-LLM/main/data/alpaca_gpt4_data.json"]),
    "cleaned": ("data/alpaca/alpaca_cleaned_2000.json", [
        "https://raw.githubusercontent.com/Antelofski/alpaca-lora/main/alpaca_small.json"]),
    "long": ("data/alpaca/alpaca_long_2000.json", [
        "https://raw.githubusercontent.com/PorUna-byte/Gumbelsoft/main/alpaca_long_2000.json"]),
}

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    template = PROMPT_WITH_INPUT if input.strip() else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=input)


def to_example(record, where: str) -> dict:
    """One Alpaca record -> {"prompt", "response"}. 'instruction' and 'output' are required,
    'input' is optional; each must be a string (a null input would crash alpaca_prompt, a
    number would be formatted into the prompt). Errors name the file, the record and the key."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if key not in record:
            raise ValueError(f"{where}: missing key '{key}' (record has {sorted(record)})")
    for key in ("instruction", "input", "output"):
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
    return {"prompt": alpaca_prompt(record["instruction"], record.get("input", "")),
            "response": record["output"]}


def load_examples(raw: Path) -> list[dict]:
    """All records of an Alpaca JSON file as examples. read_json names the file on invalid or
    empty JSON and turns Windows "\\r\\n" into "\\n"; an empty list is an error here, not
    two empty output files."""
    records = read_json(raw)
    if not isinstance(records, list):
        raise ValueError(f"{raw}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise ValueError(f"{raw}: no records")
    return [to_example(r, f"{raw} record {i}") for i, r in enumerate(records)]


def raw_file(source: str = "gpt4") -> Path:
    """The raw JSON file of one source: from the mirror, or downloaded once into data/alpaca/raw/."""
    if source not in SOURCES:
        raise ValueError(f"--source {source}: unknown, choose from {sorted(SOURCES)}")
    mirror_path, urls = SOURCES[source]
    return fetch_raw(mirror_path, urls, HERE / "raw")


def calibration_text(path) -> str:
    """Text to calibrate GPTQ on (never the evaluation text): a plain text file (.txt, e.g.
    TinyStories) or Alpaca records (.json: instruction, input and output, one record a paragraph)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    if path.suffix == ".json":
        records = read_json(path)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path}: expected a non-empty JSON list of Alpaca records")
        for i, r in enumerate(records):  # prepare()'s checks: objects of string fields, errors name the record
            to_example(r, f"{path} record {i}")
        return "\n\n".join("\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k))
                           for r in records)
    return read_text(path)


def prepare(source: str = "gpt4", out_dir: Path = HERE, val_fraction: float = 0.1, seed: int = 0):
    """Write train.jsonl and val.jsonl; returns their paths. Nothing is written when the input is bad."""
    raw = raw_file(source)
    return write_splits(load_examples(raw), out_dir, val_fraction, seed, source=raw)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="gpt4", choices=sorted(SOURCES))
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--val-fraction", type=float, default=0.1)
    args = p.parse_args()
    prepare(args.source, args.out, args.val_fraction)
