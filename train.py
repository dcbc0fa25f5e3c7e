"""Training stage: cached encoder features, the MLP head, and end-to-end fine-tuning.

Input: the patch cache written by ``extract``: ``W/patches/subset{k}/patches.npy`` int16 ``(N, P, P, P)`` HU,
array axes ``[z, y, x]`` along increasing world z, y, x at ``spacing_mm`` voxels, with ``index.csv`` (one row
per patch) and ``manifest.json`` (patch_size, spacing_mm).

Splits are by scan, never by patch: the LUNA16 subsets are the folds (validation ``--val-subsets``, default 8;
test ``--test-subsets``, default 9, never read here; training on every other extracted subset). Named subsets
must be extracted; ``--val-subsets auto`` splits the training scans (seriesuids) 80:20 with a fixed seed.

Preprocessing: HU clipped to ``[hu_min, hu_max]`` and scaled to 0..1 with ``data.hu_to_unit``; the default
-1000..1000 HU is the intensity range of the CT pre-training of the published Swin UNETR encoder weights.

Augmentation (fine-tuning only, on the batch tensor), the same for every class: one of the 8 flips of the
cube (the flips train-head's views and evaluation average over), and a random shift of up to ``max_shift_mm``
along each axis. Patches are stored at a fixed size, so a shift moves the content inside the cube and repeats
its edge voxels over the uncovered border; the candidate stays within a few mm of the centre.

Several processes: ``torchrun --nproc_per_node N -- luna_cli.py finetune ...`` (DistributedDataParallel; the
``--`` stops torchrun from reading ``--run`` as its own ``--run-path``).

Each run is a folder (``runs.py``): ``best.pt`` holds the epoch of highest validation AUC and ``last.pt`` the
one to resume from. A resumed run keeps the options it was started with: options given again must equal them
(``--epochs`` included, since it fixes the learning-rate schedule); device, workers and quiet may change.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import calibration
import common
import froc
import head as head_mod
import options as options_mod
import runs
from common import UserError
from features import (PatchPool, SubsetCache, batch_loader, cache_features_hint, check_preprocess_matches,
                      choose_feature_set, encoder_config, encoder_state_path, feature_paths,
                      features_complete, load_encoder_weights, load_split, progress_bar, training_inputs,
                      warn_random_init)
from head import autocast

console = Console()

HEAD_DEFAULTS: Dict[str, Any] = options_mod.defaults("head")
FINETUNE_DEFAULTS: Dict[str, Any] = options_mod.defaults("finetune")


# --- patch cache ---------------------------------------------------------------

# --- sampling --------------------------------------------------------------------

def _seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from the given parts (e.g. run seed, purpose, epoch, rank)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def balanced_sample(labels: np.ndarray, n_samples: int, generator: torch.Generator,
                    positive_share: float = 0.5) -> np.ndarray:
    """``n_samples`` positions drawn with replacement, positives ``positive_share`` of the time."""
    labels = np.asarray(labels)
    n_pos = int(np.sum(labels == 1))
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"class-balanced sampling needs both classes; found {n_pos} nodules "
                        f"and {n_neg} others")
    weights = torch.from_numpy(np.where(labels == 1, positive_share / n_pos, (1.0 - positive_share) / n_neg))
    return torch.multinomial(weights, n_samples, replacement=True, generator=generator).numpy()


def epoch_batches(labels: np.ndarray, n_samples: int, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1, positive_share: float = 0.5) -> List[np.ndarray]:
    """This rank's batches of pool positions for one epoch: a class-balanced draw fixed by (seed, epoch),
    padded to a multiple of ``world`` and dealt out round-robin so every rank gets the same number of
    batches."""
    generator = torch.Generator().manual_seed(_seed_for(seed, "sample", epoch))
    positions = balanced_sample(labels, n_samples, generator, positive_share)
    padded = int(math.ceil(len(positions) / world)) * world
    positions = np.resize(positions, padded)[rank::world]
    return [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]


# --- the size output ------------------------------------------------------------------

@dataclass
class ValOutputs:
    """Validation outputs: logits of each patch (its views averaged as probabilities), labels, the annotated
    diameters (mm, NaN where unknown) and, for a model with a size output, the mean log-diameter over views;
    ``positions``: each output's place in the validation pool (None: in pool order); ``view_logits``: the
    logits for other numbers of views ``{views: logits}``, where validation computed them."""
    logits: np.ndarray
    labels: np.ndarray
    diameters: np.ndarray
    log_size: Optional[np.ndarray] = None
    positions: Optional[np.ndarray] = None
    view_logits: Optional[Dict[int, np.ndarray]] = None


def _outputs(module: nn.Module, x: torch.Tensor, sized: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(logits, log-diameter or None)`` of a batch through ``module`` (a classifier, a head, or DDP of
    one)."""
    if sized:
        return module(x, with_size=True)
    return module(x), None


# --- validation cutoffs and the calibration record ----------------------------------------------------

