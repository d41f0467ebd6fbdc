"""Hostile and broken files through the public entry points (issue 21, part 1).

Each case of ``tests/hostile_files.py`` must end, within a time limit, in a clear
error (or warning) that names the file: no traceback, no hang, no file left behind,
the input unchanged.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hostile_files import ANNOTATIONS, LABELS, SLIDES, Hostile, tissue
from napari_zoomin import SlideError
from napari_zoomin.errors import AnnotationError, LabelsError, ZoominError

#: seconds one case may take (a hang fails the case instead of freezing the suite)
LIMIT_S = 10.0


def within_limit(call, limit: float = LIMIT_S):
    """``call()`` in a daemon thread: its result, its exception, or a failure after ``limit`` s."""
    box: dict = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    start = time.perf_counter()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        pytest.fail(f"still running after {limit:.0f} s (a hang)")
    box["seconds"] = time.perf_counter() - start
    return box


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with the hash of regular files (FIFOs are not read)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink() or not p.is_file():
            out[str(p)] = "-"
            continue
        if p.stat().st_size > 2**26:  # a sparse file: its size and head are enough
            with open(p, "rb") as fh:
                out[str(p)] = f"{p.stat().st_size}:{hashlib.sha256(fh.read(4096)).hexdigest()}"
            continue
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _names_file(message: str, path: Path) -> bool:
    return str(path) in message or (len(path.name) > 3 and path.name[:60] in message)


@pytest.fixture
def folder(tmp_path) -> Path:
    path = tmp_path / "corpus"
    path.mkdir()
    return path


# --------------------------------------------------------------------------- slides


@pytest.mark.parametrize("case", SLIDES, ids=repr)
def test_hostile_slide(case: Hostile, folder: Path, capfd):
    from napari_zoomin import open_slide
    from napari_zoomin.cli import main

    path = case.build(folder)
    before = _fingerprint(folder)

    def open_and_read():
        with open_slide(path) as slide:
            warnings = list(getattr(slide, "warnings", ()) or [slide.mpp_warning or ""])
            if case.expect == "read-refused":
                rows, cols = slide.shape
                slide.read(0, 0, 0, rows, cols)
            return warnings

    box = within_limit(open_and_read)
    error = box.get("error")
    if case.expect in ("refused", "read-refused"):
        assert isinstance(error, SlideError), f"expected a SlideError, got {error!r}"
        message = str(error)
        assert _names_file(message, path), message
        assert case.says in message, message
        assert "\n" not in message.strip()
    elif case.expect == "warned":
        assert error is None, repr(error)
        assert any(case.says in w for w in box["value"]), box["value"]
    else:
        assert error is None, repr(error)

    box = within_limit(lambda: main(["info", str(path)]))
    assert "error" not in box, repr(box.get("error"))
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    if case.expect == "refused":
        assert box["value"] == 1
        assert err.startswith("zoomin: error: ") and _names_file(err, path), err
        assert out == ""
    else:
        assert box["value"] == 0, err
        info = json.loads(out)
        if case.expect == "warned":
            assert any(case.says in w for w in info.get("warnings", [info["mpp_warning"]]))
    assert _fingerprint(folder) == before  # input unchanged, nothing left behind


# --------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import torch

    from fixtures_data import TINY_ZOOMIN
    from napari_zoomin.engine.checkpoints import build_model, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "zoomin.safetensors"
    return save_checkpoint(path, build_model("zoomin", TINY_ZOOMIN), ["negative", "positive"])


CLASSIFIED = [c for c in SLIDES if c.expect in ("read-refused", "warned")] + [
    c for c in SLIDES if c.name in ("truncated-lost-level", "tile-counts-zero", "ifd-self-loop-svs")
]


@pytest.mark.parametrize("case", CLASSIFIED, ids=repr)
def test_hostile_slide_classify(case: Hostile, folder: Path, tiny_model, capfd, tmp_path):
    """Damaged pixels are an error naming the file (never "no tissue detected"), and an
    implausible pixel size reaches ``result.json``'s warnings."""
    from napari_zoomin.cli import main

    path = case.build(folder)
    before = _fingerprint(folder)
    out_dir = tmp_path / "out"
    argv = ["classify", str(path), "--model", str(tiny_model), "--out", str(out_dir)]
    box = within_limit(lambda: main([*argv, "--device", "cpu", "--draws", "1"]), 30)
    assert "error" not in box, repr(box.get("error"))
    _, err = capfd.readouterr()
    assert "Traceback" not in err
    if case.expect == "warned":
        assert box["value"] == 0, err
        result = json.loads((out_dir / "result.json").read_text())
        assert any(case.says in w for w in result["warnings"]), result["warnings"]
    else:
        assert box["value"] == 1, err
        assert _names_file(err, path) and case.says in err, err
        assert "no tissue" not in err.lower()
        assert not out_dir.exists() or not any(out_dir.iterdir())
    assert _fingerprint(folder) == before


