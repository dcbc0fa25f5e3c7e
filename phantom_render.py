"""Drawing a phantom scene (``phantom_scene.py``) onto its voxel grid: the background (air, the body's fat
and soft tissue, the spine), the lungs and their fissures, the tube trees (ribs, vessels, airways with their
walls) and the findings, each blended in with its partial volume; then the spatially correlated noise and the
int16 quantisation.

Objects are voxelised through the scan's geometry ``world = origin + direction @ (spacing * index)``; large
boxes are drawn in z-slabs of about ``SLAB_VOXELS`` voxels. Arrays are indexed ``[z, y, x]``.
"""
from __future__ import annotations

import math

import numpy as np

import nodules as nodule_shapes
import phantom_kernels as kernels
from phantom_scene import Anatomy, Finding, Fissure, Geometry, VesselTree, airway_wall_mm, lung_parameters

HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1000.0
SLAB_VOXELS = 4_000_000  # background and noise are made in z-slabs of about this many voxels
NOISE_SIGMA_MM = (0.4, 0.6)  # Gaussian that correlates the noise (autocorrelation FWHM about 1.3-2 mm)


# --- rendering ----------------------------------------------------------------

def _blend(view: np.ndarray, alpha: np.ndarray, hu) -> None:
    """In place: ``view += alpha * (hu - view)`` (alpha = fraction of the voxel filled by the object)."""
    difference = (np.float32(hu) if np.isscalar(hu) else hu) - view
    difference *= alpha
    view += difference


def _edge_alpha(signed_distance: np.ndarray, width_mm: float) -> np.ndarray:
    """Filled fraction from a signed distance (mm): 1 inside, a linear ramp of ``width_mm``, 0 outside.

    Works in place on ``signed_distance`` (pass a temporary) and returns it.
    """
    signed_distance *= np.float32(-1.0 / width_mm)
    signed_distance += np.float32(0.5)
    return np.clip(signed_distance, 0.0, 1.0, out=signed_distance)