class CutoffChooser:
    """Chooses validation cutoffs (raw logits) for ``target`` sensitivity. Per nodule when the validation
    subsets' manifests list their annotated nodules: the highest threshold at which ``target`` of them have a
    validation patch at or above it, a patch belonging to a nodule by the official hit rule
    (``froc.nodule_hits``), a nodule without one counting as missed. Otherwise (caches made before the
    nodules were recorded, or no nodule hit by any patch) per nodule candidate patch, as
    ``head.cutoff_for_sensitivity``."""

    def __init__(self, pool: PatchPool, nodules: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]],
                 target: float):
        self.labels, self.target = pool.labels, float(target)
        self.hits = None if nodules is None else \
            froc.nodule_hits(pool.seriesuids, pool.world_xyz, *nodules)
        if self.hits is not None and not any(len(rows) for rows in self.hits):
            self.hits = None

    @property
    def basis(self) -> str:
        return "patch" if self.hits is None else "nodule"

    def choose(self, logits: np.ndarray, positions: Optional[np.ndarray] = None) -> Tuple[float, float]:
        """``(cutoff, sensitivity there)`` of validation logits, given in pool order or at ``positions``."""
        scores = np.full(len(self.labels), -np.inf)
        scores[np.arange(len(logits)) if positions is None else positions] = logits
        if self.hits is not None:
            return calibration.cutoff_for_nodules(froc.best_per_nodule(self.hits, scores), self.target)
        cutoff = head_mod.cutoff_for_sensitivity(self.labels, scores, self.target)
        return cutoff, float((scores[self.labels == 1] >= cutoff).mean())

    def operating_point(self, view_logits: Dict[int, np.ndarray], positions: Optional[np.ndarray],
                        epoch: int) -> Dict[str, Any]:
        """A checkpoint's ``operating_point``: the cutoff (raw logit) and its sensitivity for each number of
        views."""
        chosen = {str(v): self.choose(logits, positions) for v, logits in sorted(view_logits.items())}
        counts = ({"n_positive_patches": int((self.labels == 1).sum())} if self.hits is None else
                  {"n_nodules": len(self.hits),
                   "n_nodules_without_candidate": sum(not len(h) for h in self.hits)})
        cutoffs = {v: c for v, (c, _) in chosen.items()}
        return {"cutoff_logits": cutoffs, "sensitivity": {v: sens for v, (_, sens) in chosen.items()},
                "screen_stages": calibration.screening_cutoffs(
                    view_logits, {int(v): c for v, c in cutoffs.items()}),
                "target_sensitivity": self.target, "basis": self.basis, "epoch": epoch, **counts}


def _uids(caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray]) -> set:
    return {uid for k, rows in rows_by_subset.items() for uid in caches[k].seriesuids[rows]}


