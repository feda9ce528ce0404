"""Hostile input, signals: Ctrl-C, SIGTERM and SIGKILL sent to the real script in a process of its own, in the middle
of training and while the first run builds the image cache. The checkpoint left behind always resumes, the
logs continue where they stopped, and no process or temporary file outlives the run.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile_kit import (SCRIPT, faces, log_steps, script, script_env,  # noqa: F401
                         checkpoint_step)

LONG = ["--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--epochs", "300",
        "--device", "cpu", "--no-progress", "--checkpoint-every", "1000"]


def start(*args, code=None, pipes=True):
    """The script (or ``code`` run as its stand-in) in a new process, its output piped (or dropped, where
    processes that outlive it would hold the pipes open)."""
    cmd = [sys.executable, "-c", code, str(SCRIPT), *map(str, args)] if code else [sys.executable, str(SCRIPT),
                                                                                   *map(str, args)]
    where = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=SCRIPT.parents[1], env=script_env(), stdout=where, stderr=where, text=True)


def wait_for(condition, timeout=60.0, every=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return False


def rows(out):
    try:
        return len((Path(out) / "log.csv").read_text().splitlines()) - 1
    except OSError:
        return 0


def resume_to(out, steps):
    result = script(*LONG, "--out", out, "--resume", "--max-steps", steps)
    assert result.returncode == 0, result.stderr
    assert log_steps(Path(out) / "log.csv") == list(range(1, steps + 1))


@pytest.mark.parametrize("signum, code, words", [
    (signal.SIGINT, 130, "interrupted at step"),
    (signal.SIGTERM, 143, "terminated (SIGTERM) at step"),
])
def test_a_signal_in_the_middle_of_training_writes_a_checkpoint_that_resumes(tmp_path, signum, code, words):
    out = tmp_path / "run"
    p = start(*LONG, "--out", out)
    try:
        assert wait_for(lambda: rows(out) >= 3), p.communicate(timeout=5)
        p.send_signal(signum)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == code, err
    assert words in err and "--resume" in err and "Traceback" not in err
    step = checkpoint_step(out)
    assert step >= 3 and log_steps(out / "log.csv") == list(range(1, step + 1))
    assert not [q for q in out.iterdir() if ".tmp" in q.name]
    resume_to(out, step + 4)


def test_sigkill_in_the_middle_of_training_loses_only_the_steps_since_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    p = start(*LONG[:-1], "5", "--out", out)  # a checkpoint every 5 steps
    try:
        assert wait_for(lambda: rows(out) >= 8), p.communicate(timeout=5)
        p.kill()
        p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    step = checkpoint_step(out)
    assert step >= 5 and step % 5 == 0 or step % 6 == 0
    resume_to(out, max(rows(out), step) + 3)  # the rows after the checkpoint are replayed, not kept twice


def test_two_quick_ctrl_cs_stop_at_once_and_keep_a_checkpoint_that_resumes(tmp_path):
    out = tmp_path / "run"
    p = start(*LONG, "--out", out)
    try:
        assert wait_for(lambda: rows(out) >= 3), p.communicate(timeout=5)
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    step = checkpoint_step(out)
    resume_to(out, step + 2)


# The script with every image decode made slow (50 ms), so that a cache build lasts long enough to be killed;
# the pool's workers are forked and inherit the slow decoder.
SLOW_DECODE = """
import runpy, sys, time
import scratchvae.data as data
real = data.decode_image
def slow(*args, **kwargs):
    time.sleep(0.05)
    return real(*args, **kwargs)
data.decode_image = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def children(pid):
    """The ids of the live (not zombie) processes whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.append(int(entry))
    return found


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_during_the_first_cache_build_leaves_no_worker_behind(tmp_path):
    """Issue 13: the pool's workers outlived a SIGKILLed parent, waiting forever and holding the deleted
    temporary cache open. Now they end within a few seconds, and the next run builds the cache."""
    source = faces(tmp_path / "faces", n=12)
    for i in range(13, 121):  # 120 images: 3 s of decoding with two workers
        os.link(source / f"{(i - 1) % 12 + 1:06d}.jpg", source / f"{i:06d}.jpg")
    cache = tmp_path / "cache"
    args = ["--data", source, "--cache-dir", cache, "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
            "--epochs", "1", "--device", "cpu", "--workers", "2", "--out", tmp_path / "run"]
    p = start(*args, code=SLOW_DECODE, pipes=False)
    workers = []
    try:
        assert wait_for(lambda: len(children(p.pid)) == 2 and list(cache.glob("*.tmp"))), "no pool started"
        workers = children(p.pid)
        p.kill()
        p.wait(timeout=30)
        assert wait_for(lambda: not any(alive(w) for w in workers), timeout=5), "the workers outlived their parent"
    finally:
        p.kill()
        for w in workers:  # should they still run, end them here rather than leave them to the machine
            if alive(w):
                os.kill(w, signal.SIGKILL)
    assert not (tmp_path / "run").exists()
    result = script(*args)
    assert result.returncode == 0, result.stderr
    assert not list(cache.glob("*.tmp"))  # the killed build's temporary cache was removed


def test_ctrl_c_during_the_first_cache_build_saves_nothing_and_leaves_no_temporary(tmp_path):
    source = faces(tmp_path / "faces", n=12)
    for i in range(13, 61):
        os.link(source / f"{(i - 1) % 12 + 1:06d}.jpg", source / f"{i:06d}.jpg")
    cache = tmp_path / "cache"
    args = ["--data", source, "--cache-dir", cache, "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
            "--epochs", "1", "--device", "cpu", "--workers", "1", "--out", tmp_path / "run"]
    p = start(*args, code=SLOW_DECODE)
    try:
        assert wait_for(lambda: list(cache.glob("*.tmp"))), p.communicate(timeout=5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert "interrupted before training began; nothing was saved" in err and "Traceback" not in err
    assert not list(cache.glob("*.tmp")) and not (tmp_path / "run").exists()
