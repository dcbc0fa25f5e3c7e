"""Reading the patch cache that extract wrote (subsets, splits by scan, batches), and the cache-features
stage.

Patch cache: ``W/patches/subset{k}/patches.npy`` int16 ``(N, P, P, P)`` HU, array axes ``[z, y, x]`` along
increasing world z, y, x at ``spacing_mm`` voxels, with ``index.csv`` (one row per patch) and
``manifest.json``.

A feature set is the frozen encoder's pooled features of every patch, ``features_<tag>.npy`` float16
``(N, views * F)`` beside each subset's index; ``W/features/<tag>.json`` says what made it (encoder, weights
or random-init seed, pooling, HU window, views) and ``W/features/encoder_<tag>.pt`` holds the encoder.
The tag is the set's name (``train-head --features TAG``).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.progress import ProgressColumn, TimeRemainingColumn
from rich.text import Text
from torch import nn

import common
import data
import head as head_mod
import options as options_mod
from common import UserError
from head import autocast

console = Console()

EXTRACT_HINT = "python luna_cli.py extract --subset K"
ENCODER_FORMAT = "luna16-encoder/1"
FEATURE_FORMAT = "luna16-features/1"


# --- the patch cache ----------------------------------------------------------------

@dataclass
class SubsetCache:
    """One extracted subset: per-row seriesuid, label (0/1), annotated diameter (mm; NaN off nodules, or
    where the annotation is unknown) and world mm point ``(N, 3)`` (x, y, z), and its manifest; ``mining``:
    per row ``(mined, mined_saw, mined_for)`` of ``index.csv`` (all "" for extracted rows; see mining.py)."""
    subset: int
    folder: Path
    manifest: Dict[str, Any]
    seriesuids: np.ndarray
    labels: np.ndarray
    diameters: np.ndarray
    world_xyz: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    mining: Optional[np.ndarray] = None

    @property
    def patches_path(self) -> Path:
        return self.folder / "patches.npy"

    @property
    def patch_size(self) -> int:
        return int(self.manifest["patch_size"])

    @property
    def spacing_mm(self) -> float:
        return float(self.manifest["spacing_mm"])

    def __len__(self) -> int:
        return len(self.labels)


def extracted_subsets(work_dir: Path) -> List[int]:
    """Subset numbers with a complete patch cache (patches.npy, index.csv, manifest.json) under
    ``W/patches``."""
    root = Path(work_dir) / "patches"
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            match = re.fullmatch(r"subset(\d+)", folder.name)
            if match and all((folder / name).is_file()
                             for name in ("patches.npy", "index.csv", "manifest.json")):
                found.append(int(match.group(1)))
    return sorted(found)


def read_subset_cache(work_dir: Path, subset: int) -> SubsetCache:
    """Read the manifest and index of one subset and check them against the shape of ``patches.npy``."""
    folder = data.subset_dir(work_dir, subset)
    manifest_path, index_path = folder / "manifest.json", folder / "index.csv"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest_path}: unreadable ({err}); run "
                        f"`{EXTRACT_HINT.replace('K', str(subset))}` again")
    for key in ("patch_size", "spacing_mm"):
        if key not in manifest:
            raise UserError(f"{manifest_path}: no '{key}'; run "
                            f"`{EXTRACT_HINT.replace('K', str(subset))}` again")
    seriesuids, labels, diameters, world_xyz, mining = _read_index(index_path)
    patches = np.load(folder / "patches.npy", mmap_mode="r")
    size = int(manifest["patch_size"])
    if patches.ndim != 4 or patches.shape[1:] != (size,) * 3 or patches.dtype != np.int16:
        raise UserError(f"{folder / 'patches.npy'}: expected int16 (N, {size}, {size}, {size}), "
                        f"found {patches.dtype} {patches.shape}")
    if patches.shape[0] != len(labels):
        raise UserError(f"{folder}: patches.npy has {patches.shape[0]} patches but index.csv {len(labels)} "
                        f"rows; run `{EXTRACT_HINT.replace('K', str(subset))}` again")
    return SubsetCache(subset, folder, manifest, np.asarray(seriesuids, dtype=object),
                       np.asarray(labels, dtype=np.int64), np.asarray(diameters, dtype=np.float64),
                       np.asarray(world_xyz, dtype=np.float64).reshape(-1, 3),
                       np.asarray(mining, dtype=object).reshape(-1, 3))


def _read_index(index_path: Path) -> Tuple[list, list, list, list, list]:
    """seriesuids, labels, diameters (mm, NaN when empty), world mm points (x, y, z) and
    ``(mined, mined_saw, mined_for)`` of ``index.csv``; bad rows named by line."""
    seriesuids, labels, diameters, world_xyz, mining = [], [], [], [], []
    with open(index_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"seriesuid", "label", "coordX", "coordY", "coordZ"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{index_path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            if row["label"] not in ("0", "1"):
                raise UserError(f"{index_path}, line {line}: label must be 0 or 1, got {row['label']!r}")
            text = (row.get("diameter_mm") or "").strip()
            try:
                diameter = float(text) if text else math.nan
            except ValueError:
                diameter = -1.0
            if not (math.isnan(diameter) or diameter > 0):
                raise UserError(f"{index_path}, line {line}: diameter_mm must be a positive number or empty, "
                                f"got {text!r}")
            try:
                world_xyz.append([float(row[c]) for c in ("coordX", "coordY", "coordZ")])
            except (TypeError, ValueError):
                raise UserError(f"{index_path}, line {line}: coordX, coordY and coordZ must be "
                                f"numbers") from None
            seriesuids.append(row["seriesuid"])
            labels.append(int(row["label"]))
            diameters.append(diameter)
            mining.append(tuple(row.get(column) or "" for column in ("mined", "mined_saw", "mined_for")))
    return seriesuids, labels, diameters, world_xyz, mining


def check_patch_geometry(caches: Dict[int, SubsetCache]) -> Tuple[int, float]:
    """The common (patch_size, spacing_mm) of the subsets; UserError listing each subset's values if they
    differ."""
    values = {k: (c.patch_size, c.spacing_mm) for k, c in caches.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"subset{k}: patch_size {p}, spacing_mm {s}"
                            for k, (p, s) in sorted(values.items()))
        raise UserError(f"the patch caches were made with different parameters ({listing}); "
                        f"extract them again with the same --patch-size and --spacing-mm")
    return next(iter(values.values()))


def check_preprocess_matches(stored: Dict[str, Any], patch_size: int, spacing_mm: float, source: str) -> None:
    """Refuse a checkpoint whose patch geometry differs from the patch cache's, naming both values."""
    if int(stored["patch_size"]) != patch_size or not math.isclose(float(stored["spacing_mm"]), spacing_mm):
        raise UserError(f"{source} was trained on patches of {stored['patch_size']} voxels at "
                        f"{stored['spacing_mm']} mm, but the patch cache holds {patch_size} voxels at "
                        f"{spacing_mm} mm; extract with the checkpoint's parameters or train a new model")