def validation_nodules(caches: Dict[int, SubsetCache],
                       split) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(seriesuid, world mm (N, 3), diameter mm)`` of the annotated nodules of the validation scans, from
    the validation subsets' extract manifests; None when one of them has no nodule record (made before it, or
    extracted without annotations.csv)."""
    subsets = [k for k, rows in split.val.items() if len(rows)]
    if any(caches[k].manifest.get("nodules") is None for k in subsets):
        return None
    found = [n for k in subsets for n in caches[k].manifest["nodules"]]
    if split.method != "subsets":   # an 80:20 split of scans: only the validation ones
        val_uids = _uids(caches, split.val)
        found = [n for n in found if n[0] in val_uids]
    return (np.array([n[0] for n in found], object), np.array([n[1:4] for n in found], float).reshape(-1, 3),
            np.array([n[4] for n in found], float))


def training_calibration(caches: Dict[int, SubsetCache], split, positive_share: float) -> Dict[str, Any]:
    """A checkpoint's ``calibration`` record: ``positive_share`` (the nodule share of the training draws) and
    ``prior``, the nodule candidates (class 1) per row of the candidate file on the training scans, from the
    per-scan counts of the training subsets' extract manifests (the whole list, not the extracted sample),
    with ``prior_source`` naming them; ``prior`` None, and a ``note`` why, when the manifests predate those
    counts."""
    subsets = sorted(k for k, rows in split.train.items() if len(rows))
    record: Dict[str, Any] = {"positive_share": float(positive_share), "prior": None}
    lacking = [k for k in subsets if "candidate_counts" not in caches[k].manifest]
    if lacking:
        listed = common.format_subsets(lacking)
        note = (f"the extract manifests of subset(s) {listed} predate the candidate counts; rerun "
                f"`python luna_cli.py extract --subsets {listed}` with the options they were made with")
        return {**record, "note": note}
    val_uids = _uids(caches, split.val)
    counts = [c for k in subsets for uid, c in caches[k].manifest["candidate_counts"].items()
              if uid not in val_uids]
    n, positives = sum(c[0] for c in counts), sum(c[1] for c in counts)
    files = "/".join(sorted({str(caches[k].manifest.get("candidates_file", "the candidate file"))
                             for k in subsets}))
    source = (f"{files} over the {len(counts)} training scans of subset(s) {common.format_subsets(subsets)} "
              f"({positives} nodule candidates of {n})")
    if not 0 < positives < n:
        return {**record, "prior_source": source, "note": f"{source}: no prior strictly between 0 and 1"}
    return {**record, "prior": positives / n, "n_candidates": n, "n_positive": positives,
            "prior_source": source}


def _say_fallbacks(chooser: CutoffChooser, record: Dict[str, Any], quiet: bool) -> None:
    """A warning for a cutoff chosen per patch or a checkpoint without a calibration prior."""
    if quiet:
        return
    if chooser.basis == "patch":
        console.print("[yellow]the validation subsets' extract manifests list no nodules (made before they "
                      "were recorded: rerun extract on them with the same options): the cutoff is chosen per "
                      "nodule candidate patch, not per nodule[/]")
    if record["prior"] is None:
        console.print(f"[yellow]no calibrated probability for this model: {record['note']}[/]")



PLOT_INTERVAL_S = 10.0  # history.png is redrawn at most this often (and after the last epoch)

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
    train_batches: Callable[[int], Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    n_train_batches: int
    val_logits: Callable[[], ValOutputs]
    base_payload: Dict[str, Any]
    device: torch.device
    precision: str
    job: runs.Dist
    quiet: bool = False
    chooser: Optional["CutoffChooser"] = None
    view_logits: Optional[Callable[[ValOutputs], Tuple[Dict[int, np.ndarray], np.ndarray]]] = None


@dataclass
class FitState:
    """Where a run stands: its history, best validation AUC so far (and the validation loss of that epoch,
    which decides between epochs of equal AUC) and the last finished epoch."""
    history: List[Dict[str, float]] = field(default_factory=list)
    best_auc: float = -math.inf
    best_epoch: int = 0
    epoch: int = 0
    best_loss: float = math.inf

    def improves(self, metrics: Dict[str, float]) -> bool:
        """A higher validation AUC, or the same AUC at a lower validation loss (classification plus the
        weighted size loss): once the AUC saturates, as it can on easy data, the size output still
        improves."""
        return metrics["auc"] > self.best_auc or (metrics["auc"] == self.best_auc and
                                                  metrics["total_loss"] < self.best_loss)


class NonFiniteLoss(UserError):
    pass


# The training loss is checked for NaN/inf every this many optimiser steps and at the end of each epoch (the
# epoch's checkpoints come after the check, so a bad step never reaches one).
NAN_CHECK_STEPS = 16


def _step_loss(fit: Fit, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor,
               size_weight: float) -> torch.Tensor:
    """The training loss of one batch of ``fit`` (:func:`batch_loss`)."""
    return batch_loss(fit.module, x, y, d, size_weight, fit.device, fit.precision)


def batch_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, d: torch.Tensor, size_weight: float,
               device: torch.device, precision: str) -> torch.Tensor:
    """The training loss of one batch: classification of labels ``y``, plus the weighted size loss on
    diameters ``d`` (mm, NaN where unknown) when ``size_weight`` > 0; forward under ``precision`` autocast,
    the loss in float32."""
    with autocast(device, precision):
        logits, log_size = _outputs(module, x, size_weight > 0)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    if log_size is not None:
        loss = loss + size_weight * head_mod.size_loss(log_size, y, d)
    return loss


def _train_epoch(fit: Fit, epoch: int, optimizer, scheduler, scaler, advance: Callable[[], None]) -> float:
    """One epoch over this rank's planned batches; returns the mean training loss over all ranks."""
    accumulate, n = int(fit.options["accumulate"]), fit.n_train_batches
    fit.module.train()
    loss_sum, count = (torch.zeros((), dtype=torch.float64, device=fit.device) for _ in range(2))
    bad = torch.zeros((), dtype=torch.int64, device=fit.device)
    steps = 0
    optimizer.zero_grad(set_to_none=True)
    size_weight = float(fit.options["size_weight"]) if fit.classifier.has_size else 0.0
    for i, (x, y, d) in enumerate(fit.train_batches(epoch)):
        group_start = (i // accumulate) * accumulate
        group_size = min(accumulate, n - group_start)
        group_end = i + 1 == group_start + group_size
        sync = contextlib.nullcontext()
        if fit.job.world > 1 and not group_end and hasattr(fit.module, "no_sync"):
            sync = fit.module.no_sync()
        with sync:
            try:
                loss = _step_loss(fit, x, y, d, size_weight)
                scaler.scale(loss / group_size).backward()
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not head_mod.out_of_memory(err):
                    raise
                optimizer.zero_grad(set_to_none=True)
                raise head_mod.batch_too_large(fit.device, len(x), lambda b: _step_loss(
                    fit, head_mod.trial_batch(x, b), y[:1].expand(b), d[:1].expand(b), size_weight).backward()
                ) from None
        bad += (~torch.isfinite(loss.detach())).long()
        loss_sum += loss.detach().double() * len(y)
        count += len(y)
        if group_end:
            steps += 1
            if steps % NAN_CHECK_STEPS == 0 or i + 1 == n:   # .item() waits for the device: not every step
                runs.all_reduce(fit.job, bad)
                if bad.item():
                    raise NonFiniteLoss(f"the training loss became NaN/inf in epoch {epoch} (by batch "
                                        f"{i + 1}); stopped")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        advance()
    totals = torch.stack([loss_sum, count])
    runs.all_reduce(fit.job, totals)
    return float(totals[0] / totals[1].clamp(min=1))


def _optimiser(fit: Fit):
    """AdamW, its warm-up + cosine schedule per optimiser step, and the fp16 loss scaler."""
    opts = fit.options
    params = [p for p in fit.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"],
                                  fused=fit.device.type == "cuda")
    steps_per_epoch = int(math.ceil(fit.n_train_batches / opts["accumulate"]))
    total_steps = steps_per_epoch * opts["epochs"]
    warmup_steps = max(1, min(int(round(opts["warmup_epochs"] * steps_per_epoch)), total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))
    return optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=fit.precision == "fp16")


def _restore(fit: Fit, payload: Dict[str, Any], optimizer, scheduler, scaler) -> FitState:
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    states = payload["rng"]
    if len(states) == fit.job.world:
        runs.set_rng_state(states[fit.job.rank])
    elif fit.job.main:
        console.print(f"[yellow]the run was saved with {len(states)} process(es), now {fit.job.world}: "
                      f"random streams restart from the seed[/]")
    return FitState(list(payload["history"]), payload["best_auc"], payload["best_epoch"],
                    int(payload["epoch"]), payload.get("best_loss", math.inf))


