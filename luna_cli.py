"""Command-line entry point of the LUNA16 nodule-candidate toolkit.

Each command only parses options and calls one typed function of a stage module;
tests call those functions directly.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from data import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LUNA16 false-positive reduction with a Swin UNETR encoder and an MLP head.")
console = Console()


@app.callback()
def main() -> None:
    """LUNA16 false-positive reduction: world-mm candidates in, follow-up decisions out."""


def data_dir_option(value: Optional[Path]) -> Path:
    """--data-dir, else $LUNA16_DIR, else ./luna16."""
    return Path(value or os.environ.get("LUNA16_DIR", "luna16"))


def work_dir_option(value: Optional[Path]) -> Path:
    """--work-dir, else $LUNA16_WORK, else ./work."""
    return Path(value or os.environ.get("LUNA16_WORK", "work"))


def friendly_errors(func):
    """Turn expected input problems into a red message and exit code 1, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: finished work is kept, rerun the same command to resume[/]")
            raise typer.Exit(130)
    return wrapper


# --- commands -------------------------------------------------------------


@app.command()
@friendly_errors
def synth(
    data_dir: Optional[Path] = typer.Option(None, help="Folder to write (default: $LUNA16_DIR or ./luna16)."),
    subsets: int = typer.Option(3, help="Number of subsets subset0..subset{n-1} (1-10)."),
    scans_per_subset: int = typer.Option(4, help="Scans in each subset."),
    seed: int = typer.Option(0, help="Seed; the same seed writes byte-identical files."),
    size: str = typer.Option("small", help="small (96x160x160 voxels) or realistic (250x512x512)."),
    negatives_per_scan: int = typer.Option(40, help="Mean number of non-nodule candidates per scan."),
    force: bool = typer.Option(False, "--force", help="Replace an existing phantom folder."),
):
    """Write synthetic LUNA16-shaped chest CT phantoms (scans, annotations, candidates) for tests and the demo."""
    import phantom
    from rich.table import Table
    if size not in phantom.SIZES:
        raise UserError(f"--size must be one of {', '.join(phantom.SIZES)}, got {size!r}")
    summary = phantom.write_luna_folder(data_dir_option(data_dir), subsets, scans_per_subset,
                                        phantom.SIZES[size], seed, negatives_per_scan, force=force)
    table = Table(title=f"Synthetic phantoms in {summary['root']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for label, key in (("subsets", "subsets"), ("scans", "scans"), ("nodules (annotations.csv)", "nodules"),
                       ("excluded findings", "excluded_findings"), ("candidates", "candidates"),
                       ("  class 1", "positives"), ("  class 0", "negatives")):
        table.add_row(label, str(summary[key]))
    table.add_row("scan shape (z, y, x)", " x ".join(map(str, summary["shape_zyx"])))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    console.print(table)
    console.print("[yellow]These are synthetic phantoms made by this toolkit, not patient data; "
                  "only the folder layout follows LUNA16.[/]")


