"""The scene of a phantom (``phantom.py``), in world mm: the scan's voxel grid (:class:`Geometry`), the chest
(:class:`Anatomy` with its :class:`Fissure` sheets), tapered tube trees (:class:`VesselTree`: ribs, vessels,
airways) and nodule-like findings (:class:`Finding`); and the lungs' shape that laying a scene out, checking
it and drawing it all ask: their signed distance, depth, surface and clearance.

World points are ITK/LPS physical points ``(x, y, z)``; a grid maps index ``(i, j, k)`` to world by
``origin + direction @ (spacing * index)`` and arrays are indexed ``[z, y, x]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

import nodules as nodule_shapes
import phantom_kernels as kernels

LUNG_MARGIN_MM = 8.0     # the lungs keep this far from every face of the field of view


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
        return self.face_distance_mm(world_xyz) >= np.asarray(margin_mm, dtype=np.float64).reshape(-1)

    def face_distance_mm(self, world_xyz: np.ndarray) -> np.ndarray:
        """(N,) mm from each point to the nearest face of the grid (first and last voxel centres; negative
        outside), measured along the index axes."""
        index = self.world_to_index(np.atleast_2d(world_xyz))
        size_ijk = np.array(self.shape_zyx[::-1], dtype=np.float64)
        return (np.minimum(index, size_ijk - 1 - index) * self.spacing[None, :]).min(axis=1)

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

    def value_at(self, volume: np.ndarray, world_xyz: np.ndarray) -> np.ndarray:
        """(N,) values of ``volume`` ``[z, y, x]`` at the voxels nearest to world points (clamped to the
        grid)."""
        index = np.rint(self.world_to_index(np.atleast_2d(world_xyz))).astype(int)
        index = np.clip(index, 0, np.array(self.shape_zyx[::-1]) - 1)
        return volume[index[:, 2], index[:, 1], index[:, 0]]

    @property
    def partial_volume_mm(self) -> float:
        """Width over which an edge is smeared by the voxel size (mean spacing)."""
        return float(np.mean(self.spacing))


@dataclass
class Fissure:
    """A thin sheet in one lung (world mm): the points where
    ``n . (p - point) + bend * ((p - point) . along)^2`` is 0, ``thickness_mm`` thick. ``only_front_of``:
    another Fissure; the sheet exists only on its positive side (the right lung's horizontal fissure stops at
    the oblique one)."""
    lung: int
    point: np.ndarray
    normal: np.ndarray
    along: np.ndarray
    bend: float
    thickness_mm: float
    hu: float
    only_front_of: "Fissure | None" = None

    def signed(self, x, y, z):
        """The sheet's level function (about mm from it) at world offsets from ``point`` (float32 arrays)."""
        n, a = self.normal.astype(np.float32), self.along.astype(np.float32)
        across = n[0] * x + n[1] * y + n[2] * z
        length = a[0] * x + a[1] * y + a[2] * z
        return across + np.float32(self.bend) * length * length


@dataclass
class Anatomy:
    """Body layout in world mm around ``center`` (x, y, z); the lungs' shape is :func:`lung_sdf`.

    The trachea runs from ``trachea_top`` (above the scan) to the ``carina`` (both world mm) with a lumen of
    ``trachea_radius`` mm; ``wall_mm`` is the least soft tissue between a lung and the body's fat."""
    center: np.ndarray
    body_axes: np.ndarray            # (2,) semi-axes of the elliptic body cylinder, x and y
    fat_mm: float
    wall_mm: float
    cavity_axes: np.ndarray          # (2,) the rib cage: the body's semi-axes less fat and wall
    lung_centers: np.ndarray         # (2, 3) centres of the lungs' ellipsoids
    lung_axes: np.ndarray            # (2, 3) their semi-axes (the lungs are these, trimmed: see lung_sdf)
    spine_center: np.ndarray         # (2,) x, y of the vertebral cylinder
    spine_radius: float
    trachea_top: np.ndarray
    carina: np.ndarray
    trachea_radius: float
    mediastinum_center: np.ndarray   # (2,) x, y of the mediastinum's elliptic cylinder (no lung in it)
    mediastinum_axes: np.ndarray     # (2,) its semi-axes
    hu_fat: float
    hu_soft: float
    hu_lung: float
    hu_lung_gradient: float          # denser towards the back (+y)
    heart_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    heart_axes: np.ndarray = field(default_factory=lambda: np.ones(3))
    # diaphragm domes under the lungs
    dome_centers: np.ndarray = field(default_factory=lambda: np.zeros((2, 3)))
    dome_axes: np.ndarray = field(default_factory=lambda: np.ones((2, 3)))
    fissures: list = field(default_factory=list)
    parameters: np.ndarray | None = None   # lung_parameters, kept while the lungs do not change