def _save_epoch(fit: Fit, state: FitState, metrics: Dict[str, float], point: Dict[str, Any], improved: bool,
                optimizer, scheduler, scaler, plot: bool) -> None:
    """best.pt (an improved epoch) and last.pt, each with the epoch's operating point ``point``, last.pt also
    with the state to resume from; history.csv (and .png); rank 0 only."""
    rng_states = runs.gather_objects(fit.job, runs.rng_state())
    if not fit.job.main:
        return
    payload = {**fit.base_payload,
               "model": {k: v.detach().cpu() for k, v in fit.classifier.state_dict().items()},
               "epoch": state.epoch, "metrics": dict(metrics), "operating_point": point}
    if improved:
        head_mod.save_checkpoint(fit.run_dir / "best.pt", payload)
    payload.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   scaler=scaler.state_dict(), history=state.history, best_auc=state.best_auc,
                   best_loss=state.best_loss, best_epoch=state.best_epoch, rng=rng_states,
                   world_size=fit.job.world, sampler={"seed": fit.options["seed"], "epoch": state.epoch})
    head_mod.save_checkpoint(fit.run_dir / "last.pt", payload)
    runs.write_history(fit.run_dir, state.history, plot)


def _val_size_loss(fit: Fit, outputs: ValOutputs) -> float:
    """The weighted size loss of the validation nodules (0 without a size output or annotated nodules)."""
    if outputs.log_size is None or not fit.classifier.has_size:
        return 0.0
    loss = head_mod.size_loss(*(torch.from_numpy(np.asarray(a, np.float64))
                                for a in (outputs.log_size, outputs.labels, outputs.diameters)))
    return float(fit.options["size_weight"]) * float(loss)


def _epoch_row(fit: Fit, epoch: int, train_loss: float, started: float, lr: float, kept_epoch: int):
    """Validate after an epoch: the history row, the metrics and the validation outputs."""
    outputs = fit.val_logits()
    logits, labels = outputs.logits, outputs.labels
    metrics = head_mod.binary_metrics(labels, logits)
    metrics["size_mae_mm"] = head_mod.size_mae_mm(labels, outputs.diameters, outputs.log_size)
    metrics["total_loss"] = metrics["loss"] + _val_size_loss(fit, outputs)
    cutoff, _ = fit.chooser.choose(logits, outputs.positions)
    if not (math.isfinite(train_loss) and math.isfinite(metrics["loss"])):
        raise NonFiniteLoss(f"a loss became NaN/inf in epoch {epoch}; "
                            f"{_kept_message(fit.run_dir, kept_epoch)}; try a lower --lr")
    row = {"epoch": epoch, "train_loss": train_loss, "val_loss": metrics["loss"],
           **{f"val_{k}": metrics[k]
              for k in ("accuracy", "sensitivity", "specificity", "auc", "size_mae_mm")},
           "cutoff": float(calibration.sigmoid(cutoff)), "lr": lr, "seconds": time.perf_counter() - started,
           "cutoff_logit": cutoff}
    return row, metrics, outputs


def run_fit(fit: Fit, resume_payload: Optional[Dict[str, Any]] = None,
            stop_after: Optional[int] = None) -> List[Dict[str, float]]:
    """AdamW with warm-up + cosine decay; per epoch validate, write history and checkpoints (rank 0).

    Stops after ``epochs`` (or ``stop_after`` epochs in this call, or ``patience`` epochs without a better
    validation AUC). Returns the history.
    """
    opts = fit.options
    optimizer, scheduler, scaler = _optimiser(fit)
    state = _restore(fit, resume_payload, optimizer, scheduler, scaler) if resume_payload else FitState()
    first_epoch, last_plot, plotted = state.epoch + 1, -math.inf, len(state.history)
    for epoch in range(first_epoch, opts["epochs"] + 1):
        if stop_after is not None and epoch - first_epoch >= stop_after:
            break
        if opts["patience"] and epoch - 1 - state.best_epoch >= opts["patience"]:
            if fit.job.main and not fit.quiet:
                console.print(f"early stop: no better validation AUC (or loss at equal AUC) for "
                              f"{opts['patience']} epochs (best {state.best_auc:.4f} at epoch "
                              f"{state.best_epoch})")
            break
        started = time.perf_counter()
        with progress_bar("batches", disable=not fit.job.main or fit.quiet) as progress:
            task = progress.add_task(f"epoch {epoch}/{opts['epochs']}", total=fit.n_train_batches)
            try:
                train_loss = _train_epoch(fit, epoch, optimizer, scheduler, scaler,
                                          lambda: progress.advance(task))
            except NonFiniteLoss as err:
                raise NonFiniteLoss(f"{err}; {_kept_message(fit.run_dir, epoch - 1)}; "
                                    f"try a lower --lr") from None
        row, metrics, outputs = _epoch_row(fit, epoch, train_loss, started, optimizer.param_groups[0]["lr"],
                                           epoch - 1)
        improved = state.improves(metrics)
        state.history.append(row)
        state.epoch = epoch
        if improved:
            state.best_auc, state.best_loss, state.best_epoch = metrics["auc"], metrics["total_loss"], epoch
            point = fit.chooser.operating_point(*fit.view_logits(outputs), epoch)
        else:  # last.pt only: the cutoff at the run's own views, from this epoch's validation pass
            point = fit.chooser.operating_point({int(fit.base_payload.get("views", 1)): outputs.logits},
                                                outputs.positions, epoch)
        plot = epoch == opts["epochs"] or time.perf_counter() - last_plot >= PLOT_INTERVAL_S
        _save_epoch(fit, state, metrics, point, improved, optimizer, scheduler, scaler, plot)
        if plot:
            last_plot, plotted = time.perf_counter(), len(state.history)
        if fit.job.main and not fit.quiet:
            console.print(f"epoch {epoch}/{opts['epochs']}: train loss {train_loss:.4f} | val loss "
                          f"{metrics['loss']:.4f} acc {metrics['accuracy']:.3f} "
                          f"sens {metrics['sensitivity']:.3f} spec {metrics['specificity']:.3f} "
                          f"AUC {metrics['auc']:.4f}"
                          + (f" size MAE {metrics['size_mae_mm']:.2f} mm"
                             if math.isfinite(metrics["size_mae_mm"]) else "")
                          + (" [green](best)[/]" if improved else ""))
    if fit.job.main and state.history and plotted != len(state.history):
        runs.plot_history(fit.run_dir / "history.png", state.history)
    return state.history


