"""``synth --background``: nodules inserted into real chest CTs, written as a LUNA16-shaped folder.

Each background CT (``.mhd``, NIfTI or a DICOM series folder) is read once and copied ``copies`` times; each
copy gets its own nodules (``nodules.py``: solid, part-solid or ground-glass; round, lobulated or spiculated;
3-30 mm), placed in the CT's real lungs as found from the CT itself, and drawn at the CT's own voxels with
partial volume through its direction matrix. A copy keeps its background's grid (size, spacing, origin,
direction) and gets a new seriesuid.

Where things are found (on a 1 mm analysis grid along the scan's own axes, see :class:`LungMaps`):

* lung: ``detect``'s lung mask (air components inside the body, holes filled, closed);
* lung air: lung voxels below ``AIR_HU``; vessels: lung voxels at tissue density (``VESSEL_HU`` and above);
* pleura: the boundary of the lung mask; fissures: thin bright sheets in the parenchyma (the smallest Hessian
  eigenvalue of the lightly smoothed CT strongly negative, the other two small), where the scan shows them.

Placements: ``isolated`` (clear of vessels and the pleura), ``vessel`` (touching a vessel, or engulfing one
thinner than the nodule), ``pleura`` (centre inside the lung, the nodule reaching into the chest wall) and
``fissure`` (centred on a fissure). Every nodule has at least ``MIN_AIR_SHARE`` of its volume in lung air and
keeps clear of the other nodules, inserted or real.

The intensity model keeps the CT's own noise: a voxel a nodule fills by a fraction ``f`` becomes
``hu + f * max(0, nodule_hu - smooth(hu))``, so a nodule replaces the local mean, never darkens a vessel, and
carries the scan's own noise texture.

Coordinates: world mm ``(x, y, z)`` as ITK/LPS physical points (the LUNA16 CSVs); arrays ``[k, j, i]``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import common
import data
import detect
import nodules
import phantom
from data import CTScan
from common import UserError

PLACEMENTS = ("isolated", "vessel", "pleura", "fissure")
TYPE_SHARES = (("solid", 0.6), ("part-solid", 0.2), ("ground-glass", 0.2))
SHAPE_SHARES = (("round", 0.4), ("lobulated", 0.35), ("spiculated", 0.25))
AIR_HU = -500.0             # lung voxels below: lung air
VESSEL_HU = -500.0          # lung voxels at or above: vessels (and other tissue inside the lung mask)
MIN_AIR_SHARE = 0.6         # of a nodule's volume, in lung air
CLEARANCE_MM = 4.0          # between the surfaces of two nodules
FISSURE_SIGMA_MM = 1.0
FISSURE_CURVATURE = 20.0    # HU / mm^2: the sheet's cross curvature must exceed this
FISSURE_FLATNESS = 0.25     # the other two curvatures at most this share of it
MIN_SHEET_POINTS = 40       # a fissure holds together over at least this many tested voxels (2 mm apart)
NEGATIVE_SHARES = (("vessel", 0.3), ("vessel-crossing", 0.15), ("pleura", 0.15), ("near-nodule", 0.15),
                   ("parenchyma", 0.25))
TRIES = 60
FULL_AFTER_MISSES = 5    # this many nodules in a row that fit nowhere: the lungs are full


# --- what the CT shows ----------------------------------------------------------

@dataclass
class LungMaps:
    """Maps of one background on a 1 mm grid along its own axes (``grid``: origin and direction of the scan,
    1 mm spacing), cropped to the lungs: array element ``[k, j, i]`` is grid index ``(i, j, k) + offset_ijk``.

    hu: float32 HU; lung, air, vessel: bool; depth_mm: distance inside the lung to its boundary (0 outside);
    vessel_mm: signed distance to the vessels (mm, negative inside one); vessel_radius_mm: in a vessel, about
    its local radius (the largest depth inside it over the voxel's 3 x 3 x 3 neighbourhood); fissure:
    ``(F, 3)`` int ``[k, j, i]`` points on fissures; crossing: ``(C, 3)`` int ``[k, j, i]`` vessel points
    where vessels branch or cross.
    """
    grid: CTScan
    offset_ijk: np.ndarray
    hu: np.ndarray
    lung: np.ndarray
    air: np.ndarray
    vessel: np.ndarray
    depth_mm: np.ndarray
    vessel_mm: np.ndarray
    vessel_radius_mm: np.ndarray
    fissure: np.ndarray
    crossing: np.ndarray
    spots: dict = field(default_factory=dict)

    def to_world(self, index_kji: np.ndarray) -> np.ndarray:
        """``(N, 3)`` array indices ``[k, j, i]`` (float allowed) -> world mm ``(N, 3)``."""
        return data.index_to_world(np.asarray(index_kji, float)[:, ::-1] + self.offset_ijk, self.grid)

    def to_index(self, world_xyz: np.ndarray) -> np.ndarray:
        """World mm ``(N, 3)`` -> float array indices ``[k, j, i]``."""
        return (data.world_to_index(world_xyz, self.grid) - self.offset_ijk)[:, ::-1]


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (mm, 1 mm voxels) to a boolean mask's boundary: negative inside, positive outside."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=False,
                                                               squaredDistance=False, useImageSpacing=True))


def _sample(rng: np.random.Generator, flat: np.ndarray, n: int) -> np.ndarray:
    return flat if len(flat) <= n else rng.choice(flat, n, replace=False)


def _fissure_points(hu: np.ndarray, depth: np.ndarray, vessel_mm: np.ndarray) -> np.ndarray:
    """``(F, 3)`` ``[k, j, i]`` points of bright thin sheets in the parenchyma, away from vessels and the
    pleura.

    Every other voxel on each axis is tested (sheet: the smallest Hessian eigenvalue of the CT smoothed by
    ``FISSURE_SIGMA_MM`` below ``-FISSURE_CURVATURE``, the others within ``FISSURE_FLATNESS`` of it); only
    sheets that hold together over ``MIN_SHEET_POINTS`` tested voxels are kept, which noise and vessel walls
    do not."""
    import SimpleITK as sitk
    smoothed = detect._smooth(hu, 1.0, FISSURE_SIGMA_MM)
    coarse = (slice(2, -2, 2),) * 3
    tested = smoothed[coarse]
    pool = (depth[coarse] > 6.0) & (vessel_mm[coarse] > 3.0) & (tested > -900.0) & (tested < -500.0)
    index = np.argwhere(pool)
    eigen = detect.hessian_eigenvalues(smoothed, index * 2 + 2)
    across = -eigen[:, 0]
    sheet = (across > FISSURE_CURVATURE) & (np.abs(eigen[:, 1:]).max(axis=1) < FISSURE_FLATNESS * across)
    hits = np.zeros(pool.shape, np.uint8)
    hits[tuple(index[sheet].T)] = 1
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(hits), True))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= MIN_SHEET_POINTS)
    return np.argwhere(np.isin(labels, keep)) * 2 + 2


def _crossing_points(hu: np.ndarray, vessel: np.ndarray, depth: np.ndarray, rng) -> np.ndarray:
    """``(C, 3)`` ``[k, j, i]`` vessel points that look most like blobs (branchings and crossings)."""
    pool = np.flatnonzero(vessel.ravel() & (depth.ravel() > 4.0))
    index = np.stack(np.unravel_index(_sample(rng, pool, 60_000), hu.shape), axis=1)
    index = index[np.all((index >= 2) & (index < np.array(hu.shape) - 2), axis=1)]
    if not len(index):
        return index
    score = detect.blobness(detect._smooth(np.minimum(hu, 100.0), 1.0, 1.5), index)
    return index[score >= np.quantile(score, 0.9)]


def lung_maps(scan: CTScan, rng: np.random.Generator) -> Optional[LungMaps]:
    """The :class:`LungMaps` of a CT, or None when it holds no lung."""
    volume, grid = detect.resample_to_grid(scan, 1.0)
    if min(volume.shape) < 8:
        return None
    mask, _ = detect.lung_mask(volume, grid)
    if mask is None:
        return None
    lo, hi = detect._crop_box(mask, volume.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    lung = detect.mask_on_grid(mask, volume.shape)[box]
    hu = np.ascontiguousarray(volume[box])
    del volume
    vessel = lung & (hu >= VESSEL_HU)
    depth = np.maximum(-_signed_distance(lung), 0.0).astype(np.float32)
    vessel_mm = _signed_distance(vessel).astype(np.float32)
    vessel_radius = detect.neighbourhood_max(np.maximum(-vessel_mm, 0.0))
    return LungMaps(grid, lo[::-1].astype(float), hu, lung, lung & (hu < AIR_HU), vessel, depth, vessel_mm,
                    vessel_radius,
                    _fissure_points(hu, depth, vessel_mm), _crossing_points(hu, vessel, depth, rng))


# --- placing nodules ---------------------------------------------------------------

# every spot any nodule (1.5-15 mm radius) of a placement could use: the radius rules narrow it
LOOSE_RULES = {
    ("isolated", "isolated"): lambda m: m.air & (m.depth_mm > 5.5) & (m.vessel_mm > 3.5),
    ("vessel", "touching"): lambda m: (m.air & (m.depth_mm > 4.5) & (m.vessel_mm > 0.5)
                                       & (m.vessel_mm <= 15.5)),
    ("vessel", "engulfing"): lambda m: m.vessel & (m.vessel_radius_mm <= 6.0) & (m.depth_mm > 4.5),
    ("pleura", "pleura"): lambda m: m.air & (m.depth_mm >= 0.45) & (m.depth_mm <= 10.5),
}


def _loose_centres(maps: LungMaps, placement: str, detail: str) -> np.ndarray:
    """Flat indices of the analysis grid that suit some nodule of a placement (kept on ``maps``)."""
    key = (placement, detail)
    if key not in maps.spots:
        if placement == "fissure":
            flat = (np.ravel_multi_index(maps.fissure.T, maps.hu.shape) if len(maps.fissure)
                    else np.zeros(0, int))
        else:
            flat = np.flatnonzero(LOOSE_RULES[key](maps).ravel())
        maps.spots[key] = flat
    return maps.spots[key]


def _centres_for(maps: LungMaps, placement: str, radius: float, detail: str) -> np.ndarray:
    """Flat indices of the analysis grid where a nodule of ``radius`` mm may be centred for a placement."""
    flat = _loose_centres(maps, placement, detail)
    depth, vessel_mm = maps.depth_mm.ravel()[flat], maps.vessel_mm.ravel()[flat]
    if placement == "isolated":
        ok = (depth > radius + 4.0) & (vessel_mm > radius + 2.0)
    elif placement == "vessel" and detail == "touching":
        ok = (depth > radius + 3.0) & (vessel_mm > radius - 1.0) & (vessel_mm <= radius + 0.5)
    elif placement == "vessel":
        # engulfing: centred in a vessel whose radius is at most 0.4 of the nodule's
        ok = (maps.vessel_radius_mm.ravel()[flat] <= 0.4 * radius) & (depth > radius + 3.0)
    elif placement == "pleura":      # reaching 0.3 to 0.7 of its radius into the chest wall
        ok = (depth >= 0.3 * radius) & (depth <= 0.7 * radius)
    else:
        ok = (depth > radius + 3.0) & (vessel_mm > 0.5 * radius)
    return flat[ok]


def lung_air_share(maps: LungMaps, nodule: nodules.Nodule) -> float:
    """Share of a nodule's volume that lies in lung air, the nodule drawn on the analysis grid (outside the
    grid counts as not air)."""
    origin = maps.to_world(np.zeros((1, 3)))[0]
    rendered = nodules.render_fractions(nodule, origin, maps.grid.spacing, maps.grid.direction, maps.hu.shape)
    if rendered is None:
        return 0.0
    lo, hi, fraction, _ = rendered
    air = maps.air[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]
    total = nodules.filled_volume_mm3(fraction, np.ones(3))
    return float(fraction[air].sum(dtype=np.float64)) / max(total, math.pi * nodule.diameter_mm ** 3 / 6.0)


@dataclass
class Placed:
    """An inserted nodule and where it went."""
    nodule: nodules.Nodule
    placement: str
    detail: str
    air_share: float


def _clear_of(centre: np.ndarray, reach: float, others: Sequence[tuple]) -> bool:
    """Does a nodule keep ``CLEARANCE_MM`` from every ``(centre_xyz, radius_mm)`` of ``others``?"""
    return all(np.linalg.norm(centre - c) > reach + r + CLEARANCE_MM for c, r in others)


def _draw(rng: np.random.Generator, shares: tuple) -> str:
    names, weights = zip(*shares)
    return names[int(rng.choice(len(names), p=np.array(weights) / sum(weights)))]


def place_nodule(rng, maps: LungMaps, scan: CTScan, placement: str, occupied: list, diameter_mm=None,
                 kind=None, shape=None) -> Optional[Placed]:
    """One nodule at a random spot of ``placement``, or None when none fits. Its type, shape and size
    (log-uniform 3-30 mm) are drawn unless given. ``occupied``: ``(centre_xyz, radius_mm)`` of the nodules
    already there."""
    kind, shape = kind or _draw(rng, TYPE_SHARES), shape or _draw(rng, SHAPE_SHARES)
    diameter = float(diameter_mm or math.exp(rng.uniform(math.log(nodules.MIN_DIAMETER_MM),
                                                          math.log(nodules.MAX_DIAMETER_MM))))
    if shape == "spiculated" and diameter < 6.0:
        shape = "lobulated"          # spicules of a nodule under 6 mm are under a voxel
    details = [["touching", "engulfing"][int(rng.integers(2))]] if placement == "vessel" else [placement]
    for detail in details + (["touching"] if details == ["engulfing"] else []):
        found = _try_spots(rng, maps, scan, placement, detail, diameter, kind, shape, occupied)
        if found is not None:
            return found
    return None


def _try_spots(rng, maps: LungMaps, scan: CTScan, placement: str, detail: str, diameter: float, kind: str,
               shape: str, occupied: list) -> Optional[Placed]:
    """Up to ``TRIES`` random spots of a placement for one nodule: the first that fits, or None."""
    radius = diameter / 2.0
    flat = _centres_for(maps, placement, radius, detail)
    nodule = nodules.random_nodule(rng, np.zeros(3), diameter, kind, shape)   # its form; the spot comes next
    for _ in range(TRIES if len(flat) else 0):
        centre_kji = np.array(np.unravel_index(int(flat[rng.integers(len(flat))]), maps.hu.shape))
        centre = maps.to_world(centre_kji[None] + rng.uniform(-0.5, 0.5, 3))[0]
        nodule.centre_xyz = centre
        if not _clear_of(centre, nodule.reach_mm, occupied):
            continue
        if not data.inside_scan(scan, centre[None], nodule.reach_mm + 2.0)[0]:
            continue
        share = lung_air_share(maps, nodule)
        if share >= MIN_AIR_SHARE:
            return Placed(nodule, placement, detail, share)
    return None


def insert_into(hu: np.ndarray, scan: CTScan, nodule: nodules.Nodule) -> None:
    """Draw one nodule into ``hu`` (int16 ``[k, j, i]`` on ``scan``'s grid) in place (see the module
    docstring)."""
    rendered = nodules.render_fractions(nodule, scan.origin, scan.spacing, scan.direction, hu.shape)
    if rendered is None:
        return
    lo, hi, fraction, core = rendered
    box = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    region = hu[box].astype(np.float32)
    lift = np.maximum(nodules.target_hu(nodule, core) - _local_mean(region, scan.spacing), 0.0) * fraction
    hu[box] = np.clip(np.rint(region + lift), phantom.HU_MIN, phantom.HU_MAX).astype(np.int16)


def _local_mean(region: np.ndarray, spacing) -> np.ndarray:
    """The region smoothed with a 1.5 mm Gaussian on its own voxel spacing (its mean without the noise)."""
    import SimpleITK as sitk
    pad = 4    # the recursive filter needs a few voxels on every axis
    image = sitk.GetImageFromArray(np.pad(region, pad, mode="edge"))
    image.SetSpacing(tuple(float(s) for s in spacing))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(image, 1.5))
    return smooth[pad:-pad, pad:-pad, pad:-pad]


# --- candidates -----------------------------------------------------------------------

def _flat_points(rng, maps: LungMaps, flat: np.ndarray, n: int) -> np.ndarray:
    """World mm of up to ``n`` random analysis-grid voxels among ``flat``, jittered within their voxel."""
    if not len(flat) or n <= 0:
        return np.zeros((0, 3))
    pick = flat[rng.integers(0, len(flat), n)]
    index = np.stack(np.unravel_index(pick, maps.hu.shape), axis=1) + rng.uniform(-0.4, 0.4, (n, 3))
    return maps.to_world(index)


def _negative_pool(rng, maps: LungMaps, source: str, placed: list, n: int) -> np.ndarray:
    """Up to ``n`` world-mm proposals of one negative type."""
    depth = maps.depth_mm.ravel()
    if source == "vessel":
        return _flat_points(rng, maps, np.flatnonzero(maps.vessel.ravel() & (depth > 3.0)), n)
    if source == "vessel-crossing" and len(maps.crossing):
        pick = maps.crossing[rng.integers(0, len(maps.crossing), n)]
        return maps.to_world(pick + rng.uniform(-0.4, 0.4, (n, 3)))
    if source == "pleura":
        return _flat_points(rng, maps, np.flatnonzero(maps.lung.ravel() & (depth <= 2.0)), n)
    if source == "near-nodule" and placed:
        centres = np.array([p.nodule.centre_xyz for p in placed])
        reach = np.array([p.nodule.reach_mm for p in placed])
        pick = rng.integers(0, len(placed), n)
        unit = rng.standard_normal((n, 3))
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        return centres[pick] + unit * (reach[pick] + rng.uniform(3.0, 10.0, n))[:, None]
    return _flat_points(rng, maps, np.flatnonzero(maps.air.ravel() & (depth > 4.0)
                                                  & (maps.vessel_mm.ravel() > 3.0)), n)


def candidate_rows(rng, maps: LungMaps, scan: CTScan, placed: list, real: list, negatives: int) -> list:
    """``(world_xyz, class, source)`` of one copy: 1-3 positives near each nodule (inserted or real, within a
    quarter of its radius of the centre) and ``negatives`` class-0 points of the types of ``NEGATIVE_SHARES``,
    each more than 2 mm outside every nodule."""
    rows = []
    for centre, radius, source in ([(p.nodule.centre_xyz, p.nodule.radius_mm, "nodule") for p in placed]
                                   + [(c, r, "real nodule") for c, r in real]):
        for _ in range(int(rng.integers(1, 4))):
            unit = rng.standard_normal(3)
            rows.append((centre + unit / np.linalg.norm(unit) * rng.uniform(0.0, 0.25) * radius, 1, source))
    occupied = [(p.nodule.centre_xyz, p.nodule.reach_mm) for p in placed] + list(real)
    counts = [int(negatives * share) for _, share in NEGATIVE_SHARES]
    counts[0] += negatives - sum(counts)
    for (source, _), count in zip(NEGATIVE_SHARES, counts):
        pool = _negative_pool(rng, maps, source, placed, 4 * count + 8) if count else np.zeros((0, 3))
        keep = data.inside_scan(scan, pool) if len(pool) else np.zeros(0, bool)
        for centre, reach in occupied:
            keep &= np.linalg.norm(pool - centre, axis=1) > reach + 2.0
        rows += [(point, 0, source) for point in pool[keep][:count]]
    return [rows[i] for i in rng.permutation(len(rows))]


# --- the folder ------------------------------------------------------------------------

@dataclass
class Background:
    """A background CT as given: its path, seriesuid, and its own nodules (``(centre_xyz, radius_mm)``,
    world mm) and excluded findings (``(centre_xyz, diameter_mm)``) from ``--annotations``."""
    path: Path
    uid: str
    real: list = field(default_factory=list)
    excluded: list = field(default_factory=list)


@dataclass
class InsertSummary:
    """What :func:`write_inserted_folder` wrote: per-copy rows in ``scans``, per-nodule rows in ``nodules``,
    and the backgrounds it could not use (``skipped``: ``(path, reason)``; ``unreadable``: the subset of
    those)."""
    root: Path
    scans: list
    nodules: list
    candidates: int
    positives: int
    skipped: list
    unreadable: list
    seconds: float = 0.0


def series_uid_of(path: Path) -> str:
    """The seriesuid of a background: a DICOM folder's SeriesInstanceUID when it has one, else its name (a
    LUNA16 ``.mhd`` is named by its seriesuid)."""
    if Path(path).is_dir():
        import SimpleITK as sitk
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
        if files:
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            if reader.HasMetaDataKey("0020|000e"):
                return reader.GetMetaData("0020|000e").strip().rstrip("\x00")
    return detect.scan_name(path)


def _read_annotations(annotations: Optional[Path]) -> list:
    """``[nodules, excluded]`` point tables (diameter_mm): ``annotations`` and ``annotations_excluded.csv``
    beside it (None where absent), each read once for every background."""
    if annotations is None:
        return [None, None]
    excluded = annotations.parent / "annotations_excluded.csv"
    return [data.read_point_csv(annotations, "diameter_mm")[0],
            data.read_point_csv(excluded, "diameter_mm")[0] if excluded.is_file() else None]


def _annotated(tables: list, uid: str) -> tuple[list, list]:
    """The nodules ``(world xyz, radius mm)`` and excluded findings ``(world xyz, diameter mm)`` of a scan."""
    found = []
    for table in tables:
        mine = table.seriesuid == uid if table is not None else []
        found.append([(xyz, float(d)) for xyz, d in zip(table.world_xyz[mine], table.value[mine])]
                     if table is not None else [])
    return [(xyz, d / 2.0) for xyz, d in found[0] if d > 0], found[1]


def _copy_nodules(rng, maps: LungMaps, scan: CTScan, count: int, real: list) -> list:
    """Up to ``count`` nodules placed in one copy, placements in turn from a random start; a nodule that does
    not fit its placement tries the next, then ``isolated``; after ``FULL_AFTER_MISSES`` misses in a row, no
    more."""
    placed: list[Placed] = []
    occupied = list(real)
    start, misses = int(rng.integers(len(PLACEMENTS))), 0
    for n in range(count):
        for placement in (PLACEMENTS[(start + n) % 4], PLACEMENTS[(start + n + 1) % 4], "isolated"):
            found = place_nodule(rng, maps, scan, placement, occupied)
            if found is not None:
                placed.append(found)
                occupied.append((found.nodule.centre_xyz, found.nodule.reach_mm))
                break
        misses = 0 if found is not None else misses + 1
        if misses == FULL_AFTER_MISSES:
            break
    return placed


def write_inserted_folder(root, backgrounds: Sequence, copies: int = 1, nodules_per_scan: int = 10,
                          annotations=None, n_subsets: int = 1, seed: int = 0, negatives_per_scan: int = 40,
                          force: bool = False, progress=None) -> InsertSummary:
    """Write ``copies`` copies of each background CT with ``nodules_per_scan`` inserted nodules each, as a
    LUNA16-shaped folder under ``root`` (the module docstring says how); return what was written.

    Copy ``c`` of background ``b`` is drawn from ``SeedSequence([seed, b, c])`` and goes to subset
    ``(b * copies + c) % n_subsets``: the same seed gives identical files. A background is read once; one that
    cannot be read, or that holds no lung, is named in ``skipped`` and left out.
    """
    root = Path(root)
    if copies < 1 or nodules_per_scan < 0 or negatives_per_scan < 0 or not 1 <= n_subsets <= 10:
        raise UserError("--copies must be >= 1, --nodules-per-scan and --negatives-per-scan >= 0, "
                        "--n-subsets 1..10")
    if not backgrounds:
        raise UserError("give at least one --background CT")
    annotations = Path(annotations) if annotations is not None else None
    if annotations is not None and not annotations.is_file():
        raise UserError(f"{annotations}: no such annotations file")
    phantom._prepare_root(root, force)
    (root / phantom.UNFINISHED_MARK).write_text("synth is writing this folder; "
                                                "rerun synth with --force to finish it\n")
    start = time.perf_counter()
    tables = dict(annotations=[], excluded=[], candidates=[], sources=[], uids=[])
    known = _read_annotations(annotations)
    scans, inserted, skipped, unreadable = [], [], [], []
    for b, path in enumerate(backgrounds):
        path = Path(path)
        try:
            scan = data.read_ct(path)
        except UserError as err:   # the reader's message names the file; it is listed under it
            skipped.append((str(path), str(err).removeprefix(f"{path}: ")))
            unreadable.append(str(path))
            continue
        background = Background(path, series_uid_of(path))
        background.real, background.excluded = _annotated(known, background.uid)
        maps = lung_maps(scan, np.random.default_rng(np.random.SeedSequence([seed, b])))
        if maps is None:
            skipped.append((str(path), "no lung found in this CT; skipped"))
            continue
        for c in range(copies):
            rng = np.random.default_rng(np.random.SeedSequence([seed, b, c]))
            subset = (b * copies + c) % n_subsets
            row, placed = _write_copy(rng, root, subset, scan, maps, background, c, nodules_per_scan,
                                      negatives_per_scan, tables)
            scans.append(row)
            inserted += [_nodule_row(p, row["seriesuid"], background, c) for p in placed]
            if progress is not None:
                progress(row)
    if not scans:
        (root / phantom.UNFINISHED_MARK).unlink()
        raise UserError("no copy was written: " + "; ".join(f"{p}: {why}" for p, why in skipped))
    phantom._write_tables(root, tables["annotations"], tables["excluded"], tables["candidates"],
                          tables["sources"], tables["uids"])
    summary = InsertSummary(root, scans, inserted, len(tables["candidates"]),
                            sum(r[-1] == "1" for r in tables["candidates"]), skipped, unreadable)
    manifest = {"synthetic": "nodules inserted into real CT", "seed": seed, "copies": copies,
                "nodules_per_scan": nodules_per_scan, "negatives_per_scan": negatives_per_scan,
                "n_subsets": n_subsets, "annotations": None if annotations is None else str(annotations),
                "subsets": n_subsets, "scans": len(scans), "nodules": len(tables["annotations"]),
                "inserted_nodules": inserted, "scan_geometry": scans,
                "skipped": [{"background": p, "reason": why} for p, why in skipped]}
    common.atomic_write_json(root / "phantom_manifest.json", manifest)
    (root / phantom.UNFINISHED_MARK).unlink()
    summary.seconds = time.perf_counter() - start
    return summary


def _write_copy(rng, root: Path, subset: int, scan: CTScan, maps: LungMaps, background: Background, copy: int,
                nodules_per_scan: int, negatives_per_scan: int, tables: dict) -> tuple[dict, list]:
    """One copy: nodules placed and drawn, the scan written, its table rows added; ``(scan row, placed)``."""
    uid = phantom._series_uid(rng)
    placed = _copy_nodules(rng, maps, scan, nodules_per_scan, background.real)
    hu = np.array(scan.hu, dtype=np.int16, copy=True)
    for p in placed:
        insert_into(hu, scan, p.nodule)
    copy_scan = CTScan(hu, np.asarray(scan.origin, float), np.asarray(scan.spacing, float),
                       np.asarray(scan.direction, float), uid)
    folder = root / f"subset{subset}"
    folder.mkdir(parents=True, exist_ok=True)
    phantom._write_scan_mhd(copy_scan, folder)
    del hu, copy_scan
    fmt = phantom._fmt
    for p in placed:
        tables["annotations"].append([uid, *map(fmt, p.nodule.centre_xyz), f"{p.nodule.diameter_mm:.3f}"])
    for centre, radius in background.real:
        tables["annotations"].append([uid, *map(fmt, centre), f"{2 * radius:.3f}"])
    for centre, diameter in background.excluded:
        tables["excluded"].append([uid, *map(fmt, centre), f"{diameter:g}"])
    for point, label, source in candidate_rows(rng, maps, scan, placed, background.real, negatives_per_scan):
        tables["candidates"].append([uid, *map(fmt, point), str(label)])
        tables["sources"].append([uid, *map(fmt, point), str(label), source])
    tables["uids"].append(uid)
    row = {"seriesuid": uid, "subset": subset, "background": str(background.path),
           "background_seriesuid": background.uid, "copy": copy, "shape_zyx": list(scan.hu.shape),
           "spacing_xyz": np.asarray(scan.spacing, float).tolist(),
           "origin_xyz": np.asarray(scan.origin, float).tolist(),
           "direction": np.asarray(scan.direction, float).tolist(), "nodules_requested": nodules_per_scan,
           "nodules_placed": len(placed), "real_nodules": len(background.real)}
    return row, placed


def _nodule_row(p: Placed, uid: str, background: Background, copy: int) -> dict:
    n = p.nodule
    return {"seriesuid": uid, "centre_xyz": [round(float(v), 4) for v in n.centre_xyz],
            "diameter_mm": round(n.diameter_mm, 3), "type": n.kind, "shape": n.shape,
            "placement": p.placement, "detail": p.detail, "air_share": round(p.air_share, 3),
            "background": str(background.path), "background_seriesuid": background.uid, "copy": copy}


def summary_table(summary: InsertSummary):
    """A rich table of what :func:`write_inserted_folder` wrote, per placement, captioned as synthetic."""
    table = common.item_table(f"Nodules inserted into real CT in {summary.root}",
                              "[yellow]Real CT backgrounds with synthetic nodules; research data, not for "
                              "clinical use.[/]")
    requested = sum(s["nodules_requested"] for s in summary.scans)
    table.add_row("copies written", str(len(summary.scans)))
    table.add_row("nodules placed / requested", f"{len(summary.nodules)} / {requested}")
    for placement in PLACEMENTS:
        table.add_row(f"  {placement}", str(sum(n["placement"] == placement for n in summary.nodules)))
    table.add_row("real nodules kept", str(sum(s["real_nodules"] for s in summary.scans)))
    table.add_row("candidates (class 1)", f"{summary.candidates} ({summary.positives})")
    table.add_row("time", f"{summary.seconds:.1f} s")
    return table
