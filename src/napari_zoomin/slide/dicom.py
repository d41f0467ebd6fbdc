"""DICOM whole-slide images: which instance file of a series OpenSlide is given.

A DICOM slide (VL Whole Slide Microscopy) is a *series* of instance files in one
folder: one VOLUME instance per pyramid level, plus LABEL, OVERVIEW and THUMBNAIL
images.  OpenSlide (4.0+) opens any instance and gathers the rest of its series from
the same folder, but it cannot open a folder, and it says only "No pyramid levels
found" for a label without its volume and nothing at all about a truncated frame
until a tile read fails half-way through a classification.  So here we read the few
header fields that decide (SOP class, series, image type, size) with pydicom, stop
well before the pixel data, check that every instance of the series is complete,
and hand OpenSlide the level-0 VOLUME instance, or say in words what is wrong.

Hostile files: 132 bytes are read to see the ``DICM`` marker; deflated data sets
(which pydicom inflates whole, unbounded) are refused; header values over
:data:`DEFER_BYTES` are skipped, not read; and a folder is read only up to
:data:`MAX_FOLDER_FILES` files.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import SlideError
from .slide import Slide

#: the SOP class of a VL Whole Slide Microscopy Image instance
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: file name endings of DICOM instances (files without an ending are sniffed)
DICOM_EXTENSIONS = (".dcm",)
#: a folder with more candidate files than this is not read as one slide
MAX_FOLDER_FILES = 10_000
#: header values longer than this are skipped, never read into memory
DEFER_BYTES = 1 << 20
#: the last tag we need: TotalPixelMatrixRows (0048,0007); pixel data comes far later
_LAST_TAG = 0x00480007
_PIXEL_DATA = 0x7FE00010
_DEFLATED = "1.2.840.10008.1.2.1.99"
#: (FFFE,E0DD) with length 0, little endian: the end of encapsulated pixel data
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_OPEN_THE_SERIES = (
    "Copy every .dcm file of the slide's series into one folder and open that folder "
    "(or any one of its .dcm files)."
)


@dataclass(frozen=True)
class DicomInstance:
    """The header facts of one DICOM file that decide whether and how it is a slide."""

    path: Path
    sop_class: str
    modality: str
    series_uid: str
    image_type: tuple[str, ...]  # e.g. ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")
    shape: tuple[int, int]  # TotalPixelMatrixRows, TotalPixelMatrixColumns (0 if absent)
    transfer_syntax: str

    @property
    def is_wsi(self) -> bool:
        return self.sop_class == WSI_SOP_CLASS

    @property
    def flavour(self) -> str:
        """VOLUME, LABEL, OVERVIEW or THUMBNAIL (Image Type value 3); "" if unstated."""
        return self.image_type[2].upper() if len(self.image_type) > 2 else ""


def has_dicom_marker(path: Path) -> bool:
    """True when ``path`` is a file with ``DICM`` at byte 128 (DICOM Part 10)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_candidate(path: Path) -> bool:
    """A folder entry that may be a DICOM instance: ``*.dcm``, or no ending and ``DICM``."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    return path.suffix == "" and has_dicom_marker(path)


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a DICOM file (stops at the first one)."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return any(_is_candidate(p) for p in path.iterdir())
    except OSError:
        return False


def is_dicom_path(path: Path) -> bool:
    """True when ``open_slide`` reads ``path`` as DICOM: a DICOM folder or a DICOM file."""
    if path.is_dir():
        return is_dicom_folder(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    return path.suffix == "" and has_dicom_marker(path)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_instance(path: Path) -> DicomInstance:
    """The header facts of ``path``; :class:`SlideError` if it is no readable DICOM file."""
    import pydicom
    from pydicom.filereader import read_partial

    if not has_dicom_marker(path):
        raise SlideError(
            path,
            "is not a DICOM file (no 'DICM' marker at byte 128).",
            "Open a DICOM Part 10 file exported by the scanner or the PACS.",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about what we report below
            meta = pydicom.filereader.read_file_meta_info(path)
            syntax = _text(meta.get("TransferSyntaxUID"))
            if syntax == _DEFLATED:
                raise SlideError(
                    path,
                    "its data set is deflate-compressed, which no whole-slide reader uses.",
                    "Export the slide again without deflate compression.",
                )
            with open(path, "rb") as fh:
                ds = read_partial(
                    fh,
                    stop_when=lambda tag, vr, length: tag > _LAST_TAG,
                    defer_size=DEFER_BYTES,
                    specific_tags=[
                        0x00080008,  # ImageType
                        0x00080016,  # SOPClassUID
                        0x00080060,  # Modality
                        0x0020000E,  # SeriesInstanceUID
                        0x00480006,  # TotalPixelMatrixColumns
                        0x00480007,  # TotalPixelMatrixRows
                    ],
                )
            image_type = ds.get("ImageType") or ()
            if isinstance(image_type, str):  # a single value is not a list in pydicom
                image_type = [image_type]
            sop = _text(ds.get("SOPClassUID")) or _text(meta.get("MediaStorageSOPClassUID"))
            return DicomInstance(
                path=path,
                sop_class=sop,
                modality=_text(ds.get("Modality")),
                series_uid=_text(ds.get("SeriesInstanceUID")),
                image_type=tuple(_text(v) for v in image_type),
                shape=(
                    int(ds.get("TotalPixelMatrixRows") or 0),
                    int(ds.get("TotalPixelMatrixColumns") or 0),
                ),
                transfer_syntax=syntax,
            )
    except SlideError:
        raise
    except Exception as exc:  # pydicom raises many types on damaged headers
        raise SlideError(
            path,
            f"its DICOM header cannot be read ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged.",
            "Copy or export the file again.",
        ) from exc


def _sop_words(inst: DicomInstance) -> str:
    from pydicom.uid import UID

    name = UID(inst.sop_class).name if inst.sop_class else "no SOP class"
    modality = f", modality {inst.modality}" if inst.modality else ""
    return f"{name}{modality}"


def _not_a_slide(inst: DicomInstance) -> SlideError:
    return SlideError(
        inst.path,
        f"is a DICOM file but not a whole-slide image ({_sop_words(inst)}; a slide's "
        f"instances are VL Whole Slide Microscopy Image Storage, {WSI_SOP_CLASS}).",
        "napari-zoomin opens DICOM whole-slide images only.",
    )


def _pixel_data_end(path: Path, inst: DicomInstance) -> tuple[int, int]:
    """(bytes the pixel data needs, file size); a missing or broken element is a SlideError."""
    from pydicom.filereader import read_partial

    size = path.stat().st_size
    with open(path, "rb") as fh:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(
                fh,
                stop_when=lambda tag, vr, length: tag >= _PIXEL_DATA,
                defer_size=DEFER_BYTES,
                specific_tags=[],
            )
        start = fh.tell()
        head = fh.read(12)
        if len(head) < 8 or struct.unpack("<I", head[:4])[0] != 0x00107FE0:
            raise SlideError(
                path,
                "has no pixel data where its header ends (byte "
                f"{start:,} of {size:,}); the file is truncated or damaged.",
                "Copy or export the file again.",
            )
        implicit = ds.is_implicit_VR
        explicit_long = not implicit and head[4:6] in (b"OB", b"OW", b"UN")
        length = struct.unpack("<I", head[8:12] if explicit_long else head[4:8])[0]
        pos = start + (12 if explicit_long else 8)
        if length != 0xFFFFFFFF:  # native pixels: one value
            return pos + length, size
        # encapsulated: items (FFFE,E000) then the sequence delimiter (FFFE,E0DD)
        while True:
            fh.seek(pos)
            item = fh.read(8)
            if len(item) < 8:
                return pos + 8, size
            tag, n = struct.unpack("<II", item)
            pos += 8
            if tag == 0xE0DDFFFE:
                return pos, size
            if tag != 0xE000FFFE:
                raise SlideError(
                    path,
                    f"its pixel data is damaged (an unexpected element at byte {pos - 8:,}).",
                    "Copy or export the file again.",
                )
            pos += n
            if pos > size:
                return pos, size


def check_complete(inst: DicomInstance) -> None:
    """Refuse an instance whose pixel data runs past the end of the file (truncated)."""
    path = inst.path
    size = path.stat().st_size
    if size >= 8 and inst.transfer_syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        with open(path, "rb") as fh:  # the usual case: encapsulated frames end the file
            fh.seek(size - 8)
            if fh.read(8) == _SEQUENCE_END:
                return
    try:
        end, size = _pixel_data_end(path, inst)
    except SlideError:
        raise
    except Exception as exc:
        raise SlideError(
            path,
            f"its pixel data cannot be located ({type(exc).__name__}: {exc}); the file is "
            "truncated or damaged.",
            "Copy or export the file again.",
        ) from exc
    if end > size:
        raise SlideError(
            path,
            f"the file is truncated: its pixel data needs byte {end:,} but the file has "
            f"{size:,} bytes.",
            "Copy or export the slide again.",
        )


def _candidates(folder: Path, where: Path) -> list[Path]:
    """The folder's possible DICOM files, sorted; at most :data:`MAX_FOLDER_FILES` entries."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise SlideError(where, f"cannot list {folder} ({exc}).", "Check its permissions.") from exc
    if len(entries) > MAX_FOLDER_FILES:
        raise SlideError(
            where,
            f"{folder} holds {len(entries):,} entries, more than a DICOM slide's series "
            f"({MAX_FOLDER_FILES:,} at most are read).",
            _OPEN_THE_SERIES,
        )
    return [p for p in entries if _is_candidate(p)]


