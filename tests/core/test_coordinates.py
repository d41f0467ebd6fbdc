"""Cell ↔ level-0 pixel mapping and region reads, against direct numpy slicing.

Non-square images throughout (a transposed or cropped axis would show), regions at
and beyond the borders (zero fill), int64 beyond 2^31, and the receptive-field
offset of 'valid' attention networks.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from napari_zoomin.geometry import scaled_size
from napari_zoomin.models.coordinates import CellGrid
from napari_zoomin.models.networks import AttentionNetwork
from napari_zoomin.models.source import TensorSource

H, W = 37, 53  # deliberately non-square, odd


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)


def _numpy_cut(image: np.ndarray, top: int, left: int, h: int, w: int) -> np.ndarray:
    """The region by plain slicing of an image zero-padded far enough on every side."""
    pad = max(h, w) + max(abs(top), abs(left)) + H + W
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return padded[top + pad : top + pad + h, left + pad : left + pad + w]


def test_read_matches_numpy_slicing_inside_and_beyond_borders(image):
    src = TensorSource(image)
    rng = np.random.default_rng(1)
    regions = np.concatenate(
        [
            np.stack([rng.integers(-12, H, 40), rng.integers(-12, W, 40)], axis=1),
            [[-5, -7], [H - 3, W - 2], [-20, -20], [H + 2, 0], [0, W + 5], [0, 0]],
        ]
    )
    regions = np.concatenate([regions, np.tile([[9, 14]], (len(regions), 1))], axis=1)
    got = src.read(torch.from_numpy(regions), 1.0)
    assert got.shape == (len(regions), 3, 9, 14) and got.dtype == torch.float32
    for k, (top, left, h, w) in enumerate(regions.tolist()):
        expected = _numpy_cut(image, top, left, h, w).transpose(2, 0, 1) / 255.0
        np.testing.assert_array_equal(got[k].numpy(), expected.astype(np.float32))


def test_channels_last_and_first_read_the_same(image):
    a = TensorSource(image).read(torch.tensor([[3, 4, 10, 12]]), 1.0)
    b = TensorSource(torch.from_numpy(image).permute(2, 0, 1)).read(
        torch.tensor([[3, 4, 10, 12]]), 1.0
    )
    assert torch.equal(a, b)


def test_area_downsampling_is_block_mean(image):
    src = TensorSource(image)
    got = src.read(torch.tensor([[2, 5, 20, 32]]), 0.25)[0]
    block = image[2:22, 5:37].astype(np.float64) / 255.0
    expected = block.reshape(5, 4, 8, 4, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    view = src.read(torch.tensor([[0, 0, H, W]]), 0.1)
    assert view.shape[-2:] == (scaled_size(H, 0.1), scaled_size(W, 0.1)) == (4, 5)


def test_scaled_size_rounds_half_up():
    assert scaled_size(25, 0.1) == 3  # 2.5 → 3 (Python's round would give 2)
    assert scaled_size(15, 0.1) == 2
    assert scaled_size(3, 0.1) == 1  # never empty


def test_read_counter_records_pixels(image):
    src = TensorSource(image)
    src.read(torch.tensor([[0, 0, H, W]]), 0.5)
    src.read(torch.tensor([[0, 0, 8, 8], [4, 4, 8, 8]]), 1.0)
    assert src.counter.level0_pixels[0.5] == H * W
    assert src.counter.output_pixels[0.5] == scaled_size(H, 0.5) * scaled_size(W, 0.5)
    assert src.counter.full_resolution_pixels == 128
    assert src.counter.regions[1.0] == 2


def test_regions_must_be_integers_of_one_size(image):
    src = TensorSource(image)
    with pytest.raises(TypeError):
        src.read(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 1.0)
    with pytest.raises(ValueError, match="same height and width"):
        src.read(torch.tensor([[0, 0, 4, 4], [0, 0, 5, 4]]), 1.0)


def _paper_centre(i: int, size: int, view: int) -> int:
    """000 §2.1, 1-based ``1 + (i − 1)(H − 1)/(h − 1)``, rounded half up, back to 0-based."""
    c = 1 + Fraction((i + 1) - 1) * (size - 1) / (view - 1)
    return int(c + Fraction(1, 2)) // 1 - 1


def test_cell_centres_follow_the_paper_on_non_square_images():
    view = (scaled_size(H, 0.25), scaled_size(W, 0.25))
    grid = CellGrid(torch.zeros(1, 2), (H, W), view, view, bounds=(H, W))
    cells = torch.arange(grid.n_cells)
    centres = grid.centres(cells)
    rows, cols = cells // view[1], cells % view[1]
    for k in range(grid.n_cells):
        assert centres[k].tolist() == [
            _paper_centre(int(rows[k]), H, view[0]),
            _paper_centre(int(cols[k]), W, view[1]),
        ]
    assert centres[0].tolist() == [0, 0]
    assert centres[-1].tolist() == [H - 1, W - 1]


def test_tiles_around_cells_match_numpy_slicing_at_the_borders(image):
    src = TensorSource(image)
    view = (scaled_size(H, 0.2), scaled_size(W, 0.2))
    grid = CellGrid(torch.zeros(1, 2), (H, W), view, view, bounds=(H, W))
    cells = torch.arange(grid.n_cells)
    regions = grid.regions(cells, (11, 8))
    assert regions.dtype == torch.int64
    tiles = src.read(regions, 1.0)
    for k, (cy, cx) in enumerate(grid.centres(cells).tolist()):
        # the edge rule: centred on the cell, shifted the least to lie inside the image
        top, left = min(max(cy - 5, 0), H - 11), min(max(cx - 4, 0), W - 8)
        assert regions[k].tolist() == [top, left, 11, 8]
        expected = _numpy_cut(image, top, left, 11, 8).transpose(2, 0, 1) / 255.0
        np.testing.assert_array_equal(tiles[k].numpy(), expected.astype(np.float32))
    assert int(regions[:, 0].min()) == 0 and int((regions[:, 0] + 11).max()) == H
    assert int(regions[:, 1].min()) == 0 and int((regions[:, 1] + 8).max()) == W


def test_valid_convolutions_offset_cells_by_their_receptive_field():
    """A bright view pixel lands in the cell whose receptive-field centre is that pixel."""
    net = AttentionNetwork(channels=1, layers=3, padding="valid")
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
                centre = module.weight.shape[-1] // 2
                module.weight[:, :, centre, centre] = 1.0  # identity (delta) kernels
    view = torch.zeros(1, 3, 15, 22)
    view[0, :, 9, 4] = 1.0
    logits = net(view)[0]
    assert logits.shape == net.map_shape((15, 22)) == (9, 16)
    assert net.offset == (3.0, 3.0)
    grid = CellGrid(
        torch.zeros(1, 2), (150, 220), (15, 22), tuple(logits.shape), net.offset, bounds=(150, 220)
    )
    cell = int(torch.argmax(logits))
    assert grid.view_positions(torch.tensor([cell]))[0].tolist() == [9.0, 4.0]
    same = CellGrid(torch.zeros(1, 2), (150, 220), (15, 22), (15, 22), bounds=(150, 220))
    assert torch.equal(grid.centres(torch.tensor([cell])), same.centres(torch.tensor([9 * 22 + 4])))


def test_view_mask_to_cells_with_offset():
    view = torch.arange(15 * 22).reshape(15, 22)
    grid = CellGrid(torch.zeros(1, 2), (150, 220), (15, 22), (9, 16), (3.0, 3.0), bounds=(150, 220))
    assert torch.equal(grid.cell_values(view), view[3:12, 3:19])


def test_int64_beyond_2_31_cells_and_pixels():
    h, w = 2**20 + 7, 2**21 + 3  # a 2.2-terapixel "slide"
    view = (scaled_size(h, 1 / 16), scaled_size(w, 1 / 16))
    grid = CellGrid(torch.zeros(1, 2), (h, w), view, view, bounds=(h, w))
    assert grid.n_cells > 2**31
    cells = torch.tensor([grid.n_cells - 1, grid.n_cells - 2, 2**31 + 12345, 7])
    centres = grid.centres(cells)
    assert centres.dtype == torch.int64
    for k, cell in enumerate(cells.tolist()):
        i, j = divmod(cell, view[1])
        assert centres[k].tolist() == [_paper_centre(i, h, view[0]), _paper_centre(j, w, view[1])]


def test_stage2_grid_offsets_every_tile_and_inverse_mapping():
    origins = torch.tensor([[-16, 40], [100, -3]])
    grid = CellGrid(origins, (32, 48), (16, 24), (16, 24), bounds=(400, 400))
    cells = torch.tensor([[0, 16 * 24 - 1], [5, 30]])
    centres = grid.centres(cells)
    assert centres[0, 0].tolist() == [-16, 40]
    assert centres[0, 1].tolist() == [-16 + 31, 40 + 47]
    one = CellGrid(torch.zeros(1, 2), (300, 500), (30, 50), (30, 50), bounds=(300, 500))
    every = torch.arange(one.n_cells)
    assert torch.equal(one.nearest_view_pixels(one.centres(every)), one.rows_cols(every))
