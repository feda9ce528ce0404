"""Shared pieces of the hostile-input suite (tests/test_hostile_*.py): the CLI run in process, tiny runs and data,
snapshots of a user's files, and simulated full disks and read-only file systems.

What is simulated, and how: a *full disk* is a monkeypatched ``open`` whose files under a given folder raise
``OSError(ENOSPC)`` once a byte quota is used up (what ``write`` does on a full disk; nothing really fills);
a *read-only file system* is ``open``/``os.open``/``os.mkdir``/``os.replace`` raising ``OSError(EROFS)`` for
paths under a folder (tests run as root, whom a chmod'ed folder would not stop). Real processes (signals,
SIGKILL, exit codes of the real script) run ``examples/celeba.py`` as a subprocess.
"""
from __future__ import annotations

import atexit
import builtins
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest
from PIL import Image

from scratchvae import backend

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "celeba.py"
from cli_module import cli  # noqa: E402

# 48 built-in faces of 16x16 in batches of 8: 6 steps an epoch, a run of one epoch in a fraction of a second
TINY = ["--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--lr", "3e-3",
        "--device", "cpu", "--no-progress"]
PER_EPOCH = 6
CELEBA_W, CELEBA_H = 178, 218


@pytest.fixture(autouse=True)
def fast_figures(request, monkeypatch):
    """Figures are drawn for real (matplotlib: about a second a run on a busy CI machine) only in tests that ask
    for the ``real_figures`` fixture; elsewhere each figure is a small placeholder PNG written the same way (a temporary file,
    then a rename), while checkpoints and logs are still read and the model still decodes the held-out images."""
    if "real_figures" in request.fixturenames:
        yield
        return
    from scratchvae import plots  # noqa: PLC0415

    def placeholder(path, *args, **kwargs):
        tmp = f"{path}.tmp-{os.getpid()}"
        Image.new("RGB", (4, 4), (200, 100, 50)).save(tmp, format="PNG")
        os.replace(tmp, path)
        return path

    monkeypatch.setattr(plots, "plot_curve", placeholder)
    monkeypatch.setattr(plots, "_show_grid", placeholder)
    yield


@pytest.fixture
def real_figures():
    """Ask for it to have the figures drawn with matplotlib (see ``fast_figures``)."""


class Result:
    """What a CLI run returned and said: ``code``, ``out`` (stdout), ``err`` (stderr and log messages)."""

    def __init__(self, code, out, err):
        self.code, self.out, self.err = code, out, err

    @property
    def text(self):
        return self.out + self.err

    def says(self, *words):
        """Whether every one of ``words`` is in what was printed (case-insensitive), and no traceback is."""
        text = self.text.lower()
        return "traceback" not in text and all(w.lower() in text for w in words)

    def __repr__(self):
        return f"Result(code={self.code}, out={self.out[-800:]!r}, err={self.err[-1500:]!r})"


def main(*args) -> Result:
    """``examples/celeba.py``'s main(args) in this process; its exit status (argparse's SystemExit included)."""
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logger = logging.getLogger("scratchvae")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        logger.removeHandler(handler)
    return Result(code, out.getvalue(), err.getvalue())


def tiny(out, *args) -> Result:
    """main() on the tiny built-in setup, writing into ``out``."""
    return main(*TINY, "--out", out, *args)


