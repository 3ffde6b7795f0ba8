"""bench/reproduce.py, the paper's grid: every cell saved when done and skipped when present, an
interrupted run continues to the numbers of an uninterrupted one, LBR is LoRA's own merged model
rotated (so it equals LoRA at full precision), and the table is made from the results file."""
import json
import math
import re
import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import eval as evaluation  # noqa: E402
import lora  # noqa: E402
import paired  # noqa: E402
import reproduce  # noqa: E402
import train  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # stories260K from the mirror


def grid_args(tmp_path, *extra):
    return ["--model", "stories260K", "--data", "tinystories", "--out", str(tmp_path / "out"),
            "--results", str(tmp_path / "results.json"), "--keep", "", "--steps", "3", "--tasks", "piqa,arc_easy",
            "--eval-limit", "4", "--ppl-windows", "1", "--ppl-seq-len", "64", "--val-examples", "8",
            "--calib-windows", "2", "--calib-seq-len", "32", *extra]


def cells(tmp_path) -> dict:
    return json.loads((tmp_path / "results.json").read_text())["cells"]


def test_the_grid_saves_every_cell_and_lbr_is_lora_rotated(tmp_path, stories_dir, capsys):
    reproduce.main(grid_args(tmp_path, "--methods", "lora,lbr,rolora", "--settings", "fp,w4a4_rtn,w4a4_gptq"))
    done = cells(tmp_path)
    assert set(done) == {"train/lora", "train/rolora"} | {
        f"eval/{m}/{s}" for m in ("lora", "lbr", "rolora") for s in ("fp", "w4a4_rtn", "w4a4_gptq")}
    assert done["train/lora"]["rotation"] is None and done["train/rolora"]["rotation"]["r4"]
    assert len(done["train/lora"]["history"]["train_loss"]) == 3
    row = lambda name: done[name]["row"]  # noqa: E731
    # LBR: the same adapters, merged, then rotated: in full precision the same network as LoRA's
    assert row("eval/lbr/fp")["heldout_loss"] == pytest.approx(row("eval/lora/fp")["heldout_loss"], rel=1e-5)
    assert row("eval/lbr/fp")["ppl"] == pytest.approx(row("eval/lora/fp")["ppl"], rel=1e-5)
    # ... but quantized it is another model, and so is RoLoRA's (trained on the rotated weights)
    assert row("eval/lbr/w4a4_rtn")["ppl"] != pytest.approx(row("eval/lora/w4a4_rtn")["ppl"], rel=1e-3)
    assert row("eval/rolora/fp")["heldout_loss"] != pytest.approx(row("eval/lora/fp")["heldout_loss"], rel=1e-6)
    assert done["eval/lora/w4a4_gptq"]["quant"]["w_method"] == "gptq"
    for name in done:
        assert done[name]["seconds"] >= done[name]["cpu_seconds"] / 4 > 0 and done[name]["machine"]
    for r in (row(n) for n in done if n.startswith("eval/")):
        assert 0 <= r["average"] <= 1 and r["average_stderr"] > 0

    capsys.readouterr()
    reproduce.main(grid_args(tmp_path, "--table"))
    table = capsys.readouterr().out
    assert table.count("\n| lbr | ") == 3 and "| rolora | w4a4_gptq |" in table
    assert f"{100 * row('eval/lora/fp')['average']:.2f} ± {100 * row('eval/lora/fp')['average_stderr']:.2f}" in table
    assert "RoLoRA recovers" in table and table.count("LAR (RoLoRA) minus LBR") == 3
    chance = (0.5 + sum(1 / len(r["choices"]) for r in evaluation.load_task("arc_easy")[:4]) / 4) / 2  # piqa: 2
    assert f"Guessing at random scores {100 * chance:.2f} on these items" in table
    reproduce.main(grid_args(tmp_path, "--figures"))
    for figure in ("reproduce_average.png", "reproduce_loss.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reproduce.main(grid_args(tmp_path, "--status", "--methods", "lora,rolora_qat"))
    status = capsys.readouterr().out
    assert "eval/lora/fp" in status and re.search(r"\ntrain/rolora_qat +to do\n", status)
    assert re.search(r"left: 5 rows and the trainings \['rolora_qat'\], about [\d.]+ h at the mean of the "
                     r"finished ones made on this CPU \(", status), status  # a CPU's times, not another's


def test_an_interrupted_grid_continues_and_a_finished_one_computes_nothing(tmp_path, stories_dir, monkeypatch,
                                                                           capsys):
    args = grid_args(tmp_path, "--methods", "lora", "--settings", "fp,w4a4_rtn")
    real_batch_for_step = train.batch_for_step

    def dies_in_the_third_step(step, *rest):  # steps count from 0
        if step == 2:
            raise KeyboardInterrupt  # the machine stops in the middle of a training
        return real_batch_for_step(step, *rest)
    monkeypatch.setattr(train, "batch_for_step", dies_in_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    capsys.readouterr()
    reproduce.main(args + ["--status"])
    status = capsys.readouterr().out
    assert re.search(r"train/lora +cut +at step 2 of 3 ", status) and re.search(r"\neval/lora/fp +to do\n", status), status
    monkeypatch.setattr(train, "batch_for_step", real_batch_for_step)
    real_evaluate_row = train.evaluate_row
    calls = []

    def dies_on_the_second_row(r, model, *rest):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the machine stops in the middle of a cell
        return real_evaluate_row(r, model, *rest)
    monkeypatch.setattr(train, "evaluate_row", dies_on_the_second_row)
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    assert set(cells(tmp_path)) == {"train/lora", "eval/lora/fp"}
    monkeypatch.setattr(train, "evaluate_row", real_evaluate_row)
    monkeypatch.setattr(train, "finetune_stage", lambda *a: pytest.fail("trained again"))
    reproduce.main(args)  # continues: no training, one row
    continued = cells(tmp_path)
    assert set(continued) == {"train/lora", "eval/lora/fp", "eval/lora/w4a4_rtn"}
    assert continued["train/lora"]["resumed_at_step"] == 2  # its seconds are those of steps 2 and 3 only
    capsys.readouterr()
    reproduce.main(args + ["--status"])
    assert re.search(r"^train/lora +done .*\(resumed at step 2: the time of its last part only\)$",
                     capsys.readouterr().out, re.M)

    monkeypatch.setattr(train, "evaluate_row", lambda *a: pytest.fail("evaluated again"))
    reproduce.main(args)  # everything is there: nothing runs
    assert cells(tmp_path) == continued

    other = tmp_path / "uninterrupted"
    monkeypatch.undo()
    reproduce.main(grid_args(other, "--methods", "lora", "--settings", "fp,w4a4_rtn"))
    for name in continued:
        if name.startswith("eval/"):
            assert cells(other)[name]["row"] == continued[name]["row"]


def test_a_row_cut_between_two_tasks_continues_from_its_last_finished_task(tmp_path, stories_dir, monkeypatch,
                                                                           capsys):
    args = grid_args(tmp_path, "--methods", "lora", "--settings", "fp")
    real_evaluate_task = evaluation.evaluate_task
    tasks_run = []

    def dies_on(stop_at):
        def evaluate_task(model, tokenizer, task, *rest, **options):
            tasks_run.append(task)
            if task == stop_at:
                raise KeyboardInterrupt
            return real_evaluate_task(model, tokenizer, task, *rest, **options)
        return evaluate_task
    monkeypatch.setattr(evaluation, "evaluate_task", dies_on("arc_easy"))
    with pytest.raises(KeyboardInterrupt):
        reproduce.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert "eval/lora/fp" not in results["cells"]
    cut = results["partial"]["eval/lora/fp"]
    assert list(cut["row"]) == ["heldout_loss", "heldout_examples", "ppl_windows", "ppl", "tasks"] and list(cut["row"]["tasks"]) == ["piqa"]
    capsys.readouterr()
    reproduce.main(args + ["--status"])
    status = capsys.readouterr().out
    assert re.search(r"eval/lora/fp +cut +\d+ s  after heldout_loss, ppl, piqa\n", status), status

    tasks_run.clear()
    monkeypatch.setattr(evaluation, "evaluate_task", dies_on(None))
    monkeypatch.setattr(evaluation, "perplexity", lambda *a: pytest.fail("perplexity computed again"))
    reproduce.main(args)
    assert tasks_run == ["arc_easy"]  # piqa, the loss and the perplexity were kept
    results = json.loads((tmp_path / "results.json").read_text())
    assert "partial" not in results and results["cells"]["eval/lora/fp"]["seconds"] >= cut["seconds"]

    monkeypatch.undo()
    other = tmp_path / "uninterrupted"
    reproduce.main(grid_args(other, "--methods", "lora", "--settings", "fp"))
    assert cells(other)["eval/lora/fp"]["row"] == results["cells"]["eval/lora/fp"]["row"]


def test_two_processes_of_the_grid_share_one_results_file_without_losing_cells(tmp_path, stories_dir, monkeypatch):
    args = grid_args(tmp_path, "--methods", "lora", "--settings", "fp,w4a4_rtn")
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))
    real_evaluate_row = train.evaluate_row

    def another_process_writes_meanwhile(r, model, *rest):  # a second grid process runs a row while this one does
        if not calls:
            calls.append(1)
            reproduce.main(grid_args(tmp_path, "--methods", "lbr", "--settings", "fp"))  # its own --out folder
            results = json.loads((tmp_path / "results.json").read_text())
            results["partial"] = {"eval/lbr/w4a4_rtn": {"seconds": 2.0, "cpu_seconds": 2.0, "row": {"ppl": 3.0}}}
            (tmp_path / "results.json").write_text(json.dumps(results))  # ... and leaves a row cut
        return real_evaluate_row(r, model, *rest)
    calls = []
    monkeypatch.setattr(train, "evaluate_row", another_process_writes_meanwhile)
    reproduce.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == {"train/lora", "eval/lora/fp", "eval/lora/w4a4_rtn", "eval/lbr/fp"}
    ppl = {name: results["cells"][name]["row"]["ppl"] for name in ("eval/lbr/fp", "eval/lora/fp")}
    assert ppl["eval/lbr/fp"] == pytest.approx(ppl["eval/lora/fp"])  # a real row: LBR at fp is LoRA rotated
    assert results["partial"] == {"eval/lbr/w4a4_rtn": {"seconds": 2.0, "cpu_seconds": 2.0, "row": {"ppl": 3.0}}}


