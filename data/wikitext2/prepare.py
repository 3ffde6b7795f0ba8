"""Prepare the WikiText-2 raw test text for perplexity evaluation.

Copies the WikiText-2 (raw) test split, its rows joined with "\\n\\n" exactly as GPTQ and QuaRot
join them before tokenizing (`"\\n\\n".join(testdata["text"])`), to data/wikitext2/test.txt
(git-ignored). A downloaded copy with Windows line endings is converted to "\\n".

Run:  ROLORA_MIRROR=../shared/assets python data/wikitext2/prepare.py
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so that `python data/wikitext2/prepare.py` finds data/mirror.py
    sys.path.insert(0, str(ROOT))
from data.mirror import fetch_raw, read_text, write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
# The mirror's file came from here (CRLF line endings there, LF in the mirror).
URLS = ["https://raw.githubusercontent.com/Deathnetworks/rotorquant/main/wikitext-test.txt",
        "https://raw.githubusercontent.com/Deathnetworks/rotorquant/master/wikitext-test.txt"]


def prepare(out_dir: Path | None = None) -> Path:
    """Write <out_dir>/test.txt (default data/wikitext2/) and return its path."""
    out_dir = Path(out_dir) if out_dir is not None else HERE
    raw = fetch_raw("data/wikitext2/wiki.test.raw", URLS, HERE / "raw")
    text = read_text(raw)  # UTF-8, "\r\n" -> "\n"; bytes that are not UTF-8 name the file
    if not text.strip():
        raise ValueError(f"{raw}: empty WikiText-2 test file")
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_text(text, out_dir / "test.txt")  # atomic: never a half-written test.txt


def load_test_text(data_dir: Path | None = None) -> str:
    """The WikiText-2 raw test text, preparing <data_dir>/test.txt (default data/wikitext2/) on first use."""
    path = Path(data_dir or HERE) / "test.txt"
    if not path.is_file():
        prepare(path.parent)
    return path.read_text(encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default data/wikitext2/)")
    path = prepare(parser.parse_args().out)
    print(f"wikitext2 test: {path.stat().st_size} bytes -> {path}")
