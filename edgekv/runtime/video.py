"""Video in: frames decoded one at a time with PyAV, sampled by fps / max frames, each with its timestamp.

Nothing here holds more than one decoded frame: `VideoReader.frames()` decodes in stream order, converts
only the sampled frames to RGB (resized so the longer side is at most `max_side`), and yields them. The
session side (`edgekv.runtime.streaming`) feeds each frame (or pair of frames, for projectors that merge
two frames in time) to mtmd and compacts after it, so the KV cache stays bounded too.

Sampling: with `fps`, target times are 0, 1/fps, 2/fps, ... below the clip's duration; when that is more
than `max_frames`, the targets become `max_frames` times spread uniformly over the clip (k * duration / n).
Each target takes the first decoded frame at or after it (within half a source frame), and one frame
never serves two targets, so asking for more fps than the clip has gives each frame once.

Damage: a file that cannot be opened, is an image (a PNG renamed .mp4: FFmpeg's image demuxers), has no
video stream, or yields no frame at all is a MediaError before anything is prefilled. A stream that breaks
after some frames (decoder error, truncated file) ends the clip there: the frames read so far are kept and
`VideoReader.error` says where it stopped.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence, Union

import numpy as np

from edgekv.errors import MediaError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 64
DEFAULT_MAX_SIDE = 768  # longer side of a frame in pixels; the projector's own token cap applies after


# --- sampling (pure) ------------------------------------------------------------------------------
def check_sampling(fps: float | None, max_frames: int | None) -> None:
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise MediaError(f"video fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise MediaError(f"video max frames must be >= 1, got {max_frames}")


def sample_times(duration: float, fps: float | None = DEFAULT_FPS, max_frames: int | None = DEFAULT_MAX_FRAMES) -> list[float]:
    """Target timestamps (seconds) for a clip of `duration` seconds: every 1/fps from 0, or, when that is
    more than max_frames (or fps is None), max_frames times spread uniformly (k * duration / n)."""
    check_sampling(fps, max_frames)
    if not (duration > 0 and math.isfinite(duration)):
        return [0.0]
    if fps is not None:
        n = max(1, math.ceil(duration * fps - 1e-9))
        if max_frames is None or n <= max_frames:
            return [k / fps for k in range(n)]
    if max_frames is None:
        raise MediaError("video sampling needs fps or max frames")
    return [k * duration / max_frames for k in range(max_frames)]


class FrameSelector:
    """Streaming matcher of decoded frame times to target times (see module doc). `take(t)` says whether
    the frame at time t is sampled. `tolerance` is half a source frame period."""

    def __init__(self, targets: Sequence[float], tolerance: float = 0.0) -> None:
        self.targets = list(targets)
        self.tolerance = tolerance
        self.i = 0

    @property
    def done(self) -> bool:
        return self.i >= len(self.targets)

    def take(self, t: float) -> bool:
        if self.done or t + self.tolerance < self.targets[self.i]:
            return False
        while not self.done and self.targets[self.i] <= t + self.tolerance:
            self.i += 1  # targets this frame covers (more fps than the clip has): one frame, once
        return True


def select_frames(frame_times: Iterable[float], targets: Sequence[float], tolerance: float = 0.0) -> list[int]:
    """Indices of the frames (in decode order, times in seconds) that `FrameSelector` samples."""
    sel = FrameSelector(targets, tolerance)
    return [i for i, t in enumerate(frame_times) if sel.take(t)]


def format_timestamp(t: float) -> str:
    """llama.cpp's video helper format (mtmd-helper.cpp): "[0m1.50s]"."""
    minutes = int(t // 60)
    return f"[{minutes}m{t - 60 * minutes:.2f}s]"


# --- frames -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    time: float          # seconds from the start of the clip
    image: np.ndarray    # [height, width, 3] uint8 RGB


@dataclass(frozen=True)
class VideoInfo:
    name: str
    width: int
    height: int
    duration: float | None   # seconds, None when the container does not say
    fps: float | None        # the stream's average frame rate
    n_frames: int | None     # frames the container declares (0/None: unknown)
    codec: str


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled so the longer side is at most max_side, aspect kept, even sizes >= 2."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(2, int(round(width * s)) // 2 * 2), max(2, int(round(height * s)) // 2 * 2)


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("video needs PyAV: pip install av") from None
    return av


def _open(path: Path):
    av = _av()

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"not a video (FFmpeg cannot open it): {path} ({_why(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"no video stream in {path}")
    demuxer = container.format.name
    if _is_image_format(demuxer):
        container.close()
        raise MediaError(f"not a video: {path} is an image ({demuxer.removesuffix('_pipe')}); attach images with "
                         "--image (/image in chat)")
    return container


def _is_image_format(demuxer: str) -> bool:
    """FFmpeg opens a still image as a one-frame "video" (png_pipe, image2 for JPEG, gif, ...): checked on the
    container, before anything sizes a clip (a renamed PNG would run as a 1-frame clip, or be sized as
    max_frames frames since it has no duration)."""
    return demuxer == "image2" or demuxer.endswith("_pipe") or demuxer in ("gif", "apng", "ico")


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class VideoReader:
    """One clip, opened and checked (the first frame decodes) on construction; `frames()` streams the
    sampled frames. After `frames()` ends: `frames_read`, `last_time`, and `error` (None, or why the
    stream ended early: the frames before it were yielded)."""

    def __init__(self, path: str | os.PathLike, *, fps: float | None = DEFAULT_FPS,
                 max_frames: int | None = DEFAULT_MAX_FRAMES, max_side: int | None = DEFAULT_MAX_SIDE) -> None:
        check_sampling(fps, max_frames)
        p = Path(path).expanduser()
        if not p.exists():
            raise MediaError(f"video not found: {p}")
        if not p.is_file():
            raise MediaError(f"video path is not a file: {p}")
        self.path, self.fps, self.max_frames, self.max_side = p, fps, max_frames, max_side
        self.info = self._probe()
        self.frames_read = 0
        self.last_time = 0.0
        self.error: str | None = None

    def _probe(self) -> VideoInfo:
        av = _av()

        c = _open(self.path)
        try:
            s = c.streams.video[0]
            rate = float(s.average_rate) if s.average_rate else None
            duration = None
            if s.duration is not None and s.time_base is not None:
                duration = float(s.duration * s.time_base)
            elif c.duration is not None:
                duration = c.duration / 1_000_000  # av.time_base: microseconds
            try:
                first = next(c.decode(s))
            except StopIteration:
                raise MediaError(f"no decodable frames in {self.path}") from None
            except av.FFmpegError as e:
                raise MediaError(f"no decodable frames in {self.path} ({_why(e)})") from None
            w, h = first.width, first.height
            if w < 1 or h < 1:
                raise MediaError(f"video {self.path} has empty frames ({w}x{h})")
            return VideoInfo(str(self.path), w, h, duration if duration and duration > 0 else None, rate,
                             int(s.frames) or None, s.codec_context.name)
        finally:
            c.close()

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames `frames()` yields."""
        return fit_size(self.info.width, self.info.height, self.max_side)

    def targets(self) -> list[float] | None:
        """Sampled times, or None when the duration is unknown (then: every 1/fps, first max_frames)."""
        if self.info.duration is None:
            return None
        return sample_times(self.info.duration, self.fps, self.max_frames)

    def frames(self) -> Iterator[Frame]:
        av = _av()

        targets = self.targets()
        if targets is None:  # unknown duration: every 1/fps from the start, the first max_frames
            step = 1.0 / (self.fps or self.info.fps or DEFAULT_FPS)
            targets = [k * step for k in range(self.max_frames or 100_000)]
        half = 0.5 / self.info.fps if self.info.fps else 0.0
        sel = FrameSelector(targets, half)
        self.frames_read, self.last_time, self.error = 0, 0.0, None  # a clip may be read again (retried turn)
        w, h = self.frame_size
        c = _open(self.path)
        try:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            it = c.decode(s)
            t0 = None
            index = 0
            while not sel.done:
                try:
                    frame = next(it)
                except StopIteration:
                    break
                except (av.FFmpegError, OSError) as e:
                    self.error = (f"{self.path.name}: the stream is damaged after {self.last_time:.2f} s "
                                  f"({_why(e)}); kept the {self.frames_read} frames read before it")
                    break
                t = frame.time
                if t is None:  # no timestamps: count frames at the declared rate
                    t = index / self.info.fps if self.info.fps else float(index)
                if t0 is None:
                    t0 = t  # streams may start at a non-zero pts
                t -= t0
                index += 1
                if not sel.take(t):
                    continue
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
                self.frames_read += 1
                self.last_time = t
                yield Frame(t, rgb)
            if self.frames_read == 0 and self.error is None:
                raise MediaError(f"no decodable frames in {self.path}")
            if self.error is None and self._ended_early():
                self.error = (f"{self.path.name}: the stream ends at {self.last_time:.2f} s of the "
                              f"{self.info.duration:.2f} s it declares; kept the {self.frames_read} frames read")
        finally:
            c.close()

    def _ended_early(self) -> bool:
        """A truncated file: targets left that lie well inside the declared duration."""
        d = self.info.duration
        if d is None or self.max_frames is None:
            return False
        targets = self.targets() or []
        period = 1.0 / self.info.fps if self.info.fps else 0.0
        return self.frames_read < len(targets) and targets[self.frames_read] < d - 2 * period - 1e-6


FrameInput = Union[np.ndarray, "Image.Image", tuple]
VideoInput = Union[str, os.PathLike, Iterable[FrameInput]]


def frames_from_iterable(frames: Iterable[FrameInput], *, source_fps: float = 1.0,
                         max_frames: int | None = None, max_side: int | None = DEFAULT_MAX_SIDE) -> Iterator[Frame]:
    """Frames from the caller: numpy [H, W, 3] uint8 or PIL images (time = i / source_fps), or
    (time_seconds, image) pairs. Taken as given (no sampling), at most max_frames, resized like files."""
    from edgekv.runtime.media import load_image

    if not (source_fps > 0):
        raise MediaError(f"source fps must be > 0, got {source_fps}")
    n = 0
    for i, item in enumerate(frames):
        if max_frames is not None and n >= max_frames:
            return
        t, img = item if isinstance(item, tuple) else (i / source_fps, item)
        im = load_image(img, name=f"frame {i}")
        arr = np.frombuffer(im.data, np.uint8).reshape(im.height, im.width, 3)
        w, h = fit_size(im.width, im.height, max_side)
        if (w, h) != (im.width, im.height):
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
        n += 1
        yield Frame(float(t), arr)
