"""Predictions for a new scan: is the candidate at a world point a nodule that needs follow-up?

Points are world mm ``(x, y, z)``: ITK/LPS physical points, as in the LUNA16 CSVs and as DICOM viewers
report patient coordinates (ImagePositionPatient). The scan is an ``.mhd``/``.mha``, a NIfTI file or a
DICOM series folder; it is read once, and each point's patch is resampled with the checkpoint's
``patch_size`` and ``spacing_mm``.

Size and follow-up category: each point gets two diameters. The model's (``model_diameter_mm``), from the
size output of checkpoints that have one (learned from the annotations' diameters; several checkpoints:
the mean log-diameter of those with one), and a plain measurement (``plain_diameter_mm``,
:func:`sizing.measure_diameters`) on the patch already cut for the model, no second read of the scan: the
equivalent-sphere diameter of the object at the point, at -400 HU for ``nodule_type`` solid and -650 HU for
part-solid and ground-glass (their whole extent; see sizing.py). The object must fit in the patch: up to
about ``(patch_size - 4) * spacing_mm`` across (:func:`largest_measurable_mm`: 28 mm for 32^3 at 1 mm, 60 mm
for 64^3 at 1 mm); larger ones, and objects that cannot be cut off vessels or the chest wall, are not
measurable (None). ``diameter_mm`` is the model's where it has a size output, else the plain measurement
(``size_source`` says which). Points at or above the cutoff get :func:`followup.follow_up`'s category and
recommendation for that diameter, or ``"size unknown"`` with a request to measure by hand (never a guess);
"multiple nodules" means more than one point of the call at or above the cutoff.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

import calibration
import common
import data
import detect
import followup
import head
import options as options_mod
import sizing
from common import UserError
from detect import scan_name

# HU at a candidate's centre that no lung nodule has: below, air outside the body or in an airway;
# above, bone or metal. (Calcified nodules reach a few hundred HU, so the upper bound is generous.)
PLAUSIBLE_HU = (-950.0, 500.0)
CENTRE_MM = 3  # side of the cube (in patch voxels) averaged for the HU at the point
# The size and follow-up columns come after the first seven, and the calibration and cutoff columns after
# those, so readers of the older files keep working. probability: the raw score (the models' mean);
# calibrated_probability: at the checkpoints' recorded candidate prior (calibration.py; empty without one);
# logit: the raw score's logit, compared with cutoff_logit; cutoff_source: where the cutoff comes from (and
# whether any data validated it); calibration_note: where the prior comes from.
OUTPUT_COLUMNS = ("coordX", "coordY", "coordZ", "probability", "follow_up", "hu_at_point", "warning",
                  "diameter_mm", "size_source", "guideline", "category", "recommendation",
                  "model_diameter_mm", "plain_diameter_mm", "calibrated_probability", "logit", "cutoff_logit",
                  "cutoff_source", "calibration_note", "scan")
NO_CUTOFF = "no validated cutoff stored: a raw probability of 0.5 (logit 0), UNVALIDATED"
SIZE_FROM_MODEL = "model"                      # the checkpoint's size output
SIZE_FROM_PLAIN = "plain measurement"          # sizing.py, for checkpoints without a size output
# HU threshold of the plain diameter by nodule type (sizing.py): halfway between aerated lung and soft tissue
# for solid nodules; halfway between lung and ground glass for subsolid ones (their whole extent: the total
# size, which both guidelines take for part-solid nodules). -400 HU misses most of a ground-glass nodule.
SIZE_THRESHOLD_HU = {"solid": -400.0, "part-solid": -650.0, "ground-glass": -650.0}
SIZE_UNKNOWN = "size unknown"
# Not measurable: nothing at the point, too large for the patch, or not separable from vessels or the
# chest wall.
MEASURE_BY_HAND = "Measure the nodule by hand, then apply the guideline to that diameter."
GUIDELINE_NAMES = {"fleischner": "Fleischner 2017", "lung-rads": "Lung-RADS v2022"}


def parse_coordinate(text: str) -> tuple:
    """``"X,Y,Z"`` in world mm -> ``(x, y, z)`` floats."""
    try:
        values = tuple(float(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise UserError(f"--coord takes three world mm numbers X,Y,Z, got {text!r}")
    return values


def read_scan_points(path, scan_name: str = "") -> np.ndarray:
    """World mm points ``(N, 3)`` from a CSV with ``coordX,coordY,coordZ`` columns; when a ``seriesuid``
    column names several scans, only the rows of ``scan_name``. Bad rows refuse the file, naming their
    lines."""
    table, _ = data.read_point_csv(path, None, need_uid=False)
    if len(set(table.seriesuid)) > 1:
        mine = table.seriesuid == scan_name
        if not mine.any():
            raise UserError(f"{path} lists points of {len(set(table.seriesuid))} scans and none of scan "
                            f"{scan_name!r}")
        table = table.take(np.flatnonzero(mine))
    if len(table) == 0:
        raise UserError(f"{path}: no points")
    return table.world_xyz


def _point_warning(inside: bool, hu: float) -> str:
    if not inside:
        return "outside the scan"
    if hu < PLAUSIBLE_HU[0]:
        return f"HU {hu:.0f}: air (outside the body or in an airway), not lung tissue"
    if hu > PLAUSIBLE_HU[1]:
        return f"HU {hu:.0f}: bone or metal density"
    return ""


def load_models(checkpoints, device, compile: bool = False) -> list[tuple]:
    """``[(path, model, meta)]`` of one checkpoint or a list, encoders compiled with ``compile``
    (``head.compile_encoder``); all must share the patch geometry (patch_size, spacing_mm), which UserError
    names otherwise."""
    paths = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    if not paths:
        raise UserError("give at least one --model")
    models = [(path, *head.load_classifier(path, device=device, compile=compile)) for path in paths]
    first, _, first_meta = models[0]
    a = first_meta["preprocess"]
    for path, _, meta in models[1:]:
        b = meta["preprocess"]
        if int(a["patch_size"]) != int(b["patch_size"]) or not math.isclose(float(a["spacing_mm"]),
                                                                            float(b["spacing_mm"])):
            raise UserError(f"--model {path} takes patches of {b['patch_size']} voxels at "
                            f"{b['spacing_mm']} mm, --model {first} of {a['patch_size']} voxels at "
                            f"{a['spacing_mm']} mm; the models averaged must share the patch size "
                            f"and spacing")
    return models


@dataclass
class ModelSet:
    """What predict applies: ``models`` ``[(path, model, meta)]``, each one's number of views, and the cutoff
    (a raw logit for the logit of the models' mean raw probability) with its source."""
    models: list
    views: list
    cutoff: calibration.Cutoff


def read_ensemble(folder: Path) -> dict:
    """A cross-validation's ``operating_point.json`` (``crossval.write_operating_point``): its folds'
    checkpoints, the views they were evaluated with and the cutoff chosen on their pooled out-of-fold scores.
    """
    path = Path(folder) / "operating_point.json"
    if not path.is_file():
        raise UserError(f"--ensemble: {path} not found; run (or finish) `python luna_cli.py crossval --name "
                        f"{Path(folder).name}` first")
    return json.loads(path.read_text())


def _ensemble_set(folder: Path, device, views: Optional[int], cutoff: Optional[float],
                  compile: bool = False) -> ModelSet:
    """The folds of a crossval folder (``W/crossval/NAME``; their runs ``W/runs/<run>``) at its operating
    point, or at ``cutoff``; another number of views than the operating point's needs ``cutoff``."""
    point, name = read_ensemble(folder), Path(folder).name
    runs = Path(folder).parent.parent / "runs"
    models = load_models([runs / run / "best.pt" for run in point["runs"]], device, compile)
    used = views or point["views"]
    if used is None or (cutoff is None and point["cutoff_logit"] is None):
        raise UserError(f"--ensemble {name}: its operating point has no single cutoff (no nodule with a "
                        f"candidate, or folds evaluated with other views); give --views and --cutoff LOGIT")
    if cutoff is not None:
        return ModelSet(models, [used] * len(models), calibration.resolve_cutoff({}, used, cutoff))
    if used != point["views"]:
        raise UserError(f"--views {views}: cross-validation {name}'s operating point was chosen at "
                        f"{point['views']} view(s); use --views {point['views']}, or give --cutoff LOGIT "
                        f"(a raw logit)")
    source = (f"cross-validation {name}'s operating point: chosen for {point['target_sensitivity']:.0%} of "
              f"its nodules on the pooled out-of-fold scores at {used} view(s), an approximation for the "
              f"average of its {len(models)} folds")
    return ModelSet(models, [used] * len(models), calibration.Cutoff(point["cutoff_logit"], source, True))


def resolve_models(checkpoint, device, views: Optional[int] = None, cutoff: Optional[float] = None,
                   ensemble: Optional[Path] = None, compile: bool = False) -> ModelSet:
    """The models and the cutoff of a prediction: a crossval folder's folds and operating point
    (``ensemble``), else one checkpoint or a list (each with ``views`` or its own, and its validated cutoff
    for them: a number of views without one is refused). ``cutoff`` (a raw logit) replaces the validated one.
    Several checkpoints without ``cutoff`` get the mean of their cutoffs, marked unvalidated; a checkpoint
    without any a raw 0.5, the same."""
    if ensemble is not None:
        if checkpoint:
            raise UserError("give either --ensemble NAME or --model, not both")
        return _ensemble_set(ensemble, device, views, cutoff, compile)
    models = load_models(checkpoint, device, compile)
    used = [head.check_views(views or meta.get("views", 1)) for _, _, meta in models]
    cutoffs = [calibration.resolve_cutoff(meta, v, cutoff, name=str(path))
               for (path, _, meta), v in zip(models, used)]
    chosen = cutoffs[0] if len(cutoffs) == 1 or cutoff is not None else calibration.mean_cutoff(cutoffs)
    if chosen.logit is None:
        chosen = calibration.Cutoff(0.0, NO_CUTOFF, False)
    return ModelSet(models, used, chosen)


def largest_measurable_mm(patch_size: int, spacing_mm: float) -> float:
    """About the largest diameter (mm) sizing.py can measure in a patch: the object must stay inside the ball
    of radius ``patch_size // 2 - 2`` voxels (off the rim of its mask ball), so
    ``(patch_size - 4) * spacing_mm``."""
    return (2 * (int(patch_size) // 2) - 4) * float(spacing_mm)


def _size_assumptions(options: tuple, n_follow_up: int, n_points: int, threshold_hu: float,
                      largest_mm: float) -> tuple:
    """What the size and category of a call assume: the diameter's source, nodule type, risk, number of
    nodules, then followup's own notes (those of type and risk replaced by ones naming the options)."""
    guideline, nodule_type, risk = options
    multiple = n_follow_up > 1
    # same for any diameter
    notes = followup.follow_up(0.0, guideline, nodule_type, risk, multiple).assumptions
    return (f"plain diameter: the equivalent-sphere diameter of the voxels >= {threshold_hu:.0f} HU at the "
            f"point (sizing.py), up to about {largest_mm:.0f} mm (the patch)",
            f"nodule type assumed {nodule_type} (not measured; solid unless --type is given)",
            f"patient risk assumed {risk} (low unless --risk is given)" if guideline == "fleischner"
            else "patient risk not used by Lung-RADS",
            f"number of nodules: {n_follow_up} of the {n_points} point(s) of this call at or above the "
            f"cutoff ({'multiple' if multiple else 'single'})",
            *(n for n in notes if not n.startswith(("nodule type assumed", "patient risk assumed"))))


def _none_if_nan(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


def size_and_follow_up(patches: np.ndarray, spacing_mm: float, follow_ups: Sequence[bool],
                       guideline: str = "fleischner", nodule_type: str = "solid", risk: str = "low",
                       model_diameters: Optional[np.ndarray] = None) -> list[dict]:
    """Per patch ``(N, P, P, P)`` (int16 HU, the candidate at the centre): ``model_diameter_mm`` (from
    ``model_diameters``, mm, None without), ``plain_diameter_mm`` (the plain measurement, None where not
    measurable), ``diameter_mm`` (the model's when given, else the plain one) and its ``size_source``,
    ``guideline``, and for ``follow_ups`` True the ``category`` and ``recommendation`` of
    :func:`followup.follow_up` ("size unknown" and a request to measure by hand when no diameter; ""
    otherwise); ``assumptions`` (the call's). Multiple nodules: more than one follow-up True."""
    options = followup.check_options(guideline, nodule_type, risk)
    threshold = SIZE_THRESHOLD_HU[options[1]]
    plain = sizing.measure_diameters(patches, spacing_mm, threshold) if len(patches) else np.zeros(0)
    learned = (np.full(len(plain), np.nan) if model_diameters is None
               else np.asarray(model_diameters, np.float64))
    source = SIZE_FROM_MODEL if model_diameters is not None else SIZE_FROM_PLAIN
    diameters = learned if model_diameters is not None else plain
    follow_ups = [bool(f) for f in follow_ups]
    multiple = sum(follow_ups) > 1
    assumptions = _size_assumptions(options, sum(follow_ups), len(follow_ups), threshold,
                                    largest_measurable_mm(np.shape(patches)[-1], spacing_mm))
    rows = []
    for diameter, yes in zip(diameters.tolist(), follow_ups):
        measured = math.isfinite(diameter)
        category, recommendation = ("", "") if not yes else (SIZE_UNKNOWN, MEASURE_BY_HAND)
        if yes and measured:
            answer = followup.follow_up(diameter, *options, multiple=multiple)
            category, recommendation = answer.category, answer.recommendation
        rows.append({"diameter_mm": diameter if measured else None, "size_source": source,
                     "guideline": options[0], "category": category, "recommendation": recommendation,
                     "assumptions": assumptions, "model_diameter_mm": _none_if_nan(learned[len(rows)]),
                     "plain_diameter_mm": _none_if_nan(plain[len(rows)])})
    return rows


def predict_points(checkpoint, scan_path, world_xyz, device: str = "auto", batch_size: int = 64,
                   views: Optional[int] = None, precision: str = "auto", *, guideline: str = "fleischner",
                   nodule_type: str = "solid", risk: str = "low", cutoff: Optional[float] = None,
                   ensemble: Optional[Path] = None, points: str = "") -> list[dict]:
    """Probability of a nodule at each world mm point ``(N, 3)`` (x, y, z) of one scan (a path, or a
    data.CTScan already read).

    ``checkpoint``: one checkpoint, a list of them (say the models of a cross-validation's folds, whose
    probabilities are averaged: the scan is read and the patches cut once, each model applies its own HU
    window and views), or a :class:`ModelSet` already resolved; ``ensemble``: a crossval folder instead
    (:func:`resolve_models`: which cutoff applies, ``cutoff`` a raw logit replacing it). ``views``: flips
    averaged per patch (default: those each checkpoint was validated with). ``points``: where the points come
    from, for the calibration note (e.g. ``"detect"``). Returns one dict per point: ``coordX/Y/Z`` (mm),
    ``probability`` (raw, float64), ``calibrated_probability`` (at the recorded candidate prior; None without
    one), ``logit`` (of the raw probability), ``follow_up`` (``logit >= cutoff``), ``cutoff`` (raw logit) with
    ``cutoff_source``, ``calibration_note``, ``hu_at_point`` (mean HU of the central 3 x 3 x 3 patch voxels)
    and ``warning`` ("" or why the point is implausible: outside the scan, air, bone); then the keys of
    :func:`size_and_follow_up` (``diameter_mm``, ``size_source``, ``guideline``, ``category``,
    ``recommendation``, ``assumptions``) for ``guideline``/``nodule_type``/``risk`` (see followup.py), whose
    bad values raise UserError before anything is read.
    """
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    if world_xyz.shape[1:] != (3,) or len(world_xyz) == 0:
        raise ValueError(f"world_xyz must have shape (N, 3) with N >= 1, got {world_xyz.shape}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    options = dict(zip(("guideline", "nodule_type", "risk"),
                       followup.check_options(guideline, nodule_type, risk)))
    torch_device = head.resolve_device(device)
    chosen = checkpoint if isinstance(checkpoint, ModelSet) else \
        resolve_models(checkpoint, torch_device, views, cutoff, ensemble)
    scan, patches = _scan_and_patches(scan_path, world_xyz, chosen.models[0][2]["preprocess"])
    outputs = _model_outputs(chosen, patches, torch_device, batch_size, precision)
    return _point_rows(chosen, scan, world_xyz, patches, outputs, options, points)


def _point_rows(chosen: ModelSet, scan: data.CTScan, world_xyz: np.ndarray, patches: np.ndarray,
                outputs: tuple, options: dict, points: str) -> list[dict]:
    """:func:`predict_points`' rows of points whose patches the models scored (``outputs`` of
    :func:`_model_outputs`)."""
    probability, calibrated, model_diameters = outputs
    preprocess = chosen.models[0][2]["preprocess"]
    logits = calibration.logit(probability)
    lo = int(preprocess["patch_size"]) // 2 - CENTRE_MM // 2
    hu_at_point = (patches[:, lo:lo + CENTRE_MM, lo:lo + CENTRE_MM, lo:lo + CENTRE_MM]
                   .reshape(len(patches), -1).mean(1))
    inside = data.inside_scan(scan, world_xyz)
    follow_up = logits >= chosen.cutoff.logit
    sizes = size_and_follow_up(patches, float(preprocess["spacing_mm"]), follow_up, **options,
                               model_diameters=model_diameters)
    shared = {"cutoff": chosen.cutoff.logit, "cutoff_source": chosen.cutoff.source,
              "calibration_note": _calibration_note(chosen, points), "n_models": len(chosen.models)}
    calibrated = [None] * len(probability) if calibrated is None else calibrated.tolist()
    return [{"coordX": float(x), "coordY": float(y), "coordZ": float(z), "probability": float(p),
             "calibrated_probability": c, "logit": float(logit), "follow_up": bool(yes),
             "hu_at_point": float(h) if ok else None, "warning": _point_warning(bool(ok), float(h)),
             **shared, **size}
            for (x, y, z), p, c, logit, yes, h, ok, size in zip(
                world_xyz.tolist(), probability, calibrated, logits, follow_up, hu_at_point, inside, sizes)]


def screening_stages(chosen: ModelSet) -> List[Tuple[int, float]]:
    """The stages ``[(views so far, logit)]`` that screen detected candidates for ``chosen``'s full views
    (``calibration.stored_screens``): for one model scored at more than one view against the cutoff its
    validation chose; none otherwise (several models, one view, ``--cutoff``, older checkpoints)."""
    if len(chosen.models) != 1 or chosen.views[0] == 1:
        return []
    meta = chosen.models[0][2]
    own = calibration.resolve_cutoff(meta, chosen.views[0], strict=False)
    if not own.validated or own.logit != chosen.cutoff.logit:
        return []
    return calibration.stored_screens(meta, chosen.views[0])


def screen_in_stages(chosen: ModelSet, patches: np.ndarray, device, batch_size: int, precision: str,
                     stages: Sequence[Tuple[int, float]]) -> Tuple[np.ndarray, tuple, List[int]]:
    """Scores int16 patches ``(N, P, P, P)`` view by view in ``stages`` (``(k, logit)``, ``k`` ascending):
    after its first ``k`` views a candidate goes on only where the logit of its mean probability so far
    reaches ``logit``. Returns ``(kept, known, counts)``: the indices of the patches that passed every stage,
    ``head.view_outputs`` of their views so far (the first of their full views, not computed again) and the
    number of candidates scored at each stage."""
    (_, model, meta), = chosen.models
    kept, known, counts = np.arange(len(patches)), None, []
    for views, screen in stages:
        known = head.more_views(model, patches[kept], meta["preprocess"], device, batch_size, views,
                                head.resolve_precision(precision, device), with_size=True, known=known)
        counts.append(len(kept))
        passed = calibration.logit(head.mean_of_views(known[0])) >= screen
        kept, known = kept[passed], tuple(None if part is None else part[passed] for part in known)
        if not len(kept):
            break
    return kept, known, counts


def predict_detected(chosen: ModelSet, scan: data.CTScan, world_xyz: np.ndarray, device, batch_size: int,
                     precision: str, options: dict, screen: bool = True) -> Tuple[list, list, str]:
    """Detected candidates of one scan (world mm ``(N, 3)``) -> ``(findings, scored, how)``. ``scored``: the
    rows of :func:`predict_points` of the candidates scored at the full views; ``findings``: the distinct ones
    at or above the cutoff (:func:`distinct_findings`), their follow-up categories for that number of nodules;
    ``how``: which candidates were scored how. With ``screen`` and :func:`screening_stages`, candidates are
    scored at one view first and views are added in stages (:func:`screen_in_stages`); only those that pass
    every stage get the full views. Those left out stay below their stage's screening cutoff, where validation
    saw no candidate that the full views put above the cutoff."""
    preprocess = chosen.models[0][2]["preprocess"]
    spacing = float(preprocess["spacing_mm"])
    patches = data.extract_patches(scan, world_xyz, int(preprocess["patch_size"]), spacing)
    kept, how = np.arange(len(world_xyz)), f"detect: {len(world_xyz)} candidates"
    stages = screening_stages(chosen) if screen else []
    known = None   # the screened candidates' outputs at their views so far, the first of their full views
    if stages:
        kept, views_so_far, counts = screen_in_stages(chosen, patches, device, batch_size, precision, stages)
        known = [views_so_far]
        how += ("; screened in stages (cutoffs chosen on validation): "
                + ", ".join(f"{n} scored at {views} view(s)" for n, (views, _) in zip(counts, stages))
                + f"; {len(kept)} scored at {chosen.views[0]} views")
    if not len(kept):
        return [], [], how
    patches, world_xyz = patches[kept], world_xyz[kept]
    outputs = _model_outputs(chosen, patches, device, batch_size, precision, known)
    scored = _point_rows(chosen, scan, world_xyz, patches, outputs, options, "detect")
    findings = distinct_findings(scored)
    # the categories of distinct nodules: "multiple" counts the findings, not every candidate above the cutoff
    position = {id(row): i for i, row in enumerate(scored)}
    rows = [position[id(finding)] for finding in findings]
    sizes = size_and_follow_up(patches[rows], spacing, [True] * len(rows), **options,
                               model_diameters=None if outputs[2] is None else outputs[2][rows])
    return [dict(row, **size) for row, size in zip(findings, sizes)], scored, how


def _scan_and_patches(scan_path, world_xyz: np.ndarray, preprocess: dict):
    """``(scan, int16 patches)`` of the points: cut from a data.CTScan already read, else read and cut."""
    size, spacing = int(preprocess["patch_size"]), float(preprocess["spacing_mm"])
    if isinstance(scan_path, data.CTScan):   # already read (predict_scan's detection): cut from memory
        return scan_path, data.extract_patches(scan_path, world_xyz, size, spacing)
    return data.read_and_extract(scan_path, world_xyz, size, spacing)


def _calibration_note(chosen: ModelSet, points: str) -> str:
    """The models' calibration note (several: the first one's, the mean of their calibrated probabilities)."""
    note = calibration.calibration_note(chosen.models[0][2].get("calibration"), points)
    if len(chosen.models) > 1:
        note += f"; the mean of the {len(chosen.models)} models' calibrated probabilities"
    return note


def _model_outputs(chosen: ModelSet, patches: np.ndarray, device, batch_size: int, precision: str,
                   known: Optional[list] = None
                   ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """The mean raw probability of the models, the mean of their calibrated probabilities (None when one has
    no recorded prior), and the diameter (mm) from the mean log-diameter of those with a size output (None
    when none has one). ``known``: per model, ``head.view_outputs`` of the views already scored."""
    probabilities, calibrated, log_sizes = [], [], []
    for i, ((_, model, meta), views) in enumerate(zip(chosen.models, chosen.views)):
        probability, diameter = head.predict_patches(model, patches, meta["preprocess"], device, batch_size,
                                                     views, head.resolve_precision(precision, device),
                                                     with_size=True, known=known and known[i])
        probabilities.append(probability)
        calibrated.append(calibration.calibrated_probability(probability, meta.get("calibration")))
        if model.has_size:
            log_sizes.append(np.log(diameter))
    mean_calibrated = None if any(c is None for c in calibrated) else sum(calibrated) / len(calibrated)
    return (sum(probabilities) / len(probabilities), mean_calibrated,
            np.exp(sum(log_sizes) / len(log_sizes)) if log_sizes else None)


def _text(value) -> str:
    """A CSV cell: "" for None, full precision for floats, commas replaced by semicolons in text."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value).replace(",", ";")


def write_predictions_csv(predictions: Sequence[dict], path) -> None:
    """The predictions as CSV (columns :data:`OUTPUT_COLUMNS`), written atomically."""
    lines = [",".join(OUTPUT_COLUMNS)]
    for row in predictions:
        hu = "" if row["hu_at_point"] is None else f"{row['hu_at_point']:.1f}"
        cells = [_text(row.get(key)) for key in OUTPUT_COLUMNS]
        cells[OUTPUT_COLUMNS.index("follow_up")] = "yes" if row["follow_up"] else "no"
        cells[OUTPUT_COLUMNS.index("hu_at_point")] = hu
        cells[OUTPUT_COLUMNS.index("cutoff_logit")] = _text(row["cutoff"])
        lines.append(",".join(cells))
    common.atomic_write_text(path, "\n".join(lines) + "\n")


def _table_caption(predictions: Sequence[dict], n_models: int) -> str:
    """The cutoff and its source, where the calibration's prior comes from, the guideline, each category's
    recommendation, the assumptions of the size and category, the disclaimer."""
    lines = []
    if predictions:
        first = predictions[0]
        n_models = first.get("n_models", n_models)
        averaged = f"; raw probabilities averaged over {n_models} models" if n_models > 1 else ""
        lines += [f"follow-up: raw logit >= {first['cutoff']:.4g} (raw probability >= "
                  f"{float(calibration.sigmoid(first['cutoff'])):.4g}): {first['cutoff_source']}{averaged}",
                  f"probability: {first['calibration_note']}"]
    if predictions and "guideline" in predictions[0]:
        first = predictions[0]
        source = ("the model's size output (the plain measurement beside it)"
                  if first["size_source"] == SIZE_FROM_MODEL
                  else "the plain measurement: the model has no size output")
        lines += [f"category (follow-up points only): "
                  f"{GUIDELINE_NAMES.get(first['guideline'], first['guideline'])}; diameter (mm): {source}; "
                  f"'-': not measurable"]
        advice = dict.fromkeys((r["category"], r["recommendation"]) for r in predictions if r.get("category"))
        lines += [f"  {category}: {recommendation}" for category, recommendation in advice]
        lines += ["assumptions: " + "; ".join(first["assumptions"]), followup.DISCLAIMER]
    return "\n".join(lines)


def prediction_table(predictions: Sequence[dict], title: str = "", n_models: int = 1, by_scan: bool = False):
    """A rich table: coordinates, calibrated and raw probability, follow-up at the cutoff, HU at the point,
    the diameter, the guideline's category (follow-up points only) and warnings (a column only when a row has
    one); the caption names the cutoff and its source, the calibration's prior, each category's
    recommendation once, the guideline, the assumptions and followup.DISCLAIMER. ``n_models`` > 1: the
    probabilities are the average of that many checkpoints. ``by_scan``: a last column names each row's
    scan."""
    from rich.table import Table
    table = Table(title=title or None, caption=_table_caption(predictions, n_models), caption_justify="left")
    sized = bool(predictions) and predictions[0].get("size_source") == SIZE_FROM_MODEL
    warned = any(row["warning"] for row in predictions)
    for name in ("#", "x (mm)", "y (mm)", "z (mm)", "probability", "raw", "follow-up", "HU", "diameter (mm)",
                 *(("plain (mm)",) if sized else ()), "category", *(("warning",) if warned else ()),
                 *(("scan",) if by_scan else ())):
        table.add_column(name, justify="left" if name in ("category", "warning") else "right",
                         overflow="fold")   # a narrow terminal folds cells rather than cropping columns
    for n, row in enumerate(predictions, start=1):
        diameter, calibrated = row.get("diameter_mm"), row.get("calibrated_probability")
        table.add_row(str(n), f"{row['coordX']:.1f}", f"{row['coordY']:.1f}", f"{row['coordZ']:.1f}",
                      "-" if calibrated is None else f"{calibrated:.4f}", f"{row['probability']:.4f}",
                      "[bold red]yes[/]" if row["follow_up"] else "no",
                      "-" if row["hu_at_point"] is None else f"{row['hu_at_point']:.0f}",
                      _mm(diameter),
                      *((_mm(row.get("plain_diameter_mm")),) if sized else ()), row.get("category", ""),
                      *((f"[yellow]{row['warning']}[/]" if row["warning"] else "",) if warned else ()),
                      *((row.get("scan", ""),) if by_scan else ()))
    return table


def results_title(scan_path, predictions: Sequence[dict], detected: bool) -> str:
    """The heading of predict's results: the scan and what its rows are (``detected``: the distinct findings
    of :func:`predict_scan` without points, which may be none)."""
    if detected and not predictions:
        return f"{scan_name(scan_path)}: no detected candidate reaches the checkpoint's cutoff"
    what = "findings at or above the cutoff among the detected candidates" if detected else "points"
    return f"{scan_name(scan_path)} ({len(predictions)} {what})"


def _mm(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def distinct_findings(predictions: Sequence[dict], unknown_diameter_mm: float = 5.0) -> list[dict]:
    """The rows at or above the cutoff, highest probability first, without those on a finding already kept:
    a row is dropped when its sphere overlaps a kept one's (centres closer than the mean of the two diameters,
    ``unknown_diameter_mm`` where a diameter is unknown). Detection leaves several candidates on a large
    nodule."""
    return _apart((r for r in predictions if r["follow_up"]), [], unknown_diameter_mm)


def _apart(rows, kept: list, unknown_diameter_mm: float = 5.0) -> list:
    """``rows``, likeliest first, without those whose sphere overlaps one of ``kept`` or of a likelier row."""
    chosen: list[dict] = []
    for row in sorted(rows, key=lambda r: -r["probability"]):
        centre = np.array([row["coordX"], row["coordY"], row["coordZ"]])
        size = row.get("diameter_mm") or unknown_diameter_mm
        if all(np.linalg.norm(centre - [k["coordX"], k["coordY"], k["coordZ"]]) >=
               (size + (k.get("diameter_mm") or unknown_diameter_mm)) / 2.0 for k in kept + chosen):
            chosen.append(row)
    return chosen


def predict_scan(checkpoint, scan_path, coords: Sequence[str] = (), points=None, out=None, *,
                 device: str = "auto", ensemble: Optional[Path] = None, report: Optional[Path] = None,
                 compile: bool = False, console=None, **settings: Any) -> list[dict]:
    """Points from ``--coord X,Y,Z`` strings or a points CSV (``--points``) -> :func:`predict_points` (one
    checkpoint or a list, averaged, or a crossval ``ensemble``; ``cutoff`` a raw logit; ``guideline``,
    ``nodule_type`` and ``risk`` for the follow-up category), written to ``out``. With neither,
    :func:`detect.detect_scan` finds up to ``max_per_scan`` candidates first, and the distinct findings at or
    above the cutoff (:func:`distinct_findings`) are returned, highest probability first, with their follow-up
    categories for that number of nodules. ``settings``: the options of ``options.stage_names("predict")``
    (batch size, views, precision, cutoff, max_per_scan, guideline, nodule_type, risk); those left out take
    their defaults there. ``report``: also write the findings page and viewer files into this folder
    (findings.py), with the candidates just below the cutoff. ``compile``: the encoders through torch.compile
    (``head.compile_encoder``). ``console``: where to say how detected candidates were scored (screening)."""
    chosen = {**options_mod.defaults("predict"), **options_mod.given("predict", settings)}
    return _predict_scan(checkpoint, scan_path, coords, points, out, device, ensemble, report, compile,
                         console=console, **chosen)


def _predict_scan(checkpoint, scan_path, coords: Sequence[str], points, out, device: str,
                  ensemble: Optional[Path], report: Optional[Path], compile: bool, *, batch_size: int,
                  views: Optional[int], precision: str, guideline: str, nodule_type: str, risk: str,
                  max_per_scan: int, cutoff: Optional[float], screen: bool, console=None) -> list[dict]:
    if coords and points is not None:
        raise UserError("give either --coord X,Y,Z (one or more) or --points FILE.csv, not both")
    torch_device = head.resolve_device(device)
    chosen = checkpoint if isinstance(checkpoint, ModelSet) else \
        resolve_models(checkpoint, torch_device, views, cutoff, ensemble, compile)
    if coords:
        world_xyz = np.array([parse_coordinate(c) for c in coords])
    elif points is not None:
        world_xyz = read_scan_points(points, scan_name=scan_name(scan_path))
    detected = not coords and points is None
    # read once: detection, the patches and the report all use it
    scan = data.read_ct(scan_path) if detected or report is not None else Path(scan_path)
    options = dict(guideline=guideline, nodule_type=nodule_type, risk=risk)
    how = "--coord" if coords else ""
    if detected:
        found = detect.detect_scan(scan, max_per_scan)
        if not len(found.score):
            raise UserError(found.warning or f"scan {scan_name(scan_path)}: detect found no candidates")
        predictions, candidates, how = predict_detected(chosen, scan, found.world_xyz, torch_device,
                                                        batch_size, precision, options, screen)
        if console is not None:
            console.print(f"{scan_name(scan_path)}: {how}")
    else:
        predictions = candidates = predict_points(chosen, scan, world_xyz, torch_device, batch_size, views,
                                                  precision, points=how, **options)
    predictions = [dict(row, scan=scan_name(scan_path)) for row in predictions]
    if out is not None:
        write_predictions_csv(predictions, out)
    if report is not None:
        _write_report(report, scan, scan_path, chosen, predictions, candidates, detected, how, guideline)
    return predictions


def predict_scans(checkpoint, scan_paths: Sequence, out=None, *, device: str = "auto",
                  ensemble: Optional[Path] = None, report: Optional[Path] = None, console=None,
                  compile: bool = False, **settings: Any) -> Tuple[list, dict]:
    """Detection mode over several scans (``data.find_scans``: files, DICOM series folders, folders of
    scans): each scan's findings as :func:`predict_scan` gives them, its ``scan`` column naming it, all in one
    CSV at ``out`` and, with ``report``, one page per scan and ``report/index.html``. Each finished scan is
    kept in ``report/parts`` (else beside ``out``), so a rerun of the same call skips it; an unreadable scan
    is named and the others go on; ``console`` also hears how each scan's detected candidates were scored.
    Returns ``(rows, {scan: reason} of the scans that failed)``."""
    import findings
    chosen = {**options_mod.defaults("predict"), **options_mod.given("predict", settings)}
    paths = data.find_scans(scan_paths)
    names = {path: findings.folder_name(path, scan_name(path)) for path in paths}
    parts = _scan_parts(checkpoint, ensemble, chosen, out, report)
    done = parts.done() if parts is not None else set()
    todo = [path for path in paths if names[path] not in done]

    models = todo and resolve_models(checkpoint, head.resolve_device(device), chosen["views"],
                                     chosen["cutoff"], ensemble, compile)   # loaded (and compiled) once

    def predicted(path: Path):
        return _predict_scan(models, path, (), None, None, device, ensemble, report, compile, console=console,
                             **chosen)

    def keep(name: str, rows: list) -> None:
        if parts is not None:
            parts.save(name, np.zeros(0), rows)
        kept[name] = rows
    kept: dict = {}
    items = ((names[path], *common.attempt(path, predicted, path)) for path in todo)
    failed = common.over_scans(items, keep, total=len(todo), label="predicting scans", console=console,
                               show_progress=console is not None)
    def rows_of(name: str) -> list:
        if name in kept:
            return kept[name]
        return parts.meta(name) if name in done else []
    rows = [row for path in paths for row in rows_of(names[path])]
    if out is not None:
        write_predictions_csv(rows, out)
    if report is not None:
        findings.write_index(report, [(names[p], scan_name(p), str(p)) for p in paths], rows, failed)
    return rows, failed


def _scan_parts(checkpoint, ensemble: Optional[Path], chosen: dict, out, report) -> Optional[common.Parts]:
    """The finished scans of a several-scan call, kept while the models and options stay the same."""
    if report is None and out is None:
        return None
    models = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    key = {"models": [[str(Path(m).resolve()), Path(m).stat().st_size, Path(m).stat().st_mtime_ns]
                      for m in models],
           "ensemble": str(ensemble), "settings": chosen}
    folder = Path(report) / "parts" if report is not None else Path(out).with_name(Path(out).name + ".parts")
    return common.Parts(folder, json.loads(json.dumps(key, default=str)))


def _write_report(report: Path, scan, scan_path, chosen: ModelSet, predictions: list, candidates: list,
                  detected: bool, points: str, guideline: str) -> Path:
    """The findings page of one scan: the rows at or above the cutoff, and those below it (detected ones
    within ``findings.NEAR_LOGITS`` of it, and not on a finding) in the section near the cutoff."""
    import findings
    shown = [r for r in predictions if r["follow_up"]]
    below = [r for r in (candidates if detected else predictions) if not r["follow_up"]
             and (not detected or r["logit"] >= (r["cutoff"] or 0.0) - findings.NEAR_LOGITS)]
    near = _apart(below, shown) if detected else below
    first = (predictions or candidates or [{}])[0]
    cutoff = chosen.cutoff
    info = {"cutoff": cutoff.logit, "points": points or "--points",
            "cutoff_text": ("none" if cutoff.logit is None else f"{cutoff.logit:.3f}")
                           + f" (raw logit; {cutoff.source})",
            "guideline": first.get("guideline", guideline),
            "assumptions": "; ".join(first.get("assumptions") or []),
            "checkpoints": [(path, path.parent.name if path.name == "best.pt" else path.stem)
                            for path, _, _ in chosen.models]}
    return findings.write_report(report, scan, scan_path, scan_name(scan_path), shown, near, info)
