"""Evaluation stage: LUNA16 FROC/CPM scoring of submissions, and scoring a model on whole subsets.

Coordinates are world mm ``(x, y, z)``: ITK/LPS physical points, as in the LUNA16 CSVs.

Scoring a submission (``seriesuid,coordX,coordY,coordZ,probability``) follows the rules of the LUNA16
challenge's evaluation (Setio et al., Medical Image Analysis 42, 2017), including its corner cases:

* Only the scans of a seriesuid list count; false positives per scan divide by the length of that list.
* Per scan at most 100 marks count: those with a probability strictly greater than the 101st highest
  (marks tied at that cut are all dropped, so a scan may keep fewer than 100).
* A mark hits a finding when its squared distance (mm^2) is below ``(diameter / 2) ** 2``; an excluded
  finding with diameter -1 counts as 10 mm.
* A nodule hit by several marks counts once, at the highest of their probabilities; its other hits are
  neither true nor false positives. A mark inside two nodules detects both. A mark that hits no nodule but
  an excluded finding is ignored. Every other mark is a false positive.
* Missed nodules stay in the sensitivity's denominator.
* The FROC curve is the ROC of the remaining (detected nodule, false positive) entries, rescaled to
  sensitivity and false positives per scan; the sensitivities at 1/8 .. 8 FP/scan are read from it by
  linear interpolation (``numpy.interp``; where a point falls on a vertical step, the top of the step).
  CPM is their mean. 95 % intervals come from 1000 bootstrap resamples of the scans with replacement.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

import data
from data import PointTable, UserError
from train import roc_auc as rank_auc, threshold_metrics

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS_PER_SCAN = 100
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
MISSED_NODULE_SCORE = -1e9
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CURVE_GRID = np.geomspace(FP_RATES[0], FP_RATES[-1], 121)  # FP/scan where the reported curve is sampled
MAX_LISTED_PROBLEMS = 10


# --- reading the inputs ---------------------------------------------------------

def _problems_message(path: Path, problems: list[str], what: str) -> str:
    shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    return f"{path}: {len(problems)} bad {what}:\n  {shown}{more}"


def _read_submission_rows_slowly(path: Path, lines: list[str], columns: list[int]) -> PointTable:
    """Row-by-row reading with the csv module: accepts quoting, names every bad line."""
    import csv
    uids, numbers, line_numbers, problems = [], [], [], []
    width = max(columns) + 1
    for line_number, row in enumerate(csv.reader(lines[1:]), start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < width:
            problems.append(f"line {line_number}: {len(row)} field(s), expected {width} or more")
            continue
        fields = [row[c].strip() for c in columns]
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            problems.append(f"line {line_number}: non-numeric value in {','.join(fields[1:])[:120]!r}")
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(f"line {line_number}: NaN or infinite value in {','.join(fields[1:])[:120]!r}")
        elif not fields[0]:
            problems.append(f"line {line_number}: empty seriesuid")
        else:
            uids.append(fields[0])
            numbers.append(values)
            line_numbers.append(line_number)
    if problems:
        raise UserError(_problems_message(path, problems, "line(s)"))
    numbers = np.array(numbers, np.float64).reshape(-1, 4)
    return PointTable(np.array(uids, dtype=object), numbers[:, :3], numbers[:, 3], np.array(line_numbers, int))


def read_submission(path) -> PointTable:
    """Read a LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability`` (any column order).

    Returns marks with ``world_xyz`` ``(N, 3)`` world mm and ``value`` = probability (float64, as written).
    A C-speed reader handles well-formed files; anything odd goes through a row-by-row reader that names
    every bad line. Raises :class:`UserError` for a missing file or column, or non-numeric/NaN values.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: submission file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    lines = text.splitlines()
    header = [name.strip().strip('"') for name in lines[0].split(",")] if lines else []
    missing = [name for name in SUBMISSION_COLUMNS if name not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(header: {','.join(header)[:200] or 'empty file'}; expected {','.join(SUBMISSION_COLUMNS)})")
    columns = [header.index(name) for name in SUBMISSION_COLUMNS]
    body = lines[1:]
    if any(not line or line.isspace() for line in body):
        line_numbers = np.array([n for n, line in enumerate(body, start=2) if line and not line.isspace()], int)
        body = [lines[n - 1] for n in line_numbers]
    else:
        line_numbers = np.arange(2, len(body) + 2)
    if not body:
        return PointTable(np.array([], dtype=object), np.zeros((0, 3)), np.zeros(0), np.zeros(0, int))
    if text.count(",") - lines[0].count(",") != len(body) * (len(header) - 1) or '"' in text:
        return _read_submission_rows_slowly(path, lines, columns)
    try:
        numbers = np.loadtxt(body, delimiter=",", usecols=columns[1:], dtype=np.float64, ndmin=2, comments=None)
    except ValueError:
        return _read_submission_rows_slowly(path, lines, columns)
    uid_column = columns[0]
    uids = np.array([line.split(",", uid_column + 1)[uid_column].strip() for line in body], dtype=object)
    if not np.isfinite(numbers).all() or not all(uids):
        return _read_submission_rows_slowly(path, lines, columns)
    return PointTable(uids, np.ascontiguousarray(numbers[:, :3]), numbers[:, 3].copy(), line_numbers)


def read_findings(path, excluded: bool = False) -> PointTable:
    """Read ``annotations.csv`` or ``annotations_excluded.csv``: ``value`` = diameter in mm.

    A negative diameter (LUNA16 writes -1 in the excluded file) means unknown size, scored as 10 mm.
    Any unreadable row is an error: silently losing a nodule would change the score.
    """
    import data
    table, problems = data.read_point_csv(path, "diameter_mm")
    if problems:
        raise UserError(_problems_message(Path(path), problems, "row(s)"))
    table.value = np.where(table.value < 0.0, EXCLUDED_UNKNOWN_DIAMETER_MM, table.value)
    return table


def read_seriesuid_list(path) -> list[str]:
    """The scans to evaluate, one seriesuid per line (LUNA16's ``seriesuids.csv``, no header)."""
    import data
    uids = data.read_seriesuids(path)
    if not uids:
        raise UserError(f"{path}: no seriesuids in this file")
    return uids


# --- per-scan matching ----------------------------------------------------------------

@dataclass
class FrocEntries:
    """What the FROC is computed from: one entry per included nodule and per false-positive mark.

    is_nodule: True for a nodule (detected or missed), False for a false positive.
    probability: the mark's probability (a detected nodule: its best hit; a missed one: -1e9).
    is_missed: True for a nodule no mark hit (kept only for the sensitivity denominator).
    scan: index of the entry's scan in the evaluated seriesuid list.
    """
    is_nodule: np.ndarray
    probability: np.ndarray
    is_missed: np.ndarray
    scan: np.ndarray


def _group_bounds(scan_index: np.ndarray, n_scans: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable order by scan and ``bounds`` so that scan s owns ``order[bounds[s]:bounds[s + 1]]``."""
    order = np.argsort(scan_index, kind="stable")
    bounds = np.searchsorted(scan_index[order], np.arange(n_scans + 1))
    return order, bounds


def cap_marks_per_scan(scan_index: np.ndarray, probability: np.ndarray, n_scans: int,
                       max_marks: int = MAX_MARKS_PER_SCAN) -> tuple[np.ndarray, dict]:
    """Mask of the marks that count: per scan, all of them if at most ``max_marks``, else those whose
    probability is strictly greater than the ``max_marks + 1``-th highest of that scan.

    Returns ``(keep (N,) bool, stats)`` with stats ``n_over_cap`` (marks dropped), ``tie_scans`` (scans that
    keep fewer than ``max_marks`` because of ties at the cut) and ``tie_dropped`` (their marks tied at the cut,
    all dropped).
    """
    counts = np.bincount(scan_index, minlength=n_scans)
    keep = np.ones(len(scan_index), bool)
    crowded = np.flatnonzero(counts > max_marks)
    if len(crowded) == 0:
        return keep, {"n_over_cap": 0, "tie_scans": 0, "tie_dropped": 0}
    order = np.lexsort((-probability, scan_index))  # by scan, then probability descending
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cut = np.full(n_scans, -np.inf)
    cut[crowded] = probability[order[starts[crowded] + max_marks]]
    in_crowded = counts[scan_index] > max_marks
    keep[in_crowded] = probability[in_crowded] > cut[scan_index[in_crowded]]
    at_cut = in_crowded & (probability == cut[scan_index])
    tied_scans = np.flatnonzero(np.bincount(scan_index[keep], minlength=n_scans)[crowded] < max_marks)
    on_tied_scan = np.isin(scan_index, crowded[tied_scans])
    return keep, {"n_over_cap": int((~keep).sum()), "tie_scans": len(tied_scans),
                  "tie_dropped": int((at_cut & on_tied_scan).sum())}


def _squared_distances(marks_xyz: np.ndarray, findings_xyz: np.ndarray) -> np.ndarray:
    """``(M, F)`` squared world distances in mm^2, summed x, y, z in that order."""
    diff = findings_xyz[None, :, :] - marks_xyz[:, None, :]
    return diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]


def match_marks(n_scans: int, mark_scan: np.ndarray, mark_xyz: np.ndarray, mark_probability: np.ndarray,
                nodule_scan: np.ndarray, nodule_xyz: np.ndarray, nodule_diameter: np.ndarray,
                excluded_scan: np.ndarray, excluded_xyz: np.ndarray, excluded_diameter: np.ndarray
                ) -> tuple[FrocEntries, dict]:
    """Match the (already capped) marks to nodules and excluded findings, scan by scan.

    ``*_scan`` are indices into the evaluated seriesuid list, ``*_xyz`` world mm ``(N, 3)``, diameters mm.
    Returns the FROC entries and counts (``n_detected``, ``n_missed``, ``n_false_positives``,
    ``n_marks_on_excluded``, ``n_double_hits``).
    """
    mark_order, mark_bounds = _group_bounds(mark_scan, n_scans)
    nodule_order, nodule_bounds = _group_bounds(nodule_scan, n_scans)
    excluded_order, excluded_bounds = _group_bounds(excluded_scan, n_scans)
    nodule_radius_sq = (nodule_diameter / 2.0) ** 2
    excluded_radius_sq = (excluded_diameter / 2.0) ** 2
    parts_nodule_prob, parts_nodule_scan, parts_fp_prob, parts_fp_scan = [], [], [], []
    n_on_excluded = n_double = 0
    for s in np.flatnonzero(np.diff(nodule_bounds) + np.diff(mark_bounds)):
        marks = mark_order[mark_bounds[s]:mark_bounds[s + 1]]
        nodules = nodule_order[nodule_bounds[s]:nodule_bounds[s + 1]]
        others = excluded_order[excluded_bounds[s]:excluded_bounds[s + 1]]
        xyz, prob = mark_xyz[marks], mark_probability[marks]
        hits = _squared_distances(xyz, nodule_xyz[nodules]) < nodule_radius_sq[nodules]
        on_excluded = (_squared_distances(xyz, excluded_xyz[others]) < excluded_radius_sq[others]).any(axis=1)
        on_nodule = hits.any(axis=1)
        best = np.where(hits, prob[:, None], -np.inf).max(axis=0, initial=-np.inf)
        parts_nodule_prob.append(np.where(hits.any(axis=0), best, MISSED_NODULE_SCORE))
        parts_nodule_scan.append(np.full(len(nodules), s))
        false_positive = ~on_nodule & ~on_excluded
        parts_fp_prob.append(prob[false_positive])
        parts_fp_scan.append(np.full(int(false_positive.sum()), s))
        n_on_excluded += int((on_excluded & ~on_nodule).sum())
        n_double += int(np.maximum(hits.sum(axis=0) - 1, 0).sum())
    nodule_prob = np.concatenate(parts_nodule_prob) if parts_nodule_prob else np.zeros(0)
    fp_prob = np.concatenate(parts_fp_prob) if parts_fp_prob else np.zeros(0)
    missed = nodule_prob == MISSED_NODULE_SCORE
    entries = FrocEntries(
        is_nodule=np.concatenate([np.ones(len(nodule_prob), bool), np.zeros(len(fp_prob), bool)]),
        probability=np.concatenate([nodule_prob, fp_prob]),
        is_missed=np.concatenate([missed, np.zeros(len(fp_prob), bool)]),
        scan=np.concatenate(parts_nodule_scan + parts_fp_scan).astype(int) if parts_nodule_scan else np.zeros(0, int))
    counts = {"n_detected": int((~missed).sum()), "n_missed": int(missed.sum()), "n_false_positives": len(fp_prob),
              "n_marks_on_excluded": n_on_excluded, "n_double_hits": n_double}
    return entries, counts


# --- FROC curve, CPM and bootstrap ------------------------------------------------------

def _roc_points(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (true, false) positive counts at each distinct score, highest first, from (0, 0).

    Points whose neighbours make them the midpoint of a straight segment are dropped (they change no
    linear interpolation). Returns ``(tp, fp, thresholds)``; the first threshold is ``inf``.
    """
    order = np.argsort(score, kind="mergesort")[::-1]
    sorted_score = score[order]
    ends = np.concatenate([np.flatnonzero(np.diff(sorted_score)), [len(score) - 1]])
    tp = np.cumsum(is_positive[order], dtype=np.float64)[ends]
    fp = (ends + 1) - tp
    if len(tp) > 2:
        corner = np.concatenate([[True], (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), [True]])
        tp, fp, ends = tp[corner], fp[corner], ends[corner]
    return (np.concatenate([[0.0], tp]), np.concatenate([[0.0], fp]),
            np.concatenate([[np.inf], sorted_score[ends]]))


def froc_curve(entries: FrocEntries, n_scans: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FROC curve ``(fp_per_scan, sensitivity, thresholds)`` of the entries, over ``n_scans`` scans.

    Missed nodules count in the sensitivity's denominator only. With no false positive at all the
    curve sits at 0 FP/scan; with no detection its sensitivity is 0.
    """
    n_nodules = int(entries.is_nodule.sum())
    scored = ~entries.is_missed
    positive, score = entries.is_nodule[scored], entries.probability[scored]
    if len(score) == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    n_detected = int(positive.sum())
    tp, fp, thresholds = _roc_points(positive, score)
    if fp[-1] > 0:
        fp_per_scan = (fp / fp[-1]) * float(len(score) - n_detected) / n_scans
    else:
        fp_per_scan = np.zeros(len(fp))
    sensitivity = (tp / tp[-1]) * n_detected / n_nodules if n_detected else np.zeros(len(tp))
    return fp_per_scan, sensitivity, thresholds


def sensitivities_at(fp_per_scan: np.ndarray, sensitivity: np.ndarray,
                     rates: Sequence[float] = FP_RATES) -> np.ndarray:
    """Sensitivity at each FP/scan rate by linear interpolation of the FROC curve."""
    return np.interp(np.asarray(rates, float), fp_per_scan, sensitivity)


def _interval(samples: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Lower/upper bootstrap bounds per column: sorted samples at floor(a * B) and floor((1 - a) * B)."""
    ordered = np.sort(samples, axis=0)
    tail = (1.0 - confidence) / 2.0
    n = len(ordered)
    return ordered[int(math.floor(tail * n))], ordered[min(int(math.floor((1.0 - tail) * n)), n - 1)]


def bootstrap_froc(entries: FrocEntries, n_scans: int, n_resamples: int = 1000, seed: int = 0,
                   rates: Sequence[float] = FP_RATES, chunk: int = 32) -> np.ndarray:
    """Sensitivities at ``rates`` for ``n_resamples`` resamples of the scans with replacement.

    Each resample weights every entry by how often its scan was drawn; FP/scan still divides by
    ``n_scans``. Entries are sorted once, so a resample costs two cumulative sums. Returns ``(B, R)``.
    """
    rates = np.asarray(rates, float)
    out = np.zeros((n_resamples, len(rates)))
    if n_resamples <= 0 or n_scans == 0:
        return out[:0]
    rng = np.random.default_rng(seed)
    nodules_per_scan = np.bincount(entries.scan[entries.is_nodule], minlength=n_scans)
    scored = ~entries.is_missed
    order = np.argsort(entries.probability[scored], kind="mergesort")[::-1]
    scan, positive = entries.scan[scored][order], entries.is_nodule[scored][order]
    score = entries.probability[scored][order]
    if len(score) == 0:
        return out
    ends = np.concatenate([np.flatnonzero(np.diff(score)), [len(score) - 1]])
    # Cumulative sums run over positives and negatives separately; a group end reads both at its place.
    pos_before_end = np.cumsum(positive)[ends]
    neg_before_end = (ends + 1) - pos_before_end
    scan_pos, scan_neg = scan[positive], scan[~positive]
    for first in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - first)
        draws = rng.integers(n_scans, size=(b, n_scans)) + np.arange(b)[:, None] * n_scans
        weights = np.bincount(draws.ravel(), minlength=b * n_scans).reshape(b, n_scans).astype(np.int32)
        n_nodules = weights @ nodules_per_scan
        tp = np.concatenate([np.zeros((b, 1)), np.cumsum(weights[:, scan_pos], axis=1)], axis=1)[:, pos_before_end]
        fp = np.concatenate([np.zeros((b, 1)), np.cumsum(weights[:, scan_neg], axis=1)], axis=1)[:, neg_before_end]
        for row in range(b):
            if n_nodules[row] == 0:
                continue
            fp_per_scan = np.concatenate([[0.0], fp[row]]) / n_scans
            sensitivity = np.concatenate([[0.0], tp[row]]) / n_nodules[row]
            out[first + row] = np.interp(rates, fp_per_scan, sensitivity)
    return out


def _scan_indices(uids: np.ndarray, index: dict) -> np.ndarray:
    """Position of each uid in the evaluated list, -1 where it is not there."""
    return np.fromiter(map(index.get, uids, itertools.repeat(-1)), np.int64, len(uids))


def score_marks(marks: PointTable, seriesuids: Sequence[str], annotations: PointTable, excluded: PointTable,
                bootstrap: int = 1000, seed: int = 0, max_marks: int = MAX_MARKS_PER_SCAN) -> dict:
    """LUNA16 FROC/CPM of ``marks`` (``value`` = probability) on the scans of ``seriesuids``.

    annotations/excluded: ``value`` = diameter in mm (a negative excluded diameter means 10 mm).
    Marks of scans outside the list are not scored but counted (``n_marks_unknown_seriesuid``) and named
    (``unknown_seriesuids``, first 20) with a warning. Returns a JSON-ready dict: ``cpm``,
    ``froc_sensitivities`` {rate: sensitivity}, their bootstrap ``*_ci95`` bounds, a sampled ``froc_curve``
    and the counts behind them.
    """
    seriesuids = list(seriesuids)
    index = {uid: i for i, uid in enumerate(seriesuids)}
    if len(index) != len(seriesuids):
        duplicated = sorted({uid for uid in seriesuids if seriesuids.count(uid) > 1})[:3]
        raise UserError(f"the seriesuid list names some scans twice (e.g. {', '.join(duplicated)})")
    n_scans = len(seriesuids)
    if n_scans == 0:
        raise UserError("the seriesuid list is empty: no scans to evaluate")
    warnings = []
    mark_scan = _scan_indices(marks.seriesuid, index)
    known = mark_scan >= 0
    unknown_uids = list(dict.fromkeys(marks.seriesuid[~known]))
    if len(marks) and not known.any():
        raise UserError(f"none of the submission's {len(unknown_uids)} seriesuid(s) is among the {n_scans} "
                        f"evaluated scans (first: {unknown_uids[0]}, line {int(marks.line[0])}): wrong seriesuid list?")
    if unknown_uids:
        first_line = int(marks.line[np.argmax(~known)])
        warnings.append(f"{int((~known).sum())} mark(s) on {len(unknown_uids)} seriesuid(s) outside the evaluated "
                        f"list were not scored (first: {unknown_uids[0]}, line {first_line})")
    keep, cap = cap_marks_per_scan(mark_scan[known], marks.value[known], n_scans, max_marks)
    if cap["tie_scans"]:
        warnings.append(f"{cap['tie_scans']} scan(s) had marks tied at the {max_marks}-mark cut: all "
                        f"{cap['tie_dropped']} tied mark(s) there were dropped (the official rule)")
    kept = np.flatnonzero(known)[keep]

    def scans_of(table: PointTable) -> tuple[np.ndarray, np.ndarray]:
        scan = _scan_indices(table.seriesuid, index)
        rows = np.flatnonzero(scan >= 0)
        return scan[rows], rows

    nodule_scan, nodule_rows = scans_of(annotations)
    excluded_scan, excluded_rows = scans_of(excluded)
    nodule_diameter = np.where(annotations.value[nodule_rows] < 0.0, EXCLUDED_UNKNOWN_DIAMETER_MM,
                               annotations.value[nodule_rows])
    if (nodule_diameter == 0.0).any():
        warnings.append(f"{int((nodule_diameter == 0.0).sum())} nodule(s) with diameter 0 mm: no mark can hit them")
    entries, counts = match_marks(
        n_scans, mark_scan[kept], marks.world_xyz[kept], marks.value[kept],
        nodule_scan, annotations.world_xyz[nodule_rows], nodule_diameter,
        excluded_scan, excluded.world_xyz[excluded_rows],
        np.where(excluded.value[excluded_rows] < 0.0, EXCLUDED_UNKNOWN_DIAMETER_MM, excluded.value[excluded_rows]))
    n_nodules = len(nodule_rows)
    if n_nodules == 0:
        warnings.append("no annotated nodule in the evaluated scans: sensitivity and CPM are undefined")
    fp_per_scan, sensitivity, _ = froc_curve(entries, n_scans)
    at_rates = sensitivities_at(fp_per_scan, sensitivity)
    result = {
        "cpm": float(at_rates.mean()) if n_nodules else None,
        "fp_rates": list(FP_RATES),
        "froc_sensitivities": {_rate_key(r): float(s) for r, s in zip(FP_RATES, at_rates)} if n_nodules else None,
        "n_scans": n_scans, "n_nodules": n_nodules, "n_marks": len(marks), "n_marks_scored": int(len(kept)),
        "n_marks_over_cap": cap["n_over_cap"], "n_scans_tied_at_cap": cap["tie_scans"],
        "n_marks_dropped_by_ties": cap["tie_dropped"],
        "n_marks_unknown_seriesuid": int((~known).sum()), "unknown_seriesuids": unknown_uids[:20],
        **counts,
        "sensitivity_all_marks": counts["n_detected"] / n_nodules if n_nodules else None,
        "froc_curve": {"fp_per_scan": CURVE_GRID.tolist(),
                       "sensitivity": np.interp(CURVE_GRID, fp_per_scan, sensitivity).tolist()},
        "warnings": warnings,
    }
    if bootstrap and n_nodules:
        samples = bootstrap_froc(entries, n_scans, bootstrap, seed, rates=tuple(FP_RATES) + tuple(CURVE_GRID))
        at_rates_bs, curve_bs = samples[:, :len(FP_RATES)], samples[:, len(FP_RATES):]
        cpm_bs = at_rates_bs.mean(axis=1)
        low, high = _interval(np.column_stack([at_rates_bs, cpm_bs]))
        result.update({
            "bootstrap": {"resamples": bootstrap, "seed": seed, "cpm_mean": float(cpm_bs.mean())},
            "cpm_ci95": [float(low[-1]), float(high[-1])],
            "froc_sensitivities_ci95": {_rate_key(r): [float(lo), float(hi)]
                                        for r, lo, hi in zip(FP_RATES, low[:-1], high[:-1])},
        })
        curve_low, curve_high = _interval(curve_bs)
        result["froc_curve"].update(ci95_low=curve_low.tolist(), ci95_high=curve_high.tolist())
    return result


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


# --- scoring files -------------------------------------------------------------------------

def default_reference_files(data_dir) -> dict:
    """``annotations.csv``, ``annotations_excluded.csv`` and ``seriesuids.csv`` of a LUNA16 root."""
    data_dir = Path(data_dir)
    return {"annotations": data_dir / "annotations.csv", "excluded": data_dir / "annotations_excluded.csv",
            "seriesuids": data_dir / "seriesuids.csv"}


def score_submission(submission, annotations, excluded, seriesuids: Union[Path, str, Sequence[str]],
                     json_out: Optional[Path] = None, figure: Optional[Path] = None,
                     bootstrap: int = 1000, seed: int = 0) -> dict:
    """Score a LUNA16 submission CSV; see :func:`score_marks` for the result.

    seriesuids: a file (one uid per line) or the uids themselves: the scans that count, whose number
    divides the false positives. Writes the result to ``json_out`` and the FROC plot to ``figure``
    (atomically) when given.
    """
    import data
    if isinstance(seriesuids, (str, Path)):
        seriesuids = read_seriesuid_list(seriesuids)
    marks = read_submission(submission)
    result = score_marks(marks, seriesuids, read_findings(annotations), read_findings(excluded, excluded=True),
                         bootstrap=bootstrap, seed=seed)
    result["submission"] = str(submission)
    if json_out is not None:
        data.atomic_write_json(json_out, result)
    if figure is not None:
        plot_froc(result, figure, title=Path(submission).stem)
    return result


# --- figures and tables ----------------------------------------------------------------------

def plot_froc(result: dict, path: Path, title: str = "") -> None:
    """FROC curve (log2 FP/scan axis, 1/8 .. 8) with its bootstrap band and the CPM, as an image file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = result["froc_curve"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    label = f"CPM {result['cpm']:.3f}" if result.get("cpm") is not None else "no nodules"
    ax.plot(curve["fp_per_scan"], curve["sensitivity"], color="C0", lw=2, label=label)
    if "ci95_low" in curve:
        ax.fill_between(curve["fp_per_scan"], curve["ci95_low"], curve["ci95_high"], color="C0", alpha=0.15,
                        label="95% bootstrap interval")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(FP_RATES), ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"FROC {title}".strip())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    data.atomic_save_figure(fig, path)


def froc_table(result: dict, title: str = "LUNA16 FROC"):
    """A rich table of the sensitivities at 1/8 .. 8 FP/scan and the CPM, with 95 % intervals."""
    from rich.table import Table
    table = Table(title=title)
    table.add_column("FP / scan", justify="right")
    table.add_column("sensitivity", justify="right")
    table.add_column("95% interval", justify="right")
    sens, ci = result.get("froc_sensitivities") or {}, result.get("froc_sensitivities_ci95") or {}
    for rate in FP_RATES:
        key = _rate_key(rate)
        value = f"{sens[key]:.4f}" if key in sens else "-"
        bounds = f"{ci[key][0]:.4f} - {ci[key][1]:.4f}" if key in ci else "-"
        table.add_row(key, value, bounds)
    cpm = f"{result['cpm']:.4f}" if result.get("cpm") is not None else "-"
    bounds = f"{result['cpm_ci95'][0]:.4f} - {result['cpm_ci95'][1]:.4f}" if "cpm_ci95" in result else "-"
    table.add_row("[bold]CPM[/]", f"[bold]{cpm}[/]", bounds)
    return table


def froc_summary_line(result: dict) -> str:
    """One line with the counts behind the FROC."""
    return (f"{result['n_scans']} scans, {result['n_nodules']} nodules ({result['n_detected']} hit, "
            f"{result['n_missed']} missed); {result['n_marks']} marks, {result['n_marks_scored']} scored "
            f"({result['n_marks_over_cap']} over the {MAX_MARKS_PER_SCAN}-per-scan cap), "
            f"{result['n_false_positives']} false positives, {result['n_marks_on_excluded']} on excluded findings, "
            f"{result['n_double_hits']} double hits")


# --- evaluating a model on whole subsets ---------------------------------------------------------

TTA_FLIPS = tuple(tuple(d for d, bit in zip((1, 2, 3), (a, b, c)) if bit)
                  for a in (0, 1) for b in (0, 1) for c in (0, 1))  # patch axes z, y, x of (B, P, P, P)
PREDICTION_COLUMNS = "seriesuid,coordX,coordY,coordZ,probability,class"


def parse_subsets(text: str) -> list[int]:
    """``"9"``, ``"8,9"`` or ``"0-4"`` -> sorted subset numbers; at least one is required here."""
    import data
    subsets = data.parse_subsets(text, "--subsets")
    if not subsets:
        raise UserError(f"--subsets must name at least one subset, got {text!r}")
    return subsets


def subset_scans(data_dir, subsets: Sequence[int]) -> dict:
    """``{seriesuid: .mhd path}`` of the scans in ``subset<k>`` folders of the LUNA16 root, for k in subsets."""
    import data
    data_dir = Path(data_dir)
    found = {uid: data_dir / f"subset{k}" / f"{uid}.mhd"
             for uid, k in sorted(data.scan_subset_map(data_dir).items()) if k in set(subsets)}
    if not found:
        raise UserError(f"{data_dir}: no scans in subset folder(s) {', '.join(f'subset{k}' for k in subsets)} "
                        "(set --data-dir or LUNA16_DIR to the LUNA16 folder)")
    return found


def checkpoint_for_run(work_dir, run: str) -> Path:
    """``<work_dir>/runs/<run>/best.pt``, which must exist."""
    path = Path(work_dir) / "runs" / run / "best.pt"
    if not path.is_file():
        raise UserError(f"run {run!r} has no best.pt ({path} not found); see {Path(work_dir) / 'runs'}")
    return path


def default_eval_dir(work_dir, name: str, subsets: Sequence[int], tta: bool) -> Path:
    """``<work_dir>/eval/<name>_subsets<k..>[_tta]``."""
    return Path(work_dir) / "eval" / f"{name}_subsets{''.join(map(str, subsets))}{'_tta' if tta else ''}"


def predict_patches(model, patches, preprocess: dict, device: str = "cpu", batch_size: int = 64,
                    tta: bool = False, bf16: bool = False) -> np.ndarray:
    """Probabilities (float64, sigmoid taken in float64) for HU patches ``(N, P, P, P)`` int16 ``[z, y, x]``.

    ``tta`` averages the probabilities of the 8 flips of the three patch axes. ``bf16`` runs the model
    under bfloat16 autocast (CUDA).
    """
    import data
    patches = torch.as_tensor(patches)
    out = np.empty(len(patches), np.float64)
    flips = TTA_FLIPS if tta else ((),)
    with torch.inference_mode(), torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                                enabled=bf16):
        for first in range(0, len(patches), batch_size):
            hu = patches[first:first + batch_size].to(device, non_blocking=True)
            x = data.hu_to_unit(hu, preprocess.get("hu_min", -1000.0), preprocess.get("hu_max", 1000.0))
            probability = torch.zeros(len(x), dtype=torch.float64, device=x.device)
            for dims in flips:
                view = torch.flip(x, dims) if dims else x
                probability += torch.sigmoid(model(view.unsqueeze(1)).double())
            out[first:first + len(x)] = (probability / len(flips)).cpu().numpy()
    return out


class ScanPatchStream(torch.utils.data.IterableDataset):
    """Iterable over ``(seriesuid, first_row, patches int16 (n, P, P, P) tensor, error)`` chunks.

    Each scan is opened once (``data.read_and_extract``, which cuts the first chunk straight from the
    mapped file) and cut into patches around its candidates' world mm points in chunks of at most
    ``chunk`` patches; with DataLoader workers, worker w takes scans w, w + W, ...
    A scan that cannot be read or cut yields an item with ``patches`` None and the reason in ``error``.
    """

    def __init__(self, scans: list, patch_size: int, spacing_mm: float, chunk: int = 256):
        super().__init__()
        self.scans = scans  # [(seriesuid, path, world_xyz (n, 3))]
        self.patch_size, self.spacing_mm, self.chunk = patch_size, spacing_mm, chunk

    def __iter__(self):
        import data
        info = torch.utils.data.get_worker_info()
        mine = self.scans[info.id::info.num_workers] if info else self.scans
        for uid, path, world_xyz in mine:
            try:
                # the first chunk comes with the scan, the others are cut from it
                scan, patches = data.read_and_extract(path, world_xyz[:self.chunk], self.patch_size, self.spacing_mm)
                for first in range(0, len(world_xyz), self.chunk):
                    if first:
                        patches = data.extract_patches(scan, world_xyz[first:first + self.chunk], self.patch_size,
                                                       self.spacing_mm)
                    yield uid, first, torch.from_numpy(patches), ""
            except (UserError, ValueError, RuntimeError, OSError, MemoryError) as err:
                yield uid, 0, None, str(err) or type(err).__name__


def _as_is(item):
    return item


def _one_thread(_worker_id: int) -> None:
    import data
    torch.set_num_threads(1)
    data.set_extraction_threads(1)  # the reader processes already run side by side


def stream_scan_patches(scans: list, patch_size: int, spacing_mm: float, workers: int, chunk: int = 256):
    """Chunks of :class:`ScanPatchStream`, prefetched by ``workers`` processes (0: in this process)."""
    loader = torch.utils.data.DataLoader(
        ScanPatchStream(scans, patch_size, spacing_mm, chunk), batch_size=None,
        num_workers=workers, collate_fn=_as_is, worker_init_fn=_one_thread if workers else None,
        prefetch_factor=2 if workers else None)
    return iter(loader)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """ROC AUC with tied scores counted as half (average ranks); None without both classes."""
    value = rank_auc(labels, scores)
    return None if math.isnan(value) else value


def _evaluation_key(checkpoint: Path, meta: dict, tta: bool, candidates: Path) -> dict:
    stat = Path(checkpoint).stat()
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_bytes": stat.st_size,
            "checkpoint_mtime_ns": stat.st_mtime_ns, "preprocess": meta["preprocess"], "tta": bool(tta),
            "candidates": str(Path(candidates).resolve())}


def _finished_scans(out_dir: Path, key: dict, expected: dict) -> dict:
    """``{seriesuid: probabilities}`` of the scans a previous run with the same key wrote completely.

    ``predictions.csv`` is rewritten with only those scans, dropping a half-written tail.
    """
    import json
    import data
    key_path, predictions = out_dir / "evaluation_key.json", out_dir / "predictions.csv"
    if not key_path.is_file() or json.loads(key_path.read_text()) != key or not predictions.is_file():
        predictions.unlink(missing_ok=True)
        data.atomic_write_json(key_path, key)
        return {}
    rows: dict = {}
    for line in predictions.read_text().splitlines()[1:]:
        fields = line.split(",")
        if len(fields) == 6:
            rows.setdefault(fields[0], []).append(line)
    done = {}
    for uid, lines in rows.items():
        try:
            if len(lines) == expected.get(uid):
                done[uid] = (lines, np.array([float(line.split(",")[4]) for line in lines]))
        except ValueError:
            continue
    data.atomic_write_text(predictions, PREDICTION_COLUMNS + "\n" + "".join(
        line + "\n" for lines, _ in done.values() for line in lines))
    return {uid: probability for uid, (_, probability) in done.items()}


def _prediction_lines(uid: str, world_xyz: np.ndarray, probability: np.ndarray, labels: np.ndarray) -> str:
    return "".join(f"{uid},{x!r},{y!r},{z!r},{p!r},{int(c)}\n"
                   for (x, y, z), p, c in zip(world_xyz.tolist(), probability.tolist(), labels.tolist()))


def plot_roc(labels: np.ndarray, probability: np.ndarray, path: Path, title: str = "") -> None:
    """Candidate-level ROC curve with its AUC, as an image file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = np.asarray(labels).astype(bool)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if labels.any() and (~labels).any():
        tp, fp, _ = _roc_points(labels, np.asarray(probability, float))
        ax.plot(fp / fp[-1], tp / tp[-1], color="C1", lw=2, label=f"AUC {roc_auc(labels, probability):.4f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC {title}".strip())
    ax.grid(True, alpha=0.3)
    data.atomic_save_figure(fig, path)


def _candidates_of(data_dir: Path, scans: dict) -> tuple[PointTable, list[str]]:
    import data
    table, problems = data.read_point_csv(data.candidates_file(data_dir), "class")
    return table.take(np.flatnonzero(np.isin(table.seriesuid, list(scans)))), problems


def evaluate_model(checkpoint: Path, data_dir: Path, subsets: list[int], out_dir: Path, tta: bool = False,
                   batch_size: int = 64, workers: int = 2, device: str = "cpu", bf16: bool = False,
                   bootstrap: int = 1000, seed: int = 0, console=None) -> dict:
    """Score every candidate of the given LUNA16 subsets with a checkpoint, then evaluate.

    Each scan is read once and its patches (the checkpoint's ``patch_size``/``spacing_mm``) go through the
    model in batches while worker processes prepare the next scans. Per-scan predictions are appended to
    ``out_dir/predictions.csv`` as scans finish, so a rerun resumes. Writes ``submission.csv`` (LUNA16
    format, full-precision probabilities), ``metrics.json``, ``roc.png`` and ``froc.png`` in ``out_dir``.
    The FROC counts the readable scans of the subsets. Unreadable scans are skipped and listed in
    ``unreadable_scans``. Returns the metrics dict (``auc``, ``accuracy``, ``sensitivity``,
    ``specificity`` at 0.5, ``at_cutoff``, ``cpm``, ``froc_sensitivities``, ...).
    """
    import time
    import data
    import head
    if batch_size < 1 or workers < 0:
        raise ValueError(f"batch_size must be >= 1 and workers >= 0, got {batch_size}, {workers}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = head.load_classifier(Path(checkpoint), device=device)
    preprocess = meta["preprocess"]
    scans = subset_scans(data_dir, subsets)
    candidates, problems = _candidates_of(Path(data_dir), scans)
    warnings = [f"candidates file: {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
    rows_of = {}
    for row, uid in enumerate(candidates.seriesuid):
        rows_of.setdefault(uid, []).append(row)
    rows_of = {uid: np.array(rows) for uid, rows in rows_of.items()}
    labels = candidates.value > 0.5
    probability = np.full(len(candidates), np.nan)
    key = _evaluation_key(Path(checkpoint), meta, tta, data.candidates_file(data_dir))
    for uid, done in _finished_scans(out_dir, key, {u: len(r) for u, r in rows_of.items()}).items():
        probability[rows_of[uid]] = done
    todo = [(uid, scans[uid], candidates.world_xyz[rows]) for uid, rows in rows_of.items()
            if np.isnan(probability[rows]).any()]
    stream_start = time.perf_counter()
    unreadable = _predict_scans(model, preprocess, todo, rows_of, candidates, labels, probability, out_dir,
                                tta, batch_size, workers, device, bf16, console)
    n_new = sum(len(rows_of[uid]) for uid, _, _ in todo if uid not in unreadable)
    seconds_inference = time.perf_counter() - stream_start
    readable = [uid for uid in scans if uid not in unreadable]
    scored = np.flatnonzero(~np.isnan(probability))
    marks = candidates.take(scored)
    marks.value = probability[scored]
    data.atomic_write_text(out_dir / "submission.csv", ",".join(SUBMISSION_COLUMNS) + "\n" + "".join(
        f"{u},{x!r},{y!r},{z!r},{p!r}\n" for u, (x, y, z), p in
        zip(marks.seriesuid, marks.world_xyz.tolist(), marks.value.tolist())))
    froc = score_marks(marks, readable, read_findings(Path(data_dir) / "annotations.csv"),
                       read_findings(Path(data_dir) / "annotations_excluded.csv", excluded=True),
                       bootstrap=bootstrap, seed=seed)
    at_half = threshold_metrics(labels[scored], probability[scored], 0.5)
    cutoff = meta.get("cutoff")
    result = {
        "checkpoint": str(checkpoint), "epoch": meta.get("epoch"), "subsets": list(subsets), "tta": bool(tta),
        "n_scans": len(readable), "n_candidates": int(len(scored)), "n_positive": int(labels[scored].sum()),
        "auc": roc_auc(labels[scored], probability[scored]),
        "accuracy": at_half["accuracy"], "sensitivity": at_half["sensitivity"],
        "specificity": at_half["specificity"], "at_0.5": at_half,
        "at_cutoff": threshold_metrics(labels[scored], probability[scored], cutoff) if cutoff is not None else None,
        "cpm": froc["cpm"], "cpm_ci95": froc.get("cpm_ci95"), "froc_sensitivities": froc["froc_sensitivities"],
        "froc_sensitivities_ci95": froc.get("froc_sensitivities_ci95"), "froc": froc,
        "unreadable_scans": unreadable, "warnings": warnings + froc["warnings"],
        "seconds": time.perf_counter() - start, "seconds_scoring_candidates": seconds_inference,
        "candidates_per_second": n_new / seconds_inference if n_new else None,
        "files": {name: str(out_dir / name) for name in
                  ("submission.csv", "predictions.csv", "metrics.json", "roc.png", "froc.png")},
    }
    plot_roc(labels[scored], probability[scored], out_dir / "roc.png", title=Path(checkpoint).stem)
    plot_froc(froc, out_dir / "froc.png", title=Path(checkpoint).stem)
    data.atomic_write_json(out_dir / "metrics.json", result)
    return result


def _predict_scans(model, preprocess: dict, todo: list, rows_of: dict, candidates: PointTable, labels: np.ndarray,
                   probability: np.ndarray, out_dir: Path, tta: bool, batch_size: int, workers: int, device: str,
                   bf16: bool, console) -> dict:
    """Fill ``probability`` for the scans of ``todo``, appending each finished scan to predictions.csv.

    Returns ``{seriesuid: reason}`` for the scans that could not be read.
    """
    from rich.progress import Progress
    predictions = out_dir / "predictions.csv"
    if not predictions.is_file():
        predictions.write_text(PREDICTION_COLUMNS + "\n")
    remaining = {uid: len(rows_of[uid]) for uid, _, _ in todo}
    unreadable = {}
    if not todo:
        return unreadable
    with open(predictions, "a") as handle, Progress(console=console, disable=console is None,
                                                    transient=True) as progress:
        task = progress.add_task("scoring candidates", total=sum(remaining.values()))
        chunks = stream_scan_patches(todo, int(preprocess["patch_size"]), float(preprocess["spacing_mm"]),
                                     workers, chunk=max(batch_size, 256))
        for uid, first, patches, error in chunks:
            rows = rows_of[uid]
            if patches is None:
                unreadable[uid] = error
                probability[rows] = np.nan  # chunks of a scan that failed part-way are not kept
                if console is not None:
                    console.print(f"[red]skipped unreadable scan {uid}: {error}[/]")
                continue
            part = rows[first:first + len(patches)]
            probability[part] = predict_patches(model, patches, preprocess, device, batch_size, tta, bf16)
            remaining[uid] -= len(part)
            progress.advance(task, len(part))
            if remaining[uid] == 0:
                handle.write(_prediction_lines(uid, candidates.world_xyz[rows], probability[rows], labels[rows]))
                handle.flush()
    return unreadable


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def candidate_table(result: dict):
    """A rich table of the candidate-level metrics at 0.5 and at the checkpoint's cutoff."""
    from rich.table import Table

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"
    table = Table(title=f"{result['n_candidates']} candidates ({result['n_positive']} nodules) "
                        f"of {result['n_scans']} scans, AUC {fmt(result['auc'])}")
    table.add_column("threshold", justify="right")
    for name in ("accuracy", "sensitivity", "specificity"):
        table.add_column(name, justify="right")
    for label, metrics in (("0.5", result["at_0.5"]), ("cutoff", result["at_cutoff"])):
        if metrics:
            table.add_row(f"{label} ({metrics['cutoff']:.4g})" if label == "cutoff" else label,
                          fmt(metrics["accuracy"]), fmt(metrics["sensitivity"]), fmt(metrics["specificity"]))
    return table
