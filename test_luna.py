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


def test_axis_aligned_and_oblique_paths_agree(monkeypatch):
    import data
    rng = np.random.default_rng(2)
    scan = _scan(DIRECTIONS["permuted_flipped"], hu=rng.integers(-1000, 600, (40, 50, 60)).astype(np.int16))
    points = data.index_to_world(rng.uniform(-10, 50, (12, 3)), scan)
    fast = data.extract_patches(scan, points, 20, 1.0)
    monkeypatch.setattr(data, "_axis_permutation", lambda scan: None)  # force the generic 3-D path
    generic = data.extract_patches(scan, points, 20, 1.0)
    assert np.abs(fast.astype(int) - generic).max() <= 1
    assert (fast == -1000).any() and (fast > -1000).any()


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


# --- evaluation ---------------------------------------------------------------

LUNA16_REFERENCE = SHARED_DATA / "luna16"


def _table(rows):
    """PointTable from ``[(uid, x, y, z, value), ...]``."""
    from data import PointTable
    uids = np.array([r[0] for r in rows], dtype=object)
    numbers = np.array([r[1:] for r in rows], float).reshape(-1, 4)
    return PointTable(uids, numbers[:, :3], numbers[:, 3], np.arange(2, len(rows) + 2))


def _hand_case():
    """Eight scans whose FROC is worked out by hand in the tests below (diameters and distances in mm)."""
    nodules = [("s1", 0, 0, 0, 4), ("s2", 0, 0, 0, 4), ("s3", 10, 10, 10, 6), ("s5", 0, 0, 0, 10),
               ("s6", 0, 0, 0, 4), ("s6", 1, 0, 0, 4)]
    excluded = [("s4", 0, 0, 0, -1), ("s5", 0, 0, 0, -1)]
    marks = [("s1", 0.5, 0, 0, 0.9), ("s1", 1, 0, 0, 0.3),       # nodule hit twice: counts once, at 0.9
             ("s2", 0, 0, 1.9, 0.7), ("s2", 50, 0, 0, 0.7), ("s2", 60, 0, 0, 0.7),  # hit tied with two FPs
             ("s3", 10, 10, 13, 0.2),                             # exactly on the radius: a false positive
             ("s4", 4.9, 0, 0, 0.95), ("s4", 5, 0, 0, 0.8),       # inside / on the 10 mm excluded sphere
             ("s5", 1, 0, 0, 0.6),                                # nodule and excluded finding: a hit
             ("s6", 0.5, 0, 0, 0.5),                              # inside two nodules: detects both
             ("elsewhere", 0, 0, 0, 0.99)]                        # not an evaluated scan
    return _table(marks), _table(nodules), _table(excluded)


