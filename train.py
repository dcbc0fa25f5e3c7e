"""Training stage: cached encoder features, the MLP head, and end-to-end fine-tuning.

Input: the patch cache written by ``extract``: ``W/patches/subset{k}/patches.npy`` int16 ``(N, P, P, P)`` HU, array
axes ``[z, y, x]`` along increasing world z, y, x at ``spacing_mm`` voxels, with ``index.csv`` (one row per patch)
and ``manifest.json`` (patch_size, spacing_mm).

Splits are by scan, never by patch: the LUNA16 subsets are the folds (validation ``--val-subsets``, default 8;
test ``--test-subsets``, default 9, never read here; training on every other extracted subset). When the
extracted subsets cannot give both a training and a validation part, the scans (seriesuids) are split 80:20
with a fixed seed instead, and the run says so.

Preprocessing: HU clipped to ``[hu_min, hu_max]`` and scaled to 0..1 with ``data.hu_to_unit``; the default
-1000..1000 HU is the intensity range of the CT pre-training of the published Swin UNETR encoder weights.

Augmentation (fine-tuning only, on the batch tensor): a uniformly random element of the 48 rotations and
reflections of the cube (axis permutation x axis flips), and for positives a random shift of up to
``max_shift_mm`` along each axis. Patches are stored at a fixed size, so a shift moves the content inside the
cube and fills the uncovered border with air (-1000 HU); the candidate stays within a few mm of the centre.

Several processes: ``torchrun --nproc_per_node N -- luna_cli.py finetune ...`` (DistributedDataParallel; the
``--`` stops torchrun from reading ``--run`` as its own ``--run-path``).

Runs are folders ``W/runs/<run>/`` with ``config.json`` (resolved options), ``history.csv`` and
``history.png`` (one row / point per epoch), ``best.pt`` (highest validation AUC) and ``last.pt`` (resume).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text
from torch import nn

import data
import head as head_mod
from data import AIR_HU, UserError

console = Console()

EXTRACT_HINT = "python luna_cli.py extract --subset K"
FEATURE_FORMAT = "luna16-features/1"
ENCODER_FORMAT = "luna16-encoder/1"
RUNTIME_KEYS = ("device", "workers", "stop_after", "quiet")  # options that may change when a run is resumed


# --- patch cache ---------------------------------------------------------------

@dataclass
class SubsetCache:
    """One extracted subset: per-row seriesuid and label (0/1), and its manifest."""
    subset: int
    folder: Path
    manifest: Dict[str, Any]
    seriesuids: np.ndarray
    labels: np.ndarray

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
    """Subset numbers with a complete patch cache (patches.npy, index.csv, manifest.json) under ``W/patches``."""
    root = Path(work_dir) / "patches"
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            match = re.fullmatch(r"subset(\d+)", folder.name)
            if match and all((folder / name).is_file() for name in ("patches.npy", "index.csv", "manifest.json")):
                found.append(int(match.group(1)))
    return sorted(found)


def read_subset_cache(work_dir: Path, subset: int) -> SubsetCache:
    """Read the manifest and index of one subset and check them against the shape of ``patches.npy``."""
    folder = data.subset_dir(work_dir, subset)
    manifest_path, index_path = folder / "manifest.json", folder / "index.csv"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest_path}: unreadable ({err}); run `{EXTRACT_HINT.replace('K', str(subset))}` again")
    for key in ("patch_size", "spacing_mm"):
        if key not in manifest:
            raise UserError(f"{manifest_path}: no '{key}'; run `{EXTRACT_HINT.replace('K', str(subset))}` again")
    seriesuids, labels = [], []
    with open(index_path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"seriesuid", "label"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{index_path}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            if row["label"] not in ("0", "1"):
                raise UserError(f"{index_path}, line {line}: label must be 0 or 1, got {row['label']!r}")
            seriesuids.append(row["seriesuid"])
            labels.append(int(row["label"]))
    patches = np.load(folder / "patches.npy", mmap_mode="r")
    size = int(manifest["patch_size"])
    if patches.ndim != 4 or patches.shape[1:] != (size,) * 3 or patches.dtype != np.int16:
        raise UserError(f"{folder / 'patches.npy'}: expected int16 (N, {size}, {size}, {size}), "
                        f"found {patches.dtype} {patches.shape}")
    if patches.shape[0] != len(labels):
        raise UserError(f"{folder}: patches.npy has {patches.shape[0]} patches but index.csv {len(labels)} rows; "
                        f"run `{EXTRACT_HINT.replace('K', str(subset))}` again")
    return SubsetCache(subset, folder, manifest, np.asarray(seriesuids, dtype=object),
                       np.asarray(labels, dtype=np.int64))


def check_patch_geometry(caches: Dict[int, SubsetCache]) -> Tuple[int, float]:
    """The common (patch_size, spacing_mm) of the subsets; UserError listing each subset's values if they differ."""
    values = {k: (c.patch_size, c.spacing_mm) for k, c in caches.items()}
    if len(set(values.values())) > 1:
        listing = ", ".join(f"subset{k}: patch_size {p}, spacing_mm {s}" for k, (p, s) in sorted(values.items()))
        raise UserError(f"the patch caches were made with different parameters ({listing}); "
                        f"extract them again with the same --patch-size and --spacing")
    return next(iter(values.values()))


def check_preprocess_matches(stored: Dict[str, Any], patch_size: int, spacing_mm: float, source: str) -> None:
    """Refuse a checkpoint whose patch geometry differs from the patch cache's, naming both values."""
    if int(stored["patch_size"]) != patch_size or not math.isclose(float(stored["spacing_mm"]), spacing_mm):
        raise UserError(f"{source} was trained on patches of {stored['patch_size']} voxels at {stored['spacing_mm']} mm, "
                        f"but the patch cache holds {patch_size} voxels at {spacing_mm} mm; extract with the "
                        f"checkpoint's parameters or train a new model")


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
            return {"subsets": sorted(k for k, rows in rows_by_subset.items() if len(rows)), "scans": len(uids),
                    "patches": int(len(labels)), "positives": int(np.sum(labels))}
        return {"method": self.method, "note": self.note, "train": side(self.train), "val": side(self.val)}


