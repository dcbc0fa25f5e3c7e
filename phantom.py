"""Synthetic chest-CT phantoms in the LUNA16 folder layout, for tests and the demo.

Every object (body, lungs, spine, vessel trees, nodules) is laid out in world mm
(ITK/LPS physical points ``(x, y, z)``; the patient's left-right, front-back and
head-foot axes are the world axes) and then voxelised through the scan's own
geometry ``world = origin + direction @ (spacing * index)``. Scans get anisotropic
spacing, random origins and, for most of them, a non-identity direction (flipped
axes, small rotations), so a reader that ignores the direction matrix looks in the
wrong place.

Arrays are indexed ``[z, y, x]`` (array axes = ITK index ``k, j, i``); the
geometry vectors ``origin`` and ``spacing`` are ordered ``(x, y, z)`` / ``(i, j, k)``.

Written folder (see :func:`write_luna_folder`)::

    <root>/subset{k}/<seriesuid>.mhd + .raw      int16 HU
    <root>/annotations.csv                       seriesuid,coordX,coordY,coordZ,diameter_mm
    <root>/annotations_excluded.csv              same columns, diameter -1 allowed
    <root>/candidates_V2.csv                     seriesuid,coordX,coordY,coordZ,class
    <root>/seriesuids.csv                        one uid per line, no header
    <root>/candidate_sources.csv                 the candidates plus what each one sits on
    <root>/phantom_manifest.json                 the parameters and per-scan geometry

The data are synthetic; only the folder layout follows the LUNA16 challenge.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from data import CTScan, UserError, atomic_write_text, write_mhd

SIZES = {"small": (96, 160, 160), "realistic": (250, 512, 512)}
DIRECTION_KINDS = ("identity", "flip", "rotate", "flip_rotate")
# Share of each negative-candidate type (vessel trees are the hard negatives).
NEGATIVE_MIX = (("vessel", 0.35), ("bifurcation", 0.15), ("pleura", 0.15),
                ("near-nodule", 0.15), ("parenchyma", 0.10), ("soft-tissue", 0.10))
# LUNA16's candidates are mostly easy: about 850 a scan, a few of them look-alikes (for the mining benchmark).
LUNA_LIKE_MIX = (("parenchyma", 0.80), ("soft-tissue", 0.08), ("vessel", 0.06), ("bifurcation", 0.03),
                 ("pleura", 0.02), ("near-nodule", 0.01))
HU_MIN, HU_MAX = -1024, 3071
SLAB_VOXELS = 4_000_000  # background is rendered in z-slabs of about this many voxels


# --- scene description (world mm) -------------------------------------------

@dataclass
class Geometry:
    """Voxel grid of one scan: ``world = origin + direction @ (spacing * index)``.

    shape_zyx: array shape ``(nz, ny, nx)``; origin: world mm (x, y, z) of index (0, 0, 0);
    spacing: mm along index axes (i, j, k); direction: 3x3, column c = world direction of index axis c.
    """
    shape_zyx: tuple
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    kind: str = "identity"

    @cached_property
    def index_to_world_matrix(self) -> np.ndarray:
        return self.direction * self.spacing[None, :]

    @cached_property
    def world_to_index_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world_matrix)

    def world_to_index(self, world_xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) continuous index (i, j, k)."""
        return (np.asarray(world_xyz, dtype=np.float64) - self.origin) @ self.world_to_index_matrix.T

    def index_to_world(self, index_ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous index (i, j, k) -> (N, 3) world mm."""
        return self.origin + np.asarray(index_ijk, dtype=np.float64) @ self.index_to_world_matrix.T

    def contains(self, world_xyz: np.ndarray, margin_mm: float | np.ndarray = 0.0) -> np.ndarray:
        """(N,) bool: points at least ``margin_mm`` inside the first and last voxel centres on every axis."""
        index = self.world_to_index(np.atleast_2d(world_xyz))
        size_ijk = np.array(self.shape_zyx[::-1], dtype=np.float64)
        margin = np.asarray(margin_mm, dtype=np.float64).reshape(-1, 1) / self.spacing[None, :]
        return np.all((index >= margin) & (index <= size_ijk - 1 - margin), axis=1)

    def box_around(self, center_xyz: np.ndarray, radius_mm: float):
        """Index box ``(lo_ijk, hi_ijk)`` (hi exclusive) holding the world cube centre +- radius, or None."""
        center = np.asarray(center_xyz, dtype=np.float64)
        return self.box_world(center - radius_mm, center + radius_mm)

    def box_world(self, low_xyz: np.ndarray, high_xyz: np.ndarray):
        """Index box ``(lo_ijk, hi_ijk)`` (hi exclusive) holding the world box low..high (mm), or None."""
        corners = np.array([[x, y, z] for x in (low_xyz[0], high_xyz[0]) for y in (low_xyz[1], high_xyz[1])
                            for z in (low_xyz[2], high_xyz[2])], dtype=np.float64)
        index = self.world_to_index(corners)
        size_ijk = np.array(self.shape_zyx[::-1])
        lo = np.clip(np.floor(index.min(axis=0)).astype(int), 0, size_ijk)
        hi = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, size_ijk)
        return None if np.any(hi <= lo) else (lo, hi)

    def offsets(self, lo_ijk, hi_ijk, reference_xyz, components=(0, 1, 2)) -> tuple:
        """World mm offsets (x, y, z) of the voxel centres in a box from ``reference_xyz``.

        Each requested component (0 = x, 1 = y, 2 = z) is a float32 array of the box shape ``[z, y, x]``.
        """
        matrix = self.index_to_world_matrix
        base = self.origin - np.asarray(reference_xyz, dtype=np.float64)
        axes = [np.arange(lo_ijk[a], hi_ijk[a], dtype=np.float32) for a in range(3)]
        i_ax, j_ax, k_ax = axes[0][None, None, :], axes[1][None, :, None], axes[2][:, None, None]
        return tuple(np.float32(base[c]) + np.float32(matrix[c, 2]) * k_ax + np.float32(matrix[c, 1]) * j_ax
                     + np.float32(matrix[c, 0]) * i_ax for c in components)

    @property
    def partial_volume_mm(self) -> float:
        """Width over which an edge is smeared by the voxel size (mean spacing)."""
        return float(np.mean(self.spacing))


@dataclass
class Anatomy:
    """Body layout in world mm around ``center`` (x, y, z); lungs are axis-aligned ellipsoids."""
    center: np.ndarray
    body_axes: np.ndarray            # (2,) semi-axes of the elliptic body cylinder, x and y
    fat_mm: float
    lung_centers: np.ndarray         # (2, 3)
    lung_axes: np.ndarray            # (2, 3)
    spine_center: np.ndarray         # (2,) x, y of the vertebral cylinder
    spine_radius: float
    hu_fat: float
    hu_soft: float
    hu_lung: float
    hu_lung_gradient: float          # denser towards the back (+y)


@dataclass
class VesselTree:
    """Tapered tube segments (world mm) sharing one HU: rows p0(3), p1(3), r0, r1."""
    segments: np.ndarray
    bifurcations: np.ndarray         # (B, 4): branch point x, y, z (world mm) and the parent's end radius (mm)
    hu: float


@dataclass
class Finding:
    """A nodule-like object. ``center_xyz`` world mm; ``diameter_mm`` = equivalent-sphere diameter.

    ``excluded`` marks tiny irrelevant findings listed in annotations_excluded.csv (never class 1);
    ``csv_diameter`` is the value written to the CSV (-1 for some excluded findings, as in LUNA16).
    """
    center_xyz: np.ndarray
    diameter_mm: float
    kind: str                        # "solid", "ground-glass", "part-solid", "tiny"
    axes_mm: np.ndarray
    rotation: np.ndarray
    hu: float
    edge_mm: float
    juxtapleural: bool = False
    excluded: bool = False
    core_hu: float | None = None
    csv_diameter: float = 0.0

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0


@dataclass
class Candidate:
    """A candidate location in world mm with LUNA16 class (1 = nodule) and what it sits on."""
    center_xyz: np.ndarray
    label: int
    source: str


@dataclass
class PhantomCase:
    scan: CTScan
    nodules: list = field(default_factory=list)     # Finding, including excluded ones
    candidates: list = field(default_factory=list)  # Candidate
    geometry: Geometry | None = None


# --- random layout -----------------------------------------------------------

def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * cross + (1 - math.cos(angle_rad)) * cross @ cross


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_direction(rng: np.random.Generator, kind: str) -> np.ndarray:
    """ITK direction matrix of the given kind: identity, flipped axes, small rotation, or both."""
    direction = np.eye(3)
    if kind in ("flip", "flip_rotate"):
        flips = [(-1, -1, 1), (-1, 1, 1), (1, -1, 1), (-1, -1, -1)][rng.integers(4)]
        direction = np.diag(np.array(flips, dtype=np.float64))
    if kind in ("rotate", "flip_rotate"):
        if rng.random() < 0.6:
            axis = np.array([0.0, 0.0, 1.0])
        else:
            axis = rng.standard_normal(3)
        angle = math.radians(rng.uniform(3.0, 12.0)) * rng.choice([-1.0, 1.0])
        direction = _rotation(axis, angle) @ direction
    return direction


def _random_geometry(rng: np.random.Generator, shape_zyx: tuple, kind: str) -> Geometry:
    """Anisotropic spacing: square pixels filling a 260-320 mm field of view, slices 0.625-2.5 mm."""
    nz, ny, nx = shape_zyx
    pixel = rng.uniform(260.0, 320.0) / max(nx, ny)
    slice_mm = float(np.clip(rng.uniform(180.0, 300.0) / nz, 0.625, 2.5))
    spacing = np.round(np.array([pixel, pixel, slice_mm]), 6)
    direction = _random_direction(rng, kind)
    center = np.array([rng.uniform(-30, 30), rng.uniform(-40, 40), rng.uniform(-260, -40)])
    half_extent = (np.array([nx, ny, nz]) - 1) / 2.0
    origin = np.round(center - (direction * spacing[None, :]) @ half_extent, 4)
    return Geometry(tuple(int(s) for s in shape_zyx), origin, spacing, direction, kind)


def _random_anatomy(rng: np.random.Generator, geom: Geometry) -> Anatomy:
    nz, ny, nx = geom.shape_zyx
    fov_x, fov_y = nx * geom.spacing[0], ny * geom.spacing[1]
    extent_z = nz * geom.spacing[2]
    center = geom.index_to_world(((np.array([nx, ny, nz]) - 1) / 2.0)[None])[0]
    center = center + np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 0.0])
    ax, ay = 0.46 * fov_x * rng.uniform(0.93, 1.0), 0.32 * fov_y * rng.uniform(0.92, 1.05)
    fat = rng.uniform(5.0, 12.0)
    lung_axes, lung_centers = [], []
    for side in (-1.0, 1.0):
        cx, cy = side * ax * rng.uniform(0.48, 0.52), 0.04 * ay
        lx = min(ax * rng.uniform(0.37, 0.41), ax - fat - 8.0 - abs(cx))
        ly = min(ay * rng.uniform(0.70, 0.78), ay - fat - 8.0 - abs(cy))
        lz = 0.5 * extent_z * rng.uniform(0.95, 1.1)
        lung_centers.append(center + np.array([cx, cy, rng.uniform(-0.05, 0.05) * extent_z]))
        lung_axes.append([lx, ly, lz])
    return Anatomy(
        center=center, body_axes=np.array([ax, ay]), fat_mm=fat,
        lung_centers=np.array(lung_centers), lung_axes=np.array(lung_axes, dtype=np.float64),
        spine_center=center[:2] + np.array([0.0, 0.76 * ay]), spine_radius=rng.uniform(13.0, 17.0),
        hu_fat=rng.uniform(-120, -80), hu_soft=rng.uniform(30, 60),
        hu_lung=rng.uniform(-880, -840), hu_lung_gradient=rng.uniform(10, 40))


def _ellipsoid_sdf(u, v, w, axes) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid at the origin."""
    scaled_sq, gradient_sq = None, None
    for coord, semi_axis in zip((u, v, w), axes):
        term = np.square(coord * np.float32(1.0 / semi_axis))
        if scaled_sq is None:
            scaled_sq, gradient_sq = np.array(term), np.array(term * np.float32(1.0 / semi_axis ** 2))
        else:
            scaled_sq += term
            term *= np.float32(1.0 / semi_axis ** 2)
            gradient_sq += term
    k0 = np.sqrt(scaled_sq, out=scaled_sq)
    k1 = np.sqrt(gradient_sq, out=gradient_sq)
    np.maximum(k1, np.float32(1e-6), out=k1)
    distance = k0 - np.float32(1.0)
    distance *= k0
    distance /= k1
    return distance


def lung_depth_mm(anatomy: Anatomy, world_xyz: np.ndarray) -> np.ndarray:
    """(N,) approximate depth in mm inside the nearer lung (negative outside both lungs)."""
    points = np.atleast_2d(world_xyz).astype(np.float64)
    depths = [-_ellipsoid_sdf(*(points - c).T, axes) for c, axes in zip(anatomy.lung_centers, anatomy.lung_axes)]
    return np.max(depths, axis=0)


def _lung_surface_points(rng, anatomy: Anatomy, n: int):
    """n random points on the lung walls and their outward unit normals (world mm)."""
    side = rng.integers(0, 2, n)
    unit = rng.standard_normal((n, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    axes = anatomy.lung_axes[side]
    points = anatomy.lung_centers[side] + axes * unit
    normals = unit / axes
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    return points, normals


def _lung_points(rng, anatomy: Anatomy, n: int) -> np.ndarray:
    """n points spread through the lung ellipsoids (not uniform, which is fine for placement)."""
    side = rng.integers(0, 2, n)
    unit = rng.standard_normal((n, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return anatomy.lung_centers[side] + anatomy.lung_axes[side] * unit * rng.random((n, 1)) ** (1 / 3)


def _grow_tree(rng, anatomy: Anatomy, lung: int, start, heading, radius: float) -> VesselTree:
    """Binary tree of tapering tubes grown from the hilum outwards, kept inside the lung."""
    segments, bifurcations = [], []
    stack = [(np.asarray(start, float), np.asarray(heading, float) / np.linalg.norm(heading), radius, 0)]
    centre, axes = anatomy.lung_centers[lung], anatomy.lung_axes[lung]
    while stack:
        p0, heading, r0, depth = stack.pop()
        r1 = r0 * rng.uniform(0.88, 0.96)
        length = float(np.clip(r0 * rng.uniform(5.0, 10.0), 6.0, 35.0))
        for _ in range(6):
            direction = heading + 0.25 * rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            p1 = p0 + length * direction
            if -_ellipsoid_sdf(*(p1 - centre), axes) > r1 + 1.0:
                break
        else:
            continue
        segments.append([*p0, *p1, r0, r1])
        child_radius = r1 * rng.uniform(0.76, 0.9)
        if depth >= 7 or child_radius < 0.5:
            continue
        bifurcations.append([*p1, r1])
        side = np.cross(direction, rng.standard_normal(3))
        side /= np.linalg.norm(side)
        for sign in (1.0, -1.0):
            angle = math.radians(rng.uniform(20.0, 45.0))
            child = math.cos(angle) * direction + sign * math.sin(angle) * side
            stack.append((p1, child, child_radius * rng.uniform(0.9, 1.1), depth + 1))
    return VesselTree(np.array(segments, dtype=np.float64).reshape(-1, 8),
                      np.array(bifurcations, dtype=np.float64).reshape(-1, 4), hu=float(rng.uniform(0.0, 150.0)))


def _random_vessels(rng, anatomy: Anatomy) -> list:
    trees = []
    for lung in range(2):
        centre, axes = anatomy.lung_centers[lung], anatomy.lung_axes[lung]
        lateral = np.sign(centre[0] - anatomy.center[0])
        for up in (0.9, 0.35, -0.25, -0.8):
            hilum = centre + axes * np.array([-lateral * 0.7, rng.uniform(-0.15, 0.1), rng.uniform(-0.12, 0.12)])
            heading = np.array([lateral, rng.uniform(-0.4, 0.4), up + rng.uniform(-0.2, 0.2)])
            trees.append(_grow_tree(rng, anatomy, lung, hilum, heading, rng.uniform(2.4, 4.0)))
    return trees


def _nodule_shape(rng, diameter: float):
    """Random ellipsoid semi-axes (mm) with the given equivalent-sphere diameter, and its rotation."""
    axes = (diameter / 2.0) * rng.uniform(0.8, 1.2, 3)
    axes *= (diameter / 2.0) / np.prod(axes) ** (1 / 3)
    return axes, _random_rotation(rng)


def _random_nodules(rng, anatomy: Anatomy, geom: Geometry, count: int) -> list:
    """Solid, ground-glass and part-solid nodules (4-25 mm) in the lungs, some on the pleura."""
    nodules: list[Finding] = []
    for _ in range(count):
        diameter = float(math.exp(rng.uniform(math.log(4.0), math.log(25.0))))
        kind = ["solid", "ground-glass", "part-solid"][rng.choice(3, p=[0.55, 0.25, 0.20])]
        juxtapleural = bool(rng.random() < 0.3)
        axes, rotation = _nodule_shape(rng, diameter)
        reach = float(axes.max())
        for _attempt in range(50):
            if juxtapleural:
                wall, normal = _lung_surface_points(rng, anatomy, 1)
                centre = wall[0] - normal[0] * reach * rng.uniform(0.5, 0.8)
                ok = lung_depth_mm(anatomy, centre)[0] > 0.3 * reach
            else:
                centre = _lung_points(rng, anatomy, 1)[0]
                ok = lung_depth_mm(anatomy, centre)[0] > reach + 3.0
            ok = ok and geom.contains(centre, reach + 3.0)[0]
            ok = ok and all(np.linalg.norm(centre - other.center_xyz) > reach + other.axes_mm.max() + 6.0
                            for other in nodules)
            if ok:
                break
        else:
            continue
        if kind == "solid":
            hu, edge, core = rng.uniform(30.0, 100.0), rng.uniform(0.4, 1.0), None
        else:
            hu, edge = rng.uniform(-550.0, -300.0), rng.uniform(0.8, 1.8)
            core = rng.uniform(0.0, 80.0) if kind == "part-solid" else None
        nodules.append(Finding(centre, diameter, kind, axes, rotation, float(hu), float(edge), juxtapleural,
                               core_hu=None if core is None else float(core), csv_diameter=round(diameter, 3)))
    return nodules


def _random_excluded(rng, anatomy: Anatomy, geom: Geometry, nodules: list, count: int) -> list:
    """Tiny (< 3 mm) bright blobs: LUNA16's 'irrelevant findings', listed in annotations_excluded.csv."""
    found: list[Finding] = []
    points = _lung_points(rng, anatomy, 200)
    for centre in points:
        if len(found) >= count:
            break
        if lung_depth_mm(anatomy, centre)[0] < 4.0 or not geom.contains(centre, 4.0)[0]:
            continue
        if any(np.linalg.norm(centre - n.center_xyz) < n.axes_mm.max() + 6.0 for n in nodules + found):
            continue
        diameter = float(rng.uniform(1.5, 2.9))
        axes, rotation = _nodule_shape(rng, diameter)
        csv_diameter = -1.0 if rng.random() < 0.5 else round(diameter, 3)
        found.append(Finding(centre, diameter, "tiny", axes, rotation, float(rng.uniform(20.0, 120.0)), 0.4,
                             excluded=True, csv_diameter=csv_diameter))
    return found


# --- candidates ----------------------------------------------------------------

def _far_from_nodules(points: np.ndarray, nodules: list, margin_mm: float) -> np.ndarray:
    keep = np.ones(len(points), dtype=bool)
    for nodule in nodules:
        keep &= np.linalg.norm(points - nodule.center_xyz, axis=1) > nodule.axes_mm.max() + margin_mm
    return keep


def _negative_pool(rng, source: str, anatomy: Anatomy, trees: list, nodules: list, n: int) -> np.ndarray:
    """Up to ``n`` proposals (world mm) of one negative type, before filtering."""
    segments = np.concatenate([t.segments for t in trees]) if trees else np.zeros((0, 8))
    if source == "vessel" and len(segments):
        lengths = np.linalg.norm(segments[:, 3:6] - segments[:, :3], axis=1)
        weights = lengths * (segments[:, 6] + segments[:, 7]) ** 2
        pick = rng.choice(len(segments), n, p=weights / weights.sum())
        t = rng.uniform(0.15, 0.85, (n, 1))
        seg = segments[pick]
        radius = seg[:, 6:7] + t * (seg[:, 7:8] - seg[:, 6:7])
        return seg[:, :3] + t * (seg[:, 3:6] - seg[:, :3]) + 0.2 * radius * rng.standard_normal((n, 3))
    if source == "bifurcation":
        nodes = np.concatenate([t.bifurcations for t in trees]) if trees else np.zeros((0, 4))
        if len(nodes):
            weights = nodes[:, 3] ** 2
            return nodes[rng.choice(len(nodes), n, p=weights / weights.sum()), :3] + 0.3 * rng.standard_normal((n, 3))
    if source == "pleura":
        points, normals = _lung_surface_points(rng, anatomy, n)
        return points + normals * rng.uniform(-3.0, 2.0, (n, 1))
    if source == "near-nodule" and nodules:
        pick = rng.integers(0, len(nodules), n)
        unit = rng.standard_normal((n, 3))
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        reach = np.array([nodules[p].axes_mm.max() for p in pick])[:, None]
        return np.array([nodules[p].center_xyz for p in pick]) + unit * (reach + rng.uniform(3.0, 10.0, (n, 1)))
    if source == "soft-tissue":
        angle = rng.uniform(0, 2 * np.pi, n)
        radial = np.sqrt(rng.random(n)) * 0.9
        inner = anatomy.body_axes - anatomy.fat_mm
        xy = anatomy.center[:2] + np.stack([inner[0] * radial * np.cos(angle), inner[1] * radial * np.sin(angle)], 1)
        z = anatomy.center[2] + rng.uniform(-0.5, 0.5, n) * anatomy.lung_axes[:, 2].mean() * 2
        points = np.column_stack([xy, z])
        spine = np.linalg.norm(points[:, :2] - anatomy.spine_center, axis=1) > anatomy.spine_radius + 3.0
        return points[(lung_depth_mm(anatomy, points) < -5.0) & spine]
    return _lung_points(rng, anatomy, n)   # parenchyma, and the fallback when a type has nothing to offer


def _random_candidates(rng, anatomy, geom, trees, nodules, excluded, negatives: int,
                       negative_mix: tuple = NEGATIVE_MIX) -> list:
    """1-3 class-1 candidates per nodule near its centre; class-0 candidates elsewhere, of the types and shares
    of ``negative_mix``."""
    candidates = []
    for nodule in nodules:
        for _ in range(int(rng.integers(1, 4))):
            unit = rng.standard_normal(3)
            unit /= np.linalg.norm(unit)
            offset = unit * rng.uniform(0.0, 0.3) * nodule.axes_mm.min()
            candidates.append(Candidate(nodule.center_xyz + offset, 1, "nodule"))
    for finding in excluded:
        candidates.append(Candidate(finding.center_xyz + 0.2 * rng.standard_normal(3), 0, "excluded"))
    counts = [int(negatives * share) for _, share in negative_mix]
    counts[0] += negatives - sum(counts)
    for (source, _), count in zip(negative_mix, counts):
        if count == 0:
            continue
        pool = _negative_pool(rng, source, anatomy, trees, nodules, 8 * count + 16)
        keep = geom.contains(pool, 1.0) & _far_from_nodules(pool, nodules + excluded, 2.0)
        if source == "parenchyma":
            keep &= lung_depth_mm(anatomy, pool) > 3.0
        for point in pool[keep][:count]:
            candidates.append(Candidate(point, 0, source))
    order = rng.permutation(len(candidates))
    return [candidates[i] for i in order]


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
    """Air, body (fat shell, soft tissue), spine and lung parenchyma; each drawn only inside its own box."""
    edge = geom.partial_volume_mm
    ax, ay = (np.float32(v) for v in anatomy.body_axes)
    volume[...] = -1000.0
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
        marrow_sd = spine_sd + np.float32(2.5)   # cortical shell 2.5 mm thick
        _blend(view, _edge_alpha(spine_sd, edge), 650.0)
        _blend(view, _edge_alpha(marrow_sd, edge), 230.0)
    for centre, axes in zip(anatomy.lung_centers, anatomy.lung_axes):
        box = geom.box_world(centre - axes - edge, centre + axes + edge)
        for lo, hi in ([] if box is None else _slabs(*box)):
            u, v, w = geom.offsets(lo, hi, centre)
            lung_hu = np.float32(anatomy.hu_lung) + np.float32(anatomy.hu_lung_gradient / axes[1]) * v
            _blend(_region(volume, lo, hi), _edge_alpha(_ellipsoid_sdf(u, v, w, axes), edge), lung_hu)


def _render_tree(volume: np.ndarray, geom: Geometry, tree: VesselTree) -> None:
    """Union of tapered tubes (max of their partial-volume fractions), then one blend with the tree's HU."""
    if not len(tree.segments):
        return
    edge = geom.partial_volume_mm
    reach = tree.segments[:, 6].max() + 2 * edge
    ends = tree.segments[:, :6].reshape(-1, 3)
    low, high = ends.min(axis=0) - reach, ends.max(axis=0) + reach
    box = geom.box_world(low, high)
    if box is None:
        return
    tree_lo, tree_hi = box
    fraction = np.zeros(tuple((tree_hi - tree_lo)[::-1]), dtype=np.float32)
    for p0x, p0y, p0z, p1x, p1y, p1z, r0, r1 in tree.segments:
        p0, p1 = np.array([p0x, p0y, p0z]), np.array([p1x, p1y, p1z])
        seg_box = geom.box_around((p0 + p1) / 2, np.linalg.norm(p1 - p0) / 2 + max(r0, r1) + edge)
        if seg_box is None:
            continue
        lo, hi = np.maximum(seg_box[0], tree_lo), np.minimum(seg_box[1], tree_hi)
        if np.any(hi <= lo):
            continue
        x, y, z = geom.offsets(lo, hi, p0)
        d = (p1 - p0).astype(np.float32)
        t = np.clip((x * d[0] + y * d[1] + z * d[2]) / np.float32(d @ d), 0.0, 1.0)
        distance = np.sqrt((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2)
        radius = np.float32(r0) + np.float32(r1 - r0) * t
        alpha = _edge_alpha(distance - radius, edge) * np.minimum(1.0, 2.0 * radius / np.float32(edge))
        sub = fraction[lo[2] - tree_lo[2]:hi[2] - tree_lo[2], lo[1] - tree_lo[1]:hi[1] - tree_lo[1],
                       lo[0] - tree_lo[0]:hi[0] - tree_lo[0]]
        np.maximum(sub, alpha, out=sub)
    view = volume[tree_lo[2]:tree_hi[2], tree_lo[1]:tree_hi[1], tree_lo[0]:tree_hi[0]]
    _blend(view, fraction, tree.hu)


def _render_ellipsoid(volume, geom: Geometry, centre, axes, rotation, hu: float, edge_mm: float) -> None:
    width = float(np.hypot(edge_mm, 0.7 * geom.partial_volume_mm))
    box = geom.box_around(centre, float(np.max(axes)) + width)
    if box is None:
        return
    lo, hi = box
    x, y, z = geom.offsets(lo, hi, centre)
    rot = rotation.astype(np.float32)
    local = [rot[0, c] * x + rot[1, c] * y + rot[2, c] * z for c in range(3)]
    alpha = _edge_alpha(_ellipsoid_sdf(*local, axes), width) * min(1.0, 2.0 * float(np.min(axes)) / width)
    _blend(volume[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]], alpha, hu)


def _render_finding(volume, geom: Geometry, finding: Finding) -> None:
    _render_ellipsoid(volume, geom, finding.center_xyz, finding.axes_mm, finding.rotation, finding.hu, finding.edge_mm)
    if finding.core_hu is not None:
        _render_ellipsoid(volume, geom, finding.center_xyz, finding.axes_mm * 0.5, finding.rotation,
                          finding.core_hu, 0.6)


def _add_noise_and_quantise(rng, volume: np.ndarray, noise_std: float) -> np.ndarray:
    """int16 HU: volume + white Gaussian noise, rounded and clipped to the CT range."""
    nz, ny, nx = volume.shape
    slab = max(1, SLAB_VOXELS // (ny * nx))
    out = np.empty(volume.shape, dtype=np.int16)
    for k0 in range(0, nz, slab):
        view = volume[k0:k0 + slab]
        view += rng.standard_normal(view.shape, dtype=np.float32) * np.float32(noise_std)
        np.clip(np.rint(view, out=view), HU_MIN, HU_MAX, out=view)
        out[k0:k0 + slab] = view
    return out


# --- public API -----------------------------------------------------------------

def _series_uid(rng: np.random.Generator) -> str:
    """A DICOM-style UID under the 2.25 (UUID-derived) root, drawn from the seeded generator."""
    return "2.25." + str(int(rng.integers(1, 2**62)) * 2**62 + int(rng.integers(0, 2**62)))


def make_phantom_scan(rng: np.random.Generator, shape_zyx: tuple = SIZES["small"], *,
                      direction_kind: str | None = None, nodules_per_scan: tuple = (2, 5),
                      negatives_per_scan: int = 40, excluded_per_scan: tuple = (0, 2),
                      noise_std: tuple = (20.0, 40.0), negative_mix: tuple = NEGATIVE_MIX) -> PhantomCase:
    """One synthetic chest CT with its nodules and candidates.

    shape_zyx: array shape (nz, ny, nx). direction_kind: one of DIRECTION_KINDS, or None for a random one.
    nodules_per_scan / excluded_per_scan: inclusive (low, high) counts. negatives_per_scan: mean number of
    class-0 candidates (each scan draws 0.6-1.4 times it), of the types and shares of ``negative_mix``.
    noise_std: (low, high) HU of the Gaussian noise.
    Returns a :class:`PhantomCase`: ``scan`` (data.CTScan, int16 HU ``[z, y, x]``, named by its seriesuid),
    ``nodules`` (Finding list, world mm, excluded findings flagged), ``candidates`` (Candidate list, world mm).
    """
    shape_zyx = _check_shape(shape_zyx)
    if direction_kind is None:
        direction_kind = DIRECTION_KINDS[int(rng.integers(len(DIRECTION_KINDS)))]
    if direction_kind not in DIRECTION_KINDS:
        raise ValueError(f"direction_kind must be one of {DIRECTION_KINDS}, got {direction_kind!r}")
    if negatives_per_scan < 0:
        raise ValueError(f"negatives_per_scan must be >= 0, got {negatives_per_scan}")
    for name, pair in (("nodules_per_scan", nodules_per_scan), ("excluded_per_scan", excluded_per_scan)):
        if len(pair) != 2 or not 0 <= pair[0] <= pair[1]:
            raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {pair}")
    uid = _series_uid(rng)
    geom = _random_geometry(rng, shape_zyx, direction_kind)
    anatomy = _random_anatomy(rng, geom)
    trees = _random_vessels(rng, anatomy)
    nodules = _random_nodules(rng, anatomy, geom, int(rng.integers(nodules_per_scan[0], nodules_per_scan[1] + 1)))
    excluded = _random_excluded(rng, anatomy, geom, nodules,
                                int(rng.integers(excluded_per_scan[0], excluded_per_scan[1] + 1)))
    negatives = int(round(negatives_per_scan * rng.uniform(0.6, 1.4)))
    candidates = _random_candidates(rng, anatomy, geom, trees, nodules, excluded, negatives, negative_mix)

    volume = np.empty(shape_zyx, dtype=np.float32)
    _render_background(volume, geom, anatomy)
    for tree in trees:
        _render_tree(volume, geom, tree)
    for finding in nodules + excluded:
        _render_finding(volume, geom, finding)
    hu = _add_noise_and_quantise(rng, volume, float(rng.uniform(*noise_std)))
    scan = CTScan(hu=hu, origin=geom.origin.copy(), spacing=geom.spacing.copy(),
                  direction=geom.direction.copy(), name=uid)
    return PhantomCase(scan=scan, nodules=nodules + excluded, candidates=candidates, geometry=geom)


def _check_shape(shape_zyx) -> tuple:
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 24:
        raise ValueError(f"shape must be three sizes (z, y, x) of at least 24 voxels, got {shape_zyx}")
    if np.prod(shape, dtype=np.int64) > 600 * 1024 * 1024:
        raise ValueError(f"shape {shape} is too large for a phantom")
    return shape


def _write_scan_mhd(scan: CTScan, folder: Path) -> Path:
    """<folder>/<uid>.mhd + .raw via a hidden staging folder, so a visible .mhd always has its .raw."""
    staging = folder / ".partial"
    staging.mkdir(parents=True, exist_ok=True)
    write_mhd(scan, staging / f"{scan.name}.mhd")
    os.replace(staging / f"{scan.name}.raw", folder / f"{scan.name}.raw")
    os.replace(staging / f"{scan.name}.mhd", folder / f"{scan.name}.mhd")
    staging.rmdir()
    return folder / f"{scan.name}.mhd"


OUTPUT_FILES = ("annotations.csv", "annotations_excluded.csv", "candidates_V2.csv", "seriesuids.csv",
                "candidate_sources.csv", "phantom_manifest.json")
UNFINISHED_MARK = ".phantom_unfinished"   # present while a folder is being written; the manifest marks it done


def _prepare_root(root: Path, force: bool) -> None:
    """Refuse a non-empty folder unless ``force``; with ``force`` remove only an earlier phantom folder's files."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        return
    if not force:
        raise UserError(f"{root} is not empty; pass --force to replace it, or choose another --data-dir")
    ours = (root / "phantom_manifest.json").exists() or (root / UNFINISHED_MARK).exists()
    if not ours and any(root.glob("subset*/*.mhd")):
        raise UserError(f"{root} holds scans that were not made by synth (no phantom_manifest.json); "
                        "not deleting them, choose another --data-dir")
    for subset in root.glob("subset*"):
        if subset.is_dir():
            shutil.rmtree(subset)
    for name in OUTPUT_FILES:
        (root / name).unlink(missing_ok=True)
    (root / UNFINISHED_MARK).unlink(missing_ok=True)


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def write_luna_folder(root: Path, n_subsets: int = 3, scans_per_subset: int = 4, shape=SIZES["small"],
                      seed: int = 0, negatives_per_scan: int = 40, nodules_per_scan: tuple = (2, 5),
                      excluded_per_scan: tuple = (0, 2), force: bool = False,
                      negative_mix: tuple = NEGATIVE_MIX) -> dict:
    """Write a LUNA16-shaped folder of phantom scans under ``root``; return a summary dict.

    Scan n of subset k is drawn from ``SeedSequence([seed, k, n])``, so a seed gives byte-identical files.
    Direction kinds cycle through DIRECTION_KINDS across scans. Scans go first (each .raw before its .mhd),
    the CSVs and ``phantom_manifest.json`` last, each through a temporary file and a rename.
    """
    root = Path(root)
    if not 1 <= n_subsets <= 10:
        raise UserError(f"the number of subsets must be 1..10 (LUNA16 has subset0..subset9), got {n_subsets}")
    if scans_per_subset < 1:
        raise UserError(f"scans per subset must be >= 1, got {scans_per_subset}")
    if negatives_per_scan < 0:
        raise UserError(f"negatives_per_scan must be >= 0, got {negatives_per_scan}")
    shape = _check_shape(shape)
    _prepare_root(root, force)
    (root / UNFINISHED_MARK).write_text("synth is writing this folder; rerun synth with --force to finish it\n")
    start = time.perf_counter()
    annotations, excluded_rows, candidate_rows, source_rows, uids, scans_meta = [], [], [], [], [], []
    for subset in range(n_subsets):
        folder = root / f"subset{subset}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(scans_per_subset):
            rng = np.random.default_rng(np.random.SeedSequence([seed, subset, index]))
            kind = DIRECTION_KINDS[(subset * scans_per_subset + index) % len(DIRECTION_KINDS)]
            case = make_phantom_scan(rng, shape, direction_kind=kind, nodules_per_scan=nodules_per_scan,
                                     negatives_per_scan=negatives_per_scan, excluded_per_scan=excluded_per_scan,
                                     negative_mix=negative_mix)
            _write_scan_mhd(case.scan, folder)
            uid = case.scan.name
            uids.append(uid)
            for finding in case.nodules:
                row = [uid, *map(_fmt, finding.center_xyz), f"{finding.csv_diameter:g}"]
                (excluded_rows if finding.excluded else annotations).append(row)
            for cand in case.candidates:
                candidate_rows.append([uid, *map(_fmt, cand.center_xyz), str(cand.label)])
                source_rows.append([uid, *map(_fmt, cand.center_xyz), str(cand.label), cand.source])
            scans_meta.append({"seriesuid": uid, "subset": subset, "shape_zyx": list(shape),
                               "spacing_xyz": case.scan.spacing.tolist(), "origin_xyz": case.scan.origin.tolist(),
                               "direction": case.scan.direction.tolist(), "direction_kind": kind,
                               "nodules": sum(not f.excluded for f in case.nodules),
                               "candidates": len(case.candidates)})
    _write_tables(root, annotations, excluded_rows, candidate_rows, source_rows, uids)
    summary = {"root": str(root), "synthetic": True, "seed": seed, "subsets": n_subsets,
               "scans_per_subset": scans_per_subset, "scans": len(uids), "shape_zyx": list(shape),
               "nodules": len(annotations), "excluded_findings": len(excluded_rows),
               "candidates": len(candidate_rows), "positives": sum(r[-1] == "1" for r in candidate_rows),
               "negatives": sum(r[-1] == "0" for r in candidate_rows),
               "negatives_per_scan": negatives_per_scan, "nodules_per_scan": list(nodules_per_scan),
               "excluded_per_scan": list(excluded_per_scan)}
    manifest = dict(summary, root=None, scan_geometry=scans_meta)
    atomic_write_text(root / "phantom_manifest.json", json.dumps(manifest, indent=1) + "\n")
    (root / UNFINISHED_MARK).unlink()
    summary["seconds"] = time.perf_counter() - start
    return summary


def _write_tables(root: Path, annotations: list, excluded_rows: list, candidate_rows: list, source_rows: list,
                  uids: list) -> None:
    """The four LUNA16 CSVs, ``candidate_sources.csv`` (each candidate's kind) and ``seriesuids.csv``."""
    header = "seriesuid,coordX,coordY,coordZ,"
    tables = {"annotations.csv": (header + "diameter_mm", annotations),
              "annotations_excluded.csv": (header + "diameter_mm", excluded_rows),
              "candidates_V2.csv": (header + "class", candidate_rows),
              "candidate_sources.csv": (header + "class,source", source_rows)}
    for name, (head, rows) in tables.items():
        atomic_write_text(root / name, "\n".join([head] + [",".join(r) for r in rows]) + "\n")
    atomic_write_text(root / "seriesuids.csv", "".join(uid + "\n" for uid in uids))


def summary_table(summary: dict):
    """A rich table of what :func:`write_luna_folder` wrote, captioned as synthetic data."""
    from rich.table import Table
    table = Table(title=f"Synthetic phantoms in {summary['root']}",
                  caption="[yellow]These are synthetic phantoms made by this toolkit, not patient data; "
                          "only the folder layout follows LUNA16.[/]")
    table.add_column("item")
    table.add_column("value", justify="right")
    for label, key in (("subsets", "subsets"), ("scans", "scans"), ("nodules (annotations.csv)", "nodules"),
                       ("excluded findings", "excluded_findings"), ("candidates", "candidates"),
                       ("  class 1", "positives"), ("  class 0", "negatives")):
        table.add_row(label, str(summary[key]))
    table.add_row("scan shape (z, y, x)", " x ".join(map(str, summary["shape_zyx"])))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    return table
