"""The detection benchmarks behind ``python bench.py detect`` and ``python bench.py real-anatomy``.

``detect`` measures candidate detection (:func:`detect.detect_scan`) on held-out phantom scans: the
sensitivity against candidates per scan by size band, type and juxtapleural placement (official hit rule),
the first-hit rank of each LUNA16 nodule of the real LIDC-IDRI series in ../shared/data/real_ct, the time and
peak memory of one 512 x 512 x 300 scan in a fresh process, and end to end the CPM of the frozen-feature
head trained and evaluated on the detected candidates against the same pipeline on the generator's
candidates_V2.csv. ``real-anatomy`` inserts nodules into those real CTs (``synth --background``) and reports
the detection sensitivity by size, placement, type and shape with 95% Wilson intervals, the detection time
a scan, and, when the demo's models are there, their AUC, CPM and size error on the inserted folder.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import typer

import common
from bench_common import MINING_SETTINGS, console, machine_description, scratch_folder


# --- detect: candidate sensitivity, real scans, speed and memory, end to end -------------

DETECT_LIMITS = (50, 100, 200, 300, 500)


def _first_hit_ranks(world_xyz, centres, diameters) -> list:
    """Rank (0 = best) of the first candidate inside each nodule's sphere (official hit rule), None when
    missed."""
    import numpy as np
    ranks = []
    for centre, diameter in zip(centres, diameters):
        hit = np.flatnonzero(((world_xyz - centre) ** 2).sum(axis=1) < (diameter / 2) ** 2)
        ranks.append(int(hit[0]) if len(hit) else None)
    return ranks


def _size_band(diameter: float) -> str:
    return ("< 6 mm" if diameter < 6 else "6-10 mm" if diameter < 10 else "10-20 mm" if diameter < 20
            else ">= 20 mm")


def _phantom_detect_sensitivity(scans: int, seed: int) -> tuple:
    """``(rows of (size band, type, juxtapleural, first-hit rank), median seconds a scan)`` on held-out
    phantoms."""
    import numpy as np
    import detect
    import phantom
    rows, seconds = [], []
    for n in range(scans):
        case = phantom.make_phantom_scan(np.random.default_rng([seed, n]), phantom.SIZES["small"],
                                         negatives_per_scan=0, nodules_per_scan=(3, 6))
        start = time.perf_counter()
        found = detect.detect_scan(case.scan, max(DETECT_LIMITS))
        seconds.append(time.perf_counter() - start)
        nodules = [f for f in case.nodules if not f.excluded]
        ranks = _first_hit_ranks(found.world_xyz, [f.center_xyz for f in nodules],
                                 [f.diameter_mm for f in nodules])
        rows += [(_size_band(f.diameter_mm), f.kind, f.juxtapleural, rank) for f, rank in zip(nodules, ranks)]
    return rows, statistics.median(seconds)


def _sensitivity_table(rows: list, title: str):
    from rich.table import Table
    table = Table(title=title)
    for column in ("nodules", "n", *(f"{n}/scan" for n in DETECT_LIMITS)):
        table.add_column(column, justify="right")
    groups = [("all", lambda r: True)] + [(band, lambda r, b=band: r[0] == b) for band in
                                          ("< 6 mm", "6-10 mm", "10-20 mm", ">= 20 mm")]
    groups += [(kind, lambda r, k=kind: r[1] == k) for kind in ("solid", "part-solid", "ground-glass")]
    groups += [("juxtapleural", lambda r: r[2]), ("not juxtapleural", lambda r: not r[2])]
    for name, keep in groups:
        ranks = [r[3] for r in rows if keep(r)]
        table.add_row(name, str(len(ranks)),
                      *(f"{sum(x is not None and x < n for x in ranks) / max(1, len(ranks)):.3f}"
                        for n in DETECT_LIMITS))
    return table


def _real_detect_ranks(real_ct, annotations_csv) -> list:
    """``[(series, diameter, first-hit rank, seconds)]`` of the LUNA16 nodules in the real LIDC-IDRI
    series."""
    import numpy as np
    import data
    import detect
    annotations, _ = data.read_point_csv(annotations_csv, "diameter_mm")
    found_rows = []
    for series in sorted(p for p in real_ct.glob("*/*/*") if p.is_dir()):
        rows = np.flatnonzero(annotations.seriesuid == series.name)
        if not len(rows):
            continue
        scan = data.read_ct(series)
        start = time.perf_counter()
        found = detect.detect_scan(scan, max(DETECT_LIMITS))
        seconds = time.perf_counter() - start
        ranks = _first_hit_ranks(found.world_xyz, annotations.world_xyz[rows], annotations.value[rows])
        found_rows += [(f"{series.parent.parent.name} {scan.hu.shape[::-1]}", float(annotations.value[r]),
                        rank, seconds) for r, rank in zip(rows, ranks)]
    return found_rows


def _memory_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` of this process in MiB, from /proc (Linux; ru_maxrss would count the
    parent's memory at the fork); NaN elsewhere."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _detect_speed_child(queue, path: str, repeats: int) -> None:
    import data
    import detect
    scan = data.read_ct(path)
    read_mb = _memory_mb("VmHWM")
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        found = detect.detect_scan(scan)
        seconds.append(time.perf_counter() - start)
    queue.put({"seconds": statistics.median(seconds), "all": seconds, "read_mb": read_mb,
               "n": len(found.score), "peak_mb": _memory_mb("VmHWM")})


def _detect_speed(folder, repeats: int) -> dict:
    """Detection time and peak RSS (fresh process) on a 512 x 512 x 300 phantom at 0.7 x 0.7 x 1.25 mm."""
    import multiprocessing
    import numpy as np
    import data
    import phantom
    case = phantom.make_phantom_scan(np.random.default_rng(7), (300, 512, 512), negatives_per_scan=0)
    scan = case.scan
    scan.spacing = np.array([0.7, 0.7, 1.25])   # a LUNA16-like field of view: the anatomy scales with it
    data.write_mhd(scan, folder / "speed.mhd")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_detect_speed_child, args=(queue, str(folder / "speed.mhd"), repeats))
    child.start()
    result = queue.get()
    child.join()
    return result


def _pipeline_cpm(root, work, candidates, seed: int, head_epochs: int, views: int) -> dict:
    """extract -> cache-features (subsets 0-2) -> train-head -> evaluate subset 3, all from one
    candidates CSV."""
    import data
    import evaluate
    import features
    import train
    for k in range(4):   # train-head wants the held-out subset extracted too (it never reads it)
        data.extract_subset(root, work, k, patch_size=32, spacing_mm=1.0, sample_seed=seed,
                            show_progress=False, candidates=candidates)
    tag = features.cache_features(work, test_subsets=[3], views=views, init_seed=seed, quiet=True,
                                  device="cpu", **MINING_SETTINGS)
    run = train.train_head(work, features=tag, epochs=head_epochs, run="head", device="cpu", val_subsets=[2],
                           test_subsets=[3], seed=seed, quiet=True)
    result = evaluate.evaluate_model(run / "best.pt", root, [3], work / "eval", readers=1, device="cpu",
                                     bootstrap=1000, candidates=candidates)
    return {"cpm": result["cpm"], "ci": result["cpm_ci95"], "auc": result["auc"], "n": result["n_candidates"],
            "positives": result["n_positive"], "scans": result["n_scans"]}


def bench_detect(scans: int = 24, seed: int = 13, repeats: int = 3, e2e_scans_per_subset: int = 6,
                 e2e_max_per_scan: int = 100, head_epochs: int = 40, views: int = 2, skip_e2e: bool = False):
    """Candidate detection: sensitivity against candidates per scan on held-out phantoms (by size, type,
    juxtapleural), the rank of each real LIDC-IDRI nodule's first hit (when ../shared/data holds them),
    time and peak memory for a 512 x 512 x 300 scan, and end to end (detect, extract, features, head,
    evaluate on subset 3) against the same pipeline on the generator's own candidates_V2.csv."""
    from pathlib import Path
    from rich.table import Table
    import detect
    import phantom
    rows, seconds = _phantom_detect_sensitivity(scans, seed)
    console.print(_sensitivity_table(rows, f"candidate sensitivity, {scans} held-out phantom scans "
                                           f"({' x '.join(map(str, phantom.SIZES['small']))}, "
                                           f"seeds [{seed}, n]), official hit rule"))
    console.print(f"median detection time of a phantom scan: {seconds:.1f} s")
    shared = Path(__file__).resolve().parent.parent / "shared" / "data"
    if (shared / "real_ct").is_dir():
        table = Table(title="real LIDC-IDRI series, LUNA16 annotations")
        for column in ("series (voxels x, y, z)", "diameter mm", "first hit rank", "detection s"):
            table.add_column(column, justify="right")
        for name, diameter, rank, sec in _real_detect_ranks(shared / "real_ct",
                                                            shared / "luna16" / "annotations.csv"):
            table.add_row(name, f"{diameter:.1f}", "missed" if rank is None else str(rank), f"{sec:.1f}")
        console.print(table)
    else:
        console.print("real LIDC-IDRI series not found under ../shared/data/real_ct: skipped")
    folder = scratch_folder("bench_detect_")
    speed = _detect_speed(folder, repeats)
    console.print(f"512 x 512 x 300 phantom at 0.7 x 0.7 x 1.25 mm: detection median {speed['seconds']:.1f} "
                  f"s of {repeats} ({', '.join(f'{s:.1f}' for s in speed['all'])}), "
                  f"peak RSS {speed['peak_mb']:.0f} MiB (after reading the scan: "
                  f"{speed['read_mb']:.0f} MiB), {speed['n']} candidates")
    if not skip_e2e:
        _bench_detect_end_to_end(folder, seed, e2e_scans_per_subset, e2e_max_per_scan, head_epochs, views)
    console.print(f"defaults: max {detect.DEFAULT_MAX_PER_SCAN} a scan; machine: {machine_description()}")


