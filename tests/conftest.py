"""Shared fixtures: real slides fetched by the project, and pyramids written from real pixels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fixtures_data import session_cache_root
from pyramid_files import write_ome_subifd, write_openslide_layout


def pytest_addoption(parser) -> None:
    """The digits end-to-end tests' run (tests/core/test_digits_e2e.py): CI uses the
    defaults; the robustness check reruns them over seeds and thread counts
    (benchmarks/README.md)."""
    group = parser.getgroup("napari-zoomin digits end-to-end")
    group.addoption("--digits-seed", type=int, default=0, help="training seed (default 0)")
    group.addoption(
        "--digits-threads",
        type=int,
        default=0,
        help="torch threads while training (default 0: torch's own default, as a user "
        "runs; 1 for the same arithmetic on any machine)",
    )


@pytest.fixture(scope="session", autouse=True)
def zoomin_cache(tmp_path_factory) -> Path:
    """The session's napari-zoomin cache: a temp folder, unless NAPARI_ZOOMIN_CACHE is set.

    Set NAPARI_ZOOMIN_CACHE to a lasting folder to reuse the fetched slide and the
    built sample slides between runs.
    """
    if os.environ.get("NAPARI_ZOOMIN_CACHE"):
        yield Path(os.environ["NAPARI_ZOOMIN_CACHE"])
        return
    root = session_cache_root(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_ZOOMIN_CACHE", str(root))
        yield root


@pytest.fixture(scope="session", autouse=True)
def zoomin_user_data(tmp_path_factory) -> Path:
    """The session's user-data folder (saved ROIs, models): a temp folder, so that tests
    never write into the user's own napari-zoomin folders."""
    root = tmp_path_factory.mktemp("user-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NAPARI_ZOOMIN_DATA", str(root))
        yield root


@pytest.fixture(scope="session")
def cmu_svs(zoomin_cache) -> Path:
    """The real CC0 Aperio slide CMU-1-Small-Region.svs, fetched and checksummed by the project."""
    from napari_zoomin.samples import fetch_cmu_small_region

    return fetch_cmu_small_region()


@pytest.fixture(scope="session")
def cmu_pixels(cmu_svs) -> np.ndarray:
    """Level 0 of the CMU slide as (2967, 2220, 3) uint8, decoded once."""
    return tifffile.imread(cmu_svs)


@pytest.fixture(scope="session")
def real_crop(cmu_pixels) -> np.ndarray:
    """2048 × 1536 real pixels: sides divisible by 4, so 2× levels have exact downsamples."""
    return np.ascontiguousarray(cmu_pixels[:2048, :1536])


@pytest.fixture(scope="session")
def pyramids(tmp_path_factory, real_crop) -> dict[tuple[str, str], Path]:
    """Three-level pyramids of real pixels in both layouts and both compressions."""
    folder = tmp_path_factory.mktemp("pyramids")
    files = {}
    for compression in ("jpeg", "zlib"):
        files["openslide", compression] = write_openslide_layout(
            folder / f"generic-{compression}.tif", real_crop, compression
        )
        files["ome", compression] = write_ome_subifd(
            folder / f"ome-{compression}.ome.tif", real_crop, compression
        )
    return files
