"""Text from any checkpoint the project writes: plain, rotated (OUT/merged), quantized (OUT/quantized).

model.py's demo samples from a plain checkpoint, which is all model.py can load; this one goes
through eval.load_model, the loader behind every --model, so a rotated or quantized model speaks too.

    python extras/sample.py --model out/train/quantized --prompt "Once upon a time"
    python extras/sample.py --model out/train/quantized --int-kernels   # on int8 products
"""
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python extras/sample.py` from anywhere
from data.options import one_line_errors, parse_config  # noqa: E402
from eval import load_model  # noqa: E402
from extras.int_kernels import int_kernels_option, use_integer_kernels  # noqa: E402
from model import SampleConfig, sample  # noqa: E402


@dataclass
class SampleAnyConfig(SampleConfig):
    """model.py's options, and --int-kernels for a quantized checkpoint."""
    int_kernels: bool = int_kernels_option()


def main(argv=None) -> str:
    args = parse_config(SampleAnyConfig(), argv, prog="extras/sample.py", description=__doc__.splitlines()[0])
    model, tok, _ = load_model(args.model)
    if args.int_kernels:
        use_integer_kernels(model)
    text = sample(model, tok, args)
    print(text)
    return text


if __name__ == "__main__":
    with one_line_errors("extras/sample.py"):
        main()
