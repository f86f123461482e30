"""Image -> palette tokens: the one preprocessing path shared by `prepare` and the BentoML service.

Rules (stated once, here):
- Images with transparency are composited on a white background; every image is then converted to "L"
  (grey palettes) or "RGB" (colour palettes).
- The image is resized to `image_size` x `image_size` without cropping (non-square images are squashed).
  Shrinking uses box filtering (area averaging), which keeps thin strokes such as MNIST digits visible;
  enlarging uses bilinear interpolation.
- Each pixel becomes the index of its nearest palette colour; the sequence is the raster order (row by row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

ColorMode = Literal["grey", "rgb"]
PALETTE_FILE = "palette.npy"
SPEC_FILE = "preprocess.json"


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    color_mode: ColorMode
    palette: np.ndarray  # (K, C) uint8, C = 1 for grey, 3 for rgb

    @property
    def palette_size(self) -> int:
        return int(self.palette.shape[0])

    @property
    def seq_len(self) -> int:
        return self.image_size * self.image_size

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / PALETTE_FILE, self.palette)
        (directory / SPEC_FILE).write_text(
            json.dumps(
                {"image_size": self.image_size, "color_mode": self.color_mode, "palette_size": self.palette_size},
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def load(cls, directory: str | Path) -> PreprocessSpec:
        directory = Path(directory)
        spec = json.loads((directory / SPEC_FILE).read_text())
        palette = np.load(directory / PALETTE_FILE, allow_pickle=False)
        return cls(image_size=int(spec["image_size"]), color_mode=spec["color_mode"], palette=palette)


def grey_palette(size: int) -> np.ndarray:
    """`size` evenly spaced grey levels from black to white, as a (size, 1) uint8 palette."""
    return np.round(np.linspace(0, 255, size)).astype(np.uint8)[:, None]


def to_color_mode(image: Image.Image, color_mode: ColorMode) -> Image.Image:
    """Apply EXIF orientation, flatten transparency onto white, convert to L or RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or image.mode.endswith("a"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: rescale to 8 bits by its nominal range rather than clipping at 255.
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("L" if color_mode == "grey" else "RGB")


def resize_square(image: Image.Image, size: int) -> Image.Image:
    shrinking = image.width >= size and image.height >= size
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return image.resize((size, size), method)


def image_pixels(image: Image.Image, image_size: int, color_mode: ColorMode) -> np.ndarray:
    """The resized image as (size*size, C) uint8 pixels in raster order, before quantisation."""
    image = resize_square(to_color_mode(image, color_mode), image_size)
    arr = np.asarray(image, dtype=np.uint8)
    return arr.reshape(image_size * image_size, -1)


def quantize_to_palette(pixels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (Euclidean) for each row of `pixels` (N, C)."""
    c = palette.astype(np.float32)
    c2 = (c * c).sum(1)[None, :]
    out = np.empty(len(pixels), dtype=np.int64)
    # In row chunks of at most 2**24 distances (64 MB): the whole (pixels x palette) matrix at once grew with the
    # dataset (627 MB for 50,000 14x14 images and 16 colours). Each row's argmin does not depend on the chunking.
    rows = max(1, 2**24 // len(c))
    for start in range(0, len(pixels), rows):
        p = pixels[start : start + rows].astype(np.float32)
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every colour, so it drops out of the argmin.
        out[start : start + rows] = (c2 - 2.0 * p @ c.T).argmin(1)
    return out


def image_to_tokens(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """The token sequence (image_size**2,) int64 that the model reads for `image`."""
    return quantize_to_palette(image_pixels(image, spec.image_size, spec.color_mode), spec.palette)


def tokens_to_image(tokens: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Palette colours for a token sequence, as an (S, S, C) uint8 array."""
    s = spec.image_size
    return spec.palette[np.asarray(tokens).reshape(-1)].reshape(s, s, -1)


def completion_tiles(tokens: np.ndarray, samples, keep: int, spec: PreprocessSpec) -> list[np.ndarray]:
    """What a completion shows: the image as the model sees it, its first `keep` tokens with the rest grey,
    then each sampled completion; (S, S, C) uint8 arrays."""
    kept = tokens_to_image(tokens, spec).copy()
    kept[keep // spec.image_size :] = 128
    return [tokens_to_image(tokens, spec), kept] + [tokens_to_image(s, spec) for s in samples]


def pixel_features(tokens: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(N, S*S*C) palette colours in [0, 1]: the quantised pixels the transformer sees, for pixel baselines."""
    return spec.palette[tokens].reshape(len(tokens), -1) / 255.0


def fit_palette(pixels: np.ndarray, color_mode: ColorMode, size: int, seed: int) -> np.ndarray:
    """Grey: evenly spaced levels. RGB: k-means centres of `pixels` (N, 3), sorted by brightness."""
    if color_mode == "grey":
        return grey_palette(size)
    from sklearn.cluster import MiniBatchKMeans

    distinct = np.unique(pixels, axis=0)
    if len(distinct) <= size:
        # Fewer colours than palette entries: use them as they are, padded by repeating the last one.
        centres = np.concatenate([distinct, np.repeat(distinct[-1:], size - len(distinct), axis=0)])
    else:
        km = MiniBatchKMeans(n_clusters=size, random_state=seed, n_init=3, batch_size=4096)
        centres = km.fit(pixels.astype(np.float32)).cluster_centers_
    centres = np.clip(np.round(centres), 0, 255).astype(np.uint8)
    order = np.argsort(centres.astype(np.int64).sum(1), kind="stable")
    return centres[order]
