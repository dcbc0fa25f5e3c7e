"""The pipeline's options, each defined once: type, default in each stage, bounds or choices, unit and help.

A stage is one step that takes options: ``detect``, ``extract`` (and ``mining``, its --hard-negatives mode),
``features`` (cache-features), the training stages ``head`` (train-head) and ``finetune``, ``evaluate`` and
``predict``. From the definitions below come every other place an option used to be written by hand:

* the stages' defaults (:func:`defaults`); for training also the resolved options stored in a run's
  ``config.json`` and the ``--resume`` comparison (``runs.open_run`` takes them from here);
* the validation (:func:`given`, :func:`check`: a bad value is a ``UserError`` naming the option and its
  bounds), the same for the command line, the Python functions and crossval;
* what crossval passes on to each fold (:func:`crossval_names`: the training options but those a fold
  decides);
* the command-line options: ``luna_cli`` builds each command's signature with :func:`with_options`.

Adding an option is one entry in :data:`OPTIONS` and the code that uses it.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Dict, Optional, Sequence, Tuple, Union

import calibration
import followup
from common import UserError, format_subsets, parse_subsets

STAGES = ("head", "finetune")  # the training stages (crossval's --stage)
SCORING = ("evaluate", "predict", "mining")  # scoring candidates with a trained model
COMMANDS = ("detect", "extract") + STAGES + ("features",) + SCORING  # every stage whose options are here
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
POOLINGS = ("avg", "flatten", "centre")
MAX_VIEWS = 8  # the flips of a patch (head.VIEW_FLIPS)


@dataclass(frozen=True)
class Option:
    """One option. ``defaults``: ``{stage: default}`` for the stages that take it. ``kind``: int, float, str,
    bool, Path or "subsets" (subset numbers, given as text such as ``0-7,9``). Bounds are inclusive unless
    ``open_low``/``open_high``. ``help`` may be a ``{stage: text}`` dict where the stages differ (the unit of
    a batch, say)."""
    name: str
    kind: Any
    help: Union[str, Dict[str, str]]
    defaults: Dict[str, Any]
    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False
    choices: Tuple[str, ...] = ()
    unit: str = ""
    words: Tuple[str, ...] = ()  # words accepted besides the values ("auto")
    multiple_of: int = 0
    cli: str = ""  # the flag, when not the name's (``--type`` for nodule_type)
    crossval_help: str = ""  # what the option means to crossval, where that differs from the stage's help

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    def text(self, stage: str) -> str:
        return self.help[stage] if isinstance(self.help, dict) else self.help

    def bounds(self) -> str:
        """The allowed values in words: ``"at least 1"``, ``"above 0 and below 1"``, ``"one of avg, ..."``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        words = []
        if self.low is not None:
            words.append(f"{'above' if self.open_low else 'at least'} {self.low:g}")
        if self.high is not None:
            words.append(f"{'below' if self.open_high else 'at most'} {self.high:g}")
        return " and ".join(words)

    def check(self, value: Any) -> Any:
        """``value`` as the stage uses it (subsets as a sorted list, paths as text), or a UserError naming the
        option and what it allows."""
        if value is None:
            return None
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        if self.kind == "subsets":
            return (parse_subsets(value, self.flag) if isinstance(value, str)
                    else sorted(int(v) for v in value))
        if isinstance(value, Enum):
            value = value.value
        if self.kind is Path:
            return str(value)
        if self.kind in (int, float) and not _is_number(value, self.kind):
            raise UserError(f"{self.flag} must be {'an integer' if self.kind is int else 'a number'}, "
                            f"got {value!r}")
        if self.kind is bool and not isinstance(value, bool):
            raise UserError(f"{self.flag} is a switch (true or false), got {value!r}")
        if self.multiple_of and value % self.multiple_of:
            raise UserError(f"{self.flag} must be a multiple of {self.multiple_of}, got {value!r}")
        if not self._allows(value):
            raise UserError(f"{self.flag} must be {self.bounds()}{' ' + self.unit if self.unit else ''}, "
                            f"got {value!r}")
        return self.kind(value) if self.kind in (int, float, str) else value

    def _allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and not (value > self.low if self.open_low else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)


def _is_number(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, (int, float)) and math.isfinite(float(value))


