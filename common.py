"""Small pieces every stage shares: the user-facing error, subset numbers, atomic writes, the resumable parts
of a long job and progress bars. Only numpy and the standard library are imported here (matplotlib and rich
inside the functions that draw), so any module can use it without pulling in a CT reader or torch.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

VERSION = "0.9.0"  # the toolkit's version, written into its result files


class UserError(ValueError):
    """A problem with the user's input or files: shown as a one-line message, never a traceback."""


MAX_LISTED_PROBLEMS = 10

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # mallopt parameters (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory there for reuse (Linux with
    glibc; elsewhere nothing changes). Returns whether it applied.

    By default each block over 32 MiB is a fresh mapping, returned to the kernel when freed, whose pages the
    kernel zero-fills again at first touch. The encoder allocates hundreds of such tensors a batch; on 2 CPUs
    that made a 64^3 forward pass at feature size 48 about 1.6x slower (BENCHMARKS). The price is that memory
    once used stays with the process until it exits."""
    import ctypes
    import ctypes.util
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 30))


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform tells it)."""
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def problems_message(path, problems: list[str], what: str = "row(s)") -> str:
    shown = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = (f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS
            else "")
    return f"{path}: {len(problems)} bad {what}:\n  {shown}{more}"


def format_subsets(subsets) -> str:
    """Subset numbers as the command line writes them: ``"7,8"``, or ``"none"``."""
    return ",".join(map(str, subsets)) or "none"


def parse_subsets(text, option: str = "--subsets", required: bool = False) -> list[int]:
    """Subset numbers from ``"9"``, ``"7,8"`` or ``"0-7,9"`` (sorted, unique); ``""``/``"none"`` -> []."""
    text = str(text).strip().lower().replace(" ", "")
    subsets: set = set()
    for part in filter(None, text.split(",") if text != "none" else []):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if bounds is None:
            raise UserError(f"{option} takes subset numbers like 9, 7,8 or 0-7,9; got {text!r}")
        low, high = int(bounds[1]), int(bounds[2] or bounds[1])
        if high < low:
            raise UserError(f"{option}: the range {part} runs backwards; give {high}-{low}")
        subsets.update(range(low, high + 1))
    if required and not subsets:
        raise UserError(f"{option} must name at least one subset, got {text!r}")
    return sorted(subsets)


# --- atomic files and resumable parts ------------------------------------------------

def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in blocks (checkpoints and weights are large)."""
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; when the block succeeds, rename it over ``path``.

    Readers never see a half-written file; a failed block leaves the old file and no temporary one.
    """
    import os
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path, payload) -> None:
    import json
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def atomic_concatenate_npy(path, blocks: list, row_shape: tuple, dtype) -> int:
    """Write the row-wise concatenation of ``blocks`` (arrays or memory maps) as one ``.npy``,
    block by block through a memory map, atomically; returns the number of rows."""
    total = sum(len(block) for block in blocks)
    with atomic_path(path) as tmp:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, *row_shape))
        start = 0
        for block in blocks:
            merged[start:start + len(block)] = block
            start += len(block)
        merged.flush()
        del merged
    return total


def atomic_save_figure(fig, path, dpi: int = 110) -> None:
    """Save a matplotlib figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


class Parts:
    """The finished pieces of a long job (extract, cache-features, evaluate), so that a killed run resumes.

    A folder of ``<name>.npy`` arrays, each with an optional ``<name>.json`` beside it, written atomically
    (the ``.npy`` last: it marks the piece done), and ``key.json``: what made them. Pieces made under
    another key are discarded when the folder is opened.
    """

    def __init__(self, folder, key: dict):
        import json
        import shutil
        self.folder = Path(folder)
        key_path = self.folder / "key.json"
        if self.folder.is_dir() and (not key_path.is_file() or json.loads(key_path.read_text()) != key):
            shutil.rmtree(self.folder)
        self.key = key

    def done(self) -> set:
        return {path.stem for path in self.folder.glob("*.npy")}

    def save(self, name: str, array: np.ndarray, meta=None) -> None:
        if not (self.folder / "key.json").is_file():
            atomic_write_json(self.folder / "key.json", self.key)
        if meta is not None:
            atomic_write_json(self.folder / f"{name}.json", meta)
        atomic_save_npy(self.folder / f"{name}.npy", array)

    def load(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.npy", mmap_mode="r")

    def meta(self, name: str):
        import json
        return json.loads((self.folder / f"{name}.json").read_text())

    def remove(self) -> None:
        import shutil
        shutil.rmtree(self.folder, ignore_errors=True)


def item_table(title: str, caption: str):
    """An empty rich table of two columns, item and value, for a stage's summary of what it wrote."""
    from rich.table import Table
    table = Table(title=title, caption=caption)
    table.add_column("item")
    table.add_column("value", justify="right")
    return table


