"""Predictions for a new scan: is the candidate at a world point a nodule that needs follow-up?

Points are world mm ``(x, y, z)``: ITK/LPS physical points, as in the LUNA16 CSVs and as DICOM viewers
report patient coordinates (ImagePositionPatient). The scan is an ``.mhd``/``.mha``, a NIfTI file or a
DICOM series folder; it is read once, and each point's patch is resampled with the checkpoint's
``patch_size`` and ``spacing_mm``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import data
import head
from data import UserError

# HU at a candidate's centre that no lung nodule has: below, air outside the body or in an airway;
# above, bone or metal. (Calcified nodules reach a few hundred HU, so the upper bound is generous.)
PLAUSIBLE_HU = (-950.0, 500.0)
CENTRE_MM = 3  # side of the cube (in patch voxels) averaged for the HU at the point
OUTPUT_COLUMNS = ("coordX", "coordY", "coordZ", "probability", "follow_up", "hu_at_point", "warning")


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
    column names several scans, only the rows of ``scan_name``. Bad rows refuse the file, naming their lines."""
    table, _ = data.read_point_csv(path, None, need_uid=False)
    if len(set(table.seriesuid)) > 1:
        mine = table.seriesuid == scan_name
        if not mine.any():
            raise UserError(f"{path} lists points of {len(set(table.seriesuid))} scans and none of scan {scan_name!r}")
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


def load_models(checkpoints, device) -> list[tuple]:
    """``[(path, model, meta)]`` of one checkpoint or a list; all must share the patch geometry (patch_size,
    spacing_mm), which UserError names otherwise."""
    paths = [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(c) for c in checkpoints]
    if not paths:
        raise UserError("give at least one --checkpoint")
    models = [(path, *head.load_classifier(path, device=device)) for path in paths]
    first, _, first_meta = models[0]
    a = first_meta["preprocess"]
    for path, _, meta in models[1:]:
        b = meta["preprocess"]
        if int(a["patch_size"]) != int(b["patch_size"]) or not math.isclose(float(a["spacing_mm"]),
                                                                            float(b["spacing_mm"])):
            raise UserError(f"--checkpoint {path} takes patches of {b['patch_size']} voxels at {b['spacing_mm']} mm, "
                            f"--checkpoint {first} of {a['patch_size']} voxels at {a['spacing_mm']} mm; the models "
                            f"averaged must share the patch size and spacing")
    return models


