"""`edgekv chat` REPL on a pseudo-terminal: Ctrl-C during an answer stops it and returns to the prompt
(the answer so far is kept), Ctrl-C at the prompt or Ctrl-D exits; /save and /load."""
from __future__ import annotations

import json
import os
import pty
import select
import signal
import struct
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")


class Repl:
    """`edgekv chat` in a child process whose controlling terminal is a pty we type into."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1", TERM="dumb")
        argv = [sys.executable, "-m", "edgekv.cli.main", "chat", *args]
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: exec at once
            os.execve(sys.executable, argv, env)
        self.out = b""

    def read_until(self, needle: bytes, timeout: float = 120.0) -> bytes:
        end = time.monotonic() + timeout
        while needle not in self.out:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got:\n{self.out.decode(errors='replace')}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the REPL exited waiting for {needle!r}:\n"
                                         f"{self.out.decode(errors='replace')}")
                self.out += chunk
        return self.out

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                r, _, _ = select.select([self.fd], [], [], 0.2)
                if r:
                    self.out += os.read(self.fd, 65536)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"the REPL did not exit:\n{self.out.decode(errors='replace')}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def saved_messages(path: Path) -> list[dict]:
    data = path.read_bytes()
    n = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[16:16 + n])["messages"]


def test_ctrl_c_stops_the_answer_keeps_it_and_ctrl_d_exits(tiny_pairs, tmp_path):
    model, mmproj, _ = tiny_pairs["llava"]
    repl = Repl("-m", str(model), "--mmproj", str(mmproj), "-c", "8192", "-t", "2", "-n", "8000", "--no-report",
                "--method", "full")
    try:
        repl.read_until(b"> ")
        repl.send(b"Write a long poem.\r")   # 3000+ bytes before EOS on the tiny llava: a Ctrl-C under load still lands mid-answer
        mark = len(repl.out)
        # wait for the answer to stream a little, then Ctrl-C
        end = time.monotonic() + 60
        while len(repl.out) < mark + 80 and time.monotonic() < end:
            r, _, _ = select.select([repl.fd], [], [], 0.2)
            if r:
                repl.out += os.read(repl.fd, 65536)
        repl.send(b"\x03")
        repl.read_until(b"(stopped; the answer so far is kept)", timeout=30)
        after = len(repl.out)
        repl.read_until(b"> ")
        saved = tmp_path / "chat.edgekv"
        repl.send(f"/save {saved}\r".encode())
        repl.read_until(b"(conversation saved to")
        msgs = saved_messages(saved)
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert len(msgs[1]["content"]) > 0
        # the next turn works, then /load brings the saved (one-turn) conversation back
        repl.send(b"/load " + str(saved).encode() + b"\r")
        repl.read_until(b"(loaded ")
        assert b"2 messages" in repl.out[after:]
        repl.read_until(b"> ")
        repl.send(b"\x04")                                             # Ctrl-D at an empty prompt
        assert repl.wait() == 0
    finally:
        repl.close()


def test_ctrl_c_at_the_prompt_exits(tiny_pairs):
    model, mmproj, _ = tiny_pairs["llava"]
    repl = Repl("-m", str(model), "--mmproj", str(mmproj), "-t", "2", "--no-report")
    try:
        repl.read_until(b"> ")
        repl.send(b"\x03")
        code = repl.wait()
        assert code in (0, 1)          # click's Abort; either way no traceback
        assert b"Traceback" not in repl.out
    finally:
        repl.close()


def test_one_shot_with_a_batch_smaller_than_the_question_window(tiny_pairs):
    """`edgekv chat -b 8 -p hi` (window 32) used to write past the llama_batch (NULL pointer access)."""
    from click.testing import CliRunner

    from edgekv.cli.main import cli

    model, mmproj, image = tiny_pairs["llava"]
    r = CliRunner().invoke(cli, ["chat", "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
                                 "-b", "8", "-t", "2", "-n", "3", "-p", "hi"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "query window 8" in r.output and "prefill" in r.output


def test_repl_save_and_load_errors_are_one_line(tiny_pairs, tmp_path):
    from click.testing import CliRunner

    from edgekv.cli.main import cli

    model, mmproj, _ = tiny_pairs["llava"]
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    r = CliRunner().invoke(cli, ["chat", "-m", str(model), "--mmproj", str(mmproj), "-t", "2", "-n", "2",
                                 "--no-report"],
                           input=f"hi\n/load {bad}\n/load\n/save {tmp_path / 'c.edgekv'}\n/exit\n",
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Error: " in r.output and "not a saved edgekv conversation" in r.output
    assert "/load needs a file path" in r.output and (tmp_path / "c.edgekv").exists()
    assert "Traceback" not in r.output


def test_ctrl_c_during_the_prefill_undoes_the_turn_and_keeps_the_images(tiny_pairs):
    """Three 2560-token images in 8-token batches take seconds to prefill; Ctrl-C half a second in stops
    llama_decode (abort callback, woken from the signal's wakeup fd), the turn leaves nothing behind and
    the images stay attached."""
    model, mmproj, image = tiny_pairs["llava-tiles"]
    repl = Repl("-m", str(model), "--mmproj", str(mmproj), "-c", "8192", "-b", "8", "-t", "2", "-n", "2",
                "--no-report", "--method", "full", "--image", str(image), "--image", str(image),
                "--image", str(image))
    try:
        repl.read_until(b"> ")
        repl.send(b"describe them\r")
        time.sleep(0.5)
        t0 = time.monotonic()
        repl.send(b"\x03")
        repl.read_until(b"(cancelled before the answer; the conversation is as before)", timeout=60)
        assert time.monotonic() - t0 < 1.0           # not after the whole prefill
        repl.read_until(b"(3 image(s) stay attached to the next message)")
        repl.read_until(b"> ")
        repl.send(b"\x04")
        assert repl.wait() == 0
        assert b"Traceback" not in repl.out
    finally:
        repl.close()