def _kept_message(run_dir: Path, last_epoch: int) -> str:
    if last_epoch > 0:
        return f"the last good checkpoint {run_dir / 'last.pt'} (epoch {last_epoch}) is kept"
    return "no checkpoint had been written yet"


# --- train-head ---------------------------------------------------------------------------------

def train_head(work_dir: Path, *, run: Optional[str] = None, resume: bool = False, device: str = "auto",
               stop_after: Optional[int] = None, quiet: bool = False, **settings: Any) -> Path:
    """Train the MLP head on a cached feature set (``features``: its name; default: the only one there is).

    ``settings``: the options of ``options.stage_names("head")``; those left out (or None) take
    :data:`HEAD_DEFAULTS` (or the saved run's values when resuming). Every cached
    flip of a training patch is a training sample; a validation patch scores the average probability of its
    views, and the checkpoint records that number of views for evaluate and predict. Class-balanced sampling,
    early stopping on validation AUC (``patience`` epochs; 0 = off). ``best.pt``/``last.pt`` hold the full
    classifier (frozen encoder + head), so ``head.load_classifier`` and ``finetune --head-from`` need nothing
    else. Returns the run folder.
    """
    given = options_mod.given("head", settings)
    job = runs.Dist()
    run_dir, options, resume_payload = runs.open_run(work_dir, "train-head", HEAD_DEFAULTS, given, run,
                                                     resume, job)
    torch_device = head_mod.resolve_device(device)
    tag, identity = choose_feature_set(work_dir, options["features"])
    options["features"] = tag
    caches, split, patch_size, spacing_mm = load_split(work_dir, options["val_subsets"],
                                                       options["test_subsets"], options["seed"])
    views = identity.get("views", 1)
    train, val = (_load_features(work_dir, caches, rows, tag, identity) for rows in (split.train, split.val))
    train = FeatureRows(train.features.flatten(0, 1),
                        *(t.repeat_interleave(views) for t in train[1:]))  # a sample per view
    config = head_mod.resolve_config({"encoder": dict(identity["encoder"], use_checkpoint=False),
                                      "pooling": identity["pooling"], "patch_size": patch_size,
                                      "size_output": _size_output(options, train.labels, train.diameters,
                                                                  quiet)})
    runs.seed_everything(options["seed"])
    classifier = _head_classifier(work_dir, tag, config, train.features, resume_payload, run_dir, patch_size,
                                  spacing_mm)
    batches = FeatureBatches(train, val, options, torch_device)
    if split.method == "seriesuid" and not quiet:
        console.print(f"[yellow]{split.note}[/]")
    preprocess = runs.preprocess_record(patch_size, spacing_mm, identity["hu_min"], identity["hu_max"])
    chooser = CutoffChooser(PatchPool(caches, split.val), validation_nodules(caches, split),
                            options["target_sensitivity"])
    record = training_calibration(caches, split, options["positive_share"])
    _say_fallbacks(chooser, record, quiet)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(run_dir, "train-head", options, {
        "device": str(torch_device), "precision": "fp32", "feature_set": identity,
        "split": split.summary(caches), "preprocess": preprocess, "config": config, "world_size": 1})
    base = {"format": head_mod.CHECKPOINT_FORMAT, "kind": "train-head", "run": run_dir.name, "config": config,
            "preprocess": preprocess, "views": views, "feature_tag": tag, "weights": identity["weights"],
            "calibration": record}
    fit = Fit(run_dir, options, classifier.to(torch_device), classifier.head, batches.train_batches,
              batches.n_batches, lambda: batches.val_logits(classifier.head), base, torch_device, "fp32", job,
              quiet, chooser, lambda outputs: (outputs.view_logits, outputs.positions))
    run_fit(fit, resume_payload, stop_after)
    return run_dir


class FeatureBatches:
    """train-head's batches: class-balanced draws of cached feature vectors with their labels and diameters,
    and validation outputs of each patch averaged over its views (``val_x``: ``(N, views, F)``)."""

    def __init__(self, train: "FeatureRows", val: "FeatureRows", options: Dict[str, Any],
                 device: torch.device):
        self.train_x, self.train_y, self.train_d = train
        self.val_x, self.val_y, self.val_d = val
        self.options, self.device = options, device
        self.n_samples = options["epoch_samples"] or len(self.train_y)
        self.n_batches = int(math.ceil(self.n_samples / options["batch_size"]))

    def train_batches(self, epoch: int):
        opts = self.options
        for positions in epoch_batches(self.train_y.numpy(), self.n_samples, opts["batch_size"], opts["seed"],
                                       epoch, positive_share=opts["positive_share"]):
            index = torch.from_numpy(positions)
            yield (self.train_x[index].to(self.device).float(), self.train_y[index].to(self.device).float(),
                   self.train_d[index].to(self.device))

    @torch.no_grad()
    def val_logits(self, module: head_mod.MLPHead) -> ValOutputs:
        """Each validation patch's logit of its mean probability over all cached views, and over the first k
        views for each count of ``calibration.view_counts`` (``view_logits``)."""
        module.eval()
        probability, log_size = [], []
        for i in range(0, len(self.val_y), 4096):
            logits, size = _outputs(module, self.val_x[i:i + 4096].to(self.device).float(), module.has_size)
            probability.append(torch.sigmoid(logits.double()).cpu())
            if size is not None:
                log_size.append(size.float().mean(dim=1).cpu())
        views = self.val_x.shape[1]
        per_view = torch.cat(probability) if probability else torch.zeros(0, views, dtype=torch.float64)
        by_views = {v: calibration.logit(per_view[:, :v].mean(dim=1).numpy())
                    for v in calibration.view_counts(views, views)}
        return ValOutputs(by_views[views], self.val_y.numpy(), self.val_d.numpy(),
                          torch.cat(log_size).double().numpy() if log_size else None, view_logits=by_views)


