"""Classifier = Swin encoder + MLP head, and its checkpoint format.

Input to the model: HU patches scaled with ``data.hu_to_unit`` to float32 ``(B, 1, P, P, P)``, array axes
``[z, y, x]`` along increasing world (LPS) z, y, x (voxels of ``spacing_mm``). Output: one logit per patch,
``(B,)``; ``sigmoid(logit)`` is the probability that the candidate is a nodule. A model whose config has
``"size_output": true`` also gives, with ``with_size=True``, the natural log of the nodule's diameter in mm
(meaningful for nodules only; :func:`diameter_from_log` turns it into mm). Configs without the key (models
made before it existed) have no size output.

The encoder sees that patch in the layout its weights were trained in: ``Classifier.forward_features`` passes
it through :func:`to_encoder_layout` first. The self-supervised CT weights (and the BraTS ones) were trained
on MONAI-loaded volumes indexed ``[x, y, z]`` in RAS orientation, so new models use ``"ras_xyz"``; checkpoints
record the layout as ``config["encoder"]["input_layout"]``, and a config without it (made before the layout
existed) means ``"lps_zyx"``, the patch as it is.

Checkpoints are ``torch.save`` dicts of plain Python values and tensors only (loadable with
``torch.load(weights_only=True)``)::

    {"format": CHECKPOINT_FORMAT, "model": state_dict, "config": {...}, "preprocess": {...},
     "operating_point": {...}, "calibration": {...}, "epoch": int, ...train state for resuming...}
"""
from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from data import hu_to_unit
from common import UserError, atomic_path
from options import MAX_VIEWS, OPTIONS, POOLINGS, PRECISIONS

CHECKPOINT_FORMAT = "luna16-classifier/1"
ENCODER_DEFAULTS: Dict[str, Any] = {"in_channels": 1, "feature_size": 48, "depths": [2, 2, 2, 2],
                                    "num_heads": [3, 6, 12, 24], "window_size": 7, "patch_size": 2,
                                    "use_checkpoint": False}

# The encoder's input layouts (see to_encoder_layout). New models use the published weights' pretraining
# layout; a model config without "input_layout" predates it and was trained on the patch as it is.
PRETRAINING_LAYOUT = "ras_xyz"
LEGACY_LAYOUT = "lps_zyx"
INPUT_LAYOUTS = (PRETRAINING_LAYOUT, LEGACY_LAYOUT)


