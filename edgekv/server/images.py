"""Images of a request: `data:` URLs, and local paths only under the folders --allow-local-files names.

Each image is hashed (sha256 of its bytes: the conversation cache compares images by it) and decoded
lazily, only when it has to be prefilled; the pixel count is checked from the header before any pixel is
decoded, so a decompression bomb costs nothing."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgekv.errors import MediaError

DEFAULT_MAX_PIXELS = 50_000_000   # 50 MP: above every camera a desktop user has; llama.cpp resizes anyway
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+/-]*)(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


class ImageRefused(MediaError):
    """The request named an image the server may not or cannot read (400, or 403 for a path)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class RequestImage:
    data: bytes
    source: str                     # for messages: "data URL #2" or the file path
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def decode(self, max_pixels: int):
        """RGB PIL image; ImageRefused when it does not decode or has too many pixels."""
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(self.data))   # reads the header only
        except Image.DecompressionBombError as e:    # Pillow's own limit (2 x MAX_IMAGE_PIXELS) hit first
            raise ImageRefused(f"image {self.source} is too large: {e}", code="image_too_large") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageRefused(f"image {self.source} does not decode: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRefused(f"image {self.source} is {w}x{h} = {w * h} pixels, over the server's limit of "
                               f"{max_pixels} (--max-image-pixels)", code="image_too_large")
        try:
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise ImageRefused(f"image {self.source} does not decode: {e}") from None


class ImageLoader:
    """Turns image_url strings into RequestImages under the server's rules."""

    def __init__(self, allowed_dirs: list[Path] | tuple[Path, ...] = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_bytes: int = 32 << 20):
        self.allowed = [Path(d).expanduser().resolve() for d in allowed_dirs]
        self.max_pixels, self.max_file_bytes = max_pixels, max_file_bytes

    def load(self, url: str, n: int) -> RequestImage:
        m = _DATA_URL.match(url)
        if m:
            payload = url[m.end():]
            if not m.group("b64"):
                return RequestImage(unquote(payload).encode("latin-1", "replace"), f"#{n} (data URL)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ImageRefused(f"image #{n}: the data URL is not valid base64") from None
            return RequestImage(data, f"#{n} (data URL)")
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            raise ImageRefused(f"image #{n}: the server does not fetch URLs; send the image as a data: URL",
                               code="unsupported_image_url")
        if scheme not in ("", "file") and not re.match(r"^[a-zA-Z]:[\\/]", url):
            raise ImageRefused(f"image #{n}: unsupported image_url scheme {scheme!r}; use a data: URL",
                               code="unsupported_image_url")
        return self._local(url[len("file://"):] if scheme == "file" else url, n)

    def _local(self, path: str, n: int) -> RequestImage:
        if not self.allowed:
            raise ImageRefused(f"image #{n}: local file paths are off; start the server with "
                               "--allow-local-files DIR, or send a data: URL", status=403, code="local_files_off")
        p = Path(unquote(path)).expanduser()
        try:
            real = p.resolve(strict=True)   # symlinks resolved: a link out of the folder is refused too
        except (OSError, RuntimeError):
            raise ImageRefused(f"image #{n}: no such file {p}") from None
        if not any(real.is_relative_to(d) for d in self.allowed):
            raise ImageRefused(f"image #{n}: {p} is outside the folders --allow-local-files names",
                               status=403, code="path_not_allowed")
        if not real.is_file():
            raise ImageRefused(f"image #{n}: {p} is not a file")
        if real.stat().st_size > self.max_file_bytes:
            raise ImageRefused(f"image #{n}: {p} is larger than the request limit (--max-request-mb)",
                               code="image_too_large")
        try:
            return RequestImage(real.read_bytes(), str(p))
        except OSError as e:
            raise ImageRefused(f"image #{n}: cannot read {p}: {e.strerror}") from None
