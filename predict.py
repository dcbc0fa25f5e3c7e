"""Predictions for a new scan: is the candidate at a world point a nodule that needs follow-up?

Points are world mm ``(x, y, z)``: ITK/LPS physical points, as in the LUNA16 CSVs and as DICOM viewers
report patient coordinates (ImagePositionPatient). The scan is an ``.mhd``/``.mha``, a NIfTI file or a
DICOM series folder; it is read once, and each point's patch is resampled with the checkpoint's
``patch_size`` and ``spacing_mm``.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data import UserError

# HU at a candidate's centre that no lung nodule has: below, air outside the body or in an airway;
# above, bone or metal. (Calcified nodules reach a few hundred HU, so the upper bound is generous.)
PLAUSIBLE_HU = (-950.0, 500.0)
CENTRE_MM = 3  # side of the cube (in patch voxels) averaged for the HU at the point
OUTPUT_COLUMNS = ("coordX", "coordY", "coordZ", "probability", "follow_up", "hu_at_point", "warning")


def parse_coordinate(text: str) -> tuple:
    """``"X,Y,Z"`` in world mm -> ``(x, y, z)`` floats."""
    parts = str(text).replace(" ", "").split(",")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not np.all(np.isfinite(values)):
        raise UserError(f"--coord takes three world mm numbers X,Y,Z, got {text!r}")
    return values


def read_points_csv(path, scan_name: str = "") -> np.ndarray:
    """World mm points ``(N, 3)`` from a CSV with ``coordX,coordY,coordZ`` columns.

    When a ``seriesuid`` column names several scans, only the rows of ``scan_name`` are kept.
    Bad rows raise :class:`UserError` naming their lines.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: candidates file not found")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header = [name.strip() for name in rows[0]] if rows else []
    missing = [c for c in ("coordX", "coordY", "coordZ") if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
    columns = [header.index(c) for c in ("coordX", "coordY", "coordZ")]
    uid_column = header.index("seriesuid") if "seriesuid" in header else None
    points, uids, problems = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not "".join(row).strip():
            continue
        try:
            xyz = [float(row[c]) for c in columns]
            if not np.all(np.isfinite(xyz)):
                raise ValueError
        except (IndexError, ValueError):
            problems.append(f"line {line}: {','.join(row)[:100]!r}")
            continue
        points.append(xyz)
        uids.append(row[uid_column].strip() if uid_column is not None and uid_column < len(row) else "")
    if problems:
        raise UserError(f"{path}: {len(problems)} unreadable row(s): " + "; ".join(problems[:10]))
    points = np.array(points, float).reshape(-1, 3)
    if uid_column is not None and len(set(uids)) > 1:
        mine = np.array([uid == scan_name for uid in uids])
        if not mine.any():
            raise UserError(f"{path} lists points of {len(set(uids))} scans and none of scan {scan_name!r}")
        points = points[mine]
    if len(points) == 0:
        raise UserError(f"{path}: no points")
    return points


def _inside_scan(scan, world_xyz: np.ndarray) -> np.ndarray:
    """``(N,)`` bool: the point lies within the scan's voxel grid (half a voxel beyond the edge centres)."""
    import data
    index = data.world_to_index(world_xyz, scan)
    size_ijk = np.array(scan.hu.shape[::-1])
    return ((index >= -0.5) & (index <= size_ijk - 0.5)).all(axis=1)


def _point_warning(inside: bool, hu: float) -> str:
    if not inside:
        return "outside the scan"
    if hu < PLAUSIBLE_HU[0]:
        return f"HU {hu:.0f}: air (outside the body or in an airway), not lung tissue"
    if hu > PLAUSIBLE_HU[1]:
        return f"HU {hu:.0f}: bone or metal density"
    return ""


def predict_points(checkpoint, scan_path, world_xyz, device: Optional[str] = None, batch_size: int = 64,
                   tta: bool = False) -> list[dict]:
    """Probability of a nodule at each world mm point ``(N, 3)`` (x, y, z) of one scan.

    Returns one dict per point: ``coordX/Y/Z`` (mm), ``probability`` (float64), ``follow_up`` (probability at
    or above the checkpoint's cutoff, 0.5 when it has none), ``hu_at_point`` (mean HU of the central
    3 x 3 x 3 patch voxels) and ``warning`` ("" or why the point is implausible: outside the scan, air, bone).
    """
    import data
    import evaluate
    import head
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    if world_xyz.shape[1:] != (3,) or len(world_xyz) == 0:
        raise ValueError(f"world_xyz must have shape (N, 3) with N >= 1, got {world_xyz.shape}")
    device = device or evaluate.default_device()
    model, meta = head.load_classifier(Path(checkpoint), device=device)
    preprocess = meta["preprocess"]
    cutoff = float(meta.get("cutoff", 0.5) if meta.get("cutoff") is not None else 0.5)
    scan, patches = data.read_and_extract(scan_path, world_xyz, int(preprocess["patch_size"]),
                                          float(preprocess["spacing_mm"]))
    probability = evaluate.predict_patches(model, patches, preprocess, device, batch_size, tta)
    centre = int(preprocess["patch_size"]) // 2
    lo, hi = centre - CENTRE_MM // 2, centre + CENTRE_MM // 2 + 1
    hu_at_point = patches[:, lo:hi, lo:hi, lo:hi].reshape(len(patches), -1).mean(axis=1)
    inside = _inside_scan(scan, world_xyz)
    return [{"coordX": float(x), "coordY": float(y), "coordZ": float(z), "probability": float(p),
             "follow_up": bool(p >= cutoff), "cutoff": cutoff, "hu_at_point": float(h) if ok else None,
             "warning": _point_warning(bool(ok), float(h))}
            for (x, y, z), p, h, ok in zip(world_xyz.tolist(), probability, hu_at_point, inside)]


def write_predictions_csv(predictions: Sequence[dict], path) -> None:
    """The predictions as CSV (columns :data:`OUTPUT_COLUMNS`), written atomically."""
    import data
    lines = [",".join(OUTPUT_COLUMNS)]
    for row in predictions:
        hu = "" if row["hu_at_point"] is None else f"{row['hu_at_point']:.1f}"
        warning = row["warning"].replace(",", ";")
        lines.append(f"{row['coordX']!r},{row['coordY']!r},{row['coordZ']!r},{row['probability']!r},"
                     f"{'yes' if row['follow_up'] else 'no'},{hu},{warning}")
    data.atomic_write_text(path, "\n".join(lines) + "\n")


def prediction_table(predictions: Sequence[dict], title: str = ""):
    """A rich table: coordinates, probability, follow-up at the cutoff, HU at the point and warnings."""
    from rich.table import Table
    cutoff = predictions[0]["cutoff"] if predictions else 0.5
    table = Table(title=title or None, caption=f"follow-up: probability >= {cutoff:.4g} (the checkpoint's cutoff)")
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
                 device: Optional[str] = None, batch_size: int = 64, tta: bool = False) -> list[dict]:
    """Points from ``--coord X,Y,Z`` strings or a candidates CSV -> :func:`predict_points`, written to ``out``."""
    if bool(coords) == (candidates is not None):
        raise UserError("give either --coord X,Y,Z (one or more) or --candidates FILE.csv")
    scan_path = Path(scan_path)
    if coords:
        world_xyz = np.array([parse_coordinate(c) for c in coords])
    else:
        world_xyz = read_points_csv(candidates, scan_name=scan_name(scan_path))
    predictions = predict_points(checkpoint, scan_path, world_xyz, device=device, batch_size=batch_size, tta=tta)
    if out is not None:
        write_predictions_csv(predictions, out)
    return predictions
