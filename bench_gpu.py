"""The GPU benchmark behind ``python bench.py gpu``: scoring and training paths side by side in one process.

A path is a way of running the same model: ``eager``, or ``compiled`` (``--compile``: the encoder through
torch.compile). For each path and batch size it measures samples/s of inference and of a training step
(augmentation, forward, loss, backward, AdamW), the peak device memory, and the model FLOP utilisation (MFU)
against the card's dense bf16 peak; FLOPs are counted on the ops the model runs (torch's FLOP counter) plus
the window attention wherever that counter does not see it (:func:`swin_encoder.attention_flops`). It checks
every path against the MONAI reference outputs of ``swin_fixture.pt`` in fp32, and the compiled path against
the eager one; it times the eager path with each attention kernel alone (:data:`SDPA_BACKENDS`), so that
the kernel is chosen by measurement; it breaks the device time of each path down by kernel category; and it
times the evaluate pipeline (reading, cutting, scoring: ``evaluate.scored_chunks``) over LUNA16-sized phantom
scans. Each part keeps to a share of ``--budget-s`` and says what it skipped, so that the whole call fits one
device session.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import common
import features
import head
import swin_encoder
import train
from bench_common import scratch_folder

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by the card's name, from the makers' data sheets.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("A10", 125.0))
PATHS = ("eager", "compiled")
# The attention kernels timed against each other (``torch.nn.attention.SDPBackend`` names; "default" is
# torch's own choice): the window attention passes an additive float mask (bias and shift mask), which some
# kernels do not take; those are noted with their error.
SDPA_BACKENDS = ("default", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "FLASH_ATTENTION", "MATH")
# Kernel categories of the device-time breakdown: the first whose pattern matches a kernel's name.
KERNEL_CATEGORIES = (("attention", r"fmha|flash|attention|sdpa|softmax"),
                     ("GEMM", r"gemm|cutlass|xmma|matmul|cublas|sm\d+_|wgmma|Kernel2|conv|addmm|::mm|bmm"),
                     ("norm", r"norm"),
                     ("copies", r"copy|cat|pad|roll|gather|scatter|index|transpose|permute|stack"),
                     ("elementwise", r"elementwise|vectorized|gelu|add|mul|reduce|triton|fused"))


class Deadline:
    """Seconds left of the call's budget."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def peak_tflops(device: torch.device) -> Optional[float]:
    """The card's dense bf16 peak, None when the card is not in :data:`BF16_PEAK_TFLOPS` (or no GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def forward_flops(model: head.Classifier, size: int, device: torch.device) -> Dict[str, float]:
    """FLOPs of one sample's forward pass, in inference (``total``) and in training (``training``, padding
    tokens attended to): torch's count of the ops other than attention, plus the window attention as
    ``swin_encoder.attention_flops`` counts it (torch's counter sees the attention on some devices only)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.rand(1, 1, size, size, size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    by_op = counter.get_flop_counts().get("Global", {})
    counted_attention = sum(v for op, v in by_op.items() if "attention" in str(op))
    attention = swin_encoder.attention_flops(model.encoder, (size,) * 3, inference=True)
    training_attention = swin_encoder.attention_flops(model.encoder, (size,) * 3)
    rest = counter.get_total_flops() - counted_attention
    return {"total": float(rest + attention), "training": float(rest + training_attention),
            "attention": float(attention), "training_attention": float(training_attention),
            "attention_counted_by_torch": bool(counted_attention)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None


def build_model(path: str, size: int, feature_size: int, window: int,
                device: torch.device) -> head.Classifier:
    """A fresh classifier (seed 0) of the published encoder geometry, on ``device``, run by ``path``."""
    torch.manual_seed(0)
    config = {"encoder": features.encoder_config(feature_size, window), "pooling": "avg", "patch_size": size}
    model = head.build_classifier(config).to(device)
    return head.compile_encoder(model, path == "compiled")


def timed_rate(step: Callable[[], None], batch: int, device: torch.device, warmup: int,
               repeats: int) -> float:
    """Samples/s of ``step`` (one batch): the median of ``repeats`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return batch / float(np.median(seconds))


def inference_step(model: head.Classifier, batch: int, size: int, device: torch.device, precision: str):
    x = torch.rand(batch, 1, size, size, size, device=device)
    model.eval()

    def step() -> None:
        with torch.no_grad(), head.autocast(device, precision):
            model(x)
    return step


def training_step(model: head.Classifier, batch: int, size: int, device: torch.device, precision: str):
    """The fine-tuning step of train.py on one in-memory batch: augmentation on the device, its loss
    (``train.batch_loss``: forward under autocast), backward, AdamW (fused on CUDA)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    hu = torch.randint(-1000, 400, (batch, size, size, size), dtype=torch.int16, device=device)
    labels = (torch.arange(batch, device=device) % 2).float()
    no_sizes = torch.full((batch,), float("nan"), device=device)

    def step() -> None:
        x = features.training_inputs(hu, generator, -1000.0, 1000.0, True, 3)
        train.batch_loss(model, x, labels, no_sizes, 0.0, device, precision).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def fixture_errors(paths: List[str], device: torch.device) -> Dict[str, float]:
    """Per path, the largest relative error of the encoder's five outputs against MONAI's, fp32, on the
    fixture's window-7 case."""
    case = torch.load(Path(__file__).resolve().parent / "swin_fixture.pt", weights_only=True)["w7"]
    path = scratch_folder("bench_gpu_") / "swin_unetr.pt"
    torch.save(case["checkpoint"], path)
    encoder = swin_encoder.SwinEncoder(case["in_channels"], 12, window_size=case["window"])
    swin_encoder.load_pretrained(encoder, path)
    encoder = encoder.to(device).eval()
    errors = {}
    for name in paths:
        run = head.CompiledOrEager(encoder) if name == "compiled" else encoder
        with torch.no_grad():
            outputs = run(case["input"].to(device))
        errors[name] = max(float((o.cpu() - e).abs().max() / e.abs().max())
                           for o, e in zip(outputs, case["outputs"]))
    return errors


def compiled_against_eager(size: int, feature_size: int, window: int,
                           device: torch.device) -> Dict[str, float]:
    """Largest relative difference of the logits and the last stage of the compiled path against the eager
    one, in fp32 and under bf16 autocast, on a batch of 4."""
    eager = build_model("eager", size, feature_size, window, device).eval()
    compiled = build_model("compiled", size, feature_size, window, device).eval()
    x = torch.rand(4, 1, size, size, size, device=device)
    differences = {}
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), head.autocast(device, precision):
            a, b = eager.forward_features(x).float(), compiled.forward_features(x).float()
        differences[precision] = float((a - b).abs().max() / a.abs().max())
    return differences


def attention_backend_rates(model: head.Classifier, batch: int, size: int, device: torch.device,
                            precision: str, repeats: int) -> Dict[str, Dict[str, Any]]:
    """Per attention kernel of :data:`SDPA_BACKENDS`, samples/s of inference and of the training step of the
    eager path with only that kernel allowed, or the error where it cannot run this model's attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rates: Dict[str, Dict[str, Any]] = {}
    for name in SDPA_BACKENDS:
        rates[name] = {}
        for kind, make in (("inference", inference_step), ("training", training_step)):
            only = contextlib.nullcontext() if name == "default" else sdpa_kernel(getattr(SDPBackend, name))
            try:
                with only:
                    rates[name][kind] = timed_rate(make(model, batch, size, device, precision), batch, device,
                                                   1, repeats)
            except (RuntimeError, AttributeError) as err:   # no such kernel here, or not for these inputs
                rates[name][kind] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return rates


def kernel_breakdown(step: Callable[[], None], device: torch.device) -> Dict[str, float]:
    """Share of the device time (CPU time without a GPU) of one profiled call of ``step``, by kernel
    category (:data:`KERNEL_CATEGORIES`, the rest as "other")."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    step()
    synchronize(device)
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    times: Dict[str, float] = {}
    for event in prof.key_averages():
        spent = (event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total)
        if spent <= 0 or (device.type != "cuda" and not event.key.startswith("aten::")):
            continue
        category = next((name for name, pattern in KERNEL_CATEGORIES
                         if re.search(pattern, event.key, re.IGNORECASE)), "other")
        times[category] = times.get(category, 0.0) + spent
    total = sum(times.values()) or 1.0
    return {name: times.get(name, 0.0) / total for name, _ in KERNEL_CATEGORIES + (("other", ""),)}


# Candidates of the pipeline's scans keep this far (voxels, z, y, x) from the scan's faces, inside the body.
BODY_MARGIN_VOX = (8, 40, 40)


def _integers(text: str) -> Tuple[int, ...]:
    """Integers separated by commas; () when the text is not that."""
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        return ()


def check_scan_shape(text: str) -> Tuple[int, int, int]:
    """``--scan-shape`` ``"Z,Y,X"`` (voxels) as integers, each more than twice :data:`BODY_MARGIN_VOX`;
    ValueError naming the option otherwise."""
    shape = _integers(text)
    if not shape:
        raise ValueError(f"--scan-shape {text!r}: expected three integers Z,Y,X")
    least = tuple(2 * m + 1 for m in BODY_MARGIN_VOX)
    if len(shape) != 3 or any(n < low for n, low in zip(shape, least)):
        raise ValueError(f"--scan-shape {text!r}: expected three integers Z,Y,X of at least "
                         f"{','.join(map(str, least))} voxels")
    return shape


def check_batches(text: str) -> Tuple[int, ...]:
    """``--batches`` ``"32,64,..."`` as positive integers; ValueError naming the option otherwise."""
    batches = _integers(text)
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches {text!r}: expected positive integers separated by commas, e.g. 32,64")
    return batches


def pipeline_rate(model: head.Classifier, size: int, device: torch.device, precision: str, scans: int,
                  distinct: int, per_scan: int, shape: tuple, readers: int, batch: int,
                  deadline: Deadline) -> Dict[str, float]:
    """Candidates/s of the evaluate pipeline (``evaluate.scored_chunks``: reader processes read and cut each
    scan, the model scores each chunk at one view) over ``scans`` scans: ``distinct`` phantoms of ``shape``
    written once, each listed again with ``per_scan`` candidates inside its body. Stops early, saying so,
    when the deadline comes."""
    import data
    import evaluate
    import phantom   # imported here: bench.py train measures its process's peak memory with this module
    folder = scratch_folder("bench_gpu_scans_")
    rng = np.random.default_rng(0)
    made = []
    for k in range(distinct):
        case = phantom.make_phantom_scan(np.random.default_rng(k), shape, negatives_per_scan=0)
        made.append((phantom._write_scan_mhd(case.scan, folder), case.scan))
    todo = []
    for i in range(scans):
        path, scan = made[i % distinct]
        zyx = rng.uniform(BODY_MARGIN_VOX, np.array(scan.hu.shape) - BODY_MARGIN_VOX, (per_scan, 3))
        todo.append((f"scan{i}", path, data.index_to_world(zyx[:, ::-1], scan)))
    run = evaluate.ModelRun(model.eval(), {"patch_size": size, "spacing_mm": 1.0, "hu_min": -1000.0,
                                           "hu_max": 1000.0}, 1, batch, readers, device, precision, None)
    start, done, scored = time.perf_counter(), set(), 0
    for uid, chunk, _ in evaluate.scored_chunks(run, todo):
        scored += 0 if chunk is None else len(chunk.probability)
        done.add(uid)
        if deadline.left() < 0:
            break
    seconds = time.perf_counter() - start
    return {"candidates": scored, "scans": len(done), "seconds": seconds,
            "candidates_per_s": scored / seconds}


def run(device_name: str = "cuda", size: int = 64, feature_size: int = 48, window: int = 7,
        batches: tuple = (32, 64, 128, 256), paths: tuple = PATHS, precision: str = "bf16", repeats: int = 5,
        scans: int = 100, distinct_scans: int = 4, per_scan: int = 850, scan_shape: tuple = (300, 512, 512),
        readers: int = 8, budget_s: float = 330.0, out: Optional[Path] = None,
        console: Optional[Console] = None) -> dict:
    """Every measurement of the module docstring; returns them. With ``out``, the figures so far are written
    there (JSON, atomically) after each part, so that a call stopped by its time limit keeps them; a part
    that fails is named with its error in ``failed`` and the others go on."""
    console = console or Console()
    device = head.resolve_device(device_name)
    deadline = Deadline(budget_s)
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "size": size,
                    "feature_size": feature_size, "window": window, "precision": precision, "rows": [],
                    "kernels": {}, "pipeline": {}, "skipped": [], "failed": []}

    def save() -> None:
        if out is not None:
            common.atomic_write_text(Path(out), json.dumps(result, indent=1))

    def part(name: str, measure: Callable[[], None]) -> None:
        try:
            measure()
        except Exception as err:  # one part failing on a card must not lose the others' figures
            first_line = (str(err).strip().splitlines() or [""])[0]
            result["failed"].append(f"{name}: {type(err).__name__}: {first_line}")
            console.print(f"[red]failed: {result['failed'][-1]}[/]")
        save()

    part("fixture", lambda: result.update(fixture_relative_error=fixture_errors(list(paths), device)))
    if "compiled" in paths:
        part("compiled against eager", lambda: result.update(
            compiled_vs_eager=compiled_against_eager(size, feature_size, window, device)))
    part("FLOP count", lambda: result.update(
        forward_flops=forward_flops(build_model("eager", size, feature_size, window, device).eval(), size,
                                    device), peak_tflops=peak_tflops(device)))
    flops = result.get("forward_flops")
    models = {path: build_model(path, size, feature_size, window, device) for path in paths}  # compiled once
    for path, model in models.items():
        for batch in batches:
            for kind, make, per_sample in (("inference", inference_step, flops and flops["total"]),
                                           ("training", training_step, flops and 3 * flops["training"])):
                if deadline.left() < budget_s * 0.3:   # keep time for the breakdown and the pipeline
                    result["skipped"].append(f"{path} {kind} batch {batch}: out of time")
                    continue
                part(f"{path} {kind} batch {batch}",
                     lambda: _rate_row(result, path, kind, batch, make(model, batch, size, device, precision),
                                       device, repeats, per_sample))
    if "eager" in models and deadline.left() >= budget_s * 0.3:
        part("attention kernels", lambda: result.update(attention_kernels={"batch": batches[0], "rates":
             attention_backend_rates(models["eager"], batches[0], size, device, precision, repeats)}))
    elif "eager" in models:
        result["skipped"].append("attention kernels: out of time")
    for path, model in models.items():
        if deadline.left() < budget_s * 0.2:
            result["skipped"].append(f"{path} kernel breakdown: out of time")
            continue
        part(f"{path} kernel breakdown", lambda: result["kernels"].update({path: {
            kind: kernel_breakdown(make(model, batches[0], size, device, precision), device)
            for kind, make in (("inference", inference_step), ("training", training_step))}}))
    for path, model in models.items():
        if deadline.left() < 20:
            result["skipped"].append(f"{path} evaluate pipeline: out of time")
            continue
        share = Deadline(deadline.left() / (len(paths) - list(paths).index(path)))
        part(f"{path} evaluate pipeline", lambda: result["pipeline"].update({path: pipeline_rate(
            model, size, device, precision, scans, distinct_scans, per_scan, scan_shape, readers,
            max(batches), share)}))
    save()
    print_tables(result, console)
    return result


