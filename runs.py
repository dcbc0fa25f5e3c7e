"""Training runs: the run folder, the processes of a job, and the random state a resumed run restores.

A run is a folder ``W/runs/<run>/`` (``<run>`` a name, or any folder holding ``config.json``) with
``config.json`` (``kind``: train-head or finetune; ``options``: the resolved stage options; ``resolved``: what
the run derived from its inputs), ``history.csv`` and ``history.png`` (one row and one point per epoch),
``best.pt`` and ``last.pt``. A resumed run keeps the options it was started with.

A job is one process, or several started by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from rich.console import Console

import common
import head as head_mod
import options as options_mod
from common import UserError

console = Console()
STAGE_OF = {"train-head": "head", "finetune": "finetune"}  # run kind -> options stage


# --- processes -------------------------------------------------------------------------

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


def start_processes(device: str) -> Tuple[Dist, torch.device]:
    """Join the torchrun job when WORLD_SIZE > 1 (NCCL on GPUs, gloo on CPUs); else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = head_mod.resolve_device(device, local_rank)
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


def all_reduce(job: Dist, tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over the ranks in place (nothing in a single process)."""
    if job.world > 1:
        import torch.distributed as dist
        dist.all_reduce(tensor)


def broadcast_object(job: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if job.world == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- runs: folders, history, plots ------------------------------------------------------------

# cutoff: the validation cutoff of the epoch at the run's views as a probability (raw, before calibration);
# cutoff_logit: the same as the raw logit that checkpoints store.
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_sensitivity", "val_specificity",
                   "val_auc", "val_size_mae_mm", "cutoff", "lr", "seconds", "cutoff_logit"]


def resolve_run_dir(work_dir: Path, run: str) -> Path:
    """A run name under ``W/runs`` or a path to a run folder / checkpoint file -> the run folder."""
    candidate = Path(run)
    if candidate.suffix == ".pt":
        return candidate.parent
    if candidate.is_dir() and (candidate / "config.json").is_file():
        return candidate
    return head_mod.runs_dir(work_dir) / run


def write_history(run_dir: Path, history: List[Dict[str, float]], plot: bool = True) -> None:
    """history.csv (atomic rewrite) and, with ``plot``, history.png: training loss and validation
    accuracy/AUC per epoch."""
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(str(row[c]) if c == "epoch" else repr(float(row.get(c, math.nan)))
                              for c in HISTORY_COLUMNS))
    common.atomic_write_text(run_dir / "history.csv", "\n".join(lines) + "\n")
    if plot:
        plot_history(run_dir / "history.png", history)


def read_history(path: Path) -> List[Dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(handle)]


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
    ax_loss.set_ylabel("binary cross-entropy (training: + weighted size loss)")
    ax_loss.legend(loc="upper left")
    size_mae = [row.get("val_size_mae_mm", math.nan) for row in history]
    if any(math.isfinite(v) for v in size_mae):
        ax_size = ax_loss.twinx()
        ax_size.plot(epochs, size_mae, "^:", color="tab:green", label="validation size MAE (mm)")
        ax_size.set_ylabel("diameter MAE of the nodules (mm)")
        ax_size.legend(loc="upper right")
    ax_val.plot(epochs, [row["val_accuracy"] for row in history], "o-", label="validation accuracy (0.5)")
    ax_val.plot(epochs, [row["val_auc"] for row in history], "s-", label="validation ROC AUC")
    ax_val.set_xlabel("epoch")
    ax_val.set_ylim(0.0, 1.02)
    ax_val.legend(loc="lower right")
    fig.tight_layout()
    common.atomic_save_figure(fig, path, dpi=100)


def rng_state() -> Dict[str, Any]:
    """The global torch RNG states (CPU, and CUDA when in use): all the global randomness training draws
    (initialisation, dropout); sampling and augmentation use generators seeded per epoch."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)


# --- run set-up shared by train-head and finetune ----------------------------------------------------

def latest_run(work_dir: Path, kind: str) -> Path:
    found = [p.parent for p in sorted(head_mod.runs_dir(work_dir).glob("*/last.pt"),
                                      key=lambda p: p.stat().st_mtime)
             if run_kind(p.parent) == kind]
    if not found:
        raise UserError(f"--resume: no {kind} run with a last.pt under {head_mod.runs_dir(work_dir)}")
    return found[-1]


def open_run(work_dir: Path, kind: str, defaults: Dict[str, Any], given: Dict[str, Any], run: Optional[str],
              resume: bool, job: Dist) -> Tuple[Path, Dict[str, Any], Optional[Dict[str, Any]]]:
    """The run folder, its options and, when resuming, the ``last.pt`` payload. A new run takes the given
    options over the defaults; a resumed run keeps its saved options and refuses any given one that
    differs."""
    if not resume:   # a new run is a folder of W/runs, named by a plain name
        name = broadcast_object(job, common.plain_folder_name(run, "--run") if run
                                else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir = head_mod.runs_dir(work_dir) / name
        if (run_dir / "last.pt").exists():
            raise UserError(f"run folder {run_dir} already holds a run; add --resume to continue it or "
                            f"choose another --run name")
        options = {**defaults, **given}
        options_mod.check(STAGE_OF[kind], options)
        return run_dir, options, None
    run_dir = resolve_run_dir(work_dir, run) if run else latest_run(work_dir, kind)
    if not (run_dir / "last.pt").is_file():
        raise UserError(f"--resume: {run_dir} has no last.pt to continue from")
    saved = json.loads((run_dir / "config.json").read_text())
    if saved.get("kind") != kind:
        raise UserError(f"--resume: {run_dir} is a {saved.get('kind')} run, not {kind}")
    options = {**defaults, **saved["options"]}
    differing = [f"--{k.replace('_', '-')}: the run has {options.get(k)!r}, this call {v!r}"
                 for k, v in given.items() if options.get(k) != v]
    if differing:
        raise UserError(f"--resume continues {run_dir} with the options it was started with; these differ: "
                        + "; ".join(differing) + ". Drop them, or start a new run to change them (--epochs "
                        "too: it fixes the learning-rate schedule).")
    payload = head_mod.read_checkpoint(run_dir / "last.pt")
    if job.main:
        console.print(f"resuming {run_dir} after epoch {payload['epoch']} (saved options are used)")
    return run_dir, options, payload


def run_kind(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / "config.json").read_text()).get("kind")
    except (OSError, ValueError):
        return None


def write_config(run_dir: Path, kind: str, options: Dict[str, Any], resolved: Dict[str, Any]) -> None:
    common.atomic_write_json(run_dir / "config.json",
                             {"kind": kind, "options": options, "resolved": resolved})


def preprocess_record(patch_size: int, spacing_mm: float, hu_min: float, hu_max: float) -> Dict[str, Any]:
    return {"patch_size": int(patch_size), "spacing_mm": float(spacing_mm), "hu_min": float(hu_min),
            "hu_max": float(hu_max)}
