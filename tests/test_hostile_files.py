"""Hostile input, files: damaged checkpoints and logs, a read-only run folder, a full disk, too little memory.

Every case asserts the exit status, the message's key words (and that no traceback is printed) and that the
user's files are intact: the checkpoint, the logs, the figures and anything else in the folder. Full disks
and read-only file systems are simulated (see hostile_kit); ``--out`` under a regular file and under /proc are real.
"""
import errno
import json
import os
import shutil
from pathlib import Path

import numpy
import pytest

from hostile_kit import (PER_EPOCH, changes, checkpoint, checkpoint_step, fast_figures, finished_run,  # noqa: F401
                         full_disk, log_steps, main, read_only, real_figures, snapshot, tiny)
from scratchvae import train
from scratchvae.vae import VAE

FIGURES = train.FIGURES


# ---- damaged checkpoints ------------------------------------------------------------------------------------------

def _rewrite(path, **changes_):
    """Rewrite the checkpoint at ``path`` with entries replaced (a value of None deletes the entry)."""
    arrays = checkpoint(path.parent)
    for key, value in changes_.items():
        key = key.replace("__", "/")
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    with open(path, "wb") as f:
        numpy.savez(f, **arrays)


def _meta(path, edit):
    meta = json.loads(str(checkpoint(path.parent)["meta"]))
    edit(meta)
    _rewrite(path, meta=json.dumps(meta))


def _vae_save(path):
    VAE(image_size=16, preset="tiny").save(path)


def _flip_middle(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _folder(path):
    path.unlink()
    path.mkdir()


def _dangling(path):
    path.unlink()
    path.symlink_to(path.parent / "no-such-file.npz")


DAMAGE = {  # name: (how, what resume says, what --plot-only says)
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "damaged", "damaged"),
    "zero bytes": (lambda p: p.write_bytes(b""), "not an .npz archive (empty)", "not an .npz archive (empty)"),
    "overwritten mid-file": (_flip_middle, "damaged", "damaged"),
    "random bytes": (lambda p: p.write_bytes(numpy.random.default_rng(0).bytes(5000)), "not an .npz archive",
                     "not an .npz archive"),
    "a text file": (lambda p: p.write_text("step,loss\n1,2\n"), "not an .npz archive", "not an .npz archive"),
    "meta not JSON": (lambda p: _rewrite(p, meta="{step: 1"), "unreadable 'meta'", "unreadable 'meta'"),
    "config not JSON": (lambda p: _rewrite(p, config="]"), "unreadable 'meta' or 'config'", "unreadable"),
    "meta without train_config": (lambda p: _meta(p, lambda m: m.pop("train_config")), "lacking train_config",
                                  "lacking train_config"),
    "meta without step": (lambda p: _meta(p, lambda m: m.pop("step")), "lacking step", "lacking step"),
    "meta of another format": (lambda p: _meta(p, lambda m: m.update(format=99)), "checkpoint format 99",
                               "checkpoint format 99"),
    "a weight of the wrong shape": (lambda p: _rewrite(p, model__encoder__0__W=numpy.zeros((3, 3), "f4")),
                                    "does not fit the model", "does not hold a model"),
    "a weight missing": (lambda p: _rewrite(p, **{"model/decoder.0.W": None}), "does not fit the model",
                         "does not hold a model"),
    "a model saved with VAE.save": (_vae_save, "not a training checkpoint", "not a training checkpoint"),
    "a folder in its place": (_folder, "nothing to resume", "not found"),
    "a dangling symlink": (_dangling, "nothing to resume", "not found"),
}


