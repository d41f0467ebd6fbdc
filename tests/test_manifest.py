"""napari.yaml is THE manifest, for an editable install and for a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"


def test_editable_install_reads_the_top_level_manifest():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("napari-zoomin")
    assert manifest.display_name == "Zoom-In slide classifier"
    import napari_zoomin

    shipped = Path(napari_zoomin.__file__).with_name("napari.yaml")
    assert shipped.resolve() == MANIFEST.resolve()
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [bin_dir / "npe2", "validate", "napari-zoomin"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid" in done.stdout


@pytest.mark.slow
def test_built_wheel_ships_the_manifest_and_validates(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("napari_zoomin-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("napari_zoomin/napari.yaml") == MANIFEST.read_bytes()
        entry_points = zf.read(next(n for n in zf.namelist() if n.endswith("entry_points.txt")))
    assert b"napari-zoomin = napari_zoomin:napari.yaml" in entry_points

    scratch = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(scratch)
    py = scratch / "bin" / "python"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [py, "-m", "pip", "install", "-q", "-c", ROOT / "constraints.txt"]
    subprocess.run([*pip, "--no-deps", wheel], check=True, env=env, capture_output=True)
    subprocess.run([*pip, "npe2"], check=True, env=env, capture_output=True)
    done = subprocess.run(
        [scratch / "bin" / "npe2", "validate", "napari-zoomin"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Zoom-In slide classifier" in done.stdout and "valid" in done.stdout
    # and the manifest napari loads there is the wheel's copy, not the source tree's
    where = subprocess.run(
        [
            py,
            "-c",
            "import napari_zoomin, pathlib; "
            "print(pathlib.Path(napari_zoomin.__file__).with_name('napari.yaml'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=env,
    ).stdout.strip()
    assert str(scratch) in where and Path(where).read_bytes() == MANIFEST.read_bytes()
