"""ONNX export: the graph runs in ONNX Runtime, classifies real tiles as torch does, and carries its header."""

from __future__ import annotations

import json

import numpy as np
import pytest

from geoseg.cli.main import main
from geoseg.models import read_model_spec

onnx = pytest.importorskip("onnx", reason="onnx is in the test extra (pip install 'geoseg[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")


def test_export_runs_in_onnx_runtime_as_torch_does(tmp_path, unet_checkpoint, sample_scene, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(unet_checkpoint), "-o", str(out), "--tile", "128",
                 "--verify", str(sample_scene.image)]) == 0
    assert "classifies 100.0000%" in capsys.readouterr().err
    graph = onnx.load(str(out))
    header = json.loads({p.key: p.value for p in graph.metadata_props}["geoseg"])
    spec = read_model_spec(unet_checkpoint)
    assert header["classes"] == spec.classes.to_records() and header["mean"] == list(spec.mean)
    assert header["output_stride"] == 8 and [b["name"] for b in header["bands"]] == spec.band_names
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"tiles": np.zeros((2, 4, 64, 96), np.float32)})[0]
    assert scores.shape == (2, 6, 64, 96)  # any batch and any size of the stride


def test_export_refuses_an_existing_file_and_a_tile_off_the_stride(tmp_path, unet_checkpoint, capsys):
    out = tmp_path / "m.onnx"
    out.write_text("mine")
    assert main(["export", str(unet_checkpoint), "-o", str(out)]) == 1
    assert "exists and won't be overwritten" in capsys.readouterr().err and out.read_text() == "mine"
    assert main(["export", str(unet_checkpoint), "-o", str(tmp_path / "n.onnx"), "--tile", "100"]) == 1
    assert "not a multiple of the model's output stride 8" in capsys.readouterr().err