def _slabs(lo_ijk, hi_ijk):
    """Split an index box into z-slabs of about SLAB_VOXELS voxels: yields (lo_ijk, hi_ijk) pairs."""
    plane = max(1, int((hi_ijk[0] - lo_ijk[0]) * (hi_ijk[1] - lo_ijk[1])))
    step = max(1, SLAB_VOXELS // plane)
    for k0 in range(int(lo_ijk[2]), int(hi_ijk[2]), step):
        yield (lo_ijk[0], lo_ijk[1], k0), (hi_ijk[0], hi_ijk[1], min(int(hi_ijk[2]), k0 + step))


def _region(volume: np.ndarray, lo_ijk, hi_ijk) -> np.ndarray:
    return volume[lo_ijk[2]:hi_ijk[2], lo_ijk[1]:hi_ijk[1], lo_ijk[0]:hi_ijk[0]]


def _render_background(volume: np.ndarray, geom: Geometry, anatomy: Anatomy) -> None:
    """Air, body (fat shell, soft tissue), spine, lung parenchyma and fissures; each drawn only inside its
    box."""
    edge = geom.partial_volume_mm
    ax, ay = (np.float32(v) for v in anatomy.body_axes)
    volume[...] = AIR_HU
    far = 1e4   # the body and spine are cylinders along world z, cut only by the scan
    body_reach = np.array([ax + edge, ay + edge, far])
    body_box = geom.box_world(anatomy.center - body_reach, anatomy.center + body_reach)
    for lo, hi in ([] if body_box is None else _slabs(*body_box)):
        view = _region(volume, lo, hi)
        x, y = geom.offsets(lo, hi, anatomy.center, components=(0, 1))
        x *= np.float32(1.0 / ax)
        y *= np.float32(1.0 / ay)
        body_sd = np.square(x, out=x)
        body_sd += np.square(y, out=y)
        np.sqrt(body_sd, out=body_sd)
        body_sd -= np.float32(1.0)
        body_sd *= min(ax, ay)
        inner_sd = body_sd + np.float32(anatomy.fat_mm)
        _blend(view, _edge_alpha(body_sd, edge), anatomy.hu_fat)
        _blend(view, _edge_alpha(inner_sd, edge), anatomy.hu_soft)
    spine = np.append(anatomy.spine_center, anatomy.center[2])
    reach = anatomy.spine_radius + edge
    spine_box = geom.box_world(spine - [reach, reach, far], spine + [reach, reach, far])
    for lo, hi in ([] if spine_box is None else _slabs(*spine_box)):
        x, y = geom.offsets(lo, hi, spine, components=(0, 1))
        spine_sd = np.sqrt(np.square(x) + np.square(y)) - np.float32(anatomy.spine_radius)
        view = _region(volume, lo, hi)
        marrow_sd = spine_sd + np.float32(0.17 * anatomy.spine_radius)   # the cortical shell
        _blend(view, _edge_alpha(spine_sd, edge), 650.0)
        _blend(view, _edge_alpha(marrow_sd, edge), 230.0)
    cavity = np.append(anatomy.cavity_axes, far)
    for lung, (centre, axes) in enumerate(zip(anatomy.lung_centers, anatomy.lung_axes)):
        low = np.maximum(centre - axes, anatomy.center - cavity) - edge
        high = np.minimum(centre + axes, anatomy.center + cavity) + edge
        box = geom.box_world(low, high)
        for lo, hi in ([] if box is None else _slabs(*box)):
            _render_lung_slab(_region(volume, lo, hi), geom, lo, hi, anatomy, lung)


def _render_lung_slab(view, geom: Geometry, lo, hi, anatomy: Anatomy, lung: int) -> None:
    """Parenchyma (denser towards the back) and its fissures in one slab of a lung's box."""
    edge = geom.partial_volume_mm
    centre = anatomy.lung_centers[lung]
    u, v, w = geom.offsets(lo, hi, centre)
    inside = kernels.lung_fraction(lung_parameters(anatomy)[lung], geom.origin, geom.index_to_world_matrix,
                                   np.asarray(lo, np.int64), np.array(v.shape, np.int64), edge)
    lung_hu = np.float32(anatomy.hu_lung) + np.float32(anatomy.hu_lung_gradient / anatomy.cavity_axes[1]) * v
    _blend(view, inside, lung_hu)
    for fissure in (f for f in anatomy.fissures if f.lung == lung):
        shift = (fissure.point - centre).astype(np.float32)
        sheet = _sheet_alpha(fissure, u - shift[0], v - shift[1], w - shift[2], edge)
        if fissure.only_front_of is not None:
            other = fissure.only_front_of
            back = (other.point - centre).astype(np.float32)
            sheet *= _edge_alpha(-other.signed(u - back[0], v - back[1], w - back[2]), edge)
        sheet *= inside
        _blend(view, sheet, fissure.hu)


def _sheet_alpha(fissure: Fissure, x, y, z, edge: float) -> np.ndarray:
    """Filled fraction of a sheet ``fissure.thickness_mm`` thick (a thinner sheet than the voxel shows
    fainter)."""
    distance = np.abs(fissure.signed(x, y, z))
    distance -= np.float32(fissure.thickness_mm / 2.0)
    return _edge_alpha(distance, edge) * np.float32(min(1.0, fissure.thickness_mm / edge))


def _tube_fraction(geom: Geometry, segments: np.ndarray, extra_mm: float | np.ndarray = 0.0):
    """Union (max) of the partial-volume fractions of tapered tubes (rows p0, p1, r0, r1; radii grown by
    ``extra_mm``, one value or one per segment): ``(lo_ijk, hi_ijk, fraction [z, y, x])`` over the box holding
    them, or None when they miss the grid."""
    if not len(segments):
        return None
    edge = geom.partial_volume_mm
    extra = np.ascontiguousarray(np.broadcast_to(np.asarray(extra_mm, dtype=np.float64), (len(segments),)))
    reach = float((np.maximum(segments[:, 6], segments[:, 7]) + extra).max()) + 2 * edge
    ends = segments[:, :6].reshape(-1, 3)
    box = geom.box_world(ends.min(axis=0) - reach, ends.max(axis=0) + reach)
    if box is None:
        return None
    lo, hi = box
    fraction = np.zeros(tuple((hi - lo)[::-1]), dtype=np.float32)
    kernels.tube_union(fraction, lo.astype(np.int64), geom.origin, geom.index_to_world_matrix,
                       geom.world_to_index_matrix, np.ascontiguousarray(segments, dtype=np.float64),
                       extra, edge)
    return lo, hi, fraction


def _render_tree(volume: np.ndarray, geom: Geometry, tree: VesselTree, extra_mm=0.0,
                 hu: float | None = None) -> None:
    """One blend of the tree's tubes (radii grown by ``extra_mm``) with ``hu`` (default: the tree's HU)."""
    drawn = _tube_fraction(geom, tree.segments, extra_mm)
    if drawn is not None:
        lo, hi, fraction = drawn
        _blend(_region(volume, lo, hi), fraction, tree.hu if hu is None else hu)


def _render_airways(volume: np.ndarray, geom: Geometry, airways: list) -> None:
    """Every airway's wall first, then every lumen (air), so no wall of one tree closes another's lumen."""
    for tree in airways:
        _render_tree(volume, geom, tree, airway_wall_mm(np.maximum(tree.segments[:, 6], tree.segments[:, 7])))
    for tree in airways:
        _render_tree(volume, geom, tree, 0.0, AIR_HU)


def _render_finding(volume, geom: Geometry, finding: Finding) -> None:
    """The nodule's partial-volume fractions blended towards its HU (its core's where it has one); where the
    scan is already brighter (a vessel through a ground-glass nodule, the chest wall) it stays so."""
    drawn = nodule_shapes.render_fractions(finding.nodule, geom.origin, geom.spacing, geom.direction,
                                           volume.shape)
    if drawn is None:
        return
    lo, hi, fraction, core = drawn
    view = _region(volume, lo, hi)
    _blend(view, fraction, np.maximum(nodule_shapes.target_hu(finding.nodule, core), view))


def render_scene(geom: Geometry, anatomy: Anatomy, ribs: VesselTree, vessels: list, airways: list,
            findings: list) -> np.ndarray:
    """The noise-free scan, float32 HU ``[z, y, x]``: background, ribs, vessels, airways, then the
    findings."""
    volume = np.empty(geom.shape_zyx, dtype=np.float32)
    _render_background(volume, geom, anatomy)
    _render_tree(volume, geom, ribs)
    for tree in vessels:
        _render_tree(volume, geom, tree)
    _render_airways(volume, geom, airways)
    for finding in findings:
        _render_finding(volume, geom, finding)
    return volume


# --- noise ----------------------------------------------------------------------

def _gaussian_taps(sigma_voxels: float) -> np.ndarray:
    """Normalised 1-D Gaussian weights (float32) out to 3 sigma; a single tap for a sigma under 0.15 voxel."""
    if sigma_voxels < 0.15:
        return np.ones(1, dtype=np.float32)
    half = min(8, int(math.ceil(3.0 * sigma_voxels)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma_voxels) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def _filter_axis(array: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate ``array`` with ``taps`` along one axis (edges reflected)."""
    half = len(taps) // 2
    if half == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (half, half)
    padded = np.pad(array, pad, mode="reflect")
    out = np.zeros_like(array)
    window = [slice(None)] * array.ndim
    for t, weight in enumerate(taps):
        window[axis] = slice(t, t + array.shape[axis])
        out += weight * padded[tuple(window)]
    return out


def _noise_planes(seed: int, k0: int, k1: int, shape_yx: tuple) -> np.ndarray:
    """White noise planes ``k0..k1`` (may run past the scan), each from its own seeded stream, so a slab and
    its halo come out the same whichever slab asks."""
    return np.stack([np.random.default_rng([seed, k + 64]).standard_normal(shape_yx, dtype=np.float32)
                     for k in range(k0, k1)])


def add_noise_and_quantise(rng, volume: np.ndarray, noise_std: float,
                            geom: Geometry | None = None) -> np.ndarray:
    """int16 HU: volume + spatially correlated Gaussian noise of standard deviation ``noise_std`` HU (white
    noise smoothed by a Gaussian of NOISE_SIGMA_MM along each index axis, then rescaled), rounded and clipped
    to the CT range. Made in z-slabs; without ``geom`` the noise is white."""
    nz, ny, nx = volume.shape
    sigma_mm = rng.uniform(*NOISE_SIGMA_MM)
    spacing = geom.spacing if geom is not None else np.full(3, np.inf)
    taps_x, taps_y, taps_z = (_gaussian_taps(sigma_mm / s) for s in spacing)
    gain = math.sqrt(float(np.sum(taps_x ** 2) * np.sum(taps_y ** 2) * np.sum(taps_z ** 2)))
    scale = np.float32(noise_std / gain)
    seed = int(rng.integers(0, 2**63))
    half = len(taps_z) // 2
    slab = max(1, SLAB_VOXELS // (ny * nx))
    out = np.empty(volume.shape, dtype=np.int16)
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        planes = _filter_axis(_filter_axis(_noise_planes(seed, k0 - half, k1 + half, (ny, nx)), taps_x, 2),
                              taps_y, 1)
        noise = np.zeros((k1 - k0, ny, nx), dtype=np.float32)
        for t, weight in enumerate(taps_z):
            noise += weight * planes[t:t + k1 - k0]
        view = volume[k0:k1]
        noise *= scale
        view += noise
        np.clip(np.rint(view, out=view), HU_MIN, HU_MAX, out=view)
        out[k0:k1] = view
    return out