def to_encoder_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Model input ``(B, C, P, P, P)`` indexed ``[z, y, x]`` along world LPS +z, +y, +x -> the encoder's
    layout.

    ``"ras_xyz"``: the layout of MONAI's loaders (``Orientationd(axcodes="RAS")``), in which the Swin UNETR
    weights were trained: array axes ``[i, j, k]`` run along RAS +x (patient Right), +y (Anterior),
    +z (Superior). RAS +x is LPS -x and RAS +y is LPS -y, while +z is the same, so
    ``out[i, j, k] = patch[k, P-1-j, P-1-i]``: the axes are reversed to ``[x, y, z]`` and the (now first
    two) x and y axes are flipped.
    ``"lps_zyx"``: the patch unchanged (models made before the layout existed).
    """
    if check_layout(layout) == PRETRAINING_LAYOUT:
        return torch.flip(x.permute(0, 1, 4, 3, 2), (2, 3))
    return x


def check_layout(layout: str) -> str:
    if layout not in INPUT_LAYOUTS:
        raise ValueError(f"input_layout must be one of {INPUT_LAYOUTS}, got {layout!r}")
    return layout


# The size output predicts log(diameter / SIZE_REFERENCE_MM), so that a fresh layer (output near 0) starts
# near a typical nodule size rather than at 1 mm.
SIZE_REFERENCE_MM = 8.0


def diameter_from_log(log_diameter):
    """The size output (natural log of the diameter in mm) -> diameter in mm (numpy or torch)."""
    return np.exp(log_diameter) if isinstance(log_diameter, np.ndarray) else torch.exp(log_diameter)


class MLPHead(nn.Module):
    """Features ``(B, F)`` -> logits ``(B,)``: Linear 512, ReLU, dropout, Linear 256, ReLU, dropout, Linear 1.

    The features are first standardised with the fixed buffers ``feature_mean`` / ``feature_std`` (identity
    until ``set_standardisation``; train-head sets them from the training features). The encoder's pooled
    features differ far more between feature channels than between patches, and without this the head
    learns slowly. With ``size_output`` a second Linear on the same 256 hidden values (``size``) gives the
    log-diameter; the classification layers keep their names, so heads without it load as before.
    """

    def __init__(self, in_features: int, dropout: float = 0.3, size_output: bool = False):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.layers = nn.Sequential(
            nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, 1))
        self.size = nn.Linear(256, 1) if size_output else None

    @property
    def has_size(self) -> bool:
        return self.size is not None

    def set_standardisation(self, features: torch.Tensor) -> None:
        """Per-feature mean and standard deviation of ``(N, F)`` training features."""
        features = features.float()
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0, unbiased=False).clamp(min=1e-6))

    def forward(self, features: torch.Tensor, with_size: bool = False):
        """Logits ``(B,)``; with ``with_size``, ``(logits, log-diameter in mm (B,))``."""
        hidden = self.layers[:-1]((features - self.feature_mean) / self.feature_std)
        logits = self.layers[-1](hidden).squeeze(-1)
        if not with_size:
            return logits
        if self.size is None:
            raise ValueError("this head has no size output (its model config has no size_output)")
        return logits, self.size(hidden).squeeze(-1) + math.log(SIZE_REFERENCE_MM)


# Bytes of first-stage tokens that one CPU forward pass without gradients works on: with more, its two dozen
# passes over them run from memory rather than cache (a 64^3 patch at feature size 48 has 6.3 MB of them; 2 a
# pass were 1.6x faster a patch than 64 on 2 CPUs, BENCHMARKS).
CPU_BATCH_BYTES = 16 * 2 ** 20


def cpu_batch(encoder: nn.Module, x: torch.Tensor) -> int:
    """How many of the inputs ``x`` ``(B, C, D, H, W)`` the encoder takes in one CPU forward pass without
    gradients: those whose first-stage tokens fit :data:`CPU_BATCH_BYTES` (at least one)."""
    tokens = math.prod(n // encoder.patch_size for n in x.shape[2:])
    return max(1, CPU_BATCH_BYTES // (tokens * encoder.feature_size * x.element_size()))


class Classifier(nn.Module):
    """Swin encoder + MLP head on the encoder's last stage (``16 * feature_size`` channels at ``P / 32``).

    pooling ``"avg"``: global average over the last stage's voxels -> ``16 * feature_size`` features;
    ``"flatten"``: all of its voxels in the encoder's order (``[channel, x, y, z]`` RAS for ``"ras_xyz"``,
    ``[channel, z, y, x]`` for ``"lps_zyx"``) -> ``16 * feature_size * (P / 32) ** 3``;
    ``"centre"``: every stage's mean over its central ``2^3`` voxels (the one centre voxel of an odd-sized
    map) -> ``31 * feature_size`` features. A candidate sits at the patch centre, and a global average
    dilutes what is there with its surroundings; the centre of each stage keeps fine and coarse views of it.

    ``input_layout``: how the ``[z, y, x]`` patch is laid out for the encoder (:func:`to_encoder_layout`);
    ``build_classifier`` takes it from the config, where it is missing from models that predate it.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str = "avg",
                 input_layout: str = LEGACY_LAYOUT):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.encoder = encoder
        self.head = head
        self.pooling = pooling
        self.input_layout = check_layout(input_layout)
        self.compiled_encoder: Optional[CompiledOrEager] = None   # compile_encoder; not part of the weights

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, P, P, P)`` unit-scaled patches ``[z, y, x]`` -> ``(B, F)`` features. On the CPU without
        gradients the encoder sees :func:`cpu_batch` inputs at a time, whatever the batch."""
        on_cpu = x.device.type == "cpu" and not torch.is_grad_enabled()
        step = cpu_batch(self.encoder, x) if on_cpu else len(x)
        if len(x) > step:
            return torch.cat([self._features(part) for part in x.split(step)])
        return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = to_encoder_layout(x, self.input_layout)
        encode = self.compiled_encoder or self.encoder
        if self.pooling == "centre":
            return torch.cat([centre_mean(stage) for stage in encode(x)], dim=1)
        last = encode(x)[-1]
        if self.pooling == "avg":
            return last.mean(dim=(2, 3, 4))
        return last.flatten(1)

    def forward_head(self, features: torch.Tensor, with_size: bool = False):
        """``(B, F)`` features -> ``(B,)`` float32 logits; with ``with_size``,
        ``(logits, log-diameter (B,))``.

        The head always runs in float32, outside any autocast: the encoder may run in bf16/fp16, but logits in
        bf16 steps (about 0.03-0.06 apart) would tie scores that the FROC's 100-mark cap and the AUC tell
        apart.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float(), with_size)

    def forward(self, x: torch.Tensor, with_size: bool = False):
        return self.forward_head(self.forward_features(x), with_size)

    @property
    def has_size(self) -> bool:
        return self.head.has_size


