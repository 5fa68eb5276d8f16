"""Boundary refinement: the box sums and guided filter against independent computations, edges followed,
and through `geoseg run` seamless: chunked equals the whole scene at once, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from scipy.ndimage import uniform_filter

from geoseg.pipeline import run_pipeline
from geoseg.segment.refine import box_sum, guided_filter
from tests.conftest import pipeline_config


def _box_reference(a: np.ndarray, radius: int) -> np.ndarray:
    n = 2 * radius + 1
    pad = np.pad(a.astype(np.float64), ((radius, radius), (radius, radius)))
    return uniform_filter(pad, size=n, mode="constant")[radius:-radius, radius:-radius] * n * n


@pytest.mark.parametrize("radius", [1, 2, 4, 7])
def test_box_sums_are_window_sums_and_do_not_depend_on_where_the_array_starts(radius):  # noqa: ANN001
    a = np.random.default_rng(radius).random((53, 61)).astype(np.float32)
    got = box_sum(a, radius)
    np.testing.assert_allclose(got, _box_reference(a, radius), rtol=1e-5, atol=1e-4)
    h = 2 * radius
    part = box_sum(a[9:40, 5:50], radius)  # a chunk of the array: the same bits away from its edges
    assert np.array_equal(got[9 + h : 40 - h, 5 + h : 50 - h], part[h:-h, h:-h])


def test_a_flat_guide_gives_the_masked_mean_of_the_masked_means():
    """Without edges in the guide the filter is two masked box means (He et al., a = 0)."""
    rng = np.random.default_rng(0)
    p = rng.random((3, 30, 30)).astype(np.float32)
    p /= p.sum(0)
    mask = rng.random((30, 30)) > 0.2
    r = 2
    count = _box_reference(mask.astype(np.float32), r)
    mean_p = np.stack([_box_reference(c * mask, r) for c in p]) / np.maximum(count, 1)
    expected = np.stack([_box_reference(c * mask, r) for c in mean_p]) / np.maximum(count, 1) * mask
    expected = np.where(mask, expected / np.where(mask, expected.sum(0), 1), 0)
    got = guided_filter(p, np.full((30, 30), 0.3, np.float32), mask, r, 0.01)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.allclose(got.sum(0)[mask], 1, atol=1e-6) and not got[:, ~mask].any()


def test_class_edges_move_to_the_image_edge():
    rng = np.random.default_rng(1)
    cols = np.broadcast_to(np.arange(40), (40, 40))
    guide = np.where(cols < 20, 1.0, -1.0) + rng.normal(0, 0.05, (40, 40))
    p0 = np.clip(np.where(cols < 21, 0.8, 0.2) + rng.normal(0, 0.05, (40, 40)), 0.01, 0.99)  # a pixel off
    p = np.stack([p0, 1 - p0]).astype(np.float32)
    truth = (cols >= 20).astype(int)
    q = guided_filter(p, guide.astype(np.float32), np.ones((40, 40), bool), 2, 0.01)
    assert (p.argmax(0) == truth).mean() == 0.975 and (q.argmax(0) == truth).all()


def test_refinement_is_seamless_and_does_not_depend_on_chunking(tmp_path, client, unet_checkpoint):  # noqa: ANN001
    """Chunks of one or two tiles give the bytes of refining the whole scene at once (the validation path)."""
    from geoseg.config import SegmentConfig
    from geoseg.models import build_model, load_checkpoint
    from geoseg.sample import make_sample
    from geoseg.train import predict_region
    from geoseg.training_data import Region

    sample = make_sample(tmp_path / "s", 300, seed=12, width=260)
    with rasterio.open(sample.image) as src:
        image, valid = src.read().astype(np.float32), src.read_masks(1) > 0
    tile, refine = {"size": 64, "overlap": 16}, {"refine": {"method": "guided", "radius": 3}}
    # one tile per batch and one thread, so the probabilities themselves do not depend on the chunking
    infer = {"precision": "fp32", "batch_size": 1, "torch_threads": 1}

    def run(name, chunk_tiles, stitch):  # noqa: ANN001
        cfg = pipeline_config(sample.image, unet_checkpoint, tmp_path / name, stitch=stitch,
                              tile={**tile, "chunk_tiles": chunk_tiles}, infer=infer,
                              vectorize={"enabled": False}, write={"confidence": "float16"})
        result = run_pipeline(cfg, client=client)
        with rasterio.open(result.landcover) as a, rasterio.open(result.outputs["confidence"]) as b:
            return a.read(1), b.read(1)

    one, one_conf = run("a", 1, refine)
    two, two_conf = run("b", 2, refine)
    assert np.array_equal(one, two) and np.array_equal(one_conf, two_conf)
    plain, _ = run("c", 2, {})
    changed = (one != plain) & valid
    assert 0 < changed.mean() < 0.5  # it moves boundaries (an untrained net: a noisy map), not every class
    spec, state = load_checkpoint(unet_checkpoint)
    seg = SegmentConfig(model=unet_checkpoint, tile=tile, stitch=refine, infer=infer)
    whole = predict_region(build_model(spec, state), Region(image, np.zeros(valid.shape, np.uint8), "s", valid=valid),
                           spec, seg, threads=1)
    assert np.array_equal(np.where(whole < 0, 255, spec.classes.index_to_id()[whole.clip(0)]), one)
