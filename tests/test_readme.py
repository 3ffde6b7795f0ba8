"""Every command the README quotes parses with today's flags: a renamed or removed flag, or a value
the validation refuses (the GPU recipe's `--ppl-windows 0` once did), fails here, not for a reader."""
import json
import re
import shlex
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def script_configs() -> dict:
    """script path as the README writes it -> its default configuration (the parser's defaults)."""
    import bench_eval
    import bench_learned_rotation
    import bench_model
    import bench_plan
    import bench_quant
    import bench_rotate
    import bench_train
    import reproduce
    import eval as ev
    import model
    import rotate
    import train
    return {"train.py": train.TrainConfig(), "eval.py": ev.EvalConfig(), "rotate.py": rotate.RotateConfig(),
            "model.py": model.SampleConfig(), "bench/bench_eval.py": bench_eval.BenchEvalConfig(),
            "bench/bench_model.py": bench_model.BenchModelConfig(), "bench/bench_plan.py": bench_plan.BenchPlanConfig(),
            "bench/bench_learned_rotation.py": bench_learned_rotation.BenchLearnedConfig(),
            "bench/bench_quant.py": bench_quant.BenchQuantConfig(),
            "bench/bench_rotate.py": bench_rotate.BenchRotateConfig(),
            "bench/bench_train.py": bench_train.BenchTrainConfig(), "bench/reproduce.py": reproduce.ReproduceConfig()}


def readme_commands() -> list[list[str]]:
    """argv of every `python SCRIPT ...` the README quotes, in code blocks or inline code."""
    text = (ROOT / "README.md").read_text()
    text = text.replace("\\\n", " ")  # shell line continuations
    commands = []
    for snippet in re.findall(r"```bash\n(.*?)```", text, re.S) + [
            inline.replace("\n", " ") for inline in re.findall(r"`([^`]*python [^`]*)`", text)]:
        for line in snippet.splitlines():
            for part in line.split("&&"):
                part = part.split(" # ")[0].strip()
                words = shlex.split(part) if "python " in part else []
                if "python" in words:
                    commands.append(words[words.index("python") + 1:])
    return commands


COMMANDS = [c for c in readme_commands() if c and c[0] in ("train.py", "eval.py", "rotate.py", "model.py")
            or (c and c[0].startswith("bench/"))]


def test_the_readme_quotes_the_main_commands():
    scripts = {c[0] for c in COMMANDS}
    assert {"train.py", "eval.py", "rotate.py", "model.py"} <= scripts
    assert any(c[:1] == ["train.py"] and "--ppl-windows" in c and "0" in c for c in COMMANDS)  # the GPU recipe


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_parses(argv):
    from data.options import parse_config
    configs = script_configs()
    assert argv[0] in configs, f"the README runs {argv[0]}, which has no parse_config dataclass"
    if "--help" in argv:
        return
    parse_config(configs[argv[0]], argv[1:], prog=argv[0])  # SystemExit on a bad flag or value


def test_the_readme_grid_table_is_the_one_the_results_file_makes():
    """The README's table of the paper's grid is bench/reproduce.py --table's, row for row, from the
    committed bench/reproduce_results.json: a row edited by hand, or a results file committed
    without its table, fails here."""
    import reproduce
    made = reproduce.format_table(json.loads((ROOT / "bench" / "reproduce_results.json").read_text()))
    table_rows = lambda text: [line for line in text.splitlines() if line.startswith("| ")]  # noqa: E731
    readme = (ROOT / "README.md").read_text()
    grid = readme[readme.index("### The paper's experiment with error bars"):]
    grid = grid[:grid.index("\n### ")]
    assert table_rows(made) and table_rows(grid) == table_rows(made)
