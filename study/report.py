"""The study's report: one Markdown page with tables and PNG figures, built only from the cells'
stored results, with the exact config of every cell and how to rerun it."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .runner import Calibrator, chosen_values, final_cells, trial_score, tuning_cells
from .spec import Study

FIGURE_DPI = 80


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _point_label(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in point.items()) or "(single point)"


def rounds_to(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """First round whose test accuracy reaches ``target``."""
    return next((r["round"] for r in rounds if r["test_accuracy"] >= target), None)


def code_clip_multiplier(config: Mapping[str, Any]) -> list[float]:
    """sigma/sqrt(L) for the authors' per-tensor clip (L released tensors, each clipped to C:
    the update's norm bound is C*sqrt(L) while the noise stays sigma*C); [] otherwise."""
    if config.get("dp", "off") == "off" or config.get("dp-clip-mode", "flat") != "code":
        return []
    from plateau.config import RunConfig
    from plateau.models import model_from_config

    model = model_from_config(RunConfig.from_mapping(config))
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    return [float(config["noise-multiplier"]) / math.sqrt(tensors)]


def backprops_per_step(config: Mapping[str, Any]) -> int:
    """Backprops per local step of the cell's rule (what a two-backprop rule pays in time)."""
    from plateau.config import RunConfig
    from server_app.algorithms import backprops_per_step as of_config

    return of_config(RunConfig.from_mapping(config))


def _series(rounds: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float("nan") if r.get(key) is None else float(r[key]) for r in rounds]


