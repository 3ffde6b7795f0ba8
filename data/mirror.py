"""Where the prepare scripts get their raw files: the offline mirror or the internet.

Every `data/<name>/prepare.py` asks for a raw file by its path inside the mirror
(for example "data/wikitext2/wiki.test.raw"). When the environment variable
ROLORA_MIRROR names a folder laid out like ../shared/assets/, the file is read from
there and nothing is downloaded. Otherwise it is downloaded once from its canonical
public location into data/<name>/raw/ and reused from there.
"""
import json
import os
import random
import urllib.request
from pathlib import Path

from data.options import BadValue, MissingFile

DATA_DIR = Path(__file__).resolve().parent


def mirror_root() -> Path | None:
    """The mirror folder named by ROLORA_MIRROR, or None when it is not set."""
    root = os.environ.get("ROLORA_MIRROR")
    if not root:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MissingFile(f"ROLORA_MIRROR={root} is not a folder")
    return root


def fetch_raw(mirror_path: str, urls: list[str], download_dir: Path) -> Path:
    """Return a local copy of a raw input file.

    mirror_path: the file's path relative to the mirror root.
    urls: canonical download locations, tried in order when there is no mirror.
    download_dir: where a downloaded file is kept (git-ignored).
    """
    root = mirror_root()
    if root is not None:
        path = root / mirror_path
        if not path.is_file():
            raise MissingFile(
                f"{path} not found in the mirror (ROLORA_MIRROR={root}); expected the file "
                f"'{mirror_path}' there, laid out like ../shared/assets/")
        return path
    download_dir.mkdir(parents=True, exist_ok=True)
    dest = download_dir / Path(mirror_path).name
    if dest.is_file():
        return dest
    errors = []
    for url in urls:
        try:
            tmp = dest.with_suffix(dest.suffix + ".part")
            print(f"downloading {url} -> {dest}")
            urllib.request.urlretrieve(url, tmp)
            tmp.rename(dest)  # atomic: a half-downloaded file never looks complete
            return dest
        except Exception as e:  # try the next location
            errors.append(f"{url}: {e}")
    raise MissingFile(
        f"could not get '{mirror_path}': set ROLORA_MIRROR to a local mirror (e.g. ../shared/assets) "
        "or check the network. Tried:\n  " + "\n  ".join(errors))


def decode_text(raw: bytes, where) -> str:
    """UTF-8 text (a leading byte-order mark dropped) with Windows line endings turned into
    "\\n", so that a copy saved on Windows prepares exactly like the original. Bytes that are
    not UTF-8 are a ValueError naming `where` (the file), not a bare UnicodeDecodeError."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadValue(f"{where}: not UTF-8 text ({e})") from None
    return text.replace("\r\n", "\n")


def read_text(path: Path) -> str:
    """A raw input file's text, decoded and normalised by decode_text."""
    return decode_text(Path(path).read_bytes(), path)


def read_json(path: Path):
    """A raw JSON input file. An empty or invalid file is a ValueError naming the file (a bare
    json.JSONDecodeError does not say which file), and CRLF inside strings becomes LF."""
    text = read_text(path)
    if not text.strip():
        raise BadValue(f"{path}: empty file (expected a JSON list of records)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadValue(f"{path}: not valid JSON ({e})") from None
    return _lf_strings(data)


def _lf_strings(value):
    """A JSON value with "\\r\\n" turned into "\\n" in every string: a record made on Windows
    carries them as escapes inside its strings, which are not the file's line endings that
    decode_text converts."""
    if isinstance(value, str):
        return value.replace("\r\n", "\n")
    if isinstance(value, list):
        return [_lf_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _lf_strings(v) for k, v in value.items()}
    return value


def _write_atomic(path: Path, write) -> Path:
    """Call write(f) on a temporary file and rename it into place, so a half-written file never
    looks complete; on any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            write(f)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(text: str, path: Path) -> Path:
    """Write text atomically (see _write_atomic), with "\\n" line endings on every platform."""
    return _write_atomic(path, lambda f: f.write(text))


# Characters that json.dumps(ensure_ascii=False) leaves as they are but str.splitlines() splits
# at: written raw, they would cut a record in two for a reader that splits the file into lines.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(row) -> str:
    """One record as one line of JSON, whichever way the reader splits lines."""
    return json.dumps(row, ensure_ascii=False).translate(_LINE_BREAKS_JSON_KEEPS) + "\n"


def write_jsonl(rows, path: Path) -> Path:
    """One JSON object per line, written atomically (see _write_atomic)."""
    return _write_atomic(path, lambda f: f.writelines(jsonl_line(r) for r in rows))


def read_prepared_jsonl(path: Path, prepare, script: str) -> list[dict]:
    """The records of a prepared JSONL file (write_jsonl's), calling prepare() first when the file
    is missing: a data set is prepared from the mirror (or its download) on first use. `script`
    (data/<name>/prepare.py) is named in the errors."""
    path = Path(path)
    if not path.is_file():
        prepare()
    if not path.is_file():
        raise MissingFile(f"{path}: still missing after {script} ran")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadValue(f"{path}, line {number}: not valid JSON ({e}); delete the file and run "
                               f"{script} again") from None
    if not records:
        raise BadValue(f"{path}: no records; delete the file and run {script} again")
    return records


def write_splits(rows: list, out_dir: Path, val_fraction: float = 0.1, seed: int = 0, source=""):
    """Shuffle rows (seeded), hold out val_fraction of them, and write val.jsonl and
    train.jsonl into out_dir, each atomically. Returns (train_path, val_path).
    Too few rows for two non-empty splits is a ValueError naming `source` (the input file)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(len(rows) * val_fraction))
    if n_val >= len(rows):  # before writing anything: an empty train.jsonl would train on nothing
        raise ValueError(f"{source}: {len(rows)} examples, too few for a train and a val split "
                         f"(val_fraction {val_fraction})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        paths[split] = write_jsonl(part, out_dir / f"{split}.jsonl")
        print(f"{paths[split]}: {len(part)} examples")
    return paths["train"], paths["val"]
