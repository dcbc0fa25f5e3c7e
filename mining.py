"""Hard-negative mining: add to a subset's patch cache the negatives a trained model finds hardest.

``extract --subsets K --hard-negatives RUN --max-per-scan N`` scores every negative candidate of subset K with
RUN's best model (each scan read once and cut as ``evaluate`` does) and adds, for each scan, those of its N
highest-scoring negatives that the cache does not hold yet. Their ``index.csv`` rows name RUN in the
``mined`` column and the subsets RUN trained and validated on (its ``config.json``) in ``mined_saw``, so that
cross-validation can refuse a row chosen by a model that saw a fold's test subset; rows mined inside a
cross-validation fold (``crossval --mine-rounds``) carry that fold's test subset in ``mined_for`` and only
that fold trains on them. They are appended after the existing rows, so ``cache-features`` only encodes them.
The same call again adds nothing (the top N are in the cache by then); a round with a model trained on the
mined cache adds what that model now finds hardest. Finished scans are kept in ``W/mining/<run>/subset<k>``
until the cache is written, so a killed run resumes; a finished round leaves ``done.json`` there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

import common
import data
import evaluate
import features
import head
import options
from common import UserError


@dataclass
class MiningSummary:
    subset: int
    run: str
    scans: int
    added: int
    n_patches: int
    unreadable: dict


def seen_subsets(checkpoint: Path) -> Optional[list]:
    """The subsets the run of ``checkpoint`` trained and validated on (from ``config.json`` beside it), or
    None when no run configuration records them."""
    try:
        split = json.loads((Path(checkpoint).parent / "config.json").read_text())["resolved"]["split"]
        return sorted(set(split["train"]["subsets"]) | set(split["val"]["subsets"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def visible_to(row: list, mined_for: str) -> bool:
    """Whether a cache row (:data:`data.INDEX_COLUMNS`) is used by a job for fold ``mined_for`` ("" outside
    one)."""
    return row[8] in ("", mined_for)


def _negatives_to_score(data_dir: Path, scans: dict) -> data.PointTable:
    candidates, _ = data.read_point_csv(data.candidates_file(data_dir), "class", strict=False)
    keep = np.isin(candidates.seriesuid, list(scans)) & (candidates.value <= 0.5)
    return candidates.take(np.flatnonzero(keep))


def _top_of_scan(scores: np.ndarray, max_per_scan: int) -> np.ndarray:
    """Positions of the ``max_per_scan`` highest scores (ties by file order), highest first."""
    return np.lexsort((np.arange(len(scores)), -scores))[:max_per_scan]


def _score_and_keep(run: evaluate.ModelRun, todo: list, max_per_scan: int, in_cache: set, tags: dict,
                    negatives: data.PointTable, console) -> dict:
    """Score each scan's negatives; save, per scan, the patches and index rows of those of its top
    ``max_per_scan`` not in the cache. Returns ``{seriesuid: reason}`` of unreadable scans."""
    rows_of = negatives.rows_by_scan()
    scores = {uid: np.full(len(rows_of[uid]), np.nan) for uid, _, _ in todo}
    patches = {uid: {} for uid, _, _ in todo}

    def keep(uid: str, chunk: evaluate.ScoredChunk) -> None:
        first, cut = chunk.first, chunk.patches
        scores[uid][first:first + len(cut)] = chunk.probability
        # the scan's top so far: a negative that drops out of it never comes back, so only these patches are
        # kept, as copies (a view would keep its whole chunk, page-locked on a GPU, until the scan is done)
        top = _top_of_scan(np.nan_to_num(scores[uid], nan=-np.inf), max_per_scan).tolist()
        kept = patches[uid]
        patches[uid] = {n: kept[n] if n in kept else cut[n - first].numpy().copy() for n in top}
        if not np.isnan(scores[uid]).any():
            fresh = [n for n in top if _key(uid, negatives.world_xyz[rows_of[uid][n]]) not in in_cache]
            picked = rows_of[uid][fresh]
            block = (np.stack([patches[uid][n] for n in fresh]) if fresh
                     else np.zeros((0, *cut.shape[1:]), np.int16))
            run.parts.save(uid, block, data.index_rows(uid, negatives.world_xyz[picked],
                                                       negatives.value[picked], np.full(len(picked), np.nan),
                                                       **tags))
            del patches[uid]
    total = sum(len(s) for s in scores.values())
    return common.over_scans(evaluate.scored_chunks(run, todo), keep, total=total,
                             label="scoring negatives", console=console, show_progress=console is not None,
                             step=lambda chunk: len(chunk.patches), transient=True)


def _key(uid: str, world_xyz) -> tuple:
    return (uid, *(repr(float(v)) for v in world_xyz))


def mine_subset(data_dir: Path, work_dir: Path, subset: int, model: str, *, readers: int = 2,
                device: str = "auto", for_fold: Optional[int] = None, console=None, compile: bool = False,
                **settings) -> MiningSummary:
    """Add the hard negatives of ``model`` (a run name, run folder or ``.pt`` file) to the patch cache of one
    subset;
    ``for_fold``: the test subset of the cross-validation fold they are mined for (only it uses them).
    ``settings``: the options of ``options.stage_names("mining")`` (at most this many a scan, batch size,
    precision, views); those left out take their defaults there. ``compile``: the encoder through
    torch.compile (``head.compile_encoder``)."""
    chosen = {**options.defaults("mining"), **options.given("mining", settings)}
    return _mine_subset(Path(data_dir), Path(work_dir), subset, model, readers, device, for_fold, console,
                        compile, **chosen)


def _mine_subset(data_dir: Path, work_dir: Path, subset: int, model: str, readers: int, device: str,
                 for_fold: Optional[int], console, compile: bool, *,
                 max_per_scan: int, batch_size: int, precision: str,
                 views: Optional[int]) -> MiningSummary:
    cache = data.subset_dir(work_dir, subset)
    if not (cache / "manifest.json").is_file():
        raise UserError(f"no patch cache for subset {subset} under {work_dir / 'patches'}; "
                        f"run `python luna_cli.py extract --subset {subset}` first")
    manifest = json.loads((cache / "manifest.json").read_text())
    checkpoint = head.model_checkpoint(work_dir, model, "--hard-negatives")
    name = checkpoint.parent.name if checkpoint.name == "best.pt" else checkpoint.stem
    features.check_preprocess_matches(head.read_checkpoint(checkpoint)["preprocess"],
                                      int(manifest["patch_size"]), float(manifest["spacing_mm"]),
                                      str(checkpoint))
    folder = work_dir / "mining" / name / f"subset{subset}"
    model_run, _ = evaluate.open_model_run(checkpoint, data.candidates_file(data_dir), folder / "parts",
                                           views, batch_size, readers, device, precision, compile,
                                           max_per_scan=max_per_scan)
    seen = seen_subsets(checkpoint)
    tags = {"mined": name, "mined_saw": common.format_subsets(seen) if seen is not None else "",
            "mined_for": "" if for_fold is None else str(int(for_fold))}
    done_path = folder / "done.json"
    if done_path.is_file() and json.loads(done_path.read_text()).get("key") == model_run.parts.key:
        return MiningSummary(subset, name, 0, 0, manifest["n_patches"], {})
    scans = data.subset_scans(data_dir, [subset])
    negatives = _negatives_to_score(data_dir, scans)
    in_cache = {_key(row[0], row[1:4]) for row in data.read_cache_index(cache)
                if visible_to(row, tags["mined_for"])}
    todo = [(uid, scans[uid], negatives.world_xyz[rows]) for uid, rows in negatives.rows_by_scan().items()
            if uid not in model_run.parts.done()]
    unreadable = _score_and_keep(model_run, todo, max_per_scan, in_cache, tags, negatives, console)
    added, n_patches = _append_parts(cache, manifest, model_run.parts, tags, max_per_scan)
    if not unreadable:
        common.atomic_write_json(done_path, {"key": model_run.parts.key, "added": added})
        model_run.parts.remove()
    return MiningSummary(subset, name, len(todo), added, n_patches, unreadable)


def _append_parts(cache: Path, manifest: dict, parts: common.Parts, tags: dict,
                  max_per_scan: int) -> tuple[int, int]:
    """Append the mined patches of every finished scan to the cache (once: rows already there are skipped)."""
    rows = data.read_cache_index(cache)
    present = {_key(row[0], row[1:4]) for row in rows if visible_to(row, tags["mined_for"])}
    sources, new_rows = [np.load(cache / "patches.npy", mmap_mode="r")], []
    for uid in sorted(parts.done()):
        mined = [n for n, row in enumerate(parts.meta(uid)) if _key(row[0], row[1:4]) not in present]
        if mined:
            sources.append(parts.load(uid)[mined])
            new_rows.extend(parts.meta(uid)[n] for n in mined)
    if not new_rows:
        return 0, len(rows)
    n_patches, n_positive = data.write_cache(cache, sources, rows + new_rows, int(manifest["patch_size"]))
    manifest.update(n_patches=n_patches, n_positive=n_positive,
                    mined=manifest.get("mined", []) + [{"run": tags["mined"], "saw": tags["mined_saw"],
                                                        "for_fold": tags["mined_for"], "added": len(new_rows),
                                                        "max_per_scan": max_per_scan}])
    common.atomic_write_json(cache / "manifest.json", manifest)
    return len(new_rows), n_patches
