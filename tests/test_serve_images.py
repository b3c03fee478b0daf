"""The server's image rules without a server: data URLs, pixel limits read from the header, local paths."""
from __future__ import annotations

import base64
import struct
import zlib

import pytest

from edgekv.server.images import ImageLoader, ImageRefused


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds (almost) no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("side", [4000, 20000])   # over our limit; over Pillow's own bomb limit too
def test_bombs_are_refused_from_the_header(side):
    img = ImageLoader(max_pixels=10_000_000).load(url(png_header(side, side)), 1)
    with pytest.raises(ImageRefused) as e:
        img.decode(10_000_000)
    assert e.value.code == "image_too_large" and e.value.status == 400


def test_same_bytes_same_hash_and_bad_inputs(tmp_path):
    loader = ImageLoader()
    a, b = loader.load(url(b"abc"), 1), loader.load(url(b"abc"), 2)
    assert a.sha256 == b.sha256 and a.data == b"abc"
    with pytest.raises(ImageRefused, match="not valid base64"):
        loader.load("data:image/png;base64,%%%", 1)
    with pytest.raises(ImageRefused) as e:
        loader.load(str(tmp_path / "x.png"), 1)
    assert e.value.status == 403 and e.value.code == "local_files_off"
    with pytest.raises(ImageRefused, match="does not decode"):
        a.decode(10**6)
