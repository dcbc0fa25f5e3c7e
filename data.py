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

import numpy as np

import options
import resample
from common import (Parts, UserError, atomic_concatenate_npy, atomic_write_json, atomic_write_text, attempt,
                    over_scans, problems_message, read_ahead)
from resample import AIR_HU


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


def validate_patch_args(patch_size: int, spacing_mm: float) -> None:
    if patch_size < 2:
        raise UserError(f"--patch-size must be at least 2, got {patch_size}")
    if not spacing_mm > 0:
        raise UserError(f"--spacing-mm must be positive, got {spacing_mm}")


def inside_scan(scan: CTScan, world_xyz: np.ndarray, reach_mm: float = 0.0) -> np.ndarray:
    """Boolean ``(N,)``: does each world point (x, y, z), or with ``reach_mm`` the cube of that half-side
    around it, meet the scan's voxels (their centres, extended by half a voxel)?"""
    index = world_to_index(world_xyz, scan)
    reach = reach_mm * np.abs(_world_to_index_matrix(scan)).sum(axis=1)  # largest index step over the cube
    size_ijk = np.array(scan.hu.shape[::-1])
    return ((index + reach >= -0.5) & (index - reach <= size_ijk - 0.5)).all(axis=1)


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
    validate_patch_args(patch_size, spacing_mm)
    world_xyz = np.atleast_2d(np.asarray(world_xyz, float))
    if world_xyz.shape[1:] != (3,):
        raise ValueError(f"world_xyz must have shape (N, 3), got {world_xyz.shape}")
    out = np.empty((len(world_xyz), patch_size, patch_size, patch_size), np.int16)
    if not len(world_xyz):
        return out
    volume = np.ascontiguousarray(scan.hu, dtype=np.int16)
    base_ijk = world_to_index(world_xyz, scan)
    order = resample.spatial_order(base_ijk[:, ::-1])
    offsets = patch_offsets_mm(patch_size, spacing_mm)
    index_per_world = _world_to_index_matrix(scan)  # column a: index step per mm along world axis a
    perm = _axis_permutation(scan)
    if perm is None:
        # row a: index (i, j, k) step per sample along z, y, x
        steps = (index_per_world * spacing_mm).T[::-1].copy()
        first = base_ijk - (patch_size // 2) * steps.sum(axis=0)  # index of sample [0, 0, 0]
        resample.sample_oblique(volume, first, steps, order, out)
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
    resample.sample_separable(volume, positions, order, target)
    return out


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
            raise UserError(f"{path}: data file {data_file.name} is truncated ({actual} bytes, the header "
                            f"needs {expected})")
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
        if "Unable to determine ImageIO reader" in reason:
            raise UserError(f"{path}: not a CT format this toolkit reads (.mhd with its .raw, .mha, NIfTI, "
                            f".nrrd, or a folder of one DICOM series)") from None
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


SCAN_SUFFIXES = (".mhd", ".mha", ".nii", ".nii.gz", ".nrrd")


def find_scans(paths) -> list[Path]:
    """The scans named by ``paths``, in order: a file, a DICOM series folder, or a folder of scans (its
    ``.mhd``/``.mha``/NIfTI/``.nrrd`` files and the DICOM series folders inside it, sorted by path).
    UserError for a path that does not exist or a folder that holds no scan."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file() or _holds_dicom(path):
            found.append(path)
            continue
        inside = sorted(p for p in path.rglob("*") if (p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES))
                        or (p.is_dir() and _holds_dicom(p)))
        if not inside:
            raise UserError(f"{path}: no scan in this folder (.mhd, .mha, NIfTI, .nrrd, or DICOM series "
                            f"folders)")
        found += inside
    return list(dict.fromkeys(found))


def _holds_dicom(folder: Path) -> bool:
    """Whether a folder holds DICOM files itself (not only in subfolders)."""
    return folder.is_dir() and any(p.is_file() and (p.suffix.lower() == ".dcm" or _dicom_magic(p))
                                   for p in folder.iterdir())


def _dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


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
    """A ``.mhd`` whose header :func:`_metaimage_layout` has read: plain voxels in one copy, else
    SimpleITK."""
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
            with open(source[0], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_WILLNEED"):
                mapped.madvise(mmap.MADV_WILLNEED)
            voxels = np.frombuffer(mapped, np.int16).reshape(tuple(info.GetSize())[::-1])
            scan = _to_scan(info, voxels, str(path))
        else:
            scan = _read_metaimage(path, info, source)
    else:
        scan = read_ct(path)
    return scan, extract_patches(scan, world_xyz, patch_size, spacing_mm)


def scan_to_image(scan: CTScan):
    """``scan`` as a SimpleITK image: int16 HU with its origin, spacing and direction."""
    return array_image(np.asarray(scan.hu, np.int16), scan)


def array_image(array: np.ndarray, scan: CTScan):
    """An array ``[z, y, x]`` on the grid of ``scan`` (same shape) as a SimpleITK image with the scan's
    origin, spacing and direction."""
    import SimpleITK as sitk
    if array.shape != scan.hu.shape:
        raise ValueError(f"array of shape {array.shape} is not on the grid of {scan.name} {scan.hu.shape}")
    image = sitk.GetImageFromArray(array)
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
    """Rows of a LUNA16-style point CSV (annotations, candidates, submissions, a scan's points).

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

    @classmethod
    def empty(cls) -> "PointTable":
        return cls(np.array([], object), np.zeros((0, 3)), np.zeros(0), np.zeros(0, int))

    def rows_by_scan(self) -> dict:
        """``{seriesuid: row numbers}`` in file order."""
        groups: dict = {}
        for row, uid in enumerate(self.seriesuid):
            groups.setdefault(uid, []).append(row)
        return {uid: np.array(rows) for uid, rows in groups.items()}


def read_point_csv(path, value_column: str | None, strict: bool = True,
                   need_uid: bool = True) -> tuple[PointTable, list[str]]:
    """Read ``seriesuid,coordX,coordY,coordZ[,<value_column>]`` (any column order, extra columns ignored).

    A row with a missing, empty, non-numeric or non-finite field is named by its line: with ``strict``
    the file is refused (:class:`UserError` listing them), else the row is skipped and described in the
    returned problem list. A missing file or column is always refused. Without ``need_uid`` the seriesuid
    column may be absent (every seriesuid is then ""); without ``value_column`` every value is 0.
    Well-formed files are parsed at C speed; anything odd goes through the row-by-row reader.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    lines = text.splitlines()
    header = [name.strip().strip('"') for name in lines[0].split(",")] if lines else []
    wanted = ["seriesuid", "coordX", "coordY", "coordZ"] + ([value_column] if value_column else [])
    missing = [name for name in wanted if name not in header and (need_uid or name != "seriesuid")]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} "
                        f"(header: {','.join(header)[:200] or 'empty file'}; expected {','.join(wanted)})")
    columns = [header.index(name) if name in header else None for name in wanted]
    table = _read_regular_rows(text, lines, len(header), columns)
    problems: list[str] = []
    if table is None:
        table, problems = _read_rows_one_by_one(path, lines, columns)
    if problems and strict:
        raise UserError(problems_message(path, problems, "line(s)"))
    return table, problems


def _read_regular_rows(text: str, lines: list[str], width: int, columns: list) -> PointTable | None:
    """The rows of a file whose lines all have ``width`` plain fields, finite numbers and a seriesuid;
    None for anything else (checked on the whole text at C speed first)."""
    body = lines[1:]
    numbers_of_lines = np.arange(2, len(body) + 2)
    if any(not line or line.isspace() for line in body):
        numbers_of_lines = np.array([n for n, line in enumerate(body, start=2)
                                     if line and not line.isspace()], int)
        body = [lines[n - 1] for n in numbers_of_lines]
    if not body:
        return PointTable.empty()
    if '"' in text or text.count(",") - lines[0].count(",") != len(body) * (width - 1):
        return None
    try:
        numbers = np.loadtxt(body, delimiter=",", usecols=columns[1:], dtype=np.float64, ndmin=2,
                             comments=None)
    except ValueError:
        return None
    uid_column = columns[0]
    uids = np.array([line.split(",", uid_column + 1)[uid_column].strip() if uid_column is not None else ""
                     for line in body], dtype=object)
    if not np.isfinite(numbers).all() or (uid_column is not None and not all(uids)):
        return None
    values = numbers[:, 3].copy() if numbers.shape[1] > 3 else np.zeros(len(body))
    return PointTable(uids, np.ascontiguousarray(numbers[:, :3]), values, numbers_of_lines)


def _read_rows_one_by_one(path: Path, lines: list[str], columns: list) -> tuple[PointTable, list[str]]:
    import csv
    uids, numbers, line_numbers, problems = [], [], [], []
    for line_number, row in enumerate(csv.reader(lines[1:]), start=2):
        if not "".join(row).strip():
            continue
        try:
            fields = ["" if c is None else row[c].strip() for c in columns]
            values = [float(v) for v in fields[1:]] + [0.0] * (5 - len(fields))
            if (columns[0] is not None and not fields[0]) or not np.all(np.isfinite(values)):
                raise ValueError
        except (IndexError, ValueError):
            problems.append(f"{path.name} line {line_number}: unparseable row {','.join(row)[:120]!r}")
            continue
        uids.append(fields[0])
        numbers.append(values)
        line_numbers.append(line_number)
    numbers = np.array(numbers, float).reshape(-1, 4)
    return PointTable(np.array(uids, dtype=object), numbers[:, :3], numbers[:, 3],
                      np.array(line_numbers, int)), problems


def read_seriesuids(path) -> list[str]:
    """One seriesuid per line (no header, as LUNA16's ``seriesuids.csv``; a ``seriesuid`` header is
    skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    uids = [line.split(",")[0].strip() for line in path.read_text().splitlines()]
    uids = [uid for uid in uids if uid and uid != "seriesuid"]
    if not uids:
        raise UserError(f"{path}: no seriesuids in this file")
    return uids


def scan_subset_map(data_dir) -> dict[str, int]:
    """``{seriesuid: subset number}`` for every ``subset<k>/<seriesuid>.mhd`` under the LUNA16 root."""
    found = {}
    for mhd in sorted(Path(data_dir).glob("subset*/*.mhd")):
        suffix = mhd.parent.name[len("subset"):]
        if suffix.isdigit():
            found[mhd.stem] = int(suffix)
    return found


def subset_scans(data_dir, subsets) -> dict:
    """``{seriesuid: .mhd path}`` of the scans in the ``subset<k>`` folders of the LUNA16 root, k in
    ``subsets``."""
    data_dir = Path(data_dir)
    found = {uid: data_dir / f"subset{k}" / f"{uid}.mhd"
             for uid, k in sorted(scan_subset_map(data_dir).items()) if k in set(subsets)}
    if not found:
        raise UserError(f"no scans in {', '.join(str(data_dir / f'subset{k}') for k in subsets)} (expected "
                        "<seriesuid>.mhd files; set --data-dir or LUNA16_DIR, "
                        "or run 'python luna_cli.py synth')")
    return found


def candidates_file(data_dir) -> Path:
    """``candidates_V2.csv`` of the LUNA16 root, else ``candidates.csv``."""
    for name in ("candidates_V2.csv", "candidates.csv"):
        if (Path(data_dir) / name).is_file():
            return Path(data_dir) / name
    raise UserError(f"{data_dir}: neither candidates_V2.csv nor candidates.csv found "
                    "(set --data-dir or LUNA16_DIR to the LUNA16 folder, or run 'python luna_cli.py synth')")


def squared_distances(marks_xyz: np.ndarray, findings_xyz: np.ndarray) -> np.ndarray:
    """``(M, F)`` squared world distances in mm^2 between points ``(M, 3)`` and ``(F, 3)``, summed x, y, z in
    that order (the arithmetic of the official evaluation, so that boundary cases fall the same way)."""
    diff = findings_xyz[None, :, :] - marks_xyz[:, None, :]
    return diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1] + diff[..., 2] * diff[..., 2]


def within_radius(squared_mm2: np.ndarray, diameters_mm: np.ndarray) -> np.ndarray:
    """The official LUNA16 hit rule on :func:`squared_distances` ``(M, F)``: a point hits finding f when its
    squared distance is below ``(diameter_f / 2) ** 2`` (mm^2)."""
    return squared_mm2 < (np.asarray(diameters_mm, np.float64) / 2.0) ** 2


def match_diameters(candidates: PointTable, annotations: PointTable) -> np.ndarray:
    """Diameter (mm) of the nearest annotation whose sphere holds each candidate (the official hit rule,
    :func:`within_radius`), else NaN; annotations without a size (-1, 0) hold none."""
    diameters = np.full(len(candidates), np.nan)
    annotations = annotations.take(np.flatnonzero(annotations.value > 0))
    by_scan = annotations.rows_by_scan()
    for uid, rows in candidates.rows_by_scan().items():   # one (candidates x nodules) distance table a scan
        found = by_scan.get(uid)
        if found is None:
            continue
        squared = squared_distances(candidates.world_xyz[rows], annotations.world_xyz[found])
        squared[~within_radius(squared, annotations.value[found])] = np.inf
        nearest = np.argmin(squared, axis=1)
        hit = np.isfinite(squared[np.arange(len(rows)), nearest])
        diameters[rows[hit]] = annotations.value[found][nearest[hit]]
    return diameters


# --- the extract stage -------------------------------------------------------------

# "mined": empty for extracted rows, the run whose scores chose a mined hard negative (see mining.py);
# "mined_saw": the subsets that run trained and validated on ("0-7,9"; empty: not known);
# "mined_for": the test subset of the cross-validation fold the row was mined for (empty: any use)
INDEX_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "label", "diameter_mm", "mined", "mined_saw",
                 "mined_for"]
CACHE_PARAMETERS = ("patch_size", "spacing_mm", "seed", "negatives_per_positive", "all_candidates",
                    "candidates_file")


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
    rows = np.flatnonzero(np.isin(candidates.seriesuid, list(uids)))
    if all_candidates:
        return rows
    positives = rows[candidates.value[rows] > 0.5]
    negatives = rows[candidates.value[rows] <= 0.5]
    keep = min(len(negatives), int(round(negatives_per_positive * len(positives))))
    rng = np.random.default_rng([seed, subset])
    return np.sort(np.concatenate([positives, rng.choice(negatives, keep, replace=False)]))


def _read_manifest(cache: Path, wanted: dict) -> dict:
    """The finished cache's manifest ({} when there is none); refused when made with other parameters."""
    import json
    path = cache / "manifest.json"
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    differing = {k: (manifest.get(k), wanted[k]) for k in CACHE_PARAMETERS if manifest.get(k) != wanted[k]}
    if differing:
        shown = "; ".join(f"{k}: cache has {a}, this run asks for {b}" for k, (a, b) in differing.items())
        raise UserError(f"{cache} was made with other parameters ({shown}). "
                        "Use another --work-dir, or delete that folder to rebuild it.")
    return manifest


def recorded_scans(manifest: dict) -> list[str]:
    """The seriesuids a subset's extract manifest records as found in its folder: ``scans_found``, or for a
    manifest made before that key, its extracted and unreadable scans."""
    if "scans_found" in manifest:
        return list(manifest["scans_found"])
    return sorted(set(manifest.get("scans", [])) | set(manifest.get("failed", {})))


def scan_records(candidates: PointTable, annotations: PointTable | None, scans) -> dict:
    """What training needs to know of a subset's scans beyond its patches, for its manifest:
    ``candidate_counts`` ``{seriesuid: [candidates, nodule candidates (class 1)]}`` of the candidates file
    (the whole list, not the extracted sample: the prior a calibrated probability is corrected to), and
    ``nodules`` ``[[seriesuid, x, y, z, diameter_mm], ...]`` of ``annotations.csv`` (world mm; None without
    that file: the validation cutoff is then chosen per candidate instead of per nodule)."""
    scans = set(scans)
    mine = np.isin(candidates.seriesuid, list(scans))
    counts = {uid: [0, 0] for uid in sorted(scans)}
    for uid, label in zip(candidates.seriesuid[mine], candidates.value[mine]):
        counts[uid][0] += 1
        counts[uid][1] += int(label > 0.5)
    nodules = None
    if annotations is not None:
        rows = np.flatnonzero(np.isin(annotations.seriesuid, list(scans)))
        nodules = [[str(annotations.seriesuid[r]), *map(float, annotations.world_xyz[r]),
                    float(annotations.value[r])] for r in rows]
    return {"candidate_counts": counts, "nodules": nodules}


def _subset_candidates(data_dir: Path, candidates_path: Path, scans: dict, subset: int, wanted: dict):
    """``(selected candidates, their annotated diameters (NaN off nodules), problems met, scan_records)`` of
    one subset."""
    candidates, problems = read_point_csv(candidates_path, "class", strict=False)
    unknown = set(candidates.seriesuid) - set(scan_subset_map(data_dir))
    if unknown:
        problems.append(f"{len(unknown)} seriesuid(s) of the candidates file have no scan under {data_dir} "
                        "(not downloaded, or in another folder)")
    annotations_path = data_dir / "annotations.csv"
    annotations = PointTable.empty()
    if annotations_path.is_file():
        annotations, more = read_point_csv(annotations_path, "diameter_mm", strict=False)
        sizeless = annotations.line[annotations.value <= 0]
        problems += more + ([f"{annotations_path}, line(s) {', '.join(map(str, sizeless[:20]))}: diameter_mm "
                             f"is not positive; those nodules give their candidates no size"]
                            if len(sizeless) else [])
    else:
        problems.append(f"{annotations_path}: not found, diameter_mm left empty")
    selected = candidates.take(select_candidates(candidates, set(scans), subset, wanted["seed"],
                                                 wanted["negatives_per_positive"], wanted["all_candidates"]))
    records = scan_records(candidates, annotations if annotations_path.is_file() else None, scans)
    return selected, match_diameters(selected, annotations), problems, records


def _extract_scans(paths: dict, todo: list, selected: PointTable, diameters: np.ndarray, parts: Parts,
                   wanted: dict, problems: list, console, show_progress: bool) -> dict:
    """Cut each scan of ``todo`` once into a part (the next scan is read while one is written);
    returns ``{seriesuid: reason}`` of the scans that could not be read."""
    rows_of = selected.rows_by_scan()
    rows_todo = {uid: rows_of.get(uid, np.zeros(0, int)) for uid in todo}
    size, spacing = wanted["patch_size"], wanted["spacing_mm"]

    def read_and_cut(uid: str):
        return attempt(paths[uid], read_and_extract, paths[uid], selected.world_xyz[rows_todo[uid]], size,
                       spacing)

    def save(uid: str, scan_and_patches) -> None:
        scan, patches = scan_and_patches
        rows = rows_todo[uid]
        inside = inside_scan(scan, selected.world_xyz[rows], (size // 2) * spacing)
        problems.extend(f"candidate on line {selected.line[row]} ({uid}) lies wholly outside its scan, "
                        "skipped" for row in rows[~inside])
        rows = rows[inside]
        parts.save(uid, patches[inside], index_rows(uid, selected.world_xyz[rows], selected.value[rows],
                                                     diameters[rows]))
    return over_scans(read_ahead(todo, read_and_cut), save, total=len(todo),
                      label=f"[bold]subset {wanted['subset']}[/] scans", console=console,
                      show_progress=show_progress)


def index_rows(uid: str, world_xyz: np.ndarray, labels: np.ndarray, diameters: np.ndarray, mined: str = "",
               mined_saw: str = "", mined_for: str = "") -> list:
    """Rows of ``index.csv`` (:data:`INDEX_COLUMNS`) for one scan's patches."""
    return [[uid, repr(float(x)), repr(float(y)), repr(float(z)), str(int(label)),
             "" if np.isnan(d) else repr(float(d)), mined, mined_saw, mined_for]
            for (x, y, z), label, d in zip(world_xyz, labels, diameters)]


def read_cache_index(cache: Path) -> list[list[str]]:
    """The rows of a subset's ``index.csv``, padded to :data:`INDEX_COLUMNS` (caches made before the
    ``mined`` or the ``mined_saw`` and ``mined_for`` columns have fewer fields)."""
    import csv
    with open(Path(cache) / "index.csv", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [row + [""] * (len(INDEX_COLUMNS) - len(row)) for row in rows]


def _runs(positions: list[int]):
    """Slices of the consecutive stretches of sorted row positions."""
    breaks = [n for n in range(1, len(positions)) if positions[n] != positions[n - 1] + 1]
    for first, stop in zip([0] + breaks, breaks + [len(positions)]):
        yield slice(positions[first], positions[stop - 1] + 1)


def write_cache(cache: Path, sources: list, rows: list, patch_size: int) -> tuple[int, int]:
    """``patches.npy`` (the row-wise concatenation of ``sources``) and ``index.csv`` (``rows``), atomically;
    returns ``(n_patches, n_positive)``."""
    import csv
    import io
    total = atomic_concatenate_npy(cache / "patches.npy", sources, (patch_size,) * 3, np.int16)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([INDEX_COLUMNS] + rows)
    atomic_write_text(cache / "index.csv", text.getvalue())
    return total, sum(1 for row in rows if row[4] == "1")


def _assemble_cache(cache: Path, scans: list[str], parts: Parts, patch_size: int) -> tuple[int, int]:
    """Merge the finished cache and the parts into ``patches.npy`` + ``index.csv``, one scan after the
    other in ``scans`` order; returns ``(n_patches, n_positive)``."""
    old_rows, old_patches, old_rows_of = [], None, {}
    if (cache / "index.csv").is_file() and (cache / "patches.npy").is_file():
        old_rows = read_cache_index(cache)
        old_patches = np.load(cache / "patches.npy", mmap_mode="r")
        for position, row in enumerate(old_rows):
            old_rows_of.setdefault(row[0], []).append(position)
    sources, rows, new = [], [], parts.done()
    for uid in scans:
        if uid in new:
            sources.append(parts.load(uid))
            rows.extend(parts.meta(uid))
        elif uid in old_rows_of:  # mined rows sit at the end: a scan's rows may come in several stretches
            sources.extend(old_patches[run] for run in _runs(old_rows_of[uid]))
            rows.extend(old_rows[p] for p in old_rows_of[uid])
    counts = write_cache(cache, sources, rows, patch_size)
    del old_patches, sources
    return counts


def extract_subset(data_dir, work_dir, subset: int, *, show_progress: bool = True, console=None,
                   **settings) -> ExtractSummary:
    """Build (or complete) the patch cache of one LUNA16 subset, from ``candidates`` (default: the data
    folder's :func:`candidates_file`; a cache made from a file of another name is refused).

    ``settings``: the options of ``options.stage_names("extract")`` (patch size and spacing, the sample of
    negatives and its seed, every candidate, the candidates file); those left out take their defaults there.

    Writes ``W/patches/subset<k>/patches.npy`` (int16 HU, ``(N, P, P, P)``, ``[z, y, x]`` world axes,
    ``spacing_mm`` apart, candidate at ``P//2``), ``index.csv`` (same row order) and ``manifest.json``.
    Each scan is read once; finished scans are kept as parts, so an interrupted run resumes and a
    rerun adds nothing twice. Unreadable scans are reported in ``summary.failed``. The manifest records every
    scan found in the subset's folder (``scans_found``, kept across reruns), so that evaluate can name a scan
    that goes missing later, and the :func:`scan_records` training reads (the candidate file's counts per scan
    and the annotated nodules); a rerun on a finished cache adds them to a manifest made before them.
    """
    from rich.console import Console
    chosen = {**options.defaults("extract"), **options.given("extract", settings)}
    return _extract_subset(Path(data_dir), subset_dir(work_dir, subset), subset, show_progress,
                           console or Console(stderr=True), **chosen)


def _extract_subset(data_dir: Path, cache: Path, subset: int, show_progress: bool, console, *,
                    patch_size: int, spacing_mm: float, negatives_per_positive: float, all_candidates: bool,
                    sample_seed: int, candidates) -> ExtractSummary:
    candidates_path = Path(candidates) if candidates is not None else candidates_file(data_dir)
    wanted = dict(patch_size=patch_size, spacing_mm=float(spacing_mm), seed=sample_seed,
                  candidates_file=candidates_path.name, negatives_per_positive=float(negatives_per_positive),
                  all_candidates=all_candidates)
    manifest = _read_manifest(cache, wanted)
    scans = subset_scans(data_dir, [subset])
    selected, diameters, problems, records = _subset_candidates(data_dir, candidates_path, scans, subset,
                                                                wanted)
    parts = Parts(cache / "parts", wanted)
    done = set(manifest.get("scans", [])) | parts.done()
    todo = [uid for uid in scans if uid not in done]
    failed = _extract_scans(scans, todo, selected, diameters, parts, dict(wanted, subset=subset), problems,
                            console, show_progress)
    finished = [uid for uid in scans if uid in done or uid in parts.done()]
    if todo or not (cache / "patches.npy").is_file():
        found = sorted(set(scans) | set(recorded_scans(manifest)))
        manifest = dict(wanted, subset=subset, dtype="int16", axis_order="z,y,x (world axes, increasing)",
                        units="HU", outside_value=AIR_HU, scans=finished, scans_found=found)
        n_patches, n_positive = _assemble_cache(cache, finished, parts, patch_size)
        manifest.update(n_patches=n_patches, n_positive=n_positive, failed=failed, **records)
        atomic_write_json(cache / "manifest.json", manifest)
        parts.remove()
    elif any(manifest.get(key) != value for key, value in records.items()):   # made before the records
        manifest.update(records)
        atomic_write_json(cache / "manifest.json", manifest)
    for message in problems:
        console.print(f"[yellow]{message}[/]")
    return ExtractSummary(subset, cache, manifest["n_patches"], manifest["n_positive"], len(finished),
                          len(todo) - len(failed), failed, problems)
