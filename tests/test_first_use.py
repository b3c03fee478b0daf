"""What broke when edgekv was tried as a new user would (issue 17, section 5), on the real llama.cpp with the
tiny models: each test failed before its fix. CLI errors are checked as exit code 2 and the exact `Error:` line."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekv.cli.main import cli
from edgekv.runtime.options import ModelOptions

from conftest import THREADS

REPO = Path(__file__).resolve().parents[1]


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def error_lines(output: str) -> list[str]:
    """The Error lines (in the REPL, after its "> " prompt)."""
    return [ln.removeprefix("> ") for ln in output.splitlines() if ln.removeprefix("> ").startswith("Error:")]


def assert_error(r, line: str) -> None:
    """Exit code 2, no traceback, and `line` as the one Error line, printed last."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    assert error_lines(r.output) == [line], r.output
    assert r.output.rstrip().splitlines()[-1] == line, r.output


def spawn_cli(*args, env: dict | None = None, **kw) -> subprocess.Popen:
    full = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "edgekv.cli.main", *map(str, args)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def cli_out(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    p = spawn_cli(*args)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"edgekv {' '.join(map(str, args))} still ran after {timeout} s:\n{err[-2000:]}")
    return subprocess.CompletedProcess(args, p.returncode, out, err)


# --- chat -b 1 ----------------------------------------------------------------------------------------
def test_batch_size_1_answers_as_the_default_batch(tiny_pairs):
    """llama.cpp reserves outputs for n_seq_max (2) sequences and asserted that within n_batch: -b 1
    aborted the process. In a subprocess: an abort must fail the test, not kill pytest. A query-agnostic
    method: the question window a query-aware one scores with is at most one batch."""
    model, mmproj, image = tiny_pairs["llava"]
    answers = {}
    for b in (1, 512):
        p = cli_out("chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "hello", "-b", b, "-n", 8,
                    "-t", THREADS, "--method", "keydiff")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "media tokens 256" in p.stderr and re.search(r"KV cells\s+\d+ -> \d+", p.stderr), p.stderr
        answers[b] = p.stdout
    assert answers[1] == answers[512] and answers[1].strip()


# --- caption -o -----------------------------------------------------------------------------------------
def test_caption_output_that_cannot_be_written_is_one_error_line(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    base = ["caption", "-m", model, "--mmproj", mmproj, image, "-t", THREADS, "-n", 2, "--no-progress"]
    assert_error(run(*base, "-o", "/proc/x.jsonl"),
                 "Error: -o/--output /proc/x.jsonl: cannot write it (No such file or directory)")
    somefile = tmp_path / "somefile"
    somefile.write_text("a file")
    assert_error(run(*base, "-o", somefile / "x.jsonl"),
                 f"Error: -o/--output {somefile}/x.jsonl: {somefile} is a file, not a folder")
    assert_error(run(*base, "--errors-file", somefile / "e.jsonl"),
                 f"Error: --errors-file {somefile}/e.jsonl: {somefile} is a file, not a folder")


# --- Ray ------------------------------------------------------------------------------------------------
def test_ray_address_that_does_not_answer_fails_fast(tiny_pairs):
    pytest.importorskip("ray", reason="Ray is the optional edgekv[ray] extra")
    model, mmproj, image = tiny_pairs["llava"]
    t0 = time.monotonic()
    p = cli_out("caption", "-m", model, "--mmproj", mmproj, image, "-o", image.parent / "ray-x.jsonl",
                "--no-progress", "--ray", "127.0.0.1:1", timeout=60)
    assert p.returncode == 2, p.stderr[-3000:]
    assert p.stderr.rstrip().splitlines()[-1] == (
        "Error: cannot reach the Ray cluster at 127.0.0.1:1: Connection refused (tried for up to 5 s); "
        "check the address and that the cluster is up"), p.stderr[-3000:]
    assert time.monotonic() - t0 < 45
    # something listens there but is no Ray: Ray alone retried for minutes
    import socket

    with socket.create_server(("0.0.0.0", 0)) as srv:   # all interfaces: Ray swaps 127.0.0.1 for the node IP
        port = srv.getsockname()[1]
        t0 = time.monotonic()
        p = cli_out("caption", "-m", model, "--mmproj", mmproj, image, "-o", image.parent / "ray-x.jsonl",
                    "--no-progress", "--ray", f"127.0.0.1:{port}", timeout=90)
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"Error: cannot reach the Ray cluster at 127.0.0.1:{port}: "), p.stderr[-3000:]
    assert time.monotonic() - t0 < 60