# --- splits by scan -----------------------------------------------------------

@dataclass
class ScanSplit:
    """Row indices per subset for training and validation; ``method`` is "subsets" or "seriesuid"."""
    train: Dict[int, np.ndarray]
    val: Dict[int, np.ndarray]
    method: str
    note: str

    def summary(self, caches: Dict[int, SubsetCache]) -> Dict[str, Any]:
        def side(rows_by_subset):
            uids = {u for k, rows in rows_by_subset.items() for u in caches[k].seriesuids[rows]}
            labels = np.concatenate([caches[k].labels[rows] for k, rows in rows_by_subset.items()] or [[]])
            return {"subsets": sorted(k for k, rows in rows_by_subset.items() if len(rows)),
                    "scans": len(uids), "patches": int(len(labels)), "positives": int(np.sum(labels))}
        return {"method": self.method, "note": self.note, "train": side(self.train), "val": side(self.val)}


def split_by_scan(caches: Dict[int, SubsetCache], val_subsets, test_subsets: Sequence[int], seed: int = 0,
                  val_fraction: float = 0.2) -> ScanSplit:
    """Split the extracted non-test subsets into training and validation rows, never one scan on both sides.

    ``val_subsets``: the validation subsets, each of which must be extracted (the others train); or
    ``"auto"``: the seriesuids of all of them shuffled with ``seed``, ``val_fraction`` of them validating.
    """
    if set(caches) & set(test_subsets):
        raise ValueError("test subsets must not be loaded for training")
    if val_subsets == "auto":
        return _split_by_seriesuid(caches, seed, val_fraction)
    if set(val_subsets) & set(test_subsets):
        raise UserError(f"subsets {sorted(set(val_subsets) & set(test_subsets))} are both validation and "
                        f"test subsets")
    missing = sorted(set(val_subsets) - set(caches))
    if missing or not val_subsets:
        raise UserError(f"--val-subsets {common.format_subsets(val_subsets)}: subset(s) "
                        f"{common.format_subsets(missing)} not extracted (extracted, outside the test "
                        f"subsets: {common.format_subsets(sorted(caches))}); extract them, or use "
                        f"--val-subsets auto to split the scans 80:20")
    train_present = sorted(set(caches) - set(val_subsets))
    if not train_present:
        raise UserError(f"no extracted subset is left for training besides --val-subsets "
                        f"{common.format_subsets(val_subsets)} and --test-subsets "
                        f"{common.format_subsets(test_subsets)}; run `{EXTRACT_HINT}` for more subsets")
    uids = {side: set(np.concatenate([caches[k].seriesuids for k in ks])) for side, ks in
            (("train", train_present), ("val", val_subsets))}
    shared = uids["train"] & uids["val"]
    if shared:
        raise UserError(f"scan {sorted(shared)[0]} appears in a training and a validation subset "
                        f"({len(shared)} scan(s) in all); the patch caches are inconsistent")
    return ScanSplit({k: np.arange(len(caches[k])) for k in train_present},
                     {k: np.arange(len(caches[k])) for k in sorted(val_subsets)}, "subsets",
                     f"validation on subset(s) {sorted(val_subsets)}, training on {train_present}")


