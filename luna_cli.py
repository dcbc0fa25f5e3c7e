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


if __name__ == "__main__":
    app()