def test_local_ray_ends_with_a_killed_driver(tiny_pairs, tmp_path):
    """kill -9 of `edgekv caption --ray`: every process of the Ray it started (agents included) is gone
    within seconds, not a minute later."""
    pytest.importorskip("ray", reason="Ray is the optional edgekv[ray] extra")
    import psutil

    from edgekv.testing.tiny import make_test_image

    model, mmproj, _ = tiny_pairs["llava"]
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        (d / f"img{i}.png").write_bytes(make_test_image(64, 64, seed=i))
    out = tmp_path / "caps.jsonl"
    p = spawn_cli("caption", "-m", model, "--mmproj", mmproj, d, "-o", out, "-t", 1, "-n", 2, "--no-progress",
                  "--ray", "local", env={"EDGEKV_CAPTION_DELAY": "3"})
    procs = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and p.poll() is None and not (out.exists() and out.read_bytes()):
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1][-3000:]   # a record is out: Ray and its actor run
        procs = psutil.Process(p.pid).children(recursive=True)
        names = {q.name() for q in procs if q.is_running()}
        assert "raylet" in names and any("Agent" in n for n in names), names
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(q.is_running() for q in procs):
            time.sleep(0.5)
        left = [(q.pid, q.name()) for q in procs if q.is_running()]
        assert not left, f"outlived the driver: {left}"
    finally:
        for q in procs:   # processes this test started: do not leave them running if it failed
            try:
                q.kill()
            except psutil.Error:
                pass
        if p.poll() is None:
            p.kill()
        p.communicate()


# --- --max-kv-cells -----------------------------------------------------------------------------------
def test_max_kv_cells_keeps_the_cells_at_or_under_n(tiny_pairs):
    """600 cells asked, 768 allocated by llama.cpp: the cache never holds more than 600, re-read from
    llama.cpp's state before every chunk's compaction and at the end; a budget that cannot stay under it
    is refused (it peaked at 602 before)."""
    from edgekv.errors import ContextOverflowError
    from edgekv.runtime import Model, Session
    from edgekv.runtime.streaming import streaming

    model, mmproj, image = tiny_pairs["llava-tiles"]   # 2560 media tokens in 10 chunks
    refused = {}
    with Model.load(model, mmproj, n_ctx=600, n_batch=2048, threads=THREADS, flash_attn="off") as m:
        assert m.n_ctx == 600
        for budget in (0.1, 0.15):
            with Session(m, budget=budget, probe="describe this") as s:
                hook = streaming(s)
                try:
                    list(s.chat("describe this", [image], max_tokens=64))
                except ContextOverflowError as e:
                    refused[budget] = str(e)
                peak = max(hook.trace + [hook.observe(s)])
                assert len(hook.trace) >= 9 and peak <= 600, (budget, hook.trace)
    assert list(refused) == [0.15] and "of 600 are free" in refused[0.15]


def test_overflow_under_max_kv_cells_names_that_option(tiny_pairs):
    model, mmproj, image = tiny_pairs["llava-tiles"]
    r = run("chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "describe this", "--max-kv-cells", 600,
            "--budget", 0.15, "-n", 8, "-t", THREADS, "-b", 2048)
    assert_error(r, "Error: the prompt needs 256 more cells but only 254 of 600 are free; raise --max-kv-cells "
                    "or lower the image size or budget")


# --- images are not videos ----------------------------------------------------------------------------
def test_an_image_renamed_mp4_is_refused_as_a_video(tiny_pairs, tmp_path):
    from edgekv.caption.captioner import CaptionConfig, Captioner

    model, mmproj, image = tiny_pairs["llava"]
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(image.read_bytes())
    r = run("chat", "-m", model, "--mmproj", mmproj, "--video", fake, "-p", "hi", "-n", 2, "-t", THREADS)
    assert_error(r, f"Error: not a video: {fake} is an image (png); attach images with --image (/image in chat)")
    # the REPL: one Error line at /video, and the next turn runs (it failed as a 64-frame clip before)
    r = run("chat", "-m", model, "--mmproj", mmproj, "-n", 2, "-t", THREADS,
            input=f"/video {image}\nhello\n/exit\n")
    assert r.exit_code == 0, r.output
    assert error_lines(r.output) == [
        f"Error: not a video: {image} is an image (png); attach images with --image (/image in chat)"], r.output
    assert "video(s) stay attached" not in r.output and "media tokens 0" in r.output
    with Captioner(CaptionConfig(model=str(model), mmproj=str(mmproj), max_tokens=2,
                                 model_options=ModelOptions(threads=THREADS, flash_attn="off"))) as c:
        assert c.caption(fake)["error"] == (f"not a video: {fake} is an image (png); attach images with --image "
                                            "(/image in chat)")