BOTH = STAGES
OPTIONS: Dict[str, Option] = {o.name: o for o in (
    # extract: the patch cache
    Option("patch_size", int, "Cube edge in voxels (the encoder halves it five times).", {"extract": 64},
           low=32, multiple_of=32, unit="voxels"),
    Option("spacing_mm", float, "Isotropic voxel size of the cube.", {"extract": 1.0}, low=0, open_low=True,
           unit="mm"),
    Option("negatives_per_positive", float, "Seeded sample of negatives per positive candidate.",
           {"extract": 10.0}, low=0),
    Option("all_candidates", bool, "Keep every candidate, not a sample.", {"extract": False}),
    Option("sample_seed", int, "Seed of the sample of negatives.", {"extract": 0}),
    Option("features", str, "Feature set made by cache-features (default: the only one; listed when there "
           "are several).", {"head": None}),
    Option("weights", Path, "Pretrained Swin UNETR checkpoint for the encoder (random init without).",
           {"finetune": None, "features": None}),
    Option("subsets", "subsets", "Subsets to encode (default: every extracted one but the test subsets).",
           {"features": None}),
    Option("head_from", str, "Start from this run's best.pt (a run name or a .pt path).", {"finetune": None},
           crossval_help="Start each fold from the same fold of this head-stage cross-validation (its "
                         "--name)."),
    Option("val_subsets", "subsets", "Validation subsets, e.g. 8 or 7,8 (each must be extracted); auto: "
           "80:20 split of the training scans by seriesuid.", {s: [8] for s in BOTH}, words=("auto",)),
    Option("test_subsets", "subsets", "Held-out test subsets, never read here: neither trained on nor "
           "encoded ('none' for none).", {s: [9] for s in STAGES + ("features",)}),
    Option("epochs", int, "Most epochs (fixes the learning-rate schedule).", {"head": 100, "finetune": 30},
           low=1),
    Option("batch_size", int, {"head": "Feature vectors per step.",
                               "finetune": "Patches per step in each process.",
                               **{s: "Patches per forward pass (on the CPU the encoder takes a few at a "
                                     "time, as many as its cache holds)." for s in ("features",) + SCORING}},
           {"head": 256, "finetune": 32, "features": 32, "evaluate": 64, "predict": 64, "mining": 64}, low=1),
    Option("accumulate", int, "Steps of gradient accumulation per optimiser update.", {s: 1 for s in BOTH},
           low=1),
    Option("lr", float, "Peak AdamW learning rate.", {"head": 1e-3, "finetune": 1e-4}, low=0, open_low=True),
    Option("weight_decay", float, "AdamW weight decay.", {"head": 1e-4, "finetune": 1e-5}, low=0),
    Option("warmup_epochs", float, "Epochs of linear learning-rate warm-up.", {s: 1.0 for s in BOTH}, low=0,
           unit="epochs"),
    Option("patience", int, "Stop after this many epochs without a better validation AUC (0: never).",
           {"head": 10, "finetune": 0}, low=0),
    Option("epoch_samples", int, "Class-balanced draws per epoch (0: the training set size).",
           {s: 0 for s in BOTH}, low=0),
    Option("positive_share", float, "Share of each epoch's draws that are nodules.", {s: 0.5 for s in BOTH},
           low=0, high=1, open_low=True, open_high=True),
    Option("size_weight", float, "Weight of the size loss (squared error of the log-diameter on annotated "
           "nodules) beside the classification loss; 0: no size output.", {s: 1.0 for s in BOTH}, low=0),
    Option("target_sensitivity", float, "The cutoff is the highest threshold at which this share of the "
           "validation nodules has a candidate at or above it.", {s: 0.9 for s in BOTH}, low=0, high=1,
           open_low=True),
    Option("seed", int, "Seed of the training draws, augmentation and a new head's initial weights.",
           {s: 0 for s in BOTH}),
    Option("feature_size", int, "Encoder feature size (48 for the published weights; 12 for small CPU "
           "models).", {"finetune": 48, "features": 48}, low=12),
    Option("window_size", int, "Attention window (7 for the published weights; 4 for 32^3 CPU models).",
           {"finetune": 7, "features": 7}, low=2),
    Option("pooling", str, "avg (16 * feature_size values), flatten (the whole last stage) or centre (each "
           "stage's centre, 31 * feature_size).", {"finetune": "avg", "features": "avg"}, choices=POOLINGS),
    Option("grad_checkpoint", bool, "Recompute activations to save GPU memory.", {"finetune": False}),
    Option("hu_min", float, "HU mapped to 0.", {"finetune": -1000.0, "features": -1000.0}, unit="HU"),
    Option("hu_max", float, "HU mapped to 1.", {"finetune": 1000.0, "features": 1000.0}, unit="HU"),
    Option("augment", bool, "Random flips and shifts of every patch, whatever its class.",
           {"finetune": True}),
    Option("max_shift_mm", float, "Largest shift per axis.", {"finetune": 3.0}, low=0, unit="mm"),
    Option("precision", str, "auto: bf16 on recent GPUs, fp16 on older ones, fp32 on the CPU.",
           {s: "auto" for s in ("finetune", "features") + SCORING}, choices=PRECISIONS),
    Option("views", int, {"finetune": "Flips of each validation patch averaged, recorded for evaluate and "
                                      "predict.",
                          "features": "Flips of each patch to encode; train-head learns from all.",
                          **{s: "Flips of each patch averaged per prediction (default: the checkpoint's own, "
                                "from training)." for s in SCORING}},
           {"finetune": 1, "features": 1, **{s: None for s in SCORING}}, low=1, high=MAX_VIEWS),
    Option("init_seed", int, "Seed of a random-init encoder (no --weights).", {"features": 0}),
    # scoring a model: evaluate and predict
    Option("cutoff", float, "Cutoff as a raw logit (the model's score before calibration; probability p is "
           "log(p/(1-p))), instead of the validated one.", {"evaluate": None, "predict": None}),
    Option("candidates", Path, {"extract": "Candidates CSV to cut (default: candidates_V2.csv of the data "
                                           "dir), e.g. one written by detect.",
                                "evaluate": "The candidates to score (default: candidates_V2.csv of the data "
                                            "dir), e.g. one written by detect."},
           {"extract": None, "evaluate": None}),
    Option("bootstrap", int, "Bootstrap resamples of the scans for 95% intervals (0: none).",
           {"evaluate": 1000}, low=0),
    Option("bootstrap_seed", int, "Seed of the bootstrap resamples.", {"evaluate": 0}),
    Option("allow_missing", bool, "Keep scans missing from a subset folder (against extract's manifest, and "
           "seriesuids.csv with all ten subsets) in the FROC, their nodules missed, instead of refusing.",
           {"evaluate": False}),
    Option("max_per_scan", int, {"detect": "At most this many candidates a scan, the highest blob score "
                                           "first.",
                                 "predict": "Without --coord and --points: at most this many detected "
                                            "candidates a scan (the highest first).",
                                 "mining": "With --hard-negatives: at most this many negatives a scan, its "
                                           "highest-scoring."},
           {"detect": 300, "predict": 300, "mining": 20}, low=1),
    Option("screen", bool, "Without --coord and --points, with more than one view: score every detected "
           "candidate at one view first and add views in stages (the view counts validation stored: 1, 2, 4 "
           "of 8), a candidate going on while its score so far comes within a margin of that stage's "
           "screening cutoff (below which validation saw no candidate that all views put above the cutoff; "
           f"the margin is at least {calibration.SCREEN_MARGIN:g} logits, and as much as that screening "
           "cutoff lies below the cutoff); --no-screen scores every candidate at all views.",
           {"predict": True}),
    Option("guideline", str, "Size table for the follow-up category: fleischner (Fleischner 2017, incidental "
           "nodules) or lung-rads (Lung-RADS v2022, baseline screening scan).", {"predict": "fleischner"},
           choices=tuple(followup.GUIDELINES)),
    Option("nodule_type", str, "Nodule type assumed for every point (not measured); with part-solid or "
           "ground-glass the diameter is measured at -650 HU instead of -400.", {"predict": "solid"},
           choices=tuple(followup.NODULE_TYPES), cli="--type"),
    Option("risk", str, "Patient risk assumed (Fleischner only).", {"predict": "low"},
           choices=tuple(followup.RISKS)),
)}

