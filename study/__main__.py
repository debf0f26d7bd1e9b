"""``python -m study SPEC``: run a study (resuming it) and write its report."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .report import Report
from .runner import (
    Calibrator,
    StudyError,
    execute,
    final_cells,
    load_results,
    run_study,
    tuning_cells,
)
from .spec import SpecError, load_spec

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """The study was told to stop; finished cells are kept and a rerun resumes. Not an
    ``Exception``: the handler that keeps one failed cell from losing the others must not take
    a stop for a failure (with one job the cells run in this process)."""


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run the study with stop signals turned into a clean stop (workers terminated)."""
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        return _main(argv)
    except Stopped as stop:
        print(f"stopped by {stop}: finished cells are kept; rerun to resume", file=sys.stderr)
        return 128 + signal.Signals[str(stop)].value
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path, help="a study spec (studies/*.toml)")
    parser.add_argument("--scale", default="default",
                        help="a [scales.<name>] of the spec, e.g. 'paper' (default: its defaults)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="cells run at once, each with cpus/jobs torch threads")
    parser.add_argument("--out", type=Path, help="study folder (default results/studies/<name>"
                        "[-<scale>]); finished cells there are never rerun")
    parser.add_argument("--report-dir", type=Path,
                        help="where report.md and its figures go (default: the study folder)")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the finished cells, run nothing")
    parser.add_argument("--cell", help="run only this cell id (see the report's Cells table)")
    parser.add_argument("--force", action="store_true", help="with --cell: rerun it even if "
                        "finished")
    args = parser.parse_args(argv)
    try:
        study = load_spec(args.spec, args.scale)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print("error: --jobs must be >= 1", file=sys.stderr)
        return 2
    out = args.out or Path("results/studies") / (
        study.name if study.scale == "default" else f"{study.name}-{study.scale}")
    rerun = f"python -m study {args.spec}" + (
        f" --scale {study.scale}" if study.scale != "default" else "")
    if args.cell:
        calibrator = Calibrator(out / "calibration.json")
        results = load_results(out)
        cells = {c.id: c for c in [*tuning_cells(study, calibrator),
                                   *final_cells(study, calibrator, results)]}
        if args.cell not in cells:
            print(f"error: no cell {args.cell!r} in this study ({len(cells)} cells; the final "
                  "cells exist once tuning has finished)", file=sys.stderr)
            return 2
        if args.force:
            (out / "cells" / f"{args.cell}.json").unlink(missing_ok=True)
        try:
            execute([cells[args.cell]], out, 1)
        except StudyError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    try:
        results = load_results(out) if args.report_only else run_study(study, out, args.jobs)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    page = Report(study, out, results).write(args.report_dir or out, rerun)
    print(f"report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
