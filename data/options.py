"""Command lines: one flag per dataclass field.

Every script (train.py, eval.py, rotate.py, model.py, bench/) declares its options as one
@dataclass and calls parse_config: the flags, their help and their types come from the fields;
a field holding another dataclass (train.py's `quant: QuantConfig`) adds that one's flags too,
so an option is declared once wherever it is used (QuantConfig in quant.py, LoRAConfig in
lora.py). The values are checked, by check_options and the dataclass's validate(), before the
script loads anything: a bad value is one line naming the flag.

    @dataclass
    class SampleConfig:
        prompt: str = option("Once upon a time", "text to continue")
        top_k: int | None = option(None, "sample from the k most likely tokens only", at_least=1)

    args = parse_config(SampleConfig(), prog="model.py")
"""
import argparse
import dataclasses
import sys
import typing
from contextlib import contextmanager
from dataclasses import field, fields, is_dataclass


# -----------------------------------------------------------------------------
# Bad input: a file, a key in it or a flag a user gave us, as opposed to a bug of ours


class BadInput(Exception):
    """What the user gave is wrong (its message names the file, the key or the flag): a command line
    prints it as one line. The subclasses are also the usual ValueError, KeyError, FileNotFoundError."""


class BadValue(BadInput, ValueError):
    pass


class BadKey(BadInput, KeyError):
    def __str__(self):  # KeyError's own str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class MissingFile(BadInput, FileNotFoundError):
    pass


@contextmanager
def one_line_errors(prog: str):
    """Around a script's main: bad input ends in one line and exit status 1; a bug keeps its traceback."""
    try:
        yield
    except BadInput as e:
        sys.exit(f"{prog}: {e}")


def option(default, help_text: str, *, choices: tuple | None = None, at_least=None, at_most=None,
           zero_means_all: bool = False, aliases: tuple = ()):
    """A dataclass field that is also the flag --field-name (and any `aliases`), with the values
    it accepts (checked by check_options). zero_means_all: an optional count (int | None) where
    0 or 'none' on the command line means 'all' (None); other optional values take 'none'."""
    return field(default=default, metadata={"help": help_text, "choices": choices, "at_least": at_least,
                                            "at_most": at_most, "zero_means_all": zero_means_all,
                                            "aliases": aliases})


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(config):
    """Check every field of a configuration (nested ones too) against what its option() declared;
    the ValueError names the flag: '--seq-len=0: must be at least 1'."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if is_dataclass(value):
            check_options(value)
            continue
        if value is None:
            continue
        flag = f"{flag_name(f.name)}={value!r}"
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{flag}: must be one of {', '.join(map(str, meta['choices']))}")
        if meta.get("at_least") is not None and value < meta["at_least"]:
            raise ValueError(f"{flag}: must be at least {meta['at_least']}"
                             + (" (0 or none: all)" if meta.get("zero_means_all") else ""))
        if meta.get("at_most") is not None and value > meta["at_most"]:
            raise ValueError(f"{flag}: must be at most {meta['at_most']}")


def option_group(config_class, help_text: str = "", **defaults):
    """A field holding a nested configuration; `defaults` are this script's own defaults for it."""
    return field(default_factory=lambda: config_class(**defaults), metadata={"help": help_text})


def _flag_type(f):
    """argparse's type for a field: int, float or str, with 'none' (and 0 for counts) as None."""
    optional = type(None) in typing.get_args(f.type)  # int | None
    kind = next(t for t in typing.get_args(f.type) if t is not type(None)) if optional else f.type

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        value = kind(text)
        return None if f.metadata.get("zero_means_all") and value == 0 else value
    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: 'x'"
    return parse


def _add_flags(parser, config):
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):  # a nested configuration: its fields are flags of their own
            _add_flags(parser.add_argument_group(f.metadata.get("help") or type(value).__name__), value)
            continue
        flags = [flag_name(f.name), *f.metadata.get("aliases", ())]
        choices = f" [{', '.join(map(str, f.metadata['choices']))}]" if f.metadata.get("choices") else ""
        help_text = f"{f.metadata.get('help', '')}{choices} (default: {value})"
        if f.type is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=value,
                                help=help_text)
        else:  # choices and bounds are checked by check_options, with one message style for all
            parser.add_argument(*flags, dest=f.name, type=_flag_type(f), default=value, help=help_text)


def option_names(config) -> set[str]:
    """The flat names of every option of a configuration, nested ones included."""
    return {name for f in fields(config) for name in
            (option_names(getattr(config, f.name)) if is_dataclass(getattr(config, f.name)) else {f.name})}


def replace_options(config, **values):
    """A copy of `config` with the named options replaced wherever they live, nested
    configurations included, as on the command line: replace_options(TrainConfig(), rank=8, w_bits=4)."""
    unknown = set(values) - option_names(config)
    if unknown:
        raise TypeError(f"{type(config).__name__}: unknown option(s) {sorted(unknown)}")
    changes = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            inner = {k: v for k, v in values.items() if k in option_names(value)}
            if inner:
                changes[f.name] = replace_options(value, **inner)
        elif f.name in values:
            changes[f.name] = values[f.name]
    return dataclasses.replace(config, **changes)


def parse_config(config, argv=None, *, prog: str | None = None, description: str | None = None):
    """Parse a command line into a copy of the dataclass instance `config` (whose values are the
    defaults) and check it (its validate(), else check_options): a bad value ends in one line
    naming the flag, before anything is loaded."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(parser, config)
    parsed = replace_options(config, **vars(parser.parse_args(argv)))
    try:
        parsed.validate() if hasattr(parsed, "validate") else check_options(parsed)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")  # one line: the usage would bury it
    return parsed


# -----------------------------------------------------------------------------
# Demo: python model.py --model DIR --prompt "..."
