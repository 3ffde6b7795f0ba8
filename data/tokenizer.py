"""Text <-> token ids for a checkpoint folder: its sentencepiece tokenizer.model (LLaMA-2,
stories260K) or its tokenizer.json (SmolLM2, LLaMA-3; needs the optional `tokenizers` package).

    from data.tokenizer import Tokenizer
    tok = Tokenizer("data/models/stories260K")
    tok.encode("Once upon a time")            # [1, ...]: BOS first unless bos=False
"""
import json
import shutil
from pathlib import Path

from data.options import MissingFile

# What a checkpoint folder holds of its tokenizer (the files Hugging Face's AutoTokenizer reads too).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer_files(source_dir, target_dir):
    """Copy the tokenizer of one checkpoint folder into another, so the target is complete on its own."""
    found = [name for name in TOKENIZER_FILES if (Path(source_dir) / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{source_dir}: no tokenizer file ({', '.join(TOKENIZER_FILES)}) to copy")
    for name in found:
        shutil.copyfile(Path(source_dir) / name, Path(target_dir) / name)


class Tokenizer:
    """sentencepiece `tokenizer.model` when the directory has one, else `tokenizer.json`."""

    def __init__(self, path):
        path = Path(path)
        ids = {}
        if (path / "config.json").is_file():
            hf = json.loads((path / "config.json").read_text())
            ids = {k: hf.get(k) for k in ("bos_token_id", "eos_token_id")}
        if (path / "tokenizer.model").is_file():
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            self.hf = None
            self.vocab_size = self.sp.vocab_size()
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        elif (path / "tokenizer.json").is_file():
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise ImportError(f"{path / 'tokenizer.json'} needs the optional package "
                                  "`tokenizers`: pip install tokenizers") from None
            self.sp = None
            self.hf = HFTokenizer.from_file(str(path / "tokenizer.json"))
            self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
            self.bos_id, self.eos_id = ids.get("bos_token_id"), ids.get("eos_token_id")
        else:
            raise MissingFile(f"{path}: neither tokenizer.model nor tokenizer.json found")
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if self.sp is not None:
            ids = self.sp.encode(text)
        else:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids, skip_special_tokens=False)