def _series_name(series: list[DicomInstance]) -> str:
    kinds = Counter(i.flavour or "?" for i in series)
    what = ", ".join(f"{n} {k}" if n > 1 else k for k, n in sorted(kinds.items()))
    return f"series {series[0].series_uid or '(no UID)'} ({what})"


def _volume_of(series: list[DicomInstance], where: Path) -> Path:
    """The level-0 VOLUME instance of one series, after checking every instance is complete."""
    volumes = [i for i in series if i.flavour == "VOLUME"]
    if not volumes:
        names = ", ".join(f"{i.flavour or '?'} {i.path.name}" for i in series)
        raise SlideError(
            where,
            f"holds no VOLUME instance (the slide's pixels) of DICOM {_series_name(series)}: "
            f"only {names}.",
            _OPEN_THE_SERIES,
        )
    for inst in series:
        check_complete(inst)
    return max(volumes, key=lambda i: (i.shape[0] * i.shape[1], i.path.name)).path


def volume_instance(path: str | os.PathLike) -> Path:
    """The instance file OpenSlide opens for the DICOM slide at ``path``.

    ``path`` is the folder holding a slide's series or any of its instance files
    (volume, label, overview or thumbnail).  Raises :class:`SlideError` when the file is
    not a whole-slide image, its folder holds no VOLUME instance of its series, a
    folder holds several slides (series) or none, or an instance is truncated.
    """
    path = Path(path)
    if path.is_dir():
        found = [read_instance(p) for p in _candidates(path, path)]
        slides = [i for i in found if i.is_wsi]
        if not slides:
            if not found:
                raise SlideError(path, "holds no DICOM (.dcm) file.", _OPEN_THE_SERIES)
            kinds = ", ".join(sorted({_sop_words(i) for i in found}))
            raise SlideError(
                path,
                f"holds {len(found)} DICOM file(s) but no whole-slide image ({kinds}).",
                "napari-zoomin opens DICOM whole-slide images only.",
            )
        by_series: dict[str, list[DicomInstance]] = {}
        for inst in slides:
            by_series.setdefault(inst.series_uid, []).append(inst)
        if len(by_series) > 1:
            listed = "; ".join(
                f"{_series_name(s)}, e.g. {s[0].path.name}" for s in by_series.values()
            )
            raise SlideError(
                path,
                f"holds {len(by_series)} DICOM slides (series), not one: {listed}.",
                "Move each series into its own folder, or open one of its .dcm files.",
            )
        return _volume_of(slides, path)
    inst = read_instance(path)
    if not inst.is_wsi:
        raise _not_a_slide(inst)
    if not inst.series_uid:
        raise SlideError(
            path, "its DICOM header has no SeriesInstanceUID.", "Copy or export the file again."
        )
    series = [inst]
    broken: list[SlideError] = []
    for other in _candidates(path.parent, path):
        if other == path:
            continue
        try:
            sibling = read_instance(other)
        except SlideError as err:  # of unknown series: only an error if no volume is found
            broken.append(err)
            continue
        if sibling.is_wsi and sibling.series_uid == inst.series_uid:
            series.append(sibling)
    if inst.flavour != "VOLUME" and not any(i.flavour == "VOLUME" for i in series):
        if broken:  # most likely the volume itself, damaged
            raise broken[0]
        raise SlideError(
            path,
            f"is the {inst.flavour or 'non-VOLUME'} image of a DICOM slide, and its folder "
            f"holds no VOLUME instance (the slide's pixels) of its {_series_name(series)}.",
            _OPEN_THE_SERIES,
        )
    return _volume_of(series, path)


def open_dicom(
    path: Path,
    backend: str | None,
    *,
    mpp: tuple[float, float] | None,
    cache_bytes: int,
) -> Slide:
    """Open the DICOM slide at ``path`` (a folder or any instance) through OpenSlide.

    ``Slide.path`` stays ``path`` as given, so the slide's name, its ROI sidecar and
    its result files follow what the user chose (for a folder: ``<folder>.geojson``
    beside it); only the backend sees the volume instance.
    """
    from .backends.openslide_backend import OpenSlideBackend

    if backend not in (None, "openslide"):
        raise SlideError(
            path,
            f"is a DICOM slide, which the {backend!r} backend cannot read.",
            "Leave the backend out (DICOM slides are read by OpenSlide) or choose 'openslide'.",
        )
    volume = volume_instance(path)
    try:
        be = OpenSlideBackend(volume)
    except Exception as exc:  # openslide's own error types
        raise SlideError(
            path,
            f"OpenSlide cannot read the DICOM slide in {volume.name} "
            f"({type(exc).__name__}: {exc}).",
            "Check that the series is complete, or export the slide again.",
        ) from exc
    try:
        return Slide(be, path, mpp=mpp, cache_bytes=cache_bytes)
    except SlideError:
        be.close()
        raise
