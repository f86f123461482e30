"""The image -> token function that training and serving share."""

import numpy as np
import pytest
from PIL import Image

from tgm.preprocess import (
    PreprocessSpec,
    fit_palette,
    grey_palette,
    image_to_tokens,
    quantize_to_palette,
    to_color_mode,
    tokens_to_image,
)


def grey_spec(size=4, levels=16):
    return PreprocessSpec(image_size=size, color_mode="grey", palette=grey_palette(levels))


def test_grey_levels_map_to_the_nearest_level():
    palette = grey_palette(16)
    assert palette[0, 0] == 0 and palette[-1, 0] == 255 and len(palette) == 16
    values = np.array([[0], [8], [9], [128], [255]], dtype=np.uint8)
    tokens = quantize_to_palette(values, palette)
    expected = np.abs(values.astype(int) - palette[:, 0].astype(int)[None, :]).argmin(1)
    assert tokens.tolist() == expected.tolist()


def test_tokens_are_raster_order_and_in_palette_range():
    arr = np.zeros((4, 4), dtype=np.uint8)
    arr[0, 3] = 255  # top-right pixel
    tokens = image_to_tokens(Image.fromarray(arr, "L"), grey_spec())
    assert tokens.shape == (16,) and tokens.dtype == np.int64
    assert tokens[3] == 15 and tokens.sum() == 15
    assert tokens_to_image(tokens, grey_spec())[0, 3, 0] == 255


def test_shrinking_averages_areas_so_thin_strokes_survive():
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[:, 13] = 255  # a one-pixel vertical stroke
    tokens = image_to_tokens(Image.fromarray(arr, "L"), grey_spec(size=14)).reshape(14, 14)
    assert (tokens[:, 6] > 0).all()


def test_transparency_is_flattened_onto_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_color_mode(rgba, "grey")).min() == 255


def test_sixteen_bit_grey_is_rescaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    assert 120 <= np.asarray(to_color_mode(img, "grey")).mean() <= 135


def test_colour_images_use_a_kmeans_palette():
    rng = np.random.default_rng(0)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]], dtype=np.uint8)
    pixels = colours[rng.integers(0, 4, 2000)]
    palette = fit_palette(pixels, "rgb", 4, seed=0)
    assert palette.shape == (4, 3)
    assert {tuple(c) for c in palette} == {tuple(c) for c in colours}
    spec = PreprocessSpec(2, "rgb", palette)
    img = Image.fromarray(colours.reshape(2, 2, 3), "RGB")
    assert (tokens_to_image(image_to_tokens(img, spec), spec).reshape(-1, 3) == colours).all()


def test_spec_round_trips_through_its_files(tmp_path):
    spec = grey_spec(6, 8)
    spec.save(tmp_path)
    loaded = PreprocessSpec.load(tmp_path)
    assert loaded.image_size == 6 and loaded.color_mode == "grey"
    assert (loaded.palette == spec.palette).all()


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "LA", "1", "CMYK"])
def test_every_common_mode_yields_tokens(mode):
    img = Image.new(mode, (10, 7))
    assert image_to_tokens(img, grey_spec()).shape == (16,)


def test_quantising_in_chunks_gives_the_tokens_of_one_pass():
    """Past the chunk size (2**24 distances), rows are quantised a chunk at a time: same tokens as in one go."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (4096, 3), dtype=np.uint8)
    pixels = rng.integers(0, 256, (2**24 // 4096 * 2 + 5, 3), dtype=np.uint8)  # two chunks and a bit
    c = palette.astype(np.float32)
    one_pass = ((c * c).sum(1)[None, :] - 2.0 * pixels.astype(np.float32) @ c.T).argmin(1)
    assert np.array_equal(quantize_to_palette(pixels, palette), one_pass)