@app.command()
@friendly_errors
def extract(
    subset: List[int] = typer.Option(..., "--subset", help="LUNA16 subset number(s) to extract (repeat the option for several)."),
    data_dir: Optional[Path] = typer.Option(None, help="LUNA16 root (default: $LUNA16_DIR or ./luna16)."),
    work_dir: Optional[Path] = typer.Option(None, help="Work folder (default: $LUNA16_WORK or ./work)."),
    patch_size: int = typer.Option(64, help="Cube edge in voxels."),
    spacing_mm: float = typer.Option(1.0, help="Isotropic voxel size of the cube in mm."),
    negatives_per_positive: float = typer.Option(10.0, help="Seeded sample of negatives per positive candidate."),
    all_candidates: bool = typer.Option(False, "--all-candidates", help="Keep every candidate, not a sample."),
    seed: int = typer.Option(0, help="Seed of the negative sample."),
):
    """Cut resampled, world-axis-aligned cubes around the candidates of LUNA16 subsets into a patch cache."""
    import data
    any_failed = False
    for k in subset:
        summary = data.extract_subset(data_dir_option(data_dir), work_dir_option(work_dir), k, patch_size,
                                      spacing_mm, negatives_per_positive, all_candidates, seed, console=console)
        console.print(f"subset {k}: [bold]{summary.n_patches}[/] patches ({summary.n_positive} positive) from "
                      f"{summary.scans_done} scans ({summary.scans_new} new) in {summary.cache_dir}")
        if summary.failed:
            console.print(f"[red]subset {k}: {len(summary.failed)} scan(s) could not be read (named above); "
                          "fix them and rerun the same command to add them[/]")
        any_failed |= bool(summary.failed)
    if any_failed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def evaluate(
    submission: Optional[Path] = typer.Option(None, help="Score this LUNA16 submission CSV (seriesuid,coordX,coordY,coordZ,probability)."),
    run: Optional[str] = typer.Option(None, help="Evaluate the model of W/runs/NAME/best.pt."),
    checkpoint: Optional[Path] = typer.Option(None, help="Evaluate this checkpoint."),
    subsets: Optional[str] = typer.Option(None, help="Subsets to evaluate, e.g. 9, 8,9 or 0-4: their scans form the scan list (required for a model)."),
    annotations: Optional[Path] = typer.Option(None, help="Nodules (default: annotations.csv of the data dir)."),
    excluded: Optional[Path] = typer.Option(None, help="Findings to ignore (default: annotations_excluded.csv of the data dir)."),
    seriesuids: Optional[Path] = typer.Option(None, help="Scans that count, one seriesuid per line (default: seriesuids.csv of the data dir, or the scans of --subsets)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here (and the FROC plot beside it, as .png)."),
    out_dir: Optional[Path] = typer.Option(None, help="Model evaluation folder (default: W/eval/<run or checkpoint>_subsets<k>)."),
    tta: bool = typer.Option(False, "--tta", help="Average the probabilities of the 8 flips of the patch axes."),
    batch_size: int = typer.Option(64, help="Patches per forward pass."),
    workers: int = typer.Option(2, help="Processes reading scans ahead of the model (0: none)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1, ... (default: cuda when available)."),
    bf16: bool = typer.Option(False, "--bf16", help="bfloat16 autocast on the GPU."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the scans for 95% intervals (0: none)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    data_dir: Optional[Path] = typer.Option(None, help="LUNA16 root (default: $LUNA16_DIR or ./luna16)."),
    work_dir: Optional[Path] = typer.Option(None, help="Work folder (default: $LUNA16_WORK or ./work)."),
):
    """Score a submission with the official LUNA16 FROC/CPM rules, or a model on every candidate of whole subsets."""
    import evaluate as evaluation
    if sum(x is not None for x in (submission, run, checkpoint)) != 1:
        raise UserError("give exactly one of --submission FILE, --run NAME or --checkpoint FILE")
    root = data_dir_option(data_dir)
    subset_list = evaluation.parse_subsets(subsets) if subsets is not None else None
    if submission is not None:
        reference = evaluation.default_reference_files(root)
        scan_list = seriesuids or (list(evaluation.subset_scans(root, subset_list)) if subset_list
                                   else reference["seriesuids"])
        figure = json_out.with_suffix(".png") if json_out else None
        result = evaluation.score_submission(submission, annotations or reference["annotations"],
                                             excluded or reference["excluded"], scan_list, json_out=json_out,
                                             figure=figure, bootstrap=bootstrap, seed=seed)
        for warning in result["warnings"]:
            console.print(f"[yellow]warning:[/] {warning}")
        console.print(evaluation.froc_table(result, title=f"LUNA16 FROC of {submission.name}"))
        console.print(evaluation.froc_summary_line(result))
        return
    if subset_list is None:
        raise UserError("evaluating a model needs --subsets, e.g. --subsets 9")
    checkpoint = checkpoint or evaluation.checkpoint_for_run(work_dir_option(work_dir), run)
    out_dir = out_dir or evaluation.default_eval_dir(work_dir_option(work_dir), run or checkpoint.stem,
                                                     subset_list, tta)
    result = evaluation.evaluate_model(checkpoint, root, subset_list, out_dir, tta=tta, batch_size=batch_size,
                                       workers=workers, device=device or evaluation.default_device(), bf16=bf16,
                                       bootstrap=bootstrap, seed=seed, console=console)
    if json_out is not None:
        import data
        data.atomic_write_json(json_out, result)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(evaluation.candidate_table(result))
    console.print(evaluation.froc_table(result["froc"], title=f"LUNA16 FROC, subsets {subsets}"))
    console.print(evaluation.froc_summary_line(result["froc"]))
    console.print(f"files in {out_dir}: submission.csv, predictions.csv, metrics.json, roc.png, froc.png")
    if result["unreadable_scans"]:
        console.print(f"[red]{len(result['unreadable_scans'])} unreadable scan(s) skipped (named above)[/]")
        raise typer.Exit(1)


@app.command()
@friendly_errors
def demo(
    work_dir: Path = typer.Option(Path("demo_work"), help="Folder for the phantom data, caches, runs and report."),
    subsets: int = typer.Option(5, help="Phantom subsets (the last is held out, the one before validates)."),
    scans_per_subset: int = typer.Option(8, help="Phantom scans per subset."),
    finetune_epochs: int = typer.Option(4, help="Epochs of end-to-end fine-tuning (512 balanced draws each)."),
    seed: int = typer.Option(0, help="Seed of the phantoms and of training."),
):
    """The whole pipeline on synthetic phantoms (CPU, a few minutes), ending with a report."""
    import demo as demo_stage
    from rich.table import Table
    settings = demo_stage.DemoSettings(subsets=subsets, scans_per_subset=scans_per_subset,
                                       finetune_epochs=finetune_epochs, seed=seed)
    console.print("[bold]Demo on synthetic chest phantoms[/] (not patient data; LUNA16 folder layout). "
                  "No pretrained weights are used: the encoder starts from random weights.")
    result = demo_stage.run_demo(work_dir, settings, console=console)
    metrics = result["metrics"]
    table = Table(title=f"held-out subset {subsets - 1}: {metrics['n_candidates']} candidates, "
                        f"{metrics['n_positive']} on nodules, {metrics['n_scans']} scans")
    table.add_column("measure")
    runs = list(result["all_metrics"])
    for run in runs:
        marker = " (chosen on validation)" if run == result["chosen"] else ""
        table.add_column(f"{run}{marker}", justify="right")

    def cell(value):
        return "n/a" if value is None else f"{value:.3f}"
    rows = [("validation ROC AUC", lambda run, m: result["validation_auc"][run]),
            ("ROC AUC", lambda run, m: m["auc"]),
            ("sensitivity at 0.5", lambda run, m: m["sensitivity"]),
            ("specificity at 0.5", lambda run, m: m["specificity"]),
            ("sensitivity at the validation cutoff", lambda run, m: (m.get("at_cutoff") or {}).get("sensitivity")),
            ("specificity at the validation cutoff", lambda run, m: (m.get("at_cutoff") or {}).get("specificity")),
            ("CPM (LUNA16 FROC)", lambda run, m: m["cpm"])]
    for name, value in rows:
        table.add_row(name, *[cell(value(run, result["all_metrics"][run])) for run in runs])
    for stage, seconds in result["timings"].items():
        table.add_row(f"time: {stage}", f"{seconds:.1f} s", *[""] * (len(runs) - 1))
    table.add_row("time: total", f"{sum(result['timings'].values()):.1f} s", *[""] * (len(runs) - 1))
    console.print(table)
    console.print(f"report: [bold]{result['report']}[/]")


@app.command()
@friendly_errors
def predict(
    checkpoint: Path = typer.Option(..., help="Classifier checkpoint (best.pt of a run)."),
    scan: Path = typer.Option(..., help="The CT: .mhd, NIfTI, or a DICOM series folder."),
    coord: List[str] = typer.Option([], "--coord", help="World mm point X,Y,Z (repeat the option for several points)."),
    candidates: Optional[Path] = typer.Option(None, help="CSV of points with coordX,coordY,coordZ columns (world mm)."),
    out: Optional[Path] = typer.Option(None, help="Write the predictions here as CSV."),
    tta: bool = typer.Option(False, "--tta", help="Average the probabilities of the 8 flips of the patch axes."),
    batch_size: int = typer.Option(64, help="Patches per forward pass."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
):
    """Probability that the candidate at each world point of a new scan is a nodule, and whether it needs follow-up."""
    import predict as prediction
    rows = prediction.predict_scan(checkpoint, scan, coord, candidates, out, device=device,
                                   batch_size=batch_size, tta=tta)
    console.print(prediction.prediction_table(rows, title=f"{prediction.scan_name(scan)} ({len(rows)} points)"))
    if out is not None:
        console.print(f"written to {out}")


# --- training commands (train.py) ---


@app.command("cache-features")
@friendly_errors
def cache_features_command(
    work_dir: Optional[Path] = typer.Option(None, help="Work folder (default: $LUNA16_WORK or ./work)."),
    weights: Optional[Path] = typer.Option(None, help="Pretrained Swin UNETR checkpoint for the encoder (random init without)."),
    subset: List[int] = typer.Option([], "--subset", help="Subset(s) to process (repeat; default: every extracted subset)."),
    feature_size: int = typer.Option(48, help="Encoder feature size (48 for the published weights; 12 for small CPU models)."),
    window_size: int = typer.Option(7, help="Attention window (7 for the published weights)."),
    pooling: str = typer.Option("avg", help="avg (16*feature_size values), flatten (the whole last stage) or centre (each stage's centre, 31*feature_size values)."),
    hu_min: float = typer.Option(-1000.0, help="HU mapped to 0."),
    hu_max: float = typer.Option(1000.0, help="HU mapped to 1."),
    batch_size: int = typer.Option(32, help="Patches per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16 on recent GPUs, fp16 on older ones, fp32 on CPU), fp32, bf16 or fp16."),
    workers: Optional[int] = typer.Option(None, help="Loader processes (default: 4 on GPU, 0 on CPU)."),
    seed: int = typer.Option(0, help="Seed of a random-init encoder (no --weights)."),
    views: int = typer.Option(1, help="Flips of each patch to encode (1-8); train-head learns from all of them."),
):
    """Run the frozen encoder over the patch cache once; store float16 features beside each subset's index."""
    import train
    train.cache_features(work_dir_option(work_dir), weights=weights, subsets=subset or None,
                         feature_size=feature_size, window_size=window_size, pooling=pooling, hu_min=hu_min,
                         hu_max=hu_max, batch_size=batch_size, device=device, precision=precision, workers=workers,
                         seed=seed, views=views)


@app.command("train-head")
@friendly_errors
def train_head_command(
    work_dir: Optional[Path] = typer.Option(None, help="Work folder (default: $LUNA16_WORK or ./work)."),
    weights: Optional[Path] = typer.Option(None, help="The --weights given to cache-features (selects its features)."),
    feature_size: int = typer.Option(48, help="Encoder feature size used by cache-features."),
    window_size: int = typer.Option(7, help="Attention window used by cache-features."),
    pooling: str = typer.Option("avg", help="Pooling used by cache-features: avg, flatten or centre."),
    hu_min: float = typer.Option(-1000.0, help="HU window used by cache-features (lower end)."),
    hu_max: float = typer.Option(1000.0, help="HU window used by cache-features (upper end)."),
    val_subsets: str = typer.Option("8", help="Validation subset(s), e.g. 8 or 7,8."),
    test_subsets: str = typer.Option("9", help="Held-out test subset(s), never read here ('none' for none)."),
    epochs: int = typer.Option(100, help="Most epochs."),
    batch_size: int = typer.Option(256, help="Feature vectors per step."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate."),
    patience: int = typer.Option(10, help="Stop after this many epochs without a better validation AUC (0: never)."),
    epoch_samples: int = typer.Option(0, help="Class-balanced draws per epoch (0: the training set size)."),
    seed: int = typer.Option(0, help="Seed (sampling, init; also selects random-init features)."),
    run: Optional[str] = typer.Option(None, help="Run folder name under W/runs (default: train-head-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last.pt."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    views: int = typer.Option(1, help="Flipped views per patch, as given to cache-features."),
):
    """Train the MLP head on cached features (class-balanced, early stopping on validation AUC)."""
    import data
    import train
    run_dir = train.train_head(
        work_dir_option(work_dir), weights=weights, feature_size=feature_size, window_size=window_size,
        pooling=pooling, hu_min=hu_min, hu_max=hu_max, val_subsets=data.parse_subsets(val_subsets, "--val-subsets"),
        test_subsets=data.parse_subsets(test_subsets, "--test-subsets"), epochs=epochs, batch_size=batch_size,
        lr=lr, patience=patience, epoch_samples=epoch_samples, seed=seed, run=run, resume=resume, device=device,
        views=views)
    console.print(f"run folder: [bold]{run_dir}[/] (best.pt, last.pt, history.csv, history.png, config.json)")


@app.command("finetune")
@friendly_errors
def finetune_command(
    work_dir: Optional[Path] = typer.Option(None, help="Work folder (default: $LUNA16_WORK or ./work)."),
    epochs: int = typer.Option(30, help="Epochs."),
    batch_size: int = typer.Option(32, help="Patches per step and process."),
    accumulate: int = typer.Option(1, help="Steps of gradient accumulation per optimiser update."),
    lr: float = typer.Option(1e-4, help="Peak AdamW learning rate (after warm-up, then cosine decay)."),
    weight_decay: float = typer.Option(1e-5, help="AdamW weight decay."),
    warmup_epochs: float = typer.Option(1.0, help="Epochs of linear learning-rate warm-up."),
    weights: Optional[Path] = typer.Option(None, help="Pretrained Swin UNETR checkpoint for the encoder."),
    head_from: Optional[str] = typer.Option(None, help="Start from this run's best.pt (a train-head run name or a .pt path)."),
    feature_size: int = typer.Option(48, help="Encoder feature size (48 for the published weights; 12 on CPU)."),
    window_size: int = typer.Option(7, help="Attention window (7 for the published weights; 4 for 32^3 CPU models)."),
    pooling: str = typer.Option("avg", help="avg, flatten or centre (see cache-features)."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute activations to save GPU memory."),
    val_subsets: str = typer.Option("8", help="Validation subset(s), e.g. 8 or 7,8."),
    test_subsets: str = typer.Option("9", help="Held-out test subset(s), never read here ('none' for none)."),
    hu_min: float = typer.Option(-1000.0, help="HU mapped to 0."),
    hu_max: float = typer.Option(1000.0, help="HU mapped to 1."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="48 cube symmetries + shifts of positives."),
    max_shift_mm: float = typer.Option(3.0, help="Largest shift of positives per axis in mm."),
    precision: str = typer.Option("auto", help="auto (bf16 on recent GPUs, fp16 on older ones, fp32 on CPU), fp32, bf16 or fp16."),
    patience: int = typer.Option(0, help="Stop after this many epochs without a better validation AUC (0: never)."),
    epoch_samples: int = typer.Option(0, help="Class-balanced draws per epoch (0: the training set size)."),
    seed: int = typer.Option(0, help="Seed of sampling, augmentation and init."),
    run: Optional[str] = typer.Option(None, help="Run folder name under W/runs (default: finetune-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run (--run, else the latest) exactly from its last.pt."),
    stop_after: Optional[int] = typer.Option(None, help="Stop this call after N epochs (continue later with --resume)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (under torchrun: each process's GPU)."),
    workers: Optional[int] = typer.Option(None, help="Loader processes (default: 4 on GPU, 0 on CPU)."),
):
    """Train encoder + head end to end (class-balanced, augmented, mixed precision on GPUs; torchrun for several GPUs)."""
    import data
    import train
    run_dir = train.finetune(
        work_dir_option(work_dir), epochs=epochs, batch_size=batch_size, accumulate=accumulate, lr=lr,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, feature_size=feature_size, window_size=window_size,
        pooling=pooling, grad_checkpoint=grad_checkpoint, weights=weights, head_from=head_from,
        val_subsets=data.parse_subsets(val_subsets, "--val-subsets"), test_subsets=data.parse_subsets(test_subsets, "--test-subsets"),
        hu_min=hu_min, hu_max=hu_max, augment=augment, max_shift_mm=max_shift_mm, precision=precision,
        patience=patience, epoch_samples=epoch_samples, seed=seed, run=run, resume=resume, device=device,
        workers=workers, stop_after=stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run folder: [bold]{run_dir}[/] (best.pt, last.pt, history.csv, history.png, config.json)")


if __name__ == "__main__":
    app()
