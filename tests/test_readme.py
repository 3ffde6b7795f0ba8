"""Every command README.md (the front page) and bench/README.md (the results) quote parses with
today's flags: a renamed or removed flag, or a value the validation refuses (the GPU recipe's
`--ppl-windows 0` once did), fails here, not for a reader. The front page stays a front page (at
most 250 lines), and the grid's tables are the ones bench/reproduce.py --table makes."""
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
    import bench_int
    import bench_learned_rotation
    import bench_model
    import bench_plan
    import bench_quant
    import bench_rotate
    import bench_train
    import gpu_step
    import reproduce
    import eval as ev
    import model
    import rotate
    import train
    return {"train.py": train.TrainConfig(), "eval.py": ev.EvalConfig(), "rotate.py": rotate.RotateConfig(),
            "model.py": model.SampleConfig(), "bench/bench_eval.py": bench_eval.BenchEvalConfig(),
            "bench/bench_model.py": bench_model.BenchModelConfig(), "bench/bench_plan.py": bench_plan.BenchPlanConfig(),
            "bench/bench_int.py": bench_int.BenchIntConfig(),
            "bench/bench_learned_rotation.py": bench_learned_rotation.BenchLearnedConfig(),
            "bench/bench_quant.py": bench_quant.BenchQuantConfig(),
            "bench/bench_rotate.py": bench_rotate.BenchRotateConfig(),
            "bench/bench_train.py": bench_train.BenchTrainConfig(), "bench/reproduce.py": reproduce.ReproduceConfig(),
            "bench/gpu_step.py": gpu_step.GpuStepConfig()}


READMES = ("README.md", "bench/README.md")  # the front page, and every result with its command
FRONT_PAGE_LINES = 250


def readme_commands(readme: str) -> list[list[str]]:
    """argv of every `python SCRIPT ...` a README quotes, in code blocks or inline code."""
    text = (ROOT / readme).read_text()
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
    return [c for c in commands if c and (c[0] in ("train.py", "eval.py", "rotate.py", "model.py")
                                          or c[0].startswith("bench/"))]


COMMANDS = [(readme, c) for readme in READMES for c in readme_commands(readme)]


def test_the_readme_quotes_the_main_commands():
    front = readme_commands("README.md")
    assert {"train.py", "eval.py", "rotate.py", "model.py"} <= {c[0] for c in front}
    recipe = [c for readme in READMES for c in readme_commands(readme)
              if c[:1] == ["train.py"] and "--ppl-windows" in c and c[c.index("--ppl-windows") + 1] == "0"]
    assert recipe  # the GPU recipe, whose `--ppl-windows 0` (every window) the validation once refused


def test_ci_runs_the_readmes_test_command():
    """.ci/run installs what the README's test command installs and runs its pytest, with only
    reporting flags added: a newcomer's run and CI's are the same suite on the same workers."""
    [readme] = re.findall(r"^pip install (.*) && ROLORA_MIRROR=\S+ python -m pytest (.*)$",
                          (ROOT / "README.md").read_text(), re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    installs, pytest_args = readme
    for requirement in re.findall(r"-r (\S+)", installs) + re.findall(r"torch==\S+", installs):
        assert requirement in ci, requirement
    assert f"python -m pytest {pytest_args} " in ci


def test_the_front_page_is_a_front_page():
    """README.md is what a newcomer reads first: the quick start, what it prints, where to read; the
    results live in bench/README.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= FRONT_PAGE_LINES, f"README.md has {len(lines)} lines; move results to bench/README.md"


@pytest.mark.parametrize("readme, argv", COMMANDS, ids=[f"{r}: {' '.join(c)}"[:90] for r, c in COMMANDS])
def test_readme_command_parses(readme, argv):
    from data.options import parse_config
    configs = script_configs()
    assert argv[0] in configs, f"{readme} runs {argv[0]}, which has no parse_config dataclass"
    if "--help" in argv:
        return
    parse_config(configs[argv[0]], argv[1:], prog=argv[0])  # SystemExit on a bad flag or value


def grid_table() -> str:
    """What `python bench/reproduce.py --table` prints, from the committed bench/reproduce_results.json."""
    import reproduce
    return reproduce.format_table(json.loads((ROOT / "bench" / "reproduce_results.json").read_text()))


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def section(readme: str, heading: str) -> str:
    """The text under a heading (a whole line, e.g. "## Benchmarks") up to the next heading of its
    level or above."""
    lines = (ROOT / readme).read_text().splitlines()
    start = lines.index(heading)
    level = heading.split(" ")[0]
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ")[0]) <= len(level)), len(lines))
    return "\n".join(lines[start + 1:end])


def test_the_readme_grid_table_is_the_one_the_results_file_makes():
    """bench/README.md's table of the paper's grid is bench/reproduce.py --table's, row for row: a row
    edited by hand, or a results file committed without its table, fails here."""
    made = table_rows(grid_table())
    assert made and table_rows(section("bench/README.md", "## The paper's experiment with error bars")) == made


def test_the_front_pages_headline_is_the_grid():
    """The front page's W4A4 headline (average ± stderr and perplexity of each method at W4A4 RTN and
    GPTQ) is read off the grid `--table` prints, cell for cell: a view of it, not a copy that drifts."""
    cells = lambda row: [cell.strip() for cell in row.strip("|").split("|")]  # noqa: E731
    header, *rows = [cells(row) for row in table_rows(grid_table())]
    grid = {(row[0], row[1]): dict(zip(header, row)) for row in rows}
    _, *headline = [cells(row) for row in
                       table_rows(section("README.md", "## The headline result: the paper's comparison, with error bars"))]
    assert [row[0] for row in headline] == ["LoRA", "LBR", "RoLoRA", "RoLoRA + QAT"]
    for name, rtn_average, rtn_ppl, gptq_average, gptq_ppl in headline:
        method = name.lower().replace(" + ", "_")
        for setting, average, ppl in (("w4a4_rtn", rtn_average, rtn_ppl), ("w4a4_gptq", gptq_average, gptq_ppl)):
            made = grid[(method, setting)]
            assert (average, ppl) == (made["average ± stderr"], made["wiki2 ppl"]), (name, setting)