def _rate_row(result: dict, path: str, kind: str, batch: int, step: Callable[[], None], device: torch.device,
              repeats: int, flops_per_sample: Optional[float]) -> None:
    """One row of samples/s, peak memory and MFU (None without the card's peak or the FLOP count); a batch
    that does not fit is noted as skipped."""
    reset_peak(device)
    try:
        rate = timed_rate(step, batch, device, 2, repeats)
    except torch.OutOfMemoryError:
        result["skipped"].append(f"{path} {kind} batch {batch}: out of memory")
        return
    peak = result.get("peak_tflops")
    result["rows"].append({"path": path, "kind": kind, "batch": batch, "samples_per_s": rate,
                           "peak_mib": peak_mib(device),
                           "mfu": None if not peak or not flops_per_sample
                           else rate * flops_per_sample / (peak * 1e12)})


def print_tables(result: dict, console: Console) -> None:
    title = (f"{result['device']}, torch {result['torch']}, {result['date']}: {result['size']}^3, feature "
             f"size {result['feature_size']}, window {result['window']}, {result['precision']}")
    table = Table(title=title)
    for column in ("path", "kind", "batch", "samples/s", "peak MiB", "MFU"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(row["path"], row["kind"], str(row["batch"]), f"{row['samples_per_s']:.1f}",
                      "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}",
                      "-" if row["mfu"] is None else f"{row['mfu']:.1%}")
    console.print(table)
    flops = result.get("forward_flops")
    if flops:
        counted = "saw the attention" if flops["attention_counted_by_torch"] else "did not see the attention"
        peak = result.get("peak_tflops") or "unknown"
        console.print(f"forward: {flops['total'] / 1e9:.2f} GFLOP a sample in inference, of which window "
                      f"attention {flops['attention'] / 1e9:.2f}; {flops['training'] / 1e9:.2f} in training "
                      f"(attention {flops['training_attention'] / 1e9:.2f}, padding included), 3x for a "
                      f"step; torch's counter: {counted}; peak {peak} TFLOP/s")
    if "fixture_relative_error" in result:
        console.print("fixture (MONAI outputs, fp32), largest relative error: "
                      + ", ".join(f"{p} {e:.1e}" for p, e in result["fixture_relative_error"].items()))
    if "compiled_vs_eager" in result:
        console.print("compiled against eager, largest relative difference: "
                      + ", ".join(f"{p} {e:.1e}" for p, e in result["compiled_vs_eager"].items()))
    if "attention_kernels" in result:
        chosen = result["attention_kernels"]
        console.print(f"eager samples/s by attention kernel, batch {chosen['batch']}: " + "; ".join(
            f"{name} " + ", ".join(f"{kind} {rate:.1f}" if isinstance(rate, float) else f"{kind} cannot run"
                                   for kind, rate in kinds.items())
            for name, kinds in chosen["rates"].items()))
    for path, kinds in result["kernels"].items():
        for kind, shares in kinds.items():
            console.print(f"{path} {kind} device time: "
                          + ", ".join(f"{name} {share:.0%}" for name, share in shares.items()))
    for path, rate in result["pipeline"].items():
        console.print(f"{path} evaluate pipeline: {rate['candidates_per_s']:.0f} candidates/s over "
                      f"{rate['scans']} scans ({rate['candidates']} candidates, {rate['seconds']:.1f} s)")
    for note in result["skipped"]:
        console.print(f"[yellow]skipped: {note}[/]")
    for note in result["failed"]:
        console.print(f"[red]failed: {note}[/]")
