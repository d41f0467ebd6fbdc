"""The zoomin command line on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from napari_zoomin.cli import main


def test_info_prints_json(cmu_svs, capsys):
    assert main(["info", str(cmu_svs)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vendor"] == "aperio"
    assert info["level_shapes"] == [[2967, 2220]]
    assert info["mpp"] == [0.499, 0.499]
    assert info["associated_images"] == ["label", "macro", "thumbnail"]


def test_info_forced_backend(pyramids, capsys):
    path = str(pyramids["openslide", "zlib"])
    assert main(["info", path, "--backend", "openslide"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backend"] == "openslide" and info["level_count"] == 3
    assert main(["info", path]) == 0
    assert json.loads(capsys.readouterr().out)["backend"] == "tifffile"


def test_console_script_is_installed(cmu_svs):
    """The `zoomin` entry point of the installed package, as a user runs it."""
    exe = Path(sys.executable).parent / "zoomin"
    done = subprocess.run([exe, "info", str(cmu_svs)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["vendor"] == "aperio"
    bad = subprocess.run([exe, "info", "/no/such/slide.svs"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "zoomin: error: /no/such/slide.svs: no such file. Check the path."