def _split_by_seriesuid(caches: Dict[int, SubsetCache], seed: int, val_fraction: float) -> ScanSplit:
    uids = sorted(set(np.concatenate([c.seriesuids for c in caches.values()])))
    if len(uids) < 2:
        raise UserError(f"only {len(uids)} scan extracted outside the test subsets; need scans for both "
                        f"training and validation: run `{EXTRACT_HINT}` for more subsets")
    order = np.random.default_rng(seed).permutation(len(uids))
    n_val = min(max(1, int(round(val_fraction * len(uids)))), len(uids) - 1)
    val_uids = [uids[i] for i in order[:n_val]]
    train, val = {}, {}
    for k, cache in sorted(caches.items()):
        in_val = np.isin(cache.seriesuids, val_uids)
        train[k], val[k] = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    note = (f"--val-subsets auto: the scans of subset(s) {sorted(caches)} are split by seriesuid, "
            f"{len(uids) - n_val} for training, {n_val} for validation (seed {seed})")
    return ScanSplit(train, val, "seriesuid", note)


def load_split(work_dir: Path, val_subsets, test_subsets: Sequence[int],
               seed: int) -> Tuple[Dict[int, SubsetCache], ScanSplit, int, float]:
    """Read every extracted non-test subset, check their patch geometry, split by scan (see
    :func:`split_by_scan`).

    Returns (caches, split, patch_size, spacing_mm). Test subsets are not read at all, but must be extracted:
    a subset named that does not exist is a mistake, not a fold.
    """
    extracted = extracted_subsets(work_dir)
    if not extracted:
        raise UserError(f"no patch cache under {Path(work_dir) / 'patches'}; run `{EXTRACT_HINT}` first")
    missing = sorted(set(test_subsets) - set(extracted))
    if missing:
        raise UserError(f"--test-subsets {common.format_subsets(test_subsets)}: subset(s) "
                        f"{common.format_subsets(missing)} not extracted under {Path(work_dir) / 'patches'} "
                        f"(extracted: {common.format_subsets(extracted)}); use --test-subsets none for no "
                        f"test subset")
    present = [k for k in extracted if k not in set(test_subsets)]
    if not present:
        raise UserError(f"no patch cache under {Path(work_dir) / 'patches'} outside the test subsets "
                        f"{list(test_subsets)}; run `{EXTRACT_HINT}` first")
    caches = {k: read_subset_cache(work_dir, k) for k in present}
    patch_size, spacing_mm = check_patch_geometry(caches)
    split = _rows_for_fold(caches, split_by_scan(caches, val_subsets, test_subsets, seed), test_subsets)
    for rows_by_subset in (split.train, split.val):
        check_mined_rows(caches, rows_by_subset, test_subsets, strict=False)
    for name, rows_by_subset in (("training", split.train), ("validation", split.val)):
        labels = np.concatenate([caches[k].labels[rows] for k, rows in rows_by_subset.items()] or [[]])
        if len(labels) == 0 or labels.min() == labels.max():
            raise UserError(f"the {name} split ({split.note}) has {int(np.sum(labels == 1))} nodule and "
                            f"{int(np.sum(labels == 0))} non-nodule patches; it needs both: run "
                            f"`{EXTRACT_HINT}` for more subsets or choose other --val-subsets")
    return caches, split, patch_size, spacing_mm


def rows_for_fold(cache: SubsetCache, rows: np.ndarray, test_subsets: Sequence[int]) -> np.ndarray:
    """``rows`` of ``cache`` without those mined for another cross-validation fold (``mined_for`` names a
    test subset other than this job's only one)."""
    if cache.mining is None or not len(rows):
        return rows
    own = str(test_subsets[0]) if len(test_subsets) == 1 else None
    mined_for = cache.mining[rows, 2]
    return rows[(mined_for == "") | (mined_for == own)]


def _rows_for_fold(caches: Dict[int, SubsetCache], split: ScanSplit,
                   test_subsets: Sequence[int]) -> ScanSplit:
    """The split without the rows mined for another cross-validation fold (:func:`rows_for_fold`)."""
    def keep(side: Dict[int, np.ndarray]) -> Dict[int, np.ndarray]:
        return {k: rows_for_fold(caches[k], rows, test_subsets) for k, rows in side.items()}
    return ScanSplit(keep(split.train), keep(split.val), split.method, split.note)


