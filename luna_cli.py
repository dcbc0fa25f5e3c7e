"""Command-line entry point of the LUNA16 nodule-candidate toolkit.

Each command only parses options and calls one typed function of a stage module; tests call those
functions directly. Commands that train pass on only the options the user gave, so that ``--resume``
can tell them from defaults (the defaults shown here are the stages' own, see ``train.py``).
Coordinates are world mm: ITK/LPS physical points, as in the LUNA16 CSVs.
"""
from __future__ import annotations

import common
import functools
import inspect
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.console import Console

import options
from common import UserError, parse_subsets

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LUNA16 false-positive reduction with a Swin UNETR encoder and an MLP head. "
                       "Coordinates are world mm (ITK/LPS physical points), as in the LUNA16 CSVs.")
console = Console()


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class PhantomSize(str, Enum):
    small = "small"
    realistic = "realistic"


# One vocabulary for every command.
DataDir = Annotated[Optional[Path], typer.Option(help="LUNA16 root (default: $LUNA16_DIR or ./luna16).")]
WorkDir = Annotated[Optional[Path], typer.Option(help="Work folder (default: $LUNA16_WORK or ./work).")]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile", help="Run the encoder through torch.compile: the first batches of each shape "
    "wait for the compiler; where compiling fails, one warning and the model runs as without it (on the "
    "CPU it measured slower).")]
PrecisionOption = Annotated[Precision, typer.Option(
    help="auto: bf16 on recent GPUs, fp16 on older ones, fp32 on the CPU.", case_sensitive=False)]
BatchSize = Annotated[int, typer.Option(min=1, help="Patches per forward pass.")]
Workers = Annotated[Optional[int], typer.Option(
    min=0, help="Processes loading cached patches for the model (default: 4 on GPU, 0 on CPU).")]
Run = Annotated[Optional[str], typer.Option(help="Run folder name under W/runs (default: <command>-<time>).")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the run (--run, else the latest) from its last.pt; "
                     "options given again must equal the run's.")]
StopAfter = Annotated[Optional[int], typer.Option(
    min=1, help="Stop this call after N epochs (continue with --resume).")]
Readers = Annotated[int, typer.Option(
    min=0, help="Processes reading and cutting scans ahead of the model (0: in this process).")]
Model = Annotated[Optional[str], typer.Option(
    help="The model: a run name (its W/runs/NAME/best.pt) or a .pt checkpoint file.")]


def data_dir_option(value: Optional[Path]) -> Path:
    """--data-dir, else $LUNA16_DIR, else ./luna16."""
    return Path(value or os.environ.get("LUNA16_DIR", "luna16"))


def work_dir_option(value: Optional[Path]) -> Path:
    """--work-dir, else $LUNA16_WORK, else ./work; refused when it (or the folder it would be made in) is a
    file."""
    return common.output_folder(Path(value or os.environ.get("LUNA16_WORK", "work")), "--work-dir")


