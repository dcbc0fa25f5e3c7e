"""Detect stage: nodule candidates from a bare CT (a lung mask, then multi-scale blob detection).

Coordinates: candidates are world mm ``(x, y, z)``, ITK/LPS physical points as in the LUNA16 CSVs. Every
voxel index is an ITK index ``(i, j, k)`` of a grid that keeps the scan's origin and direction matrix and
changes only the spacing; arrays are indexed ``[k, j, i]`` = ``[z, y, x]`` and all index <-> world maths
goes through :func:`data.index_to_world`.

The detector, per scan:

1. Resample the HU volume to ``GRID_MM`` (1 mm) voxels along the scan's own axes (linear; outside is air).
2. Lung mask on a 2 mm copy (2 x 2 x 2 block means): the body is the largest component at tissue density, its
   holes filled on every axial slice (so the air under the body, between it and the table or the arms, is not
   in it); lung air is the air (below ``AIR_HU``, -400 HU) inside the body and more than ``OUTSIDE_MARGIN_MM``
   from the air around it. Every component of lung air with at least ``MIN_PIECE_ML`` and a median above
   ``GAS_HU`` is kept (both lungs, and an apex or a lobe the scan shows apart; bowel and stomach gas are
   darker), holes filled, then a closing with a ball of ``CLOSING_MM`` (by distance maps), which takes a
   nodule on the pleura (a bite out of the air region) into the mask, which then reaches ``PLEURA_MARGIN_MM``
   further, so that a nodule centred on the pleura is not cut in half. Under ``MIN_LUNG_ML`` of lung: no lung,
   no candidates, a warning naming the scan.
3. HU clipped at ``CLIP_HU`` (-600: solid and ground-glass blobs compete by shape, not density) and set to the
   lungs' median HU outside the mask, so the chest wall does not hide a nodule that touches it; then
   scale-normalised differences of Gaussians (``(G(s) - G(s * sqrt 2)) / (sqrt 2 - 1)``, about ``-s^2`` times
   the Laplacian of Gaussian: bright blobs positive, in HU) at ``SIGMAS_MM`` (blobs of about 3 to 35 mm
   across), on a pyramid: 1 mm voxels up to ``s`` = 2.26 mm, then 2 mm, then 4 mm.
4. Local maxima (3 x 3 x 3) of each scale inside the mask, above ``MIN_SCORE_HU``, scored by the response
   times their blobness (Hessian eigenvalue ratio: a ball 1, a vessel or a wall near 0) times
   ``(min(s, SCALE_CAP_MM) / 1 mm) ** SCALE_POWER``;
   all scales pooled and merged greedily by score: a point within ``MERGE_MM`` of a higher one, or within the
   smaller blob radius (``sqrt 3 * s``) of the two, is dropped; at most ``max_per_scan`` remain, best first.

The clip, the blobness weight and the pleural margin were chosen on real CT with inserted nodules
(``bench.py real-anatomy``, seed 1001; BENCHMARKS.md gives the figures on a seed not used for the choice), the
scale weight on seeds 1001, 2002 and 3003, and measured on 4004.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

import common
import data
import options
from data import CTScan, PointTable
from common import UserError

GRID_MM = 1.0               # voxel size the detector works at
AIR_HU = -400.0             # below: air or aerated lung, for the lung mask
OUTSIDE_HU = -950.0         # below, on 2 mm block means, and touching the in-plane border: the air around
                            # the body
OUTSIDE_MARGIN_MM = 4.0     # lung air this close to the air around the body is not lung (the skin's
                            # partial volume)
MIN_LUNG_ML = 100.0         # less air than this inside the body: no lung in the scan
MIN_PIECE_ML = 2.0          # smaller air components are not kept as lung
GAS_HU = -975.0             # an air component whose median (2 mm block means) is below this is gas, not lung
PLEURA_MARGIN_MM = 2.0      # the mask searched is the lung mask and this much beyond it
CLOSING_MM = 15.0           # ball radius of the mask's closing: keeps nodules on the pleura up to 30 mm
                            # inside
SIGMAS_MM = (0.8, 1.13, 1.6, 2.26, 3.2, 4.5, 6.4, 9.05, 12.8)   # Gaussian scales, ratio sqrt 2
LEVEL_LAST_SIGMA = (2.26, 6.4)  # the pyramid halves its voxel count per axis after these scales
CLIP_HU = -600.0            # brighter is clipped: solid and ground-glass blobs compete by shape, not density
MIN_SCORE_HU = 10.0         # weaker blob responses are noise
RAW_PEAKS = 20_000          # local maxima of one scale kept before the blobness weighting
BLOBNESS_POWER = 1.0        # score = blob response * blobness ** this (tubes and walls score low)
SCALE_POWER = 0.25          # ... * (min(sigma, SCALE_CAP_MM) / 1 mm) ** this: the many finest-scale peaks of
SCALE_CAP_MM = 2.7          # small vessels and noise yield a little to blobs of 9 mm and more, which are not
                            # favoured among themselves (a large smooth shell of the lung would be)
MERGE_MM = 4.0              # candidates closer than this are one
DEFAULT_MAX_PER_SCAN = options.OPTIONS["max_per_scan"].defaults["detect"]
# What makes the candidates (the resumable files are keyed by it).
DETECTOR = dict(grid_mm=GRID_MM, air_hu=AIR_HU, outside_hu=OUTSIDE_HU, outside_margin_mm=OUTSIDE_MARGIN_MM,
                min_lung_ml=MIN_LUNG_ML, min_piece_ml=MIN_PIECE_ML, gas_hu=GAS_HU, closing_mm=CLOSING_MM,
                pleura_margin_mm=PLEURA_MARGIN_MM,
                clip_hu=CLIP_HU, sigmas_mm=list(SIGMAS_MM), min_score_hu=MIN_SCORE_HU, raw_peaks=RAW_PEAKS,
                blobness_power=BLOBNESS_POWER, scale_power=SCALE_POWER,
                scale_cap_mm=SCALE_CAP_MM, merge_mm=MERGE_MM)
CSV_COLUMNS = "seriesuid,coordX,coordY,coordZ,class,score"


@dataclass
class Detections:
    """Candidates of one scan: ``world_xyz`` ``(N, 3)`` float64 world mm (x, y, z), ``score`` ``(N,)`` float64
    (the weighted blob response of step 4, highest first), ``diameter_mm`` ``(N,)`` (the blob's scale,
    ``2 sqrt 3 s``), and ``warning`` ("" or why the scan has no candidates)."""
    world_xyz: np.ndarray
    score: np.ndarray
    diameter_mm: np.ndarray
    warning: str = ""

    @classmethod
    def none(cls, warning: str) -> "Detections":
        return cls(np.zeros((0, 3)), np.zeros(0), np.zeros(0), warning)


# --- grids --------------------------------------------------------------------

def grid_of(scan: CTScan, spacing_mm: float) -> CTScan:
    """A voxel grid with the scan's origin and direction and ``spacing_mm`` voxels (its ``hu`` is empty:
    only its geometry is used, through data.index_to_world)."""
    return CTScan(np.zeros((0, 0, 0), np.int16), np.asarray(scan.origin, float),
                  np.full(3, float(spacing_mm)), np.asarray(scan.direction, float), scan.name)


def resample_to_grid(scan: CTScan, spacing_mm: float = GRID_MM):
    """The scan's HU, linearly resampled to ``spacing_mm`` voxels along its own index axes: a float32 array
    ``[k, j, i]`` and its grid (same origin and direction; voxel 0 stays where it was). Outside is air."""
    import SimpleITK as sitk
    size_ijk = np.asarray(scan.hu.shape[::-1])
    extent = (size_ijk - 1) * np.asarray(scan.spacing, float)
    new_size = [int(n) for n in np.floor(extent / spacing_mm + 1e-6).astype(int) + 1]
    image = data.scan_to_image(scan)
    out = sitk.Resample(image, new_size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        (float(spacing_mm),) * 3, image.GetDirection(), float(data.AIR_HU), sitk.sitkFloat32)
    del image
    volume = sitk.GetArrayFromImage(out)
    return volume, grid_of(scan, spacing_mm)


def axial_array_axis(scan: CTScan) -> int:
    """The array axis (0, 1, 2 of ``[k, j, i]``) whose index axis runs most nearly along world z
    (head-foot)."""
    steps = data.index_to_world(np.eye(3), scan) - data.index_to_world(np.zeros((1, 3)), scan)
    return 2 - int(np.argmax(np.abs(steps[:, 2])))


def _image(array: np.ndarray, spacing_mm: float):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((float(spacing_mm),) * 3)
    return image


# --- lung mask ----------------------------------------------------------------

def _in_plane_border_labels(labels: np.ndarray, axial: int) -> np.ndarray:
    """Labels of the components that touch the faces of the two in-plane array axes."""
    faces = []
    for axis in range(3):
        if axis != axial:
            faces += [np.take(labels, 0, axis=axis).ravel(), np.take(labels, -1, axis=axis).ravel()]
    return np.unique(np.concatenate(faces))


def _border_components(binary: np.ndarray, spacing_mm: float, axial: int) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, volume_ml per label)`` of the face-connected components of a boolean ``[k, j, i]`` array;
    the components that touch the in-plane border count as 0 ml (label 0 is the background, 0 ml too)."""
    import SimpleITK as sitk
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(_image(binary.astype(np.uint8), spacing_mm),
                                                            False))
    volume_ml = np.bincount(labels.ravel()).astype(float) * spacing_mm ** 3 / 1000.0
    volume_ml[0] = 0.0
    volume_ml[_in_plane_border_labels(labels, axial)] = 0.0
    return labels, volume_ml


