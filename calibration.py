"""Calibrated probabilities and validated operating points.

Calibration (prior shift). Training draws nodules ``positive_share`` of the time (``--positive-share``,
default 0.5), while a candidate list holds far fewer of them. A head that is calibrated on its training draws
gives probabilities at that share; Bayes' rule moves them to the prior ``pi`` of a candidate list by a shift
of the logit (natural log of the odds)::

    logit_cal = logit - log(share / (1 - share)) + log(pi / (1 - pi))

Checkpoints record both (``calibration``: ``positive_share``, ``prior`` and ``prior_source``). The prior is
the share of nodule candidates (class 1) among all rows of the candidate file on the training scans, from the
per-scan counts ``extract`` writes into each subset's manifest (the whole list, not the extracted sample). The
calibrated probability is that of a candidate drawn from that list; for points of another source (``detect``,
``--coord``) it still uses the training list's prior, and outputs say so. The shift is the same for every
candidate, so rankings, the AUC and the FROC/CPM do not change; the raw score is kept beside it.

Expected calibration error (ECE): the probabilities fall into ``ECE_BINS`` (10) equal-width bins over [0, 1];
ECE = sum over the bins of ``(n_bin / N) * |mean probability in the bin - share of nodules in the bin|``.

Operating point. A cutoff is a raw logit: the head's output before any calibration (for several views, the
logit of the mean probability over the views), compared as ``logit >= cutoff``. Validation chooses it per
nodule, for each number of views in :data:`STORED_VIEWS` (and the run's own); :func:`resolve_cutoff` picks the
one that applies, or refuses a number of views without one.

Screening in stages. For each stored number of views ``v`` above one, validation also stores screening
cutoffs (:func:`screening_cutoffs`): for each smaller stored number ``k``, the lowest score over the first
``k`` views (a prefix of the ``v``) of a validation candidate whose score at ``v`` views reaches their cutoff.
``predict --scan`` without points scores every detected candidate at one view, then adds views in stages (to
2, 4, then 8): after each, a candidate goes on only where its score so far reaches that stage's screening
cutoff less a margin (:func:`stored_screens`). The margin is at least :data:`SCREEN_MARGIN` (2 logits: on a
real chest CT, a phantom-trained model put one candidate above the 8-view cutoff whose one-view score was 1.1
logits below the validated screening cutoff), and as far as that screening cutoff lies below the cutoff when
that is more: a model whose views disagree more on validation is screened more widely.
"""
from __future__ import annotations

import common
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from common import UserError

STORED_VIEWS = (1, 2, 4, 8)   # view counts whose cutoff validation stores (besides the run's own)
# Logits below the validated screening cutoff at which predict screens (odds / 7.4): on new scans the one-view
# and full-view scores of a candidate differ more than on validation ones.
SCREEN_MARGIN = 2.0
ECE_BINS = 10


# probabilities are clipped to [LOGIT_EPS, 1 - LOGIT_EPS] before their logit (so |logit| <= 27.7)
LOGIT_EPS = 1e-12