def check_mined_rows(caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray],
                     test_subsets: Sequence[int], strict: bool) -> None:
    """Refuse mined rows chosen by a model that saw a test subset (their ``mined_saw``), naming the run; with
    ``strict`` (cross-validation) also mined rows whose run's subsets are not recorded (mined before they
    were)."""
    for k, rows in sorted(rows_by_subset.items()):
        if caches[k].mining is None or not len(rows):
            continue
        for mined, saw, _ in sorted({tuple(r) for r in caches[k].mining[rows] if r[0]}):
            if not saw and strict:
                raise UserError(f"subset {k}'s patch cache holds hard negatives mined by {mined!r} without a "
                                f"record of the subsets that run saw (mined before it was kept), so a fold "
                                f"could train on what its test subset taught; remove {caches[k].folder}, "
                                f"extract it again (`python luna_cli.py extract --subset {k}`) and mine it "
                                f"again, or use crossval --mine-rounds")
            leaked = sorted(set(common.parse_subsets(saw, "mined_saw")) & set(test_subsets)) if saw else []
            if leaked:
                raise UserError(f"subset {k}'s patch cache holds hard negatives mined by {mined!r}, a model "
                                f"that trained or validated on subset(s) {common.format_subsets(leaked)}, "
                                f"the test subset(s) here: training on them leaks the test labels; remove "
                                f"{caches[k].folder} and extract it again, or mine with a model that did not "
                                f"see {common.format_subsets(leaked)}")


class PatchPool:
    """Selected rows of several subsets' ``patches.npy`` as one sequence, read from the memory-mapped
    files."""

    def __init__(self, caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray]):
        keys = [k for k in sorted(rows_by_subset) if len(rows_by_subset[k])]
        self.paths = {k: str(caches[k].patches_path) for k in keys}
        self.subset = np.concatenate([np.full(len(rows_by_subset[k]), k) for k in keys] or [np.zeros(0, int)])
        self.row = np.concatenate([np.asarray(rows_by_subset[k]) for k in keys] or [np.zeros(0, int)])
        self.labels = np.concatenate([caches[k].labels[rows_by_subset[k]] for k in keys]
                                     or [np.zeros(0, int)])
        self.diameters = np.concatenate([caches[k].diameters[rows_by_subset[k]] for k in keys]
                                        or [np.zeros(0)])
        self.seriesuids = np.concatenate([caches[k].seriesuids[rows_by_subset[k]] for k in keys]
                                         or [np.zeros(0, object)])
        self.world_xyz = np.concatenate([caches[k].world_xyz[rows_by_subset[k]] for k in keys]
                                        or [np.zeros((0, 3))])
        self.patch_size = caches[keys[0]].patch_size if keys else 0
        self._arrays: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # DataLoader workers open their own memory maps
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _array(self, subset: int) -> np.ndarray:
        if subset not in self._arrays:
            self._arrays[subset] = np.load(self.paths[subset], mmap_mode="r")
        return self._arrays[subset]

    def read(self, positions: np.ndarray) -> np.ndarray:
        """int16 HU patches ``(B, P, P, P)`` for pool positions, read in file order from each subset."""
        positions = np.asarray(positions, dtype=np.int64)
        size = self.patch_size
        out = np.empty((len(positions), size, size, size), dtype=np.int16)
        subsets = self.subset[positions]
        for k in np.unique(subsets):
            where = np.flatnonzero(subsets == k)
            rows = self.row[positions[where]]
            order = np.argsort(rows, kind="stable")
            out[where[order]] = self._array(int(k))[rows[order]]
        return out


class BatchReader(torch.utils.data.Dataset):
    """Item i = (int16 HU patches ``(B, P, P, P)``, labels ``(B,)``, diameters mm ``(B,)``, NaN where unknown)
    of the i-th planned batch."""

    def __init__(self, pool: PatchPool, batches: List[np.ndarray]):
        self.pool, self.batches = pool, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        positions = self.batches[i]
        return (torch.from_numpy(self.pool.read(positions)), torch.from_numpy(self.pool.labels[positions]),
                torch.from_numpy(self.pool.diameters[positions]))


def batch_loader(pool: PatchPool, batches: List[np.ndarray], workers: int, pin: bool):
    return torch.utils.data.DataLoader(BatchReader(pool, batches), batch_size=None, shuffle=False,
                                       num_workers=workers, pin_memory=pin)


# --- augmentation ------------------------------------------------------------------

