"""Evaluation stage: a model scores every candidate of whole LUNA16 subsets, then the official FROC/CPM.

Coordinates are world mm ``(x, y, z)``: ITK/LPS physical points, as in the LUNA16 CSVs. Each scan is read once
and scored in chunks (:func:`scored_chunks`, also used by mining); the submission it writes is scored with the
LUNA16 rules of froc.py, and the candidates' metrics, calibration and size agreement are added.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import calibration
import common
import data
import head
import options as options_mod
from common import UserError
from data import PointTable
from froc import SUBMISSION_COLUMNS, roc_points, check_scans, plot_froc, read_findings, score_marks
from head import roc_auc, threshold_metrics

# --- evaluating a model on whole subsets ---------------------------------------------------------

# probability: the raw score (as in submission.csv); calibrated_probability: at the checkpoint's recorded
# candidate prior (calibration.py; empty for checkpoints without one), after the columns readers had before
# it.
PREDICTION_COLUMNS = ("seriesuid,coordX,coordY,coordZ,probability,class,annotated_diameter_mm,"
                      "model_diameter_mm,plain_diameter_mm,calibrated_probability")
# What evaluation keeps per candidate (the columns of each scan's part): the probability, the model's diameter
# (NaN without a size output) and the plain measurement (sizing.py; only for nodule candidates, else NaN).
SCORE_COLUMNS = ("probability", "model_diameter_mm", "plain_diameter_mm")


def evaluation_name(work_dir, checkpoint: Path, candidates: Optional[Path] = None) -> str:
    """A checkpoint's evaluation name, after its run folder: ``W/runs/<run>/best.pt`` (what ``--model <run>``
    evaluates) -> ``<run>``; any other checkpoint -> ``<its folder>_<its stem>_<8 hex digits of its full
    path>``, so that two checkpoints never share an evaluation folder. ``candidates`` other than the data
    folder's add ``_<their stem>``."""
    import hashlib
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.parent == (Path(work_dir) / "runs").resolve() and checkpoint.name == "best.pt":
        name = checkpoint.parent.name
    else:
        name = (f"{checkpoint.parent.name}_{checkpoint.stem}_"
                f"{hashlib.sha1(str(checkpoint).encode()).hexdigest()[:8]}")
    return name + (f"_{Path(candidates).stem}" if candidates is not None else "")


def default_eval_dir(work_dir, name: str, subsets: Sequence[int], views: Optional[int]) -> Path:
    """``<work_dir>/eval/<name>_subsets<k..>[_views<n>]`` (no suffix for the checkpoint's own views)."""
    suffix = f"_views{views}" if views else ""
    return Path(work_dir) / "eval" / f"{name}_subsets{''.join(map(str, subsets))}{suffix}"


class ScanPatchStream(torch.utils.data.IterableDataset):
    """Iterable over ``(spans, patches, error)`` chunks of candidates' int16 HU patches ``[z, y, x]``.

    Each scan is opened once (``data.read_and_extract`` cuts its first piece straight from the mapped file)
    and cut around its candidates' world mm points. The pieces fill chunks of ``chunk`` patches across
    scans, so that every model batch but the last of each reader is full: ``patches`` is an ``(n, P, P, P)``
    tensor and ``spans`` says whose they are, ``((seriesuid, first, count), ...)`` in order (candidates
    ``first .. first + count`` of that scan's list). Without ``fill`` a chunk holds one scan's patches and a
    scan's last chunk is handed on when it is cut, so that its part can be saved at once. With DataLoader
    workers, worker w takes scans w, w + W, ... A scan that cannot be read or cut yields
    ``(((seriesuid, 0, 0),), None, reason)``, and none of its patches that still wait in a chunk.
    """

    def __init__(self, scans: list, patch_size: int, spacing_mm: float, chunk: int = 256, fill: bool = True):
        super().__init__()
        self.scans = scans  # [(seriesuid, path, world_xyz (n, 3))]
        self.patch_size, self.spacing_mm, self.chunk, self.fill = patch_size, spacing_mm, chunk, fill

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.scans[info.id::info.num_workers] if info else self.scans
        waiting = _ChunkFiller(self.chunk)
        for uid, path, world_xyz in mine:
            try:
                for first, piece in self._pieces(path, world_xyz, waiting.room):
                    yield from waiting.add(uid, first, piece)
            except (UserError, ValueError, RuntimeError, OSError, MemoryError) as err:
                waiting.drop(uid)
                yield ((uid, 0, 0),), None, str(err) or type(err).__name__
            if not self.fill:
                yield from waiting.flush()
        yield from waiting.flush()

    def _pieces(self, path, world_xyz: np.ndarray, room):
        """``(first, int16 patches)`` of the scan's candidates in order, each piece as large as the chunk
        being filled has room for (``room()``, asked before each cut)."""
        first, scan = 0, None
        while first < len(world_xyz):
            points = world_xyz[first:first + room()]
            if scan is None:
                scan, patches = data.read_and_extract(path, points, self.patch_size, self.spacing_mm)
            else:
                patches = data.extract_patches(scan, points, self.patch_size, self.spacing_mm)
            yield first, patches
            first += len(points)


