"""What the benchmark modules share (bench.py, bench_detect.py, bench_gpu.py): the console they print to, the
line naming the machine, their scratch folders, and the head settings of the mining and end-to-end
benchmarks."""
from __future__ import annotations

import atexit
import os
import platform
import shutil
import tempfile
from pathlib import Path

from rich.console import Console

console = Console()

MINING_SETTINGS = dict(feature_size=12, window_size=4, pooling="centre")


def machine_description() -> str:
    """One line naming the CPU count, torch threads and GPU (if any) the numbers came from."""
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} threads, {gpu}")


def scratch_folder(prefix: str) -> Path:
    """A fresh temporary folder for a benchmark's data, removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
