"""``kagglecmr score`` and ``kagglecmr encode`` end to end, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_score import MALFORMED, write_case

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/cmr"


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kagglecmr", *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def assert_cli_error(proc: subprocess.CompletedProcess, *needles) -> str:
    """Exit code 2, stderr exactly one line ``error: ...`` containing ``needles``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]
    return lines[0]


def write_png(path: Path, arr) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.asarray(arr, dtype=np.uint8))
    return path


@pytest.fixture
def masks(tmp_path) -> Path:
    """A folder of five 8x8 label masks, one with an empty class."""
    rng = np.random.default_rng(11)
    folder = tmp_path / "masks"
    for i in (1, 2, 3, 10, 20):
        m = rng.integers(0, 4, (8, 8))
        if i == 2:
            m[m == 3] = 0
        write_png(folder / f"cmr{i}_mask.png", m)
    return folder


# --------------------------------------------------------------------------- score: malformed CSVs


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_score_malformed_submission(tmp_path, masks, name):
    path, needles = write_case(tmp_path, name)
    assert_cli_error(cli("score", path, "--truth", masks), path, *needles)


def test_score_run_past_image_end(tmp_path, masks):
    sub = tmp_path / "sub.csv"
    sub.write_text("id,encoding\ncmr1_mask1,60 10\n")  # 8x8 = 64 pixels
    assert_cli_error(cli("score", sub, "--truth", masks), sub, "line 2", "past the image's 64 pixels")


def test_score_missing_rows(tmp_path, masks):
    out = tmp_path / "s.csv"
    assert cli("encode", masks, "--out", out).returncode == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-2]) + "\n")
    assert_cli_error(cli("score", out, "--truth", masks), out, "2 of 15 truth rows missing", "cmr20_mask2")


def test_score_unknown_images_under_data(tmp_path):
    sub = tmp_path / "s.csv"
    sub.write_text("id,encoding\ncmr5_mask1,\n")
    write_png(tmp_path / "data" / "train" / "mask" / "cmr1_mask.png", np.zeros((8, 8)))
    # a folder with masks but no images is not a dataset (one loader for every command)
    assert_cli_error(cli("score", sub, "--data", tmp_path / "data"), tmp_path / "data", "train/image")
    write_png(tmp_path / "data" / "train" / "image" / "cmr1.png", np.zeros((8, 8)))
    assert_cli_error(cli("score", sub, "--data", tmp_path / "data"), sub, "cmr5")


def test_score_missing_truth_and_data(tmp_path):
    sub = tmp_path / "s.csv"
    sub.write_text("id,encoding\ncmr5_mask1,\n")
    assert_cli_error(cli("score", sub, "--truth", tmp_path / "nope"), "nope")
    assert_cli_error(cli("score", sub, "--data", tmp_path / "nodata"), "nodata")


# --------------------------------------------------------------------------- encode errors


def test_encode_missing_dir(tmp_path):
    assert_cli_error(cli("encode", tmp_path / "nope", "--out", tmp_path / "s.csv"), tmp_path / "nope")


def test_encode_empty_dir(tmp_path):
    (tmp_path / "m").mkdir()
    assert_cli_error(cli("encode", tmp_path / "m", "--out", tmp_path / "s.csv"), tmp_path / "m", "no PNG")


def _damage(png: bytes, how: str) -> bytes:
    if how == "truncated":
        return png[: len(png) // 2]
    if how == "bit flip":
        return png[:45] + bytes([png[45] ^ 0x10]) + png[46:]
    if how == "zero bytes":
        return b""
    return b"GIF89a" + png[6:]  # "not png"


@pytest.mark.parametrize("how", ["truncated", "bit flip", "zero bytes", "not png"])
def test_encode_corrupt_png(tmp_path, masks, how):
    bad = masks / "cmr4_mask.png"
    bad.write_bytes(_damage((masks / "cmr1_mask.png").read_bytes(), how))
    assert_cli_error(cli("encode", masks, "--out", tmp_path / "s.csv"), bad, "not a readable PNG")
    assert not (tmp_path / "s.csv").exists()


def test_encode_bad_label(tmp_path, masks):
    bad = write_png(masks / "cmr4_mask.png", np.full((8, 8), 7))
    assert_cli_error(cli("encode", masks, "--out", tmp_path / "s.csv"), bad, "outside classes 0..3")
    assert cli("encode", masks, "--out", tmp_path / "s.csv", "--num-classes", "8").returncode == 0


# --------------------------------------------------------------------------- encode + score


def test_encode_then_score_is_perfect(tmp_path, masks):
    out = tmp_path / "sub.csv"
    proc = cli("encode", masks, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "15 rows" in proc.stdout
    ids = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert ids[:4] == ["cmr1_mask1", "cmr1_mask2", "cmr1_mask3", "cmr2_mask1"] and ids[-1] == "cmr20_mask3"

    proc = cli("score", out, "--truth", masks, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1
    result = json.loads(proc.stdout)
    assert result["score"] == 1.0 and result["rows"] == 15
    assert result["per_class"] == {"1": 1.0, "2": 1.0, "3": 1.0}

    proc = cli("score", out, "--truth", out)  # the CSV as its own solution
    assert proc.returncode == 0 and "score 1.000000" in proc.stdout and "class 3" in proc.stdout


def test_encode_refuses_overwrite(tmp_path, masks):
    out = tmp_path / "sub.csv"
    out.write_bytes(b"id,encoding\r\nkeep,me\r\n")
    assert_cli_error(cli("encode", masks, "--out", out), out, "--force")
    assert out.read_bytes() == b"id,encoding\r\nkeep,me\r\n"
    assert cli("encode", masks, "--out", out, "--force").returncode == 0
    assert out.read_text().count("\n") == 16


def test_score_default_data_dir(tmp_path, masks):
    data = tmp_path / "data" / "val" / "mask"
    data.parent.mkdir(parents=True)
    masks.rename(data)
    for m in data.iterdir():  # a dataset folder: every mask beside its image
        write_png(data.parent / "image" / m.name.replace("_mask", ""), np.full((8, 8), 90))
    assert cli("encode", data, "--out", tmp_path / "s.csv").returncode == 0
    proc = cli("score", "s.csv", "--json", cwd=tmp_path)  # --data defaults to ./data
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["score"] == 1.0


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_DATA / "train" / "mask").is_dir(), reason=f"{REAL_DATA} not present")
def test_real_train_masks_score_perfectly(tmp_path):
    out = tmp_path / "train.csv"
    proc = cli("encode", REAL_DATA / "train" / "mask", "--out", out)
    assert proc.returncode == 0, proc.stderr
    proc = cli("score", out, "--data", REAL_DATA, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["score"] == 1.0 and result["rows"] == 3 * len(list((REAL_DATA / "train" / "mask").glob("*.png")))
