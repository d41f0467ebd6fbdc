"""DICOM whole-slide images: the real CMU-1-Small-Region series, fetched by the project.

The series (volume 2,220 × 2,967 in 240 × 240 JPEG frames, plus label, overview and
thumbnail) comes from napari-wsi's source distribution through
:func:`fetch_cmu_small_region_dicom`, checksummed and cached outside the repo.  Bad
inputs are built at test time from its files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_zoomin.cli import main
from napari_zoomin.errors import SlideError
from napari_zoomin.slide import open_slide, slide_of
from napari_zoomin.slide.dicom import volume_instance

UID = "1.2.826.0.1.3680043.8.498."
LABEL = UID + "46702941076792458794464453066648511350.dcm"
VOLUME = UID + "58740178995208579534253317996600852419.dcm"
THUMBNAIL = UID + "59138772023963819382497555356965497339.dcm"
OVERVIEW = UID + "59317222794345851838438403002169487918.dcm"
SERIES = UID + "21577574112843936045397065457192622591"


@pytest.fixture(scope="session")
def cmu_dicom(zoomin_cache) -> Path:
    """The folder of the real DICOM CMU-1-Small-Region series (four instances)."""
    from napari_zoomin.samples import fetch_cmu_small_region_dicom

    return fetch_cmu_small_region_dicom()


def _copy(cmu_dicom: Path, dest: Path, names=(LABEL, VOLUME, THUMBNAIL, OVERVIEW)) -> Path:
    dest.mkdir(parents=True)
    for name in names:
        shutil.copyfile(cmu_dicom / name, dest / name)
    return dest


def _luma(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    return 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R BT.601, JPEG's Y


def _jpeg_sampling(stream: bytes) -> list[tuple[int, int]]:
    """(h, v) sampling factors of each component in a baseline JPEG's SOF0 marker."""
    i = 2
    while i < len(stream):
        marker, length = stream[i + 1], int.from_bytes(stream[i + 2 : i + 4], "big")
        if marker == 0xC0:
            n = stream[i + 9]
            return [(stream[i + 11 + 3 * k] >> 4, stream[i + 11 + 3 * k] & 15) for k in range(n)]
        i += 2 + length
    raise AssertionError("no SOF0 marker")


# -- the fetched data ------------------------------------------------------------------
def test_fetch_verifies_the_four_instances_and_reuses_them(cmu_dicom, monkeypatch):
    from napari_zoomin.samples import CMU_SMALL_REGION_DICOM, fetch_cmu_small_region_dicom

    assert sorted(p.name for p in cmu_dicom.iterdir()) == [LABEL, VOLUME, THUMBNAIL, OVERVIEW]
    for spec in CMU_SMALL_REGION_DICOM:
        data = (cmu_dicom / Path(spec.filename).name).read_bytes()
        assert len(data) == spec.size and hashlib.md5(data).hexdigest() == spec.md5

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cached copies are good")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch_cmu_small_region_dicom(download=False) == cmu_dicom


# -- opening -----------------------------------------------------------------------------
@pytest.mark.parametrize("given", [None, LABEL, VOLUME, THUMBNAIL, OVERVIEW])
def test_folder_or_any_instance_opens_the_same_slide(cmu_dicom, given):
    path = cmu_dicom if given is None else cmu_dicom / given
    assert volume_instance(path) == cmu_dicom / VOLUME
    with open_slide(path) as slide:
        info = slide.info()
    assert {k: v for k, v in info.items() if k != "warnings"} == {
        "path": str(path),
        "backend": "openslide",
        "vendor": "dicom",
        "level_count": 1,
        "level_shapes": [[2967, 2220]],
        "level_downsamples": [1.0],
        "tile_shapes": [[240, 240]],
        "derived_levels": [],
        "mpp": [0.499, 0.499],
        "mpp_warning": None,
        "associated_images": ["label", "macro", "thumbnail"],
    }


def test_associated_images_come_from_the_other_instances(cmu_dicom):
    with open_slide(cmu_dicom) as slide:
        shapes = {name: slide.associated_image(name).shape for name in slide.associated_names}
    assert shapes == {"label": (463, 387, 3), "macro": (431, 1280, 3), "thumbnail": (768, 574, 3)}


