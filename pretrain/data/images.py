"""Image files (masks, ink labels, negatives, JPG/PNG layers), header first: every reader checks the size an image
declares against the size it must have before a pixel is decoded.

Why: a PNG declares its size in its header, and deflate packs a blank image about 8000:1, so a 438 KB file can
declare 60000 × 60000 pixels. Decoding first and checking after costs gigabytes and seconds (a 110 KB one took
2.7 GB and 13 s before the shape check refused it). Neither decoder's own bomb guard fits our images: PIL refuses
anything above 179 Mpx, which real layer images exceed, and cv2 anything above 2^30 pixels, with a raw `cv2.error`.
So the header decides here, and an image whose size its caller has checked is decoded past both guards.
"""
import contextlib
import dataclasses
import io
import os
import threading
import warnings

import cv2
import numpy as np
import PIL.Image

# cv2 refuses larger images (OPENCV_IO_MAX_IMAGE_PIXELS, read once when cv2 loads); PIL, 1.5–3× slower, decodes them.
CV2_MAX_PIXELS = 2**30
_PIL_GUARD_LOCK = threading.Lock()  # PIL's guard is one module-wide setting: lifted by one thread at a time


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    shape_yx: tuple[int, int]  # (Y, X) pixels
    mode: str  # PIL's mode: "1", "L", "I;16", "RGB", "P", …


@contextlib.contextmanager
def _opened(source: bytes | os.PathLike):
    """The image as PIL opens it: its header read, no pixel decoded. PIL's bomb guard is lifted while it opens, as
    reading a header allocates nothing: the size it declares is for the caller to check before decoding."""
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    with _PIL_GUARD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
        try:
            image = PIL.Image.open(file)
        except (OSError, SyntaxError, ValueError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError("is not a readable image") from error
        finally:
            PIL.Image.MAX_IMAGE_PIXELS = limit
    with image:
        yield image


def image_header(source: bytes | os.PathLike) -> ImageHeader:
    """The size and mode an image file (a path) or its bytes declare, from its header alone."""
    with _opened(source) as image:
        width, height = image.size
        return ImageHeader((height, width), image.mode)


def decode_image(source: bytes | os.PathLike, expected_yx: tuple[int, int]) -> np.ndarray:
    """The pixels of an image that must be `expected_yx` (Y, X), which its caller has checked: (Y, X) grey
    (uint8 or uint16; a 1-bit image as 0/255) or (Y, X, C) colour, any alpha last. Its header is read again and
    must still declare `expected_yx`, else ValueError before anything is decoded."""
    with _opened(source) as image:
        width, height = image.size
        if (height, width) != tuple(expected_yx):
            raise ValueError(f"declares (Y, X) = {(height, width)}, not the {tuple(expected_yx)} expected")
        if height * width > CV2_MAX_PIXELS:
            return _pixels_by_pil(image)
    if isinstance(source, (bytes, bytearray, memoryview)):
        pixels = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        pixels = cv2.imread(os.fspath(source), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape[:2] != tuple(expected_yx):
        raise ValueError("cannot be decoded (a damaged or truncated file)")
    return pixels


def _pixels_by_pil(image: PIL.Image.Image) -> np.ndarray:
    """What cv2.IMREAD_UNCHANGED would give (up to the order of colour channels), decoded by PIL."""
    try:
        if image.mode == "1":
            return np.asarray(image).astype(np.uint8) * 255
        if image.mode in ("L", "RGB", "RGBA", "I;16", "I;16L", "I;16B"):
            pixels = np.asarray(image)
        elif image.mode == "LA":
            pixels = np.asarray(image.getchannel("L"))
        else:  # palette and rarer modes: as colours
            pixels = np.asarray(image.convert("RGBA"))
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot be decoded (a damaged or truncated file: {error})") from error
    return pixels.astype(pixels.dtype.newbyteorder("="), copy=False)  # big-endian 16-bit PNG pixels in native order
