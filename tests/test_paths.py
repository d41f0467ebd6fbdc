"""Where napari-zoomin keeps files: the cache and the user data folder, both overridable."""

from __future__ import annotations

from pathlib import Path

import platformdirs

from napari_zoomin.paths import cache_dir, user_data_dir


def test_cache_dir_is_created_under_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_CACHE", str(tmp_path / "cache"))
    path = cache_dir("samples", "x")
    assert path == tmp_path / "cache" / "samples" / "x" and path.is_dir()


def test_user_data_dir_follows_the_override_and_is_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_ZOOMIN_DATA", str(tmp_path / "data"))
    path = user_data_dir("annotations")
    assert path == tmp_path / "data" / "annotations"
    assert not (tmp_path / "data").exists()


def test_user_data_dir_defaults_to_the_platform_folder(monkeypatch):
    monkeypatch.delenv("NAPARI_ZOOMIN_DATA", raising=False)
    base = platformdirs.user_data_dir("napari-zoomin")
    assert str(user_data_dir()) == base
    assert str(user_data_dir("models", "model")) == str(Path(base) / "models" / "model")