class Report:
    """Groups the finished cells of a study (final cells by point and arm, trials by arm)."""

    def __init__(self, study: Study, out: Path, results: Mapping[str, dict[str, Any]]) -> None:
        self.study, self.out = study, out
        calibrator = Calibrator(out / "calibration.json")
        expected_trials = tuning_cells(study, calibrator)
        self.trials = [results[c.id] for c in expected_trials if c.id in results]
        self.missing_trials = len(expected_trials) - len(self.trials)
        self.finals = [c for c in final_cells(study, calibrator, results)]
        self.results = results
        self.missing = [c for c in self.finals if c.id not in results]

    def group(self, point: Mapping[str, Any], arm: str) -> list[dict[str, Any]]:
        """The finished seeds of one arm at one point."""
        return [self.results[c.id] for c in self.finals
                if c.arm == arm and c.point == dict(point) and c.id in self.results]

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per (point, arm): what the main table and the test read."""
        rows = []
        for point in self.study.points():
            for arm in self.study.arms:
                runs = self.group(point, arm.name)
                if not runs:
                    continue
                finals = [r["summary"]["final_accuracy"] for r in runs]
                bests = [r["summary"]["best_accuracy"] for r in runs]
                clip = [statistics.fmean(c) for r in runs
                        if (c := [x for x in _series(r["rounds"], "clip_fraction")
                                  if math.isfinite(x)])]
                epsilons = [r["summary"].get("epsilon") for r in runs]
                per_round = [r["wall_s"] / max(1, len(r["rounds"])) for r in runs]
                reach = ([rounds_to(r["rounds"], self.study.target_accuracy) for r in runs]
                         if self.study.target_accuracy is not None else [])
                effective = [x for r in runs
                             for x in _series(r["rounds"], "effective_noise_multiplier")
                             if math.isfinite(x)] or code_clip_multiplier(runs[0]["config"])
                rows.append({
                    "point": point, "arm": arm.name, "seeds": [r["seed"] for r in runs],
                    "final": finals, "best": bests, "clip": clip, "epsilon": epsilons,
                    "sigma": runs[0]["config"].get("noise-multiplier")
                    if runs[0]["config"].get("dp", "off") != "off" else None,
                    "effective_sigma": statistics.fmean(effective) if effective else None,
                    "per_round_s": per_round, "rounds_to_target": reach,
                    "backprops": backprops_per_step(runs[0]["config"]),
                    "sharpness": [r["rounds"][-1]["sharpness"] for r in runs
                                  if r["rounds"] and r["rounds"][-1].get("sharpness") is not None],
                    "hessian": [r["rounds"][-1]["hessian_top_eigenvalue"] for r in runs
                                if r["rounds"]
                                and r["rounds"][-1].get("hessian_top_eigenvalue") is not None],
                    "ids": [r["id"] for r in runs]})
        return rows

    # --- figures -------------------------------------------------------------------------

    def _figure_accuracy(self, folder: Path) -> str | None:
        import matplotlib.pyplot as plt

        points = self.study.points()
        columns = min(3, len(points))
        lines = math.ceil(len(points) / columns)
        fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines),
                                 squeeze=False, sharey=True)
        for ax, point in zip(axes.flat, points, strict=False):
            for arm in self.study.arms:
                runs = self.group(point, arm.name)
                if not runs:
                    continue
                length = min(len(r["rounds"]) for r in runs)
                curves = [_series(r["rounds"][:length], "test_accuracy") for r in runs]
                x = list(range(1, length + 1))
                mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
                low = [min(c[i] for c in curves) for i in range(length)]
                high = [max(c[i] for c in curves) for i in range(length)]
                (line,) = ax.plot(x, mean, label=arm.name, linewidth=1.3)
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
            ax.set_title(_point_label(point), fontsize=8)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel("test accuracy")
        for ax in list(axes.flat)[len(points):]:
            ax.axis("off")
        _legend(fig, axes.flat[0])
        fig.suptitle("accuracy per round: mean over seeds, band = min..max", fontsize=9)
        return self._save(fig, folder, "accuracy.png")

    def _figure_epsilon(self, folder: Path) -> str | None:
        if "target-epsilon" not in self.study.grid or len(self.study.grid["target-epsilon"]) < 2:
            return None
        import matplotlib.pyplot as plt

        others = [k for k in self.study.grid if k != "target-epsilon"]
        combos = {tuple(p[k] for k in others) for p in self.study.points()}
        combos_sorted = sorted(combos, key=str)
        fig, axes = plt.subplots(1, len(combos_sorted), figsize=(4.2 * len(combos_sorted), 3.2),
                                 squeeze=False, sharey=True)
        for ax, combo in zip(axes.flat, combos_sorted, strict=True):
            for arm in self.study.arms:
                xs, ys, errs = [], [], []
                for epsilon in self.study.grid["target-epsilon"]:
                    point = dict(zip(others, combo, strict=True)) | {"target-epsilon": epsilon}
                    point = {k: point[k] for k in self.study.grid}
                    finals = [r["summary"]["final_accuracy"] for r in self.group(point, arm.name)]
                    if finals:
                        xs.append(epsilon)
                        ys.append(statistics.fmean(finals))
                        errs.append(statistics.stdev(finals) if len(finals) > 1 else 0.0)
                if xs:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=arm.name,
                                linewidth=1.2)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("target epsilon")
            ax.set_title(_point_label(dict(zip(others, combo, strict=True))), fontsize=8)
            ax.grid(alpha=0.3)
        axes.flat[0].set_ylabel("final test accuracy")
        _legend(fig, axes.flat[0])
        fig.suptitle("final accuracy vs epsilon (mean ± std over seeds)", fontsize=9)
        return self._save(fig, folder, "accuracy_vs_epsilon.png")

    def _figure_training(self, folder: Path) -> str | None:
        import matplotlib.pyplot as plt

        point = self.study.tuning_point()
        panels = [("clip_fraction", "clip fraction"), ("mean_update_norm", "mean update norm"),
                  ("global_update_norm", "global update norm")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0))
        drawn = False
        for ax, (key, label) in zip(axes, panels, strict=True):
            for arm in self.study.arms:
                runs = self.group(point, arm.name)
                if not runs:
                    continue
                length = min(len(r["rounds"]) for r in runs)
                curves = [_series(r["rounds"][:length], key) for r in runs]
                mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
                if any(math.isfinite(v) for v in mean):
                    ax.plot(range(1, length + 1), mean, label=arm.name, linewidth=1.2)
                    drawn = True
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        if not drawn:
            plt.close(fig)
            return None
        _legend(fig, axes[0])
        fig.suptitle(f"training signals at {_point_label(point)} (mean over seeds)", fontsize=9)
        return self._save(fig, folder, "training.png")

    def _figure_flatness(self, folder: Path) -> str | None:
        import matplotlib.pyplot as plt

        rows = [r for r in self.summary_rows() if r["sharpness"]]
        if not rows:
            return None
        arms = [a.name for a in self.study.arms if any(r["arm"] == a.name for r in rows)]
        points = [p for p in self.study.points() if any(r["point"] == p for r in rows)]
        width = 0.8 / len(points)
        fig, axes = plt.subplots(1, 2, figsize=(max(8.4, 1.2 * len(arms) * 2), 3.0))
        for ax, key, title in ((axes[0], "sharpness", "SAM sharpness of the final model"),
                               (axes[1], "hessian", "top Hessian eigenvalue of the final model")):
            for index, point in enumerate(points):
                values = [next((statistics.fmean(r[key]) for r in rows
                                if r["arm"] == arm and r["point"] == point), float("nan"))
                          for arm in arms]
                ax.bar([i + index * width for i in range(len(arms))], values, width,
                       label=_point_label(point))
            ax.set_xticks([i + width * (len(points) - 1) / 2 for i in range(len(arms))], arms)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            ax.set_title(title, fontsize=8)
        _legend(fig, axes[0])
        fig.suptitle("flatness at the end (mean over seeds; lower = flatter)", fontsize=9)
        return self._save(fig, folder, "flatness.png")

    def _figure_wall(self, folder: Path) -> str | None:
        import matplotlib.pyplot as plt

        rows = self.summary_rows()
        names = [a.name for a in self.study.arms if any(r["arm"] == a.name for r in rows)]
        if not names:
            return None
        seconds = [statistics.fmean(s for r in rows if r["arm"] == n for s in r["per_round_s"])
                   for n in names]
        fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names)), 2.8))
        ax.bar(names, seconds)
        ax.set_ylabel("seconds per round")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.set_title("wall time per round (mean over every cell of the arm)", fontsize=8)
        return self._save(fig, folder, "wall.png")

    def _figure_tuning(self, folder: Path) -> str | None:
        if not self.trials:
            return None
        import matplotlib.pyplot as plt

        arms = [a for a in self.study.arms if any(t["arm"] == a.name for t in self.trials)]
        fig, axes = plt.subplots(1, len(arms), figsize=(2.6 * len(arms), 2.8), squeeze=False,
                                 sharey=True)
        for ax, arm in zip(axes.flat, arms, strict=True):
            trials = sorted((t for t in self.trials if t["arm"] == arm.name), key=trial_score)
            ax.barh([_short(t["tuned"]) for t in trials], [trial_score(t) for t in trials])
            ax.set_title(arm.name, fontsize=8)
            ax.tick_params(labelsize=6)
        fig.suptitle("tuning: validation accuracy (mean of the last rounds) per trial", fontsize=9)
        return self._save(fig, folder, "tuning.png")

    def _save(self, fig: Any, folder: Path, name: str) -> str:
        import matplotlib.pyplot as plt

        fig.tight_layout()
        fig.savefig(folder / name, dpi=FIGURE_DPI, bbox_inches="tight")
        plt.close(fig)
        return name

    # --- page ----------------------------------------------------------------------------

    def write(self, folder: Path, rerun: str) -> Path:
        """Write ``report.md`` and its figures into ``folder``; return the page's path."""
        import matplotlib

        matplotlib.use("Agg")
        folder.mkdir(parents=True, exist_ok=True)
        figures = [f for f in (self._figure_accuracy(folder), self._figure_epsilon(folder),
                               self._figure_training(folder), self._figure_flatness(folder),
                               self._figure_wall(folder), self._figure_tuning(folder)) if f]
        study = self.study
        lines = [f"# {study.title}", "", study.description, "",
                 f"Scale `{study.scale}`: {study.clients} clients, seeds {study.seeds}, "
                 f"{len(study.arms)} arms x {len(study.points())} grid points. Rerun (finished "
                 f"cells are reused): `{rerun}`.", ""]
        if self.missing_trials:
            lines += [f"**Tuning incomplete: {self.missing_trials} trials have not run yet**, so "
                      "the chosen values below are provisional.", ""]
        if self.missing:
            lines += [f"**Incomplete: {len(self.missing)} of {len(self.finals)} final cells have "
                      "not run yet**; the tables show what has.", ""]
        lines += ["## Results", "", *self._main_table(), "",
                  "Final and best accuracy: mean ± std over seeds; epsilon (run): the largest "
                  "epsilon a cell's own accountant reported ('none': no formal guarantee); "
                  "s/round: wall seconds per round, with the study's cells sharing the machine "
                  "(JOBS at a time), so compare within a report only.", ""]
        lines += [f"![{f}]({f})" for f in figures] + [""]
        lines += self._tuning_section()
        lines += self._cells_section(rerun)
        page = folder / "report.md"
        page.write_text("\n".join(lines) + "\n")
        (folder / "summary.json").write_text(json.dumps(
            [{**row, "point": row["point"]} for row in self.summary_rows()], indent=1))
        return page

    def _main_table(self) -> list[str]:
        axes = list(self.study.grid)
        target = self.study.target_accuracy
        rows = self.summary_rows()
        flat = any(r["sharpness"] for r in rows)
        header = ["arm", *axes, "final accuracy", "best accuracy",
                  *([f"rounds to {target:g}"] if target is not None else []),
                  *(["sharpness", "Hessian top eigenvalue"] if flat else []),
                  "clip fraction", "sigma", "effective sigma", "epsilon (run)", "backprops/step",
                  "s/round", "seeds"]
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            eps = [e for e in row["epsilon"] if e is not None]
            reach = row["rounds_to_target"]
            cells = [row["arm"], *(_fmt(row["point"][k]) for k in axes),
                     _mean_std(row["final"]), _mean_std(row["best"]),
                     *([" ".join("-" if r is None else str(r) for r in reach)]
                       if target is not None else []),
                     *([_mean_std(row["sharpness"]), _mean_std(row["hessian"])] if flat else []),
                     _mean_std(row["clip"]) if row["clip"] else "-",
                     "-" if row["sigma"] is None else f"{row['sigma']:.4f}",
                     "-" if row["effective_sigma"] is None else f"{row['effective_sigma']:.4f}",
                     f"{max(eps):.3f}" if eps else "none", str(row["backprops"]),
                     f"{statistics.fmean(row['per_round_s']):.2f}", str(len(row["seeds"]))]
            out.append("| " + " | ".join(cells) + " |")
        return out

    def _tuning_section(self) -> list[str]:
        study = self.study
        if not self.trials:
            return ["## Tuning", "", "No arm has tuned hyper-parameters in this study.", ""]
        lines = ["## Tuning", "",
                 f"Each arm gets the same budget of {study.tuning.budget} trials over its own "
                 f"candidate values, at {_point_label(study.tuning_point())}, seed "
                 f"{study.tuning.seed}, scored by the mean accuracy of the last rounds on a "
                 f"validation split ({study.tuning.validation_fraction:g} of the training data, "
                 "never the test split). The privacy cost of tuning itself is not accounted "
                 "(as in the papers).", "",
                 "| arm | trials | chosen | best score | worst score |", "|---|---|---|---|---|"]
        for arm in study.arms:
            trials = [t for t in self.trials if t["arm"] == arm.name]
            if not trials:
                lines.append(f"| {arm.name} | 0 | (fixed: {_short(arm.config)}) | - | - |")
                continue
            scores = [trial_score(t) for t in trials]
            chosen = chosen_values(arm, trials)
            lines.append(f"| {arm.name} | {len(trials)} | {_short(chosen)} | {max(scores):.4f} | "
                         f"{min(scores):.4f} |")
        lines += ["", "<details><summary>every trial</summary>", "",
                  "| arm | values | score | cell |", "|---|---|---|---|"]
        for trial in self.trials:
            lines.append(f"| {trial['arm']} | {_short(trial['tuned'])} | "
                         f"{trial_score(trial):.4f} | `{trial['id']}` |")
        return [*lines, "", "</details>", ""]

    def _cells_section(self, rerun: str) -> list[str]:
        base = self.study.base
        lines = ["## Cells", "",
                 "Every cell is an in-process simulation of the real ServerApp and ClientApp "
                 f"with {self.study.clients} SuperNodes. Keys shared by every cell:", "",
                 "```", json.dumps(base, indent=1, sort_keys=True), "```", "",
                 "A cell's whole config is stored in `cells/<id>.json` of the study folder; "
                 f"`{rerun} --cell <id>` reruns one cell (with `--force`, even if finished).", "",
                 "| cell | kind | arm | seed | keys beyond the shared ones |",
                 "|---|---|---|---|---|"]
        for cell in [*self.trials, *(self.results[c.id] for c in self.finals
                                     if c.id in self.results)]:
            extra = {k: v for k, v in cell["config"].items() if base.get(k) != v}
            lines.append(f"| `{cell['id']}` | {cell['kind']} | {cell['arm']} | {cell['seed']} | "
                         f"{_short(extra)} |")
        return [*lines, ""]


def _legend(fig: Any, ax: Any) -> None:
    """One legend for the figure, outside the plots (the curves stay readable)."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7,
               frameon=False)


def _short(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in values.items()) or "-"
