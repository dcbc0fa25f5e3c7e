"""The ``demo`` command: the whole pipeline on synthetic phantoms, and the HTML report.

``run_demo`` makes a LUNA16-shaped phantom folder, extracts patches, caches frozen-encoder
features, trains the head, fine-tunes encoder and head, evaluates on a held-out subset and writes
``<work>/report/report.html``. ``write_report`` builds the report of any evaluated run.
"""
from __future__ import annotations

import html
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import common
import data

MONTAGE_PER_GROUP = 6


@dataclass
class DemoSettings:
    """Sizes chosen so that the demo runs in a few minutes on 2 CPU cores."""
    subsets: int = 5
    scans_per_subset: int = 8
    negatives_per_scan: int = 40
    seed: int = 0
    patch_size: int = 32
    spacing_mm: float = 1.0
    feature_size: int = 12
    window_size: int = 4
    pooling: str = "centre"
    views: int = 8
    head_epochs: int = 40
    finetune_epochs: int = 4
    finetune_samples: int = 512
    finetune_batch_size: int = 16
    finetune_lr: float = 1e-5
    tta: bool = True
    timings: dict = field(default_factory=dict)


def _timed(settings: DemoSettings, stage: str, func, *args, **kwargs):
    start = time.perf_counter()
    result = func(*args, **kwargs)
    settings.timings[stage] = time.perf_counter() - start
    return result


def run_demo(work_dir: Path, settings: DemoSettings | None = None, console=None) -> dict:
    """Run every stage on phantoms under ``work_dir``; returns the held-out metrics plus timings.

    Subsets ``0..n-3`` train, ``n-2`` validates (model selection, cutoff), ``n-1`` is the held-out test.
    """
    import evaluate
    import features
    import head
    import phantom
    import train
    settings = settings or DemoSettings()
    if settings.subsets < 3:
        raise ValueError("the demo needs at least 3 subsets (train, validation, test), "
                         f"got {settings.subsets}")
    work_dir = Path(work_dir)
    data_dir = work_dir / "luna16"
    val, test = [settings.subsets - 2], [settings.subsets - 1]
    model = dict(feature_size=settings.feature_size, window_size=settings.window_size,
                 pooling=settings.pooling)
    if not (data_dir / "phantom_manifest.json").is_file():
        _timed(settings, "synth", phantom.write_luna_folder, data_dir, n_subsets=settings.subsets,
               scans_per_subset=settings.scans_per_subset, seed=settings.seed,
               negatives_per_scan=settings.negatives_per_scan, force=True)
    start = time.perf_counter()
    for k in range(settings.subsets):
        data.extract_subset(data_dir, work_dir, k, patch_size=settings.patch_size,
                            spacing_mm=settings.spacing_mm, all_candidates=True, sample_seed=settings.seed,
                            console=console)
    settings.timings["extract"] = time.perf_counter() - start
    for old in ("runs/demo-head", "runs/demo-finetune", "eval/demo-head", "eval/demo-finetune", "report"):
        shutil.rmtree(work_dir / old, ignore_errors=True)  # the demo's own runs: a rerun trains afresh
    tag = _timed(settings, "cache-features", features.cache_features, work_dir, init_seed=settings.seed,
                 subsets=range(settings.subsets - 1), views=settings.views, **model)
    head_run = _timed(settings, "train-head", train.train_head, work_dir, features=tag, val_subsets=val,
                      test_subsets=test, epochs=settings.head_epochs, seed=settings.seed, run="demo-head")
    tuned_run = _timed(settings, "finetune", train.finetune, work_dir, epochs=settings.finetune_epochs,
                       batch_size=settings.finetune_batch_size, lr=settings.finetune_lr,
                       head_from="demo-head", epoch_samples=settings.finetune_samples, val_subsets=val,
                       test_subsets=test, seed=settings.seed, run="demo-finetune", device="cpu",
                       views=settings.views, **model)
    # The model for the report is chosen on validation AUC, never on the held-out subset.
    validation_auc = {run: head.read_checkpoint(run / "best.pt")["metrics"]["auc"]
                      for run in (head_run, tuned_run)}
    chosen = max(validation_auc, key=validation_auc.get)
    start = time.perf_counter()
    results = {}
    for run in (head_run, tuned_run):
        results[run.name] = evaluate.evaluate_model(run / "best.pt", data_dir, test,
                                                    work_dir / "eval" / run.name,
                                                    views=settings.views if settings.tta else 1, device="cpu",
                                                    console=console, work_dir=work_dir)
    settings.timings["evaluate"] = time.perf_counter() - start
    start = time.perf_counter()
    report = write_report(work_dir / "report", chosen, work_dir / "eval" / chosen.name, data_dir)
    settings.timings["report"] = time.perf_counter() - start
    return dict(metrics=results[chosen.name], all_metrics=results,
                validation_auc={r.name: a for r, a in validation_auc.items()}, chosen=chosen.name,
                timings=dict(settings.timings), report=report)


