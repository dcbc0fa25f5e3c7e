"""Nodule shapes and their partial-volume rendering on a scan's own voxel grid.

Shared by the synthetic phantoms (``phantom.py``) and by nodule insertion into real CT (``insert.py``).

A nodule is laid out in world mm (ITK/LPS physical points ``(x, y, z)``) around ``centre_xyz``: a star-shaped
body whose surface lies at ``radius(u) = r0 * stretch(u) * (1 + sum of lobes)`` along each unit direction
``u`` of the nodule's own frame (``rotation`` columns are that frame's axes in world), plus, when spiculated,
thin tapering spicules from the body outwards. ``r0`` is chosen so that the whole object (body and spicules)
has the volume of a sphere of ``diameter_mm``: the diameter is volume-equivalent.

Rendering works on any grid ``world = origin + direction @ (spacing * index)`` (arrays ``[k, j, i]`` =
``[z, y, x]``): each voxel gets the fraction of it the nodule fills (a linear ramp across the surface of
about one voxel, which keeps the volume to first order), so the nodule looks as a CT of it would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

KINDS = ("solid", "part-solid", "ground-glass")
SHAPES = ("round", "lobulated", "spiculated")
MIN_DIAMETER_MM, MAX_DIAMETER_MM = 3.0, 30.0
_QUADRATURE = 4096        # directions for the body's volume integral


@dataclass
class Nodule:
    """One nodule. World mm throughout; ``diameter_mm`` is the volume-equivalent diameter of body plus
    spicules.

    stretch: ``(3,)`` ellipsoid semi-axis factors of the body in its own frame (product 1).
    rotation: ``(3, 3)`` world directions of the frame's axes (columns).
    lobes: ``(L, 5)`` rows of unit direction (3, own frame), amplitude (share of the radius) and width
        (in ``1 - cos`` of the angle from the lobe's direction).
    spicules: ``(S, 5)`` rows of unit direction (3, own frame), length beyond the body (mm) and base radius
        (mm).
    hu: the nodule's density (HU); ``core_hu``: the solid core of a part-solid nodule (half the size), else
        None.
    edge_mm: extra blur of the surface beyond the voxel size (mm).
    """
    centre_xyz: np.ndarray
    diameter_mm: float
    kind: str
    shape: str
    hu: float
    edge_mm: float = 0.5
    core_hu: float | None = None
    stretch: np.ndarray = field(default_factory=lambda: np.ones(3))
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    lobes: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    spicules: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    @cached_property
    def body_radius_mm(self) -> float:
        """``r0``: the scale of the body that gives the volume-equivalent diameter with the spicules."""
        return _body_scale(self)

    @cached_property
    def body_shift_mm(self) -> np.ndarray:
        """Where the body's own origin sits in its frame so that its centroid is at ``centre_xyz`` (mm)."""
        return -self.body_radius_mm * _body_centroid(self)

    @property
    def reach_mm(self) -> float:
        """Farthest the nodule reaches from its centre (mm), spicules included."""
        body = self.body_radius_mm * float(np.max(self.stretch)) * (1.0 + float(np.sum(self.lobes[:, 3])))
        spikes = float(np.max(self.spicules[:, 3], initial=0.0))
        return body + spikes + float(np.linalg.norm(self.body_shift_mm))


def _unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, 3))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (3 x 3)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def density_of(rng: np.random.Generator, kind: str) -> tuple[float, float | None, float]:
    """``(hu, core_hu, edge_mm)`` drawn for a nodule type: solid 0..100 HU; ground-glass -700..-350 HU with a
    softer edge; part-solid the same with a solid core."""
    if kind == "solid":
        return float(rng.uniform(0.0, 100.0)), None, float(rng.uniform(0.2, 0.7))
    hu, edge = float(rng.uniform(-700.0, -350.0)), float(rng.uniform(0.6, 1.5))
    return hu, (float(rng.uniform(-50.0, 80.0)) if kind == "part-solid" else None), edge