# --------------------------------------------------------------------------- annotations


@pytest.mark.parametrize("case", ANNOTATIONS, ids=repr)
def test_hostile_annotation(case: Hostile, folder: Path, capfd):
    from napari_zoomin.annotations import rasterize, read_annotations

    path = case.build(folder)
    before = _fingerprint(folder)

    def read_and_rasterize():
        annotations = read_annotations(path)
        return rasterize(annotations, (8192, 8192), 1 / 16)

    box = within_limit(read_and_rasterize)
    error = box.get("error")
    if case.expect == "refused":
        assert isinstance(error, AnnotationError), f"expected an AnnotationError, got {error!r}"
        message = str(error)
        assert _names_file(message, path) and case.says in message, message
        assert "\n" not in message.strip()
    else:
        assert error is None, repr(error)
        assert box["value"].shape == (512, 512)
    _, err = capfd.readouterr()
    assert "Traceback" not in err
    assert _fingerprint(folder) == before


def test_rasterising_a_scrambled_polygon_is_bounded(capfd):
    """2 x 10^5 random vertices built in code (not read from a file): refused quickly
    with a clear error or rasterised within bounded memory, never a 10 GB allocation."""
    import tracemalloc

    from napari_zoomin.annotations import Annotation, rasterize

    ring = np.random.default_rng(0).uniform(0, 8192, (200_000, 2))
    annotation = Annotation(ring)
    tracemalloc.start()
    box = within_limit(lambda: rasterize([annotation], (8192, 8192), 1 / 16))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**30, f"peak {peak / 2**30:.1f} GiB"
    error = box.get("error")
    assert error is None or (isinstance(error, ValueError) and "vertices" in str(error)), error


def test_a_detailed_outline_still_rasterises():
    """A real, very detailed outline (10^5 vertices on a circle) reads and rasterises."""
    from napari_zoomin.annotations import Annotation, rasterize

    t = 2 * np.pi * np.arange(100_000) / 100_000
    ring = np.stack([4096 + 3000 * np.cos(t), 4096 + 3000 * np.sin(t)], axis=1)
    mask = rasterize([Annotation(ring)], (8192, 8192), 1 / 16)
    assert mask.sum() == pytest.approx(np.pi * (3000 / 16) ** 2, rel=1e-3)


# --------------------------------------------------------------------------- labels CSV


@pytest.mark.parametrize("case", LABELS, ids=repr)
def test_hostile_labels(case: Hostile, folder: Path, capfd):
    from napari_zoomin.engine.dataset import read_labels

    path = case.build(folder)
    before = _fingerprint(folder)
    box = within_limit(lambda: read_labels(path, folder / "slides"))
    error = box.get("error")
    if case.expect == "refused":
        assert isinstance(error, LabelsError), f"expected a LabelsError, got {error!r}"
        message = str(error)
        assert _names_file(message, path) and case.says in message, message
    else:
        assert error is None, repr(error)
        records, _ = box["value"]
        slides = (folder / "slides").absolute()
        assert all(
            str(r.path).startswith(str(slides)) or r.path.parent.name == "store" for r in records
        )
    _, err = capfd.readouterr()
    assert "Traceback" not in err
    assert _fingerprint(folder) == before


def test_corpus_size():
    assert len(SLIDES) + len(ANNOTATIONS) + len(LABELS) >= 90
    assert isinstance(tissue(), np.ndarray) and ZoominError
