"""Full-tissue benchmark slides of real H&E, written by other tools than the project's own.

* :func:`write_vips_slide`: a JPEG pyramid written by libvips (``pyvips``, the
  ``bench`` extra), the tool many labs convert slides with: CMU-1-Small-Region's
  densest 2048 × 1024 crop, mirrored into a seamless 4096 × 2048 motif and tiled
  over the whole image, so there is tissue everywhere (a sample slide has about a
  quarter).  100,000² takes about 2.5 minutes and 13.5 GB.
* :func:`write_lazy_slide`: a BigTIFF written here tag by tag whose tiles *share
  bytes*: each level holds a bank of 64 real JPEG tiles (the same crop at that level's
  scale) and every tile offset points into the bank, chosen by a hash of its
  position.  A 200,000² slide (40 gigapixels) is then a 30 MB file written in seconds,
  yet every read decodes real JPEG tiles of real tissue: time and memory grow with
  the slide as on a scanned one.  OpenSlide and tifffile both read it.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MPP = 0.499  # CMU-1-Small-Region's pixel size
TILE = 256
BANK = 64


def _motif() -> np.ndarray:
    """Sample recipe 1's seamless motif: CMU-1-Small-Region's densest crop, mirrored."""
    from napari_zoomin.samples.synthetic import load_motif_source, mirror_motif

    return mirror_motif(load_motif_source())


def write_vips_slide(path: str | Path, size: int) -> Path:
    """A ``size``² full-tissue JPEG pyramid (quality 90, 256² tiles) written by libvips."""
    import pyvips

    path = Path(path)
    motif = _motif()
    image = pyvips.Image.new_from_array(motif)
    across = -(-size // motif.shape[1])
    down = -(-size // motif.shape[0])
    image = image.replicate(across, down).crop(0, 0, size, size)
    partial = path.with_name(f".{path.name}.partial")
    image.tiffsave(
        str(partial),
        tile=True,
        tile_width=TILE,
        tile_height=TILE,
        pyramid=True,
        compression="jpeg",
        Q=90,
        bigtiff=True,
        xres=1000 / MPP,  # pixels per mm
        yres=1000 / MPP,
    )
    partial.replace(path)
    return path


def _entry(tag: int, typ: int, values) -> tuple[int, int, bytes]:
    fmt = {3: "H", 4: "I", 5: "II", 16: "Q"}[typ]
    values = list(values)
    if typ == 5:
        data = b"".join(struct.pack("<II", *v) for v in values)
    else:
        data = struct.pack(f"<{len(values)}{fmt}", *values)
    return tag, typ, len(values), data


def write_lazy_slide(path: str | Path, size: int) -> Path:
    """A ``size``² full-tissue BigTIFF pyramid whose tiles share a bank of real JPEG tiles."""
    import imagecodecs

    from napari_zoomin.geometry import mean_2x2

    path = Path(path)
    motif = _motif()
    shapes = [(size, size)]
    while max(shapes[-1]) > 1024:
        shapes.append((shapes[-1][0] // 2, shapes[-1][1] // 2))
    rng = np.random.default_rng(0)
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as fh:
        fh.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))  # first IFD offset patched later
        level_motif = motif
        ifds = []
        for level, (rows, cols) in enumerate(shapes):
            if level:
                level_motif = mean_2x2(level_motif)
            # the bank: BANK tiles cut at random from this level's motif, repeated (it is
            # seamless) to at least two tiles a side: at 1/16 it is smaller than one
            reps = (-(-2 * TILE // level_motif.shape[0]), -(-2 * TILE // level_motif.shape[1]))
            source = np.tile(level_motif, (*reps, 1))
            h, w = source.shape[:2]
            offsets, counts = [], []
            for _ in range(BANK):
                y = int(rng.integers(0, h - TILE + 1))
                x = int(rng.integers(0, w - TILE + 1))
                tile = np.ascontiguousarray(source[y : y + TILE, x : x + TILE])
                data = imagecodecs.jpeg8_encode(
                    tile, level=90, colorspace="RGB", outcolorspace="YCBCR", subsampling=(1, 1)
                )
                offsets.append(fh.tell())
                counts.append(len(data))
                fh.write(data)
            ty, tx = -(-rows // TILE), -(-cols // TILE)
            yy, xx = np.meshgrid(np.arange(ty, dtype=np.uint64), np.arange(tx, dtype=np.uint64))
            pick = (yy.T * np.uint64(2654435761) + xx.T * np.uint64(40503)) % np.uint64(BANK)
            pick = pick.reshape(-1).astype(np.int64)
            ifds.append((level, rows, cols, np.asarray(offsets)[pick], np.asarray(counts)[pick]))
        res = (round(1e4 / MPP * 1000), 1000)  # pixels per cm as a rational
        previous = 4 + 4  # the header's IFD-offset field (after "II", 43, 8, 0)
        for level, rows, cols, offs, cnts in ifds:
            tags = [
                _entry(254, 4, [1 if level else 0]),
                _entry(256, 4, [cols]),
                _entry(257, 4, [rows]),
                _entry(258, 3, [8, 8, 8]),
                _entry(259, 3, [7]),
                _entry(262, 3, [6]),
                _entry(277, 3, [3]),
                _entry(282, 5, [res]),
                _entry(283, 5, [res]),
                _entry(284, 3, [1]),
                _entry(296, 3, [3]),
                _entry(322, 3, [TILE]),
                _entry(323, 3, [TILE]),
                _entry(324, 16, offs.tolist()),
                _entry(325, 16, cnts.tolist()),
                _entry(530, 3, [1, 1]),
                _entry(532, 5, [(0, 1), (255, 1), (128, 1), (255, 1), (128, 1), (255, 1)]),
            ]
            # out-of-line values first, then the IFD that points at them
            placed = []
            for tag, typ, count, data in tags:
                if len(data) > 8:
                    if fh.tell() % 2:
                        fh.write(b"\0")
                    placed.append((tag, typ, count, struct.pack("<Q", fh.tell())))
                    fh.write(data)
                else:
                    placed.append((tag, typ, count, data.ljust(8, b"\0")))
            if fh.tell() % 2:
                fh.write(b"\0")
            here = fh.tell()
            fh.seek(previous)
            fh.write(struct.pack("<Q", here))
            fh.seek(here)
            fh.write(struct.pack("<Q", len(placed)))
            for tag, typ, count, value in placed:
                fh.write(struct.pack("<HHQ", tag, typ, count) + value)
            previous = fh.tell()
            fh.write(struct.pack("<Q", 0))
    partial.replace(path)
    return path


__all__ = ["write_lazy_slide", "write_vips_slide"]
