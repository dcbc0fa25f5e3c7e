"""Findings page and viewer files of one predicted scan (``predict --report DIR``).

``write_report`` writes ``DIR/<scan>/``:

* ``index.html``: self-contained (images embedded as PNGs, one pixel a sample, with their orientation letters,
  circles and numbers drawn over them as SVG). A summary of the scan and the call, an overview (coronal
  and axial maximum-intensity projections with each finding numbered), then one section per finding,
  likeliest first: axial, coronal and sagittal crops of ``CROP_MM`` around it in a lung and a soft-tissue
  window, a circle at its diameter, and its probability, diameters, category, recommendation and world and
  voxel coordinates. Detected candidates below the cutoff but within ``NEAR_LOGITS`` of it follow in a
  collapsed section.
* ``findings.mrk.json``: 3D Slicer markups, one control point per finding in LPS mm.
* ``findings.nii.gz``: a uint16 label map on the CT's own grid (size, spacing, origin, direction): finding n
  is a sphere of label n at its diameter; where spheres overlap the likelier finding wins.
* ``findings.json``: every row of the table, the toolkit's version and each checkpoint's run and SHA-256.

Images are cut from the scan's own geometry: crops and projections are world-axis-aligned cubes resampled by
``data.extract_patches`` (all direction maths stays in data.py), shown in radiological convention (patient
right on the image's left, anterior or superior at the top) with their orientation letters. A crop reaching
past the scan is padded with air, never shifted, and says so.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import common
import data

CROP_MM = 50.0
CROP_SPACING_MM = 0.5
OVERVIEW_SPACING_MM = 2.0
LUNG_WINDOW = (-1350.0, 150.0)   # width 1500, level -600
SOFT_WINDOW = (-160.0, 240.0)    # width 400, level 40
NEAR_LOGITS = 1.0                # "near the cutoff": at most this far below it, as a raw logit
UNKNOWN_DIAMETER_MM = 5.0        # drawn for a finding whose diameter is unknown
_CORNERS = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
# Image rows and columns along world axes (array [z, y, x] of a world-aligned cube), the letters at the
# left, right, top and bottom edges, and whether the rows run upwards (superior at the top).
VIEWS = {"axial": ((1, 2), "RLAP", False), "coronal": ((0, 2), "RLSI", True),
         "sagittal": ((0, 1), "APSI", True)}


def folder_name(scan_path, uid: str) -> str:
    """The scan's report folder: its seriesuid when its name is one (a LUNA16 ``.mhd``), else the file or
    folder name plus 8 hex digits of its full path (DICOM folders are often just numbered)."""
    if re.fullmatch(r"\d+(\.\d+)+", uid):   # a DICOM UID
        return uid
    digest = hashlib.sha1(str(Path(scan_path).resolve()).encode()).hexdigest()[:8]
    return f"{uid}_{digest}"


def write_report(report_dir, scan: data.CTScan, scan_path, uid: str, findings: Sequence[dict],
                 near: Sequence[dict], info: dict) -> Path:
    """Write the page and viewer files of one scan (see the module docstring) into
    ``report_dir/<folder_name>``; returns that folder. ``findings``/``near``: predict's rows (world mm
    ``coordX/Y/Z``, probabilities, diameters, categories); ``info``: the call's cutoff, guideline and
    assumptions, checkpoints ``[(path, run)]`` and points source."""
    folder = Path(report_dir) / folder_name(scan_path, uid)
    findings = sorted(findings, key=lambda r: -r["probability"])
    rows = [dict(r, number=n, voxel_ijk=_voxel(scan, r)) for n, r in enumerate(findings, start=1)]
    near_rows = [dict(r, voxel_ijk=_voxel(scan, r)) for r in sorted(near, key=lambda r: -r["probability"])]
    common.atomic_write_json(folder / "findings.mrk.json", markups(rows))
    _write_label_map(folder / "findings.nii.gz", scan, rows)
    common.atomic_write_json(folder / "findings.json", _record(scan, scan_path, uid, rows, near_rows, info))
    common.atomic_write_text(folder / "index.html", _page(scan, scan_path, uid, rows, near_rows, info))
    return folder


def _voxel(scan: data.CTScan, row: dict) -> list:
    ijk = data.world_to_index(np.array([[row["coordX"], row["coordY"], row["coordZ"]]]), scan)[0]
    return [round(float(v), 2) for v in ijk]


def _world(row: dict) -> np.ndarray:
    return np.array([row["coordX"], row["coordY"], row["coordZ"]], float)


def _diameter(row: dict) -> Optional[float]:
    return row.get("diameter_mm") or None


# --- viewer files ------------------------------------------------------------------------------

def markups(rows: Sequence[dict]) -> dict:
    """3D Slicer markups (point list) of the numbered findings: LPS mm, as Slicer reads them."""
    points = [{"id": str(r["number"]), "label": _label(r), "position": [float(v) for v in _world(r)],
               "positionStatus": "defined", "selected": True, "locked": True, "visibility": True}
              for r in rows]
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                       "Resources/Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                         "locked": True, "controlPoints": points}]}


def _label(row: dict) -> str:
    """A finding's marker text: its number, probability and category."""
    shown = row.get("calibrated_probability")
    shown = row["probability"] if shown is None else shown
    return f"{row['number']} p={shown:.2f} {row.get('category') or ''}".strip()


