"""Images of a request: `data:` URLs, and local paths only under the folders --allow-local-files names.

Each image is hashed (sha256 of its bytes: the conversation cache compares images by it) and its header
read when the request is parsed (format and size: the per-image and per-request pixel limits are checked
before any pixel is decoded, so a decompression bomb costs nothing). It is decoded lazily, only when it has
to be prefilled, one image at a time, and downscaled to at most MAX_SIDE before the next is read. Only the
formats the README lists are opened (Pillow would otherwise try every plugin it has: EPS, TIFF, ICO...)."""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlparse

from edgekv.errors import MediaError

DEFAULT_MAX_PIXELS = 50_000_000   # 50 MP: above every camera a desktop user has; llama.cpp resizes anyway
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000   # all images of one request, from their headers
DEFAULT_MAX_IMAGES = 16           # images in one request
MAX_VIDEOS = 4                    # clips in one request (each is streamed and compacted chunk by chunk)
MAX_SIDE = 2048   # decoded images are downscaled to this longest side (Gemma 3 reads 896, SmolVLM 1536)
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")   # Pillow's names for the formats the README lists
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

    def _open(self, max_pixels: int):
        """The PIL image with only its header read; ImageRefused for other formats or too many pixels."""
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(io.BytesIO(self.data), formats=FORMATS)   # reads the header only
        except Image.DecompressionBombError as e:    # Pillow's own limit (2 x MAX_IMAGE_PIXELS) hit first
            raise ImageRefused(f"image {self.source} is too large: {e}", code="image_too_large") from None
        except UnidentifiedImageError:
            raise ImageRefused(f"image {self.source} does not decode as {', '.join(FORMATS).lower()}") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise ImageRefused(f"image {self.source} does not decode: {e}") from None
        w, h = img.size
        if w * h > max_pixels:
            raise ImageRefused(f"image {self.source} is {w}x{h} = {w * h} pixels, over the server's limit of "
                               f"{max_pixels} (--max-image-pixels)", code="image_too_large")
        return img

    def pixels(self, max_pixels: int) -> int:
        """Width x height from the header (nothing decoded); checks the format and the per-image limit."""
        w, h = self._open(max_pixels).size
        return w * h

    def decode(self, max_pixels: int, max_side: int = MAX_SIDE):
        """RGB PIL image, downscaled to max_side (JPEG decoded at the reduced size already); ImageRefused
        when it does not decode or has too many pixels. Peak memory: the image in its own mode (1 byte a
        pixel for 1-bit and grey images) plus the reduced copy, never an RGB copy at full size."""
        from PIL import Image

        img = self._open(max_pixels)
        try:
            if max(img.size) > max_side:
                img.draft("RGB", (max_side, max_side))   # JPEG: decode at 1/2, 1/4 or 1/8 scale
                img.load()
                if img.mode not in ("RGB", "RGBA", "L", "LA"):   # "1", "P", "CMYK"...: resampling needs these
                    grey = img.mode in ("1", "I", "I;16", "F")   # 1 byte a pixel, not 3, while full size
                    img = img.convert("L" if grey else "RGBA" if "transparency" in img.info else "RGB")
                img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
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
        return RequestImage(*self._fetch(url, n, "image"))

    def load_video(self, url: str, n: int) -> "RequestVideo":
        """A clip from a `video_url` part: the same rules as images (data: URLs; local paths only under
        --allow-local-files)."""
        return RequestVideo(*self._fetch(url, n, "video"))

    def _fetch(self, url: str, n: int, what: str) -> tuple[bytes, str]:
        """(bytes, source) of a data: URL or an allowed local file; ImageRefused otherwise."""
        m = _DATA_URL.match(url)
        if m:
            payload = url[m.end():]
            if not m.group("b64"):   # RFC 2397: percent-encoded bytes
                try:
                    return unquote_to_bytes(payload), f"#{n} (data URL)"
                except UnicodeEncodeError:
                    raise ImageRefused(f"{what} #{n}: the data URL has characters that are not URL-safe") from None
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise ImageRefused(f"{what} #{n}: the data URL is not valid base64") from None
            return data, f"#{n} (data URL)"
        if "\x00" in url:
            raise ImageRefused(f"{what} #{n}: the URL has a NUL character")
        if re.match(r"^[a-zA-Z]:[\\/]", url):   # a Windows path, not a scheme
            return self._local(url, n, what)
        parts = urlparse(url)
        scheme = parts.scheme.lower()
        if scheme in ("http", "https"):
            raise ImageRefused(f"{what} #{n}: the server does not fetch URLs; send it as a data: URL",
                               code="unsupported_image_url")
        if scheme == "file":   # file:/abs, file:///abs, file://localhost/abs (RFC 8089); percent-decoded
            if parts.netloc.lower() not in ("", "localhost"):
                raise ImageRefused(f"{what} #{n}: file URLs on another host ({parts.netloc}) are not read",
                                   code="unsupported_image_url")
            return self._local(unquote(parts.path), n, what)
        if scheme:
            raise ImageRefused(f"{what} #{n}: unsupported URL scheme {scheme!r}; use a data: URL",
                               code="unsupported_image_url")
        return self._local(url, n, what)

    def _local(self, path: str, n: int, what: str) -> tuple[bytes, str]:
        if not self.allowed:
            raise ImageRefused(f"{what} #{n}: local file paths are off; start the server with "
                               "--allow-local-files DIR, or send a data: URL", status=403, code="local_files_off")
        p = Path(path).expanduser()
        try:   # symlinks resolved: a link out of the folder is refused too
            real = p.resolve()
        except (OSError, RuntimeError, ValueError):
            real = None
        # outside the folders, a file that exists and one that does not get the same answer: no oracle
        if real is None or not any(real.is_relative_to(d) for d in self.allowed):
            raise ImageRefused(f"{what} #{n}: {p} is not a file under the folders --allow-local-files names",
                               status=403, code="path_not_allowed")
        if not real.is_file():
            raise ImageRefused(f"{what} #{n}: no such file {p}")
        if real.stat().st_size > self.max_file_bytes:
            raise ImageRefused(f"{what} #{n}: {p} is larger than the request limit (--max-request-mb)",
                               code="image_too_large")
        try:
            return real.read_bytes(), str(p)
        except OSError as e:
            raise ImageRefused(f"{what} #{n}: cannot read {p}: {e.strerror}") from None


@dataclass
class RequestVideo:
    """A clip of a request: its bytes (hashed like an image's, for the conversation cache), written to a
    temporary file only while its turn prefills it (PyAV reads files)."""

    data: bytes
    source: str
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()

    def open(self, folder: Path, fps: float | None = None, max_frames: int | None = None):
        """A `streaming.Video` of the clip, read from a file in `folder` (the caller removes the folder);
        ImageRefused (400) when it is not a video PyAV can decode."""
        from edgekv.runtime.streaming import Video
        from edgekv.runtime.video import DEFAULT_FPS, DEFAULT_MAX_FRAMES

        path = Path(folder) / f"{self.sha256[:16]}.video"
        path.write_bytes(self.data)
        try:
            return Video(path, fps=fps or DEFAULT_FPS, max_frames=max_frames or DEFAULT_MAX_FRAMES,
                         name=f"video {self.source}")
        except MediaError as e:
            raise ImageRefused(f"video {self.source}: {e}", code="invalid_video") from None
