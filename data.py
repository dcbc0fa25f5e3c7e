"""Data stage: reading CTs and LUNA16 files, world/voxel geometry, patch extraction.

Coordinate spaces used throughout:

* world mm: ITK/LPS physical points ``(x, y, z)`` in millimetres, as in the LUNA16 CSVs.
* voxel index: continuous ITK index ``(i, j, k)``; ``i`` runs along the array's last axis.
  SimpleITK arrays are indexed ``[k, j, i]`` = ``[z, y, x]``.

ITK maps an index to the world with ``world = origin + direction @ (spacing * index)``;
all direction maths of the project lives in :func:`world_to_index` and :func:`index_to_world`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

AIR_HU = -1000


class UserError(ValueError):
    """A problem with the user's input or files: shown as a one-line message, never a traceback."""


@dataclass
class CTScan:
    """A CT volume with its geometry.

    hu: int16 Hounsfield units, indexed ``[z, y, x]`` (array axes = ITK index k, j, i); a read-only
        view of the file when :func:`read_and_extract` mapped it.
    origin: world mm of voxel index (0, 0, 0), ordered (x, y, z).
    spacing: voxel size in mm along index axes (i, j, k).
    direction: 3x3 ITK direction matrix; column c is the world direction of index axis c.
    name: where the scan came from (a path or seriesuid), for messages.
    """
    hu: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    name: str = ""


