"""Images in (path, bytes, raw RGB array or PIL image) -> RGB pixels for mtmd. Pillow decodes, so every
format Pillow reads works (png, jpeg, webp, bmp, gif) and a corrupt file is a clear MediaError rather
than a failure deep inside the projector."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from edgekv.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, bytearray, np.ndarray, "Image.Image"]


@dataclass(frozen=True)
class RGBImage:
    width: int
    height: int
    data: bytes  # width * height * 3 bytes, row-major RGB
    name: str = "image"


def load_image(image: ImageInput, name: str | None = None) -> RGBImage:
    """Decode an image to RGB. Raises MediaError with the file name and the reason."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise MediaError(f"raw image must be a uint8 array [height, width, 3], got {image.dtype} {image.shape}")
        h, w, _ = image.shape
        return RGBImage(w, h, np.ascontiguousarray(image).tobytes(), name or "array")
    if isinstance(image, Image.Image):
        img, label = image, name or "PIL image"
    else:
        if isinstance(image, (bytes, bytearray)):
            src, label = io.BytesIO(bytes(image)), name or "image bytes"
        else:
            p = Path(image).expanduser()
            label = name or str(p)
            if not p.exists():
                raise MediaError(f"image not found: {p}")
            if p.is_dir():
                raise MediaError(f"image path is a directory: {p}")
            src = p
        try:
            img = Image.open(src)
            img.load()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(f"cannot read image {label}: {e}") from None
    try:
        rgb = img.convert("RGB")
    except (OSError, ValueError) as e:
        raise MediaError(f"cannot convert image {label} to RGB: {e}") from None
    if rgb.width < 1 or rgb.height < 1:
        raise MediaError(f"image {label} is empty")
    return RGBImage(rgb.width, rgb.height, rgb.tobytes(), label)