def script(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """The real ``examples/celeba.py`` in a process of its own."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=script_env(), **kwargs)


def script_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTHONWARNINGS", None)
    return env


# ---- the user's files -------------------------------------------------------------------------------------------

def snapshot(*folders) -> dict:
    """Every file under ``folders``: path -> digest of its bytes (and its mtime), to compare before and after."""
    files = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                files[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return files


def changes(before: dict, after: dict) -> list:
    """The files added, removed or changed between two snapshots."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def checkpoint(out) -> dict:
    """The arrays of ``out/checkpoint.npz``."""
    with numpy.load(Path(out) / "checkpoint.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def checkpoint_step(out) -> int:
    return json.loads(str(checkpoint(out)["meta"]))["step"]


def all_finite(out) -> bool:
    """Whether every number array of the checkpoint (weights, BatchNorm statistics, Adam's moments) is finite."""
    return all(numpy.isfinite(a).all() for k, a in checkpoint(out).items() if a.dtype.kind == "f")


def log_steps(path) -> list:
    import csv  # noqa: PLC0415
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


_FINISHED = {}


def _scratch_dir(prefix) -> Path:
    """A temporary folder for what is made once per session, removed when the session ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def finished_run(dest) -> Path:
    """A copy, at ``dest``, of a finished one-epoch tiny run (made once per session): checkpoint, logs, figures."""
    if "run" not in _FINISHED:
        base = _scratch_dir("hostile-run-") / "run"
        result = tiny(base, "--epochs", 1)
        assert result.code == 0, result
        _FINISHED["run"] = base
    shutil.copytree(_FINISHED["run"], dest, copy_function=shutil.copy2)
    return Path(dest)


# ---- CelebA-like data -----------------------------------------------------------------------------------------

def picture(seed: int, size=(CELEBA_W, CELEBA_H)) -> Image.Image:
    """A 178x218 RGB test picture: a smooth random colour field with a sharp-edged rectangle."""
    g = numpy.random.default_rng(seed)
    small = g.integers(0, 256, (7, 6, 3), dtype=numpy.uint8)
    img = numpy.asarray(Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)).copy()
    y, x = g.integers(0, size[1] // 2), g.integers(0, size[0] // 2)
    img[y:y + 40, x:x + 50] = g.integers(0, 256, 3)
    return Image.fromarray(img)


_FACES = {}


def faces(folder, n=12) -> Path:
    """``folder`` holding ``n`` CelebA-named 178x218 JPEGs (000001.jpg ...): copies of files made once."""
    if n not in _FACES:
        base = _scratch_dir(f"hostile-faces-{n}-")
        for i in range(1, n + 1):
            picture(i).save(base / f"{i:06d}.jpg", quality=85)
        _FACES[n] = base
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(_FACES[n].iterdir()):
        shutil.copy2(p, folder / p.name)
    return folder


def celeba_args(data, cache, out, *more):
    """Options for a tiny run on CelebA-like ``data`` (16 px, batches of 4), the cache in ``cache``."""
    return ["--data", data, "--cache-dir", cache, "--preset", "tiny", "--image-size", "16", "--batch-size", "4",
            "--device", "cpu", "--no-progress", "--workers", "1", "--out", out, *more]


# ---- a disk that refuses ---------------------------------------------------------------------------------------

def _under(path, root) -> bool:
    try:
        return os.path.realpath(os.fspath(path)).startswith(os.path.realpath(os.fspath(root)) + os.sep)
    except TypeError:
        return False  # a file descriptor


class _QuotaFile:
    """A file object whose writes fail with ENOSPC once the quota shared by all such files is used up."""

    def __init__(self, f, quota):
        self._f, self._quota = f, quota

    def write(self, data):
        if self._quota[0] < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._quota[0] -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def full_disk(monkeypatch, root, quota=0, names=None):
    """Simulate a full disk under ``root``: files opened there for writing (only those named ``names``'s
    prefixes, if given) accept ``quota`` more bytes in all, then every write raises OSError(ENOSPC)."""
    real_open, left = builtins.open, [quota]

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        name = os.path.basename(os.fspath(file)) if not isinstance(file, int) else ""
        if any(c in mode for c in "wax+") and _under(file, root) and (
                names is None or any(name.startswith(n) for n in names)):
            return _QuotaFile(f, left)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text goes through io.open
    return left


def read_only(monkeypatch, root):
    """Simulate a read-only file system at ``root``: creating, writing, renaming or deleting there raises EROFS."""
    real_open, real_os_open = builtins.open, os.open
    real = {name: getattr(os, name) for name in ("mkdir", "replace", "rename", "remove", "unlink", "truncate")}

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def fake_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and _under(file, root):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, root):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(name):
        def fake(path, *args, **kwargs):
            if _under(path, root) or (os.path.realpath(os.fspath(path)) == os.path.realpath(os.fspath(root))):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return fake

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for name in real:
        monkeypatch.setattr(os, name, guard(name))