# --- caption records: every compaction --------------------------------------------------------------
def test_caption_record_counts_every_compaction(tiny_pairs, tmp_path):
    """A 10-chunk image under max_kv_cells: the record's cells before = the full cache (a run that keeps
    everything, independent of the compactions), after = the cells now, the methods of all compactions;
    the summary's saving is computed from those."""
    from edgekv.caption.captioner import CaptionConfig, Captioner

    model, mmproj, image = tiny_pairs["llava-tiles"]
    opts = ModelOptions(threads=THREADS, flash_attn="off", n_batch=2048)
    base = dict(model=str(model), mmproj=str(mmproj), max_tokens=2)
    with Captioner(CaptionConfig(**base, model_options=opts.with_(n_ctx=4096), method="full")) as full:
        ref = full.caption(image)
    assert ref["kv_cells_before"] == ref["kv_cells_after"] > 2560
    with Captioner(CaptionConfig(**base, model_options=opts, max_kv_cells=600, budget=0.1, method="snapkv")) as c:
        rec = c.caption(image)
        methods = {r.method for r in c.session.reports}
        n_reports = len(c.session.reports)
    assert n_reports == 10, rec
    assert rec["kv_cells_before"] == ref["kv_cells_before"] and rec["kv_cells_after"] < 600, rec
    assert all(m in rec["method"] for m in methods), rec
    out = tmp_path / "caps.jsonl"
    r = run("caption", "-m", model, "--mmproj", mmproj, image, "-o", out, "-t", THREADS, "-n", 2, "-fa", "off",
            "-b", 2048, "--max-kv-cells", 600, "--budget", 0.1, "--method", "snapkv", "--no-progress")
    assert r.exit_code == 0, r.output
    [x] = [json.loads(ln) for ln in out.read_text().splitlines()]
    saving = 100 * (1 - x["kv_cells_after"] / x["kv_cells_before"])
    assert x["kv_cells_before"] == ref["kv_cells_before"] and f"mean KV saving {saving:.1f} %" in r.output, r.output


# --- sidecars -------------------------------------------------------------------------------------------
def test_caption_extension_that_would_overwrite_an_input_is_refused(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.png").write_bytes(image.read_bytes())
    base = ["caption", "-m", model, "--mmproj", mmproj, "-t", THREADS, "-n", 2, "--no-progress"]
    assert_error(run(*base, d, "--caption-extension", ".png"),
                 "Error: --caption-extension .png is an image/video extension: the captions would replace the "
                 "inputs; use e.g. .txt or .caption")
    notes = d / "notes.txt"
    notes.write_text("mine")
    assert_error(run(*base, notes, "--caption-extension", ".txt"),
                 f"Error: the caption of {notes} would be written over it (--caption-extension .txt); use another "
                 "extension")
    assert (d / "a.png").read_bytes() == image.read_bytes() and notes.read_text() == "mine"


def test_sidecar_writers_of_one_file_never_share_a_temp_file(tmp_path):
    from edgekv.caption.sinks import atomic_write_text

    target = tmp_path / "a.txt"
    texts = [f"writer {i}\n" * 200 for i in range(4)]
    errors = []

    def write(i: int) -> None:
        for _ in range(60):
            try:
                atomic_write_text(target, texts[i])
            except OSError as e:   # with one fixed temp name, a writer's file was renamed away by another
                errors.append(repr(e))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_text() in texts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]   # no temp file left
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_errors_log_torn_last_line_is_repaired_on_resume(tiny_pairs, tmp_path):
    model, mmproj, image = tiny_pairs["llava"]
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    log = d / "edgekv-caption-errors.jsonl"
    first = json.dumps({"file_name": str(d / "old.png"), "error": "an earlier failure"}) + "\n"
    torn = '{"file_name": "x.png", "err'
    log.write_text(first + torn)   # a run killed mid-write
    r = run("caption", "-m", model, "--mmproj", mmproj, d, "-t", THREADS, "-n", 2, "--no-progress")
    assert r.exit_code == 1, r.output
    assert f"repaired a torn last line in {log} ({len(torn)} bytes dropped)" in r.output
    text = log.read_text()
    assert text.startswith(first) and text.endswith("\n")
    recs = [json.loads(ln) for ln in text.splitlines()]                       # every line parses
    assert [x["file_name"] for x in recs] == [str(d / "old.png"), str(d / "broken.png")]