def friendly_errors(func):
    """Turn expected input problems into a red message and exit code 1, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(1) from err   # the error stays reachable from the exit (tests read it there)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: finished work is kept, rerun the same command to resume[/]")
            raise typer.Exit(130)
        except OSError as err:   # a file that could not be read or written: named, not a traceback
            where = f"{err.filename}: " if err.filename else ""
            console.print(f"[bold red]error:[/] {where}{err.strerror or err}")
            raise typer.Exit(1) from err
    return wrapper


def renamed(**moves: str):
    """Decorator: each old option name of ``moves`` (``{old_name: "the new option and what it takes"}``) stays
    as a hidden option that refuses, pointing to the new one."""
    def decorate(func):
        own = list(inspect.signature(func, eval_str=True).parameters.values())
        old = [inspect.Parameter(f"old_{name}", inspect.Parameter.KEYWORD_ONLY, default=None,
                                 annotation=Annotated[Optional[str], typer.Option(
                                     "--" + name.replace("_", "-"), hidden=True)]) for name in moves]

        def command(**values):
            for name, new in moves.items():
                if values.pop(f"old_{name}") is not None:
                    raise UserError(f"--{name.replace('_', '-')} was renamed: use {new}")
            return func(**values)
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        command.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                   if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "ctx"
                                                   else p for p in own] + old)
        return command
    return decorate


@app.callback()
def main() -> None:
    """LUNA16 false-positive reduction: world-mm candidates in, follow-up decisions out."""
    common.keep_freed_memory()


# --- commands, in pipeline order ----------------------------------------------

@app.command()
@friendly_errors
def synth(
    data_dir: DataDir = None,
    n_subsets: Annotated[int, typer.Option(
        min=1, max=10, help="Number of subsets subset0..subset{n-1}.")] = 3,
    scans_per_subset: Annotated[Optional[int], typer.Option(
        min=1, help="Phantom scans in each subset (default 4).")] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes byte-identical files.")] = 0,
    size: Annotated[Optional[PhantomSize], typer.Option(
        help="Phantoms: small (default) or realistic.")] = None,
    negatives_per_scan: Annotated[int, typer.Option(
        min=0, help="Mean number of non-nodule candidates per scan.")] = 40,
    background: Annotated[Optional[list[Path]], typer.Option(
        help="A real CT (.mhd, NIfTI or DICOM series folder) to insert nodules into; repeatable.")] = None,
    copies: Annotated[Optional[int], typer.Option(
        min=1, help="With --background: copies of each CT (default 1).")] = None,
    nodules_per_scan: Annotated[Optional[int], typer.Option(
        min=0, help="Nodules in each scan (phantoms: 2-5 by default; --background: 10).")] = None,
    annotations: Annotated[Optional[Path], typer.Option(
        help="With --background: annotations.csv holding the CTs' own nodules, kept as nodules of each copy "
             "(annotations_excluded.csv beside it is used too).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing synth folder.")] = False,
):
    """Write LUNA16-shaped data for tests, the demo and benchmarks: synthetic chest CT phantoms, or with
    --background, copies of real CTs with nodules inserted into their lungs."""
    root = data_dir_option(data_dir)
    if background:
        summary = run_synth_background(root, background, copies, nodules_per_scan, annotations, n_subsets,
                                       seed, negatives_per_scan, force, size, scans_per_subset)
        if summary.unreadable:
            raise typer.Exit(1)
        return
    for name, value in (("--copies", copies), ("--annotations", annotations)):
        if value is not None:
            raise UserError(f"{name} applies only with --background")
    import phantom
    per_scan = (2, 5) if nodules_per_scan is None else (nodules_per_scan, nodules_per_scan)
    summary = phantom.write_luna_folder(root, n_subsets, scans_per_subset or 4,
                                        phantom.SIZES[(size or PhantomSize.small).value], seed,
                                        negatives_per_scan, nodules_per_scan=per_scan, force=force)
    console.print(phantom.summary_table(summary))


def run_synth_background(root: Path, backgrounds: list, copies, nodules_per_scan, annotations, n_subsets: int,
                         seed: int, negatives_per_scan: int, force: bool, size=None, scans_per_subset=None):
    """``synth --background``: refuse the phantom-only options, insert, print what was written and skipped."""
    import insert
    for name, value in (("--size", size), ("--scans-per-subset", scans_per_subset)):
        if value is not None:
            raise UserError(f"{name} does not apply with --background: each copy keeps its background's "
                            "grid, and --copies sets how many scans each background gives")
    summary = insert.write_inserted_folder(root, backgrounds, copies or 1, 10 if nodules_per_scan is None
                                           else nodules_per_scan, annotations, n_subsets, seed,
                                           negatives_per_scan, force)
    for path, reason in summary.skipped:
        console.print(f"[red]{path}: {reason}[/]" if path in summary.unreadable
                      else f"[yellow]{path}: {reason}[/]")
    short = [s for s in summary.scans if s["nodules_placed"] < s["nodules_requested"]]
    for row in short:
        console.print(f"[yellow]{row['seriesuid']} (copy {row['copy']} of {row['background']}): "
                      f"{row['nodules_placed']} of {row['nodules_requested']} nodules fitted[/]")
    console.print(insert.summary_table(summary))
    return summary


@app.command()
@friendly_errors
@options.with_options(["max_per_scan"], "detect")
def detect(
    given: dict,
    out: Annotated[Path, typer.Option(
        help="Candidates CSV to write: seriesuid,coordX,coordY,coordZ,class,score (world mm).")],
    subsets: Annotated[Optional[str], typer.Option(
        "--subsets", "--subset", help="Subsets to detect in, e.g. 0, 0-7,9.")] = None,
    scan: Annotated[Optional[Path], typer.Option(
        help="Or one CT: .mhd, NIfTI, or a DICOM series folder.")] = None,
    data_dir: DataDir = None,
):
    """Find nodule candidates in bare CTs (lung mask, multi-scale blobs), in LUNA16's candidate format; the
    class comes from annotations.csv of the data dir when it knows the scan (resumable per scan)."""
    import detect as detection
    max_per_scan = given.get("max_per_scan", detection.DEFAULT_MAX_PER_SCAN)
    if (subsets is None) == (scan is None):
        raise UserError("give either --subsets K (scans of the data dir) or --scan PATH")
    if scan is not None:
        uid, found, _ = detection.detect_path(scan, out, max_per_scan, data_dir_option(data_dir))
        if found.warning:
            console.print(f"[yellow]{found.warning}[/]")
        console.print(f"scan {uid}: [bold]{len(found.score)}[/] candidates written to {out}")
        return
    summary = detection.detect_subsets(data_dir_option(data_dir),
                                       parse_subsets(subsets, "--subsets", required=True), out, max_per_scan,
                                       console=console)
    console.print(f"[bold]{summary.n_candidates}[/] candidates of {summary.n_scans} scans "
                  f"({summary.scans_new} new) in {summary.out_csv}")
    if summary.failed:
        console.print(f"[red]{len(summary.failed)} scan(s) could not be read (named above); "
                      "fix them and rerun the same command to add them[/]")
        raise typer.Exit(1)


@app.command()
@friendly_errors
@renamed(seed="--sample-seed", per_scan="--max-per-scan", workers="--readers")
@options.with_options(options.stage_names("extract") + options.stage_names("mining"), ("extract", "mining"))
def extract(
    given: dict,
    subsets: Annotated[str, typer.Option("--subsets", "--subset", help="Subsets to extract, e.g. 0, 0-7,9.")],
    data_dir: DataDir = None,
    work_dir: WorkDir = None,
    hard_negatives: Annotated[Optional[str], typer.Option(
        help="Mine instead: add the negatives this model scores highest (a run name, for its best.pt, or a "
             ".pt file).")] = None,
    readers: Readers = 2,
    device: Device = "auto",
    compile: Compile = False,
):
    """Cut resampled, world-axis-aligned cubes around the candidates of LUNA16 subsets into a patch cache
    (or, with --hard-negatives, add a trained model's hardest negatives to it)."""
    import data
    foreign = ", ".join([options.OPTIONS[n].flag for n in given
                         if n not in options.stage_names("mining" if hard_negatives else "extract")]
                        + (["--compile"] if compile and not hard_negatives else []))
    if foreign:
        raise UserError(f"{foreign}: an option of extraction, not of --hard-negatives (mining reads the data "
                        f"dir's candidates file and the cache's patches)" if hard_negatives else
                        f"{foreign}: an option of --hard-negatives (mining), not of extraction")
    any_failed = False
    root, work = data_dir_option(data_dir), work_dir_option(work_dir)
    for k in parse_subsets(subsets, "--subsets", required=True):
        if hard_negatives:
            import mining
            mined = mining.mine_subset(root, work, k,
                                       hard_negatives, readers=readers, device=device, console=console,
                                       compile=compile, **given)
            console.print(f"subset {k}: [bold]{mined.added}[/] hard negatives of {mined.run} added "
                          f"({mined.scans} scans scored); the cache holds {mined.n_patches} patches")
            failed = mined.unreadable
        else:
            summary = data.extract_subset(root, work, k, console=console, **given)
            console.print(f"subset {k}: [bold]{summary.n_patches}[/] patches ({summary.n_positive} positive) "
                          f"from {summary.scans_done} scans ({summary.scans_new} new) in {summary.cache_dir}")
            failed = summary.failed
        if failed:
            console.print(f"[red]subset {k}: {len(failed)} scan(s) could not be read (named above); "
                          "fix them and rerun the same command to add them[/]")
        any_failed |= bool(failed)
    if any_failed:
        raise typer.Exit(1)


@app.command("cache-features")
@friendly_errors
@renamed(seed="--init-seed")
@options.with_options(options.stage_names("features"), "features")
def cache_features(given: dict, work_dir: WorkDir = None, device: Device = "auto", workers: Workers = None,
                   compile: Compile = False):
    """Run the frozen encoder over the patch cache once; store float16 features beside each subset's index."""
    import features
    features.cache_features(work_dir_option(work_dir), device=device, workers=workers, compile=compile,
                            **given)


@app.command("train-head")
@friendly_errors
@options.with_options(options.stage_names("head"), "head")
def train_head(given: dict, work_dir: WorkDir = None, run: Run = None, resume: Resume = False,
               stop_after: StopAfter = None, device: Device = "auto"):
    """Train the MLP head on cached features (class-balanced, early stopping on validation AUC)."""
    import train
    run_dir = train.train_head(work_dir_option(work_dir), run=run, resume=resume, device=device,
                               stop_after=stop_after, **given)
    console.print(f"run folder: [bold]{run_dir}[/] (best.pt, last.pt, history.csv, history.png, config.json)")


@app.command("finetune")
@friendly_errors
@options.with_options(options.stage_names("finetune"), "finetune")
def finetune(given: dict, work_dir: WorkDir = None, run: Run = None, resume: Resume = False,
             stop_after: StopAfter = None,
             device: Annotated[str, typer.Option(
                 help="auto, cpu, cuda or cuda:N (under torchrun: each process's GPU).")] = "auto",
             workers: Workers = None, compile: Compile = False):
    """Train encoder + head end to end (class-balanced, augmented, mixed precision on GPUs; torchrun for
    several GPUs)."""
    import train
    run_dir = train.finetune(work_dir_option(work_dir), run=run, resume=resume, device=device,
                             workers=workers, stop_after=stop_after, compile=compile, **given)
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"run folder: [bold]{run_dir}[/] (best.pt, last.pt, history.csv, history.png, "
                      f"config.json)")