def random_nodule(rng: np.random.Generator, centre_xyz, diameter_mm: float, kind: str = "solid",
                  shape: str = "round") -> Nodule:
    """A nodule of the given type and shape at a world point, its form and density drawn from ``rng``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    stretch = rng.uniform(0.85, 1.15, 3)
    stretch /= np.prod(stretch) ** (1 / 3)
    lobes = np.zeros((0, 5))
    if shape == "lobulated":
        n = int(rng.integers(4, 8))
        lobes = np.column_stack([_unit_rows(rng, n), rng.uniform(0.12, 0.3, n), rng.uniform(0.15, 0.35, n)])
    spicules = np.zeros((0, 5))
    if shape == "spiculated":
        n = int(rng.integers(6, 14))
        radius = diameter_mm / 2.0
        length = np.clip(radius * rng.uniform(0.4, 1.2, n), 2.0, 15.0)
        base = np.clip(radius * rng.uniform(0.08, 0.16, n), 0.5, 1.5)
        spicules = np.column_stack([_unit_rows(rng, n), length, base])
        lobes = np.column_stack([_unit_rows(rng, 3), rng.uniform(0.05, 0.15, 3), rng.uniform(0.2, 0.4, 3)])
    hu, core_hu, edge = density_of(rng, kind)
    return Nodule(np.asarray(centre_xyz, float), float(diameter_mm), kind, shape, hu, edge, core_hu,
                  stretch, random_rotation(rng), lobes, spicules)


# --- volume -----------------------------------------------------------------------

def fibonacci_directions(n: int) -> np.ndarray:
    """``(n, 3)`` nearly uniform unit vectors (a Fibonacci lattice on the sphere)."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (1.0 + math.sqrt(5.0)) * k
    r = np.sqrt(1.0 - z * z)
    return np.column_stack([r * np.cos(phi), r * np.sin(phi), z])


def _relative_radius(nodule: Nodule, unit_local: np.ndarray) -> np.ndarray:
    """The body's surface radius over ``r0`` along unit directions of its own frame ``(..., 3)``."""
    ellipsoid = 1.0 / np.sqrt(np.sum(np.square(unit_local / nodule.stretch), axis=-1))
    bumps = np.ones(unit_local.shape[:-1])
    for dx, dy, dz, amplitude, width in nodule.lobes:
        cosine = unit_local[..., 0] * dx + unit_local[..., 1] * dy + unit_local[..., 2] * dz
        bumps += amplitude * np.exp(-(1.0 - cosine) / width)
    return ellipsoid * bumps


def _spicule_volume(nodule: Nodule) -> float:
    """Volume (mm^3) of the spicules outside the body: cones from the base radius down to a fifth of it."""
    length, base = nodule.spicules[:, 3], nodule.spicules[:, 4]
    tip = base / 5.0
    return float(np.sum(math.pi * length * (base ** 2 + base * tip + tip ** 2) / 3.0))


def _body_centroid(nodule: Nodule) -> np.ndarray:
    """Centroid of the body at unit scale, in its own frame (lobes move it off the centre)."""
    unit = fibonacci_directions(_QUADRATURE)
    radius = _relative_radius(nodule, unit)
    return 0.75 * (radius[:, None] ** 4 * unit).mean(axis=0) / float(np.mean(radius ** 3))


def _body_scale(nodule: Nodule) -> float:
    target = math.pi * nodule.diameter_mm ** 3 / 6.0
    body = max(target - _spicule_volume(nodule), 0.5 * target)
    mean_cube = float(np.mean(_relative_radius(nodule, fibonacci_directions(_QUADRATURE)) ** 3))
    return (3.0 * body / (4.0 * math.pi * mean_cube)) ** (1 / 3)


# --- rendering --------------------------------------------------------------------

