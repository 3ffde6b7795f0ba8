"""Prepare the 10042 HellaSwag validation items in lm-evaluation-harness form.

Reads hellaswag_val_full.txt(.bz2) (klosax/hellaswag_text_data: 6 lines per item,
"activity_label: context", the gold index, then the 4 endings, already cleaned of the WikiHow
"[title]"/"[step]" artifacts by the harness's preprocess()) and writes
data/hellaswag/hellaswag.jsonl (git-ignored), one record per line:

    {"task": "hellaswag", "id": "hellaswag-0", "context": "Roof shingle removal: A man is
     sitting on a roof. He", "choices": ["is using wrap to wrap a pair of skis.", ...], "gold": 3}

The harness (tasks/hellaswag/utils.py) builds the query as
preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()). The text file keeps
ctx_b as it is in the dataset, lowercase ("... on a roof. he"), and no longer says where ctx_b
starts. ctx_b is the unfinished sentence that ends an ActivityNet context, so we restore the
capital where the context ends in an unfinished sentence that starts with a lowercase letter
(capitalize() would also lowercase the rest of ctx_b: it is already lowercase in all of them).
preprocess() itself is not applied again: the file is already preprocessed, and a second pass
is not a no-op (it would collapse the double spaces the harness's single pass leaves).

Run:  ROLORA_MIRROR=../shared/assets python data/hellaswag/prepare.py
"""
import argparse
import bz2
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python data/hellaswag/prepare.py` finds data/mirror.py
    sys.path.insert(0, str(ROOT))
from data.mirror import decode_text, fetch_raw, write_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
URLS = ["https://raw.githubusercontent.com/klosax/hellaswag_text_data/main/hellaswag_val_full.txt"]
N_ITEMS = 10042
LINES_PER_ITEM = 6  # context, gold, 4 endings

# The last sentence of the context when it is unfinished (no closing . ! ? or quote) and starts
# lowercase: that is ctx_b, which the harness capitalizes.
UNFINISHED_LOWERCASE_TAIL = re.compile(r"(?:^|[.!?] )([a-z][^.!?\"]*)$")


def read_text(path: Path) -> str:
    """The file's text, bz2-compressed (the mirror's copy) or plain (the download). Windows line
    endings become "\\n" (decode_text): a CRLF copy would otherwise leave "\\r" on every line
    and fail the gold check or end every choice with it."""
    raw = Path(path).read_bytes()
    if raw[:3] == b"BZh":
        try:
            raw = bz2.decompress(raw)
        except (OSError, EOFError, ValueError) as e:  # a truncated or corrupt download
            raise ValueError(f"{path}: not a valid bz2 file ({e})") from None
    return decode_text(raw, path)


def capitalize_ctx_b(query: str) -> str:
    """Restore the harness's ctx_b.capitalize() on 'label: ctx_a ctx_b' (see the docstring)."""
    m = UNFINISHED_LOWERCASE_TAIL.search(query)
    if m is None:
        return query
    start = m.start(1)
    return query[:start] + query[start].upper() + query[start + 1:]


def parse_items(text: str, where: str) -> list[dict]:
    """Split the 6-line groups into harness records; raises on any malformed item."""
    if not text.strip():
        raise ValueError(f"{where}: empty file")
    lines = text.split("\n")
    if lines[-1] == "":
        lines = lines[:-1]  # the file ends with a newline
    if len(lines) % LINES_PER_ITEM:
        raise ValueError(f"{where}: {len(lines)} lines is not a multiple of {LINES_PER_ITEM}")
    records = []
    for i in range(len(lines) // LINES_PER_ITEM):
        query, gold, *endings = lines[i * LINES_PER_ITEM:(i + 1) * LINES_PER_ITEM]
        line_no = i * LINES_PER_ITEM + 1
        if ": " not in query:
            raise ValueError(f"{where} line {line_no}: expected 'activity_label: context', got {query!r}")
        if gold not in ("0", "1", "2", "3"):
            raise ValueError(f"{where} line {line_no + 1}: gold must be 0..3, got {gold!r}")
        if any(not e.strip() for e in endings):
            raise ValueError(f"{where} item {i}: empty ending in {endings!r}")
        records.append({"task": "hellaswag", "id": f"hellaswag-{i}", "context": capitalize_ctx_b(query),
                        "choices": endings, "gold": int(gold)})
    if len(records) != N_ITEMS:
        raise ValueError(f"{where}: {len(records)} items, expected the {N_ITEMS} validation items")
    return records


def prepare(out_dir: Path | None = None) -> Path:
    """Write <out_dir>/hellaswag.jsonl (default data/hellaswag/) and return its path."""
    out_dir = Path(out_dir) if out_dir is not None else HERE
    raw = fetch_raw("data/hellaswag/hellaswag_val_full.txt.bz2", URLS, HERE / "raw")
    records = parse_items(read_text(raw), str(raw))
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_jsonl(records, out_dir / "hellaswag.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default data/hellaswag/)")
    path = prepare(parser.parse_args().out)
    print(f"hellaswag {sum(1 for _ in open(path, encoding='utf-8'))} records -> {path}")