def label_map(scan: data.CTScan, rows: Sequence[dict]) -> np.ndarray:
    """uint16 ``[z, y, x]`` on the scan's grid: finding n a sphere of label n at its diameter (world mm), the
    likelier winning where spheres overlap (they are drawn least likely first)."""
    labels = np.zeros(scan.hu.shape, np.uint16)
    for row in sorted(rows, key=lambda r: r["probability"]):
        centre, radius = _world(row), (_diameter(row) or UNKNOWN_DIAMETER_MM) / 2.0
        box = _index_box(scan, centre, radius)
        if box is None:
            continue
        k, j, i = np.meshgrid(*(np.arange(lo, hi) for lo, hi in box), indexing="ij")
        world = data.index_to_world(np.column_stack([i.ravel(), j.ravel(), k.ravel()]).astype(float), scan)
        inside = (np.linalg.norm(world - centre, axis=1) <= radius).reshape(k.shape)
        labels[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]][inside] = row["number"]
    return labels


def _index_box(scan: data.CTScan, centre: np.ndarray, radius: float):
    """``((k0, k1), (j0, j1), (i0, i1))`` array bounds holding a sphere, clipped to the scan; None outside."""
    ijk = data.world_to_index(centre + radius * _CORNERS, scan)
    low, high = np.floor(ijk.min(0)).astype(int), np.ceil(ijk.max(0)).astype(int) + 1
    shape_ijk = scan.hu.shape[::-1]
    low, high = np.maximum(low, 0), np.minimum(high, shape_ijk)
    if np.any(high <= low):
        return None
    return tuple((int(low[a]), int(high[a])) for a in (2, 1, 0))


def _write_label_map(path: Path, scan: data.CTScan, rows: Sequence[dict]) -> None:
    """``label_map`` as NIfTI, through a temporary file (SimpleITK picks the format by the extension)."""
    import os
    import SimpleITK as sitk
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("partial_" + path.name)
    sitk.WriteImage(data.array_image(label_map(scan, rows), scan), str(tmp), True)
    os.replace(tmp, path)


def _record(scan: data.CTScan, scan_path, uid: str, rows: list, near: list, info: dict) -> dict:
    checkpoints = [{"path": str(path), "run": run, "sha256": common.file_sha256(path)}
                   for path, run in info["checkpoints"]]
    return {"toolkit_version": common.VERSION, "scan": str(scan_path), "seriesuid": uid,
            "voxel_size_mm": [float(v) for v in scan.spacing], "shape_zyx": list(scan.hu.shape),
            "checkpoints": checkpoints, "cutoff": info.get("cutoff"), "guideline": info.get("guideline"),
            "points": info.get("points"), "findings": rows, "near_cutoff": near,
            "research_only": RESEARCH_ONLY}


RESEARCH_ONLY = ("Research output, not a medical device: not for clinical use. Categories rest on the "
                 "assumed nodule type and risk and on the number of findings.")


