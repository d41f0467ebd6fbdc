"""Check a TIFF's structure from its raw bytes before any library decodes it.

tifffile and OpenSlide trust what a file declares: a directory chain that loops
makes tifffile spin for ever, a page that declares 10⁹ x 10⁹ pixels is allocated
or resampled, a chain that points past the end of a truncated file is logged and
the pages after it silently dropped.  This module walks every image directory
(sub-IFDs included) with bounded work and refuses, with a :class:`SlideError`
naming the file, what cannot be a sound slide:

* directory loops, too many directories, directories that are noise;
* pointers past the end of the file (truncated), or into its header;
* declared sizes the file cannot hold: more pixels per side than any slide,
  a tile or strip table shorter than the declared size needs, a decode unit
  larger than :data:`MAX_CHUNK_BYTES`, uncompressed data shorter than the image;
* pages with no image data at all (every byte count 0);
* colour layouts that are not grey, RGB or RGBA (2 or 5 samples, CMYK);
* OME-XML with a DOCTYPE or entity declaration, or that is not well-formed.

The walk reads only the directories and their tag values: a few kB for a slide.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from ..errors import SlideError
from ..xmlsafe import has_declaration, parser_refusing_declarations

#: image directories (pages and sub-IFDs) in one file; a slide pyramid has tens
MAX_DIRECTORIES = 10_000
#: tags in one directory; real files have tens
MAX_TAGS = 4_096
#: pixels per side of any page: 2 × 10⁶ is 50 cm at 0.25 µm per pixel
MAX_SIDE = 2**21
#: decoded bytes of one tile or strip, the unit a reader must hold in memory at once
MAX_CHUNK_BYTES = 2**29
#: bytes of OME-XML read from the first page's description
MAX_XML_BYTES = 64 * 2**20

_MAGIC = {b"II*\x00": ("<", False), b"MM\x00*": (">", False)}
_MAGIC.update({b"II+\x00": ("<", True), b"MM\x00+": (">", True)})
#: bytes of one value of each TIFF field type
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8}
_TYPE_SIZE.update({13: 4, 16: 8, 17: 8, 18: 8})
_TYPE_CODE = {1: "u1", 3: "u2", 4: "u4", 6: "i1", 8: "i2", 9: "i4", 13: "u4", 16: "u8", 17: "i8"}
_TYPE_CODE.update({18: "u8", 7: "u1"})
#: tags whose values the checks need
_WANTED = {256, 257, 258, 259, 262, 270, 273, 277, 278, 279, 284, 322, 323, 324, 325, 330}
_WANTED |= {32997, 65420}
_FIX_DAMAGED = "The file is damaged or was written wrongly; copy or export it again."
_FIX_TRUNCATED = "Copy or download the slide again."
_FIX_CONVERT = (
    "Convert it to an RGB (or grey) pyramidal TIFF, e.g. with QuPath, bfconvert or "
    "vips tiffsave --tile --pyramid."
)


def _truncated(path: Path, end: int, size: int, what: str) -> SlideError:
    return SlideError(
        path,
        f"the file is truncated or damaged: {what} needs byte {end:,} "
        f"but the file has {size:,} bytes.",
        _FIX_TRUNCATED,
    )


class _Reader:
    """Bounded reads of one TIFF file's directories."""

    def __init__(self, path: Path, fh, size: int, order: str, big: bool):
        self.path, self.fh, self.size, self.order, self.big = path, fh, size, order, big

    def read(self, offset: int, n: int, what: str) -> bytes:
        if offset < 0 or offset + n > self.size:
            raise _truncated(self.path, offset + n, self.size, what)
        self.fh.seek(offset)
        return self.fh.read(n)

    def directory(self, offset: int, number: int) -> tuple[dict[int, np.ndarray | bytes], int]:
        """The wanted tags of the directory at ``offset`` and the next directory's offset."""
        what = f"image directory {number}"
        big, o = self.big, self.order
        head = 8 if big else 2
        (n,) = struct.unpack(o + ("Q" if big else "H"), self.read(offset, head, what))
        if n == 0 or n > MAX_TAGS:
            raise SlideError(
                self.path,
                f"image directory {number} (at byte {offset:,}) claims {n:,} tags: it is "
                "not a directory, the file is damaged.",
                _FIX_DAMAGED,
            )
        entry, pointer = (20, 8) if big else (12, 4)
        raw = self.read(offset + head, n * entry + pointer, what)
        (next_offset,) = struct.unpack(o + ("Q" if big else "I"), raw[n * entry :])
        tags: dict[int, np.ndarray | bytes] = {}
        unknown = 0
        inline = 8 if big else 4
        for i in range(n):
            e = raw[i * entry : (i + 1) * entry]
            tag, kind = struct.unpack(o + "HH", e[:4])
            count = struct.unpack(o + ("Q" if big else "I"), e[4 : 4 + pointer])[0]
            if kind not in _TYPE_SIZE:
                unknown += 1
                continue
            if tag not in _WANTED:
                continue
            nbytes = count * _TYPE_SIZE[kind]
            if nbytes <= inline:
                data = e[4 + pointer : 4 + pointer + nbytes]
            else:
                (at,) = struct.unpack(o + ("Q" if big else "I"), e[4 + pointer :])
                data = self.read(at, nbytes, f"tag {tag} of image directory {number}")
            if kind == 2:
                tags[tag] = data
            elif kind in (5, 10):
                tags[tag] = np.frombuffer(data, o + ("u4" if kind == 5 else "i4"))
            elif kind in _TYPE_CODE:
                tags[tag] = np.frombuffer(data, o + _TYPE_CODE[kind]).astype(np.int64)
        if unknown > n // 2:
            raise SlideError(
                self.path,
                f"image directory {number} (at byte {offset:,}) is noise ({unknown} of its "
                f"{n} tags have no valid type): the file is damaged.",
                _FIX_DAMAGED,
            )
        return tags, int(next_offset)


