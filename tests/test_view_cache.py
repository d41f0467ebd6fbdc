"""The training run's stage-1 view cache: bit-identical views, decoded once per run.

Real pyramids of real pixels (the CMU slide's crop), real decode counters: a read served
from the cache decodes no tile of the view's level.
"""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

from napari_zoomin.engine.checkpoints import load_checkpoint
from napari_zoomin.engine.dataset import SlideDataset, SlideRecord
from napari_zoomin.engine.slide_source import SlideSource
from napari_zoomin.engine.view_cache import ViewCache, view_cache_folder
from napari_zoomin.models.source import full_region, read_view
from napari_zoomin.samples.pyramid import write_array_pyramid
from napari_zoomin.slide import open_slide
from napari_zoomin.training import EpochStep, TrainConfig, Validated, train
from napari_zoomin.training.history import history_csv_path
from napari_zoomin.training.resume import last_checkpoint_path
from test_trainer import tiny as trainer_tiny

CLASSES = ["negative", "positive"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-for-bit comparisons of training runs need the same threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def variant(pixels: np.ndarray, k: int) -> np.ndarray:
    """Six different slides from one real crop (flips, and a colour-channel order)."""
    out = pixels[:: -1 if k & 1 else 1, :: -1 if k & 2 else 1]
    return np.ascontiguousarray(out[..., ::-1] if k & 4 else out)


@pytest.fixture(scope="module")
def slides(tmp_path_factory, real_crop) -> list:
    """Six 2048 × 1536 JPEG pyramids of real pixels, seven levels: the view at 1/16 is
    level 4 (one 256² tile), which nothing else reads (tissue detection reads level 6)."""
    folder = tmp_path_factory.mktemp("view-cache-slides")
    paths = []
    for k in range(6):
        path = folder / f"s{k}.tif"
        write_array_pyramid(path, variant(real_crop, k), tile=256, n_levels=7, mpp=0.5)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def records(slides) -> list[SlideRecord]:
    splits = ["train"] * 4 + ["val"] * 2
    return [
        SlideRecord(p, CLASSES[k % 2], k % 2, split, None, k + 2)
        for k, (p, split) in enumerate(zip(slides, splits, strict=True))
    ]


@pytest.mark.parametrize(
    ("scale", "model_mpp"),
    [(1 / 16, None), (1 / 10, None), (1 / 16, 0.7), (1 / 8, 0.45)],
    ids=["level-exact", "area-resampled", "coarser-model-pixels", "finer-model-pixels"],
)
def test_a_cached_view_is_bit_identical_and_decodes_nothing(slides, tmp_path, scale, model_mpp):
    """Cold (decoded and written) and warm (memory-mapped) views equal ``read`` and
    ``read_bytes`` of the full region bit for bit, in the slide's or model pixels; a
    warm read decodes no tile; a read of anything else goes to the pyramid."""
    cache = ViewCache(tmp_path / "views", scale)
    with open_slide(slides[0], cache_bytes=0) as slide:
        plain = SlideSource(slide, model_mpp=model_mpp)
        expected = plain.read(full_region(plain), scale)
        expected_bytes = plain.read_bytes(full_region(plain), scale)
        if scale == 1 / 16 and model_mpp is None:
            assert expected_bytes is not None  # the level itself: 8-bit as stored
            assert torch.equal(expected_bytes.float() / 255, expected)
        for round_ in ("cold", "warm"):
            source = SlideSource(slide, model_mpp=model_mpp, view_cache=cache)
            before = sum(slide.decoded_pixels.values())
            got = source.read(full_region(source), scale)
            got_bytes = source.read_bytes(full_region(source), scale)
            assert got.dtype == torch.float32 and torch.equal(got, expected), round_
            if expected_bytes is None:
                assert got_bytes is None
            else:
                assert got_bytes.dtype == torch.uint8 and torch.equal(got_bytes, expected_bytes)
            decoded = sum(slide.decoded_pixels.values()) - before
            if round_ == "warm":
                assert decoded == 0
        assert (cache.stats.written, cache.stats.hits) == (1, 3)
        (entry,) = (tmp_path / "views").glob("*.npy")
        stored = np.load(entry)
        assert stored.dtype == np.uint8 and entry.stat().st_size - stored.nbytes < 256
        assert cache.stats.bytes_written == stored.nbytes
        # another region, or the whole slide at another scale: from the pyramid
        source = SlideSource(slide, model_mpp=model_mpp, view_cache=cache)
        h, w = source.shape
        part = torch.tensor([[0, 0, h // 2, w]])
        assert torch.equal(source.read(part, scale), plain.read(part, scale))
        assert torch.equal(
            source.read(full_region(source), scale / 2), plain.read(full_region(plain), scale / 2)
        )
        assert (cache.stats.written, cache.stats.hits) == (1, 3)


def test_a_changed_slide_is_never_served_its_old_view(slides, real_crop, tmp_path):
    """Rewriting the slide with other pixels (same name, same shape) gives the new view
    and replaces the old entry."""
    path = tmp_path / "changing.tif"
    write_array_pyramid(path, variant(real_crop, 0), tile=256, n_levels=5)
    cache = ViewCache(tmp_path / "views", 1 / 16)
    with open_slide(path) as slide:
        old = read_view(SlideSource(slide, view_cache=cache), 1 / 16)
    write_array_pyramid(path, variant(real_crop, 3), tile=256, n_levels=5)
    with open_slide(path) as slide:
        fresh = read_view(SlideSource(slide), 1 / 16)
        got = read_view(SlideSource(slide, view_cache=cache), 1 / 16)
        again = read_view(SlideSource(slide, view_cache=cache), 1 / 16)
    assert not torch.equal(old, fresh)
    assert torch.equal(got, fresh) and torch.equal(again, fresh)
    assert (cache.stats.written, cache.stats.hits) == (2, 1)
    assert len(list((tmp_path / "views").glob("*.npy"))) == 1  # the stale one is gone


def test_views_over_the_limit_or_an_unwritable_folder_are_read_from_the_pyramid(
    slides, tmp_path, caplog
):
    """Too large: not cached, said once per slide.  A folder that cannot be made: the
    cache turns itself off for the run, said once.  The pixels are right either way."""
    with open_slide(slides[1]) as slide:
        expected = read_view(SlideSource(slide), 1 / 16)
        small = ViewCache(tmp_path / "small", 1 / 16, max_bytes=1000)  # the view: 36,864 B
        (tmp_path / "taken").write_text("a file where the folder would go")
        broken = ViewCache(tmp_path / "taken" / "views", 1 / 16)
        with caplog.at_level(logging.WARNING, logger="napari_zoomin.engine.view_cache"):
            for cache in (small, broken):
                for _ in range(3):
                    got = read_view(SlideSource(slide, view_cache=cache), 1 / 16)
                    assert torch.equal(got, expected)
    assert not (tmp_path / "small").exists() or not list((tmp_path / "small").iterdir())
    assert small.stats.skipped == 3 and small.stats.written == 0
    assert broken.stats.skipped == 1 and broken.stats.written == 0  # then off
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "view is 36,864 bytes, more than the 1,000 bytes" in messages[0]
    assert str(slides[1]) in messages[0]
    assert "cannot be written" in messages[1] and "cache_views" in messages[1]


# -- training ---------------------------------------------------------------------------


def tiny(**overrides) -> TrainConfig:
    """test_trainer's tiny model at s1 = 1/16."""
    return trainer_tiny(**{"view_scale": 1 / 16, **overrides})


_TISSUE: dict = {}


def dataset(records) -> SlideDataset:
    """No tile cache, every slide kept open: without the view cache, every epoch decodes
    every view again, and each slide's decode counter spans the run."""
    return SlideDataset(
        records, CLASSES, workers=1, cache_bytes=0, max_open=len(records), tissue_masks=_TISSUE
    )


VIEW_LEVEL = 4  # 1/16 of level 0: one tile per slide


def run(records, out, config, **kwargs):
    """Train; per finished epoch, the tiles of the view's level decoded so far."""
    data = dataset(records)
    decoded: list[int] = []

    def progress(event):
        if isinstance(event, Validated):
            slides = [data.sources([i])[0].slide for i in range(len(records))]
            decoded.append(sum(s.decoded_tiles.get(VIEW_LEVEL, 0) for s in slides))
        if kwargs.get("progress"):
            kwargs["progress"](event)

    options = {k: v for k, v in kwargs.items() if k != "progress"}
    with data:
        result = train(data, config, out, progress=progress, **options)
    return result, decoded


def without_timing(history):
    return [
        {k: v for k, v in h.items() if k not in ("seconds", "slides_per_minute")} for h in history
    ]


def test_training_decodes_each_view_once_and_learns_the_same(records, tmp_path):
    """With the cache the second epoch decodes no stage-1 pixel (without it, it decodes
    every view again); both runs give the same history and weights; slides per minute
    is in the history and its CSV."""
    cached, cached_decoded = run(records, tmp_path / "c" / "m.safetensors", tiny())
    plain, plain_decoded = run(records, tmp_path / "p" / "m.safetensors", tiny(cache_views=False))
    # epoch 1 decodes every view once (4 training, 2 validation slides), epoch 2 none;
    # without the cache, every epoch decodes every view again
    assert cached_decoded == [6, 6]
    assert plain_decoded[0] >= 6 and plain_decoded[1] - plain_decoded[0] >= 6
    assert without_timing(cached.history) == without_timing(plain.history)  # bit for bit
    a = load_checkpoint(last_checkpoint_path(tmp_path / "c" / "m.safetensors")).model.state_dict()
    b = load_checkpoint(last_checkpoint_path(tmp_path / "p" / "m.safetensors")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    folder = view_cache_folder(tmp_path / "c" / "m.safetensors")
    assert folder == tmp_path / "c" / "m.views" and len(list(folder.glob("*.npy"))) == 6
    assert not view_cache_folder(tmp_path / "p" / "m.safetensors").exists()
    # 4 training slides per epoch, over the epoch's time: at most the time since the
    # previous record (``seconds`` is the run's time so far)
    first, second = (h["slides_per_minute"] for h in cached.history)
    seconds = [h["seconds"] for h in cached.history]
    assert first >= 4 * 60 / seconds[0] and second >= 4 * 60 / (seconds[1] - seconds[0])
    with open(history_csv_path(tmp_path / "c" / "m.safetensors"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["slides_per_minute"]) for r in rows] == [
        h["slides_per_minute"] for h in cached.history
    ]


def test_a_run_resumes_across_the_switch_and_a_warm_cache(records, tmp_path):
    """Cancelled mid-epoch without the cache, resumed with it (the setting may change:
    it changes no weight): the weights of an uninterrupted run; a run resumed on a warm
    cache decodes no view at all (a new dataset, new slide objects: the disk serves it)."""
    straight, _ = run(records, tmp_path / "s" / "m.safetensors", tiny())
    out = tmp_path / "r" / "m.safetensors"
    steps = []

    def count(event):
        if isinstance(event, EpochStep):
            steps.append(event)

    first, _ = run(
        records, out, tiny(cache_views=False), progress=count, cancel=lambda: len(steps) == 3
    )
    assert first.cancelled and len(first.history) == 1
    resumed, decoded = run(records, out, tiny())
    assert len(resumed.history) == 2
    assert without_timing(resumed.history) == without_timing(straight.history)
    a = load_checkpoint(last_checkpoint_path(tmp_path / "s" / "m.safetensors")).model.state_dict()
    b = load_checkpoint(last_checkpoint_path(out)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert decoded == [4]  # the rest of epoch 2 (its second step, validation): once each
    # epoch 3 decodes the two views the resumed part had not read (epoch 2's first
    # step ran without the cache), epoch 4 none
    _, warm = run(records, out, tiny(epochs=3))
    assert warm == [2]
    _, warm = run(records, out, tiny(epochs=4))
    assert warm == [0]
