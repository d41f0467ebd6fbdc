"""Every bad input gives one clear error naming the file and the problem (API and CLI)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile

from napari_zoomin import SlideError, open_slide
from napari_zoomin.cli import main


def _zero_sized_tiff(path):
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), tile=(16, 16), photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["ImageLength"]
        offset, code = tag.valueoffset, {3: "H", 4: "I"}[int(tag.dtype)]
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + code, data, offset, 0)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def bad_files(tmp_path, pyramids, cmu_svs):
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    garbage = tmp_path / "noise.tif"
    # a valid TIFF header pointing at a directory of noise
    garbage.write_bytes(b"II*\x00\x08\x00\x00\x00" + np.random.default_rng(0).bytes(5000))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(pyramids["openslide", "jpeg"].read_bytes()[:200_000])
    truncated_svs = tmp_path / "truncated.svs"
    truncated_svs.write_bytes(cmu_svs.read_bytes()[:300_000])
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    odd = tmp_path / "slide.xyz"
    odd.write_bytes(b"whatever")
    folder = tmp_path / "folder.mrxs"
    folder.mkdir()
    return {
        "missing": (tmp_path / "missing.svs", "no such file"),
        "directory": (folder, "is a directory"),
        "non-image": (text, "not a readable slide"),
        "corrupt": (garbage, "not a readable slide"),
        "truncated": (truncated, "truncated"),
        "truncated-svs": (truncated_svs, "truncated"),
        "empty": (empty, "empty"),
        "extension": (odd, "unsupported file type '.xyz'"),
        "zero-sized": (_zero_sized_tiff(tmp_path / "zero.tif"), "zero size"),
    }


CASES = [
    "missing",
    "directory",
    "non-image",
    "corrupt",
    "truncated",
    "truncated-svs",
    "empty",
    "extension",
    "zero-sized",
]


@pytest.mark.parametrize("case", CASES)
def test_open_slide_error(bad_files, case):
    path, problem = bad_files[case]
    with pytest.raises(SlideError) as info:
        open_slide(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize("case", CASES)
def test_cli_error(bad_files, case, capsys):
    path, problem = bad_files[case]
    assert main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("zoomin: error: ") and str(path) in err and problem in err
    assert "Traceback" not in err


def test_truncated_tile_data_fails_at_read_not_hang(tmp_path, pyramids):
    """Damage inside a tile (not at the end): the read names file, level and region."""
    src = pyramids["openslide", "jpeg"]
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        offset = int(tif.pages[0].dataoffsets[0])
    data[offset : offset + 64] = b"\x00" * 64  # wipe the JPEG header of tile (0, 0)
    bad = tmp_path / "damaged.tif"
    bad.write_bytes(bytes(data))
    with open_slide(bad, backend="tifffile") as s, pytest.raises(SlideError) as info:
        s.read(0, 0, 0, 16, 16)
    assert "damaged.tif" in str(info.value) and "level 0" in str(info.value)


def test_unknown_backend(cmu_svs):
    with pytest.raises(SlideError, match="unknown backend 'vips'"):
        open_slide(cmu_svs, backend="vips")


def test_bad_array():
    with pytest.raises(SlideError, match="cannot use the array"):
        open_slide(np.zeros((4, 4, 4, 4)))
    with pytest.raises(SlideError, match="zero size"):
        open_slide(np.zeros((0, 10, 3), np.uint8))