# --- report -----------------------------------------------------------------------


def _read_predictions(predictions: Path):
    """Per-candidate predictions of ``evaluate`` (``predictions.csv``):
    ``(PointTable of probabilities, labels)``."""
    marks, _ = data.read_point_csv(predictions, "probability")
    labels, _ = data.read_point_csv(predictions, "class")
    return marks, labels.value > 0.5


def pick_examples(probability: np.ndarray, labels: np.ndarray, cutoff: float,
                  per_group: int = MONTAGE_PER_GROUP) -> dict:
    """Row indices of the most confident true positives, the highest-scoring false positives and
    the lowest-scoring false negatives at ``cutoff``."""
    order = np.argsort(-probability, kind="stable")
    tp = [r for r in order if labels[r] and probability[r] >= cutoff][:per_group]
    fp = [r for r in order if not labels[r] and probability[r] >= cutoff][:per_group]
    fn = [r for r in order[::-1] if labels[r] and probability[r] < cutoff][:per_group]
    return {"true positives": tp, "false positives": fp, "false negatives": fn}


def _example_patches(marks: data.PointTable, rows: list, data_dir: Path, patch_size: int,
                     spacing_mm: float) -> dict:
    """``{row: int16 patch [z, y, x]}``, reading each scan once."""
    patches = {}
    by_scan: dict = {}
    for row in rows:
        by_scan.setdefault(marks.seriesuid[row], []).append(row)
    paths = {uid: path for uid, path in data.scan_subset_map(data_dir).items()}
    for uid, scan_rows in by_scan.items():
        if uid in paths:
            _, cut = data.read_and_extract(data_dir / f"subset{paths[uid]}" / f"{uid}.mhd",
                                           marks.world_xyz[scan_rows], patch_size, spacing_mm)
            patches.update(zip(scan_rows, cut))
    return patches


def draw_montage(path: Path, groups: dict, patches: dict, probability: np.ndarray) -> None:
    """One figure row per example: axial, coronal and sagittal centre slices, titled with the probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(name, r) for name, members in groups.items() for r in members if r in patches]
    fig, axes = plt.subplots(max(len(rows), 1), 3, figsize=(6.0, 2.0 * max(len(rows), 1)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for line, (name, row) in enumerate(rows):
        patch = patches[row]
        c = patch.shape[0] // 2
        views = (("axial", patch[c]), ("coronal", patch[:, c]), ("sagittal", patch[:, :, c]))
        for column, (view, image) in enumerate(views):
            ax = axes[line, column]
            ax.imshow(image, cmap="gray", vmin=-1000, vmax=400, origin="lower")
            ax.set_title(f"{name[:-1]} p={probability[row]:.3f}" if column == 0 else view, fontsize=8)
    if not rows:
        axes[0, 1].text(0.5, 0.5, "no examples", ha="center", va="center")
    fig.tight_layout()
    common.atomic_save_figure(fig, path, dpi=90)


def write_report(report_dir: Path, run_dir: Path, eval_dir: Path, data_dir: Path) -> Path:
    """``report.html`` with the training curves, ROC, FROC, the size scatter and example montages;
    returns its path."""
    import json
    import head
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = json.loads((Path(eval_dir) / "metrics.json").read_text())
    _, meta = head.load_classifier(Path(run_dir) / "best.pt")
    cutoff = float((metrics.get("at_cutoff") or {}).get("cutoff_probability") or 0.5)   # raw probability
    for source, name in ((Path(run_dir) / "history.png", "training.png"),
                         (Path(eval_dir) / "roc.png", "roc.png"), (Path(eval_dir) / "froc.png", "froc.png"),
                         (Path(eval_dir) / "size.png", "size.png")):
        if source.is_file():
            shutil.copyfile(source, report_dir / name)
    marks, labels = _read_predictions(Path(eval_dir) / "predictions.csv")
    groups = pick_examples(marks.value, labels, cutoff)
    preprocess = meta["preprocess"]
    patches = _example_patches(marks, [r for members in groups.values() for r in members], data_dir,
                               int(preprocess["patch_size"]), float(preprocess["spacing_mm"]))
    for name, members in groups.items():
        draw_montage(report_dir / f"{name.replace(' ', '_')}.png", {name: members}, patches, marks.value)
    path = report_dir / "report.html"
    common.atomic_write_text(path, _report_html(metrics, cutoff, groups))
    return path


def _report_html(metrics: dict, cutoff: float, groups: dict) -> str:
    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"
    at_cutoff = metrics.get("at_cutoff") or {}
    rows = [("ROC AUC", number(metrics.get("auc"))),
            ("accuracy / sensitivity / specificity at 0.5",
             " / ".join(number(metrics.get(k)) for k in ("accuracy", "sensitivity", "specificity"))),
            (f"sensitivity / specificity at the validation cutoff {cutoff:.3g}",
             " / ".join(number(at_cutoff.get(k)) for k in ("sensitivity", "specificity"))),
            ("CPM (LUNA16 FROC)", number(metrics.get("cpm"))),
            ("scans / candidates / nodule candidates",
             f"{metrics.get('n_scans')} / {metrics.get('n_candidates')} / {metrics.get('n_positive')}")]
    rows += [(f"diameter, {name}: MAE / bias (mm), size-band agreement", size_summary(found))
             for name, found in (metrics.get("size") or {}).items() if isinstance(found, dict)]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    figures = [("Training loss and validation accuracy / AUC per epoch", "training.png"),
               ("ROC of the held-out candidates", "roc.png"), ("LUNA16 FROC", "froc.png"),
               ("Estimated against annotated diameter of the nodule candidates (model size output and plain "
                "measurement; grey lines: the 6 and 8 mm Fleischner bands)", "size.png")]
    figures += [(f"{name.capitalize()} (axial, coronal, sagittal centre slices)",
                 f"{name.replace(' ', '_')}.png") for name in groups]
    # the training curves are two plots side by side: shown at their own width, where the others share a row
    blocks = "\n".join(f'<figure class="{"wide" if src == "training.png" else "plot"}"><img src="{src}" '
                       f'alt="{html.escape(title)}"><figcaption>{html.escape(title)}</figcaption></figure>'
                       for title, src in figures)
    return (f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LUNA16 candidate classification report</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.8em; text-align: left; }}
figure {{ display: inline-block; vertical-align: top; margin: 0.5em; }}
img {{ max-width: 520px; border: 1px solid #ddd; }}
figure.wide {{ display: block; }} figure.wide img {{ max-width: 100%; }}
figcaption {{ font-size: 0.9em; color: #555; max-width: 520px; }}
</style></head><body>
<h1>LUNA16 candidate classification</h1>
<p>Held-out subset(s) {html.escape(str(metrics.get('subsets')))}, """
            f"""checkpoint {html.escape(str(metrics.get('checkpoint')))}.
Research use only, not for clinical decisions.</p>
<table>{table}</table>
{blocks}
</body></html>
""")