def test_froc_hand_case_follows_every_rule():
    import evaluate
    marks, nodules, excluded = _hand_case()
    scans = [f"s{i}" for i in range(1, 9)]
    result = evaluate.score_marks(marks, scans, nodules, excluded, bootstrap=0)
    # Entries: nodules 0.9, 0.7, missed, 0.6, 0.5, 0.5; false positives 0.8, 0.7, 0.7, 0.2. Points (FP, TP):
    # (0,0) (0,1) (1,1) (3,2) (3,5) (4,5); FP/scan = FP / 8, sensitivity = TP / 6.
    expected = [1 / 6, 1.5 / 6, 5 / 6, 5 / 6, 5 / 6, 5 / 6, 5 / 6]
    np.testing.assert_allclose(list(result["froc_sensitivities"].values()), expected, rtol=0, atol=1e-12)
    assert result["cpm"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert (result["n_nodules"], result["n_detected"], result["n_missed"]) == (6, 5, 1)
    assert result["n_false_positives"] == 4 and result["n_marks_on_excluded"] == 1 and result["n_double_hits"] == 1
    assert result["n_marks"] == 11 and result["n_marks_scored"] == 10
    assert result["n_marks_unknown_seriesuid"] == 1 and result["unknown_seriesuids"] == ["elsewhere"]
    assert any("outside the evaluated list" in w for w in result["warnings"])


def test_froc_false_positives_divide_by_the_evaluated_scans():
    import evaluate
    marks, nodules, excluded = _hand_case()
    eight = evaluate.score_marks(marks, [f"s{i}" for i in range(1, 9)], nodules, excluded, bootstrap=0)
    sixteen = evaluate.score_marks(marks, [f"s{i}" for i in range(1, 17)], nodules, excluded, bootstrap=0)
    # Twice the scans halve FP/scan: the point (3 FP, 2 TP) moves from 0.375 to 0.1875 FP/scan.
    assert sixteen["froc_sensitivities"]["0.125"] == pytest.approx(1.5 / 6, abs=1e-12)
    assert sixteen["froc_sensitivities"]["0.25"] == pytest.approx(5 / 6, abs=1e-12)
    assert eight["froc_sensitivities"]["0.125"] == pytest.approx(1 / 6, abs=1e-12)
    # Only the first four scans: their 3 nodules (one missed) and 4 false positives, over 4 scans.
    four = evaluate.score_marks(marks, ["s1", "s2", "s3", "s4"], nodules, excluded, bootstrap=0)
    assert (four["n_nodules"], four["n_false_positives"], four["n_marks_unknown_seriesuid"]) == (3, 4, 3)
    # Points (FP, TP): (0,0) (0,1) (1,1) (3,2) (4,2), FP/scan = FP / 4, sensitivity = TP / 3.
    expected = [1 / 3, 1 / 3, 1.5 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    np.testing.assert_allclose(list(four["froc_sensitivities"].values()), expected, rtol=0, atol=1e-12)


def test_froc_reads_the_top_of_a_vertical_step_and_counts_missed_nodules():
    import evaluate
    # 8 scans; false positives 0.9, 0.8, 0.5; nodules 0.7, 0.6 and one missed.
    entries = evaluate.FrocEntries(
        is_nodule=np.array([0, 0, 1, 1, 0, 1], bool), probability=np.array([0.9, 0.8, 0.7, 0.6, 0.5, -1e9]),
        is_missed=np.array([0, 0, 0, 0, 0, 1], bool), scan=np.array([0, 1, 2, 3, 4, 5]))
    fps, sens, _ = evaluate.froc_curve(entries, n_scans=8)
    at = evaluate.sensitivities_at(fps, sens)
    # 1/8 FP/scan lies on the flat start; 1/4 FP/scan (2 FP) is where the curve climbs to 2/3.
    np.testing.assert_allclose(at, [0, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3], atol=1e-12)
    # No false positive at all: the whole curve sits at 0 FP/scan, at the final sensitivity.
    only_hits = evaluate.FrocEntries(np.array([1, 1, 1], bool), np.array([0.4, 0.3, -1e9]),
                                     np.array([0, 0, 1], bool), np.array([0, 1, 2]))
    fps, sens, _ = evaluate.froc_curve(only_hits, n_scans=3)
    np.testing.assert_allclose(evaluate.sensitivities_at(fps, sens), np.full(7, 2 / 3), atol=1e-12)


def test_mark_cap_keeps_marks_above_the_101st_and_drops_ties_at_the_cut():
    import evaluate
    scan = np.repeat([0, 1, 2], [102, 103, 50])
    distinct = np.arange(102, 0, -1) / 1000.0
    tied = np.concatenate([np.arange(103, 4, -1) / 1000.0, [0.004, 0.004, 0.004, 0.004]])  # ranks 100-103 tied
    few = np.full(50, 0.5)  # at most 100 marks: all kept, ties or not
    keep, stats = evaluate.cap_marks_per_scan(scan, np.concatenate([distinct, tied, few]), n_scans=3)
    assert keep[:102].sum() == 100 and not keep[100:102].any()
    assert keep[102:205].sum() == 99 and not keep[201:205].any()
    assert keep[205:].all()
    assert stats == {"n_over_cap": 2 + 4, "tie_scans": 1, "tie_dropped": 4}
    # Through the scorer: a nodule whose only hit ranks 101st is missed, and the tie is reported.
    rows = [("a", 100.0 + i, 0, 0, 0.5 + i / 1000.0) for i in range(100)] + [("a", 0, 0, 0, 0.4)]
    rows += [("b", 100.0 + i, 0, 0, 0.3) for i in range(101)]
    result = evaluate.score_marks(_table(rows), ["a", "b"], _table([("a", 0, 0, 0, 5)]), _table([]), bootstrap=0)
    assert result["n_detected"] == 0 and result["n_marks_scored"] == 100
    assert result["n_scans_tied_at_cap"] == 1 and any("tied" in w for w in result["warnings"])


def test_froc_bootstrap_is_seeded_and_collapses_on_identical_scans():
    import evaluate
    marks, nodules, excluded = _hand_case()
    scans = [f"s{i}" for i in range(1, 9)]
    first = evaluate.score_marks(marks, scans, nodules, excluded, bootstrap=200, seed=3)
    again = evaluate.score_marks(marks, scans, nodules, excluded, bootstrap=200, seed=3)
    other = evaluate.score_marks(marks, scans, nodules, excluded, bootstrap=200, seed=4)
    assert first["cpm_ci95"] == again["cpm_ci95"] and first["cpm_ci95"] != other["cpm_ci95"]
    low, high = first["cpm_ci95"]
    assert 0 <= low <= first["cpm"] <= high <= 1 and low < high
    # Every resample of one scan is that scan: the interval is the point estimate.
    single = evaluate.score_marks(marks, ["s2"], nodules, excluded, bootstrap=50, seed=0)
    assert single["cpm_ci95"] == pytest.approx([single["cpm"]] * 2, abs=1e-12)


def _write_submission(path, rows, header="seriesuid,coordX,coordY,coordZ,probability"):
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def test_submission_bad_input_names_lines(tmp_path):
    import evaluate
    from data import UserError
    good = [("u1", 1.0, 2.0, 3.0, 0.5), ("u2", 1.5, 2.5, 3.5, 0.25)]
    table = evaluate.read_submission(_write_submission(tmp_path / "ok.csv", good))
    assert list(table.seriesuid) == ["u1", "u2"] and table.value.tolist() == [0.5, 0.25]
    reordered = evaluate.read_submission(_write_submission(
        tmp_path / "order.csv", [(0.5, 3.0, "u1", 1.0, 2.0)], header="probability,coordZ,seriesuid,coordX,coordY"))
    assert reordered.world_xyz.tolist() == [[1.0, 2.0, 3.0]] and reordered.seriesuid[0] == "u1"
    with pytest.raises(UserError, match="missing column.*probability"):
        evaluate.read_submission(_write_submission(tmp_path / "cols.csv", [r[:4] for r in good],
                                                   header="seriesuid,coordX,coordY,coordZ"))
    bad = good + [("u3", "abc", 1, 2, 0.1), ("u4", 1, 2, 3, "nan"), ("u5", 1, 2, 3)]
    with pytest.raises(UserError) as err:
        evaluate.read_submission(_write_submission(tmp_path / "bad.csv", bad))
    assert "3 bad line(s)" in str(err.value)
    assert "line 4" in str(err.value) and "line 5" in str(err.value) and "line 6" in str(err.value)
    with pytest.raises(UserError, match="not found"):
        evaluate.read_submission(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="none of the submission"):
        evaluate.score_marks(table, ["v1"], _table([]), _table([]), bootstrap=0)


def test_evaluate_cli_scores_a_submission_and_reports_bad_files(tmp_path):
    import json
    from typer.testing import CliRunner
    import luna_cli
    marks, nodules, excluded = _hand_case()
    sub = _write_submission(tmp_path / "sub.csv", [(u, *xyz, p) for u, xyz, p in
                                                   zip(marks.seriesuid, marks.world_xyz.tolist(), marks.value)])
    ann = _write_submission(tmp_path / "ann.csv", [(u, *xyz, d) for u, xyz, d in
                                                   zip(nodules.seriesuid, nodules.world_xyz.tolist(), nodules.value)],
                            header="seriesuid,coordX,coordY,coordZ,diameter_mm")
    exc = _write_submission(tmp_path / "exc.csv", [(u, *xyz, d) for u, xyz, d in
                                                   zip(excluded.seriesuid, excluded.world_xyz.tolist(), excluded.value)],
                            header="seriesuid,coordX,coordY,coordZ,diameter_mm")
    (tmp_path / "uids.csv").write_text("".join(f"s{i}\n" for i in range(1, 9)))
    args = ["evaluate", "--submission", str(sub), "--annotations", str(ann), "--excluded", str(exc),
            "--seriesuids", str(tmp_path / "uids.csv"), "--json", str(tmp_path / "out" / "froc.json"),
            "--bootstrap", "100"]
    result = CliRunner().invoke(luna_cli.app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "froc.json").read_text())
    assert saved["cpm"] == pytest.approx((1 / 6 + 1.5 / 6 + 5 * 5 / 6) / 7, abs=1e-12)
    assert set(saved["froc_sensitivities"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert "CPM" in result.output and "elsewhere" in " ".join(result.output.split())
    (tmp_path / "bad.csv").write_text("seriesuid,coordX,coordY,coordZ,probability\ns1,1,2,x,0.5\n")
    args[2] = str(tmp_path / "bad.csv")
    result = CliRunner().invoke(luna_cli.app, args)
    assert result.exit_code == 1 and "line 2" in result.output and "Traceback" not in result.output


def _reference_froc(rows, nodules, excluded, seriesuids, rates=(0.125, 0.25, 0.5, 1, 2, 4, 8)):
    """Slow, loop-and-dict rendering of the LUNA16 rules, written independently of evaluate.py."""
    marks_by_scan, findings_by_scan = {}, {}
    for uid, x, y, z, p in rows:
        marks_by_scan.setdefault(uid, []).append((x, y, z, p))
    for uid, x, y, z, d in nodules:
        findings_by_scan.setdefault(uid, []).append((x, y, z, d, True))
    for uid, x, y, z, d in excluded:
        findings_by_scan.setdefault(uid, []).append((x, y, z, 10.0 if d < 0 else d, False))
    labels, scores, missed = [], [], []
    for uid in seriesuids:
        marks = marks_by_scan.get(uid, [])
        if len(marks) > 100:
            cut = sorted((m[3] for m in marks), reverse=True)[100]
            marks = [m for m in marks if m[3] > cut]
        unclaimed = set(range(len(marks)))
        for x, y, z, d, included in sorted(findings_by_scan.get(uid, []), key=lambda f: not f[4]):
            hits = [i for i, (mx, my, mz, _) in enumerate(marks)
                    if (x - mx) ** 2 + (y - my) ** 2 + (z - mz) ** 2 < (d / 2.0) ** 2]
            unclaimed -= set(hits)
            if included:
                labels.append(1)
                scores.append(max(marks[i][3] for i in hits) if hits else None)
                missed.append(not hits)
        for i in sorted(unclaimed):
            labels.append(0)
            scores.append(marks[i][3])
            missed.append(False)
    total = sum(labels)
    ranked = sorted(((s, l) for s, l, m in zip(scores, labels, missed) if not m), key=lambda t: -t[0])
    detected = sum(l for _, l in ranked)
    negatives = len(ranked) - detected
    xs, ys, tp, fp = [0.0], [0.0], 0, 0
    for i, (score, label) in enumerate(ranked):
        tp, fp = tp + label, fp + 1 - label
        if i + 1 == len(ranked) or ranked[i + 1][0] != score:
            xs.append(fp / negatives * negatives / len(seriesuids))
            ys.append(tp / detected * detected / total)
    sens = []
    for r in rates:
        if r >= xs[-1]:
            sens.append(ys[-1])
            continue
        j = max(i for i in range(len(xs)) if xs[i] <= r)
        sens.append(ys[j] + (ys[j + 1] - ys[j]) * (r - xs[j]) / (xs[j + 1] - xs[j]) if xs[j] != r else ys[j])
    return sens, {"n_detected": detected, "n_false_positives": negatives, "n_nodules": total}


@pytest.mark.skipif(not (LUNA16_REFERENCE / "annotations.csv").is_file(), reason="LUNA16 annotations not in ../shared")
def test_froc_on_real_luna16_annotations_matches_slow_reference(tmp_path):
    import evaluate
    import data
    uids = data.read_seriesuids(LUNA16_REFERENCE / "seriesuids.csv")
    nodules = [tuple(r) for r in _rows_of(evaluate.read_findings(LUNA16_REFERENCE / "annotations.csv"))]
    excluded_table, _ = data.read_point_csv(LUNA16_REFERENCE / "annotations_excluded.csv", "diameter_mm")
    excluded = [tuple(r) for r in _rows_of(excluded_table)]
    rng = np.random.default_rng(16)
    rows = []
    for uid, x, y, z, d in nodules:           # one to three jittered marks per nodule, some just outside
        for _ in range(rng.integers(1, 4)):
            step = rng.normal(size=3)
            step *= rng.uniform(0, 0.7 * d) / np.linalg.norm(step)
            rows.append((uid, x + step[0], y + step[1], z + step[2]))
    for uid, x, y, z, d in excluded[::3]:     # marks on excluded findings
        rows.append((uid, x + rng.normal(0, 2), y + rng.normal(0, 2), z + rng.normal(0, 2)))
    crowded = set(rng.choice(uids, 40, replace=False))
    for uid in uids:                           # random false positives; some scans over the 100-mark cap
        n = 130 if uid in crowded else int(rng.integers(0, 12))
        rows += [(uid, *rng.uniform(-150, 150, 3)) for _ in range(n)]
    # Probabilities rounded to 3 decimals: ties everywhere, including at the 100-mark cut.
    rows = [(uid, float(x), float(y), float(z), round(float(rng.random()), 3)) for uid, x, y, z in rows]
    assert 15_000 < len(rows) < 30_000
    sub = _write_submission(tmp_path / "sub.csv", [(u, repr(x), repr(y), repr(z), repr(p)) for u, x, y, z, p in rows])
    result = evaluate.score_submission(sub, LUNA16_REFERENCE / "annotations.csv",
                                       LUNA16_REFERENCE / "annotations_excluded.csv",
                                       LUNA16_REFERENCE / "seriesuids.csv", bootstrap=20)
    expected, counts = _reference_froc(rows, nodules, excluded, uids)
    np.testing.assert_allclose(list(result["froc_sensitivities"].values()), expected, rtol=0, atol=1e-12)
    assert result["cpm"] == pytest.approx(np.mean(expected), abs=1e-12)
    assert {k: result[k] for k in counts} == counts
    assert result["n_scans_tied_at_cap"] > 0 and 0 < result["cpm"] < 1
    # Scoring only one subset-sized slice divides by its own scan count.
    part = uids[:89]
    sliced = evaluate.score_marks(evaluate.read_submission(sub), part,
                                  evaluate.read_findings(LUNA16_REFERENCE / "annotations.csv"),
                                  evaluate.read_findings(LUNA16_REFERENCE / "annotations_excluded.csv", excluded=True),
                                  bootstrap=0)
    expected_part, _ = _reference_froc(rows, nodules, excluded, part)
    np.testing.assert_allclose(list(sliced["froc_sensitivities"].values()), expected_part, rtol=0, atol=1e-12)


def _rows_of(table):
    return [(u, *xyz, v) for u, xyz, v in zip(table.seriesuid, table.world_xyz.tolist(), table.value.tolist())]


# --- phantom --------------------------------------------------------------------

PHANTOM_SHAPE = (48, 96, 96)   # small scans keep these tests fast; the geometry is the same at any size


def _phantom_folder(root: Path, seed: int = 3) -> dict:
    import phantom
    return phantom.write_luna_folder(root, n_subsets=2, scans_per_subset=2, shape=PHANTOM_SHAPE, seed=seed,
                                     negatives_per_scan=30, nodules_per_scan=(1, 3))


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom") / "luna16"
    _phantom_folder(root)
    return root


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text().splitlines()
    return lines[0].split(","), [line.split(",") for line in lines[1:]]


def test_phantom_same_seed_gives_byte_identical_folder(phantom_root, tmp_path):
    _phantom_folder(tmp_path / "again")
    files = sorted(p.relative_to(phantom_root) for p in phantom_root.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".mhd"]) == 4 and len([f for f in files if f.suffix == ".raw"]) == 4
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for name in files:
        assert (phantom_root / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    _phantom_folder(tmp_path / "other", seed=4)
    assert (tmp_path / "other" / "candidates_V2.csv").read_bytes() != (phantom_root / "candidates_V2.csv").read_bytes()


def test_phantom_csvs_follow_the_luna16_layout(phantom_root):
    uids = (phantom_root / "seriesuids.csv").read_text().splitlines()
    assert len(uids) == 4 and len(set(uids)) == 4 and not uids[0].startswith("seriesuid")
    assert sorted(p.stem for p in phantom_root.glob("subset*/*.mhd")) == sorted(uids)
    assert {p.parent.name for p in phantom_root.glob("subset*/*.mhd")} == {"subset0", "subset1"}
    head, nodules = _csv_rows(phantom_root / "annotations.csv")
    assert head == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    head, excluded = _csv_rows(phantom_root / "annotations_excluded.csv")
    assert head == ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    head, candidates = _csv_rows(phantom_root / "candidates_V2.csv")
    assert head == ["seriesuid", "coordX", "coordY", "coordZ", "class"]
    assert nodules and excluded and {r[0] for r in nodules + excluded + candidates} <= set(uids)
    assert all(4.0 <= float(r[4]) <= 25.0 for r in nodules)
    assert all(float(r[4]) == -1 or 0 < float(r[4]) < 3.0 for r in excluded)
    assert {r[4] for r in candidates} == {"0", "1"}
    assert 20 * 4 <= sum(r[4] == "0" for r in candidates) <= 60 * 4
    cand_xyz = np.array([[float(v) for v in r[1:4]] for r in candidates])
    cand_uid = np.array([r[0] for r in candidates])
    cand_cls = np.array([int(r[4]) for r in candidates])
    for uid, *xyz, diameter in nodules:     # 1-3 class-1 candidates inside each nodule, no class 0 inside
        dist = np.linalg.norm(cand_xyz - np.array(xyz, dtype=float), axis=1)
        inside = (cand_uid == uid) & (dist < float(diameter) / 2)
        assert 1 <= np.sum(inside & (cand_cls == 1)) <= 3 and not np.any(inside & (cand_cls == 0))
    assert np.sum(cand_cls == 1) == sum(                 # and no class-1 candidate far from every nodule
        np.any([(u == r[0]) and np.linalg.norm(p - np.array(r[1:4], dtype=float)) < float(r[4]) / 2
                for r in nodules]) for u, p in zip(cand_uid[cand_cls == 1], cand_xyz[cand_cls == 1]))
    for uid, *xyz, _ in excluded:           # every irrelevant finding has a class-0 candidate on it
        dist = np.linalg.norm(cand_xyz - np.array(xyz, dtype=float), axis=1)
        assert np.any((cand_uid == uid) & (dist < 1.5) & (cand_cls == 0))


def _read_phantom_scans(root: Path) -> dict:
    import SimpleITK as sitk
    return {p.stem: sitk.ReadImage(str(p)) for p in sorted(root.glob("subset*/*.mhd"))}


def test_phantom_geometry_is_anisotropic_with_flips_and_rotations(phantom_root):
    images = _read_phantom_scans(phantom_root)
    directions = [np.array(img.GetDirection()).reshape(3, 3) for img in images.values()]
    assert any(np.allclose(d, np.eye(3)) for d in directions)
    assert any(np.any(np.diag(d) < 0) for d in directions)                            # flipped axes
    assert any(np.abs(d - np.diag(np.diag(d))).max() > 0.03 for d in directions)       # rotated
    for img, d in zip(images.values(), directions):
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-9)
        spacing = np.array(img.GetSpacing())
        assert spacing[0] == spacing[1] and abs(spacing[2] - spacing[0]) > 0.2
    assert len({img.GetOrigin() for img in images.values()}) == len(images)


def test_phantom_nodules_are_bright_where_the_direction_matrix_puts_them(phantom_root):
    import SimpleITK as sitk
    images = _read_phantom_scans(phantom_root)
    _, nodules = _csv_rows(phantom_root / "annotations.csv")
    naive_misses = 0
    for uid, *xyz, diameter in nodules:
        img = images[uid]
        hu = sitk.GetArrayViewFromImage(img)
        world = tuple(float(v) for v in xyz)
        i, j, k = np.rint(img.TransformPhysicalPointToContinuousIndex(world)).astype(int)
        assert 0 <= k < hu.shape[0] and 0 <= j < hu.shape[1] and 0 <= i < hu.shape[2]
        assert hu[k, j, i] > -650, (uid, xyz, diameter, hu[k, j, i])         # lung parenchyma is about -860
        direction = np.array(img.GetDirection()).reshape(3, 3)
        if not np.allclose(direction, np.eye(3)):     # a reader that ignores the direction must miss
            naive = (np.array(world) - img.GetOrigin()) / img.GetSpacing()
            true = np.array(img.TransformPhysicalPointToContinuousIndex(world))
            naive_misses += np.linalg.norm((naive - true) * img.GetSpacing()) > float(diameter) / 2
    assert naive_misses >= 2


def test_phantom_hard_negatives_overlap_nodules_in_brightness(phantom_root):
    import SimpleITK as sitk
    images = _read_phantom_scans(phantom_root)
    head, rows = _csv_rows(phantom_root / "candidate_sources.csv")
    assert head[-1] == "source"
    centre_hu = {}
    for uid, x, y, z, label, source in rows:
        img = images[uid]
        i, j, k = np.rint(img.TransformPhysicalPointToContinuousIndex((float(x), float(y), float(z)))).astype(int)
        centre_hu.setdefault(source, []).append(float(sitk.GetArrayViewFromImage(img)[k, j, i]))
    assert {"nodule", "vessel", "bifurcation", "pleura", "parenchyma", "soft-tissue", "near-nodule"} <= set(centre_hu)
    assert np.median(centre_hu["parenchyma"]) < -700 and np.median(centre_hu["soft-tissue"]) > -150
    # Some vessel candidates are brighter than some nodule centres: brightness alone cannot separate them.
    assert max(centre_hu["vessel"] + centre_hu["bifurcation"]) > min(centre_hu["nodule"])


def test_make_phantom_scan_validates_and_keeps_negatives_off_nodules():
    import phantom
    case = phantom.make_phantom_scan(np.random.default_rng(5), PHANTOM_SHAPE, direction_kind="flip_rotate",
                                     nodules_per_scan=(3, 3), negatives_per_scan=20)
    assert case.scan.hu.dtype == np.int16 and case.scan.hu.shape == PHANTOM_SHAPE
    real = [n for n in case.nodules if not n.excluded]
    assert len(real) == 3
    for cand in case.candidates:
        dists = [np.linalg.norm(cand.center_xyz - n.center_xyz) - n.axes_mm.max() for n in real]
        assert (min(dists) < 0) == (cand.label == 1), cand
    with pytest.raises(ValueError, match="direction_kind"):
        phantom.make_phantom_scan(np.random.default_rng(0), PHANTOM_SHAPE, direction_kind="sideways")
    with pytest.raises(ValueError, match="shape"):
        phantom.make_phantom_scan(np.random.default_rng(0), (8, 96, 96))


def test_synth_cli_writes_and_refuses_to_overwrite(tmp_path):
    from typer.testing import CliRunner
    import luna_cli
    root = tmp_path / "luna16"
    args = ["synth", "--data-dir", str(root), "--subsets", "1", "--scans-per-subset", "1"]
    result = CliRunner().invoke(luna_cli.app, args)
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.output and len(list(root.glob("subset0/*.mhd"))) == 1
    before = (root / "candidates_V2.csv").read_bytes()
    result = CliRunner().invoke(luna_cli.app, args + ["--seed", "1"])
    assert result.exit_code == 1 and "not empty" in result.output and "--force" in result.output
    assert (root / "candidates_V2.csv").read_bytes() == before
    result = CliRunner().invoke(luna_cli.app, args + ["--seed", "1", "--force"])
    assert result.exit_code == 0 and (root / "candidates_V2.csv").read_bytes() != before
    assert len(list(root.glob("subset0/*.mhd"))) == 1
    foreign = tmp_path / "foreign"
    (foreign / "subset0").mkdir(parents=True)
    (foreign / "subset0" / "scan.mhd").write_text("not ours")
    result = CliRunner().invoke(luna_cli.app, ["synth", "--data-dir", str(foreign), "--force"])
    assert result.exit_code == 1 and "not made by synth" in result.output
    assert (foreign / "subset0" / "scan.mhd").exists()