def test_cells_of_other_settings_are_never_mixed_into_one_results_file(tmp_path, stories_dir):
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match=r"results\.json: its cells were made with other settings: --steps 4 "
                                         r"\(the file has 3\)"):
        reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp,w4a4_rtn", "--steps", "4"))
    assert (tmp_path / "results.json").read_text() == before  # nothing written


def test_a_training_lost_with_its_machine_is_trained_again_and_must_be_the_same_training(tmp_path, stories_dir):
    import shutil
    args = grid_args(tmp_path, "--methods", "lora", "--settings", "fp")
    reproduce.main(args)
    first = cells(tmp_path)["train/lora"]
    assert len(first["adapters_sha256"]) == 64 and len(first["adapters_fingerprint"]) == reproduce.FINGERPRINT_SIZE
    assert first["machine"].startswith("CPU ") and first["seed"] == 0
    shutil.rmtree(tmp_path / "out")  # a new machine: the results file came with the repository, the adapters did not
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp,w4a4_rtn"))
    again = cells(tmp_path)["train/lora"]
    assert again["adapters_sha256"] == first["adapters_sha256"] and again["history"] == first["history"]

    results = json.loads((tmp_path / "results.json").read_text())
    results["cells"]["train/lora"]["adapters_sha256"] = "0" * 64  # as if the finished cells came from other adapters
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="its adapters are not the ones train/lora in .*recorded"):
        reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "w4a4_gptq"))

    # made elsewhere: the losses and the adapters' fingerprint a float rounding away, and another digest
    recorded = results["cells"]["train/lora"]
    recorded["history"]["train_loss"][-1] *= 1 + 1e-7
    recorded["adapters_fingerprint"][0] *= 1 + 1e-6
    (tmp_path / "results.json").write_text(json.dumps(results))
    shutil.rmtree(tmp_path / "out")
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "w4a4_gptq"))  # the same training
    done = cells(tmp_path)
    assert done["train/lora"]["adapters_sha256"] == first["adapters_sha256"] and "eval/lora/w4a4_gptq" in done
    measured = done["train/lora"]["same_as_recorded"]
    assert measured["adapters_sha256"] == "0" * 64 and 0 < measured["loss"] < 1e-6 and 0 < measured["fingerprint"] < 1e-5
    accepted = (tmp_path / "results.json").read_text()

    for change, what in ((lambda c: c["history"]["train_loss"].__setitem__(0, c["history"]["train_loss"][0] * 1.01),
                          "loss curve 9.9e-03 apart"),
                         (lambda c: c["adapters_fingerprint"].__setitem__(0, -c["adapters_fingerprint"][0]),
                          "adapters .* apart")):
        results = json.loads(accepted)  # each change alone: a refused run leaves the results file as it was
        change(results["cells"]["train/lora"])  # another seed or learning rate would move them this far
        results["cells"]["train/lora"]["adapters_sha256"] = "0" * 64  # ... and give another digest
        (tmp_path / "results.json").write_text(json.dumps(results))
        for folder in ("lora", "eval"):  # the last accepted model and its row, then the refused one's kept copy
            shutil.rmtree(tmp_path / "out" / folder, ignore_errors=True)
        with pytest.raises(ValueError, match=f"train/lora: trained again, it gave another training than the one the "
                                             f"finished cells of .*results.json were made with \\(.*{what}"):
            reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "w6a6_gptq"))
        assert "eval/lora/w6a6_gptq" not in cells(tmp_path)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir()) == ["lora.differs"] * 2