# Options a cross-validation fold decides itself (or crossval handles on its own: views and precision also set
# the folds' evaluation).
FOLD_DECIDES = ("val_subsets", "test_subsets", "views", "precision")


def stage_names(stage: str) -> Tuple[str, ...]:
    """The options of ``stage``, in :data:`OPTIONS` order."""
    _check_stage(stage)
    return tuple(name for name, option in OPTIONS.items() if stage in option.defaults)


def crossval_names() -> Tuple[str, ...]:
    """The training options crossval passes on to its folds: every option of either stage but those a fold
    decides."""
    return tuple(dict.fromkeys(name for stage in STAGES for name in stage_names(stage)
                               if name not in FOLD_DECIDES))


def defaults(stage: str) -> Dict[str, Any]:
    """``{name: default}`` of the options of ``stage``."""
    return {name: _copy(OPTIONS[name].defaults[stage]) for name in stage_names(stage)}


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _check_stage(stage: str) -> None:
    if stage not in COMMANDS:
        raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")


def given(stage: str, values: Dict[str, Any]) -> Dict[str, Any]:
    """The given (not None) ``values`` of ``stage``'s options, checked and as JSON values. A name that is not
    an option of the stage is refused, naming the stage that has it."""
    _check_stage(stage)
    chosen = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in OPTIONS:
            raise UserError(f"--{name.replace('_', '-')} is not an option of {stage} "
                            f"(they are: {', '.join(stage_names(stage))})")
        if stage not in OPTIONS[name].defaults:
            owner = next(s for s in COMMANDS if s in OPTIONS[name].defaults)
            raise UserError(f"{OPTIONS[name].flag} is an option of --stage {owner}, not of --stage {stage}")
        chosen[name] = OPTIONS[name].check(value)
    return chosen


