"""Studies: spec validation, equal-epsilon calibration, equal tuning budgets, the in-process grid,
and the 1-minute cut of dp-small whose report must agree with the runs' own results files."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from plateau.config import RunConfig
from plateau.privacy.accounting import PrivacyAccountant
from server_app.privacy_plan import event_for
from study import SpecError, load_spec
from study.__main__ import main
from study.runner import Calibrator, equal_epsilon

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "studies").glob("*.toml"))


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


ARM = '[[arms]]\nname = "A"\nconfig = { algorithm = "fedavg" }\n'


@pytest.mark.parametrize("text, words", [
    ('colour = 1\n' + ARM, "unknown key(s) ['colour']"),
    ('[base]\nlearning-rate = 0.1\n' + ARM, "'learning-rate' is not a run-config key"),
    ('[base]\nseed = 3\n' + ARM, "'seed' is managed by the study runner"),
    ('[grid]\nlr = 0.1\n' + ARM, "'lr' must be a non-empty list"),
    ('[base]\nlr = -1.0\n' + ARM, "lr"),
    ('[tuning]\nat = { lr = 0.5 }\n[grid]\nlr = [0.1]\n' + ARM, "is not among the grid's"),
    ('', "at least one [[arms]]"),
    (ARM + ARM, "arm names must be unique"),
])
def test_a_bad_spec_is_one_error_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(SpecError, match=re.escape(words)):
        load_spec(write_spec(tmp_path, text))


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_shipped_specs_load_at_every_scale(spec: Path) -> None:
    import tomllib

    scales = ["default", *tomllib.loads(spec.read_text()).get("scales", {})]
    for scale in scales:
        study = load_spec(spec, scale)
        assert study.points() and study.arms


def test_every_arm_gets_the_same_tuning_budget(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, """
[tuning]
budget = 3
[[arms]]
name = "wide"
config = { algorithm = "fedavg" }
tune = { lr = [0.01, 0.1, 1.0], clip-norm = [0.5, 1.0] }
[[arms]]
name = "narrow"
config = { algorithm = "fedsam" }
tune = { lr = [0.1, 0.2] }
""")
    study = load_spec(spec)
    wide, narrow = study.arms
    trials = wide.trials(study.tuning.budget, study.name)
    assert len(trials) == 3 and len({json.dumps(t, sort_keys=True) for t in trials}) == 3
    assert trials == wide.trials(study.tuning.budget, study.name)  # a fixed draw
    assert {t["lr"] for t in trials} == {0.01, 0.1, 1.0}  # every value of a key is tried
    assert {t["clip-norm"] for t in trials} == {0.5, 1.0}
    assert len(narrow.trials(study.tuning.budget, study.name)) == 2  # all of a smaller space


@pytest.mark.slow
def test_equal_epsilon_gives_every_arm_the_same_sigma_and_a_cap(tmp_path: Path) -> None:
    calibrator = Calibrator(tmp_path / "calibration.json")
    common = {"dp": "central", "sample-rate": 0.1, "num-server-rounds": 10,
              "target-epsilon": 4.0, "target-delta": 1e-5}
    fedavg = equal_epsilon({**common, "algorithm": "fedavg", "lr": 0.1}, 500, calibrator)
    fedpgn = equal_epsilon({**common, "algorithm": "fedpgn", "lr": 0.3}, 500, calibrator)
    assert fedavg["noise-multiplier"] == fedpgn["noise-multiplier"]
    assert fedavg["max-epsilon"] == 4.0 and "target-epsilon" not in fedavg
    # independent check with the accountant: sigma reaches the target, 1 % less does not
    cfg = RunConfig.from_mapping({**common, "noise-multiplier": 1.0})
    accountant = PrivacyAccountant(cfg.accountant, cfg.sampling_method)
    sigma = fedavg["noise-multiplier"]
    assert accountant.epsilon_after(event_for(cfg, 500, sigma), 1e-5, 10) <= 4.0 + 1e-6
    assert accountant.epsilon_after(event_for(cfg, 500, sigma * 0.99), 1e-5, 10) > 4.0
    # the table is reused from disk, not recomputed
    assert json.loads((tmp_path / "calibration.json").read_text())
    # no DP: no sigma; the authors' clip (no epsilon exists): the same nominal sigma, no cap
    assert equal_epsilon({**common, "dp": "off"}, 500, calibrator).keys() == (
        {**common, "dp": "off"}.keys() - {"target-epsilon"})
    code = equal_epsilon({**common, "dp": "distributed", "dp-clip-mode": "code"}, 500,
                         calibrator)
    assert "max-epsilon" not in code and code["noise-multiplier"] > 0


@pytest.mark.simulation
def test_the_local_grid_runs_the_same_simulation_as_flowers_engine(tmp_path: Path) -> None:
    """A study cell (in-process grid) and Flower's Ray simulation of the same config produce
    the same rounds: same sampling, same data, same updates."""
    from study.grid import run_local
    from tests.helpers import simulate

    config = {"dataset": "digits", "model": "linear", "num-server-rounds": 2, "seed": 4,
              "sample-rate": 0.6, "local-steps": 3, "checkpoint": False}
    local = run_local(config, 5, tmp_path / "local" / "run")
    _, engine = simulate(tmp_path / "engine", nodes=5, engine="ray", **{k.replace("-", "_"): v
                                                          for k, v in config.items()})
    for mine, theirs in zip(local.rounds, engine, strict=True):
        assert mine["num_clients"] == theirs["num_clients"]
        assert mine["test_loss"] == pytest.approx(theirs["test_loss"], rel=1e-5)
        assert mine["global_update_norm"] == pytest.approx(theirs["global_update_norm"], rel=1e-5)


def table_rows(report: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header starts with ``header_start``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, [c.strip() for c in line.strip("|").split("|")],
                             strict=True)))
    return rows


def mismatches(out: Path, report: str) -> list[str]:
    """Where the report's main table disagrees with the runs' own files (rounds.jsonl,
    summary.json under runs/<cell id>), recomputed here independently of the report code."""
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    finals = [c for c in cells if c["kind"] == "final"]
    problems = []
    for row in table_rows(report, "| arm |"):
        mine = [c for c in finals if c["arm"] == row["arm"]
                and all(f"{v:g}" == row[k] for k, v in c["point"].items())]
        accuracies = []
        for cell in mine:
            run = out / "runs" / cell["id"]
            rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
            summary = json.loads((run / "summary.json").read_text())
            if summary["final_accuracy"] != rounds[-1]["test_accuracy"]:
                problems.append(f"{cell['id']}: summary and rounds disagree")
            accuracies.append(rounds[-1]["test_accuracy"])
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        expected = f"{statistics.fmean(accuracies):.4f} ± {spread:.4f}"
        if row["final accuracy"] != expected or row["seeds"] != str(len(mine)):
            problems.append(f"{row['arm']}: table {row['final accuracy']} vs runs {expected}")
    return problems


@pytest.fixture(scope="module")
def small_cut(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "dp-small-test"
    assert main([str(ROOT / "studies" / "dp-small.toml"), "--scale", "test", "--out", str(out),
                 "--jobs", "2"]) == 0
    return out


@pytest.mark.simulation
def test_dp_small_cut_report_matches_the_runs(small_cut: Path) -> None:
    report = (small_cut / "report.md").read_text()
    study = load_spec(ROOT / "studies" / "dp-small.toml", "test")
    rows = table_rows(report, "| arm |")
    assert [r["arm"] for r in rows] == [a.name for a in study.arms]
    assert mismatches(small_cut, report) == []
    # equal epsilon: one sigma for every arm, and every run's own epsilon within the target
    assert len({r["sigma"] for r in rows}) == 1
    assert all(0 < float(r["epsilon (run)"]) <= 8.0 + 1e-9 for r in rows)
    for figure in ("accuracy.png", "training.png", "tuning.png"):
        assert (small_cut / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in report


@pytest.mark.simulation
def test_the_report_check_fails_on_a_tampered_result(small_cut: Path, tmp_path: Path) -> None:
    """The comparison above can fail: a stored cell whose accuracy differs from its run's files
    is caught (a check that cannot fail is not a check)."""
    copy = tmp_path / "copy"
    shutil.copytree(small_cut, copy)
    cell_path = next((copy / "cells").glob("*.json"))
    cell = json.loads(cell_path.read_text())
    if cell["kind"] != "final":
        cell_path = next(p for p in (copy / "cells").glob("*.json")
                         if json.loads(p.read_text())["kind"] == "final")
        cell = json.loads(cell_path.read_text())
    cell["summary"]["final_accuracy"] += 0.25
    cell["rounds"][-1]["test_accuracy"] += 0.25
    cell_path.write_text(json.dumps(cell))
    study = ROOT / "studies" / "dp-small.toml"
    assert main([str(study), "--scale", "test", "--out", str(copy), "--report-only"]) == 0
    assert mismatches(copy, (copy / "report.md").read_text())


@pytest.mark.simulation
def test_tuning_chooses_the_best_validation_trial(small_cut: Path) -> None:
    cells = [json.loads(p.read_text()) for p in (small_cut / "cells").glob("*.json")]
    for arm in {c["arm"] for c in cells}:
        trials = [c for c in cells if c["kind"] == "tune" and c["arm"] == arm]
        finals = [c for c in cells if c["kind"] == "final" and c["arm"] == arm]
        assert all(t["config"]["validation-fraction"] > 0 for t in trials)
        assert all(f["config"].get("validation-fraction", 0.0) == 0.0 for f in finals)
        if trials:
            def score(cell: dict) -> float:
                run = small_cut / "runs" / cell["id"] / "rounds.jsonl"
                accuracy = [json.loads(x)["test_accuracy"] for x in run.read_text().splitlines()]
                return statistics.fmean(accuracy[-3:])

            best = max(trials, key=score)
            assert all(f["tuned"] == best["tuned"] for f in finals)
            assert all(f["config"][k] == v for f in finals for k, v in best["tuned"].items())


@pytest.mark.simulation
def test_a_finished_study_reruns_nothing(small_cut: Path, capsys: pytest.CaptureFixture
                                        ) -> None:
    before = {p: p.stat().st_mtime_ns for p in (small_cut / "cells").glob("*.json")}
    assert main([str(ROOT / "studies" / "dp-small.toml"), "--scale", "test", "--out",
                 str(small_cut)]) == 0
    assert "cells to run" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (small_cut / "cells").glob("*.json")} == before


def test_the_validation_split_is_carved_from_training_data() -> None:
    from plateau.data import load_splits

    train, _ = load_splits("digits", 0.2, 0)
    kept, validation = load_splits("digits", 0.2, 0, 0.1)
    assert len(kept.labels) + len(validation.labels) == len(train.labels)
    assert len(validation.labels) == round(0.1 * len(train.labels))
    # the validation rows and the kept rows are exactly the training rows, none of the test's
    together = sorted(x.tobytes() for x in [*kept.inputs, *validation.inputs])
    assert together == sorted(x.tobytes() for x in train.inputs)


@pytest.mark.simulation
def test_a_stopped_study_leaves_no_worker_and_resumes(tmp_path: Path) -> None:
    """SIGTERM to a study with two workers: it exits 128+15, no worker survives, the cells
    that finished stay, and the rerun runs only the others."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    spec = write_spec(tmp_path, """
