"""Compiled kernels of the phantoms (``phantom.py``): the lungs' signed distance, tapered tubes (vessels,
airways) voxelised with their partial volume, and the search for crossing vessels.

World points are mm ``(x, y, z)`` (ITK/LPS); a grid maps index ``(i, j, k)`` to world by
``origin + matrix @ (i, j, k)`` (``matrix`` = direction * spacing); arrays are indexed ``[k, j, i]`` =
``[z, y, x]``. Arithmetic is plain IEEE (no fastmath), so a seeded phantom comes out byte-identical.
"""
from __future__ import annotations

import math

import numba
import numpy as np

_JIT = dict(nogil=True, cache=True, error_model="numpy", boundscheck=False)

# Layout of one lung's parameter row (see lung_parameters in phantom_scene.py).
LUNG_CENTRE, LUNG_AXES, CAVITY_CENTRE, CAVITY_AXES, SIDE, BAND_X, BAND_HALF = 0, 3, 6, 8, 10, 11, 12
HEART_CENTRE, HEART_AXES, DOME_CENTRE, DOME_AXES, SPINE_CENTRE, SPINE_CLEAR = 13, 16, 19, 22, 25, 27
MEDIASTINUM_CENTRE, MEDIASTINUM_AXES = 28, 30
LUNG_PARAMETERS = 32


@numba.njit(**_JIT)
def ellipsoid_distance(x, y, z, a, b, c):
    """Approximate signed distance (mm, negative inside) to an ellipsoid with semi-axes a, b, c at the
    origin."""
    k0 = math.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    k1 = math.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2 + (z / (c * c)) ** 2)
    return k0 * (k0 - 1.0) / max(k1, 1e-6)


@numba.njit(**_JIT)
def ellipse_distance(x, y, a, b):
    """Approximate signed distance (mm, negative inside) to an ellipse with semi-axes a, b at the origin."""
    k0 = math.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = math.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2)
    return k0 * (k0 - 1.0) / max(k1, 1e-6)


@numba.njit(**_JIT)
def lung_distance(p, x, y, z):
    """Approximate signed distance (mm, negative inside) of world point (x, y, z) to the lung of parameter row
    ``p``: its ellipsoid, less what lies outside the rib cage, across the midline band, in the mediastinum or
    the heart, under the diaphragm dome, or near the spine."""
    d = ellipsoid_distance(x - p[0], y - p[1], z - p[2], p[3], p[4], p[5])
    d = max(d, ellipse_distance(x - p[6], y - p[7], p[8], p[9]))
    d = max(d, p[BAND_HALF] - p[SIDE] * (x - p[BAND_X]))
    d = max(d, -ellipsoid_distance(x - p[13], y - p[14], z - p[15], p[16], p[17], p[18]))
    d = max(d, -ellipsoid_distance(x - p[19], y - p[20], z - p[21], p[22], p[23], p[24]))
    d = max(d, p[SPINE_CLEAR] - math.sqrt((x - p[25]) ** 2 + (y - p[26]) ** 2))
    d = max(d, -ellipse_distance(x - p[28], y - p[29], p[30], p[31]))
    return d


@numba.njit(**_JIT)
def lung_distances(p, points):
    """(N,) :func:`lung_distance` at world points (N, 3)."""
    out = np.empty(points.shape[0])
    for n in range(points.shape[0]):
        out[n] = lung_distance(p, points[n, 0], points[n, 1], points[n, 2])
    return out