@dataclass
class VesselTree:
    """Tapered tube segments (world mm) sharing one HU: rows p0(3), p1(3), r0, r1.

    For an airway the radii are the lumen's and ``wall_mm`` (the wall's thickness as a share of the lumen
    radius plus a floor, see :func:`airway_wall_mm`) is drawn around it."""
    segments: np.ndarray
    bifurcations: np.ndarray         # (B, 4): branch point x, y, z (world mm) and the parent's end
                                     # radius (mm)
    hu: float
    airway: bool = False


@dataclass
class Finding:
    """A nodule-like object. ``center_xyz`` world mm (the centroid); ``diameter_mm`` = volume-equivalent
    diameter.

    ``axes_mm`` are the semi-axes (mm) of the nodule's body before lobes and spicules, ``rotation`` its frame
    (columns: world directions of those axes); ``nodule`` is the :class:`nodules.Nodule` that is drawn.
    ``placement``: "isolated", "vessel" (touching or engulfing a vessel) or "pleura" (juxtapleural).
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
    shape: str = "round"
    placement: str = "isolated"
    nodule: nodule_shapes.Nodule | None = None

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    @property
    def reach_mm(self) -> float:
        """Farthest the finding reaches from its centre (mm), spicules included."""
        return self.nodule.reach_mm if self.nodule is not None else float(np.max(self.axes_mm))

    def manifest_entry(self) -> dict:
        return {"center_xyz": [round(float(v), 4) for v in self.center_xyz],
                "diameter_mm": round(self.diameter_mm, 3), "kind": self.kind, "shape": self.shape,
                "placement": self.placement, "excluded": self.excluded}


def airway_wall_mm(lumen_radius_mm):
    """Thickness (mm) of an airway's wall around a lumen of the given radius (mm)."""
    return 0.3 + 0.18 * np.asarray(lumen_radius_mm)


# --- the lungs' shape -------------------------------------------------------------