def write_index(report_dir, scans: Sequence[tuple], rows: Sequence[dict], failed: dict) -> Path:
    """``report_dir/index.html``: one line per scan of a several-scan call (``(folder, name, path)``), with
    its number of findings and categories and a link to its page; the scans that failed, with the reason;
    then the pages earlier calls left in ``report_dir``, which this call did not touch."""
    lines = []
    listed = {folder for folder, _, _ in scans}
    for earlier in sorted(Path(report_dir).glob("*/findings.json")):   # pages of earlier calls stay listed
        if earlier.parent.name not in listed:
            record = json.loads(earlier.read_text())
            scans = list(scans) + [(earlier.parent.name, record["seriesuid"], record["scan"])]
            rows = list(rows) + [dict(r, scan=record["seriesuid"]) for r in record["findings"]]
    for folder, name, path in scans:
        own = [r for r in rows if r.get("scan") == name]
        categories = ", ".join(sorted({r.get("category") or "no follow-up" for r in own})) or "-"
        cell = (f"<span class='warn'>{html.escape(failed[folder])}</span>" if folder in failed else
                f"<a href='{html.escape(folder)}/index.html'>{len(own)} finding(s)</a>")
        lines.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(path)}</td><td>{cell}</td>"
                     f"<td>{html.escape(categories if folder not in failed else '')}</td></tr>")
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width, initial-scale=1'><title>Findings</title><style>{STYLE}</style>"
            f"</head><body><h1>Findings of {len(scans)} scan(s)</h1>"
            f"<p class='warn'>{html.escape(RESEARCH_ONLY)}</p>"
            f"<table><tr><th>scan</th><th>file</th><th>findings</th><th>categories</th></tr>{''.join(lines)}"
            f"</table></body></html>")
    common.atomic_write_text(Path(report_dir) / "index.html", page)
    return Path(report_dir) / "index.html"


# --- images ---------------------------------------------------------------------------------------

def _cube(scan: data.CTScan, centre: np.ndarray, size_mm: float, spacing_mm: float):
    """A world-aligned cube ``[z, y, x]`` around ``centre`` and whether it reaches past the scan (padded with
    air there)."""
    edge = int(round(size_mm / spacing_mm)) // 2 * 2
    cube = data.extract_patches(scan, centre[None], patch_size=edge, spacing_mm=spacing_mm)[0]
    ijk = data.world_to_index(centre + size_mm / 2.0 * _CORNERS, scan)
    padded = bool(np.any(ijk < -0.5) or np.any(ijk > np.array(scan.hu.shape[::-1]) - 0.5))
    return cube, padded


def _scan_box(scan: data.CTScan) -> tuple:
    """World centre and edge (mm) of a cube holding the whole scan."""
    shape = np.array(scan.hu.shape[::-1], float) - 1.0
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float) * shape
    world = data.index_to_world(corners, scan)
    return (world.min(0) + world.max(0)) / 2.0, float((world.max(0) - world.min(0)).max())