def predict_points(checkpoint, scan_path, world_xyz, device: str = "auto", batch_size: int = 64,
                   views: Optional[int] = None, precision: str = "auto") -> list[dict]:
    """Probability of a nodule at each world mm point ``(N, 3)`` (x, y, z) of one scan.

    ``checkpoint``: one checkpoint, or a list of them (say the models of a cross-validation's folds), whose
    probabilities are averaged: the scan is read and the patches cut once, each model applies its own HU
    window, views and cutoff, and the cutoff is the mean of the models' cutoffs.
    ``views``: flips averaged per patch (default: those each checkpoint was validated with). Returns one
    dict per point: ``coordX/Y/Z`` (mm), ``probability`` (float64), ``follow_up`` (probability at or above
    the checkpoint's cutoff, 0.5 when it has none), ``hu_at_point`` (mean HU of the central 3 x 3 x 3
    patch voxels) and ``warning`` ("" or why the point is implausible: outside the scan, air, bone).
    """
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    if world_xyz.shape[1:] != (3,) or len(world_xyz) == 0:
        raise ValueError(f"world_xyz must have shape (N, 3) with N >= 1, got {world_xyz.shape}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = head.resolve_device(device)
    models = load_models(checkpoint, torch_device)
    preprocess = models[0][2]["preprocess"]
    cutoffs = [float(meta["cutoff"]) if meta.get("cutoff") is not None else 0.5 for _, _, meta in models]
    cutoff = sum(cutoffs) / len(cutoffs)
    scan, patches = data.read_and_extract(scan_path, world_xyz, int(preprocess["patch_size"]),
                                          float(preprocess["spacing_mm"]))
    probability = sum(head.predict_patches(model, patches, meta["preprocess"], torch_device, batch_size,
                                           head.check_views(views or meta.get("views", 1)),
                                           head.resolve_precision(precision, torch_device))
                      for _, model, meta in models) / len(models)
    lo = int(preprocess["patch_size"]) // 2 - CENTRE_MM // 2
    hu_at_point = patches[:, lo:lo + CENTRE_MM, lo:lo + CENTRE_MM, lo:lo + CENTRE_MM].reshape(len(patches), -1).mean(1)
    inside = data.inside_scan(scan, world_xyz)
    return [{"coordX": float(x), "coordY": float(y), "coordZ": float(z), "probability": float(p),
             "follow_up": bool(p >= cutoff), "cutoff": cutoff, "hu_at_point": float(h) if ok else None,
             "warning": _point_warning(bool(ok), float(h))}
            for (x, y, z), p, h, ok in zip(world_xyz.tolist(), probability, hu_at_point, inside)]


def write_predictions_csv(predictions: Sequence[dict], path) -> None:
    """The predictions as CSV (columns :data:`OUTPUT_COLUMNS`), written atomically."""
    lines = [",".join(OUTPUT_COLUMNS)]
    for row in predictions:
        hu = "" if row["hu_at_point"] is None else f"{row['hu_at_point']:.1f}"
        warning = row["warning"].replace(",", ";")
        lines.append(f"{row['coordX']!r},{row['coordY']!r},{row['coordZ']!r},{row['probability']!r},"
                     f"{'yes' if row['follow_up'] else 'no'},{hu},{warning}")
    data.atomic_write_text(path, "\n".join(lines) + "\n")


def prediction_table(predictions: Sequence[dict], title: str = "", n_models: int = 1):
    """A rich table: coordinates, probability, follow-up at the cutoff, HU at the point and warnings;
    ``n_models`` > 1: the probabilities are the average of that many checkpoints, the cutoff their mean."""
    from rich.table import Table
    cutoff = predictions[0]["cutoff"] if predictions else 0.5
    source = "the checkpoint's cutoff" if n_models == 1 else \
        f"the mean of the {n_models} checkpoints' cutoffs; probabilities averaged over {n_models} models"
    table = Table(title=title or None, caption=f"follow-up: probability >= {cutoff:.4g} ({source})")
    for name in ("#", "x (mm)", "y (mm)", "z (mm)", "probability", "follow-up", "HU", "warning"):
        table.add_column(name, justify="left" if name == "warning" else "right")
    for n, row in enumerate(predictions, start=1):
        table.add_row(str(n), f"{row['coordX']:.1f}", f"{row['coordY']:.1f}", f"{row['coordZ']:.1f}",
                      f"{row['probability']:.4f}", "[bold red]yes[/]" if row["follow_up"] else "no",
                      "-" if row["hu_at_point"] is None else f"{row['hu_at_point']:.0f}",
                      f"[yellow]{row['warning']}[/]" if row["warning"] else "")
    return table


def scan_name(path) -> str:
    """A scan's name: the folder of a DICOM series, else the file name without ``.mhd``/``.nii.gz``/..."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path.name
    return path.name[:-len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def predict_scan(checkpoint, scan_path, coords: Sequence[str] = (), candidates=None, out=None,
                 device: str = "auto", batch_size: int = 64, views: Optional[int] = None,
                 precision: str = "auto") -> list[dict]:
    """Points from ``--coord X,Y,Z`` strings or a candidates CSV -> :func:`predict_points` (one checkpoint or
    a list, averaged), written to ``out``."""
    if bool(coords) == (candidates is not None):
        raise UserError("give either --coord X,Y,Z (one or more) or --candidates FILE.csv")
    if coords:
        world_xyz = np.array([parse_coordinate(c) for c in coords])
    else:
        world_xyz = read_scan_points(candidates, scan_name=scan_name(scan_path))
    predictions = predict_points(checkpoint, Path(scan_path), world_xyz, device, batch_size, views, precision)
    if out is not None:
        write_predictions_csv(predictions, out)
    return predictions