@pytest.mark.parametrize("mode", ["resume", "plot-only"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_nothing_is_touched(tmp_path, kind, mode):
    """Issue 6: each was a traceback (BadZipFile, EOFError, Bad CRC-32, JSONDecodeError, KeyError...) or named
    NumPy's allow_pickle; now status 2, one line saying what is wrong and what to do, and every file as it was."""
    out = finished_run(tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    how, says_resume, says_plot = DAMAGE[kind]
    if kind == "a weight of the wrong shape":  # numpy.savez names keys with slashes; build it by hand
        arrays = checkpoint(out)
        arrays["model/encoder.0.W"] = numpy.zeros((3, 3), "f4")
        numpy.savez(out / "checkpoint.npz", **arrays)
    else:
        how(out / "checkpoint.npz")
    before = snapshot(out)
    r = tiny(out, "--epochs", 2, "--resume") if mode == "resume" else main("--plot-only", "--out", out)
    assert r.code == 2 and r.says(says_resume if mode == "resume" else says_plot), r
    assert "allow_pickle" not in r.text
    assert changes(before, snapshot(out)) == []


# ---- damaged logs --------------------------------------------------------------------------------------------------

def _rows(path):
    return (path.read_text().splitlines())


def _damage_log(out, kind):
    """Damage log.csv or eval.csv of a finished run as ``kind`` says; returns (file, lines dropped or None)."""
    log, evals = out / "log.csv", out / "eval.csv"
    if kind == "NUL-filled tail":
        with open(log, "ab") as f:
            f.write(b"\0" * 300)
        return log, 1
    if kind == "random bytes":
        log.write_bytes(numpy.random.default_rng(1).bytes(2000))
        return log, "no columns"
    if kind == "a non-numeric field":
        lines = log.read_text().splitlines()
        lines[3] = lines[3].replace(lines[3].split(",")[4], "abc", 1)
        log.write_text("\n".join(lines) + "\n")
        return log, 1
    if kind == "a partial last row":  # printf 7 >> log.csv
        with open(log, "a") as f:
            f.write("7")
        return log, 1
    if kind == "eval.csv without some columns":
        lines = evals.read_text().splitlines()
        evals.write_text("\n".join(",".join(line.split(",")[:5]) for line in lines) + "\n")
        return evals, "no columns"
    if kind == "zero bytes":
        log.write_bytes(b"")
        return log, None
    if kind == "only NUL bytes":
        log.write_bytes(b"\0" * 4096)
        return log, "no columns"
    if kind == "Unix line ends and a blank line":
        lines = log.read_text().splitlines()
        log.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
        return log, None
    if kind == "a row cut in the middle":
        lines = log.read_text().splitlines()
        lines[2] = lines[2][: len(lines[2]) // 2]
        log.write_text("\n".join(lines) + "\n")
        return log, 1
    raise ValueError(kind)


LOG_DAMAGE = ["NUL-filled tail", "random bytes", "a non-numeric field", "a partial last row",
              "eval.csv without some columns", "zero bytes", "only NUL bytes", "Unix line ends and a blank line",
              "a row cut in the middle"]


@pytest.mark.parametrize("kind", LOG_DAMAGE)
def test_resume_keeps_every_good_row_of_a_damaged_log_and_says_which_were_dropped(tmp_path, kind):
    """Issue 9: a log is the user's record. Every good row is kept, the dropped ones are named, the file as it
    was is kept beside it, and the run resumes and finishes; later --plot-only still draws."""
    out = finished_run(tmp_path / "run")
    path, dropped = _damage_log(out, kind)
    original = path.read_bytes()
    from scratchvae.train import EVAL_FIELDS, LOG_FIELDS, read_log
    fields = LOG_FIELDS if path.name == "log.csv" else EVAL_FIELDS
    good = read_log(path, fields)[0]
    r = tiny(out, "--epochs", 2, "--resume")
    assert r.code == 0, r
    if dropped is None:
        assert "dropped" not in r.text and not (out / f"{path.name}.damaged").exists()
    else:
        words = ["no columns"] if dropped == "no columns" else [f"dropped {dropped} unreadable line"]
        assert r.says(f"{path.name}", *words, f"kept as {path.name}.damaged"), r
        assert (out / f"{path.name}.damaged").read_bytes() == original
    now = _rows(path)
    for row in good:  # every readable row of the old log is still there, as it was
        assert ",".join(row[k] for k in fields) in now
    steps = log_steps(out / "log.csv")
    assert steps == sorted(steps) and steps[-1] == 2 * PER_EPOCH and set(range(PER_EPOCH + 1, 2 * PER_EPOCH + 1)) <= set(
        steps)
    assert main("--plot-only", "--out", out).code == 0


@pytest.mark.parametrize("kind", LOG_DAMAGE)
def test_plot_only_draws_from_the_good_rows_of_a_damaged_log(tmp_path, kind):
    out = finished_run(tmp_path / "run")
    path, dropped = _damage_log(out, kind)
    for name in FIGURES:
        (out / name).unlink()
    before = snapshot(out)
    r = main("--plot-only", "--out", out)
    assert r.code == 0, r
    if dropped is not None:
        assert r.says(path.name, "no columns" if dropped == "no columns" else "dropped", "good rows"), r
    assert all((out / name).is_file() for name in FIGURES)
    assert [Path(p).name for p in changes(before, snapshot(out))] == sorted(FIGURES)  # the logs untouched


# ---- read-only file systems and places that are not folders ---------------------------------------------------------

def _no_data(monkeypatch):
    """Fail the test if the data is loaded: a run folder that cannot be written must be refused before."""
    def load_data(cfg):
        raise AssertionError("the data was loaded before the run folder was checked")
    monkeypatch.setattr(train, "load_data", load_data)


@pytest.mark.parametrize("how", ["new run", "--resume", "--force", "a folder not made yet"])
def test_a_read_only_run_folder_is_refused_before_any_work(tmp_path, monkeypatch, how):
    """Issue 7 (simulated EROFS): refused at once, with status 2, before the data loads; nothing changes."""
    if how in ("--resume", "--force"):
        out = finished_run(tmp_path / "disk" / "run")
    else:
        out = tmp_path / "disk" / ("run" if how == "new run" else "a/b/run")
        (tmp_path / "disk").mkdir()
    before = snapshot(tmp_path)
    read_only(monkeypatch, tmp_path / "disk")
    _no_data(monkeypatch)
    r = tiny(out, "--epochs", 2, *([how] if how.startswith("--") else []))
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write in", "read-only", "--out DIR"), r
    assert changes(before, snapshot(tmp_path)) == []


def test_plot_only_on_a_read_only_folder_keeps_the_figures(tmp_path, monkeypatch):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    read_only(monkeypatch, out)
    r = main("--plot-only", "--out", out)
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the figures", "read-only file system", "kept"), r
    assert changes(before, snapshot(out)) == []


@pytest.mark.parametrize("where", ["beneath a file", "a file", "under /proc"])
def test_out_where_no_folder_can_be(tmp_path, monkeypatch, where):
    """Real, not simulated: --out inside a regular file, --out being one, and /proc (which even root cannot write)."""
    (tmp_path / "notes.txt").write_text("mine")
    out = {"beneath a file": tmp_path / "notes.txt" / "run", "a file": tmp_path / "notes.txt",
           "under /proc": Path("/proc/scratchvae-hostile-run")}[where]
    _no_data(monkeypatch)
    before = snapshot(tmp_path)
    r = tiny(out, "--epochs", 1)
    assert r.code == 2 and r.says("--out" if where != "under /proc" else "cannot write in /proc"), r
    assert "is a file" in r.err or where == "under /proc"
    assert changes(before, snapshot(tmp_path)) == [] and not out.exists() or where == "a file"


def test_a_read_only_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    from hostile_kit import celeba_args, faces
    data = faces(tmp_path / "faces")
    (tmp_path / "cache").mkdir()
    before = snapshot(tmp_path)
    read_only(monkeypatch, tmp_path / "cache")
    r = main(*celeba_args(data, tmp_path / "cache", tmp_path / "run", "--epochs", 1))
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the image cache", "read-only", "--cache-dir"), r
    assert changes(before, snapshot(tmp_path / "faces", tmp_path / "cache")) == []


# ---- a full disk -------------------------------------------------------------------------------------------------

def _no_temporaries(out):
    return [p.name for p in Path(out).iterdir() if ".tmp" in p.name] == []


def test_a_full_disk_at_the_first_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    full_disk(monkeypatch, tmp_path, quota=0, names=["checkpoint"])
    r = tiny(out, "--epochs", 1)
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the checkpoint of step 0", "no space left", "nothing was trained"), r
    assert not (out / "checkpoint.npz").exists() and _no_temporaries(out)


def test_a_full_disk_at_a_later_checkpoint_keeps_the_one_before(tmp_path, monkeypatch):
    """Issue 8: a checkpoint write that fails half way (ENOSPC): status 2, the previous checkpoint intact, no
    temporary left, and --resume continues once there is room."""
    size = (finished_run(tmp_path / "probe") / "checkpoint.npz").stat().st_size
    out = tmp_path / "run"
    full_disk(monkeypatch, out, quota=int(size * 1.5), names=["checkpoint"])
    r = tiny(out, "--epochs", 2, "--checkpoint-every", 3)
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the checkpoint of step 3", "no space left",
                                  "the checkpoint of step 0", "intact", "--resume"), r
    assert checkpoint_step(out) == 0 and _no_temporaries(out)
    assert tiny(out, "--epochs", 2, "--resume").code == 0
    assert log_steps(out / "log.csv") == list(range(1, 2 * PER_EPOCH + 1))


@pytest.mark.parametrize("name, quota, says", [
    ("log.csv", 300, "cannot write log.csv"),
    ("eval.csv", 130, "cannot write eval.csv"),  # room for the header (119 bytes), not for a row
    ("summary.json", 0, "cannot write summary.json"),
])
def test_a_full_disk_while_logging(tmp_path, monkeypatch, name, quota, says):
    out = tmp_path / "run"
    full_disk(monkeypatch, out, quota=quota, names=[name])
    r = tiny(out, "--epochs", 2)
    monkeypatch.undo()
    assert r.code == 2 and r.says(says, "no space left", "intact", "--resume"), r
    assert _no_temporaries(out)
    step = checkpoint_step(out)
    resumed = tiny(out, "--epochs", 2, "--resume")
    assert resumed.code == 0 and resumed.says(f"at step {step}"), resumed
    assert log_steps(out / "log.csv") == list(range(1, 2 * PER_EPOCH + 1))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 * PER_EPOCH


def test_a_full_disk_at_the_start_of_a_resume_changes_nothing(tmp_path, monkeypatch):
    """Issue 8: CsvLog's rewrite failed and left a 0-byte log.csv.tmp; now status 2, every file as it was."""
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    full_disk(monkeypatch, out, quota=0, names=["log.csv"])
    r = tiny(out, "--epochs", 2, "--resume")
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write log.csv", "no space left", "checkpoint of step 6", "intact"), r
    assert changes(before, snapshot(out)) == [] and _no_temporaries(out)


@pytest.mark.parametrize("plot_only", [False, True])
def test_a_full_disk_while_drawing_keeps_the_figures_there(tmp_path, monkeypatch, plot_only, real_figures):
    """Figures go through a temporary file and a rename: a full disk leaves those there whole (--plot-only),
    or none half-written after a run, whose checkpoint, logs and summary are complete."""
    out = finished_run(tmp_path / "run") if plot_only else tmp_path / "run"
    before = snapshot(out)
    full_disk(monkeypatch, out, quota=0, names=["vae_", "samples", "interpolation", "traversal"])
    r = main("--plot-only", "--out", out) if plot_only else tiny(out, "--epochs", 1)
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the figures", "no space left", "--plot-only"), r
    assert _no_temporaries(out)
    if plot_only:
        assert changes(before, snapshot(out)) == []
    else:
        assert "done:" in r.out and checkpoint_step(out) == PER_EPOCH
        assert sorted(p.name for p in out.iterdir()) == sorted(["checkpoint.npz", "log.csv", "eval.csv", "summary.json",
                                                                "iw_bounds.csv"])
        assert main("--plot-only", "--out", out).code == 0  # with room again


def test_a_cache_folder_without_room(tmp_path, monkeypatch):
    from hostile_kit import celeba_args, faces
    from scratchvae import data
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    r = main(*celeba_args(faces(tmp_path / "faces"), tmp_path / "cache", tmp_path / "run", "--epochs", 1))
    assert r.code == 2 and r.says("the cache needs", "GB free", "cache_dir"), r
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_the_cache_is_written(tmp_path, monkeypatch):
    from hostile_kit import celeba_args, faces
    data = faces(tmp_path / "faces")
    full_disk(monkeypatch, tmp_path / "cache", quota=0)
    r = main(*celeba_args(data, tmp_path / "cache", tmp_path / "run", "--epochs", 1))
    monkeypatch.undo()
    assert r.code == 2 and r.says("cannot write the image cache", "no space left", "--cache-dir"), r
    assert [p.name for p in (tmp_path / "cache").iterdir() if "tmp" in p.name] == []
    assert main(*celeba_args(data, tmp_path / "cache", tmp_path / "run2", "--epochs", 1)).code == 0


# ---- memory ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option", ["--latent-dim", "--mc-samples", "--batch-size"])
def test_options_needing_more_memory_than_the_machine_has_are_refused(tmp_path, option):
    """Issue 10: a MemoryError traceback before; now status 2 with the memory these options would need."""
    r = tiny(tmp_path / "run", option, 1_000_000_000, "--epochs", 1)
    assert r.code == 2 and r.says("GB of memory", option), r
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("when", ["building the model", "at step 3"])
def test_running_out_of_memory_keeps_the_checkpoint(tmp_path, monkeypatch, when):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    calls = []
    if when == "building the model":
        def build(cfg):
            raise MemoryError("Unable to allocate 1.2 GiB")
        monkeypatch.setattr(train, "build_model", build)
        r = tiny(out, "--epochs", 2, "--force")
    else:
        real = VAE.train_step

        def step(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("Unable to allocate 1.2 GiB")
            return real(self, *args, **kwargs)
        monkeypatch.setattr(VAE, "train_step", step)
        r = tiny(out, "--epochs", 2, "--resume")
    monkeypatch.undo()
    assert r.code == 2 and r.says("out of memory", when if when != "at step 3" else "at step 9", "GB"), r
    if when == "building the model":  # --force deleted nothing yet
        assert changes(before, snapshot(out)) == []
    else:
        assert checkpoint_step(out) == PER_EPOCH and tiny(out, "--epochs", 2, "--resume").code == 0