def check_tiff(path: Path) -> None:
    """Refuse a TIFF whose structure cannot be a sound slide (see the module docstring).

    Files that are not TIFF (no TIFF magic) are left to the other readers.  NDPI
    files of 4 GB and more (whose 32-bit offsets wrap) are left to tifffile and
    OpenSlide, which know that quirk.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        header = fh.read(16)
        if header[:4] not in _MAGIC:
            return
        order, big = _MAGIC[header[:4]]
        if big:
            if len(header) < 16:
                raise _truncated(path, 16, size, "the BigTIFF header")
            offsize, zero = struct.unpack(order + "HH", header[4:8])
            if offsize != 8 or zero != 0:
                raise SlideError(path, "has a damaged BigTIFF header.", _FIX_DAMAGED)
            (first,) = struct.unpack(order + "Q", header[8:16])
        else:
            if len(header) < 8:
                raise _truncated(path, 8, size, "the TIFF header")
            (first,) = struct.unpack(order + "I", header[4:8])
        if first == 0:
            raise SlideError(
                path, "holds no image (its first directory pointer is 0).", _FIX_DAMAGED
            )
        _walk(_Reader(path, fh, size, order, big), first)


def _walk(reader: _Reader, first: int) -> None:
    """Every directory chain, sub-IFD chains included, each directory visited once.

    A chain that comes back to one of its own directories, or a sub-IFD that leads
    back to a top-level page, is a loop.  A sub-IFD chain may join a sub-IFD chain
    already walked (tifffile links a page's sub-IFDs one after the other and lists
    them all): the walk just stops there.
    """
    path, size = reader.path, reader.size
    seen: set[int] = set()
    top: set[int] = set()
    chains = [(first, True)]
    number = 0
    while chains:
        offset, is_top = chains.pop()
        here: set[int] = set()
        while offset:
            if offset in here or offset in top:
                raise SlideError(
                    path,
                    f"the image directories form a loop (the directory at byte {offset:,} "
                    "is reached twice): the file is damaged.",
                    _FIX_DAMAGED,
                )
            if offset in seen:
                break  # joins a sub-IFD chain already walked
            if offset < 8:
                raise SlideError(
                    path,
                    f"image directory {number} points into the file header (byte {offset}).",
                    _FIX_DAMAGED,
                )
            if offset >= size:
                raise _truncated(path, offset, size, f"image directory {number}")
            seen.add(offset)
            here.add(offset)
            if is_top:
                top.add(offset)
            if len(seen) > MAX_DIRECTORIES:
                raise SlideError(
                    path,
                    f"has more than {MAX_DIRECTORIES:,} image directories: not a slide "
                    "pyramid (or a damaged one).",
                    "Open slides and pyramidal TIFFs, not image stacks.",
                )
            tags, nxt = reader.directory(offset, number)
            if number == 0 and 65420 in tags and size >= 2**32:
                return  # a large NDPI: its offsets wrap at 4 GB; tifffile and OpenSlide know
            if number == 0 and 270 in tags:
                check_ome_xml(path, tags[270])
            _check_page(path, size, number, tags)
            subifds = np.atleast_1d(tags.get(330, ()))
            chains.extend((int(v), False) for v in subifds[::-1] if v)
            number += 1
            offset = nxt


def _first(tags, tag: int, default: int) -> int:
    values = tags.get(tag)
    if values is None or isinstance(values, bytes) or len(values) == 0:
        return default
    return int(values[0])


def _check_page(path: Path, size: int, number: int, tags) -> None:
    """The declared image of one directory against its tile or strip table and the file."""
    if 256 not in tags or 257 not in tags:
        return  # not an image: the readers say so in their own words
    rows, cols = _first(tags, 257, 0), _first(tags, 256, 0)
    what = f"image {number}"
    if rows == 0 or cols == 0:
        raise SlideError(
            path,
            f"image {number} has zero size ({rows} x {cols} pixels).",
            "The file is damaged or was written wrongly; re-export it.",
        )
    if rows > MAX_SIDE or cols > MAX_SIDE:
        raise SlideError(
            path,
            f"image {number} declares {rows:,} x {cols:,} pixels, more than any slide "
            f"(at most {MAX_SIDE:,} per side): the file is damaged or hostile.",
            _FIX_DAMAGED,
        )
    samples = _first(tags, 277, 1)
    bits = tags.get(258)
    bits = int(np.max(bits)) if isinstance(bits, np.ndarray) and bits.size else 1
    photometric = _first(tags, 262, -1)
    if photometric == 5:
        raise SlideError(
            path,
            f"image {number} is CMYK (photometric 'separated'), which would be read as wrong "
            "colours.",
            _FIX_CONVERT,
        )
    if photometric != 4 and (samples not in (1, 3, 4) or (samples == 4 and photometric != 2)):
        raise SlideError(
            path,
            f"image {number} has {samples} samples per pixel; napari-zoomin reads grey (1), "
            "RGB (3) and RGBA (4) images.",
            _FIX_CONVERT,
        )
    if not 1 <= bits <= 64:
        raise SlideError(path, f"image {number} has {bits} bits per sample.", _FIX_DAMAGED)
    planar = _first(tags, 284, 1)
    planes = samples if planar == 2 else 1
    per_chunk_samples = 1 if planar == 2 else samples
    depth = max(1, _first(tags, 32997, 1))
    if 322 in tags or 323 in tags:
        th, tw = _first(tags, 323, 0), _first(tags, 322, 0)
        unit, name = (th, tw), "tile"
        if th <= 0 or tw <= 0:
            raise SlideError(path, f"{what} has tiles of {th} x {tw} pixels.", _FIX_DAMAGED)
        needed = math.ceil(rows / th) * math.ceil(cols / tw) * planes * depth
        offsets, counts = tags.get(324), tags.get(325)
    else:
        rps = _first(tags, 278, rows)
        if rps <= 0:
            raise SlideError(path, f"{what} has {rps} rows per strip.", _FIX_DAMAGED)
        rps = min(rps, rows)
        unit, name = (rps, cols), "strip"
        needed = math.ceil(rows / rps) * planes * depth
        offsets, counts = tags.get(273), tags.get(279)
    chunk = unit[0] * math.ceil(unit[1] * per_chunk_samples * bits / 8)
    if chunk > MAX_CHUNK_BYTES:
        raise SlideError(
            path,
            f"{what} is stored in {name}s of {unit[0]:,} x {unit[1]:,} pixels "
            f"({chunk / 2**20:,.0f} MB each decoded, more than {MAX_CHUNK_BYTES // 2**20} MB).",
            "Convert it to a tiled pyramidal TIFF (vips tiffsave --tile --pyramid).",
        )
    if not isinstance(offsets, np.ndarray) or not isinstance(counts, np.ndarray):
        return  # no data table: the readers refuse it
    if len(offsets) < needed or len(counts) < needed:
        raise SlideError(
            path,
            f"{what} declares {rows:,} x {cols:,} pixels in {name}s of {unit[0]:,} x "
            f"{unit[1]:,}, which needs {needed:,} {name}s, but its {name} table lists "
            f"{min(len(offsets), len(counts)):,}: the file is damaged.",
            _FIX_DAMAGED,
        )
    offsets, counts = offsets[:needed], counts[:needed]
    present = counts > 0
    if not present.any():
        raise SlideError(
            path,
            f"{what} holds no image data (every {name}'s byte count is 0): the file is damaged.",
            _FIX_DAMAGED,
        )
    if (offsets[present] < 8).any():
        raise SlideError(
            path,
            f"{what}: {int((offsets[present] < 8).sum()):,} {name}s point at the file header "
            "(offset 0): the file is damaged.",
            _FIX_DAMAGED,
        )
    end = int((offsets + counts).max())
    if end > size:
        raise _truncated(path, end, size, f"the image data of page {number}")
    if _first(tags, 259, 1) == 1:  # uncompressed: the bytes of every pixel must be there
        need = rows * math.ceil(cols * samples * bits / 8) * depth
        have = int(counts.sum())
        if have < need:
            raise SlideError(
                path,
                f"{what} holds {have:,} bytes of uncompressed pixels, but {rows:,} x {cols:,} "
                f"pixels need {need:,}: the file is damaged.",
                _FIX_DAMAGED,
            )


def check_ome_xml(path: Path, description: bytes) -> None:
    """Refuse OME-XML (a first-page description that is XML) that declares a DOCTYPE or
    entities, or that is not well-formed: parsed by expat with those refused, as ASAP
    annotations are, so nothing is ever expanded or fetched."""
    text = description[:MAX_XML_BYTES].rstrip(b"\0").lstrip()
    if not text.startswith(b"<") or (b"<OME" not in text and b"<?xml" not in text[:64]):
        return
    safe_xml(path, text, "OME-XML")


def safe_xml(path: Path | None, data: bytes, what: str):
    """Parse ``data`` with DOCTYPE and entity declarations refused: an ElementTree root.

    Raises :class:`SlideError` naming the file for a declaration or malformed XML.
    """
    from xml.etree import ElementTree
    from xml.parsers import expat

    unsafe = SlideError(
        path,
        f"its {what} contains a DOCTYPE or ENTITY declaration, which is refused for safety.",
        "Export the slide again, or convert it to a plain pyramidal TIFF.",
    )
    if has_declaration(data):
        raise unsafe

    def refuse(*_args) -> None:
        raise unsafe

    parser = parser_refusing_declarations(refuse)
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise SlideError(
            path,
            f"its {what} is not well-formed XML ({exc}).",
            "Export the slide again, or convert it to a plain pyramidal TIFF.",
        ) from None
    return ElementTree.fromstring(data)  # safe now: no DTD, so no entity to expand
