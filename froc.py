"""The official LUNA16 scoring of a submission: FROC, CPM, bootstrap intervals, and which scans count.

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

import common
import data
from common import UserError
from data import PointTable

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MAX_MARKS_PER_SCAN = 100
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
MISSED_NODULE_SCORE = -1e9
SUBMISSION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
CURVE_GRID = np.geomspace(FP_RATES[0], FP_RATES[-1], 121)  # FP/scan where the reported curve is sampled


# --- reading the inputs ---------------------------------------------------------

def read_submission(path) -> PointTable:
    """Marks of a LUNA16 submission CSV ``seriesuid,coordX,coordY,coordZ,probability`` (any column order):
    ``world_xyz`` world mm, ``value`` = probability as written; a bad line refuses the file, naming it."""
    return data.read_point_csv(path, "probability")[0]


def read_findings(path) -> PointTable:
    """``annotations.csv`` or ``annotations_excluded.csv``: ``value`` = diameter in mm as written (see
    :func:`scoring_diameters`). Any unreadable row refuses the file: losing a nodule would change the
    score."""
    return data.read_point_csv(path, "diameter_mm")[0]


def scoring_diameters(diameters: np.ndarray) -> np.ndarray:
    """Diameters as scored: a negative one (LUNA16 writes -1 for unknown size) counts as 10 mm."""
    return np.where(diameters < 0.0, EXCLUDED_UNKNOWN_DIAMETER_MM, diameters)


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
    keep fewer than ``max_marks`` because of ties at the cut) and ``tie_dropped`` (their marks tied at the
    cut, all dropped).
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
    parts_nodule_prob, parts_nodule_scan, parts_fp_prob, parts_fp_scan = [], [], [], []
    n_on_excluded = n_double = 0
    for s in np.flatnonzero(np.diff(nodule_bounds) + np.diff(mark_bounds)):
        marks = mark_order[mark_bounds[s]:mark_bounds[s + 1]]
        nodules = nodule_order[nodule_bounds[s]:nodule_bounds[s + 1]]
        others = excluded_order[excluded_bounds[s]:excluded_bounds[s + 1]]
        xyz, prob = mark_xyz[marks], mark_probability[marks]
        hits = data.within_radius(data.squared_distances(xyz, nodule_xyz[nodules]), nodule_diameter[nodules])
        on_excluded = data.within_radius(data.squared_distances(xyz, excluded_xyz[others]),
                                         excluded_diameter[others]).any(axis=1)
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
        scan=(np.concatenate(parts_nodule_scan + parts_fp_scan).astype(int) if parts_nodule_scan
              else np.zeros(0, int)))
    counts = {"n_detected": int((~missed).sum()), "n_missed": int(missed.sum()),
              "n_false_positives": len(fp_prob), "n_marks_on_excluded": n_on_excluded,
              "n_double_hits": n_double}
    return entries, counts


def nodule_hits(mark_uid: np.ndarray, mark_xyz: np.ndarray, nodule_uid: np.ndarray, nodule_xyz: np.ndarray,
                nodule_diameter: np.ndarray) -> list:
    """For each nodule, the rows of the marks (candidates, world mm ``(M, 3)``) that hit it by the official
    rule (same scan, inside its sphere; diameters in mm as :func:`scoring_diameters` reads them); empty where
    none."""
    marks_of: dict = {}
    for row, uid in enumerate(mark_uid):
        marks_of.setdefault(uid, []).append(row)
    diameters = scoring_diameters(np.asarray(nodule_diameter, np.float64))
    hits = []
    for uid, xyz, diameter in zip(nodule_uid, np.asarray(nodule_xyz, np.float64).reshape(-1, 3), diameters):
        rows = np.asarray(marks_of.get(uid, []), int)
        inside = data.within_radius(data.squared_distances(mark_xyz[rows], xyz[None, :]), [diameter])[:, 0]
        hits.append(rows[inside])
    return hits


def best_per_nodule(hits: list, score: np.ndarray) -> np.ndarray:
    """Each nodule's highest score among the marks that hit it (:func:`nodule_hits`); -inf where none does."""
    return np.array([score[rows].max() if len(rows) else -np.inf for rows in hits], np.float64)


# --- FROC curve, CPM and bootstrap ------------------------------------------------------