def check(stage: str, options: Dict[str, Any]) -> None:
    """Every option of a resolved set, and the rules between options."""
    for name in stage_names(stage):
        OPTIONS[name].check(options[name])
    if "hu_min" in options and options["hu_max"] <= options["hu_min"]:
        raise UserError(f"--hu-max ({options['hu_max']}) must be greater than --hu-min ({options['hu_min']})")


def describe(value: Any, option: Option) -> str:
    """A value as the command line writes it."""
    return format_subsets(value) if option.kind == "subsets" else repr(value)


# --- command-line parameters --------------------------------------------------------------------------------

def _choice_enum(option: Option):
    return Enum(option.name.title().replace("_", ""), {c: c for c in option.choices}, type=str)


def _range(option: Option) -> str:
    if option.choices or (option.low is None and option.high is None):
        return ""
    return f" ({option.bounds()}{' ' + option.unit if option.unit else ''})"


def typer_parameters(names: Sequence[str], stages: Union[str, Sequence[str], None]) -> list:
    """Keyword-only ``inspect.Parameter`` s for the options ``names``, typed for Typer. ``stages``: a stage,
    or several (a command with two modes), whose defaults and help they take, the first stage that has the
    option; None (crossval): every default is None (the stage decides), and an option of only one training
    stage says which in its help."""
    import typer
    parameters = []
    for name in names:
        option = OPTIONS[name]
        training = [s for s in STAGES if s in option.defaults]
        stage = None if stages is None else next(s for s in ([stages] if isinstance(stages, str) else stages)
                                                 if s in option.defaults)
        owner = stage or training[0]
        own_text = option.crossval_help if stage is None and option.crossval_help else option.text(owner)
        help_text = own_text + _range(option)
        if stage is None and len(training) == 1:
            help_text = f"{owner}: {help_text}"
        if stage is None:
            help_text += " (default: the stage's own)"
        kind = {"subsets": str, Path: Path}.get(option.kind, option.kind)
        if option.choices:
            kind = _choice_enum(option)
        default = option.defaults[stage] if stage else None
        if option.kind == "subsets" and default is not None:
            default = format_subsets(default)
        if isinstance(default, str) and option.choices:
            default = kind(default)
        flags = ((f"{option.flag}/--no-{option.flag[2:]}",) if option.kind is bool
                 else (option.flag,) if option.cli else ())
        typer_option = typer.Option(*flags, help=help_text, case_sensitive=False) if option.choices else \
            typer.Option(*flags, help=help_text)
        annotation = Annotated[Optional[kind] if default is None else kind, typer_option]
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=annotation))
    return parameters


def with_options(names: Sequence[str], stage: Union[str, Sequence[str], None]):
    """Decorator for a Typer command: adds the options ``names`` (see :func:`typer_parameters`) to its own
    parameters, and calls it with ``given``: those the user gave on the command line, checked (defaults are
    left to the stage, so that ``--resume`` can tell a given option from a default)."""
    import typer

    def decorate(func):
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != "given"]
        context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)

        def command(ctx, **values):  # typed by __signature__ below
            chosen = {name: values.pop(name) for name in names}
            return func(given={n: OPTIONS[n].check(v) for n, v in chosen.items()
                               if ctx.get_parameter_source(n).name != "DEFAULT"}, **values)
        command.__name__, command.__doc__ = func.__name__, func.__doc__
        command.__signature__ = inspect.Signature(
            [context] + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
            + typer_parameters(names, stage))
        return command
    return decorate
