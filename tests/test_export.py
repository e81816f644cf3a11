"""``kagglecmr export``: one ONNX / TorchScript file of the ensemble, checked against ``ensemble`` on export.

A 2-fold copy of the session's tiny run keeps the exports quick.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import copy_run, tree_snapshot

import kagglecmr as kc
from kagglecmr.engine import exporter as export_mod
from kagglecmr.utils.errors import KaggleCMRError

FLIPS = ["none", "hflip"]


@pytest.fixture(scope="module")
def run2(project, tmp_path_factory):
    """Folds 0 and 1 of the tiny run: a 2-model ensemble."""
    dst = tmp_path_factory.mktemp("export") / "runs" / "two"
    dst.mkdir(parents=True)
    for k in (0, 1):
        copy_run(project.run / f"fold{k}", dst / f"fold{k}", slim=True)
    return dst


@pytest.fixture(scope="module")
def nchw(project):
    paths = sorted((project.data / "test" / "image").glob("*.png"))[:3]
    return np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths])[:, None]


@pytest.fixture(scope="module")
def onnx_file(run2, project, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "two.onnx"
    res = kc.export(run2, out=out, format="onnx", tta_flips=FLIPS, data=project.data)
    return res


def test_onnx_export_passes_its_check_and_matches_load_ensemble(onnx_file, run2, nchw, one_torch_thread):
    res = onnx_file
    info = json.loads(res.sidecar.read_text())
    assert info == res.info and info["max_abs_error"] == res.max_error <= 1e-3
    assert info["checked_with"] == "onnxruntime" and info["checked_on"].startswith("25 labelled")
    assert info["input"]["name"] == "image" and info["input"]["shape"] == ["N", 1, 96, 96]
    assert info["output"]["shape"] == ["N", 4, 96, 96] and info["tta"] == FLIPS and info["models"] == 2
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("image", "tensor(uint8)", "probs")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 96, 96]  # a dynamic batch axis
    model = kc.load_export(res.path)
    ref = kc.load_ensemble(run2, tta_flips=FLIPS, device="cpu").predict_proba(nchw[:, 0])
    for batch in (nchw, nchw[:1]):
        probs = model.predict_proba(batch)
        assert probs.dtype == np.float32 and probs.shape == (len(batch), 4, 96, 96)
        np.testing.assert_allclose(probs, ref[:len(batch)], atol=1e-3)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_export_via_cli_checks_on_random_images(run2, tmp_path, main_cli, nchw, one_torch_thread):
    out = tmp_path / "two.pt"
    proc = main_cli("export", "--runs", run2, "--format", "torchscript", "--tta", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "max |probs - ensemble|" in proc.stdout and "random images" in proc.stdout
    info = json.loads((tmp_path / "two.pt.json").read_text())
    assert info["max_abs_error"] <= 1e-3 and info["tta"] == ["none", "hflip", "vflip", "hvflip"]
    kept = [f for run in info["checkpoints"] for f in run]  # which checkpoint of each fold went in
    assert len(kept) == info["models"] and all(f.endswith("/best.safetensors") for f in kept)
    traced = torch.jit.load(str(out))
    with torch.no_grad():
        probs = traced(torch.from_numpy(nchw)).numpy()
    ref = kc.load_ensemble(run2, tta=True, device="cpu").predict_proba(nchw[:, 0])
    np.testing.assert_allclose(probs, ref, atol=1e-3)
    proc = main_cli("export", "--runs", run2, "--format", "torchscript", "--out", out)
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_a_wrong_model_fails_the_check_and_nothing_is_written(run2, project, tmp_path, monkeypatch):
    real = export_mod.ensemble_module

    def perturbed(pred):
        module = copy.deepcopy(real(pred))
        with torch.no_grad():
            for p in module.models[0].parameters():
                p.add_(0.05 * torch.randn_like(p))
        return module

    monkeypatch.setattr(export_mod, "ensemble_module", perturbed)
    out = tmp_path / "bad.pt"
    with pytest.raises(KaggleCMRError, match="differ from the ensemble by") as exc:
        kc.export(run2, out=out, format="torchscript", data=project.data)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_corrupted_export_is_a_one_line_error(onnx_file, tmp_path, main_cli, assert_cli_error, project, how):
    bad = tmp_path / "bad.onnx"
    data = onnx_file.path.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if how == "truncated" else b"not a model at all")
    shutil.copy(onnx_file.sidecar, tmp_path / "bad.onnx.json")
    with pytest.raises(KaggleCMRError, match="bad.onnx: not a readable ONNX model"):
        kc.load_export(bad)
    img = tmp_path / "img.png"
    shutil.copy(sorted((project.data / "test" / "image").glob("*.png"))[0], img)
    proc = main_cli("predict", img, "--runs", bad, "--out", tmp_path / "out")
    assert_cli_error(proc, "bad.onnx", "not a readable ONNX model")
    assert not (tmp_path / "out").exists()
    pt = tmp_path / "bad.pt"
    pt.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(KaggleCMRError, match="bad.pt: not a readable TorchScript model"):
        kc.load_export(pt)


def test_predict_with_an_exported_file_equals_predict_with_the_run(onnx_file, run2, project, tmp_path, main_cli):
    src = sorted((project.data / "test" / "image").glob("*.png"))[0]
    img = tmp_path / "in" / "x.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), cv2.resize(cv2.imread(str(src), cv2.IMREAD_GRAYSCALE), (70, 110)))
    for name, runs in (("file", onnx_file.path), ("run", run2)):
        proc = main_cli("predict", img, "--runs", runs, "--tta-flips", "none,hflip", "--out", tmp_path / name,
                        "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
    a = cv2.imread(str(tmp_path / "file" / "x.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(tmp_path / "run" / "x.png"), cv2.IMREAD_UNCHANGED)
    assert a.shape == (110, 70) and (a != b).mean() < 0.001  # equal up to argmax ties at 1e-5


def test_missing_onnxruntime_is_a_one_line_error(run2, tmp_path, monkeypatch, main_cli, assert_cli_error):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    before = tree_snapshot(run2)
    with pytest.raises(KaggleCMRError, match=r"pip install 'kagglecmr\[export\]'"):
        kc.export(run2, out=tmp_path / "m.onnx", format="onnx")
    proc = main_cli("export", "--runs", run2, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_cli_error(proc, "onnxruntime", "pip install 'kagglecmr[export]'")
    assert tree_snapshot(run2) == before and not (tmp_path / "m.onnx").exists()
