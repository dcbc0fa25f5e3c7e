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


def _rotation(axis_angles_deg):
    """A proper rotation matrix from successive rotations about x, y, z (degrees)."""
    result = np.eye(3)
    for axis, angle in enumerate(np.radians(axis_angles_deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        result = r @ result
    return result


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_xy": np.diag([-1.0, -1.0, 1.0]),
    "permuted_flipped": np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]),
    "oblique": _rotation([10.0, -20.0, 35.0]),
}


def _scan(direction, spacing=(0.7, 0.8, 2.5), shape_zyx=(40, 90, 80), origin=(-120.0, 35.0, -310.0), hu=None):
    import data
    volume = np.full(shape_zyx, -800, np.int16) if hu is None else hu
    return data.CTScan(volume, np.array(origin), np.array(spacing), np.asarray(direction, float), "test scan")


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_world_index_round_trip_matches_simpleitk(name):
    import SimpleITK as sitk
    import data
    scan = _scan(DIRECTIONS[name])
    rng = np.random.default_rng(1)
    index = rng.uniform(-5, 60, (50, 3))
    world = data.index_to_world(index, scan)
    np.testing.assert_allclose(data.world_to_index(world, scan), index, atol=1e-9)
    image = sitk.GetImageFromArray(scan.hu)
    image.SetOrigin(tuple(scan.origin)); image.SetSpacing(tuple(scan.spacing))
    image.SetDirection(tuple(scan.direction.ravel()))
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in index]
    np.testing.assert_allclose(world, expected, atol=1e-9)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_patch_samples_world_axes_in_order_centred(name):
    """A volume whose HU is a linear function of world position is reproduced exactly by trilinear
    sampling, so every patch voxel must hold f(world point of that voxel): this pins the centre,
    the [z, y, x] order and the sign of every axis, for flipped, permuted and oblique scans."""
    import data
    scan = _scan(DIRECTIONS[name], shape_zyx=(60, 120, 120))
    k, j, i = np.meshgrid(*[np.arange(n) for n in scan.hu.shape], indexing="ij")
    world = data.index_to_world(np.stack([i, j, k], -1).reshape(-1, 3), scan)
    gradient = np.array([3.0, -2.0, 5.0])  # HU per mm along world x, y, z
    centre_world = data.index_to_world([[60, 60, 30]], scan)[0]
    scan.hu = np.rint((world - centre_world) @ gradient).reshape(scan.hu.shape).astype(np.int16)
    point = centre_world + np.array([1.3, -2.1, 0.7])
    size, spacing = 16, 1.5
    patch = data.extract_patches(scan, point[None], size, spacing)[0].astype(float)
    offsets = data.patch_offsets_mm(size, spacing)
    oz, oy, ox = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    expected = (point - centre_world) @ gradient + ox * gradient[0] + oy * gradient[1] + oz * gradient[2]
    np.testing.assert_allclose(patch, expected, atol=1.01)  # int16 rounding of volume and patch
    assert abs(patch[size // 2, size // 2, size // 2] - (point - centre_world) @ gradient) <= 1.01


def test_axis_aligned_and_oblique_paths_agree():
    import data
    rng = np.random.default_rng(2)
    scan = _scan(DIRECTIONS["permuted_flipped"], hu=rng.integers(-1000, 600, (40, 50, 60)).astype(np.int16))
    points = data.index_to_world(rng.uniform(-10, 50, (12, 3)), scan)
    fast = data.extract_patches(scan, points, 20, 1.0)
    generic = np.stack([data._extract_one_oblique(scan.hu, data.world_to_index(
        p + np.stack(np.meshgrid(*[data.patch_offsets_mm(20, 1.0)] * 3, indexing="ij")[::-1], -1).reshape(-1, 3),
        scan).reshape(20, 20, 20, 3)) - 1000.0 for p in points])
    assert np.abs(fast - np.rint(generic)).max() <= 1


def test_outside_the_scan_is_air_not_zero():
    import data
    scan = _scan(np.eye(3), spacing=(1.0, 1.0, 1.0), shape_zyx=(20, 20, 20), origin=(0.0, 0.0, 0.0),
                 hu=np.full((20, 20, 20), 50, np.int16))
    patch = data.extract_patches(scan, [[0.0, 10.0, 10.0]], 16, 1.0)[0]   # x = 0: half the cube is outside
    assert (patch[:, :, :7] == -1000).all()
    assert (patch[:, 4:12, 9:] == 50).all()
    assert patch.dtype == np.int16
    assert not data.patch_overlaps_scan(scan, [[-100.0, 10.0, 10.0]], 16, 1.0)[0]
    assert data.patch_overlaps_scan(scan, [[-5.0, 10.0, 10.0]], 16, 1.0)[0]


def _mini_luna(root: Path, n_scans: int = 3, seed: int = 0) -> dict:
    """A tiny LUNA16-shaped folder in subset0: blobs of 200 HU at the positive candidates."""
    import data
    rng = np.random.default_rng(seed)
    (root / "subset0").mkdir(parents=True)
    uids, cand_lines, ann_lines = [], ["seriesuid,coordX,coordY,coordZ,class"], ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    for s in range(n_scans):
        uid = f"1.2.3.{seed}.{s}"
        scan = _scan(DIRECTIONS["flipped_xy"] if s % 2 else np.eye(3), shape_zyx=(24, 48, 48),
                     hu=rng.integers(-900, -800, (24, 48, 48)).astype(np.int16))
        centre = data.index_to_world([[24, 24, 12]], scan)[0]
        k, j, i = np.meshgrid(*[np.arange(n) for n in scan.hu.shape], indexing="ij")
        world = data.index_to_world(np.stack([i, j, k], -1).reshape(-1, 3), scan).reshape(*scan.hu.shape, 3)
        scan.hu[((world - centre) ** 2).sum(-1) < 16] = 200
        data.write_mhd(scan, root / "subset0" / f"{uid}.mhd")
        uids.append(uid)
        cand_lines.append(f"{uid},{centre[0]},{centre[1]},{centre[2]},1")
        ann_lines.append(f"{uid},{centre[0]},{centre[1]},{centre[2]},8.0")
        for n in range(4):
            x, y, z = data.index_to_world([rng.uniform(5, 40, 3) * [1, 1, 0.5]], scan)[0]
            cand_lines.append(f"{uid},{x},{y},{z},0")
    (root / "candidates_V2.csv").write_text("\n".join(cand_lines) + "\n")
    (root / "annotations.csv").write_text("\n".join(ann_lines) + "\n")
    (root / "seriesuids.csv").write_text("\n".join(uids) + "\n")
    return {"uids": uids}


def _cache_files(work: Path) -> dict:
    import hashlib
    cache = work / "patches" / "subset0"
    return {name: hashlib.sha256((cache / name).read_bytes()).hexdigest() for name in ("patches.npy", "index.csv")}


def test_extract_writes_cache_and_rerun_is_idempotent(tmp_path):
    import csv
    import data
    info = _mini_luna(tmp_path / "luna")
    summary = data.extract_subset(tmp_path / "luna", tmp_path / "work", 0, patch_size=16, spacing_mm=1.0,
                                  show_progress=False)
    cache = tmp_path / "work" / "patches" / "subset0"
    patches = np.load(cache / "patches.npy", mmap_mode="r")
    rows = list(csv.DictReader(open(cache / "index.csv")))
    assert patches.dtype == np.int16 and patches.shape == (15, 16, 16, 16) == (summary.n_patches, 16, 16, 16)
    assert [r["seriesuid"] for r in rows] == sorted(r["seriesuid"] for r in rows)
    positives = [n for n, r in enumerate(rows) if r["label"] == "1"]
    assert len(positives) == 3 and all(rows[n]["diameter_mm"] == "8.0" for n in positives)
    assert all(patches[n, 8, 8, 8] == 200 for n in positives)
    before = _cache_files(tmp_path / "work")
    again = data.extract_subset(tmp_path / "luna", tmp_path / "work", 0, patch_size=16, spacing_mm=1.0,
                                show_progress=False)
    assert again.scans_new == 0 and _cache_files(tmp_path / "work") == before
    assert not (cache / "parts").exists()
    with pytest.raises(data.UserError, match="patch_size: cache has 16, this run asks for 24"):
        data.extract_subset(tmp_path / "luna", tmp_path / "work", 0, patch_size=24, show_progress=False)


def test_extract_resumes_after_interruption(tmp_path, monkeypatch):
    import data
    _mini_luna(tmp_path / "luna")
    data.extract_subset(tmp_path / "luna", tmp_path / "reference", 0, patch_size=16, show_progress=False)
    calls = {"n": 0}
    original = data.extract_patches

    def interrupted_after_one_scan(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "extract_patches", interrupted_after_one_scan)
    with pytest.raises(KeyboardInterrupt):
        data.extract_subset(tmp_path / "luna", tmp_path / "work", 0, patch_size=16, show_progress=False)
    cache = tmp_path / "work" / "patches" / "subset0"
    assert not (cache / "patches.npy").exists() and len(list((cache / "parts").glob("*.npy"))) == 1
    monkeypatch.setattr(data, "extract_patches", original)
    summary = data.extract_subset(tmp_path / "luna", tmp_path / "work", 0, patch_size=16, show_progress=False)
    assert summary.scans_new == 2
    assert _cache_files(tmp_path / "work") == _cache_files(tmp_path / "reference")


def test_extract_bad_inputs_are_reported_not_fatal(tmp_path):
    import data
    from typer.testing import CliRunner
    import luna_cli
    info = _mini_luna(tmp_path / "luna", n_scans=4)
    broken_raw, missing_raw, broken_header = info["uids"][:3]
    raw = tmp_path / "luna" / "subset0" / f"{broken_raw}.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    (tmp_path / "luna" / "subset0" / f"{missing_raw}.raw").unlink()
    (tmp_path / "luna" / "subset0" / f"{broken_header}.mhd").write_text("NDims = banana\n")
    with open(tmp_path / "luna" / "candidates_V2.csv", "a") as handle:
        handle.write(f"{info['uids'][3]},nan,1,2,0\n")            # line 22: NaN
        handle.write(f"{info['uids'][3]},1,,2,0\n")               # line 23: empty field
        handle.write(f"{info['uids'][3]},5000,5000,5000,0\n")     # line 24: far outside the scan
        handle.write("1.2.3.not.downloaded,0,0,0,1\n")
    result = CliRunner().invoke(luna_cli.app, ["extract", "--subset", "0", "--data-dir", str(tmp_path / "luna"),
                                               "--work-dir", str(tmp_path / "work"), "--patch-size", "16",
                                               "--all-candidates"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for uid in (broken_raw, missing_raw, broken_header):
        assert uid in text
    assert "line 22" in text and "line 23" in text and "line 24" in text and "wholly outside" in text
    assert "1 seriesuid(s) of the candidates file have no scan" in text
    rows = (tmp_path / "work" / "patches" / "subset0" / "index.csv").read_text().splitlines()[1:]
    assert len(rows) == 5 and all(r.startswith(info["uids"][3]) for r in rows)
