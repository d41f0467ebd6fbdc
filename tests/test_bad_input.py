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
        "corrupt": (garbage, "the file is damaged"),  # its first directory is noise
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


# -- absurd pixel sizes: never used, always explained ------------------------------------

APERIO = "Aperio Image Library v12.0.5\n512x512 [0,0 512x512] (256x256) JPEG/RGB Q=70|AppMag = 20|"


def _svs(path, real_crop, mpp: str):
    """An Aperio-like tiled SVS whose description states ``MPP = mpp`` (OpenSlide: aperio)."""
    tifffile.imwrite(
        path,
        real_crop[:512, :512],
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        description=f"{APERIO}MPP = {mpp}|Date = 12/29/09",
        metadata=None,
    )
    return path


def _tiff(path, real_crop, resolution, unit="CENTIMETER"):
    """A tiled generic TIFF with these resolution tags (pixels per unit, or rationals)."""
    tifffile.imwrite(
        path,
        real_crop[:512, :512],
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=resolution,
        resolutionunit=unit,
    )
    return path


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
@pytest.mark.parametrize(
    ("mpp", "says"),
    [
        ("0", "says 0 µm per pixel"),
        ("-1", "says -1 µm per pixel"),
        ("inf", "says infinite µm per pixel"),
        ("1000", "says 1000 µm per pixel"),
        ("nan", "says NaN µm per pixel"),
        ("0.25 um", "says NaN µm per pixel"),  # not a number as written
    ],
)
def test_absurd_mpp_in_an_svs_is_not_used(tmp_path, real_crop, mpp, says, backend):
    path = _svs(tmp_path / "absurd.svs", real_crop, mpp)
    with open_slide(path, backend=backend) as s:
        assert s.vendor == "aperio"
        assert s.mpp is None
        assert says in s.mpp_warning and "MPP in the Aperio description" in s.mpp_warning
        assert "read in pixels" in s.mpp_warning and "\n" not in s.mpp_warning
        assert s.info()["mpp"] is None and s.info()["mpp_warning"] == s.mpp_warning
        assert s.read(0, 0, 0, 8, 8).shape == (8, 8, 3)  # and the slide still reads


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
@pytest.mark.parametrize(
    ("resolution", "says"),
    [
        ((10, 10), "says 1000 µm per pixel"),  # 10 pixels per cm
        (((0, 1), (0, 1)), "says infinite µm per pixel"),  # a resolution of 0
        ((20_000, 1), "0.5 µm per pixel across and 10000 µm down"),  # one axis absurd
    ],
)
def test_absurd_mpp_in_tiff_resolution_tags_is_not_used(
    tmp_path, real_crop, resolution, says, backend
):
    with open_slide(_tiff(tmp_path / "absurd.tif", real_crop, resolution), backend=backend) as s:
        assert s.mpp is None
        assert says in s.mpp_warning and "TIFF resolution tags" in s.mpp_warning


def test_absurd_mpp_in_ome_and_png(tmp_path, real_crop):
    from PIL import Image

    ome = tmp_path / "absurd.ome.tif"
    metadata = {"axes": "YXS", "PhysicalSizeX": 1000, "PhysicalSizeY": 1000}
    tifffile.imwrite(ome, real_crop[:512, :512], tile=(256, 256), metadata=metadata)
    with open_slide(ome) as s:
        assert s.mpp is None and "says 1000 µm per pixel (OME PhysicalSizeX/Y)" in s.mpp_warning
    png = tmp_path / "one-dpi.png"
    Image.fromarray(real_crop[:64, :64]).save(png, dpi=(1, 1))  # 25,400 µm per pixel
    with open_slide(png) as s:
        assert s.mpp is None and "(the image's dpi)" in s.mpp_warning
        assert "not a plausible scanner pixel size" in s.mpp_warning
    # image software's default 72 dpi is no statement: no pixel size and nothing to warn of
    Image.fromarray(real_crop[:64, :64]).save(png, dpi=(72, 72))
    with open_slide(png) as s:
        assert (s.mpp, s.mpp_warning) == (None, None)
    with open_slide(_tiff(tmp_path / "screen.tif", real_crop, (72, 72), "INCH")) as s:
        assert (s.mpp, s.mpp_warning) == (None, None)


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_anisotropic_mpp_is_kept_with_a_warning(tmp_path, real_crop, backend):
    path = _tiff(tmp_path / "stretched.tif", real_crop, (40_000, 20_000))  # x 0.25, y 0.5 µm
    with open_slide(path, backend=backend) as s:
        assert s.mpp == pytest.approx((0.5, 0.25))
        assert "0.25 µm wide and 0.5 µm high" in s.mpp_warning
        assert "differ by 100 %" in s.mpp_warning
    with open_slide(_tiff(tmp_path / "fine.tif", real_crop, (20_000, 19_000))) as s:
        assert s.mpp == pytest.approx((1e4 / 19_000, 0.5)) and s.mpp_warning is None  # 5 %


def test_plausible_mpp_has_no_warning(cmu_svs):
    with open_slide(cmu_svs) as s:
        assert s.mpp == pytest.approx((0.499, 0.499)) and s.mpp_warning is None
        assert s.info()["mpp_warning"] is None


def test_cli_info_shows_the_mpp_warning(tmp_path, real_crop, capsys):
    import json

    path = _svs(tmp_path / "absurd.svs", real_crop, "1000")
    assert main(["info", str(path)]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["mpp"] is None
    assert "says 1000 µm per pixel" in info["mpp_warning"]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("mpp", "problem"),
    [
        (0, "mpp=0 gives 0 µm per pixel, which is not a positive size"),
        (-1, "mpp=-1 gives -1 µm per pixel, which is not a positive size"),
        (float("nan"), "which is not a number"),
        (float("inf"), "infinite µm per pixel, which is not a finite size"),
        (1000, "1000 µm per pixel, which is not a plausible scanner pixel size"),
        ((0.25, 0.0), "which is not a positive size"),
        ("fast", "mpp='fast' is not a number"),
        ((0.25, 0.25, 0.25), "has 3 values"),
    ],
)
def test_absurd_mpp_given_by_the_user_is_an_error(cmu_svs, mpp, problem):
    for source in (cmu_svs, np.zeros((64, 64, 3), np.uint8)):
        with pytest.raises(SlideError) as info:
            open_slide(source, mpp=mpp)
        message = str(info.value)
        assert problem in message and "between 0.02 and 50" in message
        assert "\n" not in message
    with pytest.raises(SlideError, match=str(cmu_svs.name)):
        open_slide(cmu_svs, mpp=mpp)


def test_plausible_user_mpp_overrides_the_file(cmu_svs):
    with open_slide(cmu_svs, mpp=0.25) as s:
        assert s.mpp == (0.25, 0.25) and s.mpp_warning is None
    with open_slide(cmu_svs, mpp=(0.25, 0.5)) as s:
        assert s.mpp == (0.25, 0.5) and "differ by 100 %" in s.mpp_warning
