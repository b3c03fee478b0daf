"""`edgekv caption` on the real llama.cpp with tiny generated models: resume after SIGKILL, torn JSONL
lines, per-input failures, atomic sidecars, shared-prefix reuse == naive prefill, Ray == single process."""
from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekv.caption.captioner import CaptionConfig, Captioner
from edgekv.caption.inputs import InputError, collect_inputs
from edgekv.caption.sinks import ERRORS_NAME, JsonlSink, SidecarSink, atomic_write_text
from edgekv.cli.main import cli

from conftest import THREADS

REPO = Path(__file__).resolve().parents[1]
N_CTX = 1024


@pytest.fixture(scope="module")
def pair(tiny_pairs):
    model, mmproj, _ = tiny_pairs["llava"]
    return model, mmproj


@pytest.fixture
def folder(tmp_path) -> Path:
    """Five distinct 224x224 test images."""
    from edgekv.testing.tiny import make_test_image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        (d / f"img{i}.png").write_bytes(make_test_image(224, 224, seed=10 + i))
    return d


def cfg(pair, **kw) -> CaptionConfig:
    from edgekv.runtime.options import ModelOptions

    model, mmproj = pair
    opts = ModelOptions(n_ctx=N_CTX, n_batch=512, threads=THREADS, flash_attn="off")
    opts = opts.with_(**{k: kw.pop(k) for k in list(kw) if k in ModelOptions.names()})
    base = dict(model=str(model), mmproj=str(mmproj), model_options=opts, max_tokens=8, method="snapkv", budget=0.25)
    base.update(kw)
    return CaptionConfig(**base)


def cli_args(pair, *extra) -> list[str]:
    model, mmproj = pair
    return ["caption", "-m", str(model), "--mmproj", str(mmproj), "-c", str(N_CTX), "-t", str(THREADS),
            "-n", "8", "--method", "snapkv", "-fa", "off", "--no-progress", *map(str, extra)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- inputs and sinks (no model) -------------------------------------------------------------------
def test_collect_inputs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "c.txt", ".hidden.png", "sub/d.webp"):
        (tmp_path / name).write_bytes(b"x")
    flat = collect_inputs([str(tmp_path)])
    assert [p.name for p in flat] == ["a.JPG", "b.png"]          # sorted, images only, no hidden files
    assert [p.name for p in collect_inputs([str(tmp_path)], recursive=True)] == ["a.JPG", "b.png", "d.webp"]
    assert [p.name for p in collect_inputs([str(tmp_path / "*.png"), str(tmp_path / "b.png")])] == ["b.png"]
    lst = tmp_path / "list.txt"
    lst.write_text("sub/d.webp\n# comment\n\nmissing.png\n")
    assert [p.name for p in collect_inputs([f"@{lst}"])] == ["missing.png", "d.webp"]  # missing: fails later
    with pytest.raises(InputError, match="not found"):
        collect_inputs([str(tmp_path / "nope")])
    with pytest.raises(InputError, match="no image or video matches"):
        collect_inputs([str(tmp_path / "*.gif")])