def test_a_model_lost_with_its_machine_is_merged_again_from_the_kept_adapters(tmp_path, stories_dir, capsys):
    """The kept adapters (committed) stand in for a lost training: merged again, the same model bit
    for bit, and the recorded training stays; kept adapters that are not the recorded ones are refused."""
    import shutil
    from safetensors.torch import load_file, save_file
    grid = lambda *extra: grid_args(tmp_path, "--keep", str(tmp_path / "kept"), *extra)  # noqa: E731
    reproduce.main(grid("--methods", "rolora", "--settings", "fp"))
    kept, merged = tmp_path / "kept" / "rolora", tmp_path / "out" / "rolora" / "merged"
    recorded = cells(tmp_path)["train/rolora"]
    assert reproduce.file_digest(kept / lora.ADAPTER_WEIGHTS) == recorded["adapters_sha256"]
    assert json.loads((kept / lora.ADAPTER_CONFIG).read_text())["peft_type"] == "LORA"
    before = {f.name: load_file(str(f)) for f in merged.glob("*.safetensors")}
    shutil.rmtree(tmp_path / "out")  # a new machine: the results file and the kept adapters came with the repository
    reproduce.main(grid("--status", "--methods", "rolora", "--settings", "fp,w4a4_rtn"))
    assert "(its model is not here: merged again from its kept adapters before its next row)" in capsys.readouterr().out
    reproduce.main(grid("--methods", "rolora", "--settings", "fp,w4a4_rtn"))
    assert "== train/rolora: merged again from its kept adapters" in capsys.readouterr().out
    done = cells(tmp_path)
    assert done["train/rolora"] == recorded and "eval/rolora/w4a4_rtn" in done  # not trained again
    after = {f.name: load_file(str(f)) for f in merged.glob("*.safetensors")}
    assert before.keys() == after.keys() and all(
        torch.equal(before[f][k], after[f][k]) for f in before for k in before[f])
    assert (merged / "rotation.json").is_file()

    other = load_file(str(kept / lora.ADAPTER_WEIGHTS))
    next(iter(other.values()))[0, 0] += 1e-3  # other adapters than the recorded ones
    save_file(other, str(kept / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(ValueError, match=f"{kept / lora.ADAPTER_WEIGHTS}: not the adapters train/rolora in .* recorded"):
        reproduce.main(grid("--methods", "rolora", "--settings", "w4a4_gptq"))
    assert "eval/rolora/w4a4_gptq" not in cells(tmp_path)


def test_a_training_no_row_was_made_from_may_be_replaced_by_one_that_differs(tmp_path, stories_dir, capsys):
    import shutil
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))
    results = json.loads((tmp_path / "results.json").read_text())
    recorded = results["cells"]["train/lora"]["adapters_sha256"]
    results["cells"]["train/lora"]["adapters_sha256"] = "0" * 64  # recorded elsewhere, with other adapters
    results["cells"]["train/lora"]["adapters_fingerprint"][0] += 1.0
    results["partial"] = {"eval/lora/w4a4_rtn": {"seconds": 1.0, "cpu_seconds": 1.0, "row": {"ppl": 3.0}}}
    del results["cells"]["eval/lora/fp"]  # ... and only a cut row made from it
    (tmp_path / "results.json").write_text(json.dumps(results))
    shutil.rmtree(tmp_path / "out")
    with pytest.raises(ValueError, match="train/lora: trained again, it gave another training"):  # the cut row counts
        reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))

    del results["partial"]  # no row at all: nothing was made from the recorded adapters
    (tmp_path / "results.json").write_text(json.dumps(results))
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))
    assert "no row was made from it, so this training replaces it" in capsys.readouterr().out
    done = cells(tmp_path)
    assert done["train/lora"]["adapters_sha256"] == recorded and "eval/lora/fp" in done