def _ellipse_sdf(x, y, axes) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an ellipse at the origin with semi-axes
    ``axes``."""
    kx, ky = np.float32(1.0 / axes[0]), np.float32(1.0 / axes[1])
    k0 = np.sqrt(np.square(x * kx) + np.square(y * ky))
    k1 = np.maximum(np.sqrt(np.square(x * (kx * kx)) + np.square(y * (ky * ky))), np.float32(1e-6))
    return k0 * (k0 - np.float32(1.0)) / k1


def lung_parameters(anatomy: Anatomy) -> np.ndarray:
    """(2, LUNG_PARAMETERS) float64 rows describing each lung for :func:`phantom_kernels.lung_distance`: its
    ellipsoid, less what lies outside the rib cage (the body less fat and wall), within 2 mm of the midline
    (the trachea's x) or across it, in the mediastinum or the heart, under its diaphragm dome, or within 3 mm
    of the spine."""
    rows = np.zeros((2, kernels.LUNG_PARAMETERS))
    for lung, row in enumerate(rows):
        row[kernels.LUNG_CENTRE:kernels.LUNG_CENTRE + 3] = anatomy.lung_centers[lung]
        row[kernels.LUNG_AXES:kernels.LUNG_AXES + 3] = anatomy.lung_axes[lung]
        row[kernels.CAVITY_CENTRE:kernels.CAVITY_CENTRE + 2] = anatomy.center[:2]
        row[kernels.CAVITY_AXES:kernels.CAVITY_AXES + 2] = anatomy.cavity_axes
        row[kernels.SIDE] = np.sign(anatomy.lung_centers[lung][0] - anatomy.center[0])
        row[kernels.BAND_X], row[kernels.BAND_HALF] = anatomy.carina[0], 2.0
        row[kernels.MEDIASTINUM_CENTRE:kernels.MEDIASTINUM_CENTRE + 2] = anatomy.mediastinum_center
        row[kernels.MEDIASTINUM_AXES:kernels.MEDIASTINUM_AXES + 2] = anatomy.mediastinum_axes
        row[kernels.HEART_CENTRE:kernels.HEART_CENTRE + 3] = anatomy.heart_center
        row[kernels.HEART_AXES:kernels.HEART_AXES + 3] = anatomy.heart_axes
        row[kernels.DOME_CENTRE:kernels.DOME_CENTRE + 3] = anatomy.dome_centers[lung]
        row[kernels.DOME_AXES:kernels.DOME_AXES + 3] = anatomy.dome_axes[lung]
        row[kernels.SPINE_CENTRE:kernels.SPINE_CENTRE + 2] = anatomy.spine_center
        row[kernels.SPINE_CLEAR] = anatomy.spine_radius + 3.0
    return rows


def lung_sdf_points(anatomy: Anatomy, lung: int, points: np.ndarray) -> np.ndarray:
    """(N,) approximate signed distance (mm, negative inside) of world points (N, 3) to lung ``lung``
    (0, 1)."""
    points = np.ascontiguousarray(np.atleast_2d(points), dtype=np.float64)
    if anatomy.parameters is None:
        anatomy.parameters = lung_parameters(anatomy)
    return kernels.lung_distances(anatomy.parameters[lung], points)


def lung_depth_mm(anatomy: Anatomy, world_xyz: np.ndarray) -> np.ndarray:
    """(N,) approximate depth in mm inside the nearer lung (negative outside both lungs)."""
    return np.max([-lung_sdf_points(anatomy, lung, world_xyz) for lung in range(2)], axis=0)


def lung_core(anatomy: Anatomy, lung: int) -> np.ndarray:
    """A point well inside the lung (world mm), from which every ray leaves it once: above the heart,
    lateral."""
    c, axes = anatomy.lung_centers[lung], anatomy.lung_axes[lung]
    return c + np.array([np.sign(c[0] - anatomy.center[0]) * 0.12 * axes[0], 0.0, 0.15 * axes[2]])


def surface_along(anatomy: Anatomy, lung: int, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(N, 3) the first points (world mm) where rays from ``origins`` (inside the lung) along unit
    ``directions`` leave it: 1 mm steps, then bisection."""
    origins = np.broadcast_to(origins, directions.shape)
    steps = np.arange(0.0, 2.2 * float(anatomy.lung_axes[lung].max()), 1.0)
    along = origins[:, None, :] + steps[None, :, None] * directions[:, None, :]
    outside = lung_sdf_points(anatomy, lung, along.reshape(-1, 3)).reshape(len(directions), len(steps)) > 0
    first = np.where(outside.any(axis=1), outside.argmax(axis=1), len(steps) - 1)
    low, high = steps[np.maximum(first - 1, 0)], steps[first]
    for _ in range(12):
        middle = (low + high) / 2
        out = lung_sdf_points(anatomy, lung, origins + middle[:, None] * directions) > 0
        high, low = np.where(out, middle, high), np.where(out, low, middle)
    return origins + ((low + high) / 2)[:, None] * directions


def lung_normals(anatomy: Anatomy, lung: int, points: np.ndarray) -> np.ndarray:
    """(N, 3) outward unit normals: the lung distance's gradient by central differences (0.5 mm)."""
    gradient = np.stack([lung_sdf_points(anatomy, lung, points + step)
                         - lung_sdf_points(anatomy, lung, points - step)
                         for step in 0.5 * np.eye(3)], axis=1)
    return gradient / np.maximum(np.linalg.norm(gradient, axis=1, keepdims=True), 1e-9)


def _segment_distance(points: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """(N,) mm from points (N, 3) to the segment p0-p1."""
    d = p1 - p0
    t = np.clip((points - p0) @ d / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.linalg.norm(points - (p0 + t[:, None] * d), axis=1)


def lung_surface_samples(anatomy: Anatomy, per_lung: int = 800) -> np.ndarray:
    """(2 * per_lung, 3) points spread over both lungs' surfaces (world mm), for checks."""
    unit = nodule_shapes.fibonacci_directions(per_lung)
    return np.concatenate([surface_along(anatomy, lung, lung_core(anatomy, lung), unit)
                           for lung in range(2)])


def lung_shortfall_mm(anatomy: Anatomy, geom: Geometry) -> float:
    """How much closer (mm) than allowed the lung surfaces come to the body's fat (``wall_mm``, less 1 mm for
    the distance approximations), the trachea (3 mm) and the faces of the field of view (``LUNG_MARGIN_MM``);
    0 or less: they fit."""
    points = lung_surface_samples(anatomy)
    inner = anatomy.body_axes - anatomy.fat_mm
    flat = points[:, :2] - anatomy.center[:2]
    body = -_ellipse_sdf(flat[:, 0], flat[:, 1], inner)
    trachea = _segment_distance(points, anatomy.trachea_top, anatomy.carina)
    room = anatomy.trachea_radius + float(airway_wall_mm(anatomy.trachea_radius)) + 3.0
    return max(float(np.max(anatomy.wall_mm - 1.0 - body)), float(np.max(room - trachea)),
               float(np.max(LUNG_MARGIN_MM - geom.face_distance_mm(points))))
