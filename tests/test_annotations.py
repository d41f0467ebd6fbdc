"""ROI annotations: QuPath GeoJSON and ASAP XML files, atomic writes, exact ROI masks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from napari_zoomin.annotations import (
    Annotation,
    AnnotationIndex,
    geojson,
    raster,
    rasterize,
    rasterize_region,
    read_annotations,
    read_asap_xml,
    read_geojson,
    write_geojson,
)
from napari_zoomin.errors import AnnotationError
from napari_zoomin.geometry import scaled_size

K = raster.DEFAULT_SUPERSAMPLE


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(rings, props=None, kind="Polygon"):
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": rings},
        "properties": {} if props is None else props,
    }


def _write_json(path, doc):
    path.write_text(json.dumps(doc))
    return path


# --------------------------------------------------------------------------- model


def test_annotation_model_orders_and_shapes():
    a = Annotation(np.array([[10.0, 20.0], [30.0, 20.0], [30.0, 50.0], [10.0, 20.0]]))
    assert a.polygon.shape == (3, 2)  # closing vertex dropped
    assert a.label == "Tumor" and a.holes == ()
    assert not a.polygon.flags.writeable
    np.testing.assert_array_equal(a.rows_cols(), [[20, 10], [20, 30], [50, 30]])
    b = Annotation.from_rows_cols(a.rows_cols())
    assert b == a and hash(b) == hash(a)

    r = Annotation.rectangle(top=32, left=16, height=32, width=32, label="Stroma")
    np.testing.assert_array_equal(r.polygon, [[16, 32], [48, 32], [48, 64], [16, 64]])
    assert r.bounds == (16, 32, 48, 64) and r.area == 32 * 32 and r.label == "Stroma"

    e = Annotation.ellipse(cy=100, cx=200, ry=30, rx=50, n=64)
    assert e.polygon.shape == (64, 2)
    assert e.bounds == pytest.approx((150, 70, 250, 130), abs=1e-9)
    assert e.area == pytest.approx(math.pi * 30 * 50, rel=2e-3)

    with pytest.raises(ValueError, match="at least 3"):
        Annotation(np.array([[0.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(ValueError, match="NaN"):
        Annotation(np.array([[0.0, 0.0], [1.0, np.nan], [2.0, 0.0]]))
    assert Annotation.rectangle(0, 0, 1, 1, "exclusion").is_exclusion


# --------------------------------------------------------------------------- GeoJSON


def test_geojson_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    outer = rng.uniform(0, 1e5, (7, 2)) + 1 / 3  # non-representable decimals
    hole = np.array([[10.1, 10.2], [20.3, 10.4], [15.5, 20.6]])
    anns = [
        Annotation(outer, "Tumor", (hole,)),
        Annotation.ellipse(500.25, 700.125, 40.5, 60.75, "Necrosis"),
        Annotation.rectangle(1, 2, 3, 4, "Exclusion"),
        Annotation.rectangle(1, 2, 3, 4, "my class ü"),
    ]
    path = write_geojson(tmp_path / "s.geojson", anns, properties={"note": "x"})
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 4
    f0 = doc["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert f0["properties"]["note"] == "x"
    ring = f0["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 8  # closed
    assert len(f0["geometry"]["coordinates"]) == 2  # exterior + hole

    back = read_geojson(path)
    assert list(back) == anns
    assert back.skipped == {} and back.path == path
    assert all(isinstance(a.polygon, np.ndarray) for a in back)
    np.testing.assert_array_equal(back[0].holes[0], hole)


def test_qupath_variants(tmp_path):
    poly = _square(0, 0, 10, 10)
    with_hole = [_square(0, 0, 100, 100), _square(10, 10, 20, 20)]
    features = [
        _feature([poly], {"classification": {"name": "Stroma", "color": [1, 2, 3]}}),
        _feature([poly], {"name": "Named only"}),
        _feature([poly]),  # classification missing
        _feature(with_hole, {"classification": {"name": "Tumor"}}),
        _feature(
            [[_square(0, 0, 5, 5)], [_square(50, 50, 60, 60)]],
            {"classification": {"name": "Tumor"}},
            kind="MultiPolygon",
        ),
        _feature([1.0, 2.0], kind="Point"),
        _feature([[0, 0], [5, 5]], kind="LineString"),
        _feature([poly], {"objectType": "detection", "classification": {"name": "Tumor"}}),
    ]
    fc = read_geojson(
        _write_json(tmp_path / "fc.geojson", {"type": "FeatureCollection", "features": features})
    )
    assert [a.label for a in fc] == ["Stroma", "Named only", "Tumor", "Tumor", "Tumor", "Tumor"]
    assert fc.skipped == {"Point": 1, "LineString": 1, "detection": 1}
    assert len(fc[3].holes) == 1 and fc[3].area == 100 * 100 - 10 * 10
    np.testing.assert_array_equal(fc[5].polygon, [[50, 50], [60, 50], [60, 60], [50, 60]])

    bare_list = read_geojson(_write_json(tmp_path / "list.json", features))
    assert list(bare_list) == list(fc)
    single = read_annotations(_write_json(tmp_path / "one.json", features[0]))
    assert len(single) == 1 and single[0].label == "Stroma"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not GeoJSON annotations"),
        ('{"type": "FeatureCollection", "features": 3}', "no list of features"),
        (json.dumps([_feature([[[0, 0], [1, "x"], [2, 0]]])]), "not a pair of numbers"),
        (json.dumps([_feature([[[0, 0], [1, True], [2, 0]]])]), "not a pair of numbers"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            "[[[0, 0], [1, NaN], [2, 0], [0, 0]]]}}]",
            "NaN",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            "[[[0, 0], [1, 1e400], [2, 0]]]}}]",
            "infinite",
        ),
        (json.dumps([_feature([[[0, 0], [5, 5], [0, 0]]])]), "2 distinct points"),
        (json.dumps([_feature([_square(0, 0, 9, 9), [[1, 1], [2, 2]]])]), "ring 1"),
        (json.dumps([_feature([[0, 0]], kind="Circle")]), "unsupported geometry"),
        (json.dumps([3]), "not a GeoJSON Feature"),
    ],
)
def test_bad_geojson_names_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=problem) as info:
        read_annotations(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_missing_file_and_unknown_extension(tmp_path):
    for name in ("nope.geojson", "nope.xml"):
        with pytest.raises(AnnotationError, match="not found") as info:
            read_annotations(tmp_path / name)
        assert name in str(info.value)
    other = tmp_path / "ann.csv"
    other.write_text("x,y\n")
    with pytest.raises(AnnotationError, match=r"\.geojson, \.json, \.xml") as info:
        read_annotations(other)
    assert str(other) in str(info.value)


# --------------------------------------------------------------------------- ASAP XML

ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="64" Y="64" />
        <Coordinate Order="0" X="0" Y="0" />
        <Coordinate Order="3" X="0" Y="64" />
        <Coordinate Order="1" X="64" Y="0" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Rectangle" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="128.5" Y="0" />
        <Coordinate Order="1" X="160.5" Y="0" />
        <Coordinate Order="2" X="160.5" Y="32" />
        <Coordinate Order="3" X="128.5" Y="32" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="16" Y="16" />
        <Coordinate Order="1" X="32" Y="16" />
        <Coordinate Order="2" X="32" Y="32" />
        <Coordinate Order="3" X="16" Y="32" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 3" Type="Polygon" PartOfGroup="My Exclusions">
      <Coordinates>
        <Coordinate Order="0" X="48" Y="48" />
        <Coordinate Order="1" X="80" Y="48" />
        <Coordinate Order="2" X="80" Y="80" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Dot" Type="Dot" PartOfGroup="_0">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
    <Annotation Name="Set" Type="PointSet" PartOfGroup="_0">
      <Coordinates><Coordinate Order="0" X="5" Y="5" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml_tumour_and_exclusions(tmp_path):
    path = tmp_path / "tumor_001.xml"
    path.write_text(ASAP)
    anns = read_annotations(path)
    assert [a.label for a in anns] == ["Tumor", "Tumor", "Exclusion", "Exclusion"]
    assert anns.skipped == {"Dot": 1, "PointSet": 1}
    np.testing.assert_array_equal(anns[0].polygon, [[0, 0], [64, 0], [64, 64], [0, 64]])
    assert anns[1].bounds == (128.5, 0, 160.5, 32)

    # The exclusions remove their area from the tumour ROI, at level 0 and at 1/16.
    roi = rasterize(anns, (96, 192), 1.0)
    tumour_only = rasterize([a for a in anns if not a.is_exclusion], (96, 192), 1.0)
    assert tumour_only.sum() == pytest.approx(64 * 64 + 32 * 32)
    excluded = 16 * 16 + (64 - 48) * (64 - 48) / 2  # square + the triangle's part inside
    assert roi.sum() == pytest.approx(64 * 64 - excluded + 32 * 32)
    assert roi[16:32, 16:32].max() == 0 and roi[0:16, 0:64].min() == 1
    coarse = rasterize(anns, (96, 192), 1 / 16)
    assert coarse.shape == (6, 12)
    assert coarse[1, 1] == 0 and coarse[0, 0] == 1 and coarse[3, 3] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">]>\n'
            "<ASAP_Annotations>&lol;</ASAP_Annotations>",
            "DOCTYPE or ENTITY",
        ),
        ("<ASAP_Annotations><Annotations>", "not valid XML"),
        ("<svg></svg>", "not an ASAP annotation file"),
        (ASAP.replace('X="64" Y="64"', 'X="nan" Y="64"'), "NaN"),
        (ASAP.replace('X="64" Y="64"', 'X="sixty" Y="64"'), "numeric Order, X and Y"),
        (
            ASAP.replace('<Coordinate Order="3" X="0" Y="64" />', "").replace(
                '<Coordinate Order="1" X="64" Y="0" />', ""
            ),
            "2 distinct points",
        ),
    ],
)
def test_bad_asap_xml_names_the_file(tmp_path, content, problem):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=problem) as info:
        read_asap_xml(path)
    assert str(path) in str(info.value)


def test_bad_xml_entity_in_utf16_is_refused(tmp_path):
    path = tmp_path / "utf16.xml"
    doc = '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE a [<!ENTITY b "c">]><a>&b;</a>'
    path.write_bytes(doc.encode("utf-16"))
    with pytest.raises(AnnotationError, match="DOCTYPE or ENTITY"):
        read_asap_xml(path)


# --------------------------------------------------------------------------- writer


def test_atomic_write_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "slide.geojson"
    old = [Annotation.rectangle(0, 0, 10, 10)]
    write_geojson(path, old)
    before = path.read_bytes()

    real_open = geojson.atomic_open

    @contextlib.contextmanager
    def half_then_fail(*args, **kwargs):
        with real_open(*args, **kwargs) as f:

            class Half:
                def write(self, text):
                    f.write(text[: len(text) // 2])  # half a file
                    raise RuntimeError("disk unplugged")

            yield Half()

    monkeypatch.setattr(geojson, "atomic_open", half_then_fail)
    with pytest.raises(RuntimeError, match="disk unplugged"):
        write_geojson(path, [Annotation.rectangle(5, 5, 1, 1, "Stroma")])
    monkeypatch.setattr(geojson, "atomic_open", real_open)

    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["slide.geojson"]  # no temp file left
    assert list(read_geojson(path)) == old

    missing_dir = tmp_path / "gone" / "x.geojson"
    with pytest.raises(AnnotationError, match="cannot be written") as info:
        write_geojson(missing_dir, old)
    assert str(missing_dir) in str(info.value)


# --------------------------------------------------------------------------- rasterise


@pytest.mark.parametrize("scale", [1.0, 0.5, 1 / 16])
def test_rasterize_exact_rectangle(scale):
    # x ∈ [16, 48), y ∈ [32, 64): output pixels i ∈ [32s, 64s), j ∈ [16s, 48s).
    rect = Annotation.rectangle(top=32, left=16, height=32, width=32)
    m = rasterize([rect], (128, 96), scale)
    assert m.dtype == np.float32
    assert m.shape == (scaled_size(128, scale), scaled_size(96, scale))
    expected = np.zeros(m.shape, np.float32)
    expected[int(32 * scale) : int(64 * scale), int(16 * scale) : int(48 * scale)] = 1
    np.testing.assert_array_equal(m, expected)
    if scale == 1 / 16:
        assert set(zip(*np.nonzero(m), strict=True)) == {(2, 1), (2, 2), (3, 1), (3, 2)}


def test_rasterize_partial_coverage():
    s = 1 / 16
    # Half of pixel (0, 0) in x (exact along x), a diagonal half, and a horizontal edge
    # inside a sub-row (midpoint rule: within 1/(2k)).
    left_half = rasterize([Annotation.rectangle(0, 0, 16, 8)], (16, 16), s)
    assert left_half.shape == (1, 1) and left_half[0, 0] == 0.5
    triangle = Annotation(np.array([[0.0, 0.0], [16.0, 0.0], [0.0, 16.0]]))
    assert rasterize([triangle], (16, 16), s)[0, 0] == pytest.approx(0.5, abs=1e-6)
    top_part = rasterize([Annotation.rectangle(0, 0, 8.3, 16)], (16, 16), s)[0, 0]
    assert abs(top_part - 8.3 / 16) <= 1 / (2 * K)
    # Overlapping annotations are a union, not a sum; labels select the ROI.
    a = Annotation.rectangle(0, 0, 16, 10, "Tumor")
    b = Annotation.rectangle(0, 6, 16, 10, "Stroma")
    assert rasterize([a, b], (16, 16), s)[0, 0] == 1.0
    assert rasterize([a, b], (16, 16), s, labels={"Stroma"})[0, 0] == 10 / 16
    assert rasterize([a, b], (16, 16), s, labels=set())[0, 0] == 0
    # Holes are subtracted.
    ring = Annotation(
        np.array(_square(0, 0, 16, 16)[:-1], float),
        holes=(np.array(_square(4, 4, 12, 12)[:-1], float),),
    )
    assert rasterize([ring], (16, 16), s)[0, 0] == 1 - 64 / 256


def test_rasterize_ellipse_area():
    e = Annotation.ellipse(cy=300, cx=400, ry=120, rx=200, n=256)
    for s in (1.0, 1 / 4, 1 / 16):
        m = rasterize([e], (600, 800), s)
        assert m.min() >= 0 and m.max() == 1
        assert m.sum() / s**2 == pytest.approx(e.area, rel=1e-3)
        assert m.sum() / s**2 == pytest.approx(math.pi * 120 * 200, rel=1e-3)


def test_rasterize_clips_to_slide_and_handles_rounding():
    big = Annotation.rectangle(-50, -50, 500, 500)
    m = rasterize([big], (100, 90), 1 / 16)  # 100/16 = 6.25 → 6 rows, 90/16 → 6 cols
    assert m.shape == (6, 6)
    assert m[:, :5].min() == 1 and m[0, 5] == pytest.approx((90 - 80) / 16)
    m = rasterize([big], (104, 90), 1 / 16)  # 6.5 → 7 rows; the 7th is half outside
    assert m.shape == (7, 6) and m[6, 0] == pytest.approx((104 - 96) / 16)


def test_rasterize_region_borders_outside_and_consistency():
    rng = np.random.default_rng(1)
    anns = [
        Annotation.ellipse(*rng.uniform(0, 1024, 2), *rng.uniform(20, 200, 2), label=lab)
        for lab in ["Tumor"] * 12 + ["Exclusion"] * 3
    ]
    anns.append(Annotation.rectangle(-100, -100, 300, 300))  # crosses the slide corner
    shape = (1024, 1280)
    index = AnnotationIndex(anns)
    tile = 256
    for s in (1.0, 1 / 2, 1 / 16):
        full = rasterize(index, shape, s)
        assert np.array_equal(full, rasterize(anns, shape, s))
        step = round(1 / s)  # tiles aligned to the scale grid
        n = scaled_size(tile, s)
        for top, left in [(0, 0), (256, 384), (768, 1024), (step * 3, step * 5), (896, 1152)]:
            got = rasterize_region(index, (top, left, tile, tile), s, shape_level0=shape)
            assert got.shape == (n, n)
            i, j = round(top * s), round(left * s)
            crop = full[i : i + n, j : j + n]
            np.testing.assert_allclose(got[: crop.shape[0], : crop.shape[1]], crop, atol=1e-6)
            if crop.shape != got.shape:  # the part beyond the slide's edge
                assert got[crop.shape[0] :].max() == 0 and got[:, crop.shape[1] :].max() == 0

    # A tile half outside the slide: zero outside with shape_level0, the ROI without.
    corner = [Annotation.rectangle(-100, -100, 300, 300)]
    got = rasterize_region(corner, (-64, -64, 128, 128), 1.0, shape_level0=shape)
    assert got.shape == (128, 128)
    assert got[:64].max() == 0 and got[:, :64].max() == 0 and got[64:, 64:].min() == 1
    assert rasterize_region(corner, (-64, -64, 128, 128), 1.0).min() == 1
    # Entirely outside the slide, and far from every annotation.
    assert rasterize_region(anns, (5000, 5000, 64, 64), 1.0, shape_level0=shape).max() == 0
    assert rasterize_region(anns, (5000, 5000, 64, 64), 1 / 4).shape == (16, 16)
    assert rasterize_region([], (0, 0, 10, 10), 1.0).max() == 0


def test_rasterize_in_strips_matches_one_pass(monkeypatch):
    anns = [Annotation.ellipse(300, 400, 250, 380, n=97), Annotation.rectangle(100, 50, 7.5, 600)]
    anns.append(Annotation.ellipse(310, 390, 60, 90, "Exclusion"))
    one_pass = rasterize(anns, (640, 800), 1 / 4)
    monkeypatch.setattr(raster, "_STRIP_PIXELS", 3 * 202)  # 3 output rows per strip
    np.testing.assert_array_equal(rasterize(anns, (640, 800), 1 / 4), one_pass)


def test_rasterize_large_slide_is_cheap():
    e = Annotation.ellipse(50_000, 50_000, 40_000, 45_000, n=2000)
    x = Annotation.rectangle(30_000, 30_000, 20_000, 20_000, "Exclusion")  # inside e
    m = rasterize([e, x], (100_000, 100_000), 1 / 64)
    assert m.shape == (1563, 1563)  # 1562.5 rounds up
    expected = e.area - 20_000**2
    assert m.sum() * 64**2 == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------------- numpy only


def test_reading_annotations_never_loads_torch(tmp_path):
    """Annotations and tissue detection are numpy only: a reader or a mask needs no torch."""
    path = tmp_path / "slide.geojson"
    write_geojson(path, [Annotation.rectangle(0, 0, 10, 20), Annotation.ellipse(5, 5, 3, 4)])
    code = f"""
import sys
import napari_zoomin.annotations as a
anns = a.read_annotations({str(path)!r})
assert len(anns) == 2, anns
a.rasterize(anns, (16, 32), 0.5)
assert "torch" not in sys.modules, "napari_zoomin.annotations loaded torch"
import napari_zoomin.engine.tissue
assert "torch" not in sys.modules, "napari_zoomin.engine.tissue loaded torch"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