def _bench_detect_end_to_end(folder, seed: int, scans_per_subset: int, max_per_scan: int, head_epochs: int,
                             views: int) -> None:
    from rich.table import Table
    import detect
    import phantom
    root = folder / "luna16"
    phantom.write_luna_folder(root, n_subsets=4, scans_per_subset=scans_per_subset, seed=seed, force=True)
    start = time.perf_counter()
    detect.detect_subsets(root, [0, 1, 2, 3], folder / "detected.csv", max_per_scan, show_progress=False)
    detect_seconds = time.perf_counter() - start
    results = {name: _pipeline_cpm(root, folder / f"work-{name}", csv, seed, head_epochs, views)
               for name, csv in (("candidates_V2.csv", root / "candidates_V2.csv"),
                                 ("detect", folder / "detected.csv"))}
    table = Table(title=f"end to end on phantoms: subsets 0-1 train, 2 validates, 3 held out "
                        f"({scans_per_subset} scans a subset)")
    for column in ("candidates", "held-out candidates (on nodules)", "AUC", "CPM (95% interval)"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        table.add_row(name if name != "detect" else f"detect, {max_per_scan} a scan",
                      f"{r['n']} ({r['positives']})", f"{r['auc']:.3f}",
                      f"{r['cpm']:.3f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f})")
    console.print(table)
    console.print(f"detect on {4 * scans_per_subset} scans: {detect_seconds:.0f} s; head: feature size 12, "
                  f"window 4, centre pooling, {views} views, {head_epochs} epochs, 32^3 patches at 1 mm, "
                  "10 negatives a positive")


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a proportion ``hits / n``."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (centre - half, centre + half)


def _rate_cell(ranks: list, limit: int) -> str:
    hits = sum(r is not None and r < limit for r in ranks)
    low, high = wilson_interval(hits, len(ranks))
    return f"{hits / max(1, len(ranks)):.3f} ({low:.2f}-{high:.2f})" if ranks else "-"


def _real_anatomy_rows(root, max_per_scan: int, detected_csv=None) -> tuple[list, list]:
    """Detect in every copy of an inserted folder: ``(rows, seconds)``, a row per nodule: placement, type,
    shape, diameter and first-hit rank; the CT's own nodules have placement ``real``. With ``detected_csv``,
    the candidates are written there too (LUNA16 format with the class by the official hit rule)."""
    import json
    from pathlib import Path
    import data
    import detect
    root = Path(root)
    manifest = json.loads((root / "phantom_manifest.json").read_text())
    annotations, _ = data.read_point_csv(root / "annotations.csv", "diameter_mm")
    rows, seconds, lines = [], [], [detect.CSV_COLUMNS]
    for scan_row in manifest["scan_geometry"]:
        uid = scan_row["seriesuid"]
        scan = data.read_ct(root / f"subset{scan_row['subset']}" / f"{uid}.mhd")
        start = time.perf_counter()
        found = detect.detect_scan(scan, max_per_scan)
        seconds.append(time.perf_counter() - start)
        lines += detect.csv_lines(uid, found, detect.hit_classes(uid, found.world_xyz, annotations))
        inserted = [n for n in manifest["inserted_nodules"] if n["seriesuid"] == uid]
        mine = annotations.seriesuid == uid
        centres, diameters = annotations.world_xyz[mine], annotations.value[mine]
        ranks = _first_hit_ranks(found.world_xyz, centres, diameters)
        for centre, diameter, rank in zip(centres, diameters, ranks):
            match = [n for n in inserted if np.allclose(n["centre_xyz"], centre, atol=1e-3)]
            n = match[0] if match else {"placement": "real", "detail": "real", "type": "real",
                                        "shape": "real"}
            rows.append(dict(placement=n["placement"], detail=n["detail"], type=n["type"], shape=n["shape"],
                             diameter=float(diameter), rank=rank, scan=uid,
                             background=scan_row["background"]))
    if detected_csv is not None:
        common.atomic_write_text(detected_csv, "\n".join(lines) + "\n")
    return rows, seconds


def _real_anatomy_end_to_end(root, detected_csv, demo_dir, subsets: list) -> None:
    """The demo's models on the inserted folder: every candidate of its own list and of the detected list,
    scored with the official FROC, and the size error of the size output and of the plain measurement."""
    from pathlib import Path
    from rich.table import Table
    import evaluate
    runs = [run for run in ("demo-head", "demo-finetune")
            if (Path(demo_dir) / "runs" / run / "best.pt").is_file()]
    if not runs:
        console.print(f"no demo models under {demo_dir}/runs (run `python luna_cli.py demo` first): "
                      "end to end skipped")
        return
    table = Table(title="end to end on real CT with inserted nodules: the demo's phantom-trained models "
                        f"({demo_dir})")
    for column in ("model", "candidates", "candidates (class 1)", "AUC", "CPM (95% interval)",
                   "size MAE mm: model", "plain"):
        table.add_column(column, justify="right")
    for run in runs:
        for name, csv in (("own list", Path(root) / "candidates_V2.csv"), ("detected", detected_csv)):
            result = evaluate.evaluate_model(Path(demo_dir) / "runs" / run / "best.pt", Path(root), subsets,
                                             Path(root).parent / "eval" / f"{run}-{name.replace(' ', '-')}",
                                             readers=1, device="cpu", candidates=Path(csv))
            size = result.get("size", {})
            mae = [f"{size[k]['mae_mm']:.2f} ({size[k]['n_measured']})"
                   if k in size and size[k].get("n_measured") else "-" for k in ("model", "plain")]
            table.add_row(run, name, f"{result['n_candidates']} ({result['n_positive']})",
                          f"{result['auc']:.3f}",
                          f"{result['cpm']:.3f} ({result['cpm_ci95'][0]:.2f}-{result['cpm_ci95'][1]:.2f})",
                          *mae)
    console.print(table)


def _real_anatomy_table(rows: list, limits: tuple, title: str):
    from rich.table import Table
    table = Table(title=title)
    for column in ("nodules", "n", *(f"{n}/scan (95% CI)" for n in limits)):
        table.add_column(column, justify="right")
    groups = [("all", lambda r: True), ("real (LUNA16 annotations)", lambda r: r["placement"] == "real")]
    groups += [(band, lambda r, b=band: r["placement"] != "real" and _size_band(r["diameter"]) == b)
               for band in ("< 6 mm", "6-10 mm", "10-20 mm", ">= 20 mm")]
    big = [("inserted, >= 6 mm", lambda r: r["placement"] != "real" and r["diameter"] >= 6)]
    big += [(f"  {p}", lambda r, p=p: r["placement"] == p and r["diameter"] >= 6)
            for p in ("isolated", "vessel", "pleura", "fissure")]
    big += [(f"  vessel, {d}", lambda r, d=d: r["detail"] == d and r["diameter"] >= 6)
            for d in ("touching", "engulfing")]
    big += [(f"  {t}", lambda r, t=t: r["type"] == t and r["diameter"] >= 6)
            for t in ("solid", "part-solid", "ground-glass")]
    big += [(f"  {s}", lambda r, s=s: r["shape"] == s and r["diameter"] >= 6)
            for s in ("round", "lobulated", "spiculated")]
    for name, keep in groups + big:
        ranks = [r["rank"] for r in rows if keep(r)]
        table.add_row(name, str(len(ranks)), *(_rate_cell(ranks, n) for n in limits))
    return table


def bench_real_anatomy(copies: int = 10, nodules_per_scan: int = 10, seed: int = 1001,
                       max_per_scan: int = 300,
                       folder: str = typer.Option("", help="reuse or write the inserted folder here "
                                                           "(default: a temporary one, removed at the end)"),
                       demo_dir: str = typer.Option("demo_work", help="the demo's work folder, "
                                                                      "for end to end")):
    """Detection on real anatomy: nodules inserted into the real LIDC-IDRI CTs of ../shared/data/real_ct
    (``synth --background``, with the scans' own LUNA16 nodules kept), then ``detect`` on every copy:
    sensitivity at 50 and ``max_per_scan`` candidates a scan by size, placement, type and shape (95% Wilson
    intervals), the real nodules, and the detection time a scan; then, when the demo's models are there,
    end to end (their AUC, CPM and size error on the folder's own candidates and on the detected ones)."""
    from pathlib import Path
    import insert
    shared = Path(__file__).resolve().parent.parent / "shared" / "data"
    backgrounds = sorted(p for p in (shared / "real_ct").glob("*/*/*") if p.is_dir())
    if not backgrounds:
        console.print("real LIDC-IDRI series not found under ../shared/data/real_ct: nothing to measure")
        raise typer.Exit(1)
    root = Path(folder) if folder else scratch_folder("bench_real_") / "inserted"
    if not (root / "phantom_manifest.json").is_file():
        start = time.perf_counter()
        summary = insert.write_inserted_folder(root, backgrounds, copies, nodules_per_scan,
                                               shared / "luna16" / "annotations.csv", 1, seed, 40, force=True)
        console.print(insert.summary_table(summary))
        console.print(f"inserted in {time.perf_counter() - start:.0f} s")
    detected_csv = root.parent / "detected.csv"
    rows, seconds = _real_anatomy_rows(root, max(max_per_scan, 50), detected_csv)
    limits = (50, max_per_scan)
    console.print(_real_anatomy_table(rows, limits,
                                      f"detect on real CT with inserted nodules: {len(seconds)} copies of "
                                      f"{len(backgrounds)} LIDC-IDRI scans, seed {seed}, official hit rule"))
    console.print(f"detection a scan: median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s; "
                  f"machine: {machine_description()}")
    missed = [r for r in rows if r["rank"] is None or r["rank"] >= max_per_scan]
    for r in missed:
        console.print(f"  missed at {max_per_scan}: {r['placement']}/{r['detail']} {r['type']} {r['shape']} "
                      f"{r['diameter']:.1f} mm (rank {r['rank']}) in {r['scan']}")
    _real_anatomy_end_to_end(root, detected_csv, demo_dir, [0])
