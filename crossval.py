"""Cross-validation stage: one model per fold, each evaluated on its held-out subset, and the pooled FROC.

The folds are LUNA16 subsets (``--folds 0-9``). Fold k tests on subset k, which its training never reads (the
split by scan in ``features.load_split`` guarantees it), validates on the subset ``val_offset`` places before
k in the fold list (cyclic; default 1: the previous fold) and trains on every other extracted subset (an
extracted subset outside the fold list always trains). Its model, the run ``W/runs/<NAME>-fold<k>``, scores
every candidate of subset k (``evaluate.evaluate_model``, into ``W/crossval/<NAME>/fold<k>/``). The fold
submissions are concatenated and scored with the official LUNA16 rules over the scans of all folds, with
bootstrap intervals: the number to compare with the literature (ten folds, all 888 scans).

Written under ``W/crossval/<NAME>/``: ``crossval.json`` (the settings, so that a rerun continues the same
cross-validation), ``fold<k>/`` (one model evaluation per fold), ``submission.csv`` (all folds),
``metrics.json`` (CPM, the seven FROC sensitivities, their 95% intervals, each fold's CPM), ``folds.csv`` and
``froc.png``.

Mined negatives: a fold refuses to train on cache rows mined by a model that saw its test subset, or by a
model whose subsets are not recorded (``features.check_mined_rows``). ``mine_rounds`` N mines inside each
fold: its model scores every negative candidate of the fold's training subsets, their top ``max_per_scan``
a scan are added to the caches tagged with the fold (only that fold trains on them; ``mining.mine_subset``),
and a new run ``<NAME>-fold<k>-mine<r>`` trains from the start; the last round's model is evaluated.

Resumable: a fold whose evaluation finished is skipped; a fold whose run already has a ``last.pt`` continues
it (``resume``; a finished run does nothing more); an evaluation continues from the scans it finished.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import calibration
import common
import data
import evaluate
import features as features_mod
import froc
import head
import mining
import options as options_mod
import train
from common import UserError
from features import extracted_subsets

# The training options crossval passes on to each fold, when given (the others take the stage's defaults):
# every option of the stage but those each fold decides (options.FOLD_DECIDES: its validation and test
# subsets; views and precision, which also set the folds' evaluation, are crossval's own). finetune's
# ``head_from`` names a head-stage cross-validation whose fold k starts fold k.
STAGE_OPTIONS = {stage: tuple(k for k in options_mod.stage_names(stage) if k not in options_mod.FOLD_DECIDES)
                 for stage in options_mod.STAGES}
TRAINING_OPTIONS = options_mod.crossval_names()
FOLD_COLUMNS = ("fold", "test_subset", "val_subset", "run", "checkpoint", "n_scans", "n_candidates", "auc",
                "cpm")
EVAL_READERS = 2  # evaluate's default processes reading scans when --readers is not given


@dataclass
class Fold:
    """One fold: its position in the fold list, test and validation subsets, and run name."""
    fold: int
    test: int
    val: int
    run: str


def plan_folds(folds: Sequence[int], name: str, val_offset: int = 1) -> List[Fold]:
    """The folds of a cross-validation: fold i tests on ``folds[i]`` and validates on
    ``folds[(i - val_offset) % len(folds)]``; UserError for fewer than 2 folds or an offset that lands on
    the test fold."""
    folds = list(folds)
    if len(folds) < 2:
        raise UserError(f"--folds must name at least 2 subsets (each one is the test subset of one fold), "
                        f"got {common.format_subsets(folds)}")
    if val_offset % len(folds) == 0:
        raise UserError(f"--val-offset {val_offset} puts each fold's validation subset on its own test "
                        f"subset ({len(folds)} folds); use an offset that is not a multiple of "
                        f"{len(folds)}, e.g. 1")
    return [Fold(i, k, folds[(i - val_offset) % len(folds)], f"{name}-fold{k}") for i, k in enumerate(folds)]


def crossval_dir(work_dir: Path, name: str) -> Path:
    return Path(work_dir) / "crossval" / name


def _given_training(stage: str, training: Dict[str, Any], precision: Optional[str]) -> Dict[str, Any]:
    """The training options given for ``stage``, checked (JSON values); UserError naming one that a fold
    decides or that belongs to the other stage."""
    decided = [k for k in training if k in options_mod.FOLD_DECIDES and training[k] is not None]
    if decided:
        raise UserError(f"--{decided[0].replace('_', '-')} is decided by each fold "
                        f"(or given to crossval itself)")
    given = options_mod.given(stage, training)
    if stage == "finetune" and precision is not None:
        given["precision"] = options_mod.OPTIONS["precision"].check(precision)
    return given


def _started(work_dir: Path, out_dir: Path, name: str) -> bool:
    """Whether a fold of this cross-validation has trained an epoch or finished its evaluation."""
    return (any(out_dir.glob("fold*/metrics.json")) or
            any(head.runs_dir(work_dir).glob(f"{name}-fold*/last.pt")))


def _settings(out_dir: Path, name: str, wanted: Dict[str, Any], given: Dict[str, Any], views: Optional[int],
              started: bool) -> Dict[str, Any]:
    """The cross-validation's settings. A new one (or one none of whose folds has started) stores them in
    ``crossval.json``; a rerun continues with the stored ones and refuses a fold plan or a given option that
    differs (options not given keep the stored values)."""
    path = out_dir / "crossval.json"
    if not path.is_file() or not started:
        settings = {**wanted, "training": given, "views": views}
        common.atomic_write_json(path, settings)
        return settings
    saved = json.loads(path.read_text())
    if "per_scan" in saved:  # the name before it was max_per_scan
        saved["max_per_scan"] = saved.pop("per_scan")
    defaults = train.HEAD_DEFAULTS if saved.get("stage") == "head" else train.FINETUNE_DEFAULTS
    stored = {**defaults, **saved.get("training", {})}
    differing = [f"--{k.replace('_', '-')}: it has {saved.get(k)!r}, this call {v!r}"
                 for k, v in wanted.items() if saved.get(k) != v]
    differing += [f"--{k.replace('_', '-')}: it has {stored.get(k)!r}, this call {v!r}"
                  for k, v in given.items() if stored.get(k) != v]
    if views is not None and saved.get("views") != views:
        differing.append(f"--views: it has {saved.get('views')!r}, this call {views!r}")
    if differing:
        raise UserError(f"cross-validation {name!r} ({out_dir}) was started with other settings; "
                        f"these differ: "
                        + "; ".join(differing) + ". Drop them to continue it, or choose another --name.")
    return saved


def _fold_done(fold_dir: Path, scans: Sequence[str]) -> Optional[Dict[str, Any]]:
    """The fold's evaluation metrics when it finished on every scan of its subset, else None."""
    try:
        metrics = json.loads((fold_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("unreadable_scans") or metrics.get("n_scans") != len(scans) \
            or not (fold_dir / "submission.csv").is_file():
        return None
    return metrics


def _train_fold(work_dir: Path, fold: Fold, run: str, stage: str, training: Dict[str, Any],
                runtime: Dict[str, Any]) -> Path:
    """Train (or continue, or leave as it is when finished) the fold's run ``run``; returns its best.pt."""
    run_dir = head.runs_dir(work_dir) / run
    resume = (run_dir / "last.pt").is_file() and (run_dir / "config.json").is_file()
    options = dict(training, val_subsets=[fold.val], test_subsets=[fold.test])
    if stage == "head":
        train.train_head(work_dir, run=run, resume=resume, device=runtime["device"], quiet=runtime["quiet"],
                         **options)
    else:
        train.finetune(work_dir, run=run, resume=resume, device=runtime["device"], workers=runtime["workers"],
                       quiet=runtime["quiet"], compile=runtime["compile"], **options)
    best = run_dir / "best.pt"
    if not best.is_file():
        raise UserError(f"fold {fold.test}: run {run_dir} wrote no best.pt (no epoch had a validation AUC); "
                        f"check its history.csv")
    return best


def _run_fold(work_dir: Path, data_dir: Path, out_dir: Path, fold: Fold, scans: Sequence[str],
              settings: Dict[str, Any], runtime: Dict[str, Any], console) -> Dict[str, Any]:
    """One fold: skipped when its evaluation finished, else trained (or continued) and evaluated."""
    fold_dir = out_dir / f"fold{fold.test}"
    metrics = _fold_done(fold_dir, scans)
    say = console.print if console is not None and not runtime["quiet"] else (lambda *_: None)
    if metrics is not None:
        say(f"fold {fold.test}: finished before, skipped (CPM {_number(metrics.get('cpm'))})")
        return metrics
    say(f"[bold]fold {fold.test}[/]: test subset {fold.test}, validation subset {fold.val}, run {fold.run}")
    training = dict(settings["training"])
    if training.get("head_from"):
        training["head_from"] = str(fold_head(work_dir, training["head_from"], fold))
    if settings["stage"] == "finetune" and settings.get("views") is not None:
        training["views"] = settings["views"]
    best = _train_fold(work_dir, fold, fold.run, settings["stage"], training, runtime)
    for round_ in range(1, int(settings.get("mine_rounds", 0)) + 1):
        say(f"fold {fold.test}: mining round {round_} with {best.parent.name}")
        _mine_for_fold(work_dir, data_dir, fold, best, settings, runtime)
        best = _train_fold(work_dir, fold, f"{fold.run}-mine{round_}", settings["stage"], training, runtime)
    # the batch of patches a forward pass is evaluate's own default (options.py)
    return evaluate.evaluate_model(best, data_dir, [fold.test], fold_dir, views=settings.get("views"),
                                   readers=runtime["readers"], device=runtime["device"],
                                   precision=runtime["precision"] or "auto",
                                   bootstrap=runtime["bootstrap"], console=console, work_dir=work_dir,
                                   strict_cutoff=False, compile=runtime["compile"])


def fold_head(work_dir: Path, head_cv: str, fold: Fold) -> Path:
    """``--head-from CV`` for fold k: ``W/runs/<CV>-fold<k>/best.pt``, a model that never saw subset k;
    UserError when it is missing or was tested on another subset."""
    best = head.runs_dir(work_dir) / f"{head_cv}-fold{fold.test}" / "best.pt"
    try:
        tested = json.loads((best.parent / "config.json").read_text())["options"]["test_subsets"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"--head-from {head_cv}: fold {fold.test} needs {best} (with its config.json), the "
                        f"model of fold {fold.test} of cross-validation {head_cv!r}; run `python luna_cli.py "
                        f"crossval --name {head_cv} --stage head` with the same --folds first") from None
    if list(tested) != [fold.test] or not best.is_file():
        raise UserError(f"--head-from {head_cv}: {best.parent} was tested on subset(s) "
                        f"{common.format_subsets(tested)}, not on subset {fold.test}, or has no best.pt")
    return best


def _mine_for_fold(work_dir: Path, data_dir: Path, fold: Fold, best: Path, settings: Dict[str, Any],
                   runtime: Dict[str, Any]) -> None:
    """Add the fold model's hardest negatives of each of the fold's training subsets to their caches, tagged
    with the fold; for the head stage, encode them into the feature set."""
    subsets = [k for k in extracted_subsets(work_dir) if k not in (fold.test, fold.val)]
    for subset in subsets:
        summary = mining.mine_subset(data_dir, work_dir, subset, str(best),
                                     max_per_scan=int(settings["max_per_scan"]),
                                     readers=runtime["readers"], device=runtime["device"],
                                     precision=runtime["precision"] or "auto", views=settings.get("views"),
                                     for_fold=fold.test, compile=runtime["compile"])
        if summary.unreadable:
            raise UserError(f"fold {fold.test}: mining subset {subset} could not read "
                            + ", ".join(sorted(summary.unreadable)) + "; fix or remove the scan(s) and rerun")
    if settings["stage"] == "head":
        tag, _ = features_mod.choose_feature_set(work_dir, settings["training"].get("features"))
        features_mod.encode_new_rows(work_dir, tag, subsets, runtime["device"], compile=runtime["compile"])


def check_mined_rows(work_dir: Path, plan: List[Fold]) -> None:
    """Refuse, before any training, a fold whose training or validation rows hold negatives mined by a model
    that saw its test subset, or mined without a record of what the model saw."""
    caches = {k: features_mod.read_subset_cache(work_dir, k) for k in extracted_subsets(work_dir)}
    for fold in plan:
        rows = {k: features_mod.rows_for_fold(cache, np.arange(len(cache)), [fold.test])
                for k, cache in caches.items() if k != fold.test}
        features_mod.check_mined_rows(caches, rows, [fold.test], strict=True)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def fold_row(fold: Fold, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """A folds.csv row: the fold, its subsets and run, and its evaluation's counts, AUC and CPM."""
    return {"fold": fold.fold, "test_subset": fold.test, "val_subset": fold.val, "run": fold.run,
            "checkpoint": metrics["checkpoint"], "n_scans": metrics["n_scans"],
            "n_candidates": metrics["n_candidates"], "auc": metrics["auc"], "cpm": metrics["cpm"]}


def _write_folds_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FOLD_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else repr(row[c]) if isinstance(row[c], float) else row[c]
                         for c in FOLD_COLUMNS])
    common.atomic_write_text(path, buffer.getvalue())


def concatenate_submissions(paths: Sequence[Path], out: Path) -> None:
    """One LUNA16 submission of several (each with its header line), written atomically."""
    lines = [",".join(froc.SUBMISSION_COLUMNS)]
    for path in paths:
        lines += [line for line in Path(path).read_text().splitlines()[1:] if line.strip()]
    common.atomic_write_text(out, "\n".join(lines) + "\n")


def _readable_scans(plan: List[Fold], fold_metrics: Dict[int, Dict[str, Any]],
                    fold_scans: Dict[int, List[str]]) -> List[str]:
    return [uid for f in plan for uid in fold_scans[f.test]
            if uid not in fold_metrics[f.test]["unreadable_scans"]]


def pool_folds(out_dir: Path, data_dir: Path, plan: List[Fold], fold_metrics: Dict[int, Dict[str, Any]],
               fold_scans: Dict[int, List[str]], bootstrap: int, seed: int = 0) -> Dict[str, Any]:
    """Concatenate the fold submissions and score them over the readable scans of all folds: the FROC
    result."""
    concatenate_submissions([out_dir / f"fold{f.test}" / "submission.csv" for f in plan],
                            out_dir / "submission.csv")
    uids = _readable_scans(plan, fold_metrics, fold_scans)
    return froc.score_marks(froc.read_submission(out_dir / "submission.csv"), uids,
                                froc.read_findings(Path(data_dir) / "annotations.csv"),
                                froc.read_findings(Path(data_dir) / "annotations_excluded.csv"),
                                bootstrap=bootstrap, seed=seed)


def write_operating_point(out_dir: Path, data_dir: Path, plan: List[Fold],
                          fold_metrics: Dict[int, Dict[str, Any]], uids: Sequence[str],
                          target: float) -> Dict[str, Any]:
    """The fold ensemble's operating point, ``operating_point.json``: the cutoff (raw logit) chosen per nodule
    on the pooled out-of-fold scores of ``submission.csv`` (each candidate scored by the one fold model that
    never trained on it) over the scans ``uids``: the highest threshold at which ``target`` of their nodules
    have a candidate at or above it (official hit rule; a nodule without one is missed).
    ``predict --ensemble`` applies it to the mean of the folds' probabilities: an approximation, since no fold
    model scored the pooled list."""
    marks = froc.read_submission(out_dir / "submission.csv")
    nodules = froc.read_findings(Path(data_dir) / "annotations.csv")
    nodules = nodules.take(np.flatnonzero(np.isin(nodules.seriesuid, list(uids))))
    hits = froc.nodule_hits(marks.seriesuid, marks.world_xyz, nodules.seriesuid, nodules.world_xyz,
                                nodules.value)
    cutoff, sensitivity = calibration.cutoff_for_nodules(
        froc.best_per_nodule(hits, calibration.logit(marks.value)), target)
    views = sorted({int(fold_metrics[f.test]["views"]) for f in plan})
    point = {"cutoff_logit": cutoff,
             "cutoff_probability": None if cutoff is None else float(calibration.sigmoid(cutoff)),
             "target_sensitivity": float(target), "sensitivity": sensitivity, "n_nodules": len(hits),
             "n_nodules_without_candidate": sum(not len(h) for h in hits), "n_scans": len(uids),
             "views": views[0] if len(views) == 1 else None, "runs": [f.run for f in plan],
             "checkpoints": [fold_metrics[f.test]["checkpoint"] for f in plan],
             "note": "chosen per nodule on the pooled out-of-fold scores; predict --ensemble applies it to "
                     "the mean of the folds' probabilities, an approximation for that average"}
    common.atomic_write_json(out_dir / "operating_point.json", point)
    return point


def _prepare(work_dir: Path, data_dir: Path, folds: Sequence[int], name: str, stage: str, val_offset: int,
             given: Dict[str, Any], views: Optional[int], mine_rounds: int = 0, max_per_scan: int = 20):
    """Check the request before any work: ``(plan, settings, out_dir, {subset: seriesuids})``."""
    plan = plan_folds(folds, common.plain_folder_name(name, "--name"), val_offset)  # W/crossval/NAME
    if mine_rounds < 0 or max_per_scan < 1:
        raise UserError(f"--mine-rounds must be 0 or more and --max-per-scan at least 1, "
                        f"got {mine_rounds} and {max_per_scan}")
    if views is not None:
        head.check_views(views)
    missing = sorted(set(folds) - set(extracted_subsets(work_dir)))
    if missing:
        raise UserError(f"--folds {common.format_subsets(folds)}: subset(s) {common.format_subsets(missing)} "
                        f"not extracted under {Path(work_dir) / 'patches'}; run `python luna_cli.py extract "
                        f"--subsets {common.format_subsets(missing)}` "
                        f"(with the patch options of the others) first")
    # a scan missing from its fold is refused before any training
    froc.check_scans(data_dir, folds, work_dir)
    check_mined_rows(work_dir, plan)
    fold_scans = {f.test: list(data.subset_scans(data_dir, [f.test])) for f in plan}
    out_dir = crossval_dir(work_dir, name)
    wanted = {"stage": stage, "folds": [f.test for f in plan], "val_offset": int(val_offset)}
    if mine_rounds:
        wanted.update(mine_rounds=int(mine_rounds), max_per_scan=int(max_per_scan))
    settings = _settings(out_dir, name, wanted, given, views, _started(Path(work_dir), out_dir, name))
    return plan, settings, out_dir, fold_scans


def run_crossval(work_dir: Path, data_dir: Path, folds: Sequence[int], name: str, *, stage: str = "head",
                 val_offset: int = 1, views: Optional[int] = None, precision: Optional[str] = None,
                 mine_rounds: int = 0, max_per_scan: int = 20, device: str = "auto",
                 workers: Optional[int] = None, readers: int = EVAL_READERS, bootstrap: int = 1000,
                 json_out: Optional[Path] = None, quiet: bool = False, console=None, compile: bool = False,
                 **training: Any) -> Dict[str, Any]:
    """Cross-validate over the subsets ``folds`` (see the module docstring); returns the pooled metrics.

    ``stage``: "head" (``train.train_head`` on a feature set that covers every fold: cache-features with
    ``--test-subsets none``) or "finetune" (``train.finetune``). ``training``: the stage's options
    (:data:`STAGE_OPTIONS`); those left out take the stage's defaults (finetune's ``head_from``: a head-stage
    cross-validation, fold k starting from its fold k). ``views``: evaluation flips (default: the checkpoint's
    own); for finetune also its validation's. ``precision``: evaluation precision (and finetune's).
    ``mine_rounds``: rounds of hard-negative mining inside each fold, ``max_per_scan`` negatives a scan each.
    ``workers``: finetune's loader processes; ``readers``: processes reading scans for the folds' evaluation
    and mining. Writes ``W/crossval/<name>/`` and ``json_out``.
    """
    given = _given_training(stage, training, precision)
    plan, settings, out_dir, fold_scans = _prepare(Path(work_dir), Path(data_dir), folds, name, stage,
                                                   val_offset, given, views, mine_rounds, max_per_scan)
    runtime = {"device": device, "workers": workers, "readers": readers, "precision": precision,
               "bootstrap": bootstrap, "quiet": quiet, "compile": compile}
    fold_metrics = {f.test: _run_fold(Path(work_dir), Path(data_dir), out_dir, f, fold_scans[f.test],
                                      settings, runtime, console) for f in plan}
    pooled = pool_folds(out_dir, Path(data_dir), plan, fold_metrics, fold_scans, bootstrap)
    target = {**(train.HEAD_DEFAULTS if settings["stage"] == "head" else train.FINETUNE_DEFAULTS),
              **settings["training"]}
    point = write_operating_point(out_dir, Path(data_dir), plan, fold_metrics,
                                  _readable_scans(plan, fold_metrics, fold_scans),
                                  target["target_sensitivity"])
    rows = [fold_row(f, fold_metrics[f.test]) for f in plan]
    result = {"name": name, "stage": settings["stage"], "folds": [f.test for f in plan],
              "val_offset": settings["val_offset"], "training": settings["training"],
              "views": settings.get("views"), "cpm": pooled["cpm"], "cpm_ci95": pooled.get("cpm_ci95"),
              "froc_sensitivities": pooled["froc_sensitivities"],
              "froc_sensitivities_ci95": pooled.get("froc_sensitivities_ci95"),
              "fold_cpm": [r["cpm"] for r in rows], "fold_results": rows, "n_scans": pooled["n_scans"],
              "n_nodules": pooled["n_nodules"], "froc": pooled, "operating_point": point,
              "unreadable_scans": {uid: why for m in fold_metrics.values()
                                   for uid, why in m["unreadable_scans"].items()},
              "files": {n: str(out_dir / n) for n in ("submission.csv", "metrics.json", "folds.csv",
                                                      "froc.png", "operating_point.json")}}
    _write_folds_csv(out_dir / "folds.csv", rows)
    froc.plot_froc(pooled, out_dir / "froc.png", title=f"cross-validation {name}")
    common.atomic_write_json(out_dir / "metrics.json", result)
    if json_out is not None:
        common.atomic_write_json(json_out, result)
    return result


def fold_table(result: Dict[str, Any]):
    """A rich table: each fold's subsets, run, counts, AUC and CPM, and the pooled CPM with its interval."""
    from rich.table import Table
    table = Table(title=f"cross-validation {result['name']} ({result['stage']}, "
                        f"{len(result['folds'])} folds)")
    for column in ("fold", "test", "validation", "run", "scans", "candidates", "AUC", "CPM"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in result["fold_results"]:
        table.add_row(str(row["fold"]), str(row["test_subset"]), str(row["val_subset"]), row["run"],
                      str(row["n_scans"]), str(row["n_candidates"]), _number(row["auc"]), _number(row["cpm"]))
    interval = result.get("cpm_ci95")
    pooled = _number(result["cpm"]) + (f" ({interval[0]:.4f} - {interval[1]:.4f})" if interval else "")
    table.add_row("[bold]all[/]", "", "", "", str(result["n_scans"]), "", "", f"[bold]{pooled}[/]")
    return table