class FeatureRows(NamedTuple):
    """Cached features ``(N, views, F)`` (or ``(N, F)``), labels ``(N,)`` and diameters ``(N,)`` (mm, NaN
    unknown)."""
    features: torch.Tensor
    labels: torch.Tensor
    diameters: torch.Tensor


def _size_output(options: Dict[str, Any], labels, diameters, quiet: bool) -> bool:
    """Whether the model gets a size output: ``--size-weight`` above 0 and nodules with annotated diameters
    among the training patches (else a note, and no size output)."""
    if options["size_weight"] <= 0:
        return False
    known = int(((np.asarray(labels) > 0.5) & np.isfinite(np.asarray(diameters))).sum())
    if known == 0 and not quiet:
        console.print("[yellow]no training nodule has an annotated diameter (index.csv diameter_mm is empty: "
                      "annotations.csv missing at extract time?); the model gets no size output[/]")
    return known > 0


def _head_classifier(work_dir: Path, tag: str, config: Dict[str, Any], train_x: torch.Tensor,
                     resume_payload: Optional[Dict[str, Any]], run_dir: Path, patch_size: int,
                     spacing_mm: float) -> head_mod.Classifier:
    """The feature set's frozen encoder with a new head standardised on the training features (or the
    resumed run's classifier)."""
    if head_mod.feature_dim(config) != train_x.shape[1]:
        raise UserError(f"cached features {tag} have {train_x.shape[1]} values per patch, the model expects "
                        f"{head_mod.feature_dim(config)}; run cache-features again")
    classifier = head_mod.build_classifier(config)
    state = torch.load(encoder_state_path(work_dir, tag), map_location="cpu", weights_only=True)
    classifier.encoder.load_state_dict(state["state"])
    if resume_payload is not None:
        check_preprocess_matches(resume_payload["preprocess"], patch_size, spacing_mm,
                                 str(run_dir / "last.pt"))
        classifier.load_state_dict(head_mod.strip_module_prefix(resume_payload["model"]))
    else:
        classifier.head.set_standardisation(train_x)
    classifier.encoder.requires_grad_(False)
    return classifier


def _load_features(work_dir: Path, caches: Dict[int, SubsetCache], rows_by_subset: Dict[int, np.ndarray],
                   tag: str, identity: Dict[str, Any]) -> FeatureRows:
    """float16 features ``(N, views, F)``, float labels and diameters ``(N,)`` of the selected rows, in
    subset order."""
    features, labels, diameters = [], [], []
    for k, rows in sorted(rows_by_subset.items()):
        if not len(rows):
            continue
        if not features_complete(work_dir, k, tag, len(caches[k])):
            raise UserError(f"feature set {tag} has no features of subset {k}; "
                            f"run `{cache_features_hint(identity, k)}` first")
        array = np.load(feature_paths(work_dir, k, tag)[0], mmap_mode="r")
        features.append(np.asarray(array[np.sort(rows)]))
        labels.append(caches[k].labels[np.sort(rows)])
        diameters.append(caches[k].diameters[np.sort(rows)])
    labels = torch.from_numpy(np.concatenate(labels).astype(np.float32))
    return FeatureRows(
        torch.from_numpy(np.concatenate(features)).reshape(len(labels), identity.get("views", 1), -1),
        labels, torch.from_numpy(np.concatenate(diameters).astype(np.float32)))


# --- finetune ------------------------------------------------------------------------------------

def finetune(work_dir: Path, *, run: Optional[str] = None, resume: bool = False, device: str = "auto",
             workers: Optional[int] = None, stop_after: Optional[int] = None, quiet: bool = False,
             compile: bool = False, **settings: Any) -> Path:
    """Train encoder + head end to end on the patch cache; returns the run folder.

    ``settings``: the options of ``options.stage_names("finetune")``; those left out (or None) take
    :data:`FINETUNE_DEFAULTS` (or the saved run's values when resuming). Starts from
    ``weights`` (pretrained Swin UNETR encoder; random init with a warning when absent) and optionally from a
    trained run's classifier (``head_from``: its head, and its encoder too unless ``weights`` is given).
    Class-balanced sampling, class-blind augmentation (the 8 flips and small shifts), AdamW with warm-up then
    cosine decay, mixed precision on GPUs, ``batch_size`` per process x ``accumulate`` steps of gradient
    accumulation x processes (torchrun: DistributedDataParallel, rank 0 writes files). ``stop_after`` ends
    this call after that many epochs (``resume`` continues the same run exactly). Validation scores each patch
    as the average of its first ``views`` flips, and the checkpoint records that for evaluate and predict.
    ``compile``: the encoder through torch.compile (``head.compile_encoder``); like ``device``, it may change
    on ``resume``.
    """
    given = options_mod.given("finetune", settings)
    job, torch_device = runs.start_processes(device)
    try:
        run_dir = _finetune(work_dir, given, run, resume, job, torch_device, workers, stop_after, quiet,
                            compile)
    except BaseException:
        runs.stop_processes(job, together=False)  # a failed rank must not wait for the others
        raise
    runs.stop_processes(job)
    return run_dir


