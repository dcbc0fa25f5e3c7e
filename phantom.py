"""Synthetic chest-CT phantoms in the LUNA16 folder layout, for tests and the demo.

Every object is laid out in world mm (ITK/LPS physical points ``(x, y, z)``; the patient's left-right,
front-back and head-foot axes are the world axes) and then voxelised through the scan's own geometry
``world = origin + direction @ (spacing * index)``, each edge with its partial volume. Scans get LUNA16-like
voxels (square pixels of 0.6-0.9 mm, slices of 0.625-2.5 mm; only shapes too small for a ``MIN_FOV_MM`` field
of view get coarser pixels), random origins and, for most of them, a non-identity direction (flipped axes,
small rotations), so a reader that ignores the direction matrix looks in the wrong place.

The anatomy is scaled to the field of view (the ``small`` size is a child-sized chest): a body of fat and soft
tissue, a spine, two lungs held at least a body wall inside the soft tissue and
``phantom_scene.LUNG_MARGIN_MM`` inside the field of view on every side (no lung opens through the body wall
or the top and bottom of the scan), fissures (thin sheets a little brighter than the lung: an oblique one in
each lung, a horizontal one in the right), pulmonary artery and vein trees that branch, taper (Murray's law),
curve and cross one another, airways (air tubes with a thin wall, from a trachea that leaves through the top
of the scan) and nodules of ``nodules.py`` (solid, part-solid, ground-glass; round, lobulated, spiculated)
placed alone, on a vessel or on the pleura. The noise is spatially correlated (white noise smoothed by a
Gaussian of ``phantom_render.NOISE_SIGMA_MM``, then rescaled to its level).

This module lays the scene out at random and writes the folder; the scene's classes and the lungs' shape
are in ``phantom_scene.py``, the drawing onto the voxel grid and the noise in ``phantom_render.py``, the
compiled kernels in ``phantom_kernels.py``.

Arrays are indexed ``[z, y, x]`` (array axes = ITK index ``k, j, i``); the geometry vectors ``origin`` and
``spacing`` are ordered ``(x, y, z)`` / ``(i, j, k)``.

Written folder (see :func:`write_luna_folder`)::

    <root>/subset{k}/<seriesuid>.mhd + .raw      int16 HU
    <root>/annotations.csv                       seriesuid,coordX,coordY,coordZ,diameter_mm
    <root>/annotations_excluded.csv              same columns, diameter -1 allowed
    <root>/candidates_V2.csv                     seriesuid,coordX,coordY,coordZ,class
    <root>/seriesuids.csv                        one uid per line, no header
    <root>/candidate_sources.csv                 the candidates plus what each one sits on and, for the ones
                                                 on a nodule, where that nodule was placed
    <root>/phantom_manifest.json                 the parameters, per-scan geometry and every finding

The data are synthetic; only the folder layout follows the LUNA16 challenge.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import nodules as nodule_shapes
import phantom_kernels as kernels
from data import CTScan, write_mhd
from common import UserError, atomic_write_text, item_table, usable_cpus
from phantom_render import HU_MAX as HU_MAX, HU_MIN as HU_MIN, add_noise_and_quantise, render_scene
from phantom_scene import (Anatomy, Finding, Fissure, Geometry, VesselTree, airway_wall_mm, lung_core,
                           lung_depth_mm, lung_normals, lung_sdf_points, lung_shortfall_mm, surface_along)

SIZES = {"small": (80, 224, 224), "realistic": (250, 512, 512)}
MAX_DRAW_THREADS = 8     # scans drawn side by side by synth (one in memory per thread)
DIRECTION_KINDS = ("identity", "flip", "rotate", "flip_rotate")
# Share of each negative-candidate type (vessel trees, their branch points and crossings are the hard
# negatives).
NEGATIVE_MIX = (("vessel", 0.30), ("bifurcation", 0.12), ("crossing", 0.08), ("pleura", 0.15),
                ("near-nodule", 0.15), ("parenchyma", 0.10), ("soft-tissue", 0.10))
# LUNA16's candidates are mostly easy: about 850 a scan, a few of them look-alikes (for the mining benchmark).
LUNA_LIKE_MIX = (("parenchyma", 0.80), ("soft-tissue", 0.08), ("vessel", 0.06), ("bifurcation", 0.03),
                 ("pleura", 0.02), ("near-nodule", 0.01))
PIXEL_MM = (0.6, 0.9)    # in-plane voxel size, as in LUNA16
SLICE_MM = (0.625, 2.5)  # slice spacing, as in LUNA16
MIN_FOV_MM = 130.0       # smaller shapes (quick tests) get coarser pixels rather than a smaller chest
NODULE_KINDS = (("solid", 0.55), ("ground-glass", 0.25), ("part-solid", 0.20))
NODULE_SHAPES = (("round", 0.40), ("lobulated", 0.35), ("spiculated", 0.25))
# Where a nodule is put: alone in the lung, touching or engulfing a vessel, or against the pleura
# (juxtapleural).
PLACEMENTS = (("isolated", 0.40), ("vessel", 0.30), ("pleura", 0.30))
NODULE_DIAMETER_MM = (4.0, 25.0)


# --- what make_phantom_scan returns --------------------------------------------

@dataclass
class Candidate:
    """A candidate location in world mm with LUNA16 class (1 = nodule), what it sits on and, on a nodule, that
    nodule's placement."""
    center_xyz: np.ndarray
    label: int
    source: str
    placement: str = ""


@dataclass
class PhantomCase:
    scan: CTScan
    nodules: list = field(default_factory=list)     # Finding, including excluded ones
    candidates: list = field(default_factory=list)  # Candidate
    geometry: Geometry | None = None
    anatomy: Anatomy | None = None
    vessels: list = field(default_factory=list)     # VesselTree: arteries and veins
    airways: list = field(default_factory=list)     # VesselTree: trachea and main bronchi first, then bronchi


# --- random layout -----------------------------------------------------------