def move_patches(x: torch.Tensor, flips: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Shift each cube of a ``(B, P, P, P)`` batch by ``shifts[b]`` voxels along (z, y, x), then flip it along
    the axes where ``flips[b]`` (bool ``(B, 3)``) is set: ``out[b, z, ...] = x[b, clip(f(z) - dz), ...]``,
    ``f(z) = P - 1 - z`` on a flipped axis. The uncovered border repeats the cube's edge voxels, so no flat
    fill value appears that could mark a shifted cube. One gather per axis, and no step that waits for the
    device."""
    flips, shifts = flips.to(x.device), shifts.to(x.device)
    for axis in range(3):
        size = x.shape[axis + 1]
        position = torch.arange(size, device=x.device)[None]
        source = torch.where(flips[:, axis:axis + 1], size - 1 - position, position)
        index = (source - shifts[:, axis:axis + 1]).clamp(0, size - 1)
        view = [x.shape[0], 1, 1, 1]
        view[axis + 1] = size
        x = torch.gather(x, axis + 1, index.view(view).expand_as(x))
    return x


# (8, 3) bool: the axes (z, y, x) that each of head.VIEW_FLIPS flips (the same 8 flips that train-head's
# cached views and evaluation's test-time views use)
FLIP_AXES = torch.tensor([[axis in dims for axis in (1, 2, 3)] for dims in head_mod.VIEW_FLIPS])


def augment_batch(hu: torch.Tensor, generator: torch.Generator, max_shift_vox: int = 0) -> torch.Tensor:
    """A random flip (of the 8) and a random shift of up to ``max_shift_vox`` voxels per axis for every cube
    of ``(B, P, P, P)`` float HU, whatever its class (the labels are not even seen), rows in their order."""
    batch = hu.shape[0]
    ids = torch.randint(0, len(head_mod.VIEW_FLIPS), (batch,), generator=generator)
    shifts = (torch.randint(-max_shift_vox, max_shift_vox + 1, (batch, 3), generator=generator)
              if max_shift_vox > 0 else torch.zeros(batch, 3, dtype=torch.long))
    return move_patches(hu, FLIP_AXES[ids], shifts)


def training_inputs(hu: torch.Tensor, generator: torch.Generator, hu_min: float, hu_max: float, augment: bool,
                    max_shift_vox: int) -> torch.Tensor:
    """A loaded batch of int16 HU patches ``(B, P, P, P)`` -> model input ``(B, 1, P, P, P)`` in 0..1,
    augmented (``augment_batch``) when ``augment``."""
    hu = hu.float()
    if augment:
        hu = augment_batch(hu, generator, max_shift_vox)
    return data.hu_to_unit(hu, hu_min, hu_max).unsqueeze(1)


# --- encoder weights and feature caches ---------------------------------------------------

def weights_file(weights) -> Path:
    """``--weights`` as a path; UserError when no such file is there."""
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: no such file")
    return weights


def load_encoder_weights(encoder: nn.Module, weights: Path) -> Dict[str, Any]:
    """Load pretrained Swin UNETR weights into ``encoder`` via ``swin_encoder.load_pretrained``; UserError
    when the file is missing, not a checkpoint, or does not fit the encoder's configuration."""
    import swin_encoder
    weights = weights_file(weights)
    try:
        report = swin_encoder.load_pretrained(encoder, weights)
    except UserError as err:   # its message names the file
        raise UserError(f"--weights {err}") from None
    except Exception as err:  # unpickling, zip or shape errors: a file that is not (this kind of) checkpoint
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"--weights {weights} is not a Swin UNETR checkpoint that fits this encoder "
                        f"({type(err).__name__}: {first_line[:300]})") from None
    return report if isinstance(report, dict) else {"report": str(report)}


def warn_random_init(what: str) -> None:
    console.print(f"[bold yellow]WARNING: no --weights given: {what} starts from a RANDOMLY INITIALISED "
                  f"encoder. Pass --weights <Swin UNETR checkpoint> to start from pretrained weights.[/]")


def encoder_config(feature_size: int, window_size: int, grad_checkpoint: bool = False) -> Dict[str, Any]:
    """The encoder config of a new model: SwinEncoder kwargs and the pretraining input layout
    (head.to_encoder_layout)."""
    config = dict(head_mod.ENCODER_DEFAULTS)
    config.update(feature_size=int(feature_size), window_size=int(window_size),
                  use_checkpoint=bool(grad_checkpoint), input_layout=head_mod.PRETRAINING_LAYOUT)
    return config


def feature_identity(encoder_cfg: Dict[str, Any], pooling: str, weights: Optional[Path], seed: int,
                     hu_min: float, hu_max: float, views: int = 1) -> Dict[str, Any]:
    """What determines cached features: encoder architecture, its weights (file hash, or the random-init
    seed), pooling, HU window and the number of flipped views per patch (named only when above 1). The
    encoder's input layout is part of ``encoder`` (the pretraining one unless ``encoder_cfg`` names another);
    identities stored without it are of feature sets made in the legacy layout, and hash to other tags."""
    architecture = {k: v for k, v in encoder_cfg.items() if k != "use_checkpoint"}
    architecture.setdefault("input_layout", head_mod.PRETRAINING_LAYOUT)
    weights_part = ({"weights": str(weights), "weights_sha256": common.file_sha256(weights_file(weights))}
                    if weights else {"weights": None, "init_seed": int(seed)})
    views_part = {"views": int(views)} if views > 1 else {}
    return {"encoder": architecture, "pooling": pooling, "hu_min": float(hu_min), "hu_max": float(hu_max),
            **weights_part, **views_part}