def logit(probability) -> np.ndarray:
    """Natural log of the odds of probabilities, float64, clipped to :data:`LOGIT_EPS` (one function for
    validation, evaluation and prediction, so that a score equal to a cutoff compares equal)."""
    p = np.clip(np.asarray(probability, np.float64), LOGIT_EPS, 1.0 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(logits) -> np.ndarray:
    """``1 / (1 + exp(-logit))`` in float64, without overflow warnings."""
    x = np.asarray(logits, np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def prior_shift(logits, positive_share: float, prior: float) -> np.ndarray:
    """Logits of a model trained at ``positive_share`` nodules, moved to a population of ``prior`` nodules."""
    return np.asarray(logits, np.float64) - math.log(positive_share / (1.0 - positive_share)) \
        + math.log(prior / (1.0 - prior))


def has_prior(calibration: Optional[dict]) -> bool:
    """Whether a checkpoint's ``calibration`` record can calibrate (a prior strictly between 0 and 1)."""
    return bool(calibration) and calibration.get("prior") is not None and 0.0 < calibration["prior"] < 1.0


def calibrated_probability(probability, calibration: Optional[dict]) -> Optional[np.ndarray]:
    """Raw probabilities -> probabilities at the checkpoint's recorded prior (None without one)."""
    if not has_prior(calibration):
        return None
    return sigmoid(prior_shift(logit(probability), calibration["positive_share"], calibration["prior"]))


def calibration_note(calibration: Optional[dict], points: str = "") -> str:
    """Where a checkpoint's calibrated probability comes from (or why there is none); ``points``: the source
    of the scored points when it is not the training candidate list (e.g. ``"detect"``, ``"--coord"``)."""
    if not has_prior(calibration):
        why = (calibration or {}).get("note") or "the checkpoint records no candidate prior (made before it)"
        return f"no calibrated probability: {why}"
    text = (f"calibrated from the training share {calibration['positive_share']:g} to the prior "
            f"{calibration['prior']:.4g} of {calibration['prior_source']}")
    return text + (f"; these points come from {points}, so this is the training list's prior, not theirs"
                   if points else "")


# --- reliability ------------------------------------------------------------------------------------

def reliability(labels, probability, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over ``bins`` equal-width bins of [0, 1], with each bin's count, mean
    probability and nodule share (None where empty), the mean probability and the nodule rate."""
    labels = np.asarray(labels, np.float64)
    p = np.asarray(probability, np.float64)
    where = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = where == b
        n = int(inside.sum())
        mean_p = float(p[inside].mean()) if n else None
        rate = float(labels[inside].mean()) if n else None
        ece += n / len(p) * abs(mean_p - rate) if n else 0.0
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": n, "mean_probability": mean_p,
                     "nodule_rate": rate})
    return {"ece": ece if len(p) else None, "bins": bins, "n": int(len(p)),
            "mean_probability": float(p.mean()) if len(p) else None,
            "nodule_rate": float(labels.mean()) if len(p) else None, "per_bin": rows}


def plot_reliability(path: Path, curves: Dict[str, dict], title: str = "") -> None:
    """Reliability diagram: per bin, the nodule share against the mean probability, one line per
    :func:`reliability` result in ``curves`` (legend: its ECE), and the diagonal of perfect calibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    for (name, found), marker in zip(curves.items(), ("o", "s")):
        shown = [row for row in found["per_bin"] if row["n"]]
        ax.plot([row["mean_probability"] for row in shown], [row["nodule_rate"] for row in shown],
                marker=marker,
                label=f"{name} (ECE {found['ece']:.4f})" if found["ece"] is not None else name)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"mean probability ({ECE_BINS} equal-width bins)",
           ylabel="share of nodules", title=f"Calibration {title}".strip())
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    common.atomic_save_figure(fig, path)


# --- operating points ----------------------------------------------------------------------------------

def cutoff_for_nodules(best_scores, target: float = 0.9) -> Tuple[Optional[float], float]:
    """``(cutoff, sensitivity)``: the highest threshold at which at least ``target`` of the nodules have a
    candidate scoring at or above it. ``best_scores``: each nodule's highest candidate score (-inf: no
    candidate, a nodule missed at any threshold). When no threshold reaches ``target``, the lowest score of a
    nodule with a candidate (its sensitivity below ``target``); None when no nodule has one."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    best = np.sort(np.asarray(best_scores, np.float64))[::-1]
    found = best[np.isfinite(best)]
    if len(found) == 0:
        return None, 0.0
    needed = max(int(math.ceil(target * len(best) - 1e-9)), 1)
    cutoff = float(best[needed - 1]) if needed <= len(found) else float(found[-1])
    return cutoff, float((best >= cutoff).sum() / len(best))


def view_counts(own: int, available: int) -> Tuple[int, ...]:
    """The view counts whose cutoffs validation stores for a run validated at ``own`` views: those of
    :data:`STORED_VIEWS` up to the ``available`` views (8 flips for fine-tuning, the cached ones for a head),
    and ``own``."""
    return tuple(sorted({v for v in STORED_VIEWS if v <= available} | {int(own)}))


def screening_cutoffs(view_logits: Dict[int, np.ndarray], cutoffs: Dict[int, Optional[float]]
                      ) -> Dict[str, Dict[str, Optional[float]]]:
    """For each view count ``v > 1`` with a cutoff, and each smaller one ``k`` in ``view_logits``: the lowest
    ``k``-view logit among the validation candidates that ``v`` views put at or above their cutoff (None when
    none is), ``{"v": {"k": logit}}``, so that screening candidates after their first ``k`` views against it
    loses none of them on validation. ``view_logits``: ``{views: logits}`` of the same candidates in the same
    order (``k`` views being the first ``k`` of any larger number); without one view among them, none."""
    screens: Dict[str, Dict[str, Optional[float]]] = {}
    if 1 not in view_logits:
        return screens
    for views, logits in sorted(view_logits.items()):
        if views == 1 or cutoffs.get(views) is None:
            continue
        above = np.asarray(logits) >= cutoffs[views]
        screens[str(views)] = {str(k): float(np.asarray(view_logits[k])[above].min()) if above.any() else None
                               for k in sorted(view_logits) if k < views}
    return screens


def stored_screens(meta: dict, views: int) -> List[Tuple[int, float]]:
    """The stages ``[(k, logit)]`` (``k`` ascending, below ``views``) at which to screen candidates for
    ``views`` views: after its first ``k`` views a candidate goes on only where its score reaches ``logit``,
    the screening cutoff validation chose (:func:`screening_cutoffs`) less a margin, the larger of
    :data:`SCREEN_MARGIN` and that cutoff's distance below the cutoff for ``views`` views. Empty for one view,
    for checkpoints made before screening cutoffs, and where validation put no candidate above the cutoff.
    A checkpoint made before staged screening stores the one-view stage only (``screen_logits``).

    The distance measures how far ``k`` views can fall short of the full views for this model. On a real
    chest CT, a model whose one-view screening logit was 7.3 logits below its cutoff put a candidate above the
    cutoff whose one-view score was 2.7 logits below that screening logit: a margin of 2 lost it
    (BENCHMARKS)."""
    point = meta.get("operating_point") or {}
    stages = (point.get("screen_stages") or {}).get(str(views))
    if stages is None and (point.get("screen_logits") or {}).get(str(views)) is not None:
        stages = {"1": point["screen_logits"][str(views)]}
    cutoff = (point.get("cutoff_logits") or {}).get(str(views))
    if views == 1 or not stages or cutoff is None or any(s is None for s in stages.values()):
        return []
    return [(int(k), float(screen) - max(SCREEN_MARGIN, float(cutoff) - float(screen)))
            for k, screen in sorted(stages.items(), key=lambda item: int(item[0])) if int(k) < views]


@dataclass
class Cutoff:
    """The cutoff that applies (a raw logit; None: none applies), where it comes from, and whether validation
    chose it for exactly this model and number of views."""
    logit: Optional[float]
    source: str
    validated: bool


def stored_cutoffs(meta: dict) -> Tuple[Dict[int, float], str]:
    """``({views: cutoff logit}, how they were chosen)`` of a checkpoint's meta. A checkpoint made before
    per-nodule cutoffs has one probability ``cutoff``, chosen per candidate patch at its own views."""
    point = meta.get("operating_point")
    if point:
        basis = "nodules" if point.get("basis") == "nodule" else "nodule candidates (patches)"
        return ({int(v): float(c) for v, c in point["cutoff_logits"].items() if c is not None},
                f"chosen on validation for {point['target_sensitivity']:.0%} of the validation {basis}")
    if meta.get("cutoff") is not None:
        views = int(meta.get("views", 1))
        return ({views: float(logit(meta["cutoff"]))},
                f"an older checkpoint's probability cutoff {meta['cutoff']:.4g}, chosen per candidate patch "
                f"at {views} view(s)")
    return {}, "none stored"


def resolve_cutoff(meta: dict, views: int, given: Optional[float] = None, strict: bool = True,
                   name: str = "the checkpoint") -> Cutoff:
    """The cutoff for scoring with ``views`` views: ``given`` (``--cutoff``, a raw logit) when set, else the
    stored one for that number of views. A checkpoint that stores cutoffs, but none for ``views``, is refused
    (UserError naming the stored counts) when ``strict``; otherwise, and without any stored cutoff, the result
    has no cutoff."""
    if given is not None:
        if not math.isfinite(given):
            raise UserError(f"--cutoff must be a finite raw logit, got {given}")
        return Cutoff(float(given), "--cutoff (a raw logit given, not validated here)", False)
    cutoffs, how = stored_cutoffs(meta)
    if views in cutoffs:
        return Cutoff(cutoffs[views], f"{name}'s cutoff for {views} view(s), {how}", True)
    if not cutoffs:
        return Cutoff(None, f"{name} stores no validated cutoff", False)
    stored = ", ".join(map(str, sorted(cutoffs)))
    if strict:
        raise UserError(f"--views {views}: {name} has validated cutoffs for {stored} view(s) only; use "
                        f"--views {stored.replace(', ', ' or ')}, or give --cutoff LOGIT (a raw logit)")
    return Cutoff(None, f"no cutoff validated for {views} view(s) ({name} has {stored})", False)


def mean_cutoff(cutoffs: Sequence[Cutoff]) -> Cutoff:
    """Several models' cutoffs averaged: a number no data has validated for their averaged probability."""
    if any(c.logit is None for c in cutoffs):
        return Cutoff(None, "a model without a validated cutoff", False)
    return Cutoff(float(np.mean([c.logit for c in cutoffs])),
                  f"UNVALIDATED: the mean of {len(cutoffs)} checkpoints' cutoffs, which no data has chosen "
                  f"for their average; give --cutoff, or use predict --ensemble NAME of a crossval", False)