@app.command()
@friendly_errors
@renamed(run="--model NAME", checkpoint="--model FILE", out_dir="--out", workers="--readers",
         seed="--bootstrap-seed")
@options.with_options(options.stage_names("evaluate"), "evaluate")
def evaluate(
    given: dict,
    submission: Annotated[Optional[Path], typer.Option(
        help="Score this LUNA16 submission CSV (seriesuid,coordX,coordY,coordZ,probability).")] = None,
    model: Model = None,
    subsets: Annotated[Optional[str], typer.Option(
        help="Subsets whose scans are evaluated, e.g. 9 or 0-7,9 (required for a model).")] = None,
    annotations: Annotated[Optional[Path], typer.Option(
        help="Nodules (default: annotations.csv of the data dir).")] = None,
    excluded: Annotated[Optional[Path], typer.Option(
        help="Findings to ignore (default: annotations_excluded.csv of the data dir).")] = None,
    seriesuids: Annotated[Optional[Path], typer.Option(
        help="Scans that count, one seriesuid per line (default: seriesuids.csv, or the scans of "
             "--subsets).")] = None,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the results as JSON here (and the FROC plot beside it).")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="A model's evaluation folder (default: W/eval/<run>_subsets<k>, after the checkpoint's run "
             "folder; see README).")] = None,
    readers: Readers = 2,
    device: Device = "auto",
    compile: Compile = False,
    data_dir: DataDir = None,
    work_dir: WorkDir = None,
):
    """Score a submission with the official LUNA16 FROC/CPM rules, or a model on every candidate of whole
    subsets."""
    import evaluate as evaluation
    import froc
    if (submission is None) == (model is None):
        raise UserError("give either --submission FILE or --model (a run name or a .pt file)")
    root, work = data_dir_option(data_dir), work_dir_option(work_dir)
    subset_list = parse_subsets(subsets, "--subsets", required=True) if subsets is not None else None
    json_out, out = common.output_file(json_out, "--json"), common.output_folder(out, "--out")
    settings = {**options.defaults("evaluate"), **given}
    if submission is not None and (given.keys() - {"bootstrap", "bootstrap_seed", "allow_missing"}):
        raise UserError("--candidates, --cutoff, --views, --batch-size and --precision are for evaluating a "
                        "model (--model); a submission holds its own marks")
    if submission is not None:
        scan_list, notes = froc.submission_scans(root, subset_list, seriesuids, work,
                                                       settings["allow_missing"])
        result = froc.score_submission(submission, annotations or root / "annotations.csv",
                                             excluded or root / "annotations_excluded.csv", scan_list,
                                             json_out=json_out,
                                             figure=json_out.with_suffix(".png") if json_out else None,
                                             bootstrap=settings["bootstrap"], seed=settings["bootstrap_seed"],
                                             warnings=notes)
        froc.print_froc(console, result, f"LUNA16 FROC of {submission.name}")
        return
    if subset_list is None:
        raise UserError("evaluating a model needs --subsets, e.g. --subsets 9")
    import head
    checkpoint = head.model_checkpoint(work, model)
    out_dir = out or evaluation.default_eval_dir(
        work, evaluation.evaluation_name(work, checkpoint, settings["candidates"]), subset_list,
        settings["views"])
    result = evaluation.evaluate_model(checkpoint, root, subset_list, out_dir, readers=readers, device=device,
                                       console=console, work_dir=work, compile=compile, **given)
    if json_out is not None:
        common.atomic_write_json(json_out, result)
    console.print(evaluation.candidate_table(result))
    froc.print_froc(console, result["froc"], f"LUNA16 FROC, subsets {subsets}", result["warnings"])
    if result["size"]["plain"]["n_nodules"]:
        console.print(evaluation.size_table(result["size"]))
    console.print(f"files in {out_dir}: submission.csv, predictions.csv, metrics.json, roc.png, froc.png, "
                  f"size.png, calibration.png")
    ece = result["calibration"]["ece"]
    console.print(f"calibration: {result['calibration']['note']}; ECE (10 bins) "
                  f"{'-' if ece is None else f'{ece:.4f}'}")
    if result["unreadable_scans"]:
        console.print(f"[red]{len(result['unreadable_scans'])} unreadable scan(s) skipped (named above)[/]")
        raise typer.Exit(1)


