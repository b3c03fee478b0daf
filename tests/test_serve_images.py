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


@pytest.mark.parametrize("mode", ["1", "P", "CMYK", "RGB"])
def test_large_images_are_downscaled_keeping_their_colours(mode):
    import io

    from PIL import Image

    from edgekv.server.images import MAX_SIDE

    img = Image.new("RGB", (MAX_SIDE * 2, 100), (255, 255, 255) if mode == "1" else (200, 30, 30)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode == "CMYK" else "PNG")
    out = ImageLoader().load(url(buf.getvalue()), 1).decode(10**8)
    assert out.mode == "RGB" and out.size == (MAX_SIDE, 50)
    r, g, b = out.getpixel((10, 10))
    assert (r, g, b) == (255, 255, 255) if mode == "1" else (r > 150 and g < 80 and b < 80)


def test_file_urls_and_formats(tmp_path):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(ImageRefused, match="does not decode"):
        ImageLoader().load(url(buf.getvalue()), 1).pixels(10**6)
    (tmp_path / "a b.png").write_bytes(png_header(4, 4))
    loader = ImageLoader([tmp_path])
    for u in (f"file:{tmp_path}/a%20b.png", f"file://localhost{tmp_path}/a%20b.png", f"file://{tmp_path}/a%20b.png",
              str(tmp_path / "a b.png")):
        assert loader.load(u, 1).data == png_header(4, 4), u
    with pytest.raises(ImageRefused) as e:
        loader.load(f"file://elsewhere{tmp_path}/a.png", 1)
    assert e.value.code == "unsupported_image_url"
