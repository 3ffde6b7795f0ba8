"""Bad input, as a new user gives it, ends in one line that names the file, the key or the flag, and
a non-zero exit; a bug of ours keeps its traceback (data.options.one_line_errors)."""
import json
import subprocess
import sys

import pytest
import torch

import eval as ev
import quant
import rotate
from data.mirror import read_prepared_jsonl
from data.options import BadInput, one_line_errors
from extras.quantized_checkpoint import save_quantized
from helpers import ROOT, tiny_model
from model import save_checkpoint


def one_line_exit(argv: list[str]) -> str:
    """eval.py's main on argv, as its command line runs it: the message it exits with."""
    with pytest.raises(SystemExit) as exit_info:
        with one_line_errors("eval.py"):
            ev.main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("eval.py: ") and "\n" not in message, message
    return message


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(tiny_model(), path)
    return path


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_a_model_path_that_does_not_exist(tmp_path):
    assert "--model" in one_line_exit(["--model", str(tmp_path / "nowhere"), "--tasks", "none", "--ppl"])


def test_a_truncated_safetensors_file(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights}: unreadable or truncated" in one_line_exit(["--model", str(checkpoint), "--tasks", "none"])


def test_a_config_that_is_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{hidden_size: 64")
    assert "config.json: not valid JSON" in one_line_exit(["--model", str(checkpoint), "--tasks", "none"])


def test_a_folder_without_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    assert "neither model.safetensors" in one_line_exit(["--model", str(checkpoint), "--tasks", "none"])


def test_another_model_type(checkpoint):
    edit_json(checkpoint / "config.json", lambda c: c | {"model_type": "mistral"})
    assert "model_type 'mistral' is not supported" in one_line_exit(["--model", str(checkpoint), "--tasks", "none"])


def test_a_weight_whose_shape_disagrees_with_the_config(checkpoint):
    edit_json(checkpoint / "config.json", lambda c: c | {"intermediate_size": 80})
    message = one_line_exit(["--model", str(checkpoint), "--tasks", "none"])
    assert "model.safetensors: key" in message and "config.json implies" in message


def test_a_tampered_rotation_record(tmp_path):
    model = tiny_model()
    rotate.rotate_model(model, seed=0)
    rotate.save_rotated(model, model.rotation, tmp_path / "rotated")
    edit_json(tmp_path / "rotated" / "rotation.json", lambda r: {k: v for k, v in r.items() if k != "r4"})
    assert "rotation.json: missing key(s) ['r4']" in one_line_exit(["--model", str(tmp_path / "rotated")])


def test_a_tampered_quantization_record(tmp_path):
    save_quantized(quant.quantize_model(tiny_model(), w_bits=4, a_bits=4), tmp_path / "quantized")
    edit_json(tmp_path / "quantized" / "quantization.json", lambda r: r | {"bits": 3})
    assert "quantization.json: field 'bits' is 3" in one_line_exit(["--model", str(tmp_path / "quantized")])


def test_a_malformed_line_of_a_prepared_jsonl_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n')
    with pytest.raises(BadInput, match=rf"{path}, line 2: not valid JSON .* run data/alpaca/prepare.py again"):
        read_prepared_jsonl(path, lambda: None, "data/alpaca/prepare.py")


def test_a_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        with one_line_errors("eval.py"):
            1 / 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_the_command_lines_print_one_line(tmp_path):
    """The scripts' own __main__: train.py --device cuda without CUDA (argparse's one line) and
    model.py, rotate.py on a folder without weights."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(tiny_model().config.to_hf()))
    runs = [(["train.py", "--device", "cuda"], "--device=cuda: this machine's torch has no CUDA device"),
            (["model.py", "--model", str(tmp_path / "empty")], "neither model.safetensors"),
            (["rotate.py", "--model", str(tmp_path / "empty")], "neither model.safetensors")]
    for argv, expected in runs:
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and expected in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2, done.stderr