# --- query capture needs the mirrored ggml_tensor layout -------------------------------------------
def test_query_capture_refused_when_the_tensor_layout_check_fails(tiny_pairs, monkeypatch):
    from edgekv.runtime import lib

    model, mmproj, image = tiny_pairs["llava"]
    base = ["chat", "-m", model, "--mmproj", mmproj, "--image", image, "-p", "hi", "-n", 2, "-t", THREADS]
    monkeypatch.setattr(lib, "TENSOR_LAYOUT_OK", False)
    assert_error(run(*base, "--method", "snapkv"),
                 "Error: this llama.cpp build's ggml_tensor layout differs from the one edgekv mirrors, so query "
                 "capture (auto and the query-aware methods) is off: use a query-agnostic method (e.g. --method "
                 "keydiff; see `edgekv methods`)")
    r = run(*base, "--method", "keydiff")   # no capture: runs
    assert r.exit_code == 0 and re.search(r"KV cells\s+\d+ -> \d+", r.output), r.output


# --- media tokens: the report and the video line -------------------------------------------------
def test_report_media_tokens_match_the_video_line(tiny_pairs, tmp_path):
    from test_video import make_clip

    model, mmproj, _ = tiny_pairs["qwen2vl"]
    clip = make_clip(tmp_path / "clip.mp4", n=8, fps=4, w=448, h=448)
    r = run("chat", "-m", model, "--mmproj", mmproj, "--video", clip, "--video-fps", 4, "-p", "what happens?",
            "-n", 2, "-t", THREADS)
    assert r.exit_code == 0, r.output
    report = int(re.search(r"^media tokens (\d+)$", r.output, re.M).group(1))
    video = re.search(r"clip.mp4: 8 frames, .* (\d+) media tokens in (\d+) chunks", r.output)
    # 8 frames of 448x448 merged in pairs: 4 chunks of 256 tokens
    assert (report, int(video.group(1)), int(video.group(2))) == (1024, 1024, 4), r.output
    # the REPL: an image turn, then a /video turn; /stats counts both (256 + 4 frames of 256)
    model, mmproj, image = tiny_pairs["llava"]
    r = run("chat", "-m", model, "--mmproj", mmproj, "-n", 2, "-t", THREADS, "--video-fps", 2,
            input=f"/image {image}\nhi\n/video {clip}\nwhat happens?\n/stats\n/exit\n")
    assert r.exit_code == 0, r.output
    counts = [int(x) for x in re.findall(r"^(?:> )*media tokens (\d+)$", r.output, re.M)]
    video = re.search(r"clip.mp4: 4 frames, .* (\d+) media tokens in 4 chunks", r.output)
    assert video and counts == [256, 1024, 1280] and int(video.group(1)) == 1024, r.output


# --- model-load failure: the Error line is the last ----------------------------------------------
def test_model_load_failure_ends_with_the_error_line(tiny_pairs, tmp_path):
    model = tiny_pairs["llava"][0]
    bad = tmp_path / "corrupt.gguf"
    data = bytearray(model.read_bytes())
    data[4096:] = bytes(len(data) - 4096)   # a valid header, then zeros: llama.cpp logs why it refuses
    bad.write_bytes(bytes(data[: len(data) // 2]))
    r = run("chat", "-m", bad, "-p", "x", "-t", THREADS)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert error_lines(r.output) == [lines[-1]], r.output
    assert lines[-1].startswith(f"Error: llama.cpp could not load the model {bad}"), r.output
    assert len(lines) > 1   # llama.cpp's own lines, before it


# --- --seed ---------------------------------------------------------------------------------------------
def test_negative_seed_is_one_clear_error(tiny_pairs):
    model, mmproj, image = tiny_pairs["llava"]
    line = "Error: Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295."
    for args in (["chat", "-m", model, "-p", "hi", "-n", 2, "-t", THREADS],
                 ["demo", "--variant", "llava", "-n", 2],
                 ["caption", "-m", model, "--mmproj", mmproj, image, "-o", image.parent / "seed.jsonl", "-n", 2]):
        assert_error(run(*args, "--seed", -1), line)