def _distance_outside(mask: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Distance (mm) of every voxel to the nearest voxel of a boolean mask (0 inside it)."""
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        _image(mask.astype(np.uint8), spacing_mm), insideIsPositive=False, squaredDistance=False,
        useImageSpacing=True))


def _body(hu: np.ndarray, spacing_mm: float, axial: int) -> np.ndarray:
    """Boolean ``[k, j, i]``: the body, the largest face-connected component at tissue density (``AIR_HU`` and
    above), with its holes filled on every axial slice (so the lungs and airways are in it, and the air
    between the body and the table or the arms is not)."""
    import SimpleITK as sitk
    components = sitk.ConnectedComponent(_image((hu >= AIR_HU).astype(np.uint8), spacing_mm), False)
    body = sitk.GetArrayFromImage(sitk.RelabelComponent(components, sortByObjectSize=True)) == 1
    filled = np.moveaxis(body, axial, 0).copy()
    for n, plane in enumerate(filled):
        if plane.any():
            plane_image = sitk.GetImageFromArray(plane.astype(np.uint8))
            filled[n] = sitk.GetArrayFromImage(sitk.BinaryFillhole(plane_image)) > 0
    return np.moveaxis(filled, 0, axial)


def _lung_components(hu: np.ndarray, spacing_mm: float, axial: int) -> Optional[np.ndarray]:
    """Boolean ``[k, j, i]`` of the lung air components of a HU volume (see the module docstring), or None.

    Lung air is air inside the body (:func:`_body`) and more than ``OUTSIDE_MARGIN_MM`` from the air around it
    (a body wall thinner than a voxel keeps the two apart). Every component of it with at least
    ``MIN_PIECE_ML`` and the density of aerated lung (median above ``GAS_HU``: not bowel or stomach gas) is
    kept, so an apex or a lobe that the scan shows apart from the rest stays in; the largest must hold
    ``MIN_LUNG_ML``."""
    body = _body(hu, spacing_mm, axial)
    air = (hu < AIR_HU) & body & (_distance_outside(~body, spacing_mm) > OUTSIDE_MARGIN_MM)
    labels, sizes = _border_components(air, spacing_mm, axial)
    order = np.argsort(sizes)[::-1]
    if sizes[order[0]] < MIN_LUNG_ML:
        return None
    candidates = [label for label in order if sizes[label] >= MIN_PIECE_ML]
    median = _component_medians(hu, labels, candidates)
    keep = [label for label in candidates if label == order[0] or median[label] > GAS_HU]
    return np.isin(labels, keep)


def _component_medians(hu: np.ndarray, labels: np.ndarray, wanted: list) -> dict:
    """Median HU of each wanted label's voxels."""
    picked = np.isin(labels, wanted)
    values, owners = hu[picked], labels[picked]
    order = np.argsort(owners, kind="stable")
    values, owners = values[order], owners[order]
    starts = np.searchsorted(owners, wanted)
    ends = np.searchsorted(owners, wanted, side="right")
    return {label: float(np.median(values[a:b])) for label, a, b in zip(wanted, starts, ends)}


def close_mask(mask: np.ndarray, spacing_mm: float, radius_mm: float) -> np.ndarray:
    """Morphological closing of a boolean ``[k, j, i]`` mask with a ball of ``radius_mm``, by two distance
    maps (cost independent of the radius); beyond the array nothing is eroded."""
    import SimpleITK as sitk
    dilated = _distance_outside(mask, spacing_mm) <= radius_mm
    inside = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        _image(dilated.astype(np.uint8), spacing_mm), insideIsPositive=True, squaredDistance=False,
        useImageSpacing=True))
    return (inside + spacing_mm > radius_mm) | mask   # inside: distance to the contour voxels, one voxel
                                                      # short