clients = 10
seeds = [0, 1, 2]
[base]
dataset = "digits"
num-server-rounds = 40
sample-rate = 1.0
local-steps = 5
[[arms]]
name = "A"
config = { algorithm = "fedavg" }
[[arms]]
name = "B"
config = { algorithm = "fedsam" }
""")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "study", str(spec), "--out", str(out), "--jobs", "2"]
    study = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "runs").glob("*"))) < 3:
        time.sleep(0.2)  # the third run folder: at least one cell has finished
    workers = psutil.Process(study.pid).children(recursive=True)
    assert workers, "the study started no workers"
    study.send_signal(signal.SIGTERM)
    _, stderr = study.communicate(timeout=60)
    assert study.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr
    time.sleep(0.5)
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    finished = {p.name for p in (out / "cells").glob("*.json")}
    assert 0 < len(finished) < 6 and not list((out / "cells").glob("*.part"))
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ})
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(finished)} already finished)" in rerun.stdout
    assert len(list((out / "cells").glob("*.json"))) == 6


def test_a_split_that_cannot_be_drawn_stops_the_study_before_any_cell(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Dirichlet 0.05 among 300 digits clients with a floor of 5 examples: one error naming the
    keys and the seed, before any cell runs."""
    spec = write_spec(tmp_path, """
clients = 300
seeds = [0]
[base]
dataset = "digits"
dirichlet-alpha = 0.05
min-partition-size = 5
[[arms]]
name = "A"
config = { algorithm = "fedavg" }
""")
    out = tmp_path / "out"
    assert main([str(spec), "--out", str(out)]) == 1
    assert not (out / "cells").exists()
    assert re.search(r"error: dataset='digits', partitioner='dirichlet', 300 clients: .*cannot "
                     r"split.* \(seed 0\)", capsys.readouterr().err)