class _ChunkFiller:
    """The chunk a reader is filling: pieces of scans joined until ``size`` patches, then handed on (a piece
    that fills a chunk on its own is handed on as it is, without a copy)."""

    def __init__(self, size: int):
        self.size, self.spans, self.pieces = size, [], []

    def room(self) -> int:
        return self.size - sum(len(p) for p in self.pieces)

    def add(self, uid: str, first: int, patches: np.ndarray):
        self.spans.append((uid, first, len(patches)))
        self.pieces.append(patches)
        if self.room() <= 0:
            yield from self.flush()

    def drop(self, uid: str) -> None:
        kept = [k for k, span in enumerate(self.spans) if span[0] != uid]
        self.spans, self.pieces = [self.spans[k] for k in kept], [self.pieces[k] for k in kept]

    def flush(self):
        if self.pieces:
            patches = self.pieces[0] if len(self.pieces) == 1 else np.concatenate(self.pieces)
            yield tuple(self.spans), torch.from_numpy(patches), ""
        self.spans, self.pieces = [], []


def _as_is(item):
    return item


def _one_thread(_worker_id: int) -> None:
    import resample
    torch.set_num_threads(1)
    resample.set_extraction_threads(1)  # the reader processes already run side by side


def stream_scan_patches(scans: list, patch_size: int, spacing_mm: float, readers: int, chunk: int = 256,
                        for_gpu: bool = False):
    """Chunks of :class:`ScanPatchStream`, prefetched by ``readers`` processes (0: in this process). With
    ``for_gpu`` (a GPU will score them) they are filled across scans, so that every batch it runs is full,
    and put in page-locked memory, so that their copies to it need not wait. On the CPU the encoder takes a
    few patches at a time whatever the batch, and a chunk per scan lets its part be saved once it is scored.
    """
    loader = torch.utils.data.DataLoader(
        ScanPatchStream(scans, patch_size, spacing_mm, chunk, fill=for_gpu), batch_size=None,
        num_workers=readers, collate_fn=_as_is, worker_init_fn=_one_thread if readers else None,
        prefetch_factor=2 if readers else None, pin_memory=for_gpu)
    return iter(loader)


