"""TinyStories text -> data/tinystories/{train,val}.jsonl of {"prompt": "", "response": story}.

Plain language modelling (the loss covers every token of the story), the fine-tuning data for
stories260K. One story per line in the raw file; 10% held out (seeded shuffle).

    ROLORA_MIRROR=../shared/assets python data/tinystories/prepare.py
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python data/<name>/prepare.py` finds the data package
    sys.path.insert(0, str(ROOT))
from data.mirror import fetch_raw, read_text, write_splits  # noqa: E402

HERE = Path(__file__).resolve().parent

MIRROR_PATH = "data/tinystories/tinystories_sample.txt"
URLS = ["https://raw.githubusercontent.com/s-ajaykumar/smallGPT/main/tinystories_sample.txt"]


def prepare(out_dir: Path = HERE, val_fraction: float = 0.1, seed: int = 0):
    """Write train.jsonl and val.jsonl; returns their paths."""
    raw = fetch_raw(MIRROR_PATH, URLS, HERE / "raw")
    # read_text turns Windows "\r\n" into "\n"; split on "\n" only, not str.splitlines(),
    # which would also cut a story at a form feed, "\x85" or a Unicode line separator.
    stories = [line.strip() for line in read_text(raw).split("\n") if line.strip()]
    if not stories:
        raise ValueError(f"{raw}: no stories (expected one story per line)")
    examples = [{"prompt": "", "response": s} for s in stories]
    return write_splits(examples, out_dir, val_fraction, seed, source=raw)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--val-fraction", type=float, default=0.1)
    args = p.parse_args()
    prepare(args.out, args.val_fraction)