def split_by_scan(caches: Dict[int, SubsetCache], val_subsets: Sequence[int], test_subsets: Sequence[int],
                  seed: int = 0, val_fraction: float = 0.2) -> ScanSplit:
    """Split the extracted (non-test) subsets into training and validation rows, never one scan on both sides.

    By subset when the subsets present give both a training and a validation part; otherwise the seriesuids
    of all present subsets are shuffled with ``seed`` and ``val_fraction`` of them go to validation.
    """
    if set(val_subsets) & set(test_subsets):
        raise UserError(f"subsets {sorted(set(val_subsets) & set(test_subsets))} are both validation and test subsets")
    if set(caches) & set(test_subsets):
        raise ValueError("test subsets must not be loaded for training")
    if not caches:
        raise UserError(f"no extracted patch cache outside the test subsets {list(test_subsets)}; "
                        f"run `{EXTRACT_HINT}` first")
    val_present = sorted(k for k in caches if k in val_subsets)
    train_present = sorted(k for k in caches if k not in val_subsets)
    if val_present and train_present:
        train = {k: np.arange(len(caches[k])) for k in train_present}
        val = {k: np.arange(len(caches[k])) for k in val_present}
        shared = set(np.concatenate([caches[k].seriesuids for k in train_present])) & \
            set(np.concatenate([caches[k].seriesuids for k in val_present]))
        if shared:
            raise UserError(f"scan {sorted(shared)[0]} appears in a training and a validation subset "
                            f"({len(shared)} scan(s) in all); the patch caches are inconsistent")
        return ScanSplit(train, val, "subsets", f"validation on subset(s) {val_present}, training on {train_present}")
    uids = sorted(set(np.concatenate([c.seriesuids for c in caches.values()])))
    if len(uids) < 2:
        raise UserError(f"only {len(uids)} scan extracted outside the test subsets; need scans for both training "
                        f"and validation: run `{EXTRACT_HINT}` for more subsets")
    order = np.random.default_rng(seed).permutation(len(uids))
    n_val = min(max(1, int(round(val_fraction * len(uids)))), len(uids) - 1)
    val_uids = {uids[i] for i in order[:n_val]}
    train, val = {}, {}
    for k, cache in sorted(caches.items()):
        in_val = np.isin(cache.seriesuids, list(val_uids))
        train[k], val[k] = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    note = (f"the extracted subsets {sorted(caches)} cannot give both a training and a validation subset "
            f"(validation subsets: {list(val_subsets)}), so the scans are split by seriesuid instead: "
            f"{len(uids) - n_val} for training, {n_val} for validation (seed {seed})")
    return ScanSplit(train, val, "seriesuid", note)


def load_split(work_dir: Path, val_subsets: Sequence[int], test_subsets: Sequence[int],
               seed: int) -> Tuple[Dict[int, SubsetCache], ScanSplit, int, float]:
    """Read every extracted non-test subset, check their patch geometry, split by scan.

    Returns (caches, split, patch_size, spacing_mm). Test subsets are not read at all.
    """
    present = [k for k in extracted_subsets(work_dir) if k not in set(test_subsets)]
    if not present:
        raise UserError(f"no patch cache under {Path(work_dir) / 'patches'} outside the test subsets "
                        f"{list(test_subsets)}; run `{EXTRACT_HINT}` first")
    caches = {k: read_subset_cache(work_dir, k) for k in present}
    patch_size, spacing_mm = check_patch_geometry(caches)
    split = split_by_scan(caches, val_subsets, test_subsets, seed)
    for name, rows_by_subset in (("training", split.train), ("validation", split.val)):
        labels = np.concatenate([caches[k].labels[rows] for k, rows in rows_by_subset.items()] or [[]])
        if len(labels) == 0 or labels.min() == labels.max():
            raise UserError(f"the {name} split ({split.note}) has {int(np.sum(labels == 1))} nodule and "
                            f"{int(np.sum(labels == 0))} non-nodule patches; it needs both: run `{EXTRACT_HINT}` "
                            f"for more subsets or choose other --val-subsets")
    return caches, split, patch_size, spacing_mm


class PatchPool:
    """Selected rows of several subsets' ``patches.npy`` as one sequence, read from the memory-mapped files."""

    def __init__(self, caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray]):
        keys = [k for k in sorted(rows_by_subset) if len(rows_by_subset[k])]
        self.paths = {k: str(caches[k].patches_path) for k in keys}
        self.subset = np.concatenate([np.full(len(rows_by_subset[k]), k) for k in keys] or [np.zeros(0, int)])
        self.row = np.concatenate([np.asarray(rows_by_subset[k]) for k in keys] or [np.zeros(0, int)])
        self.labels = np.concatenate([caches[k].labels[rows_by_subset[k]] for k in keys] or [np.zeros(0, int)])
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
    """Item i = (int16 HU patches ``(B, P, P, P)``, labels ``(B,)``) of the i-th planned batch."""

    def __init__(self, pool: PatchPool, batches: List[np.ndarray]):
        self.pool, self.batches = pool, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        positions = self.batches[i]
        return torch.from_numpy(self.pool.read(positions)), torch.from_numpy(self.pool.labels[positions])


def batch_loader(pool: PatchPool, batches: List[np.ndarray], workers: int, pin: bool):
    return torch.utils.data.DataLoader(BatchReader(pool, batches), batch_size=None, shuffle=False,
                                       num_workers=workers, pin_memory=pin)


# --- sampling --------------------------------------------------------------------

def _seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from the given parts (e.g. run seed, purpose, epoch, rank)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def balanced_sample(labels: np.ndarray, n_samples: int, generator: torch.Generator) -> np.ndarray:
    """``n_samples`` positions drawn with replacement so that each class is drawn half of the time."""
    labels = np.asarray(labels)
    n_pos = int(np.sum(labels == 1))
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"class-balanced sampling needs both classes; found {n_pos} nodules and {n_neg} others")
    weights = torch.from_numpy(np.where(labels == 1, 0.5 / n_pos, 0.5 / n_neg))
    return torch.multinomial(weights, n_samples, replacement=True, generator=generator).numpy()