def _finetune(work_dir: Path, given: Dict[str, Any], run: Optional[str], resume: bool, job: runs.Dist,
              torch_device: torch.device, workers: Optional[int], stop_after: Optional[int],
              quiet: bool, compile: bool) -> Path:
    run_dir, options, resume_payload = runs.open_run(work_dir, "finetune", FINETUNE_DEFAULTS, given, run,
                                                     resume, job)
    precision = head_mod.resolve_precision(options["precision"], torch_device)
    caches, split, patch_size, spacing_mm = load_split(work_dir, options["val_subsets"],
                                                       options["test_subsets"], options["seed"])
    runs.seed_everything(options["seed"])
    train_pool = PatchPool(caches, split.train)
    sized = _size_output(options, train_pool.labels, train_pool.diameters, quiet or not job.main)
    classifier, config, sources = _finetune_model(work_dir, options, resume_payload, run_dir, patch_size,
                                                  spacing_mm, job, sized)
    runs.seed_everything(options["seed"], job.rank)
    head_mod.compile_encoder(classifier.to(torch_device), compile)
    module: nn.Module = classifier
    if job.world > 1:
        module = nn.parallel.DistributedDataParallel(
            classifier, device_ids=[torch_device.index] if torch_device.type == "cuda" else None)
    if workers is None:
        workers = min(4, max(1, (os.cpu_count() or 1) // job.world)) if torch_device.type == "cuda" else 0
    loaders = PatchBatches(train_pool, PatchPool(caches, split.val), options, job, torch_device,
                           precision, workers, spacing_mm)
    preprocess = runs.preprocess_record(patch_size, spacing_mm, options["hu_min"], options["hu_max"])
    if job.main:
        if split.method == "seriesuid" and not quiet:
            console.print(f"[yellow]{split.note}[/]")
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_config(run_dir, "finetune", options, {
            "device": str(torch_device), "precision": precision, "world_size": job.world,
            "effective_batch": options["batch_size"] * options["accumulate"] * job.world, "workers": workers,
            "max_shift_vox": loaders.max_shift_vox, "split": split.summary(caches), "preprocess": preprocess,
            "config": config, "sources": sources})
    chooser = CutoffChooser(loaders.val_pool, validation_nodules(caches, split),
                            options["target_sensitivity"])
    record = training_calibration(caches, split, options["positive_share"])
    _say_fallbacks(chooser, record, quiet or not job.main)
    base = {"format": head_mod.CHECKPOINT_FORMAT, "kind": "finetune", "run": run_dir.name, "config": config,
            "preprocess": preprocess, "views": options["views"], "sources": sources, "calibration": record}
    counts = calibration.view_counts(options["views"], len(head_mod.VIEW_FLIPS))
    fit = Fit(run_dir, options, classifier, module, loaders.train_batches, loaders.n_batches,
              lambda: loaders.val_logits(classifier), base, torch_device, precision, job, quiet, chooser,
              lambda outputs: loaders.view_logits(classifier, counts))
    run_fit(fit, resume_payload, stop_after)
    return run_dir


def val_batch(batch_size: int) -> int:
    """Patches a validation forward pass takes (flips included): twice the training batch, at least 16.
    Inference keeps no activations for a backward pass, so it fits where training did."""
    return max(2 * int(batch_size), 16)


class PatchBatches:
    """Fine-tuning's batches: balanced, augmented training batches of this rank, and validation logits
    gathered from every rank."""

    def __init__(self, train_pool: PatchPool, val_pool: PatchPool, options: Dict[str, Any], job: runs.Dist,
                 device: torch.device, precision: str, workers: int, spacing_mm: float):
        self.train_pool, self.val_pool, self.options, self.job = train_pool, val_pool, options, job
        self.device, self.precision, self.workers = device, precision, workers
        self.n_samples = options["epoch_samples"] or len(train_pool)
        self.n_batches = int(math.ceil(math.ceil(self.n_samples / job.world) / options["batch_size"]))
        self.max_shift_vox = int(round(options["max_shift_mm"] / spacing_mm)) if options["augment"] else 0
        self._last = (np.zeros((0, 0)), np.zeros(0, int))

    def train_batches(self, epoch: int):
        opts, job = self.options, self.job
        batches = epoch_batches(self.train_pool.labels, self.n_samples, opts["batch_size"], opts["seed"],
                                epoch, job.rank, job.world, opts["positive_share"])
        generator = torch.Generator().manual_seed(_seed_for(opts["seed"], "augment", epoch, job.rank))
        for hu, labels, diameters in batch_loader(self.train_pool, batches, self.workers,
                                                  self.device.type == "cuda"):
            y = labels.to(self.device, non_blocking=True).float()
            x = training_inputs(hu.to(self.device, non_blocking=True), generator, opts["hu_min"],
                                opts["hu_max"], opts["augment"], self.max_shift_vox)
            yield x, y, diameters.to(self.device, non_blocking=True).float()

    def _val_flips(self, classifier: head_mod.Classifier, views: int, sized: bool):
        """``(per-flip probabilities (N, views), per-flip log-diameters or None, pool positions)`` of the
        validation patches: this rank's share through ``head.view_outputs``, gathered from every rank."""
        classifier.eval()
        mine = np.arange(len(self.val_pool))[self.job.rank::self.job.world]
        size = val_batch(self.options["batch_size"])
        preprocess = {k: self.options[k] for k in ("hu_min", "hu_max")}
        probability, log_size = [np.zeros((0, views))], [np.zeros((0, views))]
        for hu, _, _ in batch_loader(self.val_pool, [mine[i:i + size] for i in range(0, len(mine), size)],
                                     self.workers, self.device.type == "cuda"):
            p, d = head_mod.view_outputs(classifier, hu, preprocess, self.device, size, views, self.precision,
                                         sized)
            probability.append(p)
            log_size.append(d if sized else np.zeros((len(p), views)))
        local = (np.concatenate(probability), np.concatenate(log_size), mine)
        gathered = runs.gather_objects(self.job, local)
        probability, log_size, rows = (np.concatenate([g[i] for g in gathered]) for i in range(3))
        self._last = (probability, rows)   # for view_logits after the same epoch's validation
        return probability, log_size if sized else None, rows

    @torch.no_grad()
    def val_logits(self, classifier: head_mod.Classifier) -> ValOutputs:
        """Each validation patch's logit of its mean probability over the run's views, and its size output."""
        probability, log_size, rows = self._val_flips(classifier, self.options["views"], classifier.has_size)
        mean_log_size = None if log_size is None else head_mod.mean_of_views(log_size)
        return ValOutputs(calibration.logit(head_mod.mean_of_views(probability)), self.val_pool.labels[rows],
                          self.val_pool.diameters[rows], mean_log_size, positions=rows)

    @torch.no_grad()
    def view_logits(self, classifier: head_mod.Classifier,
                    counts: Sequence[int]) -> Tuple[Dict[int, np.ndarray], np.ndarray]:
        """``({k: logit of each validation patch's mean probability over its first k flips}, pool positions)``
        for each k of ``counts``; the epoch's validation flips when it had enough of them, else one more pass.
        """
        probability, rows = self._last
        if probability.shape[1] < max(counts):
            probability, _, rows = self._val_flips(classifier, max(counts), False)
        return {k: calibration.logit(head_mod.mean_of_views(probability, k)) for k in counts}, rows


def _finetune_model(work_dir: Path, options: Dict[str, Any], resume_payload: Optional[Dict[str, Any]],
                    run_dir: Path, patch_size: int, spacing_mm: float, job: runs.Dist,
                    sized: bool) -> Tuple[head_mod.Classifier, Dict[str, Any], Dict[str, Any]]:
    """Build the classifier: from last.pt when resuming, else from --head-from and/or --weights; with a size
    output when ``sized`` (a --head-from head without one gets a new size layer)."""
    if resume_payload is not None:
        check_preprocess_matches(resume_payload["preprocess"], patch_size, spacing_mm,
                                 str(run_dir / "last.pt"))
        classifier = head_mod.build_classifier(resume_payload["config"])
        classifier.load_state_dict(head_mod.strip_module_prefix(resume_payload["model"]))
        return (classifier, head_mod.resolve_config(resume_payload["config"]),
                resume_payload.get("sources", {}))
    config = head_mod.resolve_config({"encoder": encoder_config(options["feature_size"],
                                                                options["window_size"],
                                                                options["grad_checkpoint"]),
                                      "pooling": options["pooling"], "patch_size": patch_size,
                                      "size_output": sized})
    sources: Dict[str, Any] = {"weights": options["weights"], "head_from": None}
    head_payload = None
    if options["head_from"]:
        head_payload, config, sources["head_from"] = _head_from(work_dir, options, patch_size, spacing_mm,
                                                                job)
        config["size_output"] = sized
    classifier = head_mod.build_classifier(config)
    if head_payload is not None:
        _load_head_from(classifier, head_payload, sources["head_from"])
    if options["weights"]:
        report = load_encoder_weights(classifier.encoder, Path(options["weights"]))
        sources["weights_report"] = {k: v for k, v in report.items()
                                     if isinstance(v, (int, float, str, bool))}
    elif head_payload is None and job.main:
        warn_random_init("finetune")
    return classifier, config, sources


def _load_head_from(classifier: head_mod.Classifier, payload: Dict[str, Any], source: str) -> None:
    """Load a --head-from checkpoint's weights; only the size layer may be missing (added) or extra
    (dropped)."""
    state = {k: v for k, v in head_mod.strip_module_prefix(payload["model"]).items()
             if classifier.has_size or not k.startswith("head.size.")}
    try:
        missing, unexpected = classifier.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"--head-from {source}: weights do not fit its configuration ({err})") from None
    if unexpected or any(not k.startswith("head.size.") for k in missing):
        raise UserError(f"--head-from {source}: weights do not fit its configuration (missing {missing}, "
                        f"unexpected {unexpected})")


def _head_from(work_dir: Path, options: Dict[str, Any], patch_size: int, spacing_mm: float, job: runs.Dist):
    """``(payload, model config, file)`` of the --head-from checkpoint, whose model configuration is used."""
    head_file = head_mod.model_checkpoint(work_dir, options["head_from"], "--head-from")
    payload = head_mod.read_checkpoint(head_file)
    check_preprocess_matches(payload["preprocess"], patch_size, spacing_mm, str(head_file))
    stored = head_mod.resolve_config(payload["config"])
    config = dict(stored, encoder=dict(stored["encoder"], use_checkpoint=options["grad_checkpoint"]))
    if job.main and (stored["encoder"]["feature_size"], stored["encoder"]["window_size"], stored["pooling"]) \
            != (options["feature_size"], options["window_size"], options["pooling"]):
        console.print(f"[yellow]--head-from {head_file}: using its model configuration (feature_size "
                      f"{stored['encoder']['feature_size']}, window_size {stored['encoder']['window_size']}, "
                      f"pooling {stored['pooling']})[/]")
    return payload, config, str(head_file)