@numba.njit(**_JIT)
def lung_fraction(p, origin, matrix, lo, shape, edge):
    """float32 ``[z, y, x]`` of ``shape`` from index ``lo`` (i, j, k): the share of each voxel inside the lung
    (a linear ramp ``edge`` mm wide across its surface)."""
    out = np.empty((shape[0], shape[1], shape[2]), np.float32)
    for k in range(shape[0]):
        for j in range(shape[1]):
            for i in range(shape[2]):
                a, b, c = lo[0] + i, lo[1] + j, lo[2] + k
                x = origin[0] + matrix[0, 0] * a + matrix[0, 1] * b + matrix[0, 2] * c
                y = origin[1] + matrix[1, 0] * a + matrix[1, 1] * b + matrix[1, 2] * c
                z = origin[2] + matrix[2, 0] * a + matrix[2, 1] * b + matrix[2, 2] * c
                out[k, j, i] = min(1.0, max(0.0, 0.5 - lung_distance(p, x, y, z) / edge))
    return out


@numba.njit(**_JIT)
def _index_box(centre, reach, inverse, origin, lo, shape):
    """Index box (array-relative, clipped to ``shape`` [z, y, x]) of the world cube centre +- reach:
    (i0, j0, k0, i1, j1, k1), hi exclusive."""
    low = np.full(3, 1e30)
    high = np.full(3, -1e30)
    for corner in range(8):
        w = np.empty(3)
        for c in range(3):
            w[c] = centre[c] + (reach if (corner >> c) & 1 else -reach) - origin[c]
        for a in range(3):
            index = inverse[a, 0] * w[0] + inverse[a, 1] * w[1] + inverse[a, 2] * w[2] - lo[a]
            low[a] = min(low[a], index)
            high[a] = max(high[a], index)
    size = (shape[2], shape[1], shape[0])
    box = np.empty(6, np.int64)
    for a in range(3):
        box[a] = max(0, int(math.floor(low[a])))
        box[3 + a] = min(size[a], int(math.ceil(high[a])) + 1)
    return box


@numba.njit(**_JIT)
def tube_union(fraction, lo, origin, matrix, inverse, segments, extra, edge):
    """In place: ``fraction`` (float32 ``[z, y, x]`` over the index box from ``lo``) becomes the maximum of
    itself and each tapered tube's filled share. ``segments`` rows: p0 (3), p1 (3), r0, r1 (world mm);
    ``extra`` (S,) mm added to both radii. A tube thinner than the edge ramp is drawn fainter (its partial
    volume)."""
    shape = fraction.shape
    for s in range(segments.shape[0]):
        p0, p1 = segments[s, 0:3], segments[s, 3:6]
        r0, r1 = segments[s, 6] + extra[s], segments[s, 7] + extra[s]
        d = p1 - p0
        dd = max(d[0] * d[0] + d[1] * d[1] + d[2] * d[2], 1e-12)
        centre = (p0 + p1) / 2.0
        reach = math.sqrt(dd) / 2.0 + max(r0, r1) + edge
        box = _index_box(centre, reach, inverse, origin, lo, shape)
        for k in range(box[2], box[5]):
            for j in range(box[1], box[4]):
                for i in range(box[0], box[3]):
                    a, b, c = lo[0] + i, lo[1] + j, lo[2] + k
                    x = origin[0] + matrix[0, 0] * a + matrix[0, 1] * b + matrix[0, 2] * c - p0[0]
                    y = origin[1] + matrix[1, 0] * a + matrix[1, 1] * b + matrix[1, 2] * c - p0[1]
                    z = origin[2] + matrix[2, 0] * a + matrix[2, 1] * b + matrix[2, 2] * c - p0[2]
                    t = min(1.0, max(0.0, (x * d[0] + y * d[1] + z * d[2]) / dd))
                    distance = math.sqrt((x - t * d[0]) ** 2 + (y - t * d[1]) ** 2 + (z - t * d[2]) ** 2)
                    radius = r0 + (r1 - r0) * t
                    alpha = (min(1.0, max(0.0, 0.5 - (distance - radius) / edge))
                             * min(1.0, 2.0 * radius / edge))
                    if alpha > fraction[k, j, i]:
                        fraction[k, j, i] = alpha