class Stage(str, Enum):
    head = "head"
    finetune = "finetune"


@app.command()
@friendly_errors
@renamed(per_scan="--max-per-scan")
@options.with_options(options.crossval_names(), None)
def crossval(
    given: dict,
    folds: Annotated[str, typer.Option(
        help="The subsets that are the folds, e.g. 0-9 (at least 2); fold k tests on subset k.")],
    name: Annotated[str, typer.Option(
        help="Cross-validation name: W/crossval/NAME, runs W/runs/NAME-fold<k>.")],
    stage: Annotated[Stage, typer.Option(
        help="head: train-head on cached features (cache-features --test-subsets none); finetune: encoder "
             "and head end to end.", case_sensitive=False)] = Stage.head,
    val_offset: Annotated[int, typer.Option(
        help="Fold k validates on the fold this many places before it in --folds (cyclic).")] = 1,
    mine_rounds: Annotated[int, typer.Option(
        min=0, help="Rounds of hard-negative mining inside each fold, with its own model on its training "
                    "subsets.")] = 0,
    max_per_scan: Annotated[int, typer.Option(
        min=1, help="With --mine-rounds: at most this many negatives a scan, its highest-scoring.")] = 20,
    views: Annotated[Optional[int], typer.Option(
        min=1, max=8, help="Flips averaged in evaluation (default: the checkpoint's own); finetune: in "
                           "validation too.")] = None,
    precision: Annotated[Optional[Precision], typer.Option(
        help="Evaluation precision (and finetune's): auto is bf16 on recent GPUs, fp16 on older ones, fp32 "
             "on the CPU.", case_sensitive=False)] = None,
    device: Device = "auto",
    compile: Compile = False,
    workers: Workers = None,
    readers: Readers = 2,
    bootstrap: Annotated[int, typer.Option(
        min=0, help="Bootstrap resamples of the scans for 95% intervals (0: none).")] = 1000,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the pooled metrics as JSON here.")] = None,
    data_dir: DataDir = None,
    work_dir: WorkDir = None,
):
    """Cross-validate over subsets (resumable): per fold train, then evaluate every candidate of its test
    subset; pool the FROC."""
    import crossval as cv
    import froc
    work = work_dir_option(work_dir)
    result = cv.run_crossval(work, data_dir_option(data_dir),
                             parse_subsets(folds, "--folds", required=True), name, stage=stage.value,
                             val_offset=val_offset, views=views,
                             precision=None if precision is None else precision.value,
                             mine_rounds=mine_rounds, max_per_scan=max_per_scan, device=device,
                             workers=workers, readers=readers, bootstrap=bootstrap,
                             json_out=common.output_file(json_out, "--json"), console=console,
                             compile=compile, **given)
    console.print(cv.fold_table(result))
    froc.print_froc(console, result["froc"], f"LUNA16 FROC, cross-validation {name} (all folds)")
    console.print(f"files in {cv.crossval_dir(work, name)}: submission.csv, "
                  f"metrics.json, folds.csv, froc.png, operating_point.json")
    if result["unreadable_scans"]:
        console.print(f"[red]{len(result['unreadable_scans'])} unreadable scan(s) skipped (named above); "
                      f"rerun to retry[/]")
        raise typer.Exit(1)


