"""Benchmarks (not tests): ``python bench.py --help``.

Each benchmark prints a rich table of medians and side-by-side ratios, and names the machine.
"""
from __future__ import annotations

import common
import froc
import os
import statistics
import time

from pathlib import Path
from typing import Optional

import typer

import bench_detect
from bench_common import MINING_SETTINGS, console, machine_description, scratch_folder

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Timing benchmarks.")


@bench_app.callback()
def main() -> None:
    """Timing benchmarks of the toolkit's stages; each prints medians, ratios and the machine."""
    common.keep_freed_memory()


def median_seconds(func, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``func()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        func()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- benchmarks (one section per stage) -----------------------------------


def _naive_extract(scan_path, world_xyz, patch_size: int, spacing_mm: float):
    """The usual way: read with SimpleITK, resample the whole scan to the target spacing with its
    multi-threaded resampler, then crop at rounded voxels (up to half a voxel off-centre)."""
    import SimpleITK as sitk
    import numpy as np
    image = sitk.ReadImage(str(scan_path))
    size = np.array(image.GetSize()) * np.array(image.GetSpacing()) / spacing_mm
    resampled = sitk.Resample(image, [int(v) for v in np.ceil(size)], sitk.Transform(), sitk.sitkLinear,
                              image.GetOrigin(), (spacing_mm,) * 3, image.GetDirection(), -1000,
                              sitk.sitkInt16)
    volume = sitk.GetArrayViewFromImage(resampled)
    half = patch_size // 2
    padded = np.pad(volume, half, constant_values=-1000)
    out = []
    for point in world_xyz:
        i, j, k = np.rint(resampled.TransformPhysicalPointToContinuousIndex(tuple(point))).astype(int) + half
        out.append(padded[k - half:k - half + patch_size, j - half:j - half + patch_size,
                          i - half:i - half + patch_size])
    return np.stack(out)


def interleaved_medians(funcs: dict, repeats: int, before=None) -> dict:
    """Median wall time of each function, run in turn ``repeats`` times after one untimed round, so
    that a noisy neighbour slows every contender alike; ``before()`` (untimed) runs before each call."""
    times = {name: [] for name in funcs}
    for round_ in range(repeats + 1):
        for name, func in funcs.items():
            if before is not None:
                before()
            start = time.perf_counter()
            func()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _evict_from_page_cache(path) -> None:
    """Ask the kernel to drop a file's cached pages, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@bench_app.command("extract")
def bench_extract(patch_size: int = 64, spacing_mm: float = 1.0, repeats: int = 9, seed: int = 0,
                  cold: bool = typer.Option(False, help="evict the scan from the page cache before "
                                                        "every call")):
    """Patch extraction on a 512 x 512 x 250 phantom scan: 30 and 800 candidates, against the bare
    read and against resampling the whole scan first. The same voxels are timed at the phantom's
    own fine spacing and at a coarser one."""
    import numpy as np
    import SimpleITK as sitk
    from rich.table import Table
    import data
    import phantom
    rng = np.random.default_rng(seed)
    case = phantom.make_phantom_scan(rng, phantom.SIZES["realistic"], direction_kind="identity")
    folder = scratch_folder("bench_extract_")
    coarse = data.CTScan(case.scan.hu, case.scan.origin, np.array([0.70, 0.70, 1.25]), case.scan.direction)
    scans = {"fine": case.scan, "coarse": coarse}
    for name, scan in scans.items():
        data.write_mhd(scan, folder / f"{name}.mhd")
    data.extract_patches(case.scan, case.scan.origin[None], patch_size, spacing_mm)  # compile once
    table = Table(title=f"extract, {patch_size}^3 at {spacing_mm} mm from a scan of "
                        f"{tuple(case.scan.hu.shape)} voxels [z,y,x]")
    for column in ("voxel (mm)", "candidates", "read (s)", "read + extract (s)", "ratio to read",
                   "naive (s)", "naive / ours", "SimpleITK read (s)"):
        table.add_column(column, justify="right")
    for name, scan in scans.items():
        path = folder / f"{name}.mhd"
        size_ijk = np.array(scan.hu.shape[::-1])
        for count in (30, 800):
            points = data.index_to_world(rng.uniform(0.1, 0.9, (count, 3)) * size_ijk, scan)
            timed = interleaved_medians({
                "read": lambda: data.read_ct(path),
                "ours": lambda: data.read_and_extract(path, points, patch_size, spacing_mm),
                "naive": lambda: _naive_extract(path, points, patch_size, spacing_mm),
                "sitk": lambda: sitk.GetArrayFromImage(sitk.ReadImage(str(path)))}, repeats,
                before=(lambda: _evict_from_page_cache(path.with_suffix(".raw"))) if cold else None)
            table.add_row(" x ".join(f"{v:.2f}" for v in scan.spacing), str(count), f"{timed['read']:.3f}",
                          f"{timed['ours']:.3f}", f"{timed['ours'] / timed['read']:.2f}x",
                          f"{timed['naive']:.3f}", f"{timed['naive'] / timed['ours']:.2f}x",
                          f"{timed['sitk']:.3f}")
    console.print(table)
    cache = "evicted before each call" if cold else "warm"
    console.print(f"medians of {repeats} interleaved runs, page cache {cache}; read = data.read_ct "
                  "(voxels straight from the .raw); read + extract = data.read_and_extract; "
                  f"machine: {machine_description()}")


def _synthetic_submission(path, n_rows: int, seed: int = 0):
    """A LUNA16-sized submission: jittered nodule points plus random marks over the real 888 seriesuids
    (or synthetic uids and nodules when ../shared is absent).
    Returns (annotations, excluded, seriesuids) paths."""
    from pathlib import Path
    import numpy as np
    shared = Path(__file__).resolve().parent.parent / "shared" / "data" / "luna16"
    rng = np.random.default_rng(seed)
    folder = Path(path).parent
    if (shared / "annotations.csv").is_file():
        files = (shared / "annotations.csv", shared / "annotations_excluded.csv", shared / "seriesuids.csv")
        uids = [u for u in (shared / "seriesuids.csv").read_text().split() if u]
    else:
        uids = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(888)]
        header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        nodules = "".join(f"{uids[rng.integers(888)]},{x},{y},{z},{d}\n" for (x, y, z), d in
                          zip(rng.uniform(-150, 150, (1186, 3)).tolist(), rng.uniform(3, 30, 1186).tolist()))
        others = "".join(f"{uids[rng.integers(888)]},{x},{y},{z},-1\n" for x, y, z in
                         rng.uniform(-150, 150, (35000, 3)).tolist())
        files = (folder / "annotations.csv", folder / "annotations_excluded.csv", folder / "seriesuids.csv")
        files[0].write_text(header + nodules)
        files[1].write_text(header + others)
        files[2].write_text("".join(u + "\n" for u in uids))
    table = [line.split(",") for line in files[0].read_text().splitlines()[1:]]
    near = [(row[0], *[float(v) + rng.normal(0, 1.5) for v in row[1:4]]) for row in table for _ in range(3)]
    scan = rng.integers(len(uids), size=n_rows - len(near))
    xyz = rng.uniform(-180, 180, (len(scan), 3)).tolist()
    probability = np.concatenate([rng.beta(5, 2, len(near)), rng.beta(1, 8, len(scan))]).tolist()
    with open(path, "w") as handle:
        handle.write("seriesuid,coordX,coordY,coordZ,probability\n")
        rows = [(u, x, y, z) for u, x, y, z in near] + [(uids[s], *p) for s, p in zip(scan.tolist(), xyz)]
        handle.writelines(f"{u},{x!r},{y!r},{z!r},{p!r}\n" for (u, x, y, z), p in zip(rows, probability))
    return files


@bench_app.command("froc")
def bench_froc(rows: int = 754_975, repeats: int = 3, bootstrap: int = 1000, seed: int = 0):
    """LUNA16 FROC/CPM scoring of a candidates_V2-sized submission: parsing (ours against csv.DictReader),
    scoring, and the bootstrap intervals timed separately."""
    import csv
    from rich.table import Table
    folder = scratch_folder("bench_froc_")
    submission = folder / "submission.csv"
    annotations, excluded, seriesuids = _synthetic_submission(submission, rows, seed)
    import data
    reference = (froc.read_findings(annotations), froc.read_findings(excluded),
                 data.read_seriesuids(seriesuids))

    def dict_reader():
        with open(submission, newline="") as handle:
            return [(r["seriesuid"], float(r["coordX"]), float(r["coordY"]), float(r["coordZ"]),
                     float(r["probability"])) for r in csv.DictReader(handle)]

    marks = froc.read_submission(submission)
    parse_s = median_seconds(lambda: froc.read_submission(submission), repeats)
    dict_s = median_seconds(dict_reader, repeats)
    score_s = median_seconds(lambda: froc.score_marks(marks, reference[2], reference[0], reference[1],
                                                          bootstrap=0), repeats)
    with_bootstrap_s = median_seconds(lambda: froc.score_marks(marks, reference[2], reference[0],
                                                                   reference[1], bootstrap=bootstrap,
                                                                   seed=seed), repeats)
    result = froc.score_marks(marks, reference[2], reference[0], reference[1], bootstrap=0)
    table = Table(title=f"FROC scoring of {len(marks):,} marks over {len(reference[2])} scans "
                        f"({result['n_marks_scored']:,} kept by the 100-per-scan cap, "
                        f"CPM {result['cpm']:.3f})")
    table.add_column("step")
    table.add_column("median (s)", justify="right")
    table.add_column("note", justify="right")
    table.add_row("parse (numpy loadtxt)", f"{parse_s:.3f}",
                  f"csv.DictReader {dict_s:.3f} s = {dict_s / parse_s:.1f}x")
    table.add_row("score (cap, match, FROC, CPM)", f"{score_s:.3f}", "")
    table.add_row("parse + score", f"{parse_s + score_s:.3f}", "")
    table.add_row(f"bootstrap ({bootstrap} resamples)", f"{with_bootstrap_s - score_s:.3f}",
                  f"score + bootstrap {with_bootstrap_s:.3f} s")
    console.print(table)
    console.print(f"medians of {repeats} runs, page cache warm; machine: {machine_description()}")


@bench_app.command("evaluate")
def bench_evaluate(device: str = "cpu", precision: str = "fp32", size: int = 32, feature_size: int = 12,
                   window_size: int = 4, batch_size: int = 64, workers: int = 2, scans: int = 4,
                   negatives_per_scan: int = 40, scan_shape: str = "small", repeats: int = 3, seed: int = 0,
                   in_process: bool = True):
    """Whole-subset model evaluation (read, extract, model) in candidates/s on a phantom subset: with worker
    processes reading ahead against none, and the model alone on ready patches; projects all 754,975
    LUNA16 candidates. GPU: --device cuda --precision bf16 --size 64 --feature-size 48."""
    import numpy as np
    import torch
    import data
    import evaluate
    import head
    import phantom
    folder = scratch_folder("bench_evaluate_")
    phantom.write_luna_folder(folder / "luna16", n_subsets=1, scans_per_subset=scans,
                              shape=phantom.SIZES[scan_shape], seed=seed,
                              negatives_per_scan=negatives_per_scan)
    torch.manual_seed(seed)
    config = {"encoder": {"feature_size": feature_size, "window_size": window_size,
                          "input_layout": head.PRETRAINING_LAYOUT}, "pooling": "avg", "patch_size": size}
    preprocess = {"patch_size": size, "spacing_mm": 1.0, "hu_min": -1000.0, "hu_max": 1000.0}
    checkpoint = folder / "model.pt"
    head.save_checkpoint(checkpoint, {"format": head.CHECKPOINT_FORMAT,
                                      "model": head.build_classifier(config).state_dict(), "config": config,
                                      "preprocess": preprocess, "cutoff": 0.5, "epoch": 0})
    runs = iter(range(10**6))
    loop_rates = {}

    def evaluation(n_workers: int):
        result = evaluate.evaluate_model(checkpoint, folder / "luna16", [0], folder / f"eval{next(runs)}",
                                         batch_size=batch_size, readers=n_workers, device=device,
                                         precision=precision, bootstrap=0)
        loop_rates.setdefault(n_workers, []).append(result["candidates_per_second"])
        return result

    n_candidates = evaluation(workers)["n_candidates"]
    timings = {f"evaluate, {workers} reader process(es)":
               median_seconds(lambda: evaluation(workers), repeats, 0)}
    if workers and in_process:
        timings["evaluate, reading in the model's process"] = median_seconds(
            lambda: evaluation(0), repeats, 0)
    scan_path = next((folder / "luna16" / "subset0").glob("*.mhd"))
    scan = data.read_ct(scan_path)
    table_csv, _ = data.read_point_csv(folder / "luna16" / "candidates_V2.csv", "class")
    points = table_csv.world_xyz[table_csv.seriesuid == scan_path.stem]
    patches = data.extract_patches(scan, points, size, 1.0)
    ready = np.concatenate([patches] * max(1, -(-4 * batch_size // len(patches))))  # at least 4 full batches
    model, meta = head.load_classifier(checkpoint, device=device)
    model_s = median_seconds(lambda: head.predict_patches(model, ready, meta["preprocess"], device,
                                                          batch_size, precision=precision), repeats)
    extract_s = median_seconds(lambda: data.extract_patches(data.read_ct(scan_path), points, size, 1.0),
                               repeats)
    title = (f"evaluate: {n_candidates} candidates of {scans} phantom scans {phantom.SIZES[scan_shape]}, "
             f"{size}^3 patches, feature size {feature_size}, {device} {precision}")
    rows = [(f"model only, {len(ready)} patches ready", model_s, len(ready)),
            ("read + extract only, one scan", extract_s, len(points))]
    _print_evaluate_table(title, n_candidates, timings, loop_rates, rows)
    console.print(f"medians of {repeats} runs; machine: {machine_description()}")


def _print_evaluate_table(title: str, n_candidates: int, timings: dict, loop_rates: dict, rows: list) -> None:
    import numpy as np
    from rich.table import Table
    all_candidates = 754_975
    table = Table(title=title)
    for column in ("what", "median (s)", "candidates/s", "projected 754,975 candidates"):
        table.add_column(column, justify="right")
    base = None
    for label, seconds in timings.items():
        rate = n_candidates / seconds
        base = base or seconds
        table.add_row(f"{label} ({seconds / base:.2f}x)", f"{seconds:.2f}", f"{rate:.1f}",
                      f"{all_candidates / rate / 3600:.2f} h")
    for n_workers, rates in loop_rates.items():
        rate = float(np.median(rates))
        table.add_row(f"scoring loop alone, {n_workers} reader(s) (no start-up or FROC)",
                      f"{n_candidates / rate:.2f}", f"{rate:.1f}", f"{all_candidates / rate / 3600:.2f} h")
    for label, seconds, count in rows:
        rate = count / seconds
        table.add_row(label, f"{seconds:.2f}", f"{rate:.1f}", f"{all_candidates / rate / 3600:.2f} h")
    console.print(table)


@bench_app.command("encoder")
def bench_encoder(size: int = 64, feature_size: int = 48, batch: int = 2, window: int = 7,
                  device: str = "cpu", bf16: bool = False, repeats: int = 3, seed: int = 0):
    """Swin encoder inference and training step (forward + backward) against MONAI's SwinTransformer
    with the same weights when MONAI is importable (it is not a dependency: run with an environment that has
    it). GPU: --device cuda --bf16 --size 96."""
    import contextlib
    import torch
    from rich.table import Table
    import swin_encoder
    torch.manual_seed(seed)
    dev = torch.device(device)
    ours = swin_encoder.SwinEncoder(1, feature_size, window_size=window).to(dev)
    models = {"ours": ours}
    try:  # make_swin_fixture is the one file that imports MONAI; without MONAI it does not import
        from make_swin_fixture import reference_encoder
        reference = reference_encoder(feature_size, window).to(dev)
        reference.load_state_dict(ours.state_dict())
        models = {"MONAI SwinTransformer": reference, "ours": ours}
    except ImportError:
        console.print("[yellow]MONAI not importable: timing our encoder only[/]")
    x = torch.rand(batch, 1, size, size, size, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def synced(func):
        def run():
            func()
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    def infer(model):
        model.eval()
        with torch.no_grad(), autocast():
            return model(x)

    def train_step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast():
            outputs = model(x)
        sum(o.float().square().mean() for o in outputs).backward()

    results = {name: (median_seconds(synced(lambda m=m: infer(m)), repeats),
                      median_seconds(synced(lambda m=m: train_step(m)), repeats))
               for name, m in models.items()}
    table = Table(title=f"Swin encoder, batch {batch} x 1 x {size}^3, feature size {feature_size}, "
                        f"window {window}, {device}{' bf16' if bf16 else ' float32'}")
    for column in ("model", "inference (s)", "images/s", "train step (s)", "images/s"):
        table.add_column(column, justify="right")
    for name, (infer_s, train_s) in results.items():
        table.add_row(name, f"{infer_s:.3f}", f"{batch / infer_s:.1f}", f"{train_s:.3f}",
                      f"{batch / train_s:.1f}")
    console.print(table)
    if len(models) == 2:
        (ref_infer, ref_train), (our_infer, our_train) = results.values()
        expected, got = infer(models["MONAI SwinTransformer"]), infer(ours)
        error = max(float((a.float() - b.float()).abs().max() / a.float().abs().max())
                    for a, b in zip(expected, got))
        console.print(f"speed-up: inference {ref_infer / our_infer:.2f}x, "
                      f"train step {ref_train / our_train:.2f}x; max relative output difference {error:.2e}")
    console.print(f"medians of {repeats} runs; machine: {machine_description()}")

@bench_app.command("gpu")
def bench_gpu(device: str = "cuda", size: int = 64, feature_size: int = 48, window: int = 7,
              batches: str = "32,64,128,256", paths: str = "eager,compiled", precision: str = "bf16",
              repeats: int = 5, scans: int = 100, distinct_scans: int = 4, per_scan: int = 850,
              scan_shape: str = "300,512,512", readers: int = 8, budget_s: float = 330.0,
              out: Optional[Path] = None):
    """The GPU benchmark (bench_gpu.py): for each path (eager; compiled, as --compile) and batch, training
    and inference samples/s, peak memory and MFU; equality with MONAI's outputs and compiled against eager;
    device time by kernel category; the evaluate pipeline's candidates/s over LUNA16-sized phantom scans.
    Keeps within --budget-s. On the CPU with small sizes it checks that everything runs."""
    import bench_gpu
    chosen = tuple(p.strip() for p in paths.split(","))
    if not set(chosen) <= set(bench_gpu.PATHS):
        raise typer.BadParameter(f"--paths: choose from {', '.join(bench_gpu.PATHS)}")
    try:
        shape, sizes = bench_gpu.check_scan_shape(scan_shape), bench_gpu.check_batches(batches)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    bench_gpu.run(device, size, feature_size, window, sizes, chosen,
                  precision, repeats, scans, distinct_scans, per_scan, shape, readers, budget_s, out, console)
    console.print(f"machine: {machine_description()}")


def _train_step_speed(patch_size: int, feature_size: int, window_size: int, batch_size: int, device: str,
                      precision: str, repeats: int) -> dict:
    """Samples/s of one fine-tuning step (augment + forward + loss + backward + AdamW) on in-memory batches,
    and peak memory: CUDA max allocated, or on the CPU the peak RSS of this (fresh) process."""
    import resource
    import torch
    import bench_gpu
    torch_device = torch.device(device)
    model = bench_gpu.build_model("eager", patch_size, feature_size, window_size, torch_device)
    bench_gpu.reset_peak(torch_device)
    step = bench_gpu.training_step(model, batch_size, patch_size, torch_device, precision)
    rate = bench_gpu.timed_rate(step, batch_size, torch_device, 2, repeats)
    peak_mb = bench_gpu.peak_mib(torch_device)
    if peak_mb is None:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"samples_per_s": rate, "step_s": batch_size / rate, "peak_mb": peak_mb}


def _train_step_speed_child(queue, *args) -> None:
    queue.put(_train_step_speed(*args))


@bench_app.command("train")
def bench_train(device: str = "cpu", repeats: int = 3, small_batch: int = 0, large_batch: int = 0):
    """Fine-tuning speed and peak memory at 32^3 / feature_size 12 / window 4 and at 64^3 / feature_size 48 /
    window 7 (the published weights' model). On CUDA, bf16 autocast against fp32 in the same run.
    Each case runs in a fresh process so its peak memory is its own. Batches: 8 and 4 on the CPU, 32 and 32
    on a GPU, unless given."""
    import multiprocessing
    from rich.table import Table
    on_gpu = device.startswith("cuda")
    cases = [(32, 12, 4, small_batch or (32 if on_gpu else 8)),
             (64, 48, 7, large_batch or (32 if on_gpu else 4))]
    precisions = ["fp32", "bf16"] if on_gpu else ["fp32"]
    context = multiprocessing.get_context("spawn")
    table = Table(title=f"fine-tuning step (augment, forward, backward, AdamW) on {device}")
    for column in ("patch", "features", "window", "batch", "precision", "step s", "samples/s", "peak MiB",
                   "vs fp32"):
        table.add_column(column, justify="right", no_wrap=True)
    for patch, feature_size, window, batch in cases:
        baseline = None
        for precision in precisions:
            queue = context.Queue()
            child = context.Process(target=_train_step_speed_child, args=(queue, patch, feature_size, window,
                                                                          batch, device, precision, repeats))
            child.start()
            result = queue.get()
            child.join()
            baseline = baseline or result["samples_per_s"]
            table.add_row(f"{patch}^3", str(feature_size), str(window), str(batch), precision,
                          f"{result['step_s']:.3f}", f"{result['samples_per_s']:.3g}",
                          f"{result['peak_mb']:.0f}", f"{result['samples_per_s'] / baseline:.2f}x")
    console.print(table)
    memory = "torch.cuda.max_memory_allocated" if on_gpu else "peak RSS of the whole process (torch included)"
    console.print(f"medians of {repeats} steps after 2 warm-up steps, in-memory batches (no disk reads); "
                  f"memory: {memory}; machine: {machine_description()}")


def _held_out(run_dir, root, out) -> dict:
    """CPM (with its 95% interval) and AUC of a run's best.pt on the held-out subset 3."""
    import evaluate
    result = evaluate.evaluate_model(run_dir / "best.pt", root, [3], out, readers=1, device="cpu",
                                     bootstrap=1000)
    return {"cpm": result["cpm"], "ci": result["cpm_ci95"], "auc": result["auc"]}


def _mining_seed(folder, seed: int, scans: int, negatives: int, max_per_scan: int, rounds: int,
                 head_epochs: int, finetune_epochs: int, views: int, finetune_lr: float) -> dict:
    """Every variant of one phantom seed: ``{variant: {"head": metrics, "finetune": metrics}}``."""
    import json
    import data
    import features
    import mining
    import phantom
    import train
    root = folder / "luna16"
    if not (root / "phantom_manifest.json").is_file():
        phantom.write_luna_folder(root, n_subsets=4, scans_per_subset=scans, seed=seed,
                                  negatives_per_scan=negatives, nodules_per_scan=(1, 3),
                                  negative_mix=phantom.LUNA_LIKE_MIX, force=True)
    split = dict(val_subsets=[2], test_subsets=[3], seed=seed, quiet=True)
    results = {}

    def train_and_score(work, variant: str) -> None:
        tag = features.cache_features(work, test_subsets=[3], views=views, init_seed=seed, quiet=True,
                                      device="cpu", **MINING_SETTINGS)
        head_run = train.train_head(work, features=tag, epochs=head_epochs, run=f"head-{variant}",
                                    device="cpu", **split)
        tuned = train.finetune(work, head_from=f"head-{variant}", epochs=finetune_epochs, lr=finetune_lr,
                               epoch_samples=512, batch_size=16, views=views, run=f"ft-{variant}",
                               device="cpu", **split, **MINING_SETTINGS)
        negatives_cached = sum(
            json.loads((data.subset_dir(work, k) / "manifest.json").read_text())["n_patches"]
            - json.loads((data.subset_dir(work, k) / "manifest.json").read_text())["n_positive"]
            for k in (0, 1))
        results[variant] = {"head": _held_out(head_run, root, work / "eval" / variant),
                            "finetune": _held_out(tuned, root, work / "eval" / f"ft-{variant}"),
                            "training_negatives": negatives_cached}

    for variant, all_candidates in (("sample", False), ("every candidate", True)):
        work = folder / ("work-all" if all_candidates else "work")
        for k in range(4):
            data.extract_subset(root, work, k, patch_size=32, spacing_mm=1.0,
                                all_candidates=all_candidates or k == 3, sample_seed=seed,
                                show_progress=False)
        train_and_score(work, variant)
        if all_candidates:
            break
        for n in range(1, rounds + 1):
            for k in (0, 1):  # mine the training subsets with the previous round's head
                mining.mine_subset(root, work, k, "head-sample" if n == 1 else f"head-mined {n - 1}",
                                   max_per_scan=max_per_scan, readers=1, device="cpu")
            train_and_score(work, f"mined {n}")
    return results


@bench_app.command("mining")
def bench_mining(seeds: str = "0,1", scans_per_subset: int = 12, negatives_per_scan: int = 150,
                 max_per_scan: int = 10, rounds: int = 2, head_epochs: int = 40, finetune_epochs: int = 3,
                 views: int = 2, finetune_lr: float = 1e-4):
    """Held-out CPM of the default negative sample, rounds of hard-negative mining and every candidate, for
    the frozen-feature head and for fine-tuning from it, on phantoms with LUNA16-like candidates (mostly easy
    lung points, a few look-alikes a scan): subsets 0-1 train, 2 validates, 3 is held out."""
    import numpy as np
    from rich.table import Table
    base = scratch_folder("bench_mining_")
    by_seed = {int(s): _mining_seed(base / f"seed{s}", int(s), scans_per_subset, negatives_per_scan,
                                    max_per_scan, rounds, head_epochs, finetune_epochs, views, finetune_lr)
               for s in seeds.split(",")}
    table = Table(title=f"held-out CPM (95% interval) on {scans_per_subset} phantom scans a seed, about "
                        f"{negatives_per_scan} negatives a scan; mining {max_per_scan} a scan a round")
    for column in ("training negatives", "stage", *(f"seed {s}" for s in by_seed), "mean CPM", "mean AUC"):
        table.add_column(column, justify="right")
    for variant in next(iter(by_seed.values())):
        for stage in ("head", "finetune"):
            cells = [by_seed[s][variant][stage] for s in by_seed]
            negatives = "/".join(str(by_seed[s][variant]["training_negatives"]) for s in by_seed)
            table.add_row(f"{variant} ({negatives})", stage,
                          *(f"{c['cpm']:.3f} ({c['ci'][0]:.2f}-{c['ci'][1]:.2f})" for c in cells),
                          f"{np.mean([c['cpm'] for c in cells]):.3f}",
                          f"{np.mean([c['auc'] for c in cells]):.3f}")
    console.print(table)
    console.print(f"feature size 12, window 4, centre pooling, {views} views, 32^3 at 1 mm, "
                  f"head {head_epochs} epochs, fine-tuning {finetune_epochs} epochs of 512 draws at lr "
                  f"{finetune_lr:g}; machine: {machine_description()}")



def _crossval_mining_seed(folder, seed: int, scans: int, negatives: int, max_per_scan: int, head_epochs: int,
                          views: int) -> dict:
    """A four-fold head cross-validation of one phantom seed with and without one round of mining inside each
    fold: ``{"plain": result, "mined": result, "difference": paired}``."""
    import crossval
    import data
    import features
    import phantom
    root, work = folder / "luna16", folder / "work"
    if not (root / "phantom_manifest.json").is_file():
        phantom.write_luna_folder(root, n_subsets=4, scans_per_subset=scans, seed=seed,
                                  negatives_per_scan=negatives, nodules_per_scan=(1, 3),
                                  negative_mix=phantom.LUNA_LIKE_MIX, force=True)
    for k in range(4):
        data.extract_subset(root, work, k, patch_size=32, spacing_mm=1.0, sample_seed=seed,
                            show_progress=False)
    tag = features.cache_features(work, test_subsets=[], views=views, init_seed=seed, quiet=True,
                                  device="cpu", **MINING_SETTINGS)
    shared = dict(folds=[0, 1, 2, 3], stage="head", features=tag, epochs=head_epochs, seed=seed, device="cpu",
                  readers=1, quiet=True)
    results = {"plain": crossval.run_crossval(work, root, name="plain", **shared),
               "mined": crossval.run_crossval(work, root, name="mined", mine_rounds=1,
                                              max_per_scan=max_per_scan, **shared)}
    submissions = [froc.read_submission(crossval.crossval_dir(work, n) / "submission.csv")
                   for n in results]
    uids = [row.split(",")[0] for row in (root / "seriesuids.csv").read_text().split()]
    results["difference"] = froc.paired_cpm_difference(
        *submissions, uids, froc.read_findings(root / "annotations.csv"),
        froc.read_findings(root / "annotations_excluded.csv"))
    return results


@bench_app.command("crossval-mining")
def bench_crossval_mining(seeds: str = "0,1", scans_per_subset: int = 12, negatives_per_scan: int = 150,
                          max_per_scan: int = 10, head_epochs: int = 40, views: int = 2):
    """Pooled four-fold cross-validated CPM of the frozen-feature head with and without one round of mining
    inside each fold (``crossval --mine-rounds 1``), on phantoms with LUNA16-like candidates, and the paired
    bootstrap interval of the difference."""
    from rich.table import Table
    base = scratch_folder("bench_crossval_mining_")
    started = time.perf_counter()
    by_seed = {int(s): _crossval_mining_seed(base / f"seed{s}", int(s), scans_per_subset, negatives_per_scan,
                                             max_per_scan, head_epochs, views) for s in seeds.split(",")}
    table = Table(title=f"pooled 4-fold CPM (95% interval), {4 * scans_per_subset} phantom scans a seed, "
                        f"about {negatives_per_scan} candidates a scan; "
                        f"mining {max_per_scan} a scan inside each fold")
    for column in ("seed", "nodules", "no mining", "1 round of mining", "difference (paired 95%)",
                   "resamples better"):
        table.add_column(column, justify="right")
    for s, r in by_seed.items():
        d = r["difference"]
        table.add_row(str(s), str(d["n_nodules"]),
                      *(f"{r[v]['cpm']:.3f} ({r[v]['cpm_ci95'][0]:.2f}-{r[v]['cpm_ci95'][1]:.2f})"
                        for v in ("plain", "mined")),
                      f"{d['difference']:+.3f} ({d['ci95'][0]:+.2f} to {d['ci95'][1]:+.2f})",
                      f"{d['share_of_resamples_above_zero']:.0%}")
    console.print(table)
    console.print(f"feature size 12, window 4, centre pooling, {views} views, 32^3 at 1 mm, "
                  f"head {head_epochs} epochs; {time.perf_counter() - started:.0f} s; folder {base}; "
                  f"machine: {machine_description()}")


# --- nodule size ----------------------------------------------------------------

SHARED_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")


def _size_rows(metrics: dict, run: str, estimates=("model", "plain")) -> list:
    """Table rows of evaluate's size metrics of one run: per estimate, MAE (bias) overall and per band,
    agreement."""
    import evaluate
    rows = []
    for estimate in estimates:
        found = metrics["size"][estimate]
        cells = [found["by_band"][band] for band in evaluate.SIZE_BANDS]
        def fmt(e):
            return "-" if e["mae_mm"] is None else f"{e['mae_mm']:.2f} ({e['bias_mm']:+.2f}), n={e['n']}"
        rows.append([run if estimate == "model" else "plain measurement (-400 HU)",
                     f"{found['n_measured']}/{found['n_nodules']}", fmt(found), *map(fmt, cells),
                     "-" if found["agreement"] is None else f"{found['agreement']:.2f}"])
    return rows


def _real_nodule_sizes(checkpoints: dict) -> list:
    """Rows ``[scan, annotated, model estimates..., plain 32^3 patch, plain 64^3 patch]`` for the LUNA16
    nodules of the LIDC-IDRI series in ../shared/data/real_ct (none when absent)."""
    from pathlib import Path
    import numpy as np
    import data
    import predict
    import sizing
    real = Path(SHARED_DATA) / "real_ct"
    if not real.is_dir():
        return []
    annotations, _ = data.read_point_csv(Path(SHARED_DATA) / "luna16" / "annotations.csv", "diameter_mm")
    rows = []
    for series in sorted(p for p in real.glob("*/*/*") if p.is_dir()):
        found = np.flatnonzero(annotations.seriesuid == series.name)
        if not len(found):
            continue
        points = annotations.world_xyz[found]
        model = {name: predict.predict_points(path, series, points, device="cpu")
                 for name, path in checkpoints.items()}
        _, wide = data.read_and_extract(series, points, 64, 1.0)
        wide_mm = sizing.measure_diameters(wide, 1.0)
        for n, row in enumerate(found):
            cells = [model[name][n]["model_diameter_mm"] for name in checkpoints]
            cells += [model[next(iter(checkpoints))][n]["plain_diameter_mm"], float(wide_mm[n])]
            rows.append([series.parents[1].name, f"{annotations.value[row]:.1f}",
                         *("-" if c is None or not np.isfinite(c) else f"{c:.1f}" for c in cells)])
    return rows


@bench_app.command("size")
def bench_size(demo_dir: str = "demo_work", scans: int = 24, seed: int = 100):
    """Nodule diameters from the demo's models (their size output) and from the plain measurement, against the
    annotated ones: on the nodule candidates of ``scans`` fresh phantom scans (every size and type), and on
    the four LUNA16 nodules of the two real LIDC-IDRI scans in ../shared/data/real_ct when present. Runs the
    demo first when ``demo_dir`` has none."""
    from pathlib import Path
    from rich.table import Table
    import demo
    import evaluate
    import phantom
    work = Path(demo_dir)
    runs = {name: work / "runs" / name / "best.pt" for name in ("demo-head", "demo-finetune")}
    if not all(path.is_file() for path in runs.values()):
        demo.run_demo(work)
    root = work / "bench_size" / "luna16"
    if not (root / "phantom_manifest.json").is_file():
        phantom.write_luna_folder(root, n_subsets=1, scans_per_subset=scans, seed=seed, negatives_per_scan=5,
                                  force=True)
    table = Table(title=f"diameter error (mm): MAE (bias), on the nodule candidates of {scans} "
                        "held-out phantom scans")
    for column in ("estimate", "measured", "all", *(f"annotated {b}" for b in evaluate.SIZE_BANDS),
                   "band agreement"):
        table.add_column(column, justify="right")
    for name, checkpoint in runs.items():
        metrics = evaluate.evaluate_model(checkpoint, root, [0], work / "bench_size" / name, views=8,
                                          readers=1, device="cpu", bootstrap=0)
        last = name == list(runs)[-1]   # the plain measurement is the same for every run: shown once
        for row in _size_rows(metrics, name, ("model", "plain") if last else ("model",)):
            table.add_row(*row)
    console.print(table)
    real = _real_nodule_sizes(runs)
    if real:
        table = Table(title="the LUNA16 nodules of two real LIDC-IDRI scans (CC BY 3.0): diameter (mm)")
        for column in ("patient", "annotated", *runs, "plain, 32^3 patch", "plain, 64^3 patch"):
            table.add_column(column, justify="right")
        for row in real:
            table.add_row(*row)
        console.print(table)
    else:
        console.print("../shared/data/real_ct absent: the real-scan table is skipped")
    console.print("models: the demo's (phantom-trained, feature size 12, 32^3 at 1 mm); "
                  f"machine: {machine_description()}")

# --- detect: candidate sensitivity, real scans, speed and memory, end to end (bench_detect.py) -----

bench_app.command("detect")(bench_detect.bench_detect)
bench_app.command("real-anatomy")(bench_detect.bench_real_anatomy)


if __name__ == "__main__":
    bench_app()
