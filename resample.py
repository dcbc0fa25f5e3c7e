"""Compiled trilinear resampling of int16 volumes in index space: the hot path of patch extraction.

``data.extract_patches`` turns world points into continuous voxel positions (all direction maths lives
in ``data``); this module samples cubes at those positions. Volumes are int16 HU indexed ``[k, j, i]``;
values are interpolated as ``HU + 1000``, so that a tap outside the volume reads as air (-1000 HU).
Each batch of cubes streams through the volume a slab of slices at a time on parallel threads (the
kernels release the GIL), cubes in Z-order so that neighbours share their voxels in the CPU caches.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np

import common

AIR_HU = -1000


def sample_separable(volume: np.ndarray, positions: list, order: np.ndarray, target: np.ndarray) -> None:
    """Cubes on tensor-product grids: ``positions[a]`` ``(N, P)`` are the continuous positions of the
    samples along array axis ``a`` (axis 0 rising); ``target`` ``(N, P, P, P)`` is filled in array-axis
    order."""
    taps = (*_axis_taps(positions[0], volume.shape[0]), *_axis_taps(positions[1], volume.shape[1]),
            *_row_taps(positions[2], volume.shape[2]))
    if target.flags.c_contiguous:
        _sample_separable_in_slabs(volume, taps, order, target)
    else:
        samples = np.empty(target.shape, np.int16)
        _sample_separable_in_slabs(volume, taps, order, samples)
        target[...] = samples


def sample_oblique(volume: np.ndarray, first_ijk: np.ndarray, steps_ijk: np.ndarray, order: np.ndarray,
                   out: np.ndarray) -> None:
    """Cubes on grids oblique to the voxel axes: sample ``[a, b, c]`` of cube ``n`` sits at index
    ``first_ijk[n] + a * steps_ijk[0] + b * steps_ijk[1] + c * steps_ijk[2]`` (i, j, k)."""
    with _kernel_threads(len(order), cubes_per_thread=1) as run:
        run(_sample_oblique, (order,), volume, first_ijk, steps_ijk, out)


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


def spatial_order(index_kji: np.ndarray, cell_voxels: int = 16) -> np.ndarray:
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
    from concurrent.futures import ThreadPoolExecutor
    threads = max(1, min(_extraction_threads or common.usable_cpus(), n_cubes // cubes_per_thread))
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


CUBES_PER_BATCH = 256        # cubes that stream through the volume together (their state: ~70 kB each)
SLAB_BYTES = 8 << 20         # slices per step of that stream: about this many bytes of the volume


def _sample_separable_in_slabs(volume: np.ndarray, taps: tuple, order: np.ndarray,
                               target: np.ndarray) -> None:
    """Drive :func:`_sample_separable` through the volume a slab of slices at a time, every cube of a
    batch taking the slices it needs from the current slab while those are still in the CPU caches:
    the volume is streamed once per batch of cubes instead of once per cube."""
    step = max(1, SLAB_BYTES // max(1, volume[0].nbytes))
    with _kernel_threads(len(order)) as run:
        for first in range(0, len(order), CUBES_PER_BATCH):
            _sample_batch(run, volume, taps, order[first:first + CUBES_PER_BATCH], target, step)


def _sample_batch(run, volume: np.ndarray, taps: tuple, cubes: np.ndarray, target: np.ndarray,
                  step: int) -> None:
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
            run(_sample_separable, (cubes[waiting], slots[waiting]), k_end, volume, *taps, slabs, slab_k,
                next_a, target)


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
            slab_values[dest + x] = (w_lo * np.float32(voxels[row_lo + x])
                                     + w_hi * np.float32(voxels[row_hi + x]) + shift)


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
                    _interpolate_rows(voxels, row_stride, slice_stride, k, j_lo[n], j_hi[n], j_wlo[n],
                                      j_whi[n], start, length, slab_values, (2 * slot + (k & 1)) * slab_size,
                                      width)
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
                    out_values[dest + c] = np.int16(np.rint(left + i_frac[n, c] * (row[tap + one] - left)
                                                            - air))
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