@app.command()
@friendly_errors
@renamed(checkpoint="--model (a run name or a .pt file; repeatable)", candidates="--points")
@options.with_options(options.stage_names("predict"), "predict")
def predict(
    given: dict,
    scan: Annotated[List[Path], typer.Option(
        help="The CT: .mhd, NIfTI, or a DICOM series folder; repeat it, or give a folder of scans, for "
             "several (detection only).")],
    model: Annotated[List[str], typer.Option(
        help="The model: a run name (its W/runs/NAME/best.pt) or a .pt checkpoint file; repeat it to average "
             "several models (their mean cutoff is unvalidated: give --cutoff, or use --ensemble).")] = [],
    ensemble: Annotated[Optional[str], typer.Option(
        help="Average the folds of crossval NAME (W/crossval/NAME) at the operating point chosen on their "
             "pooled out-of-fold scores.")] = None,
    coord: Annotated[List[str], typer.Option(
        "--coord", help="World mm point X,Y,Z, LPS as in the LUNA16 CSVs (repeat for several).")] = [],
    points: Annotated[Optional[Path], typer.Option(
        help="CSV of points with coordX,coordY,coordZ columns (world mm, LPS). "
             "Without --coord and --points, detect finds them.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write the predictions here as CSV.")] = None,
    report: Annotated[Optional[Path], typer.Option(
        help="Also write a findings page (DIR/<scan>/index.html) and viewer files: findings.mrk.json (3D "
             "Slicer), findings.nii.gz (label map on the CT's grid), findings.json.")] = None,
    device: Device = "auto",
    compile: Compile = False,
    work_dir: WorkDir = None,
):
    """Probability that the candidate at each world point of a new scan is a nodule (calibrated to the
    training candidate list, the raw score beside it), whether it needs follow-up, its diameter and, for
    follow-up points, the guideline's size category (research use only)."""
    import crossval as cv
    import predict as prediction
    import head
    if not model and ensemble is None:
        raise UserError("give --model (a run name or a .pt file; one or more) or --ensemble NAME of a "
                        "crossval")
    work = work_dir_option(work_dir)
    checkpoints = [head.model_checkpoint(work, m) for m in model]
    out, report = common.output_file(out, "--out"), common.output_folder(report, "--report")
    folder = None if ensemble is None else \
        cv.crossval_dir(work, common.plain_folder_name(ensemble, "--ensemble"))
    import data
    scans = data.find_scans(scan)
    if len(scans) > 1 and (coord or points is not None):
        raise UserError(f"--coord and --points are points of one scan; {len(scans)} scans were given "
                        f"(detection finds the points of several)")
    failed = {}
    if len(scans) == 1:
        rows = prediction.predict_scan(checkpoints, scans[0], coord, points, out, device=device,
                                       ensemble=folder, report=report, compile=compile, console=console,
                                       **given)
        title = prediction.results_title(scans[0], rows, detected=not coord and points is None)
    else:
        rows, failed = prediction.predict_scans(checkpoints, scans, out, device=device, ensemble=folder,
                                                report=report, console=console, compile=compile, **given)
        title = (f"{len(scans) - len(failed)} of {len(scans)} scans: {len(rows)} findings at or above the "
                 f"cutoff")
    console.print(prediction.prediction_table(rows, title=title, by_scan=len(scans) > 1) if rows else title)
    if out is not None:
        console.print(f"written to {out}")
    if report is not None:
        console.print(f"findings page and viewer files in {report}")
    if failed:
        console.print(f"[red]{len(failed)} scan(s) could not be read (named above); fix them and rerun the "
                      f"same command to add them[/]")
        raise typer.Exit(1)