def test_min_partition_size_zero_makes_heavy_skew_possible() -> None:
    from plateau.data import PartitionSpec, ensure_partitions, load_splits, partition_sizes

    spec = PartitionSpec("digits", 0.2, 0, 300, "dirichlet", 0.05, 2, min_size=0)
    ensure_partitions(spec)
    sizes = partition_sizes(spec)
    assert len(sizes) == 300 and sizes.sum() == len(load_splits("digits", 0.2, 0)[0].labels)


def test_only_this_draws_trials_choose_the_values(tmp_path: Path) -> None:
    """A study folder may hold trials of an earlier draw (a changed spec): they must not give
    an arm more than its budget, even when one of them scored best."""
    from study.runner import final_cells, tuning_cells

    study = load_spec(write_spec(tmp_path, """
[tuning]
budget = 2
[[arms]]
name = "A"
config = { algorithm = "fedavg" }
tune = { lr = [0.1, 0.2, 0.3] }
"""))
    calibrator = Calibrator(tmp_path / "calibration.json")
    trials = tuning_cells(study, calibrator)
    results = {c.id: {**c.as_dict(), "rounds": [{"test_accuracy": 0.5 + 0.1 * i}]}
               for i, c in enumerate(trials)}
    stale = {"id": "stale", "kind": "tune", "arm": "A", "tuned": {"lr": 9.9},
             "rounds": [{"test_accuracy": 0.99}]}
    finals = final_cells(study, calibrator, {**results, "stale": stale})
    assert {json.dumps(f.tuned) for f in finals} == {json.dumps(trials[-1].tuned)}


@pytest.mark.simulation
def test_a_stop_signal_stops_a_one_job_study_in_the_middle_of_a_cell(tmp_path: Path) -> None:
    """With --jobs 1 the cells run in the study process itself: the stop must not be taken for
    the failure of the cell it interrupted (which the study records and moves past)."""
    import signal
    import subprocess
    import sys
    import time

    spec = write_spec(tmp_path, """
clients = 10
seeds = [0, 1]
[base]
dataset = "digits"
num-server-rounds = 200
sample-rate = 1.0
local-steps = 5
[[arms]]
name = "A"
config = { algorithm = "fedavg" }
""")
    out = tmp_path / "out"
    study = subprocess.Popen([sys.executable, "-m", "study", str(spec), "--out",
                              str(out), "--jobs", "1"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / "runs").glob("*/rounds.jsonl")):
            time.sleep(0.2)  # the first cell is training
        study.send_signal(signal.SIGTERM)
        _, stderr = study.communicate(timeout=60)
    finally:
        if study.poll() is None:
            study.kill()
            study.communicate()
    summary = json.loads(next((out / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "stopped"  # the run that was cut short does not say completed
    assert study.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "failed" not in stderr
    assert not list((out / "cells").glob("*.json"))  # the interrupted cell is not recorded