def lung_mask(volume: np.ndarray, grid: CTScan, closing_mm: float = CLOSING_MM):
    """Lung mask of a HU volume ``[k, j, i]`` on ``grid``: ``(mask, spacing_mm)``, the boolean mask on a
    2 x 2 x 2 block-mean copy of the volume (voxel ``n`` covers voxels ``2n, 2n + 1`` of ``volume``), or
    ``(None, ...)`` when the scan holds no lung."""
    import SimpleITK as sitk
    spacing = float(grid.spacing[0]) * 2
    coarse = sitk.GetArrayFromImage(sitk.BinShrink(_image(volume, grid.spacing[0]), [2, 2, 2]))
    lungs = _lung_components(coarse, spacing, axial_array_axis(grid))
    if lungs is None:
        return None, spacing
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(_image(lungs.astype(np.uint8), spacing))) > 0
    return close_mask(filled, spacing, closing_mm), spacing


def mask_on_grid(mask: np.ndarray, shape_zyx: tuple) -> np.ndarray:
    """A 2 x 2 x 2 block mask (see :func:`lung_mask`) on the finer grid of shape ``shape_zyx``."""
    fine = mask.repeat(2, axis=0).repeat(2, axis=1).repeat(2, axis=2)
    pad = [(0, max(0, n - f)) for n, f in zip(shape_zyx, fine.shape)]
    return np.pad(fine, pad, mode="edge")[:shape_zyx[0], :shape_zyx[1], :shape_zyx[2]]