def test_the_paired_experiment_runs_each_seed_with_per_item_records(tmp_path, stories_dir, capsys):
    """--seeds: each seed's cells under seed<S>/, rows with the records a paired comparison needs,
    and --table's paired answer; another seed's training is another training."""
    reproduce.main(grid_args(tmp_path, "--methods", "lora", "--settings", "fp"))  # the grid's own cells, seed 0
    reproduce.main(grid_args(tmp_path, "--seeds", "0,1", "--methods", "lbr,rolora", "--settings", "w4a4_rtn"))
    done = cells(tmp_path)
    assert {f"seed{s}/{c}" for s in (0, 1) for c in ("train/lora", "train/rolora", "eval/lbr/w4a4_rtn",
                                                     "eval/rolora/w4a4_rtn")} <= set(done)
    assert done["seed1/train/lora"]["seed"] == 1 and done["seed1/train/lora"]["history"] != done["seed0/train/lora"]["history"]
    twin = done["seed0/train/lora"]["grid_training"]  # the same training as the grid's train/lora, made again
    assert twin["same"] and twin["loss"] == 0.0
    row = done["seed1/eval/rolora/w4a4_rtn"]["row"]
    assert paired.has_records(row) and len(row["ppl_windows"]) == 1 and len(row["heldout_examples"]) == 8
    assert [len(row["tasks"][t]["correct"]) for t in ("piqa", "arc_easy")] == [4, 4]
    assert row["ppl"] == pytest.approx(math.exp(row["ppl_windows"][0][0] / row["ppl_windows"][0][1]))
    tokens = sum(n for _, n in row["heldout_examples"])
    assert row["heldout_loss"] == pytest.approx(sum(loss for loss, _ in row["heldout_examples"]) / tokens, rel=1e-6)
    capsys.readouterr()
    reproduce.main(grid_args(tmp_path, "--table"))
    table = capsys.readouterr().out
    overall, per_task = table.split("Per task (points, paired):")
    for part in overall, per_task:  # the average, perplexity and held-out loss; then each task
        lines = [line for line in part.splitlines() if line.startswith("| LAR (RoLoRA) minus LBR | w4a4_rtn |")]
        assert [line.split(" | ")[2] for line in lines] == ["0", "1", "mean of 2"]
    assert "Machine noise, train/lora made again as seed0/train/lora" in table

    recorded = json.loads((tmp_path / "results.json").read_text())
    recorded["cells"]["seed0/train/lora"] = recorded["cells"]["seed1/train/lora"]  # as if seed 0's were seed 1's
    (tmp_path / "results.json").write_text(json.dumps(recorded))
    import shutil
    shutil.rmtree(tmp_path / "out" / "seed0" / "lora")
    with pytest.raises(ValueError, match="seed0/train/lora: trained again, it gave another training"):
        reproduce.main(grid_args(tmp_path, "--seeds", "0", "--methods", "lbr", "--settings", "w4a4_gptq"))


