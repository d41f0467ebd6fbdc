"""ROI conversions without Qt: napari shapes/labels data ↔ annotations in level-0 pixels."""

from __future__ import annotations

import numpy as np
import pytest

from napari_zoomin.annotations import Annotation, rasterize, rasterize_region
from napari_zoomin.napari import roi_shapes
from napari_zoomin.napari.roi_shapes import (
    annotations_to_shapes,
    keyhole_ring,
    labels_to_annotations,
    level0_to_world,
    mask_outlines,
    nearest_level,
    roi_labels_placement,
    roi_shapes_placement,
    shapes_to_annotations,
    world_to_level0,
)

#: a slide layer at 0.5 µm/px, shifted: level-0 pixel (r, c) has its centre at world
#: (100 + 0.5 r, −60 + 0.5 c)
FRAME = ((0.5, 0.5), (100.0, -60.0))


def world(points_yx):
    return level0_to_world(np.asarray(points_yx, dtype=np.float64), FRAME)


def test_world_and_level0_frames():
    # napari centres level-0 pixel (r, c) at world t + s·(r, c); in the annotation
    # convention that pixel is [r, r+1) × [c, c+1), so its centre is (r + ½, c + ½)
    np.testing.assert_array_equal(world_to_level0([[100.0, -60.0]], FRAME), [[0.5, 0.5]])
    np.testing.assert_array_equal(
        world([[0.0, 0.0], [1024.0, 512.0]]), [[99.75, -60.25], [611.75, 195.75]]
    )
    points = np.array([[3.25, 7.5], [1000.0, 2.0]])
    np.testing.assert_array_equal(world_to_level0(world(points), FRAME), points)
    # the ROI shapes layer: data = level-0 annotation coordinates
    scale, translate = roi_shapes_placement(FRAME)
    assert scale == (0.5, 0.5) and translate == (99.75, -60.25)
    np.testing.assert_array_equal(np.asarray(translate) + np.asarray(scale) * points, world(points))


def test_shapes_become_exact_annotations_and_masks():
    rect = world([[1024, 512], [1024, 1024], [1280, 1024], [1280, 512]])  # napari's corner order
    triangle = world([[2048, 2048], [2048, 2560], [2560, 2048]])
    ellipse = world([[840, 2680], [1160, 2680], [1160, 3320], [840, 3320]])  # centre (1000, 3000)
    line = world([[0, 0], [10, 10]])
    # data in world coordinates: a layer at scale 1, translate 0
    anns, skipped = shapes_to_annotations(
        [rect, triangle, ellipse, line],
        ["rectangle", "polygon", "ellipse", "line"],
        ["Tumor", "Tumor", "Exclusion", "Tumor"],
        layer_scale=(1.0, 1.0),
        layer_translate=(0.0, 0.0),
        frame=FRAME,
    )
    assert skipped == {"line": 1}
    assert anns[0] == Annotation.rectangle(top=1024, left=512, height=256, width=512)
    assert anns[1] == Annotation(np.array([[2048.0, 2048.0], [2560.0, 2048.0], [2048.0, 2560.0]]))
    assert anns[2] == Annotation.ellipse(1000, 3000, 160, 320, "Exclusion", n=64)

    # ROI masks at 1/16 and 1/4: the rectangle is exactly its pixels, the triangle its area
    shape = (4096, 4096)
    tumour = rasterize(anns, shape, 1 / 16, labels=["Tumor"])
    expected = np.zeros((256, 256), np.float32)
    expected[64:80, 32:64] = 1.0
    np.testing.assert_array_equal(tumour[:100, :100], expected[:100, :100])
    assert tumour.sum() == pytest.approx(16 * 32 + 512 * 512 / 2 / 256, abs=0.5)
    quarter = rasterize_region(anns[:1], (1000, 500, 300, 540), 1 / 4)
    assert quarter.shape == (75, 135)
    assert quarter.sum() == 64 * 128 and quarter[6:70, 3:131].min() == 1.0
    # the exclusion ellipse is subtracted where it overlaps a tumour annotation
    with_ellipse = [*anns[:2], Annotation.rectangle(800, 2600, 400, 800), anns[2]]
    mask = rasterize(with_ellipse, shape, 1 / 16)
    area = np.pi * 160 * 320 * np.sin(2 * np.pi / 64) * 64 / (2 * np.pi)
    assert mask[50:75, 162:213].sum() == pytest.approx((400 * 800 - area) / 256, abs=0.5)


def test_rotated_ellipse_and_rectangle_keep_their_geometry():
    c = np.array([500.0, 700.0])
    a, b = np.array([30.0, 40.0]), np.array([-80.0, 60.0])  # half-axes, perpendicular
    box = np.stack([c - a - b, c + a - b, c + a + b, c - a + b])
    anns, _ = shapes_to_annotations(
        [box, box],
        ["ellipse", "rectangle"],
        ["Tumor", "Tumor"],
        layer_scale=(1.0, 1.0),
        layer_translate=(0.0, 0.0),
        frame=((1.0, 1.0), (0.5, 0.5)),
    )
    ellipse, rectangle = anns
    n = roi_shapes.ELLIPSE_VERTICES
    assert ellipse.area == pytest.approx(np.pi * 50 * 100 * np.sin(2 * np.pi / n) * n / (2 * np.pi))
    assert rectangle.area == pytest.approx(100 * 200)
    np.testing.assert_allclose(ellipse.polygon.mean(axis=0), c[::-1])