def roc_points(is_positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    tp, fp, thresholds = roc_points(positive, score)
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
        tp = np.concatenate([np.zeros((b, 1)), np.cumsum(weights[:, scan_pos], axis=1)],
                            axis=1)[:, pos_before_end]
        fp = np.concatenate([np.zeros((b, 1)), np.cumsum(weights[:, scan_neg], axis=1)],
                            axis=1)[:, neg_before_end]
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


def _evaluated_scans(seriesuids: Sequence[str]) -> dict:
    """``{seriesuid: position}`` of the evaluated scan list, which must be non-empty and name each scan
    once."""
    index = {uid: i for i, uid in enumerate(seriesuids)}
    if len(index) != len(seriesuids):
        duplicated = sorted({uid for uid in seriesuids if seriesuids.count(uid) > 1})[:3]
        raise UserError(f"the seriesuid list names some scans twice (e.g. {', '.join(duplicated)})")
    if not index:
        raise UserError("the seriesuid list is empty: no scans to evaluate")
    return index


def _marks_that_count(marks: PointTable, index: dict, max_marks: int,
                      warnings: list) -> tuple[np.ndarray, dict]:
    """Rows of the marks on evaluated scans that survive the per-scan cap, and counts for the result."""
    mark_scan = _scan_indices(marks.seriesuid, index)
    known = mark_scan >= 0
    unknown_uids = list(dict.fromkeys(marks.seriesuid[~known]))
    if len(marks) and not known.any():
        raise UserError(f"none of the submission's {len(unknown_uids)} seriesuid(s) is among the "
                        f"{len(index)} evaluated scans (first: {unknown_uids[0]}, "
                        f"line {int(marks.line[0])}): wrong seriesuid list?")
    if unknown_uids:
        warnings.append(f"{int((~known).sum())} mark(s) on {len(unknown_uids)} seriesuid(s) outside the "
                        f"evaluated list were not scored (first: {unknown_uids[0]}, "
                        f"line {int(marks.line[np.argmax(~known)])})")
    keep, cap = cap_marks_per_scan(mark_scan[known], marks.value[known], len(index), max_marks)
    if cap["tie_scans"]:
        warnings.append(f"{cap['tie_scans']} scan(s) had marks tied at the {max_marks}-mark cut: all "
                        f"{cap['tie_dropped']} tied mark(s) there were dropped (the official rule)")
    counts = {"n_marks": len(marks), "n_marks_scored": int(keep.sum()), "n_marks_over_cap": cap["n_over_cap"],
              "n_scans_tied_at_cap": cap["tie_scans"], "n_marks_dropped_by_ties": cap["tie_dropped"],
              "n_marks_unknown_seriesuid": int((~known).sum()), "unknown_seriesuids": unknown_uids[:20]}
    return np.flatnonzero(known)[keep], counts


def _findings_on(table: PointTable, index: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scan position, world mm, scoring diameter)`` of the findings on evaluated scans."""
    scan = _scan_indices(table.seriesuid, index)
    rows = np.flatnonzero(scan >= 0)
    return scan[rows], table.world_xyz[rows], scoring_diameters(table.value[rows])


def score_marks(marks: PointTable, seriesuids: Sequence[str], annotations: PointTable, excluded: PointTable,
                bootstrap: int = 1000, seed: int = 0, max_marks: int = MAX_MARKS_PER_SCAN) -> dict:
    """LUNA16 FROC/CPM of ``marks`` (``value`` = probability) on the scans of ``seriesuids``.

    annotations/excluded: ``value`` = diameter in mm (see :func:`scoring_diameters`). Marks of scans outside
    the list are not scored but counted (``n_marks_unknown_seriesuid``) and named (``unknown_seriesuids``,
    first 20) with a warning. Returns a JSON-ready dict: ``cpm``, ``froc_sensitivities`` {rate: sensitivity},
    their bootstrap ``*_ci95`` bounds, a sampled ``froc_curve`` and the counts behind them.
    """
    index = _evaluated_scans(list(seriesuids))
    n_scans, warnings = len(index), []
    entries, counts, mark_counts, n_nodules = _froc_entries(marks, index, annotations, excluded, max_marks,
                                                            warnings)
    if n_nodules == 0:
        warnings.append("no annotated nodule in the evaluated scans: sensitivity and CPM are undefined")
    fp_per_scan, sensitivity, _ = froc_curve(entries, n_scans)
    at_rates = sensitivities_at(fp_per_scan, sensitivity)
    result = {
        "cpm": float(at_rates.mean()) if n_nodules else None, "fp_rates": list(FP_RATES),
        "froc_sensitivities": ({_rate_key(r): float(s) for r, s in zip(FP_RATES, at_rates)} if n_nodules
                               else None),
        "n_scans": n_scans, "n_nodules": n_nodules, **mark_counts, **counts,
        "sensitivity_all_marks": counts["n_detected"] / n_nodules if n_nodules else None,
        "froc_curve": {"fp_per_scan": CURVE_GRID.tolist(),
                       "sensitivity": np.interp(CURVE_GRID, fp_per_scan, sensitivity).tolist()},
        "warnings": warnings,
    }
    if bootstrap and n_nodules:
        _add_bootstrap_intervals(result, entries, n_scans, bootstrap, seed)
    return result


def _froc_entries(marks: PointTable, index: dict, annotations: PointTable, excluded: PointTable,
                  max_marks: int, warnings: list) -> tuple:
    """The scored marks of the scans in ``index`` matched to their nodules: entries, match counts, mark counts
    and the number of nodules."""
    kept, mark_counts = _marks_that_count(marks, index, max_marks, warnings)
    nodules = _findings_on(annotations, index)
    if (nodules[2] == 0.0).any():
        warnings.append(f"{int((nodules[2] == 0.0).sum())} nodule(s) with diameter 0 mm: "
                        f"no mark can hit them")
    entries, counts = match_marks(len(index), _scan_indices(marks.seriesuid[kept], index),
                                  marks.world_xyz[kept], marks.value[kept], *nodules,
                                  *_findings_on(excluded, index))
    return entries, counts, mark_counts, len(nodules[0])


def paired_cpm_difference(first: PointTable, second: PointTable, seriesuids: Sequence[str],
                          annotations: PointTable, excluded: PointTable, bootstrap: int = 1000,
                          seed: int = 0) -> dict:
    """CPM of ``second`` minus CPM of ``first`` on the same scans, with a paired 95% bootstrap interval: both
    submissions are scored on the same resamples of the scans, so the interval is that of the difference."""
    index = _evaluated_scans(list(seriesuids))
    cpm = {}
    for name, marks in (("first", first), ("second", second)):
        entries, _, _, n_nodules = _froc_entries(marks, index, annotations, excluded, MAX_MARKS_PER_SCAN, [])
        fp_per_scan, sensitivity, _ = froc_curve(entries, len(index))
        cpm[name] = (float(sensitivities_at(fp_per_scan, sensitivity).mean()),
                     bootstrap_froc(entries, len(index), bootstrap, seed).mean(axis=1))
    low, high = _interval((cpm["second"][1] - cpm["first"][1])[:, None])
    return {"difference": cpm["second"][0] - cpm["first"][0], "ci95": [float(low[0]), float(high[0])],
            "first": cpm["first"][0], "second": cpm["second"][0],
            "n_scans": len(index), "n_nodules": n_nodules,
            "share_of_resamples_above_zero": float(np.mean(cpm["second"][1] > cpm["first"][1]))}


def _add_bootstrap_intervals(result: dict, entries: FrocEntries, n_scans: int, bootstrap: int,
                             seed: int) -> None:
    samples = bootstrap_froc(entries, n_scans, bootstrap, seed, rates=tuple(FP_RATES) + tuple(CURVE_GRID))
    at_rates, curve = samples[:, :len(FP_RATES)], samples[:, len(FP_RATES):]
    cpm = at_rates.mean(axis=1)
    low, high = _interval(np.column_stack([at_rates, cpm]))
    result.update({
        "bootstrap": {"resamples": bootstrap, "seed": seed, "cpm_mean": float(cpm.mean())},
        "cpm_ci95": [float(low[-1]), float(high[-1])],
        "froc_sensitivities_ci95": {_rate_key(r): [float(lo), float(hi)]
                                    for r, lo, hi in zip(FP_RATES, low[:-1], high[:-1])},
    })
    curve_low, curve_high = _interval(curve)
    result["froc_curve"].update(ci95_low=curve_low.tolist(), ci95_high=curve_high.tolist())


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


# --- which scans count ---------------------------------------------------------------------

ALL_SUBSETS = set(range(10))


@dataclass
class ScanCheck:
    """The scans of evaluated subsets: ``found`` ``{seriesuid: .mhd path}`` on disk, ``missing``
    ``{seriesuid: the file that records it}`` (kept only with ``allow_missing``) and ``warnings``."""
    found: dict
    missing: dict
    warnings: list


def _recorded_by_extract(work_dir: Path, subset: int) -> tuple[Optional[Path], list]:
    """``(manifest path, scans it records)`` of a subset's patch cache; ``(None, [])`` when it has none."""
    import json
    path = data.subset_dir(work_dir, subset) / "manifest.json"
    if not path.is_file():
        return None, []
    try:
        return path, data.recorded_scans(json.loads(path.read_text()))
    except (ValueError, AttributeError) as err:
        raise UserError(f"{path}: unreadable extract manifest ({err}); "
                        f"run extract --subsets {subset} again") from None


def _missing_message(missing: dict, subsets: Sequence[int], data_dir: Path) -> str:
    """Every missing scan, one a line with the file that records it, and what to do."""
    listed = "\n  ".join(f"{uid} (recorded in {where})" for uid, where in missing.items())
    return (f"{len(missing)} scan(s) of subset(s) {common.format_subsets(subsets)} are missing from "
            f"{data_dir}:\n  {listed}\nrestore them (or fix --data-dir); evaluate --allow-missing keeps them "
            f"in the FROC with their nodules counted as missed")


def check_scans(data_dir, subsets: Sequence[int], work_dir=None, allow_missing: bool = False) -> ScanCheck:
    """Account for every scan of the evaluated ``subsets``. A scan is missing when the subset's extract
    manifest (``W/patches/subset<k>/manifest.json``, with ``work_dir``) records it, or, with all ten subsets
    evaluated, the data folder's ``seriesuids.csv`` lists it, but its subset folder does not hold it. Missing
    scans are refused (UserError naming each) unless ``allow_missing``: then they are returned, to stay in the
    FROC (their nodules missed), with a warning naming them. A subset without a manifest gets a warning that
    it could not be checked."""
    data_dir = Path(data_dir)
    found = data.subset_scans(data_dir, subsets)
    missing, warnings = {}, []
    for k in subsets if work_dir is not None else ():
        path, recorded = _recorded_by_extract(Path(work_dir), k)
        if path is None:
            warnings.append(f"subset {k} has no extract manifest "
                            f"({data.subset_dir(work_dir, k) / 'manifest.json'}): a scan missing from "
                            f"{data_dir / f'subset{k}'} could not be noticed")
        missing.update((uid, str(path)) for uid in recorded if uid not in found and uid not in missing)
    listing = data_dir / "seriesuids.csv"
    if ALL_SUBSETS <= set(subsets) and listing.is_file():
        missing.update((uid, str(listing)) for uid in data.read_seriesuids(listing)
                       if uid not in found and uid not in missing)
    if missing and not allow_missing:
        raise UserError(_missing_message(missing, subsets, data_dir))
    if missing:
        warnings.append(f"{len(missing)} scan(s) missing from {data_dir} stay in the FROC (--allow-missing), "
                        f"with no candidate scored: {', '.join(missing)}")
    return ScanCheck(found, missing, warnings)


def submission_scans(data_dir, subsets: Optional[Sequence[int]], seriesuids=None, work_dir=None,
                     allow_missing: bool = False) -> tuple:
    """The scans a submission is scored over, and warnings: ``seriesuids`` (a file) when given, else the scans
    of ``subsets`` (:func:`check_scans`: those on disk, and with ``allow_missing`` the missing ones), else the
    data folder's ``seriesuids.csv``."""
    if seriesuids is not None:
        return seriesuids, []
    if not subsets:
        return Path(data_dir) / "seriesuids.csv", []
    check = check_scans(data_dir, subsets, work_dir, allow_missing)
    return list(check.found) + list(check.missing), check.warnings


# --- scoring files -------------------------------------------------------------------------

def score_submission(submission, annotations, excluded, seriesuids: Union[Path, str, Sequence[str]],
                     json_out: Optional[Path] = None, figure: Optional[Path] = None,
                     bootstrap: int = 1000, seed: int = 0, warnings: Sequence[str] = ()) -> dict:
    """Score a LUNA16 submission CSV; see :func:`score_marks` for the result.

    seriesuids: a file (one uid per line) or the uids themselves: the scans that count, whose number
    divides the false positives. ``warnings`` (say, :func:`submission_scans`'s) lead the result's own.
    Writes the result to ``json_out`` and the FROC plot to ``figure`` (atomically) when given.
    """
    if isinstance(seriesuids, (str, Path)):
        seriesuids = data.read_seriesuids(seriesuids)
    marks = read_submission(submission)
    result = score_marks(marks, seriesuids, read_findings(annotations), read_findings(excluded),
                         bootstrap=bootstrap, seed=seed)
    result["submission"] = str(submission)
    result["warnings"] = list(warnings) + result["warnings"]
    if json_out is not None:
        common.atomic_write_json(json_out, result)
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
    common.atomic_save_figure(fig, path)


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


def print_froc(console, result: dict, title: str, warnings: Optional[list] = None) -> None:
    """The warnings, the FROC table and the counts behind it, on a rich console."""
    for warning in result["warnings"] if warnings is None else warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(froc_table(result, title=title))
    console.print(froc_summary_line(result))


def froc_summary_line(result: dict) -> str:
    """One line with the counts behind the FROC."""
    return (f"{result['n_scans']} scans, {result['n_nodules']} nodules ({result['n_detected']} hit, "
            f"{result['n_missed']} missed); {result['n_marks']} marks, {result['n_marks_scored']} scored "
            f"({result['n_marks_over_cap']} over the {MAX_MARKS_PER_SCAN}-per-scan cap), "
            f"{result['n_false_positives']} false positives, {result['n_marks_on_excluded']} on excluded "
            f"findings, {result['n_double_hits']} double hits")
