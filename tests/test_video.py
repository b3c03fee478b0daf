"""Video: frame sampling on known timestamps, PyAV decoding of clips generated here, streaming prefill whose
cells (re-read from llama.cpp's state after every chunk) never exceed budget + one chunk, several images
compacted after their own prefill, and `edgekv chat --video` end to end with every bad input."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekv.cli.main import cli
from edgekv.errors import ContextOverflowError, MediaError
from edgekv.runtime.video import (FrameSelector, VideoReader, fit_size, format_timestamp, sample_times,
                                  select_frames)

from conftest import THREADS


# --- clips made here with PyAV ----------------------------------------------------------------------
def frame_image(i: int, w: int, h: int) -> np.ndarray:
    """A frame whose mean grey level encodes its index (survives lossy coding)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (i * 23) % 200 + 20
    img[: h // 4, : w // 4] = (255, 0, 0)
    return img


def make_clip(path: Path, n: int = 8, fps: int = 4, w: int = 224, h: int = 224, fmt: str | None = None) -> Path:
    import av

    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("mpeg4", rate=fps)  # FFmpeg's own encoder: no external codec library
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_image(i, w, h), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", n=8, fps=4, w=448, h=448)


# --- sampling (pure) ----------------------------------------------------------------------------------
def test_sample_times_by_fps():
    assert sample_times(3.0, fps=2, max_frames=64) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert sample_times(2.9, fps=1, max_frames=64) == [0.0, 1.0, 2.0]


def test_sample_times_uniform_when_the_cap_binds():
    assert sample_times(10.0, fps=2, max_frames=4) == [0.0, 2.5, 5.0, 7.5]
    assert sample_times(10.0, fps=None, max_frames=5) == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_select_frames_on_known_timestamps():
    times = [i / 10 for i in range(30)]  # 10 fps, 3 s
    assert select_frames(times, sample_times(3.0, 2, 64), tolerance=0.05) == [0, 5, 10, 15, 20, 25]
    # uniform 4 over 3 s: targets 0, 0.75, 1.5, 2.25 -> first frame within half a frame of each
    assert select_frames(times, sample_times(3.0, 2, 4), tolerance=0.05) == [0, 7, 15, 22]
    # more fps than the clip has: every frame once, never twice
    assert select_frames(times, sample_times(3.0, 25, 1000), tolerance=0.05) == list(range(30))
    # a stream whose timestamps jitter still lands on the nearest frame
    jitter = [t + (0.004 if i % 2 else -0.004) for i, t in enumerate(times)]
    assert select_frames(jitter, [0.0, 1.0, 2.0], tolerance=0.05) == [0, 10, 20]
    sel = FrameSelector([0.0, 1.0])
    assert sel.take(0.0) and not sel.take(0.5) and sel.take(1.2) and sel.done


def test_timestamp_format_and_fit_size():
    assert format_timestamp(1.5) == "[0m1.50s]"
    assert format_timestamp(125.25) == "[2m5.25s]"
    assert fit_size(3840, 2160, 768) == (768, 432)
    assert fit_size(200, 100, 768) == (200, 100)


@pytest.mark.parametrize("fps", [0, -1, float("nan")])
def test_fps_must_be_positive(fps):
    with pytest.raises(MediaError, match="fps must be > 0"):
        sample_times(3.0, fps, 8)


# --- decoding -------------------------------------------------------------------------------------------
def test_reader_samples_real_frames(clip):
    r = VideoReader(clip, fps=2, max_frames=64)
    assert (r.info.width, r.info.height) == (448, 448) and r.info.duration == pytest.approx(2.0, abs=0.01)
    frames = list(r.frames())
    assert [f.time for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    for f in frames:  # the frame at t is frame index 4t
        i = round(f.time * 4)
        assert f.image.shape == (448, 448, 3) and f.image.dtype == np.uint8
        assert abs(float(f.image[100:, 100:].mean()) - ((i * 23) % 200 + 20)) < 6
    assert r.frames_read == 4 and r.error is None


def test_reader_uniform_cap_and_resize(tmp_path):
    p = make_clip(tmp_path / "wide.mp4", n=12, fps=4, w=320, h=160)
    r = VideoReader(p, fps=4, max_frames=3, max_side=64)
    frames = list(r.frames())
    assert [f.time for f in frames] == pytest.approx([0.0, 1.0, 2.0])
    assert frames[0].image.shape == (32, 64, 3)


def test_bad_files(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 10)
    with pytest.raises(MediaError, match="not a video"):
        VideoReader(text)
    with pytest.raises(MediaError, match="video not found"):
        VideoReader(tmp_path / "missing.mp4")
    import av

    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        f.sample_rate = 8000
        for pk in s.encode(f):
            c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    with pytest.raises(MediaError, match="no video stream"):
        VideoReader(audio)


def test_no_decodable_frames(tmp_path):
    good = make_clip(tmp_path / "good.mkv", n=8, fps=4, fmt="matroska")
    data = good.read_bytes()
    head = tmp_path / "head.mkv"
    head.write_bytes(data[:600])  # the header survives, no frame does
    with pytest.raises(MediaError, match="no decodable frames|not a video"):
        VideoReader(head)


def test_stream_broken_half_way_keeps_the_frames_before(tmp_path):
    good = make_clip(tmp_path / "good.mkv", n=40, fps=4, w=64, h=64, fmt="matroska")
    data = good.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    r = VideoReader(cut, fps=4, max_frames=64)
    frames = list(r.frames())
    assert 2 <= len(frames) < 40
    assert r.error is not None and "kept the" in r.error and f"{len(frames)} frames" in r.error


# --- streaming prefill on the real llama.cpp --------------------------------------------------------------
def reread_hook():
    """The compactor, re-reading the cells from llama.cpp's state after every chunk (before and after its
    compaction)."""
    from edgekv.runtime.streaming import ChunkCompactor, state_cells

    class Reread(ChunkCompactor):
        def __call__(self, session, n):
            self.before.append(state_cells(session))
            super().__call__(session, n)
            self.after.append(state_cells(session))

    hook = Reread()
    hook.before, hook.after = [], []
    return hook


@pytest.mark.parametrize("variant,group", [("qwen2vl", 2), ("llava", 1)])
def test_streamed_video_stays_within_budget_plus_chunk(tiny_pairs, clip, variant, group):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import Video, frames_merge, plan_video, state_cells

    model_path, mmproj, _ = tiny_pairs[variant]
    video = Video(clip, fps=4, max_frames=8)
    with Model.load(model_path, mmproj, n_ctx=256, n_batch=512, threads=THREADS, flash_attn="off") as m:
        assert frames_merge(m) == (group == 2)
        plan = plan_video(m, video, 0.25)
        assert plan.frames == 8 and plan.groups == 8 // group and plan.media_tokens == plan.groups * plan.chunk_tokens
        m.resize_context(plan.n_ctx + 200)
        s = Session(m, budget=0.25, seed=0)
        hook = reread_hook()
        s.after_media_chunk = hook
        out = "".join(r.text for r in s.chat("what happens?", videos=[video], max_tokens=4))
        assert isinstance(out, str)
        stats = s.video_stats[-1]
        assert stats.frames == 8 and stats.chunks == plan.groups and stats.seconds == pytest.approx(1.75)
        assert stats.media_tokens >= plan.media_tokens
        C = plan.chunk_tokens
        final = state_cells(s)
        assert final == s.n_cells  # llama.cpp and the session's bookkeeping agree
        # state_cells reads the 16-byte header only; the whole blob says the same
        from edgekv.kv.codec import parse_state
        assert final == parse_state(s.state_blob(), has_ext=m.layout.mrope).blocks[0].n_cells
        text = int((s.cache.kind == 0).sum())  # protected: template, timestamps, vision wrappers, answer
        budget = math.ceil(0.25 * plan.media_tokens) + plan.groups
        assert final - text <= budget
        assert len(hook.before) == plan.groups
        for before, after in zip(hook.before, hook.after):
            assert before <= final + C          # budget + one chunk, re-read from llama.cpp
            assert before <= budget + text + C
            assert after <= before - C + math.ceil(0.25 * C) + 1
        assert max(hook.before) > C  # the bound is not vacuous: earlier frames were in the cache
        # the full cache would have held every frame's tokens
        assert final - text < plan.media_tokens // 3
        s.close()


def test_streaming_without_a_session_hook_uses_its_own(tiny_pairs, clip):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import append_video

    model_path, mmproj, _ = tiny_pairs["llava"]
    with Model.load(model_path, mmproj, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off") as m:
        s = Session(m, budget=0.25)
        s.append_text("<|im_start|>user\n")
        frames = [(t / 4, frame_image(t, 64, 48)) for t in range(5)]  # an iterator of (time, array) frames
        st = append_video(s, iter(frames))
        assert st.frames == 5 and st.chunks == 5 and st.seconds == 1.0
        assert s.after_media_chunk is None
        assert int((s.cache.kind != 0).sum()) <= 5 * (64 + 1)  # media cells: 0.25 of 5 x 256 (+ the kept tails)
        assert st.media_tokens == 5 * 256 and s.n_cells < 5 * 256 // 2
        s.close()


def test_several_images_each_compacted_after_their_own_prefill(tiny_pairs):
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import state_cells, streaming

    model_path, mmproj, image = tiny_pairs["llava"]
    with Model.load(model_path, mmproj, n_ctx=700, n_batch=512, threads=THREADS, flash_attn="off") as m:
        s = Session(m, budget=0.25)
        hook = streaming(s)
        list(s.chat("compare these", [image, image], max_tokens=3))
        # each image alone (compact_chunk): its last (pos_max) cell is kept whole, the 255 others are candidates
        assert hook.chunks == 2 and [r.n_candidates for r in s.reports[:2]] == [255, 255]
        assert max(hook.trace) <= 700
        first_turn = state_cells(s)
        list(s.chat("and this one?", [image], max_tokens=3))
        assert hook.chunks == 3
        # 3 x 256 image tokens went through a 700-cell context: each was compacted before the next came
        assert state_cells(s) < first_turn + 256
        assert max(hook.trace) <= 700
        s.close()


def test_huge_frames_over_the_batch_are_refused(tiny_pairs, tmp_path):
    from edgekv.runtime import Model
    from edgekv.runtime.streaming import Video, plan_video

    model_path, mmproj, _ = tiny_pairs["qwen2vl"]
    p = make_clip(tmp_path / "big.mp4", n=2, fps=2, w=1344, h=896)
    with Model.load(model_path, mmproj, n_ctx=256, n_batch=512, threads=THREADS, flash_attn="off") as m:
        with pytest.raises(MediaError, match=r"tokens but the batch is 512"):
            plan_video(m, Video(p, max_side=None), 0.25)
        plan = plan_video(m, Video(p, max_side=448), 0.25)  # resized frames fit
        assert plan.chunk_tokens <= 512
        with pytest.raises(ContextOverflowError, match="cannot hold one chunk"):
            plan_video(m, Video(p, max_side=448), 0.25, free_cells=100)


# --- the CLI --------------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_chat_video_end_to_end(tiny_pairs, clip):
    model, mmproj, _ = tiny_pairs["qwen2vl"]
    r = run("chat", "-m", model, "--mmproj", mmproj, "--video", clip, "--video-fps", 4, "-p", "what happens?",
            "-n", 4, "-t", THREADS, "--budget", "0.25")
    assert r.exit_code == 0, r.output
    assert re.search(r"video\s+clip.mp4: 8 frames, 1.8 s of video, \d+ media tokens in 4 chunks", r.output), r.output
    m = re.search(r"peak KV cells (\d+) \(budget (\d+) \+ chunk (\d+)\)\s+n_ctx (\d+)", r.output)
    assert m, r.output
    peak, budget, chunk, n_ctx = map(int, m.groups())
    assert peak <= budget + chunk <= n_ctx


def test_chat_max_kv_cells_with_images(tiny_pairs):
    model, mmproj, image = tiny_pairs["llava"]
    r = run("chat", "-m", model, "--mmproj", mmproj, "--image", image, "--image", image, "--max-kv-cells", 500,
            "-p", "compare", "-n", 3, "-t", THREADS)
    assert r.exit_code == 0, r.output
    assert r.output.count("KV cells    ") >= 2


def test_repl_video_command(tiny_pairs, clip):
    model, mmproj, _ = tiny_pairs["llava"]
    script = f"/video {clip}\nwhat happens?\n/video /nonexistent.mp4\n/exit\n"
    r = CliRunner().invoke(cli, ["chat", "-m", str(model), "--mmproj", str(mmproj), "-t", str(THREADS), "-n", "2",
                                 "--video-fps", "2"], input=script)
    assert r.exit_code == 0, r.output
    assert "attached video" in r.output and "4 frames" in r.output
    assert "Error: video not found" in r.output


def assert_one_error_line(r, pattern):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [l for l in r.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), r.output


def test_chat_video_bad_inputs(tiny_pairs, clip, tmp_path):
    model, mmproj, _ = tiny_pairs["llava"]
    base = ["chat", "-m", model, "--mmproj", mmproj, "-p", "hi", "-n", 2, "-t", THREADS]
    notvid = tmp_path / "notes.mp4"
    notvid.write_text("hello\n" * 50)
    assert_one_error_line(run(*base, "--video", notvid), r"not a video")
    assert_one_error_line(run(*base, "--video", tmp_path / "nope.mp4"), r"video not found")
    assert_one_error_line(run(*base, "--video", clip, "--video-fps", 0), r"fps must be > 0")
    assert_one_error_line(run(*base, "--video", clip, "--video-max-frames", 0), r"max frames must be >= 1")
    assert_one_error_line(run("chat", "-m", model, "--video", clip, "-p", "hi", "-t", THREADS),
                          r"--video needs a multimodal projector")
    head = tmp_path / "head.mkv"
    head.write_bytes(make_clip(tmp_path / "g.mkv", fmt="matroska").read_bytes()[:600])
    assert_one_error_line(run(*base, "--video", head), r"no decodable frames|not a video")
    big = make_clip(tmp_path / "big.mp4", n=2, fps=2, w=1344, h=896)
    q_model, q_mmproj, _ = tiny_pairs["qwen2vl"]
    assert_one_error_line(run("chat", "-m", q_model, "--mmproj", q_mmproj, "-b", 128, "--video", big, "-p", "hi",
                              "-n", 2, "-t", THREADS), r"tokens but the batch is 128")
    assert_one_error_line(run(*base, "--video", clip, "--max-kv-cells", 100), r"cannot hold one chunk")


def test_chat_video_broken_half_way_answers_then_exits_2(tiny_pairs, tmp_path):
    model, mmproj, _ = tiny_pairs["llava"]
    good = make_clip(tmp_path / "long.mkv", n=40, fps=4, w=64, h=64, fmt="matroska")
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = run("chat", "-m", model, "--mmproj", mmproj, "--video", cut, "--video-fps", 4, "-p", "hi", "-n", 2,
            "-t", THREADS)
    assert_one_error_line(r, r"cut.mkv: the stream (ends at|is damaged after) .* kept the \d+ frames")
    assert "peak KV cells" in r.output  # the answer and the report came first


def test_chat_video_under_max_kv_cells_lowers_the_budget(tiny_pairs, clip):
    model, mmproj, _ = tiny_pairs["qwen2vl"]
    # 5 frames of 448x448 (uniform over the 2 s clip) -> pairs + a single last frame: 3 chunks of <= 256
    r = run("chat", "-m", model, "--mmproj", mmproj, "--video", clip, "--video-fps", 4, "--video-max-frames", 5,
            "--max-kv-cells", 512, "--budget", 1.0, "-p", "what happens?", "-n", 3, "-t", THREADS)
    assert r.exit_code == 0, r.output
    assert re.search(r"clip.mp4: 5 frames, 1.5 s of video, \d+ media tokens in 3 chunks", r.output), r.output
    m = re.search(r"peak KV cells (\d+) \(budget (\d+) \+ chunk (\d+)\)\s+n_ctx (\d+)", r.output)
    peak, budget, chunk, n_ctx = map(int, m.groups())
    assert n_ctx == 512 and peak <= budget + chunk <= n_ctx  # budget 1.0 could not fit: it was lowered


def test_chat_takes_an_iterator_of_pil_frames(tiny_pairs):
    from PIL import Image

    from edgekv.runtime import Model, Session

    model_path, mmproj, _ = tiny_pairs["llava"]
    frames = (Image.fromarray(frame_image(i, 80, 60)) for i in range(3))  # a generator: read once, lazily
    with Model.load(model_path, mmproj, n_ctx=1024, n_batch=512, threads=THREADS, flash_attn="off") as m:
        with Session(m, budget=0.25) as s:
            list(s.chat("what changes?", videos=[frames], max_tokens=2))
            st = s.video_stats[-1]
            assert (st.frames, st.chunks, st.media_tokens, st.seconds) == (3, 3, 3 * 256, 2.0)
            assert s.after_media_chunk is None and s.n_cells < 3 * 256