# --- blobs --------------------------------------------------------------------

@dataclass
class _Peaks:
    """Local maxima of one scale: ``index_kji`` ``(N, 3)`` float on the 1 mm grid, ``score`` ``(N,)``
    (weighted, step 4), ``sigma_mm`` the scale."""
    index_kji: np.ndarray
    score: np.ndarray
    sigma_mm: float


def _smooth(volume: np.ndarray, spacing_mm: float, sigma_mm: float) -> np.ndarray:
    """Recursive Gaussian smoothing of a float32 ``[k, j, i]`` array with voxels of ``spacing_mm``
    (sigma in mm)."""
    import SimpleITK as sitk
    if sigma_mm <= 0:
        return volume
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(_image(volume, spacing_mm),
                                                                  float(sigma_mm)))


def neighbourhood_max(volume: np.ndarray) -> np.ndarray:
    """The maximum over each voxel's 3 x 3 x 3 neighbourhood (inside the array), one axis after the other."""
    result = volume
    for axis in range(3):
        source, result = result, result.copy()
        low, high = [slice(None)] * 3, [slice(None)] * 3
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        np.maximum(result[tuple(high)], source[tuple(low)], out=result[tuple(high)])
        np.maximum(result[tuple(low)], source[tuple(high)], out=result[tuple(low)])
    return result