def feature_tag(identity: Dict[str, Any]) -> str:
    """The feature set's name: a hash of its identity (the weights path itself does not count, only its
    content)."""
    key = {k: v for k, v in identity.items() if k != "weights"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def feature_paths(work_dir: Path, subset: int, tag: str) -> Tuple[Path, Path, Path]:
    """(features .npy, its JSON, the resumable parts folder) beside the subset's index.csv."""
    folder = data.subset_dir(work_dir, subset)
    return folder / f"features_{tag}.npy", folder / f"features_{tag}.json", folder / f"features_{tag}.parts"


def encoder_state_path(work_dir: Path, tag: str) -> Path:
    return Path(work_dir) / "features" / f"encoder_{tag}.pt"


def describe_features(identity: Dict[str, Any]) -> str:
    """One line saying what made a feature set."""
    encoder = identity["encoder"]
    weights = identity["weights"] or f"random init (seed {identity.get('init_seed')})"
    return (f"feature_size {encoder['feature_size']}, window_size {encoder['window_size']}, pooling "
            f"{identity['pooling']}, views {identity.get('views', 1)}, "
            f"HU {identity['hu_min']:g}..{identity['hu_max']:g}, weights {weights}, "
            f"input layout {encoder.get('input_layout', head_mod.LEGACY_LAYOUT)}")


def feature_sets(work_dir: Path) -> Dict[str, Dict[str, Any]]:
    """``{name: identity}`` of the feature sets cache-features made in the work folder."""
    found = {}
    for path in sorted((Path(work_dir) / "features").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            found[path.stem] = json.loads(path.read_text())
    return found


def choose_feature_set(work_dir: Path, name: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """The feature set named ``name``, else the only one in the work folder; UserError listing them
    otherwise."""
    sets = feature_sets(work_dir)
    listing = "\n".join(f"  {tag}: {describe_features(identity)}" for tag, identity in sets.items())
    if not sets:
        raise UserError(f"no cached features under {Path(work_dir) / 'features'}; "
                        f"run `python luna_cli.py cache-features` first")
    if name is None and len(sets) > 1:
        raise UserError(f"{len(sets)} feature sets in {Path(work_dir) / 'features'}; choose one with "
                        f"--features NAME:\n{listing}")
    name = name or next(iter(sets))
    if name not in sets:
        raise UserError(f"--features {name}: no such feature set; there are:\n{listing}")
    return name, sets[name]


def cache_features_hint(identity: Dict[str, Any], subset: int) -> str:
    """The cache-features command that makes features of ``identity`` for one subset."""
    encoder = identity["encoder"]
    return (f"python luna_cli.py cache-features --subsets {subset} --feature-size {encoder['feature_size']} "
            f"--window-size {encoder['window_size']} --pooling {identity['pooling']} "
            f"--views {identity.get('views', 1)} --hu-min {identity['hu_min']:g} "
            f"--hu-max {identity['hu_max']:g} "
            + (f"--weights {identity['weights']}" if identity["weights"]
               else f"--init-seed {identity['init_seed']}"))


def encode_new_rows(work_dir: Path, tag: str, subsets: Sequence[int], device: str = "auto",
                    quiet: bool = True, compile: bool = False) -> None:
    """Encode the rows appended to the patch caches of ``subsets`` (mined ones) into feature set ``tag``,
    with the encoder and settings that made it."""
    identity = feature_sets(work_dir)[tag]
    encoder = identity["encoder"]
    made = cache_features(work_dir, weights=identity["weights"] or None,
                          feature_size=encoder["feature_size"], window_size=encoder["window_size"],
                          pooling=identity["pooling"], hu_min=identity["hu_min"], hu_max=identity["hu_max"],
                          init_seed=identity.get("init_seed", 0), subsets=list(subsets), test_subsets=[],
                          views=identity.get("views", 1), device=device, quiet=quiet, compile=compile)
    if made != tag:
        raise UserError(f"feature set {tag} could not be extended (its settings gave the set {made}); run "
                        f"`{cache_features_hint(identity, subsets[0])}` for the mined subsets")


class RateColumn(ProgressColumn):
    """Items per second of a rich progress task."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def progress_bar(unit: str, disable: bool = False):
    return common.progress_bar(RateColumn(unit), TimeRemainingColumn(), console=console, disable=disable)


def _prepare_feature_encoder(work_dir: Path, identity: Dict[str, Any], tag: str, weights: Optional[Path],
                             seed: int) -> nn.Module:
    """The frozen encoder of a feature set: reloaded from ``W/features/encoder_<tag>.pt`` when present,
    else built (pretrained weights or seeded random init) and saved there, with ``<tag>.json`` beside it."""
    state_path = encoder_state_path(work_dir, tag)
    encoder_cfg = dict(identity["encoder"], use_checkpoint=False)
    torch.manual_seed(seed)
    encoder = head_mod.build_encoder(encoder_cfg)
    if state_path.is_file():
        encoder.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True)["state"])
    else:
        if weights:
            load_encoder_weights(encoder, weights)
        else:
            warn_random_init("cache-features")
        head_mod.save_checkpoint(state_path, {"format": ENCODER_FORMAT, "encoder": encoder_cfg,
                                              "identity": identity, "state": encoder.state_dict()})
    common.atomic_write_json(state_path.parent / f"{tag}.json", identity)
    return encoder


def cache_features(work_dir: Path, *, device: str = "auto", workers: Optional[int] = None,
                   chunk_rows: int = 2048, quiet: bool = False, compile: bool = False,
                   **settings: Any) -> str:
    """Run the frozen encoder over the patch cache; store float16 features ``(N, F)`` per subset.

    ``settings``: the options of ``options.stage_names("features")`` (weights, encoder and pooling, HU window,
    views, batch size, precision, init seed, subsets); those left out take their defaults there.
    ``views`` > 1 stores the features of that many flips of each patch side by side, ``(N, views * F)``:
    train-head then learns from every view (augmentation for a frozen encoder) and validates on their
    average. ``subsets``: default every extracted one except ``test_subsets``, which are never encoded.
    Output beside each subset's index: ``features_<tag>.npy`` (row i = patch i of patches.npy) and
    ``features_<tag>.json``; ``W/features/<tag>.json`` says what made the set (the tag is its name for
    ``train-head --features``). Work is saved in chunks of ``chunk_rows`` patches: an interrupted run
    resumes where it stopped; a finished subset is skipped. ``compile``: the encoder through torch.compile
    (``head.compile_encoder``; like ``device``, not part of what the features are). Returns the tag.
    """
    chosen_settings = {**options_mod.defaults("features"), **options_mod.given("features", settings)}
    options_mod.check("features", chosen_settings)
    return _cache_features(work_dir, device, workers, max(1, int(chunk_rows)), quiet, compile,
                           **chosen_settings)


def _cache_features(work_dir: Path, device: str, workers: Optional[int], chunk_rows: int, quiet: bool,
                    compile: bool, *,
                    weights, feature_size: int, window_size: int, pooling: str, hu_min: float, hu_max: float,
                    init_seed: int, subsets, test_subsets: Sequence[int], batch_size: int, precision: str,
                    views: int) -> str:
    available = extracted_subsets(work_dir)
    chosen = sorted(set(available) - set(test_subsets) if subsets is None else subsets)
    if set(chosen) & set(test_subsets):
        raise UserError(f"subset(s) {common.format_subsets(sorted(set(chosen) & set(test_subsets)))} are "
                        f"test subsets, whose features are never computed; give --test-subsets none (or "
                        f"others) to encode them")
    missing = [k for k in chosen if k not in available]
    if not chosen or missing:
        which = missing[0] if missing else "K"
        raise UserError(f"no patch cache for subset {which} under {Path(work_dir) / 'patches'}; "
                        f"run `python luna_cli.py extract --subset {which}` first")
    caches = {k: read_subset_cache(work_dir, k) for k in chosen}
    torch_device = head_mod.resolve_device(device)
    precision = head_mod.resolve_precision(precision, torch_device)
    identity = feature_identity(encoder_config(feature_size, window_size), pooling, weights, init_seed,
                                hu_min, hu_max, views)
    tag = feature_tag(identity)
    encoder = _prepare_feature_encoder(work_dir, identity, tag, weights, init_seed).to(torch_device).eval()
    extractor = head_mod.Classifier(encoder, nn.Identity(), pooling, identity["encoder"]["input_layout"])
    head_mod.compile_encoder(extractor, compile)
    workers = ((min(4, os.cpu_count() or 1) if torch_device.type == "cuda" else 0) if workers is None
               else workers)
    todo = {k: c for k, c in caches.items() if not features_complete(work_dir, k, tag, len(c))}
    with progress_bar("patches", disable=quiet) as progress:
        task = progress.add_task(f"features {tag}", total=sum(len(c) for c in todo.values()))
        for cache in todo.values():
            _cache_subset_features(work_dir, cache, tag, identity, extractor, torch_device, precision,
                                   batch_size, chunk_rows, workers, lambda n: progress.advance(task, n))
    if not quiet:
        console.print(f"features [bold]{tag}[/] for subset(s) {chosen} ({len(caches) - len(todo)} already up "
                      f"to date); train the head with `python luna_cli.py train-head` (--features {tag})")
    return tag


def features_complete(work_dir: Path, subset: int, tag: str, rows: int) -> bool:
    npy, meta, _ = feature_paths(work_dir, subset, tag)
    if not (npy.is_file() and meta.is_file()):
        return False
    try:
        return (json.loads(meta.read_text()).get("rows") == rows and
                np.load(npy, mmap_mode="r").shape[0] == rows)
    except (OSError, ValueError):
        return False


def _index_digest(cache: SubsetCache, rows: int) -> str:
    """SHA-256 of the first ``rows`` lines of a subset's index.csv: which patches features were made of."""
    with open(cache.folder / "index.csv", "rb") as handle:
        lines = handle.read().splitlines()[1:rows + 1]
    return hashlib.sha256(b"\n".join(lines)).hexdigest()


def _reusable_rows(cache: SubsetCache, npy: Path, meta: Path) -> int:
    """Rows of an earlier feature file that still describe the first rows of the cache (mining only appends
    rows), else 0."""
    try:
        stored = json.loads(meta.read_text())
        rows = int(stored["rows"])
        if rows <= len(cache) and np.load(npy, mmap_mode="r").shape[0] == rows \
                and stored.get("index_sha256") == _index_digest(cache, rows):
            return rows
    except (OSError, ValueError, KeyError):
        pass
    return 0


@torch.no_grad()
def _encode_rows(cache: SubsetCache, rows: np.ndarray, identity: Dict[str, Any],
                 extractor: head_mod.Classifier, device: torch.device, precision: str, batch_size: int,
                 workers: int, advance: Callable[[int], None]) -> np.ndarray:
    """float16 features ``(len(rows), views * F)`` of some rows of one subset's patches."""
    pool = PatchPool({cache.subset: cache}, {cache.subset: np.arange(len(cache))})
    chunk = []
    for hu, _, _ in batch_loader(pool, [rows[b:b + batch_size] for b in range(0, len(rows), batch_size)],
                              workers, device.type == "cuda"):
        x = data.hu_to_unit(hu.to(device, non_blocking=True), identity["hu_min"], identity["hu_max"])

        def encoded(patches: torch.Tensor) -> torch.Tensor:
            with autocast(device, precision):
                views = head_mod.flipped_views(patches, identity.get("views", 1))
                return torch.cat([extractor.forward_features(view) for view in views], dim=1)
        try:
            features = encoded(x)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not head_mod.out_of_memory(err):
                raise
            raise head_mod.batch_too_large(device, batch_size,
                                           lambda b: encoded(head_mod.trial_batch(x, b))) from None
        chunk.append(features.float().cpu().numpy().astype(np.float16))
        advance(len(hu))
    return np.concatenate(chunk)


def _cache_subset_features(work_dir: Path, cache: SubsetCache, tag: str, identity: Dict[str, Any],
                           extractor: head_mod.Classifier, device: torch.device, precision: str,
                           batch_size: int, chunk_rows: int, workers: int,
                           advance: Callable[[int], None]) -> None:
    """Encode the rows of one subset that have no features yet, in resumable chunks, then write the file."""
    npy, meta, parts_dir = feature_paths(work_dir, cache.subset, tag)
    first = _reusable_rows(cache, npy, meta)
    advance(first)
    stat = cache.patches_path.stat()  # parts of an earlier patches.npy are discarded
    parts = common.Parts(parts_dir, {"rows": len(cache), "from": first, "patches_bytes": stat.st_size,
                                   "patches_mtime_ns": stat.st_mtime_ns})
    names = {start: f"rows_{start:010d}" for start in range(first, len(cache), chunk_rows)}
    done = parts.done()
    for start, name in names.items():
        stop = min(start + chunk_rows, len(cache))
        if name in done:
            advance(stop - start)
        else:
            parts.save(name, _encode_rows(cache, np.arange(start, stop), identity, extractor, device,
                                          precision, batch_size, workers, advance))
    blocks = (([np.load(npy, mmap_mode="r")[:first]] if first else [])
              + [parts.load(n) for n in names.values()])
    common.atomic_concatenate_npy(npy, blocks, blocks[0].shape[1:], np.float16)
    common.atomic_write_json(meta, {"format": FEATURE_FORMAT, "tag": tag, "rows": len(cache),
                                  "index_sha256": _index_digest(cache, len(cache)),
                                  "feature_dim": int(blocks[0].shape[1]), "patch_size": cache.patch_size,
                                  "spacing_mm": cache.spacing_mm, "precision": precision,
                                  "encoder_state": str(encoder_state_path(work_dir, tag)), **identity})
    del blocks
    parts.remove()