def progress_bar(*columns, console=None, disable: bool = False, transient: bool = False):
    """A rich progress bar: description, bar, done/total, the given columns, elapsed time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *columns,
                    TimeElapsedColumn(), console=console, disable=disable, transient=transient)


# --- the loop over scans ---------------------------------------------------------------

# What reading or cutting one scan may raise; any of them names the scan and the job goes on with the others.
SCAN_ERRORS = (UserError, OSError, MemoryError, ValueError, RuntimeError)


def attempt(path, func, *args):
    """``(func(*args), "")``, or ``(None, reason)`` when reading the scan at ``path`` fails: one unreadable
    scan must not stop the others. A UserError already names its file; any other error is prefixed with
    ``path``."""
    try:
        return func(*args), ""
    except UserError as err:
        return None, str(err)
    except SCAN_ERRORS as err:
        return None, f"{path}: cannot read this scan ({err or type(err).__name__})"


def read_ahead(todo: list, read):
    """``(seriesuid, result, reason)`` for each seriesuid of ``todo``, ``read(uid)`` giving
    ``(result, reason)`` (see :func:`attempt`); the next scan is read in a thread while the caller works on
    one."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, todo[0]) if todo else None
        for n, uid in enumerate(todo):
            result, reason = pending.result()
            if n + 1 < len(todo):
                pending = reader.submit(read, todo[n + 1])
            yield uid, result, reason


def over_scans(items, work, *, total: int, label: str, console=None, show_progress: bool = True,
               step=None, transient: bool = False) -> dict:
    """The loop every stage runs over scans (extract, detect, evaluate, mining).

    ``items`` yields ``(seriesuid, payload, reason)``: a scan (or one chunk of its candidates) read by the
    stage, or the reason it could not be (``payload`` None). A reason is printed in red, once per scan, and
    recorded; the others go on. A payload goes to ``work(seriesuid, payload)``, which saves the scan's part
    (the stage's ``Parts``: a killed run resumes from the saved ones). The bar counts ``step(payload)`` units
    a payload (default: one scan) up to ``total``. Returns ``{seriesuid: reason}`` of the scans that failed.
    """
    from rich.progress import TextColumn
    failed: dict = {}
    with progress_bar(TextColumn(""), console=console, disable=not show_progress,
                      transient=transient) as progress:
        task = progress.add_task(label, total=total)
        for uid, payload, reason in items:
            if payload is None:
                if uid not in failed and console is not None:
                    console.print(f"[red]scan {uid}: {reason}[/]")
                failed.setdefault(uid, reason)
                progress.advance(task, 0 if step else 1)
                continue
            work(uid, payload)
            progress.advance(task, step(payload) if step else 1)
    return failed


def plain_folder_name(name, option: str) -> str:
    """``name`` when it is a plain folder name (letters, digits, '.', '_', '-'; no path): what ``--run``,
    crossval's ``--name`` and ``--ensemble`` name under the work folder. UserError naming ``option``."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name or "")):
        raise UserError(f"{option} must be a plain folder name (letters, digits, '.', '_', '-'), "
                        f"got {name!r}")
    return name


def output_file(path, option: str) -> Optional[Path]:
    """``path`` (None stays None) of a file a command will write, checked before any work: refused, naming
    ``option``, when it is a folder or when what should be its folder is a file."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file name")
    _folders_above(path, path.parents, option)
    return path


def output_folder(path, option: str) -> Optional[Path]:
    """``path`` (None stays None) of a folder a command will write into, checked before any work: refused,
    naming ``option``, when it or the nearest existing folder above it is a file."""
    if path is None:
        return None
    path = Path(path)
    _folders_above(path, (path, *path.parents), option)
    return path


def _folders_above(path: Path, folders, option: str) -> None:
    existing = next((p for p in folders if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