def _edge_fraction(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Filled fraction from a signed distance (mm, negative inside): a linear ramp of ``width_mm``."""
    return np.clip(0.5 - signed_mm / np.float32(width_mm), 0.0, 1.0).astype(np.float32)


def voxel_offsets(origin, spacing, direction, lo_ijk, hi_ijk, reference_xyz) -> np.ndarray:
    """World offsets (mm) of the voxel centres in the index box ``lo..hi`` (hi exclusive) from
    ``reference_xyz``: a float32 array ``(nz, ny, nx, 3)`` (x, y, z last)."""
    step = np.asarray(direction, float) * np.asarray(spacing, float)[None, :]
    base = np.asarray(origin, float) + step @ np.asarray(lo_ijk, float) - np.asarray(reference_xyz, float)
    k, j, i = np.meshgrid(*(np.arange(hi_ijk[a] - lo_ijk[a], dtype=np.float32) for a in (2, 1, 0)),
                          indexing="ij")
    index = np.stack([i, j, k], axis=-1)
    return (index @ step.T.astype(np.float32) + base.astype(np.float32)).astype(np.float32)


def index_box(origin, spacing, direction, shape_zyx, centre_xyz, reach_mm: float):
    """``(lo_ijk, hi_ijk)`` index box (hi exclusive) of the voxels within ``reach_mm`` of a world point on
    every world axis, clipped to the grid; None when it misses the grid."""
    to_index = np.linalg.inv(np.asarray(direction, float) * np.asarray(spacing, float)[None, :])
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float) * reach_mm
    index = (corners + np.asarray(centre_xyz, float) - np.asarray(origin, float)) @ to_index.T
    size = np.array(shape_zyx[::-1])
    lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, size)
    hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, size)
    return None if np.any(hi <= lo) else (lo, hi)


def _body_signed_mm(nodule: Nodule, local: np.ndarray, scale: float, width: float) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to the body scaled by ``scale``, shrunk so that a
    ramp of ``width`` mm across its surface keeps its volume (the ramp adds about ``r w^2 / 4`` to
    ``r^3``)."""
    radius = scale * nodule.body_radius_mm
    scale *= max(0.7, 1.0 - width ** 2 / (12.0 * radius ** 2))
    local = local - (scale * nodule.body_shift_mm).astype(np.float32)
    distance = np.sqrt(np.sum(np.square(local), axis=-1))
    unit = local / np.maximum(distance, 1e-6)[..., None]
    return distance - scale * nodule.body_radius_mm * _relative_radius(nodule, unit)


def _spicule_fraction(nodule: Nodule, local: np.ndarray, width: float) -> np.ndarray:
    """Union of the spicules' filled fractions (tapered tubes from the body surface outwards)."""
    fraction = np.zeros(local.shape[:-1], np.float32)
    r0 = nodule.body_radius_mm
    for dx, dy, dz, length, base in nodule.spicules:
        unit = np.array([dx, dy, dz])
        start = 0.6 * r0 * float(_relative_radius(nodule, unit[None])[0])
        reach = r0 * float(_relative_radius(nodule, unit[None])[0]) + length - start
        along = np.clip((local @ unit.astype(np.float32) - start) / reach, 0.0, 1.0)
        nearest = (start + along * reach)[..., None] * unit.astype(np.float32)
        distance = np.sqrt(np.sum(np.square(local - nearest), axis=-1))
        radius = base * (1.0 - 0.8 * along)
        tube = _edge_fraction(distance - radius, width) * np.minimum(1.0, 2.0 * radius / width)
        np.maximum(fraction, tube.astype(np.float32), out=fraction)
    return fraction


def render_fractions(nodule: Nodule, origin, spacing, direction, shape_zyx):
    """The nodule on a grid: ``(lo_ijk, hi_ijk, fraction, core)`` or None when it misses the grid.

    ``fraction`` float32 ``[z, y, x]`` over the index box ``lo..hi`` (hi exclusive) is the share of each voxel
    the nodule fills; ``core`` is the same for a part-solid nodule's solid core (None for the others).
    """
    width = float(np.hypot(nodule.edge_mm, np.mean(spacing)))
    box = index_box(origin, spacing, direction, shape_zyx, nodule.centre_xyz, nodule.reach_mm + width)
    if box is None:
        return None
    lo, hi = box
    world = voxel_offsets(origin, spacing, direction, lo, hi, nodule.centre_xyz)
    local = world @ np.asarray(nodule.rotation, np.float32)     # coordinates in the nodule's own frame
    fraction = _edge_fraction(_body_signed_mm(nodule, local, 1.0, width), width)
    if len(nodule.spicules):
        np.maximum(fraction, _spicule_fraction(nodule, local, width), out=fraction)
    core = None
    if nodule.core_hu is not None:
        core_width = float(np.hypot(0.4, np.mean(spacing)))
        core = _edge_fraction(_body_signed_mm(nodule, local, 0.5, core_width), core_width)
    return lo, hi, fraction, core


def target_hu(nodule: Nodule, core: np.ndarray | None) -> np.ndarray | float:
    """The HU each voxel of the nodule would have if it filled the voxel (the core's where it has one)."""
    if core is None:
        return np.float32(nodule.hu)
    return np.float32(nodule.hu) + core * np.float32(nodule.core_hu - nodule.hu)


def filled_volume_mm3(fraction: np.ndarray, spacing) -> float:
    """The volume (mm^3) a fraction map fills on voxels of ``spacing`` (x, y, z mm)."""
    return float(fraction.sum(dtype=np.float64) * np.prod(np.asarray(spacing, float)))