def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * cross + (1 - math.cos(angle_rad)) * cross @ cross


def _unit(vector) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64)
    return vector / np.linalg.norm(vector)


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
    """LUNA16-like spacing: square pixels of PIXEL_MM (coarser only where the shape is too small for a
    MIN_FOV_MM field of view), slices of SLICE_MM long enough for a chest 0.75-0.9 times as tall as the field
    of view is wide, and at least 0.25 mm from the pixel size (so a reader that mixes up the axes' spacings is
    caught)."""
    nz, ny, nx = shape_zyx
    pixel = max(rng.uniform(*PIXEL_MM), MIN_FOV_MM / max(nx, ny))
    slice_mm = float(np.clip(pixel * max(nx, ny) * rng.uniform(0.75, 0.9) / nz, *SLICE_MM))
    if abs(slice_mm - pixel) < 0.25:
        slice_mm = pixel + 0.3 if pixel + 0.3 <= SLICE_MM[1] else pixel - 0.3
    spacing = np.round(np.array([pixel, pixel, slice_mm]), 6)
    direction = _random_direction(rng, kind)
    center = np.array([rng.uniform(-30, 30), rng.uniform(-40, 40), rng.uniform(-260, -40)])
    half_extent = (np.array([nx, ny, nz]) - 1) / 2.0
    origin = np.round(center - (direction * spacing[None, :]) @ half_extent, 4)
    return Geometry(tuple(int(s) for s in shape_zyx), origin, spacing, direction, kind)


def _random_anatomy(rng: np.random.Generator, geom: Geometry) -> Anatomy:
    """A chest scaled to the field of view; the lungs shrunk where needed to keep inside it
    (:func:`_fit_lungs`)."""
    nz, ny, nx = geom.shape_zyx
    fov_x, fov_y = nx * geom.spacing[0], ny * geom.spacing[1]
    extent_z = nz * geom.spacing[2]
    center = geom.index_to_world(((np.array([nx, ny, nz]) - 1) / 2.0)[None])[0]
    center = center + np.array([rng.uniform(-0.02, 0.02) * fov_x, rng.uniform(-0.02, 0.02) * fov_y, 0.0])
    ax, ay = 0.45 * fov_x * rng.uniform(0.93, 1.0), 0.32 * fov_y * rng.uniform(0.92, 1.05)
    fat, wall = ax * rng.uniform(0.04, 0.08), max(5.0, 0.06 * ax)
    cavity = np.array([ax, ay]) - fat - wall
    trachea_radius = ax * rng.uniform(0.05, 0.065)
    trachea_xy = center[:2] + np.array([rng.uniform(-0.02, 0.02) * ax, rng.uniform(0.1, 0.2) * ay])
    lung_centers, lung_axes = [], []
    for side in (-1.0, 1.0):
        lung_centers.append(center + np.array([side * 0.52 * cavity[0], 0.0,
                                               rng.uniform(-0.03, 0.03) * extent_z]))
        lung_axes.append([0.56 * cavity[0], 1.05 * cavity[1], 0.5 * extent_z * rng.uniform(0.82, 0.9)])
    trachea_room = trachea_radius + float(airway_wall_mm(trachea_radius)) + 3.0
    lung_centers, lung_axes = np.array(lung_centers), np.array(lung_axes, dtype=np.float64)
    top = float(np.mean(lung_centers[:, 2] + lung_axes[:, 2]))
    anatomy = Anatomy(
        center=center, body_axes=np.array([ax, ay]), fat_mm=fat, wall_mm=wall, cavity_axes=cavity,
        lung_centers=lung_centers, lung_axes=lung_axes,
        spine_center=center[:2] + np.array([0.0, 0.76 * ay]), spine_radius=ax * rng.uniform(0.09, 0.12),
        trachea_top=np.array([*trachea_xy, center[2] + extent_z]),
        carina=np.array([trachea_xy[0], trachea_xy[1] + 0.05 * ay,
                         top - 0.65 * float(np.mean(lung_axes[:, 2]))]),
        trachea_radius=trachea_radius,
        mediastinum_center=np.array([trachea_xy[0] + rng.uniform(0.0, 0.06) * cavity[0], center[1]]),
        mediastinum_axes=np.array([max(rng.uniform(0.2, 0.28) * cavity[0], 1.3 * trachea_room),
                                   1.2 * cavity[1]]),
        hu_fat=rng.uniform(-120, -80), hu_soft=rng.uniform(30, 60),
        hu_lung=rng.uniform(-880, -840), hu_lung_gradient=rng.uniform(10, 40))
    _random_heart_and_diaphragm(rng, anatomy)
    _fit_lungs(anatomy, geom)
    anatomy.fissures = _random_fissures(rng, anatomy)
    return anatomy


def _random_heart_and_diaphragm(rng, anatomy: Anatomy) -> None:
    """The heart (low, in front, to the patient's left: world +x) and a diaphragm dome under each lung, the
    right one higher (the liver)."""
    cavity, centre = anatomy.cavity_axes, anatomy.center
    height = float(np.mean(anatomy.lung_axes[:, 2]))
    base = float(np.mean(anatomy.lung_centers[:, 2] - anatomy.lung_axes[:, 2]))
    anatomy.heart_center = np.array([centre[0] + rng.uniform(0.08, 0.16) * cavity[0],
                                     centre[1] - rng.uniform(0.2, 0.3) * cavity[1],
                                     base + rng.uniform(0.6, 0.75) * height])
    anatomy.heart_axes = np.array([rng.uniform(0.38, 0.45) * cavity[0], rng.uniform(0.42, 0.5) * cavity[1],
                                   rng.uniform(0.32, 0.4) * height])
    domes, dome_axes = [], []
    for lung_centre in anatomy.lung_centers:
        side = np.sign(lung_centre[0] - centre[0])
        dome_axes.append([rng.uniform(0.32, 0.38) * cavity[0], rng.uniform(0.65, 0.75) * cavity[1],
                          rng.uniform(0.4, 0.5) * height])
        dome_top = base + (rng.uniform(0.3, 0.4) + (0.08 if side < 0 else 0.0)) * height
        domes.append([centre[0] + side * 0.48 * cavity[0], centre[1] + 0.05 * cavity[1],
                      dome_top - dome_axes[-1][2]])
    anatomy.dome_centers, anatomy.dome_axes = np.array(domes), np.array(dome_axes)


