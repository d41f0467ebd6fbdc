"""A corpus of hostile and broken input files, built at test time (issue 21, part 1).

Every case is a :class:`Hostile`: a name, a ``build(folder) -> path`` that writes the
file (with tifffile, raw bytes or json; nothing binary is committed), what must happen
(``expect``) and words the message must hold (``says``).  ``tests/test_hostile_files.py``
runs each one through the public entry points (``open_slide``, ``zoomin info``,
``read_annotations``, ``read_labels``) with a time limit.

``expect``:

* ``"refused"``: a ``ZoominError`` (``SlideError``, ``AnnotationError``, ``LabelsError``)
  naming the file, with exit code 1 from ``zoomin info``;
* ``"read-refused"``: the slide opens (its structure is sound) but reading its
  pixels is a ``SlideError`` naming the file (damaged pixel data);
* ``"warned"``: the slide opens and ``Slide.warnings`` (and ``zoomin info``'s
  ``warnings``) says what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[Path], Path]
    expect: str
    says: str = ""

    def __repr__(self) -> str:  # pytest ids
        return self.name


# --------------------------------------------------------------------------- pixels


def tissue(rows: int = 256, cols: int = 256, seed: int = 0) -> np.ndarray:
    """A pink stained blob on white glass, (rows, cols, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    inside = ((y - rows / 2) ** 2 + (x - cols / 2) ** 2) < (min(rows, cols) / 3) ** 2
    img = np.full((rows, cols, 3), 240, np.uint8)
    img[inside] = (200, 80, 160)
    return np.clip(img.astype(int) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)


APERIO = "Aperio Image Library v12.0.5\n256x256 [0,0 256x256] (128x128) JPEG/RGB Q=70|AppMag = 20|"


def _tiled(path: Path, image=None, **kw) -> Path:
    image = tissue() if image is None else image
    options = {"tile": (64, 64), "photometric": "rgb", "compression": "zlib", "metadata": None}
    options.update(kw)
    tifffile.imwrite(path, image, **options)
    return path


def _stripped(path: Path, image=None, **kw) -> Path:
    image = tissue() if image is None else image
    options = {"photometric": "rgb", "rowsperstrip": 16, "metadata": None}
    options.update(kw)
    tifffile.imwrite(path, image, **options)
    return path


def _pyramid(path: Path, levels: int = 3, **kw) -> Path:
    """A tiled generic pyramid (top-level pages), ~100 kB."""
    image = tissue(512, 512)
    with tifffile.TiffWriter(path) as tw:
        for k in range(levels):
            level = image[:: 2**k, :: 2**k]
            tw.write(
                level,
                tile=(64, 64),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if k else 0,
                metadata=None,
                **kw,
            )
    return path


# --------------------------------------------------------------------------- byte surgery


def _tags(path: Path, page: int = 0):
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        return p.offset, {t.name: (t.offset, t.valueoffset, int(t.dtype), t.count) for t in p.tags}


_CODES = {3: "H", 4: "I", 16: "Q"}


def _set_entry(data: bytearray, entry: int, value: int, dtype: int = 4) -> None:
    """Rewrite a classic-TIFF tag entry at ``entry`` as one inline LONG ``value``."""
    tag = struct.unpack_from("<H", data, entry)[0]
    struct.pack_into("<HHII", data, entry, tag, dtype, 1, value)


def _set_array(data: bytearray, info, values) -> None:
    """Overwrite a tag's values in place (same count and type)."""
    _, valueoffset, dtype, count = info
    code = _CODES[dtype]
    values = list(values) if np.ndim(values) else [values] * count
    struct.pack_into(f"<{count}{code}", data, valueoffset, *values)


def _next_ifd_at(path: Path, page: int = 0) -> int:
    """Where page ``page``'s next-IFD pointer is (classic TIFF)."""
    offset, tags = _tags(path, page)
    return offset + 2 + 12 * len(tags)


def _patch(build, change):
    """A builder that writes a file with ``build`` then edits its bytes with ``change``."""

    def make(folder: Path, name: str) -> Path:
        path = build(folder / f"{name}.tif")  # tifffile reads .ndpi its own way: edit a .tif
        data = bytearray(path.read_bytes())
        change(path, data)
        path.write_bytes(bytes(data))
        return path.rename(folder / name)

    return make


def _named(make, name: str) -> Callable[[Path], Path]:
    return lambda folder: make(folder, name)


def _loop_to_self(path, data):
    struct.pack_into("<I", data, _next_ifd_at(path, 0), _tags(path, 0)[0])


def _loop_two(path, data):
    struct.pack_into("<I", data, _next_ifd_at(path, 1), _tags(path, 0)[0])


def _loop_to_first_of_last(path, data):
    struct.pack_into("<I", data, _next_ifd_at(path, 2), _tags(path, 1)[0])


def _next_past_end(path, data):
    struct.pack_into("<I", data, _next_ifd_at(path, 0), len(data) + 100_000)


def _next_into_pixels(path, data):
    _, tags = _tags(path, 0)
    struct.pack_into("<I", data, _next_ifd_at(path, 0), tags["TileOffsets"][1] + 3)


def _huge_entry_count(path, data):
    offset, _ = _tags(path, 0)
    struct.pack_into("<H", data, offset, 65535)


def _dims(rows: int, cols: int):
    def change(path, data):
        _, tags = _tags(path, 0)
        _set_entry(data, tags["ImageLength"][0], rows)
        _set_entry(data, tags["ImageWidth"][0], cols)

    return change


def _rows_per_strip(value: int, rows: int | None = None):
    def change(path, data):
        _, tags = _tags(path, 0)
        _set_entry(data, tags["RowsPerStrip"][0], value)
        if rows is not None:
            _set_entry(data, tags["ImageLength"][0], rows)

    return change


def _tile_side(value: int):
    def change(path, data):
        _, tags = _tags(path, 0)
        _set_entry(data, tags["TileWidth"][0], value)
        _set_entry(data, tags["TileLength"][0], value)

    return change


def _zero(tag: str):
    def change(path, data):
        _set_array(data, _tags(path, 0)[1][tag], 0)

    return change


def _set_short(tag: str, value: int):
    def change(path, data):
        entry = _tags(path, 0)[1][tag][0]
        _set_entry(data, entry, value, dtype=3)

    return change


def _bad_type(tag: str):
    """One tag of an unknown field type: tifffile skips it and logs why."""

    def change(path, data):
        struct.pack_into("<H", data, _tags(path, 0)[1][tag][0] + 2, 99)

    return change


def _truncate(fraction: float):
    def make(folder: Path) -> Path:
        path = _pyramid(folder / f"cut-{int(fraction * 100)}.tif")
        data = path.read_bytes()
        path.write_bytes(data[: max(16, int(len(data) * fraction))])
        return path

    return make


def _truncate_before_last_ifd(folder: Path) -> Path:
    """The last page's directory is cut off: tifffile logs "invalid page offset"."""
    path = _pyramid(folder / "lost-level.tif")
    last = _tags(path, 2)[0]
    data = path.read_bytes()
    path.write_bytes(data[:last])
    return path


def _float_tiff(fill) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        image = tissue().astype(np.float32) / 255
        if fill == "half":
            image[:128] = np.nan
        else:
            image[:] = fill
        return _tiled(folder / "float.tif", image, compression=None)

    return make


def _channels(n: int, tiled: bool = True) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        image = np.repeat(tissue()[..., :1], n, axis=-1)
        path = folder / f"channels-{n}.tif"
        if tiled:
            return _tiled(path, image, photometric="minisblack", planarconfig="contig")
        return _stripped(path, image, photometric="minisblack", planarconfig="contig")

    return make


def _ome_channels(n: int) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        image = np.repeat(tissue()[None, ..., 0], n, axis=0)
        path = folder / f"channels-{n}.ome.tif"
        tifffile.imwrite(
            path, image, tile=(64, 64), metadata={"axes": "CYX"}, photometric="minisblack"
        )
        return path

    return make


def _cmyk(suffix: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        image = np.concatenate([tissue(), np.zeros((256, 256, 1), np.uint8)], axis=-1)
        path = folder / f"cmyk{suffix}"
        tifffile.imwrite(path, image, tile=(64, 64), photometric="separated", metadata=None)
        return path

    return make


_OME = (
    '<?xml version="1.0" encoding="UTF-8"?>{doctype}'
    '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
    '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
    'SizeX="256" SizeY="256" SizeC="3" SizeZ="1" SizeT="1" PhysicalSizeX="0.5" '
    'PhysicalSizeY="0.5"{attr}><Channel ID="Channel:0:0" SamplesPerPixel="3"/>'
    '<TiffData IFD="0" PlaneCount="1"/></Pixels></Image></OME>{tail}'
)


def _ome_xml(doctype: str = "", attr: str = "", tail: str = "") -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / "hostile.ome.tif"
        xml = _OME.format(doctype=doctype, attr=attr, tail=tail)
        _tiled(path, description=xml.encode())
        return path

    return make


_LAUGHS = (
    '<!DOCTYPE OME [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
    '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
    '<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">'
    '<!ENTITY i "&h;&h;&h;&h;&h;&h;&h;&h;&h;&h;">]>'
)
_EXTERNAL = '<!DOCTYPE OME [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'


def _svs_mpp(value: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        return _tiled(
            folder / "mpp.svs",
            tissue(1024, 1024),
            compression="jpeg",
            tile=(256, 256),
            description=f"{APERIO}MPP = {value}|Date = 12/29/09",
        )

    return make


def _raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def _ifd_chain(n: int) -> bytes:
    """A classic TIFF of ``n`` one-tag directories (NewSubfileType), each pointing at the next."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(n):
        nxt = 8 + 18 * (i + 1) if i + 1 < n else 0
        out += struct.pack("<HHHII", 1, 254, 4, 1, 0) + struct.pack("<I", nxt)
    return bytes(out)


def _written_self_loop(folder: Path, name: str, bigtiff: bool, byteorder: str) -> Path:
    """A one-page tiled TIFF (classic or BigTIFF, either byte order) whose next-IFD
    pointer points back at its own directory."""
    path = folder / name
    tifffile.imwrite(
        path,
        tissue(),
        tile=(64, 64),
        photometric="rgb",
        bigtiff=bigtiff,
        byteorder=byteorder,
        metadata=None,
    )
    count, entry, pointer = (8, 20, "Q") if bigtiff else (2, 12, "I")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        at = page.offset + count + entry * len(page.tags)
        offset = page.offset
    data = bytearray(path.read_bytes())
    struct.pack_into(byteorder + pointer, data, at, offset)
    path.write_bytes(bytes(data))
    return path


def _bigtiff_self_loop(folder: Path) -> Path:
    return _written_self_loop(folder, "big-loop.tif", bigtiff=True, byteorder="<")


def _big_endian_loop(folder: Path) -> Path:
    return _written_self_loop(folder, "be-loop.tif", bigtiff=False, byteorder=">")


def _subifd_loop(folder: Path) -> Path:
    """An OME pyramid whose first sub-IFD points back at the main directory."""
    path = folder / "subifd-loop.ome.tif"
    image = tissue(512, 512)
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(image, subifds=1, tile=(64, 64), photometric="rgb")
        tw.write(image[::2, ::2], tile=(64, 64), photometric="rgb", subfiletype=1)
    with tifffile.TiffFile(path) as tif:
        main = tif.pages[0]
        sub = main.tags["SubIFDs"]
    data = bytearray(path.read_bytes())
    if sub.count == 1 and sub.valueoffset == sub.offset + 8:
        struct.pack_into("<I", data, sub.valueoffset, main.offset)
    else:
        struct.pack_into("<I", data, sub.valueoffset, main.offset)
    path.write_bytes(bytes(data))
    return path


def _png_bomb(folder: Path) -> Path:
    """A PNG header that declares 100,000 x 100,000 pixels (Pillow's bomb guard)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path = folder / "bomb.png"
    path.write_bytes(data + chunk(b"IEND", b""))
    return path


def _fifo(folder: Path) -> Path:
    path = folder / "pipe.svs"
    os.mkfifo(path)
    return path


def _symlink_loop(folder: Path) -> Path:
    path = folder / "loop.svs"
    path.symlink_to(path)
    return path


def _long_name(folder: Path) -> Path:
    return folder / ("s" * 300 + ".svs")


def _long_path(folder: Path) -> Path:
    return folder / "/".join(["d" * 200] * 25) / "slide.svs"


def _nul_in_path(folder: Path) -> Path:
    return folder / "sl\0ide.svs"


_P = _patch


SLIDES: list[Hostile] = [
    # -- directory chains that loop or point nowhere (hang / silent loss) -----------------
    Hostile("ifd-self-loop", _named(_P(_tiled, _loop_to_self), "self-loop.tif"), "refused", "loop"),
    Hostile(
        "ifd-self-loop-svs", _named(_P(_tiled, _loop_to_self), "self-loop.svs"), "refused", "loop"
    ),
    Hostile(
        "ifd-self-loop-ndpi", _named(_P(_tiled, _loop_to_self), "self-loop.ndpi"), "refused", "loop"
    ),
    Hostile("ifd-two-cycle", _named(_P(_pyramid, _loop_two), "two-cycle.tif"), "refused", "loop"),
    Hostile(
        "ifd-back-loop", _named(_P(_pyramid, _loop_to_first_of_last), "back.tif"), "refused", "loop"
    ),
    Hostile("ifd-bigtiff-loop", _bigtiff_self_loop, "refused", "loop"),
    Hostile("ifd-big-endian-loop", _big_endian_loop, "refused", "loop"),
    Hostile("ifd-subifd-loop", _subifd_loop, "refused", "loop"),
    Hostile(
        "ifd-next-past-end",
        _named(_P(_tiled, _next_past_end), "next-past.tif"),
        "refused",
        "truncated",
    ),
    Hostile(
        "ifd-next-into-pixels", _named(_P(_tiled, _next_into_pixels), "next-in.tif"), "refused", ""
    ),
    Hostile(
        "ifd-65535-entries", _named(_P(_tiled, _huge_entry_count), "entries.tif"), "refused", ""
    ),
    Hostile(
        "ifd-20001-directories", _raw("many.tif", _ifd_chain(20_001)), "refused", "directories"
    ),
    Hostile("header-only", _raw("header.tif", b"II*\x00\x08\x00\x00\x00"), "refused", "truncated"),
    Hostile(
        "first-ifd-zero", _raw("no-ifd.tif", b"II*\x00\x00\x00\x00\x00" + b"\0" * 64), "refused", ""
    ),
    Hostile(
        "bigtiff-bad-header",
        _raw("bad-big.tif", b"II+\x00\x07\x00\x00\x00" + b"\0" * 64),
        "refused",
        "",
    ),
    # -- declared sizes the file cannot hold -------------------------------------------
    Hostile(
        "giga-tiled",
        _named(_P(_tiled, _dims(10**9, 10**9)), "giga-tiled.tif"),
        "refused",
        "1,000,000,000",
    ),
    Hostile(
        "giga-stripped",
        _named(_P(_stripped, _dims(10**9, 10**9)), "giga-strip.tif"),
        "refused",
        "1,000,000,000",
    ),
    Hostile(
        "giga-svs", _named(_P(_tiled, _dims(10**9, 10**9)), "giga.svs"), "refused", "1,000,000,000"
    ),
    Hostile(
        "width-beyond-tiles", _named(_P(_tiled, _dims(256, 1024)), "wide.tif"), "refused", "tile"
    ),
    Hostile(
        "rows-beyond-tiles", _named(_P(_tiled, _dims(4096, 256)), "tall.tif"), "refused", "tile"
    ),
    Hostile(
        "rows-beyond-strips",
        _named(_P(_stripped, _dims(4096, 256)), "tall-strip.tif"),
        "refused",
        "strip",
    ),
    Hostile(
        "giga-rows-one-strip",
        _named(_P(_stripped, _rows_per_strip(10**9, 10**9)), "giga-rows.tif"),
        "refused",
        "1,000,000,000",
    ),
    Hostile(
        "huge-strip",
        _named(
            _P(
                lambda p: _stripped(p, tissue(256, 4096), rowsperstrip=256),
                _rows_per_strip(20_000, 20_000),
            ),
            "huge-strip.tif",
        ),
        "refused",
        "",
    ),
    Hostile(
        "rows-per-strip-zero",
        _named(_P(_stripped, _rows_per_strip(0)), "rps0.tif"),
        "refused",
        "strip",
    ),
    Hostile("tile-side-zero", _named(_P(_tiled, _tile_side(0)), "tile0.tif"), "refused", "tile"),
    Hostile(
        "tile-side-huge", _named(_P(_tiled, _tile_side(2**30)), "tile-huge.tif"), "refused", "tile"
    ),
    Hostile(
        "samples-65535",
        _named(_P(_tiled, _set_short("SamplesPerPixel", 65535)), "spp.tif"),
        "refused",
        "",
    ),
    Hostile(
        "bits-zero", _named(_P(_tiled, _set_short("BitsPerSample", 0)), "bits0.tif"), "refused", ""
    ),
    # -- channels and colour spaces napari-zoomin cannot show as RGB --------------------
    Hostile("two-channel-tiled", _channels(2), "refused", "2 samples"),
    Hostile("two-channel-stripped", _channels(2, tiled=False), "refused", "2 samples"),
    Hostile("five-channel-tiled", _channels(5), "refused", "5 samples"),
    Hostile("five-channel-stripped", _channels(5, tiled=False), "refused", "5 samples"),
    Hostile("ome-two-channels", _ome_channels(2), "refused", "2 channels"),
    Hostile("ome-five-channels", _ome_channels(5), "refused", "5 channels"),
    Hostile("cmyk-tif", _cmyk(".tif"), "refused", "CMYK"),
    Hostile("cmyk-svs", _cmyk(".svs"), "refused", "CMYK"),
    # -- OME-XML that is hostile or broken ---------------------------------------------
    Hostile("ome-external-entity", _ome_xml(_EXTERNAL, ' Name="&xxe;"'), "refused", "DOCTYPE"),
    Hostile("ome-billion-laughs", _ome_xml(_LAUGHS, ' Name="&i;"'), "refused", "DOCTYPE"),
    Hostile("ome-malformed", _ome_xml(tail="<unclosed"), "refused", "OME-XML"),
    Hostile("ome-valid-control", _ome_xml(), "ok", ""),
    # -- no pixel data, or damaged pixel data -------------------------------------------
    Hostile(
        "tile-offsets-zero",
        _named(_P(_tiled, _zero("TileOffsets")), "offsets0.tif"),
        "refused",
        "damaged",
    ),
    Hostile(
        "tile-counts-zero",
        _named(_P(_tiled, _zero("TileByteCounts")), "counts0.tif"),
        "refused",
        "no image data",
    ),
    Hostile(
        "strip-offsets-zero",
        _named(_P(_stripped, _zero("StripOffsets")), "soffsets0.tif"),
        "refused",
        "damaged",
    ),
    Hostile(
        "strip-counts-zero",
        _named(_P(_stripped, _zero("StripByteCounts")), "scounts0.tif"),
        "refused",
        "no image data",
    ),
    Hostile("float-nan", _float_tiff(np.nan), "read-refused", "NaN"),
    Hostile("float-half-nan", _float_tiff("half"), "read-refused", "NaN"),
    Hostile("float-inf", _float_tiff(np.inf), "read-refused", "NaN"),
    Hostile(
        "unknown-compression",
        _named(_P(_tiled, _set_short("Compression", 12345)), "codec.tif"),
        "read-refused",
        "",
    ),
    # -- truncated files ------------------------------------------------------------------
    Hostile("truncated-10", _truncate(0.10), "refused", "truncated"),
    Hostile("truncated-40", _truncate(0.40), "refused", "truncated"),
    Hostile("truncated-70", _truncate(0.70), "refused", "truncated"),
    Hostile("truncated-95", _truncate(0.95), "refused", "truncated"),
    Hostile("truncated-99", _truncate(0.99), "refused", "truncated"),
    Hostile("truncated-lost-level", _truncate_before_last_ifd, "refused", "truncated"),
    # -- pixel sizes that are not sizes: opened, warned, never used -------------------------
    Hostile("mpp-zero", _svs_mpp("0"), "warned", "says 0 µm per pixel"),
    Hostile("mpp-negative", _svs_mpp("-0.25"), "warned", "not a positive size"),
    Hostile("mpp-infinite", _svs_mpp("inf"), "warned", "infinite"),
    Hostile("mpp-minus-infinite", _svs_mpp("-inf"), "warned", "not a positive size"),
    Hostile("mpp-nan", _svs_mpp("nan"), "warned", "NaN"),
    Hostile("mpp-1e308", _svs_mpp("1e308"), "warned", "plausible"),
    Hostile("mpp-1e-300", _svs_mpp("1e-300"), "warned", "plausible"),
    Hostile("mpp-text", _svs_mpp("fast"), "warned", "NaN"),
    # -- damage tifffile works around: opened, and the result says so ---------------------
    Hostile(
        "tag-of-unknown-type",
        _named(_P(lambda p: _tiled(p, software="hostile"), _bad_type("Software")), "odd.tif"),
        "warned",
        "tifffile reports",
    ),
    Hostile(
        "tag-of-unknown-type-svs",
        _named(
            _P(lambda p: _svs_mpp("0.25")(p.parent).rename(p), _bad_type("Software")), "odd.svs"
        ),
        "warned",
        "tifffile reports",
    ),
    # -- paths and special files ------------------------------------------------------------
    Hostile("name-too-long", _long_name, "refused", "too long"),
    Hostile("path-too-long", _long_path, "refused", "too long"),
    Hostile("nul-in-path", _nul_in_path, "refused", "NUL"),
    Hostile("fifo", _fifo, "refused", "not a regular file"),
    Hostile("symlink-loop", _symlink_loop, "refused", ""),
    Hostile("png-bomb", _png_bomb, "refused", ""),
    Hostile(
        "png-truncated",
        lambda f: _raw("cut.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")(f),
        "refused",
        "",
    ),
]


# --------------------------------------------------------------------------- annotations


def _geojson(
    rings, label="Tumor", name="a.geojson", raw: str | None = None
) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        if raw is not None:
            path.write_text(raw)
            return path
        feature = {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {"classification": {"name": label}},
        }
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
        return path

    return make


def _random_ring(n: int, seed: int = 0, extent: float = 8192.0) -> list:
    xy = np.random.default_rng(seed).uniform(0, extent, (n, 2))
    return xy.tolist()


def _circle_ring(n: int) -> list:
    t = 2 * np.pi * np.arange(n) / n
    ring = np.stack([4096 + 3000 * np.cos(t), 4096 + 3000 * np.sin(t)], axis=1)
    return ring.round().astype(int).tolist()  # integers: quick to write and to parse


def _asap(
    coords: str, doctype: str = "", name: str = "a.xml", group: str = "_0"
) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_text(
            f'<?xml version="1.0"?>{doctype}<ASAP_Annotations><Annotations>'
            f'<Annotation Name="A" Type="Polygon" PartOfGroup="{group}"><Coordinates>{coords}'
            "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
        )
        return path

    return make


def _asap_coords(xy) -> str:
    return "".join(f'<Coordinate Order="{i}" X="{x!r}" Y="{y!r}"/>' for i, (x, y) in enumerate(xy))


def _asap_random(n: int) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        return _asap(_asap_coords(_random_ring(n)))(folder)

    return make


def _sparse(name: str, size: int) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        with open(path, "wb") as fh:
            fh.write(b"{")
            fh.truncate(size)
        return path

    return make


_TRIANGLE = [[0, 0], [100, 0], [0, 100], [0, 0]]


ANNOTATIONS: list[Hostile] = [
    Hostile("geojson-random-2e5", _geojson([_random_ring(200_000)]), "refused", "vertices"),
    Hostile("geojson-random-5e4", _geojson([_random_ring(50_000)]), "refused", "crosses"),
    Hostile("asap-random-2e5", _asap_random(200_000), "refused", "vertices"),
    Hostile("geojson-circle-1.2e6", _geojson([_circle_ring(1_200_000)]), "refused", "vertices"),
    Hostile("geojson-huge-file", _sparse("huge.geojson", 300 * 2**20), "refused", "MB"),
    Hostile("asap-huge-file", _sparse("huge.xml", 300 * 2**20), "refused", "MB"),
    Hostile(
        "geojson-coordinate-1e300",
        _geojson([[[0, 0], [1e300, 0], [0, 1e300]]]),
        "refused",
        "coordinate",
    ),
    Hostile(
        "geojson-coordinate-1e400",
        _geojson(None, raw='{"type":"Polygon","coordinates":[[[0,0],[1e400,0],[0,5]]]}'),
        "refused",
        "infinite",
    ),
    Hostile(
        "geojson-nan",
        _geojson(None, raw='{"type":"Polygon","coordinates":[[[0,0],[NaN,0],[0,5]]]}'),
        "refused",
        "NaN",
    ),
    Hostile(
        "geojson-deep-nesting", _geojson(None, raw="[" * 200_000 + "]" * 200_000), "refused", "JSON"
    ),
    Hostile(
        "geojson-deep-collections",
        _geojson(
            None,
            raw='{"type":"Feature","geometry":'
            + '{"type":"GeometryCollection","geometries":[' * 50
            + "]}" * 50
            + "}",
        ),
        "refused",
        "",
    ),
    Hostile("geojson-nul-label", _geojson([_TRIANGLE], label="Tum\0or"), "refused", "control"),
    Hostile(
        "geojson-escape-label", _geojson([_TRIANGLE], label="Tumor\x1b[31m"), "refused", "control"
    ),
    Hostile(
        "geojson-long-label", _geojson([_TRIANGLE], label="T" * 100_000), "refused", "characters"
    ),
    Hostile("geojson-binary", _raw("bin.geojson", bytes(range(256)) * 8), "refused", "JSON"),
    Hostile(
        "geojson-utf16",
        _raw("u16.geojson", '{"type": "Polygon"}'.encode("utf-16")),
        "refused",
        "JSON",
    ),
    Hostile("geojson-empty", _raw("empty.geojson", b""), "refused", "JSON"),
    Hostile(
        "geojson-string-coords",
        _geojson([[["0", "0"], ["1", "0"], ["0", "1"]]]),
        "refused",
        "numbers",
    ),
    Hostile(
        "asap-billion-laughs",
        _asap(_asap_coords([(0, 0), (9, 0), (0, 9)]), _LAUGHS.replace("OME", "ASAP_Annotations")),
        "refused",
        "DOCTYPE",
    ),
    Hostile(
        "asap-external-entity",
        _asap(_asap_coords([(0, 0), (9, 0), (0, 9)]), _EXTERNAL),
        "refused",
        "DOCTYPE",
    ),
    Hostile(
        "asap-malformed",
        _raw("bad.xml", b"<ASAP_Annotations><Annotations><Annotation"),
        "refused",
        "XML",
    ),
    Hostile(
        "asap-coordinate-1e300",
        _asap(_asap_coords([(0, 0), (1e300, 0), (0, 9)])),
        "refused",
        "coordinate",
    ),
    Hostile(
        "asap-order-1e30",
        _asap(
            '<Coordinate Order="1000000000000000000000000000000" X="0" Y="0"/>'
            + _asap_coords([(9, 0), (0, 9)])
        ),
        "ok",
        "",
    ),
    Hostile(
        "asap-nul-group",
        _asap(_asap_coords([(0, 0), (9, 0), (0, 9)]), group="Tu&#0;mor"),
        "refused",
        "",
    ),
    Hostile(
        "asap-escape-group",
        _asap(_asap_coords([(0, 0), (9, 0), (0, 9)]), group="Tu&#27;mor"),
        "refused",
        "XML",
    ),
    Hostile(
        "annotation-fifo",
        lambda f: (os.mkfifo(f / "pipe.geojson"), f / "pipe.geojson")[1],
        "refused",
        "not a file",
    ),
    Hostile(
        "annotation-name-too-long", lambda f: f / ("a" * 300 + ".geojson"), "refused", "too long"
    ),
]


# --------------------------------------------------------------------------- labels CSV


def _labels(rows: list[tuple[str, str]] | str, name: str = "labels.csv") -> Callable[[Path], Path]:
    """A slides folder with two good slides (a.tif, b.tif) and a labels CSV naming ``rows``."""

    def make(folder: Path) -> Path:
        slides = folder / "slides"
        slides.mkdir(exist_ok=True)
        for stem in ("a", "b"):
            (slides / f"{stem}.tif").write_bytes(b"II*\x00")  # read_labels does not open slides
        path = folder / name
        if isinstance(rows, str):
            path.write_text(rows)
        else:
            path.write_text("slide,label\n" + "".join(f"{s},{lab}\n" for s, lab in rows))
        return path

    return make


def _outside_slide(folder: Path) -> Path:
    (folder / "elsewhere.tif").write_bytes(b"II*\x00")
    return _labels([("a.tif", "negative"), ("../elsewhere.tif", "positive")])(folder)


def _absolute_outside(folder: Path) -> Path:
    (folder / "elsewhere.tif").write_bytes(b"II*\x00")
    return _labels([("a.tif", "negative"), (str(folder / "elsewhere.tif"), "positive")])(folder)


def _symlinked_outside_ok(folder: Path) -> Path:
    """A slide in the folder that is a symlink to storage elsewhere: allowed."""
    (folder / "store").mkdir()
    (folder / "store" / "c.tif").write_bytes(b"II*\x00")
    path = _labels([("a.tif", "negative"), ("c.tif", "positive")])(folder)
    (folder / "slides" / "c.tif").symlink_to(folder / "store" / "c.tif")
    return path


def _many_rows(folder: Path) -> Path:
    text = "slide,label\n" + "a.tif,negative\n" * 200_001
    return _labels(text)(folder)


LABELS: list[Hostile] = [
    Hostile(
        "name-too-long",
        _labels([("a.tif", "negative"), ("x" * 300, "positive")]),
        "refused",
        "too long",
    ),
    Hostile(
        "name-too-long-ext",
        _labels([("a.tif", "negative"), ("x" * 300 + ".svs", "positive")]),
        "refused",
        "too long",
    ),
    Hostile(
        "path-too-long",
        _labels([("a.tif", "negative"), ("/".join(["d" * 200] * 25), "positive")]),
        "refused",
        "too long",
    ),
    Hostile(
        "nul-in-label",
        _labels([("a.tif", "nega\0tive"), ("b.tif", "positive")]),
        "refused",
        "U+0000",
    ),
    Hostile(
        "escape-in-label",
        _labels([("a.tif", "negative"), ("b.tif", "posi\x1b[2Jtive")]),
        "refused",
        "U+001B",
    ),
    Hostile(
        "bidi-in-label",
        _labels([("a.tif", "negative"), ("b.tif", "posi\u202etive")]),
        "refused",
        "U+202E",
    ),
    Hostile(
        "bell-in-label",
        _labels([("a.tif", "negative"), ("b.tif", "positive\x07")]),
        "refused",
        "U+0007",
    ),
    Hostile(
        "newline-in-label",
        _labels('slide,label\na.tif,negative\nb.tif,"posi\ntive"\n'),
        "refused",
        "U+000A",
    ),
    Hostile(
        "nul-in-slide",
        _labels([("a.tif", "negative"), ("b\0.tif", "positive")]),
        "refused",
        "U+0000",
    ),
    Hostile(
        "nul-in-split",
        _labels("slide,label,split\na.tif,negative,train\nb.tif,positive,tr\0ain\n"),
        "refused",
        "U+0000",
    ),
    Hostile(
        "label-too-long",
        _labels([("a.tif", "negative"), ("b.tif", "p" * 1000)]),
        "refused",
        "characters",
    ),
    Hostile(
        "dotdot-passwd",
        _labels([("a.tif", "negative"), ("../../etc/passwd", "positive")]),
        "refused",
        "outside",
    ),
    Hostile(
        "absolute-passwd",
        _labels([("a.tif", "negative"), ("/etc/passwd", "positive")]),
        "refused",
        "outside",
    ),
    Hostile("dotdot-slide", _outside_slide, "refused", "outside"),
    Hostile("absolute-outside", _absolute_outside, "refused", "outside"),
    Hostile(
        "home-outside",
        _labels([("a.tif", "negative"), ("~/b.tif", "positive")]),
        "refused",
        "outside",
    ),
    Hostile("symlinked-slide", _symlinked_outside_ok, "ok", ""),
    Hostile("csv-huge-file", _sparse("labels.csv", 300 * 2**20), "refused", "MB"),
    Hostile("csv-many-rows", _many_rows, "refused", "rows"),
    Hostile("csv-binary", _labels(bytes(range(256)).decode("latin-1") * 4), "refused", ""),
    Hostile(
        "csv-utf16",
        lambda f: (
            _labels("x")(f).write_bytes("slide,label\na.tif,negative\n".encode("utf-16")),
            f / "labels.csv",
        )[1],
        "refused",
        "",
    ),
    Hostile(
        "csv-field-over-limit",
        _labels([("a.tif", "negative"), ("b.tif", "p" * 200_000)]),
        "refused",
        "",
    ),
    Hostile(
        "csv-fifo",
        lambda f: (_labels("x")(f).unlink(), os.mkfifo(f / "labels.csv"), f / "labels.csv")[2],
        "refused",
        "not a regular file",
    ),
]