def test_level0_is_the_stored_jpeg_frames_exactly(cmu_dicom):
    """Every level-0 pixel equals the volume's frames decoded independently (pydicom
    finds the frames, imagecodecs' libjpeg-turbo decodes them)."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(cmu_dicom / VOLUME)
    rows, cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
    th, tw = int(ds.Rows), int(ds.Columns)
    across = -(-cols // tw)
    canvas = np.zeros((-(-rows // th) * th, across * tw, 3), np.uint8)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert len(frames) == 130 == 13 * 10
    for i, frame in enumerate(frames):  # TILED_FULL: row-major frames
        ty, tx = divmod(i, across)
        canvas[ty * th : (ty + 1) * th, tx * tw : (tx + 1) * tw] = imagecodecs.jpeg8_decode(frame)
    expected = canvas[:rows, :cols]
    with open_slide(cmu_dicom) as slide:
        np.testing.assert_array_equal(slide.read(0, 0, 0, rows, cols), expected)
        # a region across frame borders, at an offset that is no multiple of 240
        np.testing.assert_array_equal(
            slide.read(0, 1001, 777, 300, 500), expected[1001:1301, 777:1277]
        )


def test_level0_agrees_with_the_svs_of_the_same_scan(cmu_dicom, cmu_svs):
    """The DICOM frames were re-encoded from the SVS tiles, so pixels cannot be equal.

    The SVS tiles are JPEG of RGB components at full resolution (Aperio "JPEG/RGB",
    sampling 1x1 for all three); the DICOM frames are YCbCr JPEG with 4:2:0 chroma
    (2x2, 1x1, 1x1; the header lists two lossy steps).  Brightness (JPEG's Y) agrees to
    0.38 grey levels on average; colour differs where the halved chroma blurs edges.
    Measured: luma mean |d| 0.381, max 16.5; RGB mean |d| 2.89, PSNR 33.1 dB; moving
    the DICOM by one pixel makes RGB mean |d| 6.2 or more, so the grids coincide.
    """
    import pydicom
    import tifffile
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(cmu_dicom / VOLUME)
    first = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert _jpeg_sampling(first) == [(2, 2), (1, 1), (1, 1)]
    with tifffile.TiffFile(cmu_svs) as tif:
        page = tif.pages[0]
        tif.filehandle.seek(page.dataoffsets[0])
        tile = tif.filehandle.read(page.databytecounts[0])
    assert _jpeg_sampling(tile) == [(1, 1), (1, 1), (1, 1)]

    with open_slide(cmu_dicom) as dcm, open_slide(cmu_svs) as svs:
        assert dcm.shape == svs.shape == (2967, 2220) and dcm.mpp == svs.mpp
        a = dcm.read(0, 0, 0, *dcm.shape).astype(np.float64)
        b = svs.read(0, 0, 0, *svs.shape).astype(np.float64)
    luma = np.abs(_luma(a) - _luma(b))
    assert luma.mean() < 0.45 and luma.max() < 20
    psnr = 10 * np.log10(255**2 / np.mean((a - b) ** 2))
    assert psnr > 32.5
    aligned = np.abs(a[1:-1, 1:-1] - b[1:-1, 1:-1]).mean()
    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
        shifted = np.abs(
            a[1 + dy : a.shape[0] - 1 + dy, 1 + dx : a.shape[1] - 1 + dx] - b[1:-1, 1:-1]
        )
        assert shifted.mean() > 2 * aligned


# -- front ends --------------------------------------------------------------------------
def test_cli_info_on_the_folder_and_on_a_label_instance(cmu_dicom, capsys):
    for path in (cmu_dicom, cmu_dicom / LABEL):
        assert main(["info", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["vendor"] == "dicom" and info["level_shapes"] == [[2967, 2220]]
        assert info["mpp"] == [0.499, 0.499] and info["path"] == str(path)


@pytest.mark.slow  # the demo model on a real slide: about 15 s each
@pytest.mark.parametrize("given", [None, THUMBNAIL])
def test_cli_classify_runs_on_the_folder_and_on_a_dcm_file(cmu_dicom, tmp_path, capsys, given):
    path = cmu_dicom if given is None else cmu_dicom / given
    out = tmp_path / "out"
    assert main(["classify", str(path), "--out", str(out), "--draws", "2"]) == 0
    assert "over 2 draws" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["slide"]["path"] == str(path)
    assert result["slide"]["vendor"] == "dicom" and result["slide"]["shape"] == [2967, 2220]
    assert result["resolution"]["slide_mpp"] == [0.499, 0.499]
    assert result["draws"] == 2
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["decode"]["decoded_tiles_by_level"]["0"] > 0


def test_a_dicom_folder_is_one_slide_for_batch_and_labels(cmu_dicom, cmu_svs, tmp_path):
    from napari_zoomin.engine.batch import discover_slides
    from napari_zoomin.engine.dataset import read_labels

    cohort = tmp_path / "cohort"
    _copy(cmu_dicom, cohort / "case-a")
    _copy(cmu_dicom, cohort / "nested" / "case-b")
    shutil.copyfile(cmu_svs, cohort / "case-c.svs")
    assert discover_slides(cohort) == [cohort / "case-a", cohort / "case-c.svs"]
    assert discover_slides(cohort, recursive=True) == [
        cohort / "case-a",
        cohort / "case-c.svs",
        cohort / "nested" / "case-b",
    ]
    assert discover_slides(cohort, pattern="*/*.dcm") == [cohort / "case-a"]
    # the batch folder itself is one DICOM slide
    assert discover_slides(cohort / "case-a") == [cohort / "case-a"]
    assert slide_of(cohort / "case-a" / LABEL) == cohort / "case-a"
    assert slide_of(cohort / "nested") is None

    (cohort / "labels.csv").write_text(
        f"slide,label\ncase-a,negative\nnested/case-b,positive\ncase-a/{VOLUME},positive\n"
    )
    records, classes = read_labels(cohort / "labels.csv", cohort, val_fraction=0.0)
    assert [r.path for r in records] == [
        cohort / "case-a",
        cohort / "nested" / "case-b",
        cohort / "case-a" / VOLUME,
    ]
    assert classes == ["negative", "positive"]


# -- bad input ---------------------------------------------------------------------------
def _refused(path: Path, *, backend=None) -> str:
    with pytest.raises(SlideError) as info:
        open_slide(path, backend=backend)
    return str(info.value)


def test_a_label_without_its_volume_is_refused_in_words(cmu_dicom, tmp_path):
    folder = _copy(cmu_dicom, tmp_path / "label-only", names=(LABEL,))
    message = _refused(folder / LABEL)
    assert message.startswith(f"{folder / LABEL}: is the LABEL image of a DICOM slide")
    assert f"no VOLUME instance (the slide's pixels) of its series {SERIES}" in message
    assert "Copy every .dcm file of the slide's series into one folder" in message
    message = _refused(folder)
    assert message.startswith(f"{folder}: holds no VOLUME instance")
    assert f"only LABEL {LABEL}" in message


def _non_slide_dicom(path: Path, syntax: str = "1.2.840.10008.1.2.1") -> Path:
    """A real 8 × 8 CT image instance, written with pydicom (explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_another_modality_is_not_a_slide(tmp_path, cmu_dicom):
    (tmp_path / "ct").mkdir()
    ct = _non_slide_dicom(tmp_path / "ct" / "scan.dcm")
    message = _refused(ct)
    assert message == (
        f"{ct}: is a DICOM file but not a whole-slide image (CT Image Storage, modality CT; "
        "a slide's instances are VL Whole Slide Microscopy Image Storage, "
        "1.2.840.10008.5.1.4.1.1.77.1.6). napari-zoomin opens DICOM whole-slide images only."
    )
    assert _refused(ct.parent).startswith(
        f"{ct.parent}: holds 1 DICOM file(s) but no whole-slide image (CT Image Storage"
    )
    # beside a slide's series, a stray CT file is ignored
    folder = _copy(cmu_dicom, tmp_path / "with-ct")
    shutil.copyfile(ct, folder / "scan.dcm")
    assert volume_instance(folder) == folder / VOLUME


def test_a_dcm_that_is_not_dicom(tmp_path):
    bad = tmp_path / "notes.dcm"
    bad.write_text("not a DICOM file " * 20)
    assert _refused(bad) == (
        f"{bad}: is not a DICOM file (no 'DICM' marker at byte 128). "
        "Open a DICOM Part 10 file exported by the scanner or the PACS."
    )


@pytest.mark.parametrize("keep", [600_000, 2_000])
def test_a_truncated_volume_is_named(cmu_dicom, tmp_path, keep):
    folder = _copy(cmu_dicom, tmp_path / "cut")
    volume = folder / VOLUME
    volume.write_bytes(volume.read_bytes()[:keep])
    for given in (folder, folder / LABEL, volume):
        message = _refused(given)
        assert message.startswith((f"{volume}: ", f"{given}: "))
        assert "truncated" in message
    if keep == 600_000:  # header intact: the pixel data is measured
        assert _refused(folder) == (
            f"{volume}: the file is truncated: its pixel data needs byte 623,828 but the "
            "file has 600,000 bytes. Copy or export the slide again."
        )


def test_a_folder_with_two_slides_says_so(cmu_dicom, tmp_path):
    """A second series made from the first: same bytes, other series and instance UIDs."""
    folder = _copy(cmu_dicom, tmp_path / "two")
    old = SERIES.encode()
    new = (SERIES[:-1] + "7").encode()
    for name in (LABEL, VOLUME, THUMBNAIL, OVERVIEW):
        data = (cmu_dicom / name).read_bytes()
        assert data.count(old) == 1
        renamed = name[:-5] + "7.dcm"
        data = data.replace(old, new).replace(name[:-4].encode(), renamed[:-4].encode())
        (folder / renamed).write_bytes(data)
    message = _refused(folder)
    assert message.startswith(f"{folder}: holds 2 DICOM slides (series), not one: series {SERIES}")
    assert f"series {new.decode()} (LABEL, OVERVIEW, THUMBNAIL, VOLUME)" in message
    assert message.endswith("Move each series into its own folder, or open one of its .dcm files.")
    # any instance opens its own series
    assert volume_instance(folder / LABEL) == folder / VOLUME
    assert volume_instance(folder / (LABEL[:-5] + "7.dcm")) == folder / (VOLUME[:-5] + "7.dcm")
    with open_slide(folder / (THUMBNAIL[:-5] + "7.dcm")) as slide:
        assert slide.shape == (2967, 2220)


def test_a_deflated_data_set_is_refused_before_inflating(tmp_path):
    """pydicom would inflate the whole rest of the file: a zip bomb must not get there."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = _non_slide_dicom(tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    assert _refused(path) == (
        f"{path}: its data set is deflate-compressed, which no whole-slide reader uses. "
        "Export the slide again without deflate compression."
    )


def test_a_forced_tiff_backend_is_refused(cmu_dicom):
    message = _refused(cmu_dicom, backend="tifffile")
    assert "which the 'tifffile' backend cannot read" in message


def test_cli_reports_a_truncated_instance_in_one_line(cmu_dicom, tmp_path, capsys):
    folder = _copy(cmu_dicom, tmp_path / "cut")
    (folder / VOLUME).write_bytes((folder / VOLUME).read_bytes()[:600_000])
    expected = (
        f"zoomin: error: {folder / VOLUME}: the file is truncated: its pixel data needs "
        "byte 623,828 but the file has 600,000 bytes. Copy or export the slide again."
    )
    exe = Path(sys.executable).parent / "zoomin"  # the console script, as a user runs it
    done = subprocess.run([exe, "info", folder], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == expected
    out = tmp_path / "out"
    assert main(["classify", str(folder / LABEL), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == expected
    assert not out.exists()


# -- napari --------------------------------------------------------------------------------
@pytest.mark.viewer
def test_the_folder_opens_as_one_layer_in_micrometres(make_napari_viewer, cmu_dicom):
    pytest.importorskip("napari")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(cmu_dicom, plugin="napari-zoomin")
    assert layer.rgb and not layer.multiscale  # one stored level, small enough to show whole
    assert layer.data.shape == (2967, 2220, 3)
    np.testing.assert_allclose(layer.scale, (0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.name == "CMU-1-Small-Region-DICOM"
    assert layer.metadata["vendor"] == "dicom" and layer.metadata["path"] == str(cmu_dicom)
    with open_slide(cmu_dicom) as slide:
        np.testing.assert_array_equal(
            np.asarray(layer.data[1000:1240, 500:740]), slide.read(0, 1000, 500, 240, 240)
        )
    # a drop on the canvas: napari lists the readers that claim the folder
    from napari.plugins import _npe2

    assert "napari-zoomin" in _npe2.get_readers(str(cmu_dicom))


@pytest.mark.viewer
def test_the_reader_takes_dicom_folders_only_and_reports_bad_ones(
    make_napari_viewer, cmu_dicom, tmp_path
):
    pytest.importorskip("napari")
    from napari.utils.notifications import notification_manager

    from napari_zoomin.napari.reader import get_reader, read_slides

    assert get_reader(str(cmu_dicom)) is read_slides
    assert get_reader(str(cmu_dicom / LABEL)) is read_slides
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no slide here")
    assert get_reader(str(tmp_path / "plain")) is None  # left to other readers
    folder = _copy(cmu_dicom, tmp_path / "label-only", names=(LABEL,))
    viewer = make_napari_viewer()
    seen = []
    notification_manager.notification_ready.connect(seen.append)
    try:
        layers = viewer.open(folder, plugin="napari-zoomin")
    finally:
        notification_manager.notification_ready.disconnect(seen.append)
    assert layers == [] and len(viewer.layers) == 0
    messages = [str(n.message) for n in seen]
    assert any(str(folder) in m and "holds no VOLUME instance" in m for m in messages), messages
