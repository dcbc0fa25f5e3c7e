"""Benchmarks (not tests): ``python bench.py --help``.

Each benchmark prints a rich table of medians and side-by-side ratios, and names the machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import typer
from rich.console import Console

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Timing benchmarks.")
console = Console()


def machine_description() -> str:
    """One line naming the CPU count, torch threads and GPU (if any) the numbers came from."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}")


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


if __name__ == "__main__":
    bench_app()