def epoch_batches(labels: np.ndarray, n_samples: int, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> List[np.ndarray]:
    """This rank's batches of pool positions for one epoch: a class-balanced draw fixed by (seed, epoch),
    padded to a multiple of ``world`` and dealt out round-robin so every rank gets the same number of batches."""
    generator = torch.Generator().manual_seed(_seed_for(seed, "sample", epoch))
    positions = balanced_sample(labels, n_samples, generator)
    padded = int(math.ceil(len(positions) / world)) * world
    positions = np.resize(positions, padded)[rank::world]
    return [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]


# --- augmentation ------------------------------------------------------------------

AXIS_PERMUTATIONS = list(itertools.permutations(range(3)))
N_SYMMETRIES = 48  # 6 axis permutations x 8 flip combinations


def apply_symmetry(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Apply cube symmetry ``ids[b]`` (0..47) to each cube ``x[b]`` of a ``(B, P, P, P)`` batch.

    id = 8 * permutation + flips: the spatial axes are permuted by ``AXIS_PERMUTATIONS[id // 8]``, then
    axis a (0 = z, 1 = y, 2 = x) is reversed when bit a of ``id % 8`` is set.
    """
    if x.ndim != 4 or not (x.shape[1] == x.shape[2] == x.shape[3]):
        raise ValueError(f"expected a batch of cubes (B, P, P, P), got {tuple(x.shape)}")
    ids = ids.to(x.device)
    out = torch.empty_like(x)
    permutation_ids = ids // 8
    for p, axes in enumerate(AXIS_PERMUTATIONS):
        chosen = torch.nonzero(permutation_ids == p).squeeze(1)
        if chosen.numel():
            out[chosen] = x[chosen].permute(0, *(a + 1 for a in axes))
    for axis in range(3):
        chosen = torch.nonzero((ids % 8) >> axis & 1).squeeze(1)
        if chosen.numel():
            out[chosen] = out[chosen].flip(axis + 1)
    return out


def shift_patches(x: torch.Tensor, shifts: torch.Tensor, fill: float = float(AIR_HU)) -> torch.Tensor:
    """Move each cube's content by ``shifts[b]`` voxels along (z, y, x); uncovered voxels become ``fill``.

    ``out[b, z, y, x] = x[b, z - dz, y - dy, x - dx]`` (``fill`` outside the stored patch).
    """
    reach = int(shifts.abs().max()) if shifts.numel() else 0
    if reach == 0:
        return x
    shifts = shifts.to(x.device)
    padded = F.pad(x, (reach,) * 6, value=fill)
    batch = x.shape[0]
    for axis in range(3):
        size = x.shape[axis + 1]
        index = (reach - shifts[:, axis])[:, None] + torch.arange(size, device=x.device)  # (B, size)
        view = [batch, 1, 1, 1]
        view[axis + 1] = size
        target = list(padded.shape)
        target[axis + 1] = size
        padded = torch.gather(padded, axis + 1, index.view(view).expand(target))
    return padded


def augment_batch(hu: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                  max_shift_vox: int = 0) -> torch.Tensor:
    """Random cube symmetry for every patch, random shift of up to ``max_shift_vox`` voxels per axis for
    positives (``labels == 1``). ``hu``: float HU ``(B, P, P, P)``; rows keep their order (labels still apply)."""
    batch = hu.shape[0]
    ids = torch.randint(0, N_SYMMETRIES, (batch,), generator=generator)
    if max_shift_vox > 0:
        shifts = torch.randint(-max_shift_vox, max_shift_vox + 1, (batch, 3), generator=generator)
        shifts *= (labels.detach().cpu() == 1).long()[:, None]
        hu = shift_patches(hu, shifts)
    return apply_symmetry(hu, ids)


def training_inputs(hu: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, hu_min: float,
                    hu_max: float, augment: bool, max_shift_vox: int) -> torch.Tensor:
    """A loaded batch of int16 HU patches ``(B, P, P, P)`` -> model input ``(B, 1, P, P, P)`` in 0..1,
    augmented (``augment_batch``) when ``augment``."""
    hu = hu.float()
    if augment:
        hu = augment_batch(hu, labels, generator, max_shift_vox)
    return data.hu_to_unit(hu, hu_min, hu_max).unsqueeze(1)


# --- metrics -------------------------------------------------------------------------

def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN without both classes."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    unique, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank, tied values share the mean
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cutoff_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float = 0.9) -> float:
    """Highest probability threshold t with sensitivity (share of positives with prob >= t) >= ``target``."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    positives = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = int(math.ceil(target * len(positives) - 1e-9))
    return float(positives[max(needed, 1) - 1])


def threshold_metrics(labels: np.ndarray, probability: np.ndarray, cutoff: float) -> dict:
    """Accuracy, sensitivity and specificity when ``probability >= cutoff`` calls a candidate a nodule."""
    positive = np.asarray(labels).astype(bool)
    called = np.asarray(probability) >= cutoff
    tp, fn = int((called & positive).sum()), int((~called & positive).sum())
    tn, fp = int((~called & ~positive).sum()), int((called & ~positive).sum())
    return {"cutoff": float(cutoff), "accuracy": (tp + tn) / len(positive) if len(positive) else None,
            "sensitivity": tp / (tp + fn) if tp + fn else None, "specificity": tn / (tn + fp) if tn + fp else None,
            "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def binary_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    """Mean BCE loss, and accuracy, sensitivity, specificity at ``threshold`` and ROC AUC of sigmoid(logits);
    NaN where a measure is undefined (history.csv keeps one number per cell)."""
    labels = np.asarray(labels).astype(np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    loss = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    probs = 1.0 / (1.0 + np.exp(-logits))
    at = threshold_metrics(labels, probs, threshold)
    return {"loss": float(loss.mean()) if len(loss) else float("nan"),
            **{key: float("nan") if at[key] is None else float(at[key])
               for key in ("accuracy", "sensitivity", "specificity")},
            "auc": roc_auc(labels, probs)}


# --- devices, precision, processes ------------------------------------------------------

@dataclass
class Dist:
    """This process's place in a (possibly single-process) training job."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA when available else CPU; "cuda" under torchrun -> this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    elif resolved.type != "cpu":
        raise UserError(f"--device: unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 autocast on CUDA GPUs that support it, fp16 (with loss scaling) on older GPUs, fp32 on CPU."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def start_processes(device: str) -> Tuple[Dist, torch.device]:
    """Join the torchrun job when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world <= 1:
        return Dist(), resolved
    import torch.distributed as dist
    owns = False
    if not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
        owns = True
    if resolved.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), resolved


def stop_processes(job: Dist, together: bool = True) -> None:
    """Leave the torchrun job; ``together`` first waits for every rank, since a rank that tears gloo
    down while rank 0 still writes its files can abort the whole job."""
    if job.owns_group:
        import torch.distributed as dist
        if together:
            dist.barrier()
        dist.destroy_process_group()


def gather_objects(job: Dist, obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (just ``[obj]`` in a single process)."""
    if job.world == 1:
        return [obj]
    import torch.distributed as dist
    out: List[Any] = [None] * job.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(job: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if job.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- encoder weights and feature caches ---------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_encoder_weights(encoder: nn.Module, weights: Path) -> Dict[str, Any]:
    """Load pretrained Swin UNETR weights into ``encoder`` via ``swin_encoder.load_pretrained``; UserError when the
    file is missing, not a checkpoint, or does not fit the encoder's configuration."""
    import swin_encoder
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: no such file")
    try:
        report = swin_encoder.load_pretrained(encoder, weights)
    except UserError as err:
        raise UserError(f"--weights {weights}: {err}") from None
    except Exception as err:  # unpickling, zip or shape errors: a file that is not (this kind of) checkpoint
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"--weights {weights} is not a Swin UNETR checkpoint that fits this encoder "
                        f"({type(err).__name__}: {first_line[:300]})") from None
    return report if isinstance(report, dict) else {"report": str(report)}


def warn_random_init(what: str) -> None:
    console.print(f"[bold yellow]WARNING: no --weights given: {what} starts from a RANDOMLY INITIALISED encoder. "
                  f"Pass --weights <Swin UNETR checkpoint> to start from pretrained weights.[/]")


def encoder_config(feature_size: int, window_size: int, grad_checkpoint: bool = False) -> Dict[str, Any]:
    config = dict(head_mod.ENCODER_DEFAULTS)
    config.update(feature_size=int(feature_size), window_size=int(window_size), use_checkpoint=bool(grad_checkpoint))
    return config


def feature_identity(encoder_cfg: Dict[str, Any], pooling: str, weights: Optional[Path], seed: int,
                     hu_min: float, hu_max: float, views: int = 1) -> Dict[str, Any]:
    """What determines cached features: encoder architecture, its weights (file hash, or the random-init seed),
    pooling, HU window and the number of flipped views per patch (named only when above 1)."""
    architecture = {k: v for k, v in encoder_cfg.items() if k != "use_checkpoint"}
    weights_part = ({"weights": str(weights), "weights_sha256": file_sha256(Path(weights))} if weights
                    else {"weights": None, "init_seed": int(seed)})
    views_part = {"views": int(views)} if views > 1 else {}
    return {"encoder": architecture, "pooling": pooling, "hu_min": float(hu_min), "hu_max": float(hu_max),
            **weights_part, **views_part}


VIEW_FLIPS = tuple(tuple(axis for axis, bit in zip((1, 2, 3), bits) if bit)
                   for bits in itertools.product((0, 1), repeat=3))  # flips of the z, y, x axes of (B, P, P, P)


def check_views(views: int) -> int:
    if not 1 <= int(views) <= len(VIEW_FLIPS):
        raise UserError(f"--views must be 1..{len(VIEW_FLIPS)} (flips of the cube), got {views}")
    return int(views)


def view_features(extractor: nn.Module, x: torch.Tensor, views: int) -> torch.Tensor:
    """Features of the first ``views`` flips of unit-scaled patches ``(B, P, P, P)``, side by side:
    ``(B, views * F)``; view 0 is the patch itself."""
    return torch.cat([extractor.forward_features((torch.flip(x, flip) if flip else x).unsqueeze(1))
                      for flip in VIEW_FLIPS[:views]], dim=1)


def feature_tag(identity: Dict[str, Any]) -> str:
    """Short name for one feature identity (the weights path itself does not count, only its content)."""
    key = {k: v for k, v in identity.items() if k != "weights"}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def feature_paths(work_dir: Path, subset: int, tag: str) -> Tuple[Path, Path, Path]:
    """(features .npy, its JSON, the resumable parts folder) beside the subset's index.csv."""
    folder = data.subset_dir(work_dir, subset)
    return folder / f"features_{tag}.npy", folder / f"features_{tag}.json", folder / f"features_{tag}.parts"


def encoder_state_path(work_dir: Path, tag: str) -> Path:
    return Path(work_dir) / "features" / f"encoder_{tag}.pt"


class RateColumn(ProgressColumn):
    """Items per second of a rich progress task."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def progress_bar(unit: str, disable: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
                    TimeRemainingColumn(), console=console, disable=disable, transient=False)


def _prepare_feature_encoder(work_dir: Path, identity: Dict[str, Any], tag: str, weights: Optional[Path],
                             seed: int) -> nn.Module:
    """The frozen encoder for a feature tag: reloaded from ``W/features/encoder_<tag>.pt`` when present,
    else built (pretrained weights or seeded random init) and saved there for train-head."""
    state_path = encoder_state_path(work_dir, tag)
    encoder_cfg = dict(identity["encoder"], use_checkpoint=False)
    torch.manual_seed(seed)
    encoder = head_mod.build_encoder(encoder_cfg)
    if state_path.is_file():
        payload = torch.load(state_path, map_location="cpu", weights_only=True)
        encoder.load_state_dict(payload["state"])
        return encoder
    if weights:
        load_encoder_weights(encoder, weights)
    else:
        warn_random_init("cache-features")
    head_mod.save_checkpoint(state_path, {"format": ENCODER_FORMAT, "encoder": encoder_cfg,
                                          "identity": identity, "state": encoder.state_dict()})
    return encoder


def cache_features(work_dir: Path, *, weights: Optional[Path] = None, feature_size: int = 48, window_size: int = 7,
                   pooling: str = "avg", hu_min: float = -1000.0, hu_max: float = 1000.0, seed: int = 0,
                   subsets: Optional[Sequence[int]] = None, batch_size: int = 32, device: str = "auto",
                   precision: str = "auto", workers: Optional[int] = None, chunk_rows: int = 2048,
                   views: int = 1, quiet: bool = False) -> str:
    """Run the frozen encoder over the patch cache; store float16 features ``(N, F)`` per subset.

    ``views`` > 1 stores the features of that many flips of each patch side by side, ``(N, views * F)``:
    train-head then learns from every view (augmentation for a frozen encoder) and validates on their
    average, as ``evaluate --tta`` scores.

    Output beside each subset's index: ``features_<tag>.npy`` (row i = patch i of patches.npy) and
    ``features_<tag>.json`` (encoder config, weights file and hash, pooling, HU window); the tag names the
    encoder identity so features of different encoders/weights never mix. Work is saved in chunks of
    ``chunk_rows`` patches: an interrupted run resumes where it stopped; a finished subset is skipped.
    Returns the tag.
    """
    if batch_size < 1 or chunk_rows < 1:
        raise ValueError("batch_size and chunk_rows must be positive")
    if pooling not in head_mod.POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(head_mod.POOLINGS)}, got {pooling!r}")
    available = extracted_subsets(work_dir)
    chosen = sorted(available if subsets is None else subsets)
    missing = [k for k in chosen if k not in available]
    if not chosen or missing:
        which = missing[0] if missing else "K"
        raise UserError(f"no patch cache for subset {which} under {Path(work_dir) / 'patches'}; "
                        f"run `python luna_cli.py extract --subset {which}` first")
    caches = {k: read_subset_cache(work_dir, k) for k in chosen}
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    identity = feature_identity(encoder_config(feature_size, window_size), pooling, weights, seed, hu_min, hu_max,
                                check_views(views))
    tag = feature_tag(identity)
    encoder = _prepare_feature_encoder(work_dir, identity, tag, weights, seed).to(torch_device).eval()
    extractor = head_mod.Classifier(encoder, nn.Identity(), pooling)
    workers = (min(4, os.cpu_count() or 1) if torch_device.type == "cuda" else 0) if workers is None else workers
    todo = {k: c for k, c in caches.items() if not _features_complete(work_dir, k, tag, len(c))}
    total = sum(len(c) for c in todo.values())
    with progress_bar("patches", disable=quiet) as progress:
        task = progress.add_task(f"features {tag}", total=total)
        for k, cache in todo.items():
            _cache_subset_features(work_dir, cache, tag, identity, extractor, torch_device, precision,
                                   batch_size, chunk_rows, workers, lambda n: progress.advance(task, n))
    if not quiet:
        done = len(caches) - len(todo)
        console.print(f"features [bold]{tag}[/] for subset(s) {chosen} ({done} already up to date); "
                      f"train the head with `python luna_cli.py train-head` and the same encoder options")
    return tag


def _features_complete(work_dir: Path, subset: int, tag: str, rows: int) -> bool:
    npy, meta, _ = feature_paths(work_dir, subset, tag)
    if not (npy.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("rows") == rows and np.load(npy, mmap_mode="r").shape[0] == rows
    except (OSError, ValueError):
        return False


@torch.no_grad()
def _cache_subset_features(work_dir: Path, cache: SubsetCache, tag: str, identity: Dict[str, Any],
                           extractor: head_mod.Classifier, device: torch.device, precision: str, batch_size: int,
                           chunk_rows: int, workers: int, advance: Callable[[int], None]) -> None:
    npy, meta, parts = feature_paths(work_dir, cache.subset, tag)
    stat = cache.patches_path.stat()
    source = {"rows": len(cache), "patches_bytes": stat.st_size, "patches_mtime_ns": stat.st_mtime_ns}
    marker = parts / "source.json"
    if parts.is_dir() and (not marker.is_file() or json.loads(marker.read_text()) != source):
        shutil.rmtree(parts)  # parts of an earlier patches.npy: start again
    parts.mkdir(parents=True, exist_ok=True)
    data.atomic_write_json(marker, source)
    pool = PatchPool({cache.subset: cache}, {cache.subset: np.arange(len(cache))})
    starts = list(range(0, len(cache), chunk_rows))
    for start in starts:
        part = parts / f"rows_{start:010d}.npy"
        stop = min(start + chunk_rows, len(cache))
        if part.is_file():
            advance(stop - start)
            continue
        batches = [np.arange(b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)]
        chunk = []
        for hu, _ in batch_loader(pool, batches, workers, device.type == "cuda"):
            x = data.hu_to_unit(hu.to(device, non_blocking=True), identity["hu_min"], identity["hu_max"])
            with autocast(device, precision):
                features = view_features(extractor, x, identity.get("views", 1))
                chunk.append(features.float().cpu().numpy().astype(np.float16))
            advance(len(hu))
        data.atomic_save_npy(part, np.concatenate(chunk))
    blocks = [np.load(parts / f"rows_{start:010d}.npy", mmap_mode="r") for start in starts]
    data.atomic_concatenate_npy(npy, blocks, blocks[0].shape[1:], np.float16)
    data.atomic_write_json(meta, {"format": FEATURE_FORMAT, "tag": tag, "rows": len(cache),
                                  "feature_dim": int(blocks[0].shape[1]), "patch_size": cache.patch_size,
                                  "spacing_mm": cache.spacing_mm, "precision": precision,
                                  "encoder_state": str(encoder_state_path(work_dir, tag)), **identity})
    shutil.rmtree(parts, ignore_errors=True)


# --- runs: folders, history, plots ------------------------------------------------------------

PLOT_INTERVAL_S = 10.0  # history.png is redrawn at most this often (and after the last epoch)
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_sensitivity", "val_specificity",
                   "val_auc", "cutoff", "lr", "seconds"]


def runs_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "runs"


def resolve_run_dir(work_dir: Path, run: str) -> Path:
    """A run name under ``W/runs`` or a path to a run folder / checkpoint file -> the run folder."""
    candidate = Path(run)
    if candidate.suffix == ".pt":
        return candidate.parent
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate
    return runs_dir(work_dir) / run


def write_history(run_dir: Path, history: List[Dict[str, float]], plot: bool = True) -> None:
    """history.csv (atomic rewrite) and, with ``plot``, history.png: training loss and validation
    accuracy/AUC per epoch."""
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(str(row[c]) if c == "epoch" else repr(float(row[c])) for c in HISTORY_COLUMNS))
    data.atomic_write_text(run_dir / "history.csv", "\n".join(lines) + "\n")
    if plot:
        plot_history(run_dir / "history.png", history)


def read_history(path: Path) -> List[Dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]


def plot_history(path: Path, history: List[Dict[str, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="training loss")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "s--", label="validation loss")
    from matplotlib.ticker import MaxNLocator
    for axis in (ax_loss, ax_val):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("binary cross-entropy")
    ax_loss.legend()
    ax_val.plot(epochs, [row["val_accuracy"] for row in history], "o-", label="validation accuracy (0.5)")
    ax_val.plot(epochs, [row["val_auc"] for row in history], "s-", label="validation ROC AUC")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylim(0.0, 1.02)
    ax_val.legend(loc="lower right")
    fig.tight_layout()
    data.atomic_save_figure(fig, path, dpi=100)


def rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as weights_only-safe values."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss],
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % (2 ** 32))
    torch.manual_seed(seed + rank)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor per optimiser step: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# --- the training loop -----------------------------------------------------------------------------

@dataclass
class Fit:
    """Everything the shared loop needs; ``module`` is trained, ``classifier`` is what checkpoints hold."""
    run_dir: Path
    options: Dict[str, Any]
    classifier: head_mod.Classifier
    module: nn.Module
    train_batches: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor]]]
    n_train_batches: int
    val_logits: Callable[[], Tuple[np.ndarray, np.ndarray]]
    base_payload: Dict[str, Any]
    device: torch.device
    precision: str
    job: Dist


class NonFiniteLoss(UserError):
    pass


def _train_epoch(fit: Fit, epoch: int, optimizer, scheduler, scaler, progress, task) -> float:
    """One epoch over this rank's planned batches; returns the mean training loss over all ranks."""
    accumulate = int(fit.options["accumulate"])
    n = fit.n_train_batches
    fit.module.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=fit.device)
    count = torch.zeros((), dtype=torch.float64, device=fit.device)
    bad = torch.zeros((), dtype=torch.int64, device=fit.device)
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(fit.train_batches(epoch)):
        group_start = (i // accumulate) * accumulate
        group_size = min(accumulate, n - group_start)
        group_end = i + 1 == group_start + group_size
        sync = contextlib.nullcontext()
        if fit.job.world > 1 and not group_end and hasattr(fit.module, "no_sync"):
            sync = fit.module.no_sync()
        with sync:
            with autocast(fit.device, fit.precision):
                logits = fit.module(x)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
            scaler.scale(loss / group_size).backward()
        bad += (~torch.isfinite(loss.detach())).long()
        loss_sum += loss.detach().double() * len(y)
        count += len(y)
        if group_end:
            if fit.job.world > 1:
                import torch.distributed as dist
                dist.all_reduce(bad)
            if bad.item():
                raise NonFiniteLoss(f"the training loss became NaN/inf in epoch {epoch} (batch {i + 1}); stopped")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if progress is not None:
            progress.advance(task)
    if fit.job.world > 1:
        import torch.distributed as dist
        totals = torch.stack([loss_sum, count])
        dist.all_reduce(totals)
        loss_sum, count = totals[0], totals[1]
    return float(loss_sum / count.clamp(min=1))


def _checkpoint_payload(fit: Fit, epoch: int, metrics: Dict[str, float], cutoff: float) -> Dict[str, Any]:
    return {**fit.base_payload, "model": {k: v.detach().cpu() for k, v in fit.classifier.state_dict().items()},
            "cutoff": float(cutoff), "epoch": int(epoch), "metrics": dict(metrics)}


def run_fit(fit: Fit, resume_payload: Optional[Dict[str, Any]] = None,
            stop_after: Optional[int] = None) -> List[Dict[str, float]]:
    """AdamW with warm-up + cosine decay; per epoch validate, write history and checkpoints (rank 0).

    Stops after ``epochs`` (or ``stop_after`` epochs in this call, or ``patience`` epochs without a better
    validation AUC). Returns the history.
    """
    opts = fit.options
    params = [p for p in fit.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    steps_per_epoch = int(math.ceil(fit.n_train_batches / opts["accumulate"]))
    total_steps = steps_per_epoch * opts["epochs"]
    warmup_steps = max(1, min(int(round(opts["warmup_epochs"] * steps_per_epoch)), total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=fit.precision == "fp16")
    history: List[Dict[str, float]] = []
    best_auc, best_epoch, start_epoch = -math.inf, 0, 0
    if resume_payload is not None:
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
        scaler.load_state_dict(resume_payload["scaler"])
        history = list(resume_payload["history"])
        best_auc, best_epoch = resume_payload["best_auc"], resume_payload["best_epoch"]
        start_epoch = int(resume_payload["epoch"])
        states = resume_payload["rng"]
        if len(states) == fit.job.world:
            set_rng_state(states[fit.job.rank])
        elif fit.job.main:
            console.print(f"[yellow]the run was saved with {len(states)} process(es), now {fit.job.world}: "
                          f"random streams restart from the seed[/]")
    epochs_run, last_plot, plotted = 0, -math.inf, len(history)
    for epoch in range(start_epoch + 1, opts["epochs"] + 1):
        if stop_after is not None and epochs_run >= stop_after:
            break
        if opts["patience"] and epoch - 1 - best_epoch >= opts["patience"]:
            if fit.job.main:
                console.print(f"early stop: no better validation AUC for {opts['patience']} epochs "
                              f"(best {best_auc:.4f} at epoch {best_epoch})")
            break
        started = time.perf_counter()
        with progress_bar("batches", disable=not fit.job.main or opts.get("quiet", False)) as progress:
            task = progress.add_task(f"epoch {epoch}/{opts['epochs']}", total=fit.n_train_batches)
            try:
                train_loss = _train_epoch(fit, epoch, optimizer, scheduler, scaler, progress, task)
            except NonFiniteLoss as err:
                raise NonFiniteLoss(f"{err}; {_kept_message(fit.run_dir, start_epoch + epochs_run)}; "
                                    f"try a lower --lr") from None
        logits, labels = fit.val_logits()
        metrics = binary_metrics(labels, logits)
        probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        cutoff = cutoff_for_sensitivity(labels, probs, opts["target_sensitivity"])
        if not (math.isfinite(train_loss) and math.isfinite(metrics["loss"])):
            raise NonFiniteLoss(f"a loss became NaN/inf in epoch {epoch}; "
                                f"{_kept_message(fit.run_dir, start_epoch + epochs_run)}; try a lower --lr")
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": metrics["loss"],
               "val_accuracy": metrics["accuracy"], "val_sensitivity": metrics["sensitivity"],
               "val_specificity": metrics["specificity"], "val_auc": metrics["auc"], "cutoff": cutoff,
               "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        history.append(row)
        improved = metrics["auc"] > best_auc
        if improved:
            best_auc, best_epoch = metrics["auc"], epoch
        rng_states = gather_objects(fit.job, rng_state())
        if fit.job.main:
            payload = _checkpoint_payload(fit, epoch, metrics, cutoff)
            if improved:
                head_mod.save_checkpoint(fit.run_dir / "best.pt", payload)
            payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                           scaler=scaler.state_dict(), history=history, best_auc=best_auc, best_epoch=best_epoch,
                           rng=rng_states, world_size=fit.job.world, sampler={"seed": opts["seed"], "epoch": epoch})
            head_mod.save_checkpoint(fit.run_dir / "last.pt", payload)
            plot = epoch == opts["epochs"] or time.perf_counter() - last_plot >= PLOT_INTERVAL_S
            write_history(fit.run_dir, history, plot)
            if plot:
                last_plot, plotted = time.perf_counter(), len(history)
            if not opts.get("quiet", False):
                console.print(f"epoch {epoch}/{opts['epochs']}: train loss {train_loss:.4f} | val loss "
                              f"{metrics['loss']:.4f} acc {metrics['accuracy']:.3f} sens {metrics['sensitivity']:.3f} "
                              f"spec {metrics['specificity']:.3f} AUC {metrics['auc']:.4f}"
                              + (" [green](best)[/]" if improved else ""))
        epochs_run += 1
    if fit.job.main and history and plotted != len(history):
        plot_history(fit.run_dir / "history.png", history)
    return history


def _kept_message(run_dir: Path, last_epoch: int) -> str:
    if last_epoch > 0:
        return f"the last good checkpoint {run_dir / 'last.pt'} (epoch {last_epoch}) is kept"
    return "no checkpoint had been written yet"


# --- run set-up shared by train-head and finetune ----------------------------------------------------

def _check_options(options: Dict[str, Any]) -> None:
    for key in ("epochs", "batch_size", "accumulate"):
        if int(options[key]) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {options[key]}")
    if not options["lr"] > 0:
        raise UserError(f"--lr must be positive, got {options['lr']}")
    if options["hu_max"] <= options["hu_min"]:
        raise UserError(f"--hu-max ({options['hu_max']}) must be greater than --hu-min ({options['hu_min']})")
    if options["pooling"] not in head_mod.POOLINGS:
        raise UserError(f"--pooling must be one of {', '.join(head_mod.POOLINGS)}, got {options['pooling']!r}")
    if options["epoch_samples"] < 0 or options["patience"] < 0:
        raise UserError("--epoch-samples and --patience cannot be negative")


def _open_run(work_dir: Path, kind: str, options: Dict[str, Any], run: Optional[str], resume: bool,
              job: Dist) -> Tuple[Path, Dict[str, Any], Optional[Dict[str, Any]]]:
    """Resolve the run folder; when resuming, return the saved options (runtime keys from this call) and
    the ``last.pt`` payload."""
    if resume:
        if run is None:
            candidates = sorted(runs_dir(work_dir).glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
            candidates = [p for p in candidates if _run_kind(p.parent) == kind]
            if not candidates:
                raise UserError(f"--resume: no {kind} run with a last.pt under {runs_dir(work_dir)}")
            run_dir = candidates[-1].parent
        else:
            run_dir = resolve_run_dir(work_dir, run)
        if not (run_dir / "last.pt").is_file():
            raise UserError(f"--resume: {run_dir} has no last.pt to continue from")
        saved = json.loads((run_dir / "config.json").read_text())
        if saved.get("kind") != kind:
            raise UserError(f"--resume: {run_dir} is a {saved.get('kind')} run, not {kind}")
        resumed = dict(saved["options"])
        resumed.update({k: options[k] for k in RUNTIME_KEYS if k in options})
        payload = head_mod.read_checkpoint(run_dir / "last.pt")
        if job.main:
            console.print(f"resuming {run_dir} after epoch {payload['epoch']} (saved options are used)")
        return run_dir, resumed, payload
    name = broadcast_object(job, run or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = resolve_run_dir(work_dir, name) if run else runs_dir(work_dir) / name
    if (run_dir / "last.pt").exists():
        raise UserError(f"run folder {run_dir} already holds a run; add --resume to continue it or choose "
                        f"another --run name")
    return run_dir, options, None


def _run_kind(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("kind")
    except (OSError, ValueError):
        return None


def _write_config(run_dir: Path, kind: str, options: Dict[str, Any], resolved: Dict[str, Any]) -> None:
    data.atomic_write_json(run_dir / "config.json", {"kind": kind, "options": options, "resolved": resolved})


def _preprocess(patch_size: int, spacing_mm: float, options: Dict[str, Any]) -> Dict[str, Any]:
    return {"patch_size": int(patch_size), "spacing_mm": float(spacing_mm),
            "hu_min": float(options["hu_min"]), "hu_max": float(options["hu_max"])}


# --- train-head ---------------------------------------------------------------------------------

def train_head(work_dir: Path, *, weights: Optional[Path] = None, feature_size: int = 48, window_size: int = 7,
               pooling: str = "avg", hu_min: float = -1000.0, hu_max: float = 1000.0,
               val_subsets: Sequence[int] = (8,), test_subsets: Sequence[int] = (9,), epochs: int = 100,
               batch_size: int = 256, accumulate: int = 1, lr: float = 1e-3, weight_decay: float = 1e-4,
               warmup_epochs: float = 1.0, patience: int = 10, epoch_samples: int = 0, seed: int = 0,
               target_sensitivity: float = 0.9, run: Optional[str] = None, resume: bool = False,
               device: str = "cpu", stop_after: Optional[int] = None, views: int = 1, quiet: bool = False) -> Path:
    """Train the MLP head on cached encoder features (see ``cache_features``; same encoder options select them).

    With ``views`` > 1 every cached flip of a training patch is a training sample, and a validation patch
    scores the average probability of its views.

    Class-balanced sampling, early stopping on validation AUC (``patience`` epochs; 0 = off). The run folder
    holds ``best.pt``/``last.pt`` with the full classifier (frozen encoder + head), so ``head.load_classifier``
    and ``finetune --head-from`` need nothing else. Returns the run folder.
    """
    options = dict(weights=str(weights) if weights else None, feature_size=feature_size, window_size=window_size,
                   pooling=pooling, hu_min=hu_min, hu_max=hu_max, val_subsets=list(val_subsets),
                   test_subsets=list(test_subsets), epochs=epochs, batch_size=batch_size, accumulate=accumulate,
                   lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, patience=patience,
                   epoch_samples=epoch_samples, seed=seed, target_sensitivity=target_sensitivity, device=device,
                   stop_after=stop_after, quiet=quiet, views=check_views(views))
    _check_options(options)
    job = Dist()
    run_dir, options, resume_payload = _open_run(work_dir, "train-head", options, run, resume, job)
    torch_device = resolve_device(options["device"])
    caches, split, patch_size, spacing_mm = load_split(work_dir, options["val_subsets"], options["test_subsets"],
                                                       options["seed"])
    weights_path = Path(options["weights"]) if options["weights"] else None
    views = options.get("views", 1)
    identity = feature_identity(encoder_config(options["feature_size"], options["window_size"]), options["pooling"],
                                weights_path, options["seed"], options["hu_min"], options["hu_max"], views)
    tag = feature_tag(identity)
    train_x, train_y = _load_features(work_dir, caches, split.train, tag, options)
    val_x, val_y = _load_features(work_dir, caches, split.val, tag, options)
    # One training sample per view; validation keeps a patch's views together: (N, views, F).
    train_x = train_x.reshape(len(train_y) * views, -1)
    train_y = train_y.repeat_interleave(views)
    val_x = val_x.reshape(len(val_y), views, -1)
    preprocess = _preprocess(patch_size, spacing_mm, options)
    config = head_mod.resolve_config({"encoder": dict(identity["encoder"], use_checkpoint=False),
                                      "pooling": options["pooling"], "patch_size": patch_size})
    if head_mod.feature_dim(config) != train_x.shape[1]:
        raise UserError(f"cached features {tag} have {train_x.shape[1]} values per patch, the model expects "
                        f"{head_mod.feature_dim(config)}; run cache-features again")
    seed_everything(options["seed"])
    classifier = head_mod.build_classifier(config)
    state = torch.load(encoder_state_path(work_dir, tag), map_location="cpu", weights_only=True)
    classifier.encoder.load_state_dict(state["state"])
    if resume_payload is not None:
        check_preprocess_matches(resume_payload["preprocess"], patch_size, spacing_mm, str(run_dir / "last.pt"))
        classifier.load_state_dict(head_mod.strip_module_prefix(resume_payload["model"]))
    else:
        classifier.head.set_standardisation(train_x)
    classifier.encoder.requires_grad_(False)
    classifier.to(torch_device)
    module = classifier.head
    n_samples = options["epoch_samples"] or len(train_y)
    n_batches = int(math.ceil(n_samples / options["batch_size"]))

    def train_batches(epoch: int):
        for positions in epoch_batches(train_y.numpy(), n_samples, options["batch_size"], options["seed"], epoch):
            index = torch.from_numpy(positions)
            yield train_x[index].to(torch_device).float(), train_y[index].to(torch_device).float()

    @torch.no_grad()
    def val_logits():
        module.eval()
        chunks = [torch.sigmoid(module(val_x[i:i + 4096].to(torch_device).float()).float()).mean(dim=1).cpu()
                  for i in range(0, len(val_y), 4096)]
        return torch.logit(torch.cat(chunks).double(), eps=1e-12).numpy(), val_y.numpy()

    if split.method == "seriesuid" and not quiet:
        console.print(f"[yellow]{split.note}[/]")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"device": str(torch_device), "precision": "fp32", "feature_tag": tag, "split": split.summary(caches),
                "preprocess": preprocess, "config": config, "world_size": 1}
    _write_config(run_dir, "train-head", options, resolved)
    base = {"format": head_mod.CHECKPOINT_FORMAT, "kind": "train-head", "run": run_dir.name, "config": config,
            "preprocess": preprocess, "feature_tag": tag, "weights": options["weights"]}
    fit = Fit(run_dir, options, classifier, module, train_batches, n_batches, val_logits, base, torch_device,
              "fp32", job)
    run_fit(fit, resume_payload, options.get("stop_after"))
    return run_dir


def _load_features(work_dir: Path, caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray], tag: str,
                   options: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    """float16 features ``(N, F)`` and float labels ``(N,)`` of the selected rows, in subset order."""
    features, labels = [], []
    for k, rows in sorted(rows_by_subset.items()):
        if not len(rows):
            continue
        if not _features_complete(work_dir, k, tag, len(caches[k])):
            hint = (f"python luna_cli.py cache-features --subset {k} --feature-size {options['feature_size']} "
                    f"--window-size {options['window_size']} --pooling {options['pooling']}"
                    + (f" --weights {options['weights']}" if options["weights"] else f" --seed {options['seed']}")
                    + (f" --views {options['views']}" if options.get("views", 1) > 1 else ""))
            raise UserError(f"no cached features for these encoder settings (tag {tag}) in subset {k}; "
                            f"run `{hint}` first")
        array = np.load(feature_paths(work_dir, k, tag)[0], mmap_mode="r")
        features.append(np.asarray(array[np.sort(rows)]))
        labels.append(caches[k].labels[np.sort(rows)])
    return torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(labels).astype(np.float32))


# --- finetune ------------------------------------------------------------------------------------

def finetune(work_dir: Path, *, epochs: int = 30, batch_size: int = 32, accumulate: int = 1, lr: float = 1e-4,
             weight_decay: float = 1e-5, warmup_epochs: float = 1.0, feature_size: int = 48, window_size: int = 7,
             pooling: str = "avg", grad_checkpoint: bool = False, weights: Optional[Path] = None,
             head_from: Optional[str] = None, val_subsets: Sequence[int] = (8,), test_subsets: Sequence[int] = (9,),
             hu_min: float = -1000.0, hu_max: float = 1000.0, augment: bool = True, max_shift_mm: float = 3.0,
             precision: str = "auto", patience: int = 0, epoch_samples: int = 0, seed: int = 0,
             target_sensitivity: float = 0.9, run: Optional[str] = None, resume: bool = False, device: str = "auto",
             workers: Optional[int] = None, stop_after: Optional[int] = None, quiet: bool = False) -> Path:
    """Train encoder + head end to end on the patch cache; returns the run folder.

    Starts from ``weights`` (pretrained Swin UNETR encoder; random init with a warning when absent) and
    optionally from a trained run's classifier (``head_from``: its head, and its encoder too unless ``weights``
    is given). Class-balanced sampling, the 48 cube symmetries and small shifts of positives, AdamW with
    warm-up then cosine decay, mixed precision on GPUs, ``batch_size`` per process x ``accumulate`` steps of
    gradient accumulation x processes (torchrun: DistributedDataParallel, rank 0 writes files).
    ``stop_after`` ends this call after that many epochs (``resume`` continues the same run exactly).
    """
    options = dict(epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr, weight_decay=weight_decay,
                   warmup_epochs=warmup_epochs, feature_size=feature_size, window_size=window_size, pooling=pooling,
                   grad_checkpoint=grad_checkpoint, weights=str(weights) if weights else None,
                   head_from=str(head_from) if head_from else None, val_subsets=list(val_subsets),
                   test_subsets=list(test_subsets), hu_min=hu_min, hu_max=hu_max, augment=augment,
                   max_shift_mm=max_shift_mm, precision=precision, patience=patience, epoch_samples=epoch_samples,
                   seed=seed, target_sensitivity=target_sensitivity, device=device, workers=workers,
                   stop_after=stop_after, quiet=quiet)
    _check_options(options)
    job, torch_device = start_processes(device)
    try:
        run_dir = _finetune(work_dir, options, run, resume, job, torch_device)
    except BaseException:
        stop_processes(job, together=False)  # a failed rank must not wait for the others
        raise
    stop_processes(job)
    return run_dir


def _finetune(work_dir: Path, options: Dict[str, Any], run: Optional[str], resume: bool, job: Dist,
              torch_device: torch.device) -> Path:
    run_dir, options, resume_payload = _open_run(work_dir, "finetune", options, run, resume, job)
    precision = resolve_precision(options["precision"], torch_device)
    caches, split, patch_size, spacing_mm = load_split(work_dir, options["val_subsets"], options["test_subsets"],
                                                       options["seed"])
    preprocess = _preprocess(patch_size, spacing_mm, options)
    seed_everything(options["seed"])
    classifier, config, sources = _finetune_model(work_dir, options, resume_payload, run_dir, patch_size,
                                                  spacing_mm, job)
    seed_everything(options["seed"], job.rank)
    classifier.to(torch_device)
    module: nn.Module = classifier
    if job.world > 1:
        module = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
    train_pool, val_pool = PatchPool(caches, split.train), PatchPool(caches, split.val)
    workers = options["workers"]
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // job.world)) if torch_device.type == "cuda" else 0
    pin = torch_device.type == "cuda"
    n_samples = options["epoch_samples"] or len(train_pool)
    per_rank = int(math.ceil(n_samples / job.world))
    n_batches = int(math.ceil(per_rank / options["batch_size"]))
    max_shift_vox = int(round(options["max_shift_mm"] / spacing_mm)) if options["augment"] else 0

    def train_batches(epoch: int):
        batches = epoch_batches(train_pool.labels, n_samples, options["batch_size"], options["seed"], epoch,
                                job.rank, job.world)
        generator = torch.Generator().manual_seed(_seed_for(options["seed"], "augment", epoch, job.rank))
        for hu, labels in batch_loader(train_pool, batches, workers, pin):
            y = labels.to(torch_device, non_blocking=True).float()
            x = training_inputs(hu.to(torch_device, non_blocking=True), y, generator, options["hu_min"],
                                options["hu_max"], options["augment"], max_shift_vox)
            yield x, y

    @torch.no_grad()
    def val_logits():
        classifier.eval()
        mine = np.arange(len(val_pool))[job.rank::job.world]
        batches = [mine[i:i + options["batch_size"]] for i in range(0, len(mine), options["batch_size"])]
        logits = []
        for hu, _ in batch_loader(val_pool, batches, workers, pin):
            x = data.hu_to_unit(hu.to(torch_device, non_blocking=True), options["hu_min"], options["hu_max"])
            with autocast(torch_device, precision):
                logits.append(classifier(x.unsqueeze(1)).float().cpu().numpy())
        mine_logits = np.concatenate(logits) if logits else np.zeros(0)
        gathered = gather_objects(job, (mine_logits, val_pool.labels[mine]))
        return np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])

    if job.main:
        if split.method == "seriesuid":
            console.print(f"[yellow]{split.note}[/]")
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"device": str(torch_device), "precision": precision, "world_size": job.world,
                    "effective_batch": options["batch_size"] * options["accumulate"] * job.world,
                    "workers": workers, "max_shift_vox": max_shift_vox, "split": split.summary(caches),
                    "preprocess": preprocess, "config": config, "sources": sources}
        _write_config(run_dir, "finetune", options, resolved)
    base = {"format": head_mod.CHECKPOINT_FORMAT, "kind": "finetune", "run": run_dir.name, "config": config,
            "preprocess": preprocess, "sources": sources}
    fit = Fit(run_dir, options, classifier, module, train_batches, n_batches, val_logits, base, torch_device,
              precision, job)
    run_fit(fit, resume_payload, options.get("stop_after"))
    return run_dir


def _finetune_model(work_dir: Path, options: Dict[str, Any], resume_payload: Optional[Dict[str, Any]],
                    run_dir: Path, patch_size: int, spacing_mm: float,
                    job: Dist) -> Tuple[head_mod.Classifier, Dict[str, Any], Dict[str, Any]]:
    """Build the classifier: from last.pt when resuming, else from --head-from and/or --weights."""
    if resume_payload is not None:
        check_preprocess_matches(resume_payload["preprocess"], patch_size, spacing_mm, str(run_dir / "last.pt"))
        classifier = head_mod.build_classifier(resume_payload["config"])
        classifier.load_state_dict(head_mod.strip_module_prefix(resume_payload["model"]))
        return classifier, head_mod.resolve_config(resume_payload["config"]), resume_payload.get("sources", {})
    config = head_mod.resolve_config({"encoder": encoder_config(options["feature_size"], options["window_size"],
                                                                options["grad_checkpoint"]),
                                      "pooling": options["pooling"], "patch_size": patch_size})
    sources: Dict[str, Any] = {"weights": options["weights"], "head_from": None}
    head_payload = None
    if options["head_from"]:
        head_dir = resolve_run_dir(work_dir, options["head_from"])
        head_file = Path(options["head_from"]) if options["head_from"].endswith(".pt") else head_dir / "best.pt"
        head_payload = head_mod.read_checkpoint(head_file)
        check_preprocess_matches(head_payload["preprocess"], patch_size, spacing_mm, str(head_file))
        stored = head_mod.resolve_config(head_payload["config"])
        config = dict(stored, encoder=dict(stored["encoder"], use_checkpoint=options["grad_checkpoint"]))
        if job.main and (stored["encoder"]["feature_size"], stored["encoder"]["window_size"], stored["pooling"]) != \
                (options["feature_size"], options["window_size"], options["pooling"]):
            console.print(f"[yellow]--head-from {head_file}: using its model configuration (feature_size "
                          f"{stored['encoder']['feature_size']}, window_size {stored['encoder']['window_size']}, "
                          f"pooling {stored['pooling']})[/]")
        sources["head_from"] = str(head_file)
    classifier = head_mod.build_classifier(config)
    if head_payload is not None:
        try:
            classifier.load_state_dict(head_mod.strip_module_prefix(head_payload["model"]))
        except RuntimeError as err:
            raise UserError(f"--head-from {sources['head_from']}: weights do not fit its configuration ({err})")
    if options["weights"]:
        report = load_encoder_weights(classifier.encoder, Path(options["weights"]))
        sources["weights_report"] = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}
    elif head_payload is None and job.main:
        warn_random_init("finetune")
    return classifier, config, sources