def size_summary(found: dict) -> str:
    """``"MAE / bias, agreement (measured of counted)"`` of one estimate of evaluate's ``size`` metrics."""
    if not found.get("n_measured"):
        return f"not measured (0 of {found.get('n_nodules', 0)})"
    return (f"{found['mae_mm']:.2f} / {found['bias_mm']:+.2f} mm, {found['agreement']:.2f} "
            f"({found['n_measured']} of {found['n_nodules']} measured)")


def result_table(result: dict, n_subsets: int):
    """A rich table of the demo's held-out results for every run, with the time of each stage."""
    from rich.table import Table
    metrics, runs = result["metrics"], list(result["all_metrics"])
    table = Table(title=f"held-out subset {n_subsets - 1}: {metrics['n_candidates']} candidates, "
                        f"{metrics['n_positive']} on nodules, {metrics['n_scans']} scans")
    table.add_column("measure")
    for run in runs:
        table.add_column(run + (" (chosen on validation)" if run == result["chosen"] else ""),
                         justify="right")
    rows = [("validation ROC AUC", lambda run, m: result["validation_auc"][run]),
            ("ROC AUC", lambda run, m: m["auc"]),
            ("sensitivity at 0.5", lambda run, m: m["sensitivity"]),
            ("specificity at 0.5", lambda run, m: m["specificity"]),
            ("sensitivity at the validation cutoff",
             lambda run, m: (m.get("at_cutoff") or {}).get("sensitivity")),
            ("specificity at the validation cutoff",
             lambda run, m: (m.get("at_cutoff") or {}).get("specificity")),
            ("CPM (LUNA16 FROC)", lambda run, m: m["cpm"])]
    for name, value in rows:
        cells = [value(run, result["all_metrics"][run]) for run in runs]
        table.add_row(name, *["n/a" if v is None else f"{v:.3f}" for v in cells])
    for estimate in ("model", "plain"):
        table.add_row(f"diameter, {estimate}: MAE / bias, band agreement",
                      *[size_summary(result["all_metrics"][run]["size"][estimate]) for run in runs])
    padding = [""] * (len(runs) - 1)
    for stage, seconds in result["timings"].items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s", *padding)
    table.add_row("time: total", f"{sum(result['timings'].values()):.1f} s", *padding)
    return table
