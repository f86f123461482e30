"""Opening image files that nobody has checked: fully decoded, bounded in size, failures with a reason.

Used by `validate` (files on disk) and the BentoML service (uploads), so both judge a file the same way.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Pillow's default bomb threshold (~89 Mpx), which only warns; we refuse past it unless told otherwise.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Leading bytes of common image formats: a file that starts like an image but will not open is damaged,
# not "some other kind of file".
_MAGIC = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"RIFF": "WEBP",
}


class InvalidImage(ValueError):
    """A file that is not a complete, decodable image of a sane size. `reason` is a machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def sniff_format(path: Path, data: bytes | None = None) -> str | None:
    if data is not None:
        head = data[:8]
    else:
        with open(path, "rb") as f:
            head = f.read(8)
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Decode the whole file (truncation shows up only then) and return the image, or raise InvalidImage.
    `data`: the file's bytes, already read (and checked) by the caller."""
    path = Path(path)
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise InvalidImage("empty_file", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; Pillow's warning threshold would override a raised limit.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise InvalidImage(
                        "too_large",
                        f"image is {im.width}x{im.height}, more than {max_pixels} pixels (decompression-bomb limit)",
                    )
                frames = getattr(im, "n_frames", 1)
                im.load()  # the first frame of an animation: the stated rule is to train on that frame
                out = im.copy()
                out.format = im.format  # copy() drops it; the manifest reports it
                out.info["n_frames"] = frames
                return out
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:  # past twice Pillow's limit it refuses before our check
        raise InvalidImage("too_large", f"image is too large to decode safely: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad data; each means "cannot decode this file"
        fmt = sniff_format(path, data)
        if fmt:
            # Pillow names an in-memory file by its repr, which differs from run to run; name the file itself.
            detail = f"cannot identify image file {str(path)!r}" if isinstance(exc, UnidentifiedImageError) else exc
            raise InvalidImage(
                "corrupt_image", f"file starts like a {fmt} but is truncated or damaged: {detail}"
            ) from None
        raise InvalidImage("not_an_image", "file is not an image format that can be read") from None