def test_polygons_with_holes_round_trip_through_keyhole_shapes():
    hole1 = np.array([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0]])
    hole2 = np.array([[50.0, 50.0], [60.0, 50.0], [60.0, 60.0], [50.0, 60.0]])
    square = np.array([[0.0, 0.0], [100.0, 0.0], [100.0, 100.0], [0.0, 100.0]])
    holed = Annotation(square, "Tumor", (hole1, hole2))
    plain = Annotation(np.array([[200.0, 0.0], [300.0, 0.0], [250.0, 50.0]]), "Stroma")
    data, types, labels, rings = annotations_to_shapes([holed, plain])
    assert types == ["polygon", "polygon"] and labels == ["Tumor", "Stroma"]
    assert rings == ["4,3,4", ""]
    np.testing.assert_array_equal(data[1], plain.rows_cols())
    level0 = {"layer_scale": (0.5, 0.5), "layer_translate": (99.75, -60.25), "frame": FRAME}
    back, _ = shapes_to_annotations(data, types, labels, rings=rings, **level0)
    assert back == [holed, plain]
    # an edited keyhole (ring sizes no longer fit) is kept as one ring: the same mask
    edited, _ = shapes_to_annotations(data[:1], types[:1], labels[:1], **level0)
    assert not edited[0].holes
    mask = rasterize([holed], (128, 128), 1.0)
    np.testing.assert_allclose(rasterize(edited, (128, 128), 1.0), mask, atol=1e-6)
    assert mask.sum() == pytest.approx(100 * 100 - 50 - 100, abs=0.1)
    ring, sizes = keyhole_ring(holed)
    assert sizes == "4,3,4" and len(ring) == 4 + (1 + 3 + 1) + (1 + 4 + 1)


def test_mask_outlines_are_exact_for_any_mask():
    rng = np.random.default_rng(7)
    for _ in range(60):
        h, w = rng.integers(1, 24, 2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        outlines = mask_outlines(mask)
        anns = [Annotation.from_rows_cols(ext, "Tumor", tuple(holes)) for ext, holes in outlines]
        np.testing.assert_array_equal(rasterize(anns, (h, w), 1.0), mask.astype(np.float32))
    # diagonal neighbours are separate regions; a ring of pixels has a hole
    diagonal = np.array([[1, 0], [0, 1]], bool)
    assert len(mask_outlines(diagonal)) == 2
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    ((exterior, holes),) = mask_outlines(ring)
    assert sorted(map(tuple, exterior)) == [(0, 0), (0, 5), (5, 0), (5, 5)]
    assert [sorted(map(tuple, h)) for h in holes] == [[(2, 2), (2, 3), (3, 2), (3, 3)]]


def test_painted_labels_become_annotations_of_the_painted_level0_area():
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 30:35] = 1
    labels[40:50, 40:50] = 2
    labels[44:46, 44:46] = 0  # a hole
    anns = labels_to_annotations(labels, (16.0, 16.0), {1: "Tumor", 2: "Stroma"})
    assert [a.label for a in anns] == ["Tumor", "Stroma"]
    assert anns[0] == Annotation.rectangle(top=160, left=480, height=160, width=80)
    assert anns[1].area == 160 * 160 - 32 * 32 and len(anns[1].holes) == 1
    # at the painted level the mask is the painting; at level 0 the covered pixels
    np.testing.assert_array_equal(
        rasterize(anns, (1024, 1024), 1 / 16, labels=["Tumor", "Stroma"]), labels > 0
    )
    level0 = rasterize_region(anns, (150, 470, 180, 100), 1.0, labels=["Tumor"])
    assert level0.sum() == 160 * 80 and level0[10:170, 10:90].min() == 1.0


def test_labels_layer_placement_centres_level_pixels_on_their_level0_squares():
    scale, translate, downsample = roi_labels_placement(FRAME, (4096, 4096), (256, 256))
    assert downsample == (16.0, 16.0) and scale == (8.0, 8.0)
    # level pixel j covers level-0 [16 j, 16 j + 16): napari centres it at 16 j + 7.5
    assert translate == (100.0 + 0.5 * 7.5, -60.0 + 0.5 * 7.5)
    j = np.array([3.0, 5.0])
    centre = np.asarray(translate) + np.asarray(scale) * j
    first, last = level0_to_world(16 * j + 0.5, FRAME), level0_to_world(16 * j + 15.5, FRAME)
    np.testing.assert_array_equal(centre, (first + last) / 2)
    # non-square and non-integer downsamples (odd level-0 sizes)
    _, _, d = roi_labels_placement(FRAME, (1001, 3000), (500, 1500))
    assert d == (1001 / 500, 2.0)
    assert nearest_level([1.0, 4.0, 16.0, 64.0]) == 2
    assert nearest_level([1.0, 2.0, 4.0]) == 2 and nearest_level([1.0]) == 0
    assert nearest_level([1.0, 4.0, 32.0]) == 2  # log distance: 32 is nearer 16 than 4