def plot_roc(labels: np.ndarray, probability: np.ndarray, path: Path, title: str = "") -> None:
    """Candidate-level ROC curve with its AUC, as an image file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = np.asarray(labels).astype(bool)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if labels.any() and (~labels).any():
        tp, fp, _ = roc_points(labels, np.asarray(probability, float))
        ax.plot(fp / fp[-1], tp / tp[-1], color="C1", lw=2, label=f"AUC {roc_auc(labels, probability):.4f}")
        ax.legend(loc="lower right")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC {title}".strip())
    ax.grid(True, alpha=0.3)
    common.atomic_save_figure(fig, path)


@dataclass
class ModelRun:
    """What scoring candidates with one model needs: the model, how it is applied, where parts go."""
    model: torch.nn.Module
    preprocess: dict
    views: int
    batch_size: int
    readers: int
    device: torch.device
    precision: str
    parts: common.Parts


@dataclass
class ScoredChunk:
    """Candidates ``first .. first + len(patches)`` of one scan, scored: their int16 HU patches (a tensor
    ``(n, P, P, P)``), probability and model diameter in mm (NaN without a size output; None when not
    asked)."""
    first: int
    patches: torch.Tensor
    probability: np.ndarray
    diameter_mm: Optional[np.ndarray]


def chunk_patches(batch_size: int, views: int, least: int = 256) -> int:
    """Patches a reader's chunk holds: the fewest whole model batches (``batch_size // views`` patches, each
    with its ``views`` flips) that make at least ``least`` (fewer chunks pass between the processes)."""
    per_batch = max(1, batch_size // views)
    return per_batch * max(1, math.ceil(least / per_batch))


def scored_chunks(run: ModelRun, todo: list, with_size: bool = False):
    """The scoring service of evaluate and mining: ``(seriesuid, ScoredChunk or None, reason)`` for the
    candidates of each scan of ``todo`` (``[(seriesuid, path, world_xyz (n, 3))]``), each scan read once and
    cut around its world points (:func:`stream_scan_patches`), each chunk (whole model batches, filled
    across scans on a GPU) scored by ``run``'s model at its views and precision and handed on scan by
    scan."""
    chunks = stream_scan_patches(todo, int(run.preprocess["patch_size"]), float(run.preprocess["spacing_mm"]),
                                 run.readers, chunk=chunk_patches(run.batch_size, run.views),
                                 for_gpu=run.device.type == "cuda") if todo else []
    for spans, patches, error in chunks:
        if patches is None:
            yield spans[0][0], None, error
            continue
        scored = head.predict_patches(run.model, patches, run.preprocess, run.device, run.batch_size,
                                      run.views, run.precision, with_size=with_size)
        probability, diameter_mm = scored if with_size else (scored, None)
        start = 0
        for uid, first, count in spans:
            part = slice(start, start + count)
            yield uid, ScoredChunk(first, patches[part], probability[part],
                                   None if diameter_mm is None else diameter_mm[part]), ""
            start += count


def _score_scans(run: ModelRun, todo: list, rows_of: dict, scores: np.ndarray, measure: np.ndarray,
                 console) -> dict:
    """Fill the rows of ``scores`` (``(N, 3)``, :data:`SCORE_COLUMNS`) of the scans of ``todo``, measuring the
    plain diameter where ``measure`` (nodule candidates), and save each finished scan as a part; returns
    ``{seriesuid: reason}`` of the scans that could not be read."""
    import sizing
    remaining = {uid: len(rows_of[uid]) for uid, _, _ in todo}
    spacing_mm = float(run.preprocess["spacing_mm"])

    def keep(uid: str, chunk: ScoredChunk) -> None:
        rows = rows_of[uid]
        part = rows[chunk.first:chunk.first + len(chunk.patches)]
        scores[part, 0], scores[part, 1] = chunk.probability, chunk.diameter_mm
        wanted = measure[part]
        if wanted.any():
            scores[part[wanted], 2] = sizing.measure_diameters(chunk.patches[wanted], spacing_mm)
        remaining[uid] -= len(part)
        if remaining[uid] == 0:
            run.parts.save(uid, scores[rows])
    return common.over_scans(scored_chunks(run, todo, with_size=True), keep, total=sum(remaining.values()),
                             label="scoring candidates", console=console, show_progress=console is not None,
                             step=lambda chunk: len(chunk.patches), transient=True)


def open_model_run(checkpoint: Path, candidates_path: Path, parts_dir: Path, views: Optional[int],
                   batch_size: int, readers: int, device: str, precision: str, compile: bool = False,
                   **key) -> tuple[ModelRun, dict]:
    """The model of a checkpoint, how it is applied, and the parts of its scores in ``parts_dir``, kept while
    the checkpoint, its views, the encoder's precision, the candidates file and ``key`` stay the same (the
    head runs in float32, see ``head.Classifier.forward_head``; parts scored otherwise are discarded). Returns
    ``(run, meta)``."""
    if batch_size < 1 or readers < 0:
        raise UserError(f"--batch-size must be >= 1 and --readers >= 0, got {batch_size}, {readers}")
    torch_device = head.resolve_device(device)
    model, meta = head.load_classifier(checkpoint, device=torch_device, compile=compile)
    views = head.check_views(views or meta.get("views", 1))
    precision = head.resolve_precision(precision, torch_device)
    stat = checkpoint.stat()
    key.update(checkpoint=str(checkpoint.resolve()), checkpoint_bytes=stat.st_size,
               checkpoint_mtime_ns=stat.st_mtime_ns, preprocess=meta["preprocess"], views=views,
               encoder_precision=precision, head_precision="fp32",
               candidates=str(candidates_path.resolve()), columns=list(SCORE_COLUMNS))
    run = ModelRun(model, meta["preprocess"], views, batch_size, readers, torch_device, precision,
                   common.Parts(parts_dir, key))
    return run, meta


def _write_scored(out_dir: Path, candidates: PointTable, scores: np.ndarray, annotated: np.ndarray,
                  scored: np.ndarray, calibrated: Optional[np.ndarray]) -> PointTable:
    """``submission.csv`` (the raw probabilities: the FROC ranks them) and ``predictions.csv`` (with the
    class, the annotated, model and plain diameters, empty where unknown, and the ``calibrated`` probability,
    empty without) of the scored candidates; returns the marks."""
    marks = candidates.take(scored)
    marks.value = scores[scored, 0]
    calibrated_text = [""] * len(scored) if calibrated is None else [repr(float(p)) for p in calibrated]
    lines = [f"{u},{x!r},{y!r},{z!r},{p!r}" for u, (x, y, z), p in
             zip(marks.seriesuid, marks.world_xyz.tolist(), marks.value.tolist())]
    classes = [str(int(c > 0.5)) for c in candidates.value[scored]]
    sizes = [",".join("" if math.isnan(d) else f"{d:.2f}" for d in row)
             for row in np.column_stack([annotated[scored], scores[scored, 1:]]).tolist()]
    common.atomic_write_text(out_dir / "submission.csv", ",".join(SUBMISSION_COLUMNS) + "\n"
                           + "".join(line + "\n" for line in lines))
    common.atomic_write_text(out_dir / "predictions.csv", PREDICTION_COLUMNS + "\n"
                           + "".join(f"{line},{c},{d},{p}\n" for line, c, d, p in zip(lines, classes, sizes,
                                                                                      calibrated_text)))
    return marks


def evaluate_model(checkpoint: Path, data_dir: Path, subsets: list[int], out_dir: Path, *, readers: int = 2,
                   device: str = "auto", console=None, work_dir: Optional[Path] = None,
                   strict_cutoff: bool = True, compile: bool = False, **settings: Any) -> dict:
    """Score every candidate of the given LUNA16 subsets with a checkpoint, then evaluate.

    ``settings``: the options of ``options.stage_names("evaluate")`` (views, batch size, precision, cutoff,
    candidates, bootstrap and its seed, allow_missing); those left out take their defaults there.

    Each scan is read once and its patches (the checkpoint's ``patch_size``/``spacing_mm``) go through the
    model, averaged over ``views`` flips (default: the views the checkpoint was validated with), while worker
    processes prepare the next scans. Each finished scan is kept in ``out_dir/parts``, so a rerun resumes.
    Writes ``submission.csv`` (LUNA16 format, full-precision probabilities), ``predictions.csv``,
    ``metrics.json``, ``roc.png``, ``froc.png`` and ``size.png``. The FROC counts the readable scans;
    unreadable ones are skipped and listed in ``unreadable_scans``. ``candidates``: the candidates CSV
    (default: the data folder's ``candidates_V2.csv``). For the nodule candidates (class 1) with an annotated
    diameter (that of the nodule whose sphere holds them), ``size`` compares the model's and the plain
    diameters with it (:func:`size_metrics`). A scan missing from a subset folder (against the extract
    manifests under ``work_dir``, and ``seriesuids.csv`` with all ten subsets; :func:`check_scans`) is refused
    before any work, or with ``allow_missing`` kept in the FROC with its nodules missed and listed in
    ``missing_scans``. ``at_cutoff`` applies ``cutoff`` (a raw logit) when given, else the checkpoint's
    validated cutoff for these views (``calibration.resolve_cutoff``: a number of views without one is refused
    before any work when ``strict_cutoff``, else left without ``at_cutoff``). ``calibration``
    (:func:`calibration_metrics`) and ``calibration.png`` judge the probabilities calibrated to the
    checkpoint's candidate prior on every scored candidate; the FROC ranks the raw ones (the same order).
    ``compile``: the encoder through torch.compile (``head.compile_encoder``). Returns the metrics dict.
    """
    chosen = {**options_mod.defaults("evaluate"), **options_mod.given("evaluate", settings)}
    return _evaluate_model(Path(checkpoint), Path(data_dir), subsets, Path(out_dir), readers, device, console,
                           work_dir, strict_cutoff, compile, **chosen)


def _evaluate_model(checkpoint: Path, data_dir: Path, subsets: list[int], out_dir: Path, readers: int,
                    device: str, console, work_dir: Optional[Path], strict_cutoff: bool, compile: bool, *,
                    views: Optional[int], batch_size: int, precision: str, cutoff: Optional[float],
                    candidates: Optional[str], bootstrap: int, bootstrap_seed: int,
                    allow_missing: bool) -> dict:
    start = time.perf_counter()
    check = check_scans(data_dir, subsets, work_dir, allow_missing)
    scans = check.found
    candidates_path = Path(candidates) if candidates else data.candidates_file(data_dir)
    run, meta = open_model_run(checkpoint, candidates_path, out_dir / "parts", views, batch_size, readers,
                               device, precision, compile)
    operating = calibration.resolve_cutoff(meta, run.views, cutoff, strict_cutoff, name=str(checkpoint))
    candidates, problems = data.read_point_csv(candidates_path, "class", strict=False)
    candidates = candidates.take(np.flatnonzero(np.isin(candidates.seriesuid, list(scans))))
    annotations = read_findings(data_dir / "annotations.csv")
    rows_of = candidates.rows_by_scan()
    scores = np.full((len(candidates), len(SCORE_COLUMNS)), np.nan)
    for uid in run.parts.done() & set(rows_of):
        scores[rows_of[uid]] = run.parts.load(uid)
    todo = [(uid, scans[uid], candidates.world_xyz[rows]) for uid, rows in rows_of.items()
            if np.isnan(scores[rows, 0]).any()]
    stream_start = time.perf_counter()
    unreadable = _score_scans(run, todo, rows_of, scores, candidates.value > 0.5, console)
    scores[np.concatenate([rows_of[uid] for uid in unreadable] or [np.zeros(0, int)])] = np.nan
    seconds_scoring = time.perf_counter() - stream_start
    n_new = sum(len(rows_of[uid]) for uid, _, _ in todo if uid not in unreadable)
    scored = np.flatnonzero(~np.isnan(scores[:, 0]))
    annotated = np.where(candidates.value > 0.5, data.match_diameters(candidates, annotations), np.nan)
    calibrated = calibration.calibrated_probability(scores[scored, 0], meta.get("calibration"))
    marks = _write_scored(out_dir, candidates, scores, annotated, scored, calibrated)
    froc = score_marks(marks, [uid for uid in scans if uid not in unreadable] + list(check.missing),
                       annotations, read_findings(data_dir / "annotations_excluded.csv"),
                       bootstrap=bootstrap, seed=bootstrap_seed)
    title = f"{checkpoint.parent.name}/{checkpoint.name}"
    size = _evaluate_sizes(annotated[scored], scores[scored], run.model.has_size, out_dir / "size.png", title)
    labels = candidates.value[scored] > 0.5
    result = _candidate_metrics(labels, marks.value, operating)
    result["calibration"] = calibration_metrics(labels, marks.value, calibrated, meta.get("calibration"),
                                                candidates_path, out_dir / "calibration.png", title)
    result.update({
        "checkpoint": str(checkpoint), "epoch": meta.get("epoch"), "subsets": list(subsets),
        "views": run.views, "encoder_precision": run.precision, "head_precision": "fp32",
        "n_scans": froc["n_scans"], "cpm": froc["cpm"], "cpm_ci95": froc.get("cpm_ci95"),
        "froc_sensitivities": froc["froc_sensitivities"],
        "froc_sensitivities_ci95": froc.get("froc_sensitivities_ci95"),
        "froc": froc, "size": size, "unreadable_scans": unreadable, "missing_scans": check.missing,
        "warnings": [f"candidates file: {p}" for p in problems[:common.MAX_LISTED_PROBLEMS]] + check.warnings
                    + _missed_nodules(check.missing, annotations) + froc["warnings"],
        "seconds": time.perf_counter() - start, "seconds_scoring_candidates": seconds_scoring,
        "candidates_per_second": n_new / seconds_scoring if n_new else None,
        "files": {name: str(out_dir / name) for name in
                  ("submission.csv", "predictions.csv", "metrics.json", "roc.png", "froc.png", "size.png",
                   "calibration.png")}})
    plot_roc(labels, marks.value, out_dir / "roc.png", title=title)
    plot_froc(froc, out_dir / "froc.png", title=title)
    common.atomic_write_json(out_dir / "metrics.json", result)
    return result


def _missed_nodules(missing: dict, annotations: PointTable) -> list:
    """The warning that the nodules of missing scans count as missed (none without missing scans)."""
    if not missing:
        return []
    n_nodules = int(np.isin(annotations.seriesuid, list(missing)).sum())
    return [f"the {n_nodules} nodule(s) of the {len(missing)} missing scan(s) count as missed"]


def _candidate_metrics(labels: np.ndarray, probability: np.ndarray, operating: calibration.Cutoff) -> dict:
    """Candidate-level AUC, the threshold metrics at a raw probability of 0.5 and at the cutoff that applies
    (``cutoff``: a raw logit, compared with the logit of each raw probability; with ``cutoff_probability`` and
    ``cutoff_source``; None without a cutoff)."""
    at_half = threshold_metrics(labels, probability, 0.5)
    at_cutoff = None
    if operating.logit is not None:
        at_cutoff = dict(threshold_metrics(labels, calibration.logit(probability), operating.logit),
                         cutoff_probability=float(calibration.sigmoid(operating.logit)),
                         cutoff_source=operating.source)
    return {"n_candidates": len(labels), "n_positive": int(labels.sum()), "auc": roc_auc(labels, probability),
            "accuracy": at_half["accuracy"], "sensitivity": at_half["sensitivity"],
            "specificity": at_half["specificity"], "at_0.5": at_half, "at_cutoff": at_cutoff,
            "cutoff_note": None if at_cutoff else operating.source}


def calibration_metrics(labels: np.ndarray, raw: np.ndarray, calibrated: Optional[np.ndarray],
                        record: Optional[dict], candidates_path: Path, figure: Path, title: str) -> dict:
    """The reliability (``calibration.reliability``: ECE over 10 equal-width bins, per-bin counts, mean
    probability, nodule rate) of the ``calibrated`` probabilities (None without a recorded prior) and of the
    ``raw`` ones, over the scored candidates, with the prior behind them; draws both into ``figure`` (the
    reliability diagram)."""
    curves = {"raw": calibration.reliability(labels, raw)}
    if calibrated is not None:
        curves = {"calibrated": calibration.reliability(labels, calibrated), **curves}
    calibration.plot_reliability(figure, curves, title)
    record = record or {}
    note = (f"{calibration.calibration_note(record)}; scored: every candidate of "
            f"{Path(candidates_path).name} on the evaluated scans")
    return {"ece": curves["calibrated"]["ece"] if calibrated is not None else None,
            "ece_bins": calibration.ECE_BINS, "calibrated": curves.get("calibrated"), "raw": curves["raw"],
            "positive_share": record.get("positive_share"), "prior": record.get("prior"), "note": note}


def candidate_table(result: dict):
    """A rich table of the candidate-level metrics at 0.5 and at the checkpoint's cutoff."""
    from rich.table import Table

    def fmt(value):
        return "-" if value is None else f"{value:.4f}"
    table = Table(title=f"{result['n_candidates']} candidates ({result['n_positive']} nodules) "
                        f"of {result['n_scans']} scans, AUC {fmt(result['auc'])}")
    table.add_column("threshold", justify="right")
    for name in ("accuracy", "sensitivity", "specificity"):
        table.add_column(name, justify="right")
    for label, metrics in (("0.5", result["at_0.5"]), ("cutoff", result["at_cutoff"])):
        if metrics:
            table.add_row(f"cutoff (logit {metrics['cutoff']:.4g}, p {metrics['cutoff_probability']:.4g})"
                          if label == "cutoff" else "raw p 0.5",
                          fmt(metrics["accuracy"]), fmt(metrics["sensitivity"]), fmt(metrics["specificity"]))
    return table


# --- nodule size -------------------------------------------------------------------------

SIZE_BANDS = ("<6 mm", "6-8 mm", ">8 mm")   # Fleischner 2017's solid-nodule bands (followup.size_band)


def _errors(error: np.ndarray) -> dict:
    """Count, mean absolute error and mean signed error (estimate - annotation) in mm; None without values."""
    return {"n": int(len(error)), "mae_mm": float(np.abs(error).mean()) if len(error) else None,
            "bias_mm": float(error.mean()) if len(error) else None}


def size_agreement(annotated: np.ndarray, estimate: np.ndarray) -> dict:
    """How one diameter estimate (mm, NaN = none) agrees with the annotated diameters (mm) of nodules.

    Only nodules with an annotated diameter count. Returns the error over the measured ones (``mae_mm``,
    ``bias_mm``), the same per band of the annotated diameter (``by_band``), and the confusion table of the
    size bands (rows: annotated band, columns: estimated band then "not measured"), with ``agreement``, the
    share of the counted nodules whose band is right (unmeasured ones count as wrong)."""
    import followup
    known = np.isfinite(annotated)
    annotated, estimate = annotated[known], estimate[known]
    measured = np.isfinite(estimate)
    error = estimate[measured] - annotated[measured]
    true_band = np.array([followup.size_band(d) for d in annotated], dtype=object)
    found_band = np.array([followup.size_band(max(d, 0.0)) if np.isfinite(d) else "not measured"
                           for d in estimate], dtype=object)
    confusion = [[int(((true_band == row) & (found_band == column)).sum())
                  for column in SIZE_BANDS + ("not measured",)] for row in SIZE_BANDS]
    return {**_errors(error), "n_nodules": int(known.sum()), "n_measured": int(measured.sum()),
            "by_band": {band: _errors(error[true_band[measured] == band]) for band in SIZE_BANDS},
            "bands": list(SIZE_BANDS), "confusion": confusion,
            "agreement": float((true_band == found_band).mean()) if len(annotated) else None}


def _evaluate_sizes(annotated: np.ndarray, scores: np.ndarray, model_has_size: bool, figure: Path,
                    title: str) -> dict:
    """:func:`size_metrics` of the model's and the plain diameters (columns 1 and 2 of evaluate's ``scores``)
    against ``annotated``, and their scatter plot in ``figure``."""
    estimates = {"model": scores[:, 1], "plain": scores[:, 2]}
    plot_sizes(annotated, estimates, figure, title=title)
    return dict(size_metrics(annotated, estimates), model_has_size_output=bool(model_has_size))


def size_metrics(annotated: np.ndarray, estimates: dict) -> dict:
    """:func:`size_agreement` of each named estimate (``{"model": mm, "plain": mm}``) against
    ``annotated``."""
    return {name: size_agreement(np.asarray(annotated, np.float64), np.asarray(estimate, np.float64))
            for name, estimate in estimates.items()}


def plot_sizes(annotated: np.ndarray, estimates: dict, path: Path, title: str = "") -> None:
    """Scatter of each estimate against the annotated diameter (mm), with the identity line and the 6 and
    8 mm band limits."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 5))
    known = np.isfinite(annotated)
    top = max([8.0] + [float(np.nanmax(v[known & np.isfinite(v)])) for v in [annotated, *estimates.values()]
                       if (known & np.isfinite(v)).any()]) * 1.1
    for (name, estimate), marker in zip(estimates.items(), ("o", "^")):
        shown = known & np.isfinite(estimate)
        ax.scatter(annotated[shown], estimate[shown], marker=marker, alpha=0.7,
                   label=f"{name} ({int(shown.sum())} of {int(known.sum())} measured)")
    ax.plot([0, top], [0, top], "k--", linewidth=1)
    for limit in (6.0, 8.0):
        ax.axvline(limit, color="grey", linewidth=0.5)
        ax.axhline(limit, color="grey", linewidth=0.5)
    ax.set(xlim=(0, top), ylim=(0, top), xlabel="annotated diameter (mm)", ylabel="estimated diameter (mm)",
           title=f"Nodule size {title}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    common.atomic_save_figure(fig, path)


def size_table(size: dict):
    """A rich table of :func:`size_metrics`: per estimate, the error overall and per band, and the
    agreement."""
    from rich.table import Table

    def fmt(value):
        return "-" if value is None else f"{value:+.2f}" if isinstance(value, float) and value < 0 else \
            f"{value:.2f}"
    table = Table(title="Nodule diameter against the annotation (nodule candidates; mm)")
    table.add_column("estimate")
    table.add_column("measured", justify="right")
    table.add_column("MAE", justify="right")
    table.add_column("bias", justify="right")
    for band in SIZE_BANDS:
        table.add_column(f"MAE {band}", justify="right")
    table.add_column("band agreement", justify="right")
    for name, found in ((k, v) for k, v in size.items() if isinstance(v, dict)):
        table.add_row(name, f"{found['n_measured']}/{found['n_nodules']}", fmt(found["mae_mm"]),
                      fmt(found["bias_mm"]), *(fmt(found["by_band"][band]["mae_mm"]) for band in SIZE_BANDS),
                      fmt(found["agreement"]))
    return table
