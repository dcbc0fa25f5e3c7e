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


if __name__ == "__main__":
    app()
