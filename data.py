"""Data stage: reading CTs and LUNA16 files, world/voxel geometry, patch extraction.

Coordinate spaces used throughout:

* world mm: ITK/LPS physical points ``(x, y, z)`` in millimetres, as in the LUNA16 CSVs.
* voxel index: continuous ITK index ``(i, j, k)``; ``i`` runs along the array's last axis.
  SimpleITK arrays are indexed ``[k, j, i]`` = ``[z, y, x]``.

ITK maps an index to the world with ``world = origin + direction @ (spacing * index)``;
all direction maths of the project lives in :func:`world_to_index` and :func:`index_to_world`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

AIR_HU = -1000


class UserError(ValueError):
    """A problem with the user's input or files: shown as a one-line message, never a traceback."""


@dataclass
class CTScan:
    """A CT volume with its geometry.

    hu: int16 Hounsfield units, indexed ``[z, y, x]`` (array axes = ITK index k, j, i).
    origin: world mm of voxel index (0, 0, 0), ordered (x, y, z).
    spacing: voxel size in mm along index axes (i, j, k).
    direction: 3x3 ITK direction matrix; column c is the world direction of index axis c.
    name: where the scan came from (a path or seriesuid), for messages.
    """
    hu: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    name: str = ""


def hu_to_unit(x, hu_min: float = -1000.0, hu_max: float = 1000.0):
    """Clip HU to ``[hu_min, hu_max]`` and scale linearly to ``[0, 1]`` (float32; numpy or torch)."""
    if hu_max <= hu_min:
        raise ValueError(f"hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
    scale = 1.0 / (hu_max - hu_min)
    try:
        import torch
        if isinstance(x, torch.Tensor):
            return ((x.float().clamp(hu_min, hu_max) - hu_min) * scale)
    except ImportError:  # pragma: no cover
        pass
    return ((np.clip(np.asarray(x, dtype=np.float32), hu_min, hu_max) - hu_min) * scale).astype(np.float32)