@app.command()
@friendly_errors
def demo(
    work_dir: Annotated[Path, typer.Option(
        help="Folder for the phantom data, caches, runs and report.")] = Path("demo_work"),
    n_subsets: Annotated[int, typer.Option(
        min=3, max=10, help="Phantom subsets (the last is held out, the one before validates).")] = 5,
    scans_per_subset: Annotated[int, typer.Option(min=1, help="Phantom scans per subset.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(
        min=1, help="Epochs of end-to-end fine-tuning (512 balanced draws each).")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the phantoms and of training.")] = 0,
):
    """The whole pipeline on synthetic phantoms (CPU, a few minutes), ending with a report."""
    import demo as demo_stage
    settings = demo_stage.DemoSettings(subsets=n_subsets, scans_per_subset=scans_per_subset,
                                       finetune_epochs=finetune_epochs, seed=seed)
    console.print("[bold]Demo on synthetic chest phantoms[/] (not patient data; LUNA16 folder layout). "
                  "No pretrained weights are used: the encoder starts from random weights.")
    result = demo_stage.run_demo(common.output_folder(work_dir, "--work-dir"), settings, console=console)
    console.print(demo_stage.result_table(result, n_subsets))
    console.print(f"report: [bold]{result['report']}[/]")


if __name__ == "__main__":
    app()
