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

DATA_DIR = Path(__file__).resolve().parent


def mirror_root() -> Path | None:
    """The mirror folder named by ROLORA_MIRROR, or None when it is not set."""
    root = os.environ.get("ROLORA_MIRROR")
    if not root:
        return None
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ROLORA_MIRROR={root} is not a folder")
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
            raise FileNotFoundError(
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
    raise FileNotFoundError(
        f"could not get '{mirror_path}': set ROLORA_MIRROR to a local mirror (e.g. ../shared/assets) "
        "or check the network. Tried:\n  " + "\n  ".join(errors))


def write_jsonl(rows, path: Path) -> Path:
    """One JSON object per line, written to a temporary file and renamed into place, so a
    half-written file never looks complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_splits(rows: list, out_dir: Path, val_fraction: float = 0.1, seed: int = 0):
    """Shuffle rows (seeded), hold out val_fraction of them, and write val.jsonl and
    train.jsonl into out_dir, each atomically. Returns (train_path, val_path)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n_val = max(1, int(len(rows) * val_fraction))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, part in (("val", rows[:n_val]), ("train", rows[n_val:])):
        paths[split] = write_jsonl(part, out_dir / f"{split}.jsonl")
        print(f"{paths[split]}: {len(part)} examples")
    return paths["train"], paths["val"]