class CompiledOrEager:
    """Calls ``torch.compile(module)``; where compiling fails (no working compiler for this torch build or
    device), warns once and calls the module itself from then on. Not an ``nn.Module``, so the state dict and
    the checkpoints stay those of the module."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.compiled: Optional[Callable] = torch.compile(module)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # the compiler's errors have no common type
                if out_of_memory(err):
                    raise
                self.compiled = None
                first_line = (str(err).strip().splitlines() or [""])[0][:300]
                warnings.warn(f"--compile: torch.compile failed here ({type(err).__name__}: {first_line}); "
                              f"running without it", RuntimeWarning, stacklevel=2)
        return self.module(*args, **kwargs)


def compile_encoder(model: Classifier, enabled: bool = True) -> Classifier:
    """With ``enabled`` (``--compile``), ``model``'s encoder runs through :class:`CompiledOrEager`: the first
    batches of each shape are slow while it compiles, and where compiling fails the model runs as before."""
    model.compiled_encoder = CompiledOrEager(model.encoder) if enabled else None
    return model


def centre_mean(stage: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, C)``: mean over the central 2 voxels of each even axis (1 of an odd
    one)."""
    for axis in (2, 3, 4):
        size = stage.shape[axis]
        stage = stage.narrow(axis, (size - 1) // 2, 2 - size % 2)
    return stage.mean(dim=(2, 3, 4))


def resolve_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """Fill defaults and validate a model config ``{"encoder": {...}, "pooling": ..., "patch_size": P,
    "size_output": bool}`` (``size_output`` missing: False, a model made before it existed).

    ``encoder["input_layout"]`` missing means ``"lps_zyx"``: the config predates the layout (old checkpoints
    and feature sets keep their outputs). New configs come from ``features.encoder_config``, which sets it.
    """
    encoder = dict(ENCODER_DEFAULTS)
    encoder.update(config.get("encoder", {}))
    check_layout(encoder.setdefault("input_layout", LEGACY_LAYOUT))
    encoder["depths"] = [int(d) for d in encoder["depths"]]
    encoder["num_heads"] = [int(h) for h in encoder["num_heads"]]
    pooling = config.get("pooling", "avg")
    patch_size = int(config.get("patch_size", 64))
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if patch_size < 32 or patch_size % 32:
        raise ValueError(f"patch_size must be a positive multiple of 32 (five halvings), got {patch_size}")
    if int(encoder["feature_size"]) < 1:
        raise ValueError(f"feature_size must be positive, got {encoder['feature_size']}")
    return {"encoder": encoder, "pooling": pooling, "patch_size": patch_size,
            "size_output": bool(config.get("size_output", False))}


def feature_dim(config: Dict[str, Any]) -> int:
    """Number of features the head sees for a (resolved) model config."""
    config = resolve_config(config)
    channels = 16 * int(config["encoder"]["feature_size"])
    if config["pooling"] == "centre":
        return 31 * int(config["encoder"]["feature_size"])
    if config["pooling"] == "avg":
        return channels
    return channels * (config["patch_size"] // 32) ** 3


def build_encoder(encoder_config: Dict[str, Any]) -> nn.Module:
    """A randomly initialised ``swin_encoder.SwinEncoder`` from its keyword arguments (``input_layout``
    aside)."""
    import swin_encoder
    kwargs = {k: v for k, v in encoder_config.items() if k != "input_layout"}
    kwargs["depths"] = tuple(kwargs["depths"])
    kwargs["num_heads"] = tuple(kwargs["num_heads"])
    return swin_encoder.SwinEncoder(**kwargs)


def build_classifier(config: Dict[str, Any]) -> Classifier:
    """Randomly initialised classifier for ``config = {"encoder": {SwinEncoder kwargs, "input_layout"},
    "pooling", "patch_size"}``."""
    config = resolve_config(config)
    return Classifier(build_encoder(config["encoder"]),
                      MLPHead(feature_dim(config), size_output=config["size_output"]), config["pooling"],
                      config["encoder"]["input_layout"])


def save_checkpoint(path: Path, payload: Dict[str, Any]) -> None:
    """``torch.save(payload)`` atomically: a ``.tmp`` file beside ``path`` renamed over it."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def strip_module_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove the ``module.`` prefix DistributedDataParallel adds to parameter names."""
    return {(key[len("module."):] if key.startswith("module.") else key): value
            for key, value in state.items()}


def runs_dir(work_dir) -> Path:
    """``W/runs``: one folder per training run (train-head, finetune), its checkpoints inside."""
    return Path(work_dir) / "runs"


def model_checkpoint(work_dir, model, option: str = "--model") -> Path:
    """The checkpoint that a model option names, wherever a model is read: a ``.pt`` file, a run name (its
    ``W/runs/NAME/best.pt``) or a run folder (its ``best.pt``). UserError naming the option when it is
    missing."""
    path = Path(model)
    advice = f"give a run name under {runs_dir(work_dir)}, a run folder or a .pt file"
    if path.is_file() and path.suffix != ".pt":
        raise UserError(f"{option} {model}: a file that is not a .pt checkpoint ({advice})")
    if path.suffix != ".pt":
        run_folder = path.is_dir() and (path / "config.json").is_file()
        path = (path if run_folder else runs_dir(work_dir) / str(model)) / "best.pt"
    if not path.is_file():
        raise UserError(f"{option} {model}: no checkpoint {path} ({advice})")
    return path


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Load one of our checkpoint dicts on the CPU (``weights_only=True``), or raise UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling/zip errors: not a torch file, or one that needs unsafe loading
        raise UserError(f"{path} is not a readable classifier checkpoint ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "model" not in payload:
        raise UserError(f"{path} is not a classifier checkpoint of this toolkit "
                        f"(expected best.pt/last.pt written by train-head or finetune)")
    return payload


def load_classifier(path: Path, device: str = "cpu",
                    compile: bool = False) -> Tuple[Classifier, Dict[str, Any]]:
    """Checkpoint -> (classifier in eval mode on ``device``, its encoder compiled with ``compile``
    (:func:`compile_encoder`), meta).

    meta: ``config`` (model config), ``preprocess`` {patch_size, spacing_mm, hu_min, hu_max}, ``epoch``, plus
    when present ``metrics``, ``kind``, ``views``, ``operating_point`` (validated cutoffs, raw logits per
    number of views; see calibration.py), ``calibration`` (training share and candidate prior) and, in
    checkpoints made before operating points, ``cutoff`` (a probability chosen per candidate patch).
    """
    payload = read_checkpoint(path)
    try:
        model = build_classifier(payload["config"])
        model.load_state_dict(strip_module_prefix(payload["model"]))
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{path}: weights do not fit the model config stored with them ({err})") from None
    compile_encoder(model.to(device).eval(), compile)
    meta = {key: payload[key] for key in ("config", "preprocess", "cutoff", "epoch", "metrics", "kind", "run",
                                          "views", "operating_point", "calibration") if key in payload}
    return model, meta


# --- devices and precision ---------------------------------------------------------



def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; plain ``cuda`` under torchrun -> this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise UserError(f"--device: unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on GPUs that support it, fp16 (with loss scaling) on older ones, fp32 on
    CPU."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use fp32 (or bf16) on the CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# --- views and batched prediction ---------------------------------------------------

# The 8 flip combinations of the z, y, x axes of a (B, P, P, P) batch; view 0 is the patch itself. Views are
# flips of the [z, y, x] LPS patch, made before Classifier.forward_features puts it in the encoder's layout
# (the full set of 8 is the same set of flips in either layout; a smaller one is a fixed choice of
# patch axes).
VIEW_FLIPS = tuple(tuple(axis for axis, bit in zip((1, 2, 3), bits) if bit)
                   for bits in itertools.product((0, 1), repeat=3))


assert len(VIEW_FLIPS) == MAX_VIEWS


def check_views(views: int) -> int:
    return OPTIONS["views"].check(views)


def flipped_views(x: torch.Tensor, views: int, first: int = 0):
    """Flips ``first`` to ``views - 1`` of ``(B, P, P, P)`` ``[z, y, x]`` patches, each as model input
    ``(B, 1, P, P, P)`` (still ``[z, y, x]``: the model applies its input layout)."""
    for flip in VIEW_FLIPS[first:views]:
        yield (torch.flip(x, flip) if flip else x).unsqueeze(1)


def view_outputs(model: Classifier, patches, preprocess: Dict[str, Any], device: str = "cpu",
                 batch_size: int = 64, views: int = 1, precision: str = "fp32", with_size: bool = False,
                 first: int = 0):
    """Per flip: nodule probabilities (float64, sigmoid in float64) of int16 HU patches ``(N, P, P, P)``
    ``[z, y, x]`` under flips ``first`` to ``views - 1``, ``(N, views - first)`` (column v:
    ``VIEW_FLIPS[first + v]``), and with ``with_size`` the log-diameters (mm) of the same shape (None without,
    or for a model without a size output). The flips of several patches go through the model together,
    ``batch_size`` inputs a forward pass at most. ``precision`` (resolved) applies to the encoder only:
    the head, its logits and size run in float32."""
    patches = torch.as_tensor(patches)
    sized = with_size and model.has_size
    count = views - first
    device, chunk = torch.device(device), max(1, batch_size // count)
    probabilities, log_sizes = [], []   # kept on the device, copied once: no wait for it after each batch
    with torch.inference_mode():
        for start in range(0, len(patches), chunk):
            hu = patches[start:start + chunk].to(device, non_blocking=True)
            x = hu_to_unit(hu, preprocess.get("hu_min", -1000.0), preprocess.get("hu_max", 1000.0))
            logits, size = _forward_in_batches(model, torch.cat(list(flipped_views(x, views, first))),
                                               batch_size, device, precision, sized)
            probabilities.append(torch.sigmoid(logits.double()).reshape(count, -1).T)
            if sized:
                log_sizes.append(size.double().reshape(count, -1).T)
    if not probabilities:
        return np.empty((0, count), np.float64), np.empty((0, count), np.float64) if sized else None
    return (torch.cat(probabilities).cpu().numpy(),
            torch.cat(log_sizes).cpu().numpy() if sized else None)


def out_of_memory(err: BaseException) -> bool:
    """Whether an error is the device running out of memory."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_batch(fits: Callable[[int], bool], batch_size: int) -> int:
    """The largest batch below ``batch_size`` for which ``fits(b)`` (a trial step of b inputs) is true: halved
    until one fits, then searched between that and the smallest that did not; 0 when not even 1 fits."""
    low, high = batch_size // 2, batch_size
    while low >= 1 and not fits(low):
        low, high = low // 2, low
    while low and high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def trial_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``size`` inputs like the first of ``x``, for a trial step."""
    return x[:1].expand(size, *x.shape[1:]).contiguous()


def batch_too_large(device, batch_size: int, step: Callable[[int], Any],
                    what: str = "--batch-size") -> UserError:
    """The UserError for a ``batch_size`` that does not fit in ``device``'s memory, naming the largest that
    does (found by trial steps ``step(b)``)."""
    def fits(b: int) -> bool:
        try:
            step(b)
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            return False
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    largest = largest_batch(fits, batch_size)
    advice = f"the largest that fits is {largest}: give {what} {largest}" if largest else "not even 1 fits"
    return UserError(f"{what} {batch_size} does not fit in the memory of {device}; {advice}")


def _forward_in_batches(model: Classifier, x: torch.Tensor, batch_size: int, device: torch.device,
                        precision: str, sized: bool):
    """``(logits, log-diameters or None)`` of model inputs ``(B, 1, P, P, P)``, ``batch_size`` at a time; a
    batch that does not fit in memory is refused, naming the largest that does."""
    def features_of(inputs: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model.forward_features(inputs)
    logits, sizes = [], []
    for first in range(0, len(x), batch_size):
        try:
            features = features_of(x[first:first + batch_size])
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not out_of_memory(err):
                raise
            raise batch_too_large(device, batch_size, lambda b: features_of(trial_batch(x, b))) from None
        outputs = model.forward_head(features, with_size=sized)
        logits.append(outputs[0] if sized else outputs)
        sizes.append(outputs[1] if sized else None)
    return torch.cat(logits), torch.cat(sizes) if sized else None


def mean_of_views(per_view: np.ndarray, views: Optional[int] = None) -> np.ndarray:
    """The mean over the first ``views`` columns (default all) of ``(N, V)`` per-flip values, summed in flip
    order."""
    views = per_view.shape[1] if views is None else views
    total = per_view[:, 0].copy()
    for v in range(1, views):
        total += per_view[:, v]
    return total / views


def more_views(model: Classifier, patches, preprocess: Dict[str, Any], device: str = "cpu",
               batch_size: int = 64, views: int = 1, precision: str = "fp32", with_size: bool = False,
               known: Optional[tuple] = None):
    """:func:`view_outputs` of the first ``views`` flips of the patches, where ``known`` (its outputs for
    their first k flips; None: none) is not computed again: flips k to ``views - 1`` go through the model and
    follow ``known``'s columns."""
    if known is None:
        return view_outputs(model, patches, preprocess, device, batch_size, views, precision, with_size)
    probability, log_size = view_outputs(model, patches, preprocess, device, batch_size, views, precision,
                                         with_size, first=known[0].shape[1])
    return (np.concatenate([known[0], probability], axis=1),
            None if log_size is None else np.concatenate([known[1], log_size], axis=1))


def predict_patches(model: Classifier, patches, preprocess: Dict[str, Any], device: str = "cpu",
                    batch_size: int = 64, views: int = 1, precision: str = "fp32", with_size: bool = False,
                    known: Optional[tuple] = None):
    """Nodule probabilities (float64) of int16 HU patches ``(N, P, P, P)`` ``[z, y, x]``, averaged over the
    first ``views`` flips of each patch (:func:`view_outputs`). With ``with_size``:
    ``(probability, diameter_mm)``, the diameter from the mean log-diameter over the views (all NaN when the
    model has no size output). ``known``: :func:`view_outputs` of the same patches for their first k views
    (with ``with_size``, when the model has a size output), which are not computed again."""
    probability, log_size = more_views(model, patches, preprocess, device, batch_size, views, precision,
                                       with_size, known)
    probability = mean_of_views(probability)
    if not with_size:
        return probability
    if log_size is None:
        return probability, np.full(len(probability), np.nan)
    return probability, diameter_from_log(mean_of_views(log_size))


# --- metrics ------------------------------------------------------------------------

def size_loss(log_size: torch.Tensor, labels: torch.Tensor, diameters: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the predicted log-diameter over the nodules of a batch with an annotated
    diameter (``diameters`` mm, NaN where unknown); 0 (still part of the graph) when the batch has none."""
    known = (labels > 0.5) & torch.isfinite(diameters)
    target = torch.log(torch.where(known, diameters, torch.ones_like(diameters)))
    squared = (log_size.float() - target.float()) ** 2
    return torch.where(known, squared, torch.zeros_like(squared)).sum() / known.sum().clamp(min=1)


def size_mae_mm(labels: np.ndarray, diameters: np.ndarray, log_size: Optional[np.ndarray]) -> float:
    """Mean absolute error in mm of the size output on nodules with an annotated diameter (NaN if none/no
    output)."""
    if log_size is None:
        return math.nan
    known = (np.asarray(labels) > 0.5) & np.isfinite(diameters)
    if not known.any():
        return math.nan
    return float(np.abs(diameter_from_log(np.asarray(log_size, np.float64)[known]) - diameters[known]).mean())



def roc_auc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """Area under the ROC curve (Mann-Whitney U, tied scores count half); None without both classes."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(np.asarray(scores, np.float64), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based ranks, ties share their mean
    rank_sum = average_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def cutoff_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float = 0.9) -> float:
    """Highest threshold t with sensitivity (share of positives with prob >= t) >= ``target``; 0.5 without
    positives."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    positives = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        return 0.5
    needed = int(math.ceil(target * len(positives) - 1e-9))
    return float(positives[max(needed, 1) - 1])


def threshold_metrics(labels: np.ndarray, probability: np.ndarray, cutoff: float) -> dict:
    """Accuracy, sensitivity, specificity (None where undefined) and counts when ``probability >= cutoff``
    calls a candidate a nodule."""
    positive = np.asarray(labels).astype(bool)
    called = np.asarray(probability) >= cutoff
    tp, fn = int((called & positive).sum()), int((~called & positive).sum())
    tn, fp = int((~called & ~positive).sum()), int((called & ~positive).sum())
    return {"cutoff": float(cutoff), "accuracy": (tp + tn) / len(positive) if len(positive) else None,
            "sensitivity": tp / (tp + fn) if tp + fn else None,
            "specificity": tn / (tn + fp) if tn + fp else None, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def binary_metrics(labels: np.ndarray, logits: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
    """Mean BCE loss, accuracy/sensitivity/specificity at ``threshold`` and ROC AUC of sigmoid(logits), as
    floats (NaN where undefined: history.csv keeps one number per cell)."""
    labels = np.asarray(labels).astype(np.float64)
    logits = np.asarray(logits, dtype=np.float64)
    loss = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    probs = 1.0 / (1.0 + np.exp(-logits))
    measures = dict(threshold_metrics(labels, probs, threshold), auc=roc_auc(labels, probs))
    return {"loss": float(loss.mean()) if len(loss) else math.nan,
            **{key: math.nan if measures[key] is None else float(measures[key])
               for key in ("accuracy", "sensitivity", "specificity", "auc")}}