def hu_to_unit(x, hu_min: float = -1000.0, hu_max: float = 1000.0):
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to ``[0, 1]`` (float32; numpy or torch)."""
    if hu_max <= hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    scale = 1.0 / (hu_max - hu_min)
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return ((x.float().clamp(hu_min, hu_max) - hu_min) * scale)
    except ImportError:  # pragma: no cover
        pass
    return ((np.clip(np.asarray(x, dtype=np.float32), hu_min, hu_max) - hu_min) * scale).astype(np.float32)


# --- geometry: world mm <-> voxel index -------------------------------------

def _world_to_index_matrix(scan: CTScan) -> np.ndarray:
    """3x3 matrix M with ``index = M @ (world - origin)``."""
    return np.diag(1.0 / np.asarray(scan.spacing, float)) @ np.linalg.inv(np.asarray(scan.direction, float))


def world_to_index(world_xyz: np.ndarray, scan: CTScan) -> np.ndarray:
    """World mm points ``(N, 3)`` as (x, y, z) -> continuous ITK index ``(N, 3)`` as (i, j, k).

    Uses origin, spacing and the full direction matrix. The array element is ``hu[k, j, i]``.
    """
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    return (world_xyz - np.asarray(scan.origin, float)) @ _world_to_index_matrix(scan).T


def index_to_world(index_ijk: np.ndarray, scan: CTScan) -> np.ndarray:
    """Continuous ITK index ``(N, 3)`` as (i, j, k) -> world mm ``(N, 3)`` as (x, y, z)."""
    index_ijk = np.atleast_2d(np.asarray(index_ijk, float))
    step = np.asarray(scan.direction, float) @ np.diag(np.asarray(scan.spacing, float))
    return index_ijk @ step.T + np.asarray(scan.origin, float)


def _axis_permutation(scan: CTScan, tol: float = 1e-5):
    """If each world axis maps onto one index axis (a signed permutation), return ``perm`` with
    ``perm[world_axis] = index_axis``; else None (an oblique direction matrix)."""
    direction = np.asarray(scan.direction, float)
    perm = np.abs(direction).argmax(axis=0)  # index axis c points along world axis perm_inv[c]
    if sorted(perm) != [0, 1, 2]:
        return None
    off_axis = np.abs(direction).copy()
    off_axis[perm, [0, 1, 2]] = 0.0
    if off_axis.max() > tol:
        return None
    world_to_index_axis = np.empty(3, int)
    world_to_index_axis[perm] = [0, 1, 2]
    return world_to_index_axis


# --- patch extraction ------------------------------------------------------

def patch_offsets_mm(patch_size: int, spacing_mm: float) -> np.ndarray:
    """World-mm offsets ``(P,)`` of the patch samples along each world axis; sample ``P//2`` is at 0."""
    return (np.arange(patch_size) - patch_size // 2) * float(spacing_mm)


def _validate_patch_args(patch_size: int, spacing_mm: float) -> None:
    if patch_size < 2:
        raise ValueError(f"patch_size must be at least 2, got {patch_size}")
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")


def patch_overlaps_scan(scan: CTScan, world_xyz: np.ndarray, patch_size: int, spacing_mm: float) -> np.ndarray:
    """Boolean ``(N,)``: does the cube of each world point (x, y, z) intersect the scan's voxels at all?"""
    half = patch_offsets_mm(patch_size, spacing_mm)[[0, -1]]
    corners = np.array(np.meshgrid(half, half, half, indexing="ij")).reshape(3, -1).T  # (8, 3) world offsets
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    corner_index = world_to_index(world_xyz[:, None, :] + corners[None], scan).reshape(len(world_xyz), 8, 3)
    size_ijk = np.array(scan.hu.shape[::-1])
    below = corner_index.max(axis=1) < -1 + 1e-6           # every sample more than a voxel before the first
    above = corner_index.min(axis=1) > size_ijk - 1e-6     # or after the last
    return ~(below | above).any(axis=1)


def _axis_taps(positions: np.ndarray, size: int):
    """Two-tap linear interpolation along one array axis of length ``size``, for ``(N, P)`` continuous
    index positions.

    Returns ``(lo, hi, w_lo, w_hi)``: tap indices clipped into the axis (int32) and their float32
    weights (0 for a tap outside the axis, so that it reads as air).
    """
    lo = np.floor(positions)
    frac = (positions - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    hi = lo + 1
    w_lo = ((1.0 - frac) * ((lo >= 0) & (lo < size))).astype(np.float32)
    w_hi = (frac * ((hi >= 0) & (hi < size))).astype(np.float32)
    lo, hi = np.clip(lo, 0, size - 1), np.clip(hi, 0, size - 1)
    return lo.astype(np.int32), hi.astype(np.int32), w_lo, w_hi


def _row_taps(positions: np.ndarray, size: int):
    """Taps along the array's last axis, read from a row buffer that holds the block with one air
    value before it and two after it.

    Returns ``(lo, frac, start, length)``: the lower tap's position in that buffer (int32), its
    fraction towards the next tap (float32), and each row's block ``[start, start + length)``.
    """
    positions = np.clip(positions, -1.0, float(size))  # beyond the edge a tap reads only air
    lo = np.floor(positions)
    frac = (positions - lo).astype(np.float32)
    lo = lo.astype(np.int64)
    start = np.clip(lo.min(axis=1), 0, size - 1)
    stop = np.clip(lo.max(axis=1) + 2, 1, size)
    return (lo - start[:, None] + 1).astype(np.int32), frac, start, stop - start


def _spatial_order(index_kji: np.ndarray, cell_voxels: int = 16) -> np.ndarray:
    """Cube order along a Z-order curve of ``cell_voxels``-sized cells, so that cubes cut one after
    the other share most of their voxels in the CPU caches."""
    cells = np.clip(np.floor(index_kji / cell_voxels), 0, 1023).astype(np.int64)
    code = np.zeros(len(cells), np.int64)
    for bit in range(10):
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return np.argsort(code, kind="stable")


_extraction_threads = None


def set_extraction_threads(threads: int | None) -> None:
    """Most threads that :func:`extract_patches` uses (None: one per CPU this process may run on); it
    takes one per ``CUBES_PER_THREAD`` cubes up to that."""
    global _extraction_threads
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    _extraction_threads = threads


CUBES_PER_THREAD = 64  # fewer cubes than this per thread are not worth another thread


@contextmanager
def _kernel_threads(n_cubes: int, cubes_per_thread: int = CUBES_PER_THREAD):
    """Yield ``run(kernel, items, *args)``, which calls ``kernel(*item_parts, *args)`` on parallel
    threads (the kernels release the GIL), each thread taking every T-th entry of the arrays in
    ``items`` so that neighbouring cubes are cut at the same time. The threads live as long as the
    ``with`` block, never across a fork."""
    import os
    from concurrent.futures import ThreadPoolExecutor
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(_extraction_threads or cpus, n_cubes // cubes_per_thread))
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def run(kernel, items: tuple, *args) -> None:
        parts = min(threads, len(items[0]))
        if parts <= 1:
            kernel(*items, *args)
            return
        for done in [pool.submit(kernel, *(x[t::parts] for x in items), *args) for t in range(parts)]:
            done.result()
    try:
        yield run
    finally:
        if pool is not None:
            pool.shutdown()


def extract_patches(scan: CTScan, world_xyz: np.ndarray, patch_size: int = 64,
                    spacing_mm: float = 1.0) -> np.ndarray:
    """Isotropic cubes around world points, resampled trilinearly from the scan.

    world_xyz: ``(N, 3)`` world mm (x, y, z), ITK/LPS physical points as in the LUNA16 CSVs.
    Returns int16 HU ``(N, P, P, P)`` indexed ``[z, y, x]`` along increasing world z, y, x with
    ``spacing_mm`` between samples; each point sits exactly at voxel ``[P//2, P//2, P//2]``.
    Samples outside the scan are air (-1000 HU). Only each point's neighbourhood is read; when
    each world axis runs along one array axis (any flips and permutations), trilinear sampling is
    done as three passes of linear interpolation along the array axes.
    """
    _validate_patch_args(patch_size, spacing_mm)
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    if world_xyz.shape[1:] != (3,):
        raise ValueError(f"world_xyz must have shape (N, 3), got {world_xyz.shape}")
    out = np.empty((len(world_xyz), patch_size, patch_size, patch_size), np.int16)
    if not len(world_xyz):
        return out
    volume = np.ascontiguousarray(scan.hu, dtype=np.int16)
    base_ijk = world_to_index(world_xyz, scan)
    order = _spatial_order(base_ijk[:, ::-1])
    offsets = patch_offsets_mm(patch_size, spacing_mm)
    index_per_world = _world_to_index_matrix(scan)  # column a: index step per mm along world axis a
    perm = _axis_permutation(scan)
    if perm is None:
        steps = (index_per_world * spacing_mm).T[::-1].copy()  # row a: index (i, j, k) step per sample along z, y, x
        first = base_ijk - (patch_size // 2) * steps.sum(axis=0)  # index of sample [0, 0, 0]
        with _kernel_threads(len(order), cubes_per_thread=1) as run:
            run(_sample_oblique, (order,), volume, first, steps, out)
        return out
    # World axis a runs along index axis perm[a], i.e. array axis 2 - perm[a].
    positions = [None, None, None]
    for world_axis in range(3):
        c = perm[world_axis]
        positions[2 - c] = base_ijk[:, c:c + 1] + index_per_world[c, world_axis] * offsets[None, :]
    # The kernel writes samples in array-axis order; this view puts them on world [z, y, x].
    out_axis_of_array_axis = [2 - int(np.flatnonzero(perm == 2 - axis)[0]) for axis in range(3)]
    target = out.transpose(0, *(1 + np.array(out_axis_of_array_axis)))
    if positions[0][0, -1] < positions[0][0, 0]:  # the kernel walks each cube with slices rising
        positions[0], target = positions[0][:, ::-1], target[:, ::-1]
    taps = (*_axis_taps(positions[0], volume.shape[0]), *_axis_taps(positions[1], volume.shape[1]),
            *_row_taps(positions[2], volume.shape[2]))
    if target.flags.c_contiguous:  # identity and in-plane flips: the kernel writes straight into out
        _sample_separable_in_slabs(volume, taps, order, target)
    else:
        samples = np.empty(target.shape, np.int16)
        _sample_separable_in_slabs(volume, taps, order, samples)
        target[...] = samples
    return out


CUBES_PER_BATCH = 256        # cubes that stream through the volume together (their state: ~70 kB each)
SLAB_BYTES = 8 << 20         # slices per step of that stream: about this many bytes of the volume


def _sample_separable_in_slabs(volume: np.ndarray, taps: tuple, order: np.ndarray, target: np.ndarray) -> None:
    """Drive :func:`_sample_separable` through the volume a slab of slices at a time, every cube of a
    batch taking the slices it needs from the current slab while those are still in the CPU caches:
    the volume is streamed once per batch of cubes instead of once per cube."""
    step = max(1, SLAB_BYTES // max(1, volume[0].nbytes))
    with _kernel_threads(len(order)) as run:
        for first in range(0, len(order), CUBES_PER_BATCH):
            _sample_batch(run, volume, taps, order[first:first + CUBES_PER_BATCH], target, step)


def _sample_batch(run, volume: np.ndarray, taps: tuple, cubes: np.ndarray, target: np.ndarray, step: int) -> None:
    """One batch of cubes through the volume, ``step`` slices further each round."""
    k_lo, k_hi, i_len = taps[0], taps[1], taps[-1]
    n_slices, n_planes = volume.shape[0], k_lo.shape[1]
    slabs = np.empty((len(cubes), 2, taps[4].shape[1], int(i_len[cubes].max()) + 3), np.float32)
    slab_k = np.full((len(cubes), 2), -1, np.int64)
    next_a = np.zeros(len(cubes), np.int64)
    slots = np.arange(len(cubes))
    for k_end in range(int(k_lo[cubes, 0].min()) + step, n_slices + step, step):
        waiting = next_a < n_planes
        waiting[waiting] = k_hi[cubes[waiting], next_a[waiting]] < k_end
        if waiting.any():
            run(_sample_separable, (cubes[waiting], slots[waiting]), k_end, volume, *taps, slabs, slab_k, next_a, target)


# --- compiled sampling kernels ------------------------------------------------
# Each kernel takes ``cubes`` (the cube numbers it should fill) first, releases the GIL and writes
# into ``out``; values are interpolated as ``HU + 1000`` so that a tap outside the scan (weight 0,
# or a zero in a row buffer) reads as air.

_JIT = dict(nogil=True, cache=True, fastmath=True, error_model="numpy", boundscheck=False)


@numba.njit(**_JIT)
def _interpolate_rows(voxels, row_stride, slice_stride, k, j_lo, j_hi, j_wlo, j_whi, start, length,
                      slab_values, slab_first, slab_width):
    """One slice ``k`` interpolated between rows ``j_lo[b]`` and ``j_hi[b]`` at columns
    ``start + x``, as ``HU + 1000`` (float32), into ``slab_values[slab_first + b * slab_width + x]``.
    ``voxels`` is the volume flattened; offsets are unsigned, which spares the loops numba's
    negative-index checks."""
    air = np.float32(-AIR_HU)
    first = np.uint64(k) * np.uint64(slice_stride) + np.uint64(start)
    for b in range(j_lo.shape[0]):
        row_lo = first + np.uint64(j_lo[b]) * np.uint64(row_stride)
        row_hi = first + np.uint64(j_hi[b]) * np.uint64(row_stride)
        w_lo, w_hi = j_wlo[b], j_whi[b]
        shift = air * (w_lo + w_hi)
        dest = np.uint64(slab_first) + np.uint64(b) * np.uint64(slab_width)
        for x in range(np.uint64(length)):
            slab_values[dest + x] = (w_lo * np.float32(voxels[row_lo + x]) + w_hi * np.float32(voxels[row_hi + x])
                                     + shift)


@numba.njit(**_JIT)
def _sample_separable(cubes, slots, k_end, volume, k_lo, k_hi, k_wlo, k_whi, j_lo, j_hi, j_wlo, j_whi,
                      i_lo, i_frac, i_start, i_len, slabs, slab_k, next_a, out):
    """Trilinear cubes on tensor-product grids of an int16 ``volume[k, j, i]``, carried on up to
    slice ``k_end``: rows first (linear along j, contiguous in i), then across slices (k), then along
    each row (i). Cube ``cubes[m]`` keeps its state in slot ``slots[m]``: the two slices last
    interpolated along j (``slabs``, their slice numbers in ``slab_k``) and its next output plane
    (``next_a``); its taps come from :func:`_axis_taps` (k, j; k rising with the plane number) and
    :func:`_row_taps` (i). ``out`` (C-contiguous) is indexed ``[n, k, j, i]`` in array-axis order.
    The arrays are indexed flat with unsigned offsets, which keeps numba's negative-index checks and
    per-row view objects out of the inner loops (about 10% faster here)."""
    n_k, n_j, n_i = k_lo.shape[1], j_lo.shape[1], i_lo.shape[1]
    voxels, slab_values, out_values = volume.reshape(-1), slabs.reshape(-1), out.reshape(-1)
    row_stride, slice_stride = volume.shape[2], volume.shape[1] * volume.shape[2]
    width = slabs.shape[3]
    slab_size = n_j * width
    row = np.zeros(width, np.float32)  # [air, block..., air, air]
    air = np.float32(-AIR_HU)
    one = np.uint64(1)
    for m in range(cubes.shape[0]):
        n, slot = cubes[m], slots[m]
        start, length = i_start[n], i_len[n]
        row[length + 1] = 0.0
        row[length + 2] = 0.0
        a = next_a[slot]
        while a < n_k and k_hi[n, a] < k_end:
            for k in (k_lo[n, a], k_hi[n, a]):
                if slab_k[slot, k & 1] != k:
                    _interpolate_rows(voxels, row_stride, slice_stride, k, j_lo[n], j_hi[n], j_wlo[n], j_whi[n],
                                      start, length, slab_values, (2 * slot + (k & 1)) * slab_size, width)
                    slab_k[slot, k & 1] = k
            above = np.uint64((2 * slot + (k_lo[n, a] & 1)) * slab_size)
            below = np.uint64((2 * slot + (k_hi[n, a] & 1)) * slab_size)
            w_lo, w_hi = k_wlo[n, a], k_whi[n, a]
            plane = np.uint64(((n * n_k) + a) * n_j * n_i)
            for b in range(np.uint64(n_j)):
                row_above, row_below = above + b * np.uint64(width), below + b * np.uint64(width)
                for x in range(np.uint64(length)):
                    row[x + one] = w_lo * slab_values[row_above + x] + w_hi * slab_values[row_below + x]
                dest = plane + b * np.uint64(n_i)
                for c in range(np.uint64(n_i)):
                    tap = np.uint64(i_lo[n, c])
                    left = row[tap]
                    out_values[dest + c] = np.int16(np.rint(left + i_frac[n, c] * (row[tap + one] - left) - air))
            a += 1
        next_a[slot] = a


@numba.njit(**_JIT)
def _sample_oblique(cubes, volume, first_ijk, steps_ijk, out):
    """Trilinear cubes on grids that are oblique to the voxel axes: sample ``[a, b, c]`` of cube ``n``
    sits at index ``first_ijk[n] + a * steps_ijk[0] + b * steps_ijk[1] + c * steps_ijk[2]`` (i, j, k)."""
    n_k, n_j, n_i = volume.shape
    size = out.shape[1]
    air = np.float32(-AIR_HU)
    for n in cubes:
        for a in range(size):
            for b in range(size):
                row_start = first_ijk[n] + a * steps_ijk[0] + b * steps_ijk[1]
                for c in range(size):
                    pi = row_start[0] + c * steps_ijk[2, 0]
                    pj = row_start[1] + c * steps_ijk[2, 1]
                    pk = row_start[2] + c * steps_ijk[2, 2]
                    i0, j0, k0 = int(np.floor(pi)), int(np.floor(pj)), int(np.floor(pk))
                    fi, fj, fk = pi - i0, pj - j0, pk - k0
                    total = 0.0
                    if 0 <= i0 and i0 + 1 < n_i and 0 <= j0 and j0 + 1 < n_j and 0 <= k0 and k0 + 1 < n_k:
                        for dk in range(2):  # all eight neighbours inside: no bounds checks
                            wk = fk if dk else 1.0 - fk
                            for dj in range(2):
                                wj = wk * (fj if dj else 1.0 - fj)
                                total += wj * ((1.0 - fi) * (volume[k0 + dk, j0 + dj, i0] + 1000.0)
                                               + fi * (volume[k0 + dk, j0 + dj, i0 + 1] + 1000.0))
                    else:
                        for dk in range(2):
                            k = k0 + dk
                            if k < 0 or k >= n_k:
                                continue
                            wk = fk if dk else 1.0 - fk
                            for dj in range(2):
                                j = j0 + dj
                                if j < 0 or j >= n_j:
                                    continue
                                wj = wk * (fj if dj else 1.0 - fj)
                                for di in range(2):
                                    i = i0 + di
                                    if 0 <= i < n_i:
                                        total += wj * (fi if di else 1.0 - fi) * (volume[k, j, i] + 1000.0)
                    out[n, a, b, c] = np.int16(np.rint(np.float32(total) - air))


# --- reading and writing CTs -------------------------------------------------

def _as_int16_hu(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.int16 and array.dtype.isnative:
        return array
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    return np.clip(array, -32768, 32767).astype(np.int16)


def _to_scan(geometry, voxels: np.ndarray, name: str) -> CTScan:
    """A :class:`CTScan` from the origin, spacing and direction of ``geometry`` (a SimpleITK image or
    header reader) and its voxels ``[z, y, x]``."""
    return CTScan(hu=_as_int16_hu(voxels), origin=np.array(geometry.GetOrigin(), float),
                  spacing=np.array(geometry.GetSpacing(), float),
                  direction=np.array(geometry.GetDirection(), float).reshape(3, 3), name=name)


def _image_to_scan(image, name: str) -> CTScan:
    import SimpleITK as sitk
    if image.GetDimension() != 3:
        raise UserError(f"{name}: expected a 3-D image, got {image.GetDimension()}-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{name}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    return _to_scan(image, sitk.GetArrayFromImage(image), name)


_META_DTYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
                "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8", "MET_ULONG": "u8", "MET_LONG": "i8"}


def _metaimage_header(path: Path) -> dict:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read the header ({err.strerror})") from None
    header = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            header[key.strip()] = value.strip()
    return header


def check_metaimage(path: Path) -> dict:
    """Raise :class:`UserError` with a plain reason when a ``.mhd`` header or its data file is broken
    (checked before SimpleITK, whose own messages are long and printed twice); return the header."""
    header = _metaimage_header(path)
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        ndims = int(header.get("NDims", len(dims)))
    except (KeyError, ValueError):
        raise UserError(f"{path}: broken MetaImage header (no valid NDims/DimSize)") from None
    if ndims != 3 or len(dims) != 3:
        raise UserError(f"{path}: expected a 3-D image, the header says NDims = {header.get('NDims')}")
    data_name = header.get("ElementDataFile", "")
    if not data_name:
        raise UserError(f"{path}: broken MetaImage header (no ElementDataFile)")
    if data_name.upper() == "LOCAL":
        return header
    data_file = path.parent / data_name
    if not data_file.is_file():
        raise UserError(f"{path}: its data file {data_file.name} is missing")
    dtype = _META_DTYPES.get(header.get("ElementType", ""))
    compressed = header.get("CompressedData", "False").lower() == "true"
    if dtype and not compressed:
        expected = np.dtype(dtype).itemsize * int(np.prod(dims))
        actual = data_file.stat().st_size
        if actual < expected:
            raise UserError(f"{path}: data file {data_file.name} is truncated ({actual} bytes, the header needs {expected})")
    return header


def _plain_voxel_source(path: Path, header: dict, info) -> tuple[Path, np.dtype] | None:
    """``(data file, dtype)`` of a plain 3-D MetaImage (one uncompressed data file holding exactly
    the voxels, one value each, ``[z, y, x]`` with x fastest); None for any other layout, which
    SimpleITK then reads."""
    def flag(key):
        return header.get(key, "False").strip().lower() == "true"
    data_name = header.get("ElementDataFile", "")
    dtype = _META_DTYPES.get(header.get("ElementType", ""))
    if (info.GetDimension() != 3 or info.GetNumberOfComponents() != 1 or not dtype or flag("CompressedData")
            or data_name.upper() in ("LOCAL", "LIST") or " " in data_name or "%" in data_name
            or header.get("HeaderSize", "0").strip() not in ("0", "")
            or header.get("ElementNumberOfChannels", "1").strip() != "1"
            or header.get("BinaryData", "True").strip().lower() != "true"):
        return None
    big_endian = flag("ElementByteOrderMSB") or flag("BinaryDataByteOrderMSB")
    dtype = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    data_file = path.parent / data_name
    if data_file.stat().st_size != int(np.prod(info.GetSize())) * dtype.itemsize:
        return None
    return data_file, dtype


@contextmanager
def _simpleitk_errors(path: Path):
    """SimpleITK's RuntimeError as a :class:`UserError` naming ``path`` (its last 300 characters)."""
    try:
        yield
    except RuntimeError as err:
        reason = " ".join(str(err).split())
        raise UserError(f"{path}: cannot read this scan ({reason[-300:]})") from None


def _metaimage_layout(path: Path):
    """``(info, source)`` of a ``.mhd``: SimpleITK's header reader (geometry, size) and the
    :func:`_plain_voxel_source` of its voxels (None when SimpleITK must read them)."""
    import SimpleITK as sitk
    header = check_metaimage(path)
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    with _simpleitk_errors(path):
        info.ReadImageInformation()
    return info, _plain_voxel_source(path, header, info)


def read_ct(path) -> CTScan:
    """Read a CT in HU from a ``.mhd``/``.mha``, a NIfTI file or a DICOM series folder.

    DICOM rescale slope/intercept are applied by the reader. A folder with several series reads
    the one with the most slices. A plain ``.mhd`` + ``.raw`` pair (as in LUNA16) is read with one
    copy: geometry from SimpleITK's header reader, voxels straight from the data file. Raises
    :class:`UserError` naming the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path)
    if path.suffix.lower() == ".mhd":
        return _read_metaimage(path, *_metaimage_layout(path))
    return _read_with_simpleitk(path)


def _read_dicom_series(path: Path) -> CTScan:
    import SimpleITK as sitk
    with _simpleitk_errors(path):
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path)) or ()
        files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len, default=())
        if not files:
            raise UserError(f"{path}: no DICOM series in this folder")
        reader.SetFileNames(files)
        return _image_to_scan(reader.Execute(), str(path))


def _read_with_simpleitk(path: Path) -> CTScan:
    import SimpleITK as sitk
    with _simpleitk_errors(path):
        return _image_to_scan(sitk.ReadImage(str(path)), str(path))


def _read_metaimage(path: Path, info, source) -> CTScan:
    """A ``.mhd`` whose header :func:`_metaimage_layout` has read: plain voxels in one copy, else SimpleITK."""
    if source is None:
        return _read_with_simpleitk(path)
    voxels = np.fromfile(source[0], source[1], int(np.prod(info.GetSize())))
    return _to_scan(info, voxels.reshape(tuple(info.GetSize())[::-1]), str(path))


def read_and_extract(path, world_xyz: np.ndarray, patch_size: int = 64,
                     spacing_mm: float = 1.0) -> tuple[CTScan, np.ndarray]:
    """``read_ct(path)`` and ``extract_patches`` of that scan, reading only what the cubes need.

    A plain ``.mhd`` + ``.raw`` pair (LUNA16's format) is memory-mapped instead of copied: the cubes
    read the voxels straight from the operating system's file cache, and the kernel is asked to read
    the whole file ahead in the background. The returned ``scan.hu`` is then a read-only view of the
    file. Anything else is read whole first. Returns ``(scan, patches)`` with the same values as the
    two calls.
    """
    import mmap
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".mhd":
        info, source = _metaimage_layout(path)
        if source is not None and source[1] == np.dtype(np.int16):
            voxels = np.memmap(source[0], dtype=np.int16, mode="r", shape=tuple(info.GetSize())[::-1])
            if hasattr(mmap, "MADV_WILLNEED"):
                voxels._mmap.madvise(mmap.MADV_WILLNEED)
            scan = _to_scan(info, voxels, str(path))
        else:
            scan = _read_metaimage(path, info, source)
    else:
        scan = read_ct(path)
    return scan, extract_patches(scan, world_xyz, patch_size, spacing_mm)


def scan_to_image(scan: CTScan):
    """``scan`` as a SimpleITK image: int16 HU with its origin, spacing and direction."""
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.asarray(scan.hu, np.int16))
    image.SetOrigin(tuple(float(v) for v in scan.origin))
    image.SetSpacing(tuple(float(v) for v in scan.spacing))
    image.SetDirection(tuple(float(v) for v in np.asarray(scan.direction).ravel()))
    return image


def write_mhd(scan: CTScan, path) -> None:
    """Write ``scan`` as MetaImage (``.mhd`` + ``.raw``), int16 HU with its origin, spacing and direction."""
    import SimpleITK as sitk
    sitk.WriteImage(scan_to_image(scan), str(path))


# --- LUNA16 files ------------------------------------------------------------

@dataclass
class PointTable:
    """Rows of a LUNA16-style point CSV (annotations, candidates, submissions).

    seriesuid: ``(N,)`` str; world_xyz: ``(N, 3)`` float64 world mm (x, y, z);
    value: ``(N,)`` float64 (class, diameter_mm or probability); line: ``(N,)`` 1-based file lines.
    """
    seriesuid: np.ndarray
    world_xyz: np.ndarray
    value: np.ndarray
    line: np.ndarray

    def __len__(self) -> int:
        return len(self.seriesuid)

    def take(self, rows) -> "PointTable":
        return PointTable(self.seriesuid[rows], self.world_xyz[rows], self.value[rows], self.line[rows])


def read_point_csv(path, value_column: str) -> tuple[PointTable, list[str]]:
    """Read ``seriesuid,coordX,coordY,coordZ,<value_column>`` (extra columns ignored).

    Rows with an empty or non-numeric field are skipped and described in the returned problem
    list with their line numbers. A missing file or missing columns raise :class:`UserError`.
    """
    import csv
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    wanted = ["seriesuid", "coordX", "coordY", "coordZ", value_column]
    uids, numbers, lines, problems = [], [], [], []
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in wanted if name not in header]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty'})")
        columns = [header.index(name) for name in wanted]
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                fields = [row[c].strip() for c in columns]
                values = [float(v) for v in fields[1:]]
                if not fields[0] or not np.all(np.isfinite(values)):
                    raise ValueError
            except (IndexError, ValueError):
                problems.append(f"{path.name} line {line_number}: unparseable row {','.join(row)[:120]!r}, skipped")
                continue
            uids.append(fields[0])
            numbers.append(values)
            lines.append(line_number)
    numbers = np.array(numbers, float).reshape(-1, 4)
    table = PointTable(np.array(uids, dtype=object), numbers[:, :3], numbers[:, 3], np.array(lines, int))
    return table, problems


def read_seriesuids(path) -> list[str]:
    """One seriesuid per line (no header, as LUNA16's ``seriesuids.csv``; a ``seriesuid`` header is skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    uids = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    return [uid for uid in uids if uid and uid != "seriesuid"]


def scan_subset_map(data_dir) -> dict[str, int]:
    """``{seriesuid: subset number}`` for every ``subset<k>/<seriesuid>.mhd`` under the LUNA16 root."""
    found = {}
    for mhd in sorted(Path(data_dir).glob("subset*/*.mhd")):
        suffix = mhd.parent.name[len("subset"):]
        if suffix.isdigit():
            found[mhd.stem] = int(suffix)
    return found


def find_scan(data_dir, seriesuid: str):
    """Path of ``subset*/<seriesuid>.mhd`` under the LUNA16 root, or None."""
    hits = sorted(Path(data_dir).glob(f"subset*/{seriesuid}.mhd"))
    return hits[0] if hits else None


def candidates_file(data_dir) -> Path:
    """``candidates_V2.csv`` of the LUNA16 root, else ``candidates.csv``."""
    for name in ("candidates_V2.csv", "candidates.csv"):
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise UserError(f"{data_dir}: neither candidates_V2.csv nor candidates.csv found "
                    "(set --data-dir or LUNA16_DIR to the LUNA16 folder, or run 'python luna_cli.py synth')")


def match_diameters(candidates: PointTable, annotations: PointTable) -> np.ndarray:
    """Diameter (mm) of the nearest annotation whose sphere holds each candidate, else NaN."""
    diameters = np.full(len(candidates), np.nan)
    by_scan: dict = {}
    for row, uid in enumerate(annotations.seriesuid):
        by_scan.setdefault(uid, []).append(row)
    for row, uid in enumerate(candidates.seriesuid):
        rows = by_scan.get(uid)
        if not rows:
            continue
        squared = ((annotations.world_xyz[rows] - candidates.world_xyz[row]) ** 2).sum(axis=1)
        radius_sq = (annotations.value[rows] / 2.0) ** 2
        inside = np.flatnonzero(squared < radius_sq)
        if len(inside):
            diameters[row] = annotations.value[rows][inside[np.argmin(squared[inside])]]
    return diameters


def parse_subsets(text: str, option: str = "--subsets") -> list[int]:
    """Subset numbers from ``"9"``, ``"7,8"`` or ``"0-4"`` (sorted, unique); ``""`` or ``"none"`` -> []."""
    text = str(text).strip().lower().replace(" ", "")
    if text in ("", "none"):
        return []
    subsets = set()
    try:
        for part in filter(None, text.split(",")):
            low, _, high = part.partition("-")
            subsets.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"{option} takes subset numbers like 9, 7,8 or 0-4; got {text!r}") from None
    return sorted(subsets)


# --- atomic files --------------------------------------------------------------

@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    Readers never see a half-written file; a failed block leaves the old file and no temporary one.
    """
    import os
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path, payload) -> None:
    import json
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def atomic_concatenate_npy(path, blocks: list, row_shape: tuple, dtype) -> int:
    """Write the row-wise concatenation of ``blocks`` (arrays or memory maps) as one ``.npy``,
    block by block through a memory map, atomically; returns the number of rows."""
    total = sum(len(block) for block in blocks)
    with atomic_path(path) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, *row_shape))
        start = 0
        for block in blocks:
            merged[start:start + len(block)] = block
            start += len(block)
        merged.flush()
        del merged
    return total


def atomic_save_figure(fig, path, dpi: int = 110) -> None:
    """Save a matplotlib figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


# --- the extract stage -------------------------------------------------------------

INDEX_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "label", "diameter_mm"]
CACHE_PARAMETERS = ("patch_size", "spacing_mm", "seed", "negatives_per_positive", "all_candidates")


@dataclass
class ExtractSummary:
    subset: int
    cache_dir: Path
    n_patches: int
    n_positive: int
    scans_done: int
    scans_new: int
    failed: dict
    problems: list


def subset_dir(work_dir, subset: int) -> Path:
    """``W/patches/subset<k>``: ``patches.npy``, ``index.csv`` and ``manifest.json`` of one subset."""
    return Path(work_dir) / "patches" / f"subset{subset}"


def select_candidates(candidates: PointTable, uids: set, subset: int, seed: int,
                      negatives_per_positive: float, all_candidates: bool) -> np.ndarray:
    """Rows of ``candidates`` to extract for the scans ``uids``: every positive plus a seeded
    sample of ``negatives_per_positive`` negatives per positive (all rows with ``all_candidates``)."""
    in_subset = np.array([uid in uids for uid in candidates.seriesuid], bool)
    rows = np.flatnonzero(in_subset)
    if all_candidates:
        return rows
    positives = rows[candidates.value[rows] > 0.5]
    negatives = rows[candidates.value[rows] <= 0.5]
    keep = min(len(negatives), int(round(negatives_per_positive * len(positives))))
    rng = np.random.default_rng([seed, subset])
    return np.sort(np.concatenate([positives, rng.choice(negatives, keep, replace=False)]))


def _check_parameters(found: dict, wanted: dict, where: Path) -> None:
    differing = {k: (found.get(k), wanted[k]) for k in CACHE_PARAMETERS if found.get(k) != wanted[k]}
    if differing:
        shown = "; ".join(f"{k}: cache has {a}, this run asks for {b}" for k, (a, b) in differing.items())
        raise UserError(f"{where} was made with other parameters ({shown}). "
                        "Use another --work-dir, or delete that folder to rebuild it.")


def _read_cache_index(cache: Path) -> list[list[str]]:
    import csv
    with open(cache / "index.csv", newline="") as handle:
        return list(csv.reader(handle))[1:]


def _assemble_cache(cache: Path, scans: list[str], parts: Path, manifest: dict) -> tuple[int, int]:
    """Merge the finished cache and the per-scan parts into ``patches.npy`` + ``index.csv``,
    one scan after the other in ``scans`` order; returns ``(n_patches, n_positive)``."""
    import csv
    import io
    old_rows, old_patches, old_start = [], None, {}
    if (cache / "index.csv").is_file() and (cache / "patches.npy").is_file():
        old_rows = _read_cache_index(cache)
        old_patches = np.load(cache / "patches.npy", mmap_mode="r")
        for position, row in enumerate(old_rows):
            old_start.setdefault(row[0], []).append(position)
    sources, rows = [], []
    for uid in scans:
        part = parts / f"{uid}.npy"
        if part.is_file():
            sources.append(np.load(part, mmap_mode="r"))
            rows.extend(_read_part_rows(parts / f"{uid}.json"))
        elif uid in old_start:
            positions = old_start[uid]
            sources.append(old_patches[positions[0]:positions[-1] + 1])
            rows.extend(old_rows[p] for p in positions)
    size = manifest["patch_size"]
    total = atomic_concatenate_npy(cache / "patches.npy", sources, (size, size, size), np.int16)
    del old_patches, sources
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(INDEX_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(cache / "index.csv", text.getvalue())
    n_positive = sum(1 for row in rows if row[4] == "1")
    return total, n_positive


def _read_part_rows(path: Path) -> list[list[str]]:
    import json
    return json.loads(path.read_text())


def _format_index_rows(uid: str, world_xyz: np.ndarray, labels: np.ndarray, diameters: np.ndarray):
    return [[uid, repr(float(x)), repr(float(y)), repr(float(z)), str(int(label)),
             "" if np.isnan(d) else repr(float(d))]
            for (x, y, z), label, d in zip(world_xyz, labels, diameters)]


def _read_and_cut_or_error(path: Path, world_xyz: np.ndarray, patch_size: int, spacing_mm: float):
    """``((scan, patches), None)`` or ``(None, reason)``: one unreadable scan must not stop the others."""
    try:
        return read_and_extract(path, world_xyz, patch_size, spacing_mm), None
    except UserError as err:
        return None, str(err)
    except (OSError, MemoryError, ValueError) as err:
        return None, f"{path}: cannot read this scan ({err})"


def extract_subset(data_dir, work_dir, subset: int, patch_size: int = 64, spacing_mm: float = 1.0,
                   negatives_per_positive: float = 10.0, all_candidates: bool = False, seed: int = 0,
                   show_progress: bool = True, console=None) -> ExtractSummary:
    """Build (or complete) the patch cache of one LUNA16 subset.

    Writes ``W/patches/subset<k>/patches.npy`` (int16 HU, ``(N, P, P, P)``, ``[z, y, x]`` world axes,
    ``spacing_mm`` apart, candidate at ``P//2``), ``index.csv`` (same row order) and ``manifest.json``.
    Each scan is read once; finished scans are kept as parts, so an interrupted run resumes and a
    rerun adds nothing twice. Unreadable scans are reported in ``summary.failed``.
    """
    import shutil
    from concurrent.futures import ThreadPoolExecutor
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn)

    _validate_patch_args(patch_size, spacing_mm)
    if negatives_per_positive < 0:
        raise ValueError(f"negatives_per_positive must be >= 0, got {negatives_per_positive}")
    console = console or Console(stderr=True)
    data_dir, cache = Path(data_dir), subset_dir(work_dir, subset)
    wanted = dict(patch_size=patch_size, spacing_mm=float(spacing_mm), seed=seed,
                  negatives_per_positive=float(negatives_per_positive), all_candidates=all_candidates)
    manifest_path, parts = cache / "manifest.json", cache / "parts"
    manifest = {}
    if manifest_path.is_file():
        import json
        manifest = json.loads(manifest_path.read_text())
        _check_parameters(manifest, wanted, cache)
    if (parts / "parameters.json").is_file():
        import json
        _check_parameters(json.loads((parts / "parameters.json").read_text()), wanted, parts)

    subset_scans = {uid: None for uid, k in scan_subset_map(data_dir).items() if k == subset}
    if not subset_scans:
        raise UserError(f"no scans in {data_dir / f'subset{subset}'} (expected <seriesuid>.mhd files; "
                        "set --data-dir or LUNA16_DIR, or run 'python luna_cli.py synth')")
    candidates, problems = read_point_csv(candidates_file(data_dir), "class")
    known = set(scan_subset_map(data_dir))
    unknown = sorted(set(candidates.seriesuid) - known)
    if unknown:
        problems.append(f"{len(unknown)} seriesuid(s) of the candidates file have no scan under {data_dir} "
                        "(not downloaded, or in another folder)")
    annotations_path = data_dir / "annotations.csv"
    if annotations_path.is_file():
        annotations, annotation_problems = read_point_csv(annotations_path, "diameter_mm")
        problems += annotation_problems
    else:
        annotations = PointTable(np.array([], object), np.zeros((0, 3)), np.zeros(0), np.zeros(0, int))
        problems.append(f"{annotations_path}: not found, diameter_mm left empty")
    selected = candidates.take(select_candidates(candidates, set(subset_scans), subset, seed,
                                                 negatives_per_positive, all_candidates))
    diameters = match_diameters(selected, annotations)
    rows_by_scan: dict = {}
    for row, uid in enumerate(selected.seriesuid):
        rows_by_scan.setdefault(uid, []).append(row)

    scans = sorted(subset_scans)
    done = set(manifest.get("scans", [])) | {p.stem for p in parts.glob("*.npy")}
    todo = [uid for uid in scans if uid not in done]
    failed: dict = {}
    if todo:
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write_json(parts / "parameters.json", wanted)
    columns = [TextColumn("[bold]subset {task.fields[subset]}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("scans"), TextColumn("{task.fields[rate]:.0f} patches/s"), TimeElapsedColumn()]
    import time
    started, n_new = time.perf_counter(), 0
    with Progress(*columns, console=console, disable=not show_progress) as progress, \
            ThreadPoolExecutor(max_workers=1) as reader:
        task = progress.add_task("extract", total=len(todo), subset=subset, rate=0.0)
        paths = [find_scan(data_dir, uid) for uid in todo]
        rows_todo = [np.array(rows_by_scan.get(uid, []), int) for uid in todo]
        points_todo = [selected.world_xyz[rows].reshape(-1, 3) for rows in rows_todo]

        def read_and_cut(position: int):
            return _read_and_cut_or_error(paths[position], points_todo[position], patch_size, spacing_mm)
        pending = reader.submit(read_and_cut, 0) if todo else None
        for position, uid in enumerate(todo):
            result, reason = pending.result()
            if position + 1 < len(todo):  # read and cut the next scan while this one is written
                pending = reader.submit(read_and_cut, position + 1)
            if result is None:
                failed[uid] = reason
                console.print(f"[red]scan {uid}: {reason}[/]")
                progress.advance(task)
                continue
            scan, patches = result
            rows, points = rows_todo[position], points_todo[position]
            inside = patch_overlaps_scan(scan, points, patch_size, spacing_mm) if len(rows) else np.zeros(0, bool)
            for row in rows[~inside]:
                problems.append(f"candidate on line {selected.line[row]} ({uid}) lies wholly outside its scan, skipped")
            if not inside.all():
                rows, points, patches = rows[inside], points[inside], patches[inside]
            index_rows = _format_index_rows(uid, points, selected.value[rows], diameters[rows])
            atomic_write_json(parts / f"{uid}.json", index_rows)
            atomic_save_npy(parts / f"{uid}.npy", patches)  # the .npy marks the scan as done
            n_new += len(rows)
            progress.update(task, advance=1, rate=n_new / max(time.perf_counter() - started, 1e-9))

    finished = [uid for uid in scans if uid in done or (parts / f"{uid}.npy").is_file()]
    if todo or not (cache / "patches.npy").is_file():
        manifest = dict(wanted, subset=subset, dtype="int16", axis_order="z,y,x (world axes, increasing)",
                        units="HU", outside_value=AIR_HU, candidates_file=candidates_file(data_dir).name,
                        scans=finished)
        n_patches, n_positive = _assemble_cache(cache, finished, parts, manifest)
        manifest.update(n_patches=n_patches, n_positive=n_positive, failed=failed)
        atomic_write_json(manifest_path, manifest)
        shutil.rmtree(parts, ignore_errors=True)
    for message in problems:
        console.print(f"[yellow]{message}[/]")
    return ExtractSummary(subset, cache, manifest["n_patches"], manifest["n_positive"], len(finished),
                          len(todo) - len(failed), failed, problems)