@numba.njit(**_JIT)
def _closest_parameters(p0, d0, q0, e0):
    """Parameters (s, t) in [0, 1] of the closest points of segments p0 + s d0 and q0 + t e0."""
    a, e = d0 @ d0, e0 @ e0
    r = p0 - q0
    b, c, f = d0 @ e0, d0 @ r, e0 @ r
    denominator = a * e - b * b
    s = min(1.0, max(0.0, (b * f - c * e) / denominator)) if denominator > 1e-12 else 0.0
    t = (b * s + f) / e if e > 1e-12 else 0.0
    if t < 0.0:
        t, s = 0.0, min(1.0, max(0.0, -c / a)) if a > 1e-12 else 0.0
    elif t > 1.0:
        t, s = 1.0, min(1.0, max(0.0, (b - c) / a)) if a > 1e-12 else 0.0
    return s, t


@numba.njit(**_JIT)
def crossings(segments, owner, from_root, min_root_mm, max_cosine):
    """``(M, 4)``: where tubes of different trees (``owner``) touch at an angle (|cos| < ``max_cosine``), both
    points farther than ``min_root_mm`` from their trees' roots (``from_root`` (S, 2): the distance of each
    segment's ends): the midpoint of the two closest points (world mm) and the thinner tube's radius there.
    Pairs are swept in order of their midpoints' x, so only neighbours are compared."""
    count = segments.shape[0]
    middle = (segments[:, 0:3] + segments[:, 3:6]) / 2.0
    half = np.sqrt(((segments[:, 3:6] - segments[:, 0:3]) ** 2).sum(axis=1)) / 2.0
    thick = np.maximum(segments[:, 6], segments[:, 7])
    widest = half.max() + thick.max()
    order = np.argsort(middle[:, 0])
    found = []
    for position in range(count):
        m = order[position]
        for later in range(position + 1, count):
            n = order[later]
            if middle[n, 0] - middle[m, 0] > half[m] + thick[m] + widest:
                break
            if owner[n] == owner[m] or half[m] < 1e-9 or half[n] < 1e-9:
                continue
            room = half[m] + half[n] + thick[m] + thick[n]
            if ((middle[m] - middle[n]) ** 2).sum() > room * room:
                continue
            hit = _crossing(segments, m, n, from_root, min_root_mm, max_cosine)
            if hit[3] > 0.0:
                found.append((hit[0], hit[1], hit[2], hit[3]))
    out = np.empty((len(found), 4))
    for n in range(len(found)):
        out[n, 0], out[n, 1], out[n, 2], out[n, 3] = found[n]
    return out


@numba.njit(**_JIT)
def _crossing(segments, m, n, from_root, min_root_mm, max_cosine):
    """(x, y, z, radius) where tubes m and n cross (see :func:`crossings`), or radius 0 when they do not."""
    p0, d0 = segments[m, 0:3], segments[m, 3:6] - segments[m, 0:3]
    q0, e0 = segments[n, 0:3], segments[n, 3:6] - segments[n, 0:3]
    miss = np.zeros(4)
    if abs(d0 @ e0) / math.sqrt((d0 @ d0) * (e0 @ e0)) >= max_cosine:
        return miss
    s, t = _closest_parameters(p0, d0, q0, e0)
    a, b = p0 + s * d0, q0 + t * e0
    ra = segments[m, 6] + s * (segments[m, 7] - segments[m, 6])
    rb = segments[n, 6] + t * (segments[n, 7] - segments[n, 6])
    if math.sqrt(((a - b) ** 2).sum()) >= ra + rb:
        return miss
    root_a = from_root[m, 0] + s * (from_root[m, 1] - from_root[m, 0])
    root_b = from_root[n, 0] + t * (from_root[n, 1] - from_root[n, 0])
    if min(root_a, root_b) <= min_root_mm:
        return miss
    mid = (a + b) / 2.0
    return np.array([mid[0], mid[1], mid[2], min(ra, rb)])