def test_the_readings_answer_the_three_questions_from_the_rows():
    row = lambda average, stderr: {"average": average, "average_stderr": stderr}  # noqa: E731
    table = {("lora", "fp"): row(0.44, 0.008), ("lora", "w4a4_rtn"): row(0.36, 0.008),
             ("lbr", "w4a4_rtn"): row(0.38, 0.006), ("rolora", "w4a4_rtn"): row(0.41, 0.008),
             ("rolora_qat", "w4a4_rtn"): row(0.40, 0.006)}
    assert reproduce.readings(table) == [
        "- w4a4_rtn: RoLoRA recovers 62% of the gap between LoRA at w4a4_rtn (36.00) and LoRA at full "
        "precision (44.00).",
        "- w4a4_rtn: LAR (RoLoRA) minus LBR: +3.00 ± 1.00 points (+3.0 standard errors).",
        "- w4a4_rtn: RoLoRA + QAT minus RoLoRA: -1.00 ± 1.00 points (-1.0 standard errors)."]
    del table[("lbr", "w4a4_rtn")]
    assert not any("LBR" in line for line in reproduce.readings(table))  # a question waits for its rows


def test_unknown_methods_and_settings_are_one_line_errors(capsys):
    for flag, value in (("--methods", "lora,qlora"), ("--settings", "w3a3")):
        with pytest.raises(SystemExit):
            reproduce.main([flag, value, "--status"])
        assert f"{flag}={value}: unknown" in capsys.readouterr().err
