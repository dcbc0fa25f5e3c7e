"""Tests of the LUNA16 toolkit, on small seeded phantoms made in temporary folders.

Run with ``pytest test_luna.py``. Tests that read the real data in ``../shared/data`` skip when it is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"


# --- data stage -------------------------------------------------------------

def test_hu_to_unit_clips_and_scales():
    import data
    out = data.hu_to_unit(np.array([-2000, -1000, 0, 1000, 3000], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