def test_jsonl_torn_last_line_repaired(tmp_path):
    out = tmp_path / "caps.jsonl"
    good = [{"file_name": "a.png", "text": "one"}, {"file_name": "b.png", "error": "bad"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"file_name": "c.png", "te')
    sink = JsonlSink(out)
    assert any("torn" in n for n in sink.notes)
    assert out.read_text().endswith("\n") and len(read_jsonl(out)) == 2
    imgs = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    sink.prepare(imgs, overwrite=False)          # b failed before: its record goes, it is redone
    assert [sink.done(p) for p in imgs] == [True, False, False]
    assert read_jsonl(out) == good[:1]
    sink.write(imgs[2], {"text": "three"})
    sink.close()
    assert read_jsonl(out) == [good[0], {"file_name": "c.png", "text": "three"}]
    JsonlSink(out).close()   # the lock went with close()


def test_jsonl_refuses_a_second_writer(tmp_path):
    a = JsonlSink(tmp_path / "x.jsonl")
    with pytest.raises(InputError, match="another process"):
        JsonlSink(tmp_path / "x.jsonl")
    a.close()


def test_sidecar_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("old caption\n")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new caption that never landed\n")
    monkeypatch.undo()
    assert target.read_text() == "old caption\n"               # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary left behind
    atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    sink = SidecarSink("caption", tmp_path / ERRORS_NAME)
    assert sink.sidecar(tmp_path / "x.y.png") == tmp_path / "x.y.caption"


# --- the engine --------------------------------------------------------------------------------------
def test_prefix_reuse_matches_naive_prefill(pair, folder):
    images = sorted(folder.iterdir())[:3]
    with Captioner(cfg(pair)) as reuse:
        assert reuse.head_tokens > 0 and reuse.head + reuse.tail == reuse.full_prompt
        a = [reuse.caption(p) for p in images]
        back = [reuse.caption(p) for p in images[::-1]]     # nothing of one image leaks into the next
    assert [r["text"] for r in back[::-1]] == [r["text"] for r in a]
    with Captioner(cfg(pair, reuse_prefix=False)) as naive:
        b = [naive.caption(p) for p in images]
    for x, y in zip(a, b):
        assert "error" not in x, x
        assert x["text"] and x["text"] == y["text"]
        assert (x["kv_cells_before"], x["kv_cells_after"]) == (y["kv_cells_before"], y["kv_cells_after"])
        assert x["kv_cells_after"] < x["kv_cells_before"]
    assert len({r["text"] for r in a}) > 1   # different images, different captions


def test_the_caption_prompt_is_the_probe_of_compaction_before_it(tiny_pairs, tmp_path, monkeypatch):
    """The prompt is known before each input is read: early compaction of a 10-tile image (2560 media
    tokens in a 1024-cell context) and every chunk of a streamed clip probe with the prompt's own text
    (not the generic probe, not the chat template around it); a prompt with no text falls back to the
    generic probe."""
    from test_probe import spy_probes
    from test_video import make_clip

    seen = spy_probes(monkeypatch)
    model, mmproj, big = tiny_pairs["llava-tiles"]
    clip = make_clip(tmp_path / "clip.mp4", n=8, fps=4, w=224, h=224)
    prompt, vprompt = "Name every colour in it.", "Say what moves."
    with Captioner(cfg((model, mmproj), prompt=prompt, video_prompt=vprompt, video_fps=2, max_tokens=2)) as c:
        for path, text in ((big, prompt), (clip, vprompt)):
            seen.clear()
            rec = c.caption(path)
            assert "error" not in rec, rec
            early = [r for r in c.session.reports if r.early]
            want = c.model.tokenize(text, add_bos=False, special=False)
            assert len(early) >= 2 and all(r.probe == "question" for r in early), early
            assert all(r.info["probe_tokens"] == len(want) for r in early)
            assert seen == [(text, want, True)] * len(early)
        assert rec["chunks"] == len(early)            # the clip: every chunk's compaction probed
    seen.clear()
    with Captioner(cfg((model, mmproj), prompt=" ", max_tokens=2)) as c:
        assert "error" not in c.caption(big)
        early = [r for r in c.session.reports if r.early]
        assert early and all(r.probe == "generic" for r in early)
        assert [p for p, _, known in seen] == [True] * len(early) and not any(k for _, _, k in seen)


def test_per_input_failures_do_not_stop_the_engine(pair, folder, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    good = folder / "img0.png"
    with Captioner(cfg(pair, prefix="sks")) as c:
        first = c.caption(good)
        assert "cannot read image" in c.caption(bad)["error"]
        assert "unsupported file type '.txt'" in c.caption(other)["error"]
        assert "not found" in c.caption(tmp_path / "gone.png")["error"]
        again = c.caption(good)
    assert first["text"].startswith("sks, ") and again == {**first, "seconds": again["seconds"]}
    with Captioner(cfg(pair, n_ctx=128)) as small:   # the 256-token image cannot fit 128 cells
        rec = small.caption(good)
        assert "free" in rec["error"] and "ctx-size" in rec["error"]


# --- the command ---------------------------------------------------------------------------------------
def test_cli_sidecars_resume_and_corrupt_image(pair, folder):
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    r = CliRunner().invoke(cli, cli_args(pair, folder, "--prefix", "sks"))
    assert r.exit_code == 1, r.output          # one input failed, the rest captioned
    caps = {p.name: p.read_text() for p in folder.glob("*.txt")}
    assert sorted(caps) == [f"img{i}.txt" for i in range(5)]
    assert all(t.startswith("sks, ") and t.endswith("\n") for t in caps.values())
    errs = read_jsonl(folder / ERRORS_NAME)
    assert [Path(e["file_name"]).name for e in errs] == ["broken.jpg"] and "cannot read image" in errs[0]["error"]
    assert "captioned 5, skipped 0 (already done), failed 1 of 6" in r.output
    assert re.search(r"\([0-9.]+ images/s\)", r.output), r.output
    assert not list(folder.glob(".*edgekv-tmp"))

    (folder / "broken.jpg").unlink()
    (folder / "img2.txt").unlink()
    (folder / "img3.txt").write_text("kept by hand\n")
    r = CliRunner().invoke(cli, cli_args(pair, folder, "--prefix", "sks"))
    assert r.exit_code == 0, r.output
    assert "captioned 1, skipped 4" in r.output
    assert (folder / "img2.txt").read_text() == caps["img2.txt"]     # redone, the same caption
    assert (folder / "img3.txt").read_text() == "kept by hand\n"     # done: skipped
    r = CliRunner().invoke(cli, cli_args(pair, folder, "--overwrite", "--caption-extension", ".txt"))
    assert r.exit_code == 0 and "captioned 5, skipped 0" in r.output
    assert (folder / "img3.txt").read_text() == caps["img3.txt"][len("sks, "):]


def test_cli_usage_errors(pair, folder, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, cli_args(pair, tmp_path / "missing"))
    assert r.exit_code == 2 and "Error: input not found" in r.output
    r = runner.invoke(cli, cli_args(pair, folder, "--concurrency", "2"))
    assert r.exit_code == 2 and "--ray" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(cli, cli_args(pair, empty))
    assert r.exit_code == 2 and "no images or videos found" in r.output
    r = runner.invoke(cli, ["caption", "--ray", str(folder)])
    assert r.exit_code == 2 and "not a Ray address" in r.output


def _spawn(pair, out: Path, folder: Path, delay: float | None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_WAIT_POLICY="PASSIVE")
    env.pop("EDGEKV_CAPTION_DELAY", None)
    if delay:
        env["EDGEKV_CAPTION_DELAY"] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "edgekv.cli.main", *cli_args(pair, folder, "-o", out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_sigkill_then_resume(pair, folder, tmp_path):
    out = tmp_path / "metadata.jsonl"
    p = _spawn(pair, out, folder, delay=2.0)       # 2 s between a caption and its record: killable
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    os.kill(p.pid, signal.SIGKILL)               # the 3rd input is captioned but not yet written
    p.wait()
    before = out.read_text()
    recs = read_jsonl(out)
    assert len(recs) == 2 and all("text" in r for r in recs)
    # a kill during a write leaves a torn line: simulate one on top
    with open(out, "a") as f:
        f.write('{"file_name": "img2.png", "text": "half a rec')
    p = _spawn(pair, out, folder, delay=None)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr
    assert "repaired a torn last line" in stderr and "captioned 3, skipped 2" in stderr
    after = out.read_text()
    assert after.startswith(before)                              # finished captions intact, byte for byte
    recs = read_jsonl(out)                                       # every line parses
    names = [r["file_name"] for r in recs]
    assert names == [f"imgs/img{i}.png" for i in range(5)]       # none duplicated, the interrupted one redone
    # the same captions as one uninterrupted run
    with Captioner(cfg(pair)) as c:
        for r in recs:
            assert r["text"] == c.caption(folder / Path(r["file_name"]).name)["text"]
    for r in recs:
        assert {"file_name", "text", "model", "method", "budget", "tokens", "kv_cells_before", "kv_cells_after",
                "seconds"} <= set(r)


# --- Ray ---------------------------------------------------------------------------------------------
def test_ray_same_captions_as_single_process(pair, folder, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional edgekv[ray] extra")
    from edgekv.caption.ray_runner import RayCaptioner

    from test_video import make_clip

    (folder / "broken.png").write_bytes(b"nope")
    make_clip(folder / "clip.mp4", n=8, fps=4, w=224, h=224)   # a video too: its options travel to the actors
    single_out, ray_out = tmp_path / "single.jsonl", tmp_path / "ray.jsonl"
    args = ["-t", "1", "--seed", "3", "--temp", "0.8", "--video-fps", "2"]  # sampled: the seed must travel
    r = CliRunner().invoke(cli, cli_args(pair, folder, "-o", single_out, *args))
    assert r.exit_code == 1, r.output
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        r = CliRunner().invoke(cli, cli_args(pair, folder, "-o", ray_out, "--ray", "local", "--concurrency", "2",
                                             *args))
        assert r.exit_code == 1, r.output
    finally:
        ray.shutdown()
    single = {x["file_name"]: x for x in read_jsonl(single_out)}
    dist = {x["file_name"]: x for x in read_jsonl(ray_out)}
    assert len(read_jsonl(ray_out)) == len(dist) == 7
    assert dist["imgs/clip.mp4"]["frames"] == single["imgs/clip.mp4"]["frames"] == 4
    assert sorted(single) == sorted(dist)
    for k in single:
        assert single[k].get("text") == dist[k].get("text") and ("error" in single[k]) == ("error" in dist[k])
    assert "error" in dist["imgs/broken.png"]
    # the UDF a Ray user passes to map_batches, called as Ray Data calls it (a dict of arrays)
    udf = RayCaptioner(cfg(pair, threads=1, seed=3, temperature=0.8).to_dict())
    out = udf({"path": np.array([str(folder / "img1.png"), str(folder / "broken.png")])})
    udf.captioner.close()
    assert [json.loads(x).get("text") for x in out["record"]] == [single["imgs/img1.png"]["text"], None]
    assert len(set(out["worker"])) == 1 and min(out["peak_rss_mb"]) > 0


def test_sidecar_write_failure_is_a_failed_input(tmp_path):
    (tmp_path / "a.txt").mkdir()             # the sidecar cannot be replaced: that input fails, nothing aborts
    sink = SidecarSink(".txt", tmp_path / ERRORS_NAME)
    rec = sink.write(tmp_path / "a.png", {"text": "hello", "tokens": 1})
    ok = sink.write(tmp_path / "b.png", {"text": "world"})
    sink.close()
    assert "cannot write" in rec["error"] and "text" not in rec and ok == {"text": "world"}
    assert [e["file_name"] for e in read_jsonl(tmp_path / ERRORS_NAME)] == [str(tmp_path / "a.png")]
    assert (tmp_path / "b.txt").read_text() == "world\n" and not list(tmp_path.glob(".*edgekv-tmp"))


# --- videos ------------------------------------------------------------------------------------------
def add_videos(folder: Path) -> None:
    """A good 4-frame clip (at --video-fps 2), a file that is no video, and a clip cut in half."""
    from test_video import make_clip

    make_clip(folder / "clip.mp4", n=8, fps=4, w=224, h=224)
    (folder / "corrupt.mp4").write_text("not a video at all\n" * 20)
    long = make_clip(folder / "long.mkv", n=40, fps=4, w=64, h=64, fmt="matroska")
    (folder / "cut.mkv").write_bytes(long.read_bytes()[: long.stat().st_size // 2])
    long.unlink()


def test_videos_among_images_jsonl_and_resume(pair, folder, tmp_path):
    add_videos(folder)
    out = tmp_path / "caps.jsonl"
    r = CliRunner().invoke(cli, cli_args(pair, folder, "-o", out, "--video-fps", 2))
    assert r.exit_code == 1, r.output                     # the corrupt video failed, the rest went on
    recs = {Path(x["file_name"]).name: x for x in read_jsonl(out)}
    assert sorted(recs) == sorted([f"img{i}.png" for i in range(5)] + ["clip.mp4", "corrupt.mp4", "cut.mkv"])
    assert "captioned 7, skipped 0 (already done), failed 1 of 8" in r.output
    assert re.search(r"\([0-9.]+ files/s\)", r.output), r.output   # videos in the batch: not "images/s"
    assert "not a video" in recs["corrupt.mp4"]["error"] and "text" not in recs["corrupt.mp4"]
    v = recs["clip.mp4"]
    assert v["text"] and "warning" not in v
    assert (v["frames"], v["video_seconds"], v["chunks"]) == (4, 1.5, 4)   # 2 fps over a 2 s clip
    # bounded: the context is sized for budget + one chunk + text (not the 4 x 256 media tokens, nor -c), the
    # cells re-read from llama.cpp never exceed it, and the full cache would have held far more
    assert v["n_ctx"] < N_CTX and v["kv_peak_cells"] <= v["n_ctx"] < 4 * 256
    assert v["kv_cells_after"] < v["kv_cells_before"] and v["kv_cells_before"] > 4 * 256
    # half-broken stream: captioned from the frames before the damage, with a warning; it counts as done
    cut = recs["cut.mkv"]
    assert cut["text"] and 2 <= cut["frames"] < 20 and "kept the" in cut["warning"]
    assert re.search(r"warning: .*cut.mkv: the stream (ends at|is damaged after)", r.output), r.output
    for i in range(5):
        assert recs[f"img{i}.png"]["text"] and "frames" not in recs[f"img{i}.png"]
    # the images' captions are those of a run without videos in the folder (the context went back to -c)
    with Captioner(cfg(pair, video_fps=2)) as c:
        assert c.caption(folder / "img3.png")["text"] == recs["img3.png"]["text"]
        assert c.caption(folder / "clip.mp4")["text"] == v["text"]          # and the clip's, in another order

    (folder / "corrupt.mp4").unlink()
    before = out.read_text()
    r = CliRunner().invoke(cli, cli_args(pair, folder, "-o", out, "--video-fps", 2))
    assert r.exit_code == 0 and "nothing to do: all 7 input(s) already captioned" in r.output, r.output
    assert out.read_text() == before                      # the done videos were skipped, not redone


def test_video_sidecars_errors_file_and_resume(pair, tmp_path):
    from edgekv.testing.tiny import make_test_image

    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.png").write_bytes(make_test_image(224, 224, seed=4))
    add_videos(d)
    args = ("--video-fps", 2, "--prefix", "sks")
    r = CliRunner().invoke(cli, cli_args(pair, d, *args))
    assert r.exit_code == 1, r.output
    assert sorted(p.name for p in d.glob("*.txt")) == ["a.txt", "clip.txt", "cut.txt"]
    assert (d / "clip.txt").read_text().startswith("sks, ")
    log = {Path(e["file_name"]).name: e for e in read_jsonl(d / ERRORS_NAME)}
    assert "not a video" in log["corrupt.mp4"]["error"] and "kept the" in log["cut.mkv"]["warning"]
    clip_caption = (d / "clip.txt").read_text()
    (d / "a.txt").unlink()
    (d / "corrupt.mp4").unlink()
    r = CliRunner().invoke(cli, cli_args(pair, d, *args))
    assert r.exit_code == 0, r.output
    assert "captioned 1, skipped 2" in r.output           # the videos' sidecars exist: skipped
    assert (d / "clip.txt").read_text() == clip_caption and (d / "a.txt").exists()


def test_video_options_and_max_kv_cells(pair, tmp_path):
    add_videos(tmp_path)
    r = CliRunner().invoke(cli, cli_args(pair, tmp_path / "clip.mp4", "--video-fps", 0))
    assert r.exit_code == 2 and "Error: video fps must be > 0" in r.output, r.output
    r = CliRunner().invoke(cli, cli_args(pair, tmp_path / "clip.mp4", "--video-max-frames", 0))
    assert r.exit_code == 2 and "max frames must be >= 1" in r.output
    # --max-kv-cells: the context is that for every input; a clip's budget is lowered to fit it
    with Captioner(cfg(pair, video_fps=4, max_kv_cells=600, budget=1.0)) as c:
        rec = c.caption(tmp_path / "clip.mp4")
        assert "error" not in rec, rec
        assert rec["frames"] == 8 and rec["n_ctx"] == c.model.n_ctx and c.model.n_ctx <= 768
        assert rec["kv_peak_cells"] <= 600 < rec["kv_cells_before"]
    with Captioner(cfg(pair, video_fps=4, max_kv_cells=200)) as c:   # not even one 256-token frame fits
        assert "cannot hold one chunk" in c.caption(tmp_path / "clip.mp4")["error"]