def _local_maxima(response: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """``(index_kji (N, 3) int, value (N,))`` of the ``keep`` highest 3 x 3 x 3 local maxima above
    MIN_SCORE_HU."""
    flat = np.flatnonzero((response >= neighbourhood_max(response)) & (response > MIN_SCORE_HU))
    values = response.ravel()[flat]
    if len(flat) > keep:
        top = np.argpartition(values, len(flat) - keep)[len(flat) - keep:]
        flat, values = flat[top], values[top]
    return np.stack(np.unravel_index(flat, response.shape), axis=1), values


def hessian_eigenvalues(smoothed: np.ndarray, index_kji: np.ndarray) -> np.ndarray:
    """``(N, 3)`` ascending eigenvalues of the Hessian (per voxel squared) of a volume at points ``index_kji``
    ``(N, 3)`` int, by central differences; points on the array's rim are clamped one voxel in."""
    shape = np.array(smoothed.shape)
    p = np.clip(index_kji, 1, shape - 2)
    unit = np.eye(3, dtype=int)

    def at(offset) -> np.ndarray:
        q = p + offset
        return smoothed[q[:, 0], q[:, 1], q[:, 2]].astype(np.float64)
    centre = at(0)
    hessian = np.empty((len(p), 3, 3))
    for a in range(3):
        hessian[:, a, a] = at(unit[a]) - 2 * centre + at(-unit[a])
        for b in range(a + 1, 3):
            mixed = (at(unit[a] + unit[b]) - at(unit[a] - unit[b]) - at(unit[b] - unit[a])
                     + at(-unit[a] - unit[b])) / 4
            hessian[:, a, b] = hessian[:, b, a] = mixed
    return np.linalg.eigvalsh(hessian) if len(p) else np.zeros((0, 3))


def blobness(smoothed: np.ndarray, index_kji: np.ndarray) -> np.ndarray:
    """``(N,)`` in [0, 1]: how ball-like the smoothed volume is at each point (``index_kji`` ``(N, 3)`` int):
    the ratio of the smallest to the largest Hessian eigenvalue magnitude when all three are negative (a
    bright ball: 1; a tube or a wall: near 0), else 0."""
    eigen = hessian_eigenvalues(smoothed, index_kji)   # ascending: most negative first
    return np.where(eigen[:, 2] < 0, eigen[:, 2] / np.minimum(eigen[:, 0], -1e-12), 0.0)


def _pyramid_levels():
    """The scales of each pyramid level: lists of sigmas (mm), each level's first the last of the one
    before."""
    levels, current = [], []
    for sigma in SIGMAS_MM:
        current.append(sigma)
        if sigma in LEVEL_LAST_SIGMA:
            levels.append(current)
            current = [sigma]
    return levels + [current] if len(current) > 1 else levels


def blob_peaks(volume: np.ndarray, inside, keep: int) -> list[_Peaks]:
    """Scale-normalised differences of Gaussians of a float32 HU volume ``[k, j, i]`` with 1 mm voxels, and
    the local maxima of each scale for which ``inside(index_kji)`` (a boolean per point) holds."""
    peaks, base, base_sigma, step = [], volume, 0.0, 1
    for sigmas in _pyramid_levels():
        spacing = GRID_MM * step
        previous = base if base_sigma == sigmas[0] else _smooth(base, spacing, sigmas[0])
        for low, high in zip(sigmas, sigmas[1:]):
            current = _smooth(base, spacing, math.sqrt(high ** 2 - base_sigma ** 2))
            ratio = high / low
            response = (previous - current) / np.float32(ratio - 1.0)
            index, score = _local_maxima(response, RAW_PEAKS)
            del response
            sigma = math.sqrt(low * high)
            weight = blobness(current, index) ** BLOBNESS_POWER * min(sigma, SCALE_CAP_MM) ** SCALE_POWER
            score = score * weight
            index = index * step
            ok = inside(index)
            peaks.append(_Peaks(index[ok].astype(float), score[ok].astype(float), sigma))
            previous = current
        base, base_sigma, step = previous[::2, ::2, ::2].copy(), sigmas[-1], step * 2
    return peaks


def merge_peaks(points_mm: np.ndarray, score: np.ndarray, radius_mm: np.ndarray, limit: int) -> np.ndarray:
    """Rows of the points (world mm ``(N, 3)``) kept by greedy merging, highest score first: a point is
    dropped when a kept one lies within ``max(MERGE_MM, min(radius_a, radius_b))`` of it; at most ``limit``
    rows."""
    order = np.argsort(-score, kind="stable")
    points, radius = points_mm[order], radius_mm[order]
    dropped = np.zeros(len(order), bool)
    kept: list[int] = []
    for n in range(len(order)):
        if dropped[n]:
            continue
        kept.append(n)
        if len(kept) >= limit:
            break
        squared = ((points[n + 1:] - points[n]) ** 2).sum(axis=1)
        reach = np.maximum(MERGE_MM, np.minimum(radius[n], radius[n + 1:]))
        dropped[n + 1:] |= squared < reach ** 2
    return order[np.array(kept, int)]


def _crop_box(mask: np.ndarray, shape_zyx: tuple, margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` array-index box ``[k, j, i]`` on the fine grid around a 2 x 2 x 2 block mask, with a
    margin."""
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    lo = np.maximum(np.array([n[0] for n in nonzero]) * 2 - margin, 0)
    hi = np.minimum(np.array([n[-1] + 1 for n in nonzero]) * 2 + margin, shape_zyx)
    return lo, hi


def _lung_only(volume: np.ndarray, inside_mask: np.ndarray) -> np.ndarray:
    """The volume clipped to [-1000, 200] HU, with the lungs' median HU outside the mask (float32)."""
    lung = volume[inside_mask & (volume < AIR_HU)]
    fill = np.float32(np.median(lung[::max(1, len(lung) // 200_000)]) if len(lung) else -850.0)
    out = np.clip(volume, -1000.0, CLIP_HU)
    out[~inside_mask] = fill
    return out


def detect_scan(scan: CTScan, max_per_scan: int = DEFAULT_MAX_PER_SCAN) -> Detections:
    """Nodule candidates of one scan (see the module docstring), at most ``max_per_scan``, highest score
    first.

    A scan without lung (only air, only tissue, a head CT) gives no candidates and a ``warning`` naming it."""
    if max_per_scan < 1:
        raise UserError(f"--max-per-scan must be at least 1, got {max_per_scan}")
    volume, grid = resample_to_grid(scan, GRID_MM)
    if min(volume.shape) < 8:
        return Detections.none(f"scan {scan.name}: too small for detection "
                               f"({volume.shape[::-1]} voxels of 1 mm)")
    mask, coarse_mm = lung_mask(volume, grid)
    if mask is None:
        return Detections.none(f"scan {scan.name}: no lung found (under {MIN_LUNG_ML:g} ml of air inside the "
                               f"body below {AIR_HU:g} HU), no candidates")
    mask = _distance_outside(mask, coarse_mm) <= PLEURA_MARGIN_MM   # a nodule on the pleura, not cut in half
    lo, hi = _crop_box(mask, volume.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    fine_mask = mask_on_grid(mask, volume.shape)[box]
    lungs = _lung_only(volume[box], fine_mask)
    del volume

    def inside(index_kji: np.ndarray) -> np.ndarray:
        return fine_mask[tuple(np.minimum(index_kji, np.array(fine_mask.shape) - 1).T)]
    peaks = blob_peaks(lungs, inside, max_per_scan)
    index_kji = np.concatenate([p.index_kji for p in peaks]) + lo
    score = np.concatenate([p.score for p in peaks])
    radius = np.concatenate([np.full(len(p.score), math.sqrt(3.0) * p.sigma_mm) for p in peaks])
    world = data.index_to_world(index_kji[:, ::-1], grid)
    rows = merge_peaks(world, score, radius, max_per_scan)
    return Detections(world[rows], score[rows], 2 * radius[rows])


# --- files: one scan, whole subsets ---------------------------------------------

def scan_name(path) -> str:
    """A scan's name: the folder of a DICOM series, else the file name without ``.mhd``/``.nii.gz``/..."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path.name
    return path.name[:-len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem


def known_scans(data_dir, annotations: Optional[PointTable]) -> set:
    """The seriesuids a LUNA16 folder knows (``seriesuids.csv``, its subset folders, and its
    ``annotations``)."""
    data_dir = Path(data_dir)
    known = set(data.scan_subset_map(data_dir))
    if (data_dir / "seriesuids.csv").is_file():
        known |= set(data.read_seriesuids(data_dir / "seriesuids.csv"))
    return known | (set(annotations.seriesuid) if annotations is not None else set())


def hit_classes(uid: str, world_xyz: np.ndarray, annotations: Optional[PointTable]) -> list[str]:
    """LUNA16 class of each world mm point ``(N, 3)`` of scan ``uid``: "1" inside a nodule's sphere of
    ``annotations`` (squared distance below (diameter / 2)^2, the official hit rule), else "0"; all "" when
    ``annotations`` is None (the scan's nodules are not known)."""
    if annotations is None:
        return [""] * len(world_xyz)
    points = PointTable(np.full(len(world_xyz), uid, object), np.asarray(world_xyz, float).reshape(-1, 3),
                        np.zeros(len(world_xyz)), np.zeros(len(world_xyz), int))
    return ["0" if np.isnan(d) else "1" for d in data.match_diameters(points, annotations)]


def csv_lines(uid: str, detections: Detections, classes: Sequence[str]) -> list[str]:
    """Rows of the candidates CSV (:data:`CSV_COLUMNS`) of one scan, world mm to 0.01 mm."""
    return [f"{uid},{x:.2f},{y:.2f},{z:.2f},{c},{s:.2f}"
            for (x, y, z), c, s in zip(detections.world_xyz.tolist(), classes, detections.score.tolist())]


def _annotations_of(data_dir) -> Optional[PointTable]:
    path = Path(data_dir) / "annotations.csv" if data_dir is not None else None
    return data.read_point_csv(path, "diameter_mm")[0] if path is not None and path.is_file() else None


def detect_path(scan_path, out_csv=None, max_per_scan: int = DEFAULT_MAX_PER_SCAN,
                data_dir=None) -> tuple[str, Detections, list[str]]:
    """Detect candidates in one scan file or DICOM folder: ``(seriesuid, detections, classes)``; the seriesuid
    is the scan's name (:func:`scan_name`). The class comes from ``data_dir``'s ``annotations.csv`` when that
    folder knows the scan, else it is "". With ``out_csv``, the candidates are written there (atomically)."""
    uid = scan_name(scan_path)
    if out_csv is not None:
        check_output(out_csv)
    detections = detect_scan(data.read_ct(scan_path), max_per_scan)
    annotations, problems = None, []   # annotations.csv read once: for the known scans and the classes
    path = Path(data_dir) / "annotations.csv" if data_dir is not None else None
    if path is not None and path.is_file():
        annotations, problems = data.read_point_csv(path, "diameter_mm", strict=False)
    known = data_dir is not None and uid in known_scans(data_dir, annotations)
    if known and problems:   # its nodules are needed: a bad row would lose one
        raise UserError(common.problems_message(path, problems, "line(s)"))
    classes = hit_classes(uid, detections.world_xyz, annotations if known else None)
    if out_csv is not None:
        common.atomic_write_text(out_csv,
                                 "\n".join([CSV_COLUMNS] + csv_lines(uid, detections, classes)) + "\n")
    return uid, detections, classes


@dataclass
class DetectSummary:
    """What :func:`detect_subsets` did: the CSV, its scans and candidates, scans detected by this call, the
    scans that could not be read ``{seriesuid: reason}`` and the warnings (scans without lung)."""
    out_csv: Path
    n_scans: int
    n_candidates: int
    scans_new: int
    failed: dict
    warnings: list


def manifest_path(out_csv) -> Path:
    """``<out>.manifest.json`` beside the candidates CSV: the detector settings and the scans it holds."""
    return Path(out_csv).with_suffix(".manifest.json")


def _finished_rows(out_csv: Path, key: dict) -> tuple[dict, dict]:
    """``({seriesuid: CSV lines}, {seriesuid: warning})`` of the scans an earlier call finished into
    ``out_csv`` (every scan of its manifest, with or without candidates); refused when that call used other
    settings."""
    import json
    path = manifest_path(out_csv)
    if not path.is_file() or not out_csv.is_file():
        return {}, {}
    manifest = json.loads(path.read_text())
    differing = {k: (manifest["key"].get(k), v) for k, v in key.items() if manifest["key"].get(k) != v}
    if differing:
        shown = "; ".join(f"{k}: file has {a}, this call asks for {b}" for k, (a, b) in differing.items())
        raise UserError(f"{out_csv} was made with other detector settings ({shown}). "
                        "Use another --out, or delete it and its .manifest.json to start again.")
    rows: dict = {uid: [] for uid in manifest["scans"]}
    for line in out_csv.read_text().splitlines()[1:]:
        uid = line.split(",", 1)[0]
        if uid in rows:
            rows[uid].append(line)
    return rows, manifest.get("warnings", {})


def check_output(out_csv) -> Path:
    """``out_csv`` as a Path; refused when it exists and is not a candidates file of this stage (never
    overwrite, say, LUNA16's own candidates_V2.csv)."""
    out_csv = common.output_file(out_csv, "--out")
    if out_csv.is_file():
        with open(out_csv, errors="replace") as handle:
            header = handle.readline().strip()
        if header != CSV_COLUMNS:
            raise UserError(f"--out {out_csv} exists and is not a file written by detect (its header is not "
                            f"{CSV_COLUMNS}); choose another --out")
    return out_csv


def _read_and_detect(path: Path, max_per_scan: int) -> Detections:
    return detect_scan(data.read_ct(path), max_per_scan)


def _detect_scans(scans: dict, todo: list, parts: common.Parts, max_per_scan: int, console,
                  show_progress: bool):
    """Detect each scan of ``todo`` into a part (``[x, y, z, score]`` rows, the warning in its meta); returns
    ``{seriesuid: reason}`` of the unreadable scans."""
    def save(uid: str, detections: Detections) -> None:
        if detections.warning:
            console.print(f"[yellow]{detections.warning}[/]")
        parts.save(uid, np.column_stack([detections.world_xyz, detections.score]),
                   {"warning": detections.warning})
    detected = ((uid, *common.attempt(scans[uid], _read_and_detect, scans[uid], max_per_scan))
                for uid in todo)
    return common.over_scans(detected, save, total=len(todo), label="[bold]detecting candidates",
                             console=console, show_progress=show_progress)


def _assemble(scans: dict, parts: common.Parts, finished: dict, annotations: Optional[PointTable]):
    """``(CSV lines, scans in the CSV, {seriesuid: warning} of new scans)``, in ``scans`` order: new scans
    from the parts (classed with ``annotations``), the others as an earlier call wrote them."""
    lines, done, warnings, new = [], [], {}, parts.done()
    for uid in scans:
        if uid in new:
            block, warning = parts.load(uid), parts.meta(uid)["warning"]
            detections = Detections(np.asarray(block[:, :3]), np.asarray(block[:, 3]), np.zeros(len(block)))
            lines += csv_lines(uid, detections, hit_classes(uid, detections.world_xyz, annotations))
            if warning:
                warnings[uid] = warning
        elif uid in finished:
            lines += finished[uid]
        else:
            continue
        done.append(uid)
    return lines, done, warnings


def detect_subsets(data_dir, subsets: Sequence[int], out_csv, max_per_scan: int = DEFAULT_MAX_PER_SCAN,
                   console=None, show_progress: bool = True) -> DetectSummary:
    """Candidates of every scan of the given LUNA16 subsets, into one CSV (:data:`CSV_COLUMNS`, world mm, the
    class from the folder's ``annotations.csv`` by the official hit rule, "" without that file).

    Resumable: each detected scan is kept as a part beside ``out_csv`` until the CSV and its
    ``.manifest.json`` (settings, scans, failures, warnings) are written, so a killed call resumes and a rerun
    detects only the scans not yet in the CSV (the scans of other subsets are dropped from it). Unreadable
    scans are named and skipped (``summary.failed``); a scan without lung has no rows and a warning."""
    from rich.console import Console
    if max_per_scan < 1:
        raise UserError(f"--max-per-scan must be at least 1, got {max_per_scan}")
    console = console or Console(stderr=True)
    data_dir, out_csv = Path(data_dir), check_output(out_csv)
    scans = data.subset_scans(data_dir, subsets)
    key = dict(DETECTOR, max_per_scan=int(max_per_scan))
    finished, old_warnings = _finished_rows(out_csv, key)
    parts = common.Parts(out_csv.with_suffix(".parts"), key)
    todo = [uid for uid in scans if uid not in finished and uid not in parts.done()]
    failed = _detect_scans(scans, todo, parts, max_per_scan, console, show_progress)
    lines, done, warnings = _assemble(scans, parts, finished, _annotations_of(data_dir))
    warnings.update({uid: text for uid, text in old_warnings.items() if uid in done and uid not in warnings})
    common.atomic_write_text(out_csv, "\n".join([CSV_COLUMNS] + lines) + "\n")
    common.atomic_write_json(manifest_path(out_csv), {"key": key, "subsets": list(subsets), "scans": done,
                                                    "failed": failed, "warnings": warnings,
                                                    "n_candidates": len(lines)})
    parts.remove()
    return DetectSummary(out_csv, len(done), len(lines), len(todo) - len(failed), failed,
                         list(warnings.values()))