def _view(cube: np.ndarray, name: str, project: bool = False) -> np.ndarray:
    """The ``name`` plane of a ``[z, y, x]`` cube through its centre (or its maximum projection), as image
    rows and columns in radiological convention."""
    (row_axis, col_axis), _, upwards = VIEWS[name]
    through = ({0, 1, 2} - {row_axis, col_axis}).pop()
    image = cube.max(axis=through) if project else np.take(cube, cube.shape[through] // 2, axis=through)
    return image[::-1] if upwards else image


def _png(image: np.ndarray, window: tuple) -> str:
    """The image in a grey window as an embedded PNG (``data:`` URI), one pixel a sample: the page scales it
    and draws the letters and marks over it (:func:`_overlay`). Drawn by the browser rather than by a
    plotting library, a page of a hundred findings takes seconds, not minutes of figures."""
    from matplotlib.image import imsave
    buffer = io.BytesIO()
    imsave(buffer, np.asarray(image, np.float32), cmap="gray", vmin=window[0], vmax=window[1], format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _overlay(shape: tuple, name: str, circles=(), marks=(), note: str = "") -> str:
    """An SVG over an image of ``shape`` (rows, columns), in its pixel coordinates: the orientation letters
    at its edges, circles ``(row, col, radius px)``, numbered marks ``(row, col, text)`` and a note; sizes
    are shares of the image's width, so they scale with it."""
    rows, cols = shape
    unit = cols / 100.0
    _, letters, _ = VIEWS[name]
    edges = ((unit, rows / 2, "start", "middle"), (cols - 1 - unit, rows / 2, "end", "middle"),
             (cols / 2, unit, "middle", "hanging"), (cols / 2, rows - 1 - unit, "middle", "text-after-edge"))
    parts = [f"<svg viewBox='-0.5 -0.5 {cols} {rows}' aria-hidden='true' font-size='{6 * unit:.2f}'>"]
    parts += [f"<circle class='ring' cx='{col:.1f}' cy='{row:.1f}' r='{radius:.1f}' "
              f"stroke-width='{0.8 * unit:.2f}'/>" for row, col, radius in circles]
    for row, col, text in marks:
        parts.append(f"<circle class='ring' cx='{col:.1f}' cy='{row:.1f}' r='{rows / 40:.1f}' "
                     f"stroke-width='{0.6 * unit:.2f}'/><text class='mark' x='{col + cols / 30:.1f}' "
                     f"y='{row:.1f}' dominant-baseline='middle'>{html.escape(text)}</text>")
    parts += [f"<text class='edge' x='{x:.1f}' y='{y:.1f}' text-anchor='{anchor}' "
              f"dominant-baseline='{baseline}'>{letter}</text>"
              for (x, y, anchor, baseline), letter in zip(edges, letters)]
    if note:
        parts.append(f"<text class='alert' x='{cols / 2:.1f}' y='{0.92 * rows:.1f}' text-anchor='middle' "
                     f"font-size='{4.5 * unit:.2f}'>{html.escape(note)}</text>")
    return "".join(parts) + "</svg>"


def _figure(png: str, overlay: str, caption: str) -> str:
    """One image of the page, its overlay and caption."""
    return (f"<figure><div class='view'><img src='{png}' alt='{html.escape(caption)}'>{overlay}</div>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _lungs_only(cube: np.ndarray, spacing: float) -> np.ndarray:
    """The cube with everything outside detect's lung mask set to air (the whole cube when it finds none),
    so that a projection shows the lungs' vessels and nodules, not the chest wall."""
    import detect
    grid = data.CTScan(cube, np.zeros(3), np.full(3, spacing), np.eye(3), "overview")
    mask, _ = detect.lung_mask(cube, grid)
    if mask is None:
        return cube
    full = mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    full = np.pad(full, [(0, max(0, n - m)) for n, m in zip(cube.shape, full.shape)])
    return np.where(full[:cube.shape[0], :cube.shape[1], :cube.shape[2]], cube, np.int16(-1000))


def _overview(scan: data.CTScan, rows: Sequence[dict]) -> list:
    """The figures of the coronal and axial maximum-intensity projections of the lungs, lung window, findings
    numbered."""
    centre, edge = _scan_box(scan)
    cube, _ = _cube(scan, centre, edge, max(OVERVIEW_SPACING_MM, edge / 256))
    spacing = edge / cube.shape[0]
    cube = _lungs_only(cube, spacing)
    figures = []
    for name in ("coronal", "axial"):
        marks = [(*_position(_world(r), centre, spacing, cube.shape[0], name), str(r["number"]))
                 for r in rows]
        image = _view(cube, name, project=True)
        figures.append(_figure(_png(image, LUNG_WINDOW), _overlay(image.shape, name, marks=marks),
                               f"{name} maximum-intensity projection, lung window"))
    return figures


def _position(world: np.ndarray, centre: np.ndarray, spacing: float, edge: int, name: str) -> tuple:
    """Image row and column of a world point in the ``name`` view of a cube of ``edge`` samples."""
    zyx = (world[::-1] - centre[::-1]) / spacing + edge // 2
    (row_axis, col_axis), _, upwards = VIEWS[name]
    row = (edge - 1 - zyx[row_axis]) if upwards else zyx[row_axis]
    return float(row), float(zyx[col_axis])


def _finding_images(scan: data.CTScan, row: dict) -> tuple:
    """``(figures, padded)`` for one finding: each view in a lung and a soft-tissue window."""
    centre = _world(row)
    cube, padded = _cube(scan, centre, CROP_MM, CROP_SPACING_MM)
    radius = (_diameter(row) or UNKNOWN_DIAMETER_MM) / 2.0 / CROP_SPACING_MM
    mid = cube.shape[0] // 2
    note = "padded with air: the scan ends here" if padded else ""
    figures = []
    for name in ("axial", "coronal", "sagittal"):
        image = _view(cube, name)
        row_at = (cube.shape[0] - 1 - mid) if VIEWS[name][2] else mid
        overlay = _overlay(image.shape, name, circles=[(row_at, mid, radius)], note=note)
        figures += [_figure(_png(image, window), overlay, f"{name}, {window_name} window")
                    for window, window_name in ((LUNG_WINDOW, "lung"), (SOFT_WINDOW, "soft-tissue"))]
    return figures, padded


# --- the page ------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:12px;color:#222}
h1{font-size:1.3em;word-break:break-all}h2{font-size:1.1em;margin-top:1.4em}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;flex:1 1 160px;max-width:260px}
figure img{width:100%;height:auto;background:#000;display:block}figcaption{font-size:.8em;color:#555}
.view{position:relative}.view svg{position:absolute;left:0;top:0;width:100%;height:100%;overflow:visible}
.ring{fill:none;stroke:#ffb000}.mark{fill:#ffb000}.edge{fill:#7fd4ff;font-weight:bold}.alert{fill:#ff6060}
table{border-collapse:collapse;font-size:.9em;max-width:100%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}td{overflow-wrap:anywhere}th{white-space:nowrap}
section.finding{border-top:2px solid #ddd;margin-top:1em}.warn{color:#a00}.note{font-size:.85em;color:#555}
"""


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _facts(row: dict) -> str:
    calibrated = row.get("calibrated_probability")
    raw = row["probability"]
    cells = [("probability", f"{calibrated:.3f} calibrated (raw score {raw:.3f})" if calibrated is not None
              else f"{raw:.3f} (raw score; no calibration recorded)"),
             ("diameter", f"{_number(row.get('diameter_mm'), 1)} mm ({row.get('size_source') or '-'}); plain "
                          f"measurement {_number(row.get('plain_diameter_mm'), 1)} mm"),
             ("follow-up", "yes" if row.get("follow_up") else "no"),
             ("category", row.get("category") or "-"), ("recommendation", row.get("recommendation") or "-"),
             ("world mm (x, y, z; LPS)", ", ".join(f"{v:.1f}" for v in _world(row))),
             ("voxel (i, j, k)", ", ".join(f"{v:.1f}" for v in row["voxel_ijk"]))]
    if row.get("warning"):
        cells.append(("warning", row["warning"]))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in cells) + "</table>"


def _finding_section(scan: data.CTScan, row: dict, title: str) -> str:
    figures, padded = _finding_images(scan, row)
    edge = " <span class='warn'>(at the scan's edge: padded with air)</span>" if padded else ""
    anchor = f"finding-{row['number']}" if "number" in row else "near"
    return (f"<section class='finding' id='{anchor}'><h2>{html.escape(title)}{edge}</h2>"
            f"{_facts(row)}<div class='grid'>{''.join(figures)}</div></section>")


def _summary(scan: data.CTScan, scan_path, uid: str, rows: list, info: dict) -> str:
    categories: dict = {}
    for row in rows:
        category = row.get("category") or "no follow-up"
        categories[category] = categories.get(category, 0) + 1
    cells = [("scan", str(scan_path)), ("name", uid),
             ("voxel size (mm, x y z)", " x ".join(f"{v:.3g}" for v in scan.spacing)),
             ("findings", ", ".join(f"{n} {c}" for c, n in categories.items()) or "none"),
             ("cutoff", info.get("cutoff_text", "-")), ("guideline", info.get("guideline", "-")),
             ("assumptions", info.get("assumptions", "-")), ("points", info.get("points", "-"))]
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in cells) + "</table>"


def _page(scan: data.CTScan, scan_path, uid: str, rows: list, near: list, info: dict) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
             f"content='width=device-width, initial-scale=1'><title>Findings: {html.escape(uid)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Findings: {html.escape(uid)}</h1><p class='warn'>{html.escape(RESEARCH_ONLY)}</p>",
             _summary(scan, scan_path, uid, rows, info),
             "<h2>Overview</h2><div class='grid'>" + "".join(_overview(scan, rows)) + "</div>"]
    if not rows:
        parts.append("<p>No finding at or above the cutoff.</p>")
    parts += [_finding_section(scan, row, f"Finding {row['number']}") for row in rows]
    if near:
        parts.append(f"<details><summary>Near the cutoff: {len(near)} candidate(s) below it by at most "
                     f"{NEAR_LOGITS:g} (raw logit)</summary>"
                     + "".join(_finding_section(scan, row, f"Near the cutoff {n}")
                               for n, row in enumerate(near, start=1)) + "</details>")
    parts.append("<p class='note'>Images: world-axis-aligned resampling of the scan (LPS), radiological "
                 "convention (R on the left). Viewer files beside this page: findings.mrk.json (3D Slicer), "
                 "findings.nii.gz (label map on the CT's grid), findings.json.</p></body></html>")
    return "\n".join(parts)
