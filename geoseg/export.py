"""Deployment: a checkpoint as an ONNX model that carries what it needs to be fed, checked against torch.

The ONNX graph takes normalised tiles ``(N, bands, H, W)`` (H and W multiples of the output stride) and
returns class scores ``(N, classes, H, W)``. Its ``metadata_props`` hold the geoseg header: bands,
normalisation (mean/std), classes with colours, tile size, output stride (``geoseg`` key, JSON). The export
is verified on tiles of a real raster when one is given (else on the checkpoint's own normalisation
statistics): the classes must match torch's on at least 99.9% of the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from geoseg._io import atomic_path
from geoseg.errors import CheckpointError, InputError

#: Least share of pixels ONNX Runtime must classify as torch does for an export to be accepted.
AGREEMENT = 0.999


def _tiles(raster: Path | None, spec, size: int, n: int = 4) -> np.ndarray:  # noqa: ANN001
    """``n`` normalised tiles: windows of ``raster`` when given, else draws from the model's statistics."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    if raster is None:
        rng = np.random.default_rng(0)
        return rng.normal(size=(n, spec.in_channels, size, size)).astype(np.float32)
    from rasterio.windows import Window

    from geoseg.read import open_raster

    with open_raster(raster) as src:
        top = max(b.index for b in spec.bands)
        if top > src.count:
            raise InputError(f"{raster}: has {src.count} bands; the model reads band {top}")
        out = []
        for k in range(n):
            r = (src.height - size) * k // max(n - 1, 1) if src.height > size else 0
            c = (src.width - size) * (n - 1 - k) // max(n - 1, 1) if src.width > size else 0
            data = src.read([b.index for b in spec.bands], window=Window(c, r, size, size), boundless=True,
                            fill_value=0).astype(np.float32)
            out.append((data - mean) / std)
    return np.stack(out)


def export_onnx(checkpoint: Path, output: Path, *, tile: int | None = None, verify_with: Path | None = None,
                overwrite: bool = False) -> dict:
    """Write ``checkpoint`` as ONNX at ``output`` and verify it with ONNX Runtime; return the check's figures."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise CheckpointError("geoseg export --format onnx needs onnx and onnxruntime: "
                              "pip install 'geoseg[onnx]'") from None
    import torch

    from geoseg.models import build_model, load_checkpoint

    spec, state = load_checkpoint(checkpoint)
    model = build_model(spec, state)
    size = tile or spec.tile_size
    if size % spec.output_stride:
        raise InputError(f"--tile: {size} is not a multiple of the model's output stride {spec.output_stride}")
    tiles = _tiles(verify_with, spec, size)
    output = Path(output)
    with atomic_path(output, overwrite=overwrite) as tmp:
        # The TorchScript exporter: the torch.export one needs onnxscript, one more dependency for the same graph.
        torch.onnx.export(model, (torch.from_numpy(tiles[:1]),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["tiles"], output_names=["scores"],
                          dynamic_axes={"tiles": {0: "n", 2: "height", 3: "width"},
                                        "scores": {0: "n", 2: "height", 3: "width"}})
        graph = onnx.load(str(tmp))
        header = json.loads(spec.to_json())
        header.pop("provenance", None)
        for key, value in {"geoseg": json.dumps(header), "input": "normalised tiles (N, bands, H, W) float32: "
                           "(value - mean) / std per band", "output": "class scores (N, classes, H, W)"}.items():
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(graph, str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run(None, {"tiles": tiles})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(tiles)).numpy()
        agreement = float((got.argmax(1) == want.argmax(1)).mean())
        if agreement < AGREEMENT:
            raise CheckpointError(f"{checkpoint}: ONNX Runtime classifies only {agreement:.4%} of the check's "
                                  f"pixels as torch does (at least {AGREEMENT:.1%} needed); not exported")
    return {"path": str(output), "agreement": agreement, "max_abs_diff": float(np.abs(got - want).max()),
            "tiles": len(tiles), "tile": size, "verified_on": str(verify_with) if verify_with else "synthetic"}