def _lung_surface_points(rng, anatomy: Anatomy, n: int):
    """n random points on the lung walls (the pleura: ribs, mediastinum, diaphragm) and their outward unit
    normals (world mm)."""
    side = rng.integers(0, 2, n)
    unit = rng.standard_normal((n, 3))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    points, normals = np.zeros((n, 3)), np.zeros((n, 3))
    for lung in range(2):
        rows = side == lung
        if rows.any():
            points[rows] = surface_along(anatomy, lung, lung_core(anatomy, lung), unit[rows])
            normals[rows] = lung_normals(anatomy, lung, points[rows])
    return points, normals


def _lung_points(rng, anatomy: Anatomy, n: int) -> np.ndarray:
    """n points spread through the lungs (drawn in their ellipsoids, those outside the lungs drawn again)."""
    found = np.zeros((0, 3))
    while len(found) < n:
        side = rng.integers(0, 2, 2 * n)
        unit = rng.standard_normal((2 * n, 3))
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        points = (anatomy.lung_centers[side]
                  + anatomy.lung_axes[side] * unit * rng.random((2 * n, 1)) ** (1 / 3))
        found = np.concatenate([found, points[lung_depth_mm(anatomy, points) > 0]])
    return found[:n]


def _distances_to_segments(point: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """(S,) mm from one point to each segment (rows p0(3), p1(3), ...)."""
    p0, d = segments[:, :3], segments[:, 3:6] - segments[:, :3]
    t = np.clip(np.sum((point - p0) * d, axis=1) / np.maximum(np.sum(d * d, axis=1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(point - (p0 + t[:, None] * d), axis=1)


def _fit_lungs(anatomy: Anatomy, geom: Geometry) -> None:
    """Shrink both lungs' ellipsoids about their centres until the lungs keep clear of the body wall, the
    trachea and the faces of the field of view (:func:`lung_shortfall_mm`)."""
    for _ in range(60):
        if lung_shortfall_mm(anatomy, geom) <= 0:
            return
        anatomy.lung_axes *= 0.97
        anatomy.parameters = None
    raise ValueError("the lungs do not fit this field of view")


def _random_fissures(rng, anatomy: Anatomy) -> list:
    """An oblique fissure in each lung (from high at the back to low at the front) and a horizontal one in
    front of it in the right lung (world -x is the patient's right)."""
    fissures = []
    for lung, (centre, axes) in enumerate(zip(anatomy.lung_centers, anatomy.lung_axes)):
        angle = math.radians(rng.uniform(45.0, 65.0))          # from the horizontal, in the y-z plane
        turn = _rotation([0.0, 0.0, 1.0], math.radians(rng.uniform(5.0, 20.0) * rng.choice([-1.0, 1.0])))
        along = turn @ _unit([0.0, math.cos(angle), math.sin(angle)])
        normal = _unit(np.cross(turn @ [1.0, 0.0, 0.0], along))
        normal = normal if normal[1] < 0 else -normal         # positive side: in front (-y) and up
        point = centre + axes * np.array([0.0, rng.uniform(-0.1, 0.1), rng.uniform(-0.05, 0.15)])
        oblique = Fissure(lung, point, normal, along, rng.uniform(-0.5, 0.5) / axes[2], 1.0,
                          rng.uniform(-790, -750))
        fissures.append(oblique)
        if centre[0] < anatomy.center[0]:
            level = centre + axes * np.array([0.0, 0.0, rng.uniform(0.1, 0.3)])
            flat = _unit([rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.15), 1.0])
            fissures.append(Fissure(lung, level, flat, _unit(np.cross(flat, [1.0, 0.0, 0.0])),
                                    rng.uniform(-0.3, 0.3) / axes[1], 1.0, rng.uniform(-790, -750), oblique))
    return fissures


# --- trees: vessels and airways ------------------------------------------------

def _curved_branch(rng, p0, heading, r0: float, anatomy: Anatomy, lung: int, length_per_radius: tuple,
                   pieces: int = 3):
    """One branch: ``pieces`` straight pieces whose heading turns a little at each joint, tapering from
    ``r0``, kept at least its radius + 1 mm inside the lung (a try that leaves it is repeated shorter).
    Returns ``(rows p0 p1 r0 r1, end point, end heading, end radius)`` or None when eight tries leave the
    lung."""
    length = float(np.clip(r0 * rng.uniform(*length_per_radius), 3.0, 40.0))
    r1 = r0 * rng.uniform(0.9, 0.97)
    radii = np.linspace(r0, r1, pieces + 1)
    for attempt in range(8):
        direction = _unit(heading + 0.25 * rng.standard_normal(3))
        points = [np.asarray(p0, float)]
        step = length * 0.7 ** (attempt // 2) / pieces
        for n in range(pieces):
            if n:
                direction = _unit(direction + 0.22 * rng.standard_normal(3))
            point = points[-1] + step * direction
            if -lung_sdf_points(anatomy, lung, point)[0] <= radii[n + 1] + 1.0:
                break
            points.append(point)
        else:
            rows = [[*points[n], *points[n + 1], radii[n], radii[n + 1]] for n in range(pieces)]
            return rows, points[-1], direction, r1
    return None


def _grow_tree(rng, anatomy: Anatomy, lung: int, start, heading, radius: float, *, max_depth: int = 9,
               min_radius: float = 0.25, length_per_radius: tuple = (8.0, 16.0), hu: float | None = None,
               airway: bool = False) -> VesselTree:
    """Branching tree of curved, tapering tubes grown from the hilum outwards inside one lung.

    At each branch point the flow splits unevenly and the children's radii follow Murray's law
    (``r^3 = r1^3 + r2^3``); the thinner child leaves at the wider angle. Branches thinner than ``min_radius``
    (mm) are not grown."""
    segments, bifurcations = [], []
    stack = [(np.asarray(start, float), _unit(heading), radius, 0)]
    while stack:
        p0, heading, r0, depth = stack.pop()
        branch = _curved_branch(rng, p0, heading, r0, anatomy, lung, length_per_radius)
        if branch is None:
            continue
        rows, end, direction, r1 = branch
        segments.extend(rows)
        share = rng.uniform(0.3, 0.7)
        radii = r1 * np.array([share, 1.0 - share]) ** (1 / 3)
        if depth >= max_depth or radii.max() < min_radius:
            continue
        bifurcations.append([*end, r1])
        side = _unit(np.cross(direction, rng.standard_normal(3)))
        for child_radius, sign in zip(radii, (1.0, -1.0)):
            if child_radius < min_radius:
                continue
            angle = math.radians(rng.uniform(15.0, 25.0) + 60.0 * (1.0 - child_radius / r1))
            child = math.cos(angle) * direction + sign * math.sin(angle) * side
            stack.append((end, child, child_radius, depth + 1))
    return VesselTree(np.array(segments, dtype=np.float64).reshape(-1, 8),
                      np.array(bifurcations, dtype=np.float64).reshape(-1, 4),
                      hu=float(rng.uniform(0.0, 150.0)) if hu is None else float(hu), airway=airway)


def _random_ribs(rng, anatomy: Anatomy) -> VesselTree:
    """Ribs: bone tubes in the chest wall (half-way through its soft tissue) from beside the spine round to
    the front, falling towards the front as ribs do, one pair every 8-11% of the lungs' height from their tops
    down."""
    cavity, centre = anatomy.cavity_axes, anatomy.center
    path = cavity + anatomy.wall_mm / 2.0
    radius = min(0.4 * anatomy.wall_mm, 0.035 * anatomy.body_axes[0])
    height = 2.0 * float(np.mean(anatomy.lung_axes[:, 2]))
    top = float(np.mean(anatomy.lung_centers[:, 2] + anatomy.lung_axes[:, 2]))
    angles = np.linspace(0.12 * np.pi, 0.85 * np.pi, 12)   # 0: straight back (+y), pi: straight to the front
    rows, z = [], top + 0.04 * height
    while z > top - 1.05 * height:
        drop = rng.uniform(0.12, 0.2) * height
        for side in (-1.0, 1.0):
            x = centre[0] + side * path[0] * np.sin(angles)
            y = centre[1] + path[1] * np.cos(angles)
            points = np.column_stack([x, y, z - drop * (angles - angles[0]) / (angles[-1] - angles[0])])
            rows += [[*points[n], *points[n + 1], radius, radius] for n in range(len(points) - 1)]
        z -= rng.uniform(0.08, 0.11) * height
    return VesselTree(np.array(rows, dtype=np.float64).reshape(-1, 8), np.zeros((0, 4)),
                      float(rng.uniform(350, 550)))


def _hilum(anatomy: Anatomy, lung: int, y_share: float, z_share: float, depth_mm: float) -> np.ndarray:
    """A point ``depth_mm`` inside the lung's medial wall (world mm), on the ray from its core towards the
    midline tilted by ``y_share`` (front-back) and ``z_share`` (up-down)."""
    core = lung_core(anatomy, lung)
    lateral = np.sign(anatomy.lung_centers[lung][0] - anatomy.center[0])
    direction = _unit([-lateral, y_share, z_share])
    return surface_along(anatomy, lung, core, direction[None])[0] - depth_mm * direction


# Headings (lateral, y, z) of the arterial and venous trees from each hilum; lateral is away from the midline.
_ARTERY_HEADINGS = ((0.5, -0.2, 1.0), (1.0, -0.5, 0.3), (1.0, 0.5, 0.2), (1.0, 0.4, -0.4), (0.5, 0.3, -1.0))
_VEIN_HEADINGS = ((0.6, -0.6, 0.8), (1.0, 0.1, 0.0), (0.8, 0.6, -0.5), (0.6, -0.3, -1.0))


def _random_vessels(rng, anatomy: Anatomy) -> list:
    """Pulmonary arteries and veins: per lung five arterial and four venous trees from two hilar points, so
    that the trees interleave and some of their vessels cross."""
    trees = []
    scale = float(anatomy.cavity_axes[0])
    for lung in range(2):
        lateral = np.sign(anatomy.lung_centers[lung][0] - anatomy.center[0])
        hila = (((rng.uniform(-0.1, 0.2), rng.uniform(0.0, 0.2)), _ARTERY_HEADINGS, (0.028, 0.036)),
                ((rng.uniform(-0.3, -0.1), rng.uniform(-0.4, -0.2)), _VEIN_HEADINGS, (0.03, 0.04)))
        for (hy, hz), headings, radius in hila:
            hilum = _hilum(anatomy, lung, hy, hz, 0.04 * scale)
            for gx, gy, gz in headings:
                heading = np.array([lateral * gx, gy + rng.uniform(-0.3, 0.3), gz + rng.uniform(-0.2, 0.2)])
                trees.append(_grow_tree(rng, anatomy, lung, hilum, heading, scale * rng.uniform(*radius)))
    return trees


def _random_airways(rng, anatomy: Anatomy) -> list:
    """The trachea (from above the scan to the carina), the two main bronchi to the hila and, in each lung,
    lobar bronchial trees: lumen radii in ``segments``, the wall drawn by :func:`airway_wall_mm`."""
    wall_hu = float(rng.uniform(-80.0, 20.0))
    radius = anatomy.trachea_radius
    rows = [[*anatomy.trachea_top, *anatomy.carina, radius, radius]]
    trees = []
    for lung in range(2):
        lateral = np.sign(anatomy.lung_centers[lung][0] - anatomy.center[0])
        hilum = _hilum(anatomy, lung, rng.uniform(-0.1, 0.1), rng.uniform(0.15, 0.3), 0.6 * radius)
        rows.append([*anatomy.carina, *hilum, 0.72 * radius, 0.62 * radius])
        for gx, gy, gz in ((0.4, 0.0, 1.0), (1.0, -0.3, -0.2), (0.5, 0.3, -1.0)):
            heading = np.array([lateral * gx, gy + rng.uniform(-0.3, 0.3), gz + rng.uniform(-0.2, 0.2)])
            trees.append(_grow_tree(rng, anatomy, lung, hilum, heading, 0.42 * radius, max_depth=4,
                                    min_radius=0.7, length_per_radius=(6.0, 11.0), hu=wall_hu, airway=True))
    central = VesselTree(np.array(rows, dtype=np.float64), np.zeros((0, 4)), wall_hu, airway=True)
    return [central] + trees


def _vessel_crossings(trees: list, min_radius: float = 0.5) -> np.ndarray:
    """``(M, 4)``: where vessels (radius >= ``min_radius`` mm) of different trees touch or cross at more than
    35 degrees, more than 8 mm from their roots (trees that leave one hilum touch there): x, y, z world mm and
    the thinner vessel's radius (mm); at least 4 mm apart."""
    rows, owner, from_root = [], [], []
    for index, tree in enumerate(trees):
        thick = tree.segments[np.minimum(tree.segments[:, 6], tree.segments[:, 7]) >= min_radius]
        if not len(thick):
            continue
        root = tree.segments[0, :3]
        rows.append(thick)
        owner.append(np.full(len(thick), index))
        from_root.append(np.stack([np.linalg.norm(thick[:, :3] - root, axis=1),
                                   np.linalg.norm(thick[:, 3:6] - root, axis=1)], axis=1))
    if not rows:
        return np.zeros((0, 4))
    found = kernels.crossings(np.ascontiguousarray(np.concatenate(rows)), np.concatenate(owner),
                              np.ascontiguousarray(np.concatenate(from_root)), 8.0,
                              math.cos(math.radians(35.0)))
    kept: list = []
    for row in found:
        if all(np.linalg.norm(row[:3] - other[:3]) >= 4.0 for other in kept):
            kept.append(row)
    return np.array(kept, dtype=np.float64).reshape(-1, 4)


# --- nodules --------------------------------------------------------------------

def _choice(rng, table: tuple) -> str:
    names, shares = zip(*table)
    return names[int(rng.choice(len(names), p=np.array(shares) / np.sum(shares)))]


def _body_reach_mm(nodule: nodule_shapes.Nodule) -> float:
    """How far the nodule's body (without spicules) reaches from its centre (mm)."""
    return nodule.reach_mm - float(np.max(nodule.spicules[:, 3], initial=0.0))


def _place_isolated(rng, anatomy: Anatomy, vessels: np.ndarray, reach: float):
    """A lung point at least ``reach`` + 3 mm deep whose nodule of that reach touches no vessel of 1 mm radius
    or more; or None."""
    centre = _lung_points(rng, anatomy, 1)[0]
    if lung_depth_mm(anatomy, centre)[0] <= reach + 3.0:
        return None
    thick = vessels[np.minimum(vessels[:, 6], vessels[:, 7]) >= 1.0]
    clear = _distances_to_segments(centre, thick) - np.maximum(thick[:, 6], thick[:, 7])
    return centre if np.all(clear > reach) else None


def _place_on_vessel(rng, anatomy: Anatomy, vessels: np.ndarray, body_radius: float, reach: float):
    """A point beside a vessel of at least 0.8 mm radius, near enough that the nodule touches or engulfs it;
    or None."""
    thick = vessels[np.minimum(vessels[:, 6], vessels[:, 7]) >= 0.8]
    if not len(thick):
        return None
    lengths = np.linalg.norm(thick[:, 3:6] - thick[:, :3], axis=1)
    segment = thick[rng.choice(len(thick), p=lengths / lengths.sum())]
    t = rng.uniform(0.1, 0.9)
    axis_point = segment[:3] + t * (segment[3:6] - segment[:3])
    along = _unit(segment[3:6] - segment[:3])
    across = _unit(np.cross(along, rng.standard_normal(3)))
    vessel_radius = segment[6] + t * (segment[7] - segment[6])
    centre = axis_point + across * rng.uniform(0.0, 1.0) * (vessel_radius + 0.85 * body_radius)
    return centre if lung_depth_mm(anatomy, centre)[0] > reach + 2.0 else None


def _place_on_pleura(rng, anatomy: Anatomy, body_radius: float):
    """A point 0.4-0.85 body radii inside a lung wall, so the nodule leans on the pleura; or None."""
    wall, normal = _lung_surface_points(rng, anatomy, 1)
    centre = wall[0] - normal[0] * body_radius * rng.uniform(0.4, 0.85)
    return centre if lung_depth_mm(anatomy, centre)[0] > 0.3 * body_radius else None


def _random_nodules(rng, anatomy: Anatomy, geom: Geometry, trees: list, count: int) -> list:
    """Solid, ground-glass and part-solid nodules (4-25 mm; round, lobulated or spiculated) in the lungs, each
    isolated, on a vessel or on the pleura. A nodule that finds no room where it was meant to go is tried at
    the next placement (isolated, then on a vessel, then on the pleura); its Finding records where it went."""
    vessels = np.concatenate([t.segments for t in trees]) if trees else np.zeros((0, 8))
    names = [name for name, _ in PLACEMENTS]
    found: list[Finding] = []
    for _ in range(count):
        diameter = float(math.exp(rng.uniform(*np.log(NODULE_DIAMETER_MM))))
        kind, shape, placement = (_choice(rng, NODULE_KINDS), _choice(rng, NODULE_SHAPES),
                                  _choice(rng, PLACEMENTS))
        for where in names[names.index(placement):]:
            nodule = _place_nodule(rng, where, anatomy, geom, vessels, found, diameter, kind, shape)
            if nodule is not None:
                found.append(_finding(nodule, where))
                break
    return found


def _place_nodule(rng, placement: str, anatomy: Anatomy, geom: Geometry, vessels: np.ndarray, found: list,
                  diameter: float, kind: str, shape: str):
    """A nodule of the type and shape at a ``placement`` spot clear of the ``found`` ones and of the scan's
    faces, or None after 60 tries (a nodule that finds no room in 20 tries is drawn 20% smaller, down to
    4 mm)."""
    for attempt in range(60):
        if attempt % 20 == 0:
            if attempt:
                diameter = max(NODULE_DIAMETER_MM[0], 0.8 * diameter)
            nodule = nodule_shapes.random_nodule(rng, np.zeros(3), diameter, kind, shape)
            body_radius, reach = nodule.body_radius_mm, _body_reach_mm(nodule)
        if placement == "isolated":
            centre = _place_isolated(rng, anatomy, vessels, reach)
        elif placement == "vessel":
            centre = _place_on_vessel(rng, anatomy, vessels, body_radius, reach)
        else:
            centre = _place_on_pleura(rng, anatomy, body_radius)
        if centre is None or not geom.contains(centre, nodule.reach_mm + 2.0)[0]:
            continue
        if all(np.linalg.norm(centre - other.center_xyz) > nodule.reach_mm + other.reach_mm + 4.0
               for other in found):
            nodule.centre_xyz = centre
            return nodule
    return None


def _finding(nodule: nodule_shapes.Nodule, placement: str, excluded: bool = False,
             csv_diameter=None) -> Finding:
    return Finding(nodule.centre_xyz, nodule.diameter_mm, "tiny" if excluded else nodule.kind,
                   nodule.body_radius_mm * nodule.stretch, nodule.rotation, nodule.hu, nodule.edge_mm,
                   juxtapleural=placement == "pleura", excluded=excluded, core_hu=nodule.core_hu,
                   csv_diameter=round(nodule.diameter_mm, 3) if csv_diameter is None else csv_diameter,
                   shape=nodule.shape, placement=placement, nodule=nodule)


def _random_excluded(rng, anatomy: Anatomy, geom: Geometry, nodules: list, count: int) -> list:
    """Tiny (< 3 mm) bright blobs: LUNA16's 'irrelevant findings', listed in annotations_excluded.csv."""
    found: list[Finding] = []
    points = _lung_points(rng, anatomy, 200)
    for centre in points:
        if len(found) >= count:
            break
        if lung_depth_mm(anatomy, centre)[0] < 4.0 or not geom.contains(centre, 4.0)[0]:
            continue
        if any(np.linalg.norm(centre - n.center_xyz) < n.reach_mm + 6.0 for n in nodules + found):
            continue
        diameter = float(rng.uniform(1.5, 2.9))
        nodule = nodule_shapes.random_nodule(rng, centre, diameter, "solid", "round")
        csv_diameter = -1.0 if rng.random() < 0.5 else round(diameter, 3)
        found.append(_finding(nodule, "isolated", excluded=True, csv_diameter=csv_diameter))
    return found


# --- candidates ----------------------------------------------------------------

def _far_from_nodules(points: np.ndarray, nodules: list, margin_mm: float) -> np.ndarray:
    keep = np.ones(len(points), dtype=bool)
    for nodule in nodules:
        keep &= np.linalg.norm(points - nodule.center_xyz, axis=1) > nodule.reach_mm + margin_mm
    return keep


def _vessel_points(rng, segments: np.ndarray, n: int) -> np.ndarray:
    """n points on vessels (world mm), likelier on long and thick ones, a little off their axes."""
    lengths = np.linalg.norm(segments[:, 3:6] - segments[:, :3], axis=1)
    weights = lengths * (segments[:, 6] + segments[:, 7]) ** 2
    seg = segments[rng.choice(len(segments), n, p=weights / weights.sum())]
    t = rng.uniform(0.15, 0.85, (n, 1))
    radius = seg[:, 6:7] + t * (seg[:, 7:8] - seg[:, 6:7])
    return seg[:, :3] + t * (seg[:, 3:6] - seg[:, :3]) + 0.2 * radius * rng.standard_normal((n, 3))


def _junction_points(rng, nodes: np.ndarray, n: int) -> np.ndarray:
    """n points at branch points or crossings (rows x, y, z, radius), likelier at thick ones."""
    weights = nodes[:, 3] ** 2
    return nodes[rng.choice(len(nodes), n, p=weights / weights.sum()), :3] + 0.3 * rng.standard_normal((n, 3))


def _soft_tissue_points(rng, anatomy: Anatomy, n: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi, n)
    radial = np.sqrt(rng.random(n)) * 0.9
    inner = anatomy.body_axes - anatomy.fat_mm
    xy = anatomy.center[:2] + np.stack([inner[0] * radial * np.cos(angle),
                                        inner[1] * radial * np.sin(angle)], 1)
    z = anatomy.center[2] + rng.uniform(-0.5, 0.5, n) * anatomy.lung_axes[:, 2].mean() * 2
    points = np.column_stack([xy, z])
    spine = np.linalg.norm(points[:, :2] - anatomy.spine_center, axis=1) > anatomy.spine_radius + 3.0
    return points[(lung_depth_mm(anatomy, points) < -5.0) & spine]


def _negative_pool(rng, source: str, anatomy: Anatomy, trees: list, crossings: np.ndarray, nodules: list,
                   n: int) -> tuple[np.ndarray, str]:
    """``(points, source)``: up to ``n`` proposals (world mm) of one negative type before filtering. A type
    with nothing to offer in this scan gives way: crossings to branch points, the others to parenchyma."""
    segments = np.concatenate([t.segments for t in trees]) if trees else np.zeros((0, 8))
    nodes = np.concatenate([t.bifurcations for t in trees]) if trees else np.zeros((0, 4))
    if source == "crossing":
        if len(crossings):
            return _junction_points(rng, crossings, n), source
        source = "bifurcation"
    if source == "vessel" and len(segments):
        return _vessel_points(rng, segments, n), source
    if source == "bifurcation" and len(nodes):
        return _junction_points(rng, nodes, n), source
    if source == "pleura":
        points, normals = _lung_surface_points(rng, anatomy, n)
        return points + normals * rng.uniform(-3.0, 2.0, (n, 1)), source
    if source == "near-nodule" and nodules:
        pick = rng.integers(0, len(nodules), n)
        unit = rng.standard_normal((n, 3))
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        reach = np.array([nodules[p].reach_mm for p in pick])[:, None]
        return (np.array([nodules[p].center_xyz for p in pick])
                + unit * (reach + rng.uniform(3.0, 10.0, (n, 1)))), source
    if source == "soft-tissue":
        return _soft_tissue_points(rng, anatomy, n), source
    return _lung_points(rng, anatomy, n), "parenchyma"


def _random_candidates(rng, anatomy, geom, trees, crossings, nodules, excluded, negatives: int,
                       negative_mix: tuple, volume: np.ndarray) -> list:
    """1-3 class-1 candidates per nodule near its centre; class-0 candidates elsewhere, of the types and
    shares of ``negative_mix``. ``volume`` is the noise-free scan ``[z, y, x]`` (HU): soft-tissue candidates
    must not sit in air (the trachea), parenchyma candidates not on a vessel, fissure or airway wall."""
    candidates = []
    for nodule in nodules:
        for _ in range(int(rng.integers(1, 4))):
            unit = rng.standard_normal(3)
            unit /= np.linalg.norm(unit)
            offset = unit * rng.uniform(0.0, 0.3) * nodule.axes_mm.min()
            candidates.append(Candidate(nodule.center_xyz + offset, 1, "nodule", nodule.placement))
    for finding in excluded:
        candidates.append(Candidate(finding.center_xyz + 0.2 * rng.standard_normal(3), 0, "excluded"))
    counts = [int(negatives * share) for _, share in negative_mix]
    counts[0] += negatives - sum(counts)
    for (wanted, _), count in zip(negative_mix, counts):
        if count == 0:
            continue
        pool, source = _negative_pool(rng, wanted, anatomy, trees, crossings, nodules, 8 * count + 16)
        keep = geom.contains(pool, 1.0) & _far_from_nodules(pool, nodules + excluded, 2.0)
        if source == "parenchyma":
            keep &= (lung_depth_mm(anatomy, pool) > 3.0) & (geom.value_at(volume, pool) < -795.0)
        elif source == "soft-tissue":
            keep &= geom.value_at(volume, pool) > -300.0
        for point in pool[keep][:count]:
            candidates.append(Candidate(point, 0, source))
    order = rng.permutation(len(candidates))
    return [candidates[i] for i in order]


# --- public API -----------------------------------------------------------------

def _series_uid(rng: np.random.Generator) -> str:
    """A DICOM-style UID under the 2.25 (UUID-derived) root, drawn from the seeded generator."""
    return "2.25." + str(int(rng.integers(1, 2**62)) * 2**62 + int(rng.integers(0, 2**62)))


def make_phantom_scan(rng: np.random.Generator, shape_zyx: tuple = SIZES["small"], *,
                      direction_kind: str | None = None, nodules_per_scan: tuple = (2, 5),
                      negatives_per_scan: int = 40, excluded_per_scan: tuple = (0, 2),
                      noise_std: tuple = (15.0, 40.0), negative_mix: tuple = NEGATIVE_MIX) -> PhantomCase:
    """One synthetic chest CT with its nodules and candidates.

    shape_zyx: array shape (nz, ny, nx). direction_kind: one of DIRECTION_KINDS, or None for a random one.
    nodules_per_scan / excluded_per_scan: inclusive (low, high) counts (a nodule that finds no room
    is left out).
    negatives_per_scan: mean number of class-0 candidates (each scan draws 0.6-1.4 times it), of the types and
    shares of ``negative_mix``. noise_std: (low, high) HU of the correlated noise's standard deviation.
    Returns a :class:`PhantomCase`: ``scan`` (data.CTScan, int16 HU ``[z, y, x]``, named by its seriesuid),
    ``nodules`` (Finding list, world mm, excluded findings flagged),
    ``candidates`` (Candidate list, world mm).
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
    vessels, airways = _random_vessels(rng, anatomy), _random_airways(rng, anatomy)
    nodules = _random_nodules(rng, anatomy, geom, vessels,
                              int(rng.integers(nodules_per_scan[0], nodules_per_scan[1] + 1)))
    excluded = _random_excluded(rng, anatomy, geom, nodules,
                                int(rng.integers(excluded_per_scan[0], excluded_per_scan[1] + 1)))
    volume = render_scene(geom, anatomy, _random_ribs(rng, anatomy), vessels, airways, nodules + excluded)
    negatives = int(round(negatives_per_scan * rng.uniform(0.6, 1.4)))
    candidates = _random_candidates(rng, anatomy, geom, vessels, _vessel_crossings(vessels), nodules,
                                    excluded, negatives, negative_mix, volume)
    hu = add_noise_and_quantise(rng, volume, float(rng.uniform(*noise_std)), geom)
    scan = CTScan(hu=hu, origin=geom.origin.copy(), spacing=geom.spacing.copy(),
                  direction=geom.direction.copy(), name=uid)
    return PhantomCase(scan=scan, nodules=nodules + excluded, candidates=candidates, geometry=geom,
                       anatomy=anatomy, vessels=vessels, airways=airways)


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
# present while a folder is being written; the manifest marks it done
UNFINISHED_MARK = ".phantom_unfinished"


def _prepare_root(root: Path, force: bool) -> None:
    """Refuse a non-empty folder unless ``force``; with ``force`` remove only an earlier phantom folder's
    files."""
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


def _drawn_in_threads(make, keys: list):
    """``(key, make(*key))`` for each key, in order, drawn on threads (the kernels release the GIL; each scan
    has its own generator, so the files do not depend on the threads) while the caller writes the one before;
    at most one scan a thread, plus the one being written, is held in memory."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, min(usable_cpus(), len(keys), MAX_DRAW_THREADS))
    with ThreadPoolExecutor(threads) as pool:
        waiting, pending = iter(keys), deque()
        for key in itertools.islice(waiting, threads):
            pending.append((key, pool.submit(make, *key)))
        while pending:
            key, drawn = pending.popleft()
            for more in itertools.islice(waiting, 1):
                pending.append((more, pool.submit(make, *more)))
            yield key, drawn.result()


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
    (root / UNFINISHED_MARK).write_text("synth is writing this folder; "
                                        "rerun synth with --force to finish it\n")
    start = time.perf_counter()
    annotations, excluded_rows, candidate_rows, source_rows, uids, scans_meta = [], [], [], [], [], []

    def kind_of(subset: int, index: int) -> str:
        return DIRECTION_KINDS[(subset * scans_per_subset + index) % len(DIRECTION_KINDS)]

    def make(subset: int, index: int) -> PhantomCase:
        rng = np.random.default_rng(np.random.SeedSequence([seed, subset, index]))
        return make_phantom_scan(rng, shape, direction_kind=kind_of(subset, index),
                                 nodules_per_scan=nodules_per_scan,
                                 negatives_per_scan=negatives_per_scan, excluded_per_scan=excluded_per_scan,
                                 negative_mix=negative_mix)
    for subset in range(n_subsets):
        (root / f"subset{subset}").mkdir(parents=True, exist_ok=True)
    scans = [(subset, index) for subset in range(n_subsets) for index in range(scans_per_subset)]
    for (subset, index), case in _drawn_in_threads(make, scans):
        kind = kind_of(subset, index)
        _write_scan_mhd(case.scan, root / f"subset{subset}")
        uid = case.scan.name
        uids.append(uid)
        for finding in case.nodules:
            row = [uid, *map(_fmt, finding.center_xyz), f"{finding.csv_diameter:g}"]
            (excluded_rows if finding.excluded else annotations).append(row)
        for cand in case.candidates:
            candidate_rows.append([uid, *map(_fmt, cand.center_xyz), str(cand.label)])
            source_rows.append([uid, *map(_fmt, cand.center_xyz), str(cand.label), cand.source,
                                cand.placement])
        scans_meta.append({"seriesuid": uid, "subset": subset, "shape_zyx": list(shape),
                           "spacing_xyz": case.scan.spacing.tolist(),
                           "origin_xyz": case.scan.origin.tolist(),
                           "direction": case.scan.direction.tolist(), "direction_kind": kind,
                           "nodules": sum(not f.excluded for f in case.nodules),
                           "candidates": len(case.candidates),
                           "findings": [f.manifest_entry() for f in case.nodules]})
    _write_tables(root, annotations, excluded_rows, candidate_rows, source_rows, uids)
    placements = {name: sum(f["placement"] == name and not f["excluded"] for scan in scans_meta
                            for f in scan["findings"]) for name, _ in PLACEMENTS}
    summary = {"root": str(root), "synthetic": True, "seed": seed, "subsets": n_subsets,
               "scans_per_subset": scans_per_subset, "scans": len(uids), "shape_zyx": list(shape),
               "nodules": len(annotations), "excluded_findings": len(excluded_rows),
               "candidates": len(candidate_rows), "positives": sum(r[-1] == "1" for r in candidate_rows),
               "negatives": sum(r[-1] == "0" for r in candidate_rows),
               "negatives_per_scan": negatives_per_scan, "nodules_per_scan": list(nodules_per_scan),
               "excluded_per_scan": list(excluded_per_scan), "placements": placements}
    manifest = dict(summary, root=None, scan_geometry=scans_meta)
    atomic_write_text(root / "phantom_manifest.json", json.dumps(manifest, indent=1) + "\n")
    (root / UNFINISHED_MARK).unlink()
    summary["seconds"] = time.perf_counter() - start
    return summary


def _write_tables(root: Path, annotations: list, excluded_rows: list, candidate_rows: list, source_rows: list,
                  uids: list) -> None:
    """The four LUNA16 CSVs, ``candidate_sources.csv`` (what each candidate sits on and, for class 1, its
    nodule's placement) and ``seriesuids.csv``."""
    header = "seriesuid,coordX,coordY,coordZ,"
    tables = {"annotations.csv": (header + "diameter_mm", annotations),
              "annotations_excluded.csv": (header + "diameter_mm", excluded_rows),
              "candidates_V2.csv": (header + "class", candidate_rows),
              "candidate_sources.csv": (header + "class,source,placement", source_rows)}
    for name, (head, rows) in tables.items():
        atomic_write_text(root / name, "\n".join([head] + [",".join(r) for r in rows]) + "\n")
    atomic_write_text(root / "seriesuids.csv", "".join(uid + "\n" for uid in uids))


def summary_table(summary: dict):
    """A rich table of what :func:`write_luna_folder` wrote, captioned as synthetic data."""
    table = item_table(f"Synthetic phantoms in {summary['root']}",
                       "[yellow]These are synthetic phantoms made by this toolkit, not patient data; only "
                       "the folder layout follows LUNA16.[/]")
    for label, key in (("subsets", "subsets"), ("scans", "scans"), ("nodules (annotations.csv)", "nodules"),
                       ("excluded findings", "excluded_findings"), ("candidates", "candidates"),
                       ("  class 1", "positives"), ("  class 0", "negatives")):
        table.add_row(label, str(summary[key]))
    table.add_row("scan shape (z, y, x)", " x ".join(map(str, summary["shape_zyx"])))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    return table
