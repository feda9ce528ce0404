"""Hostile input, options and run folders: values no run can use, flags that contradict each other, resuming what
cannot be resumed, and leftovers of killed runs. Status 2 and one clear line, and no file created or changed.
"""
import os

import pytest

from hostile_kit import (PER_EPOCH, TINY, changes, checkpoint_step, fast_figures, finished_run, log_steps,  # noqa: F401
                         main, snapshot, tiny)


@pytest.mark.parametrize("args, says", [
    (["--lr", "nan"], "--lr: expected a positive number, got nan"),
    (["--lr", "inf"], "--lr: expected a positive number, got inf"),
    (["--lr", "1e400"], "--lr: expected a positive number"),
    (["--lr", "-0.1"], "--lr: expected a positive number"),
    (["--beta", "nan"], "--beta: expected a number >= 0"),
    (["--beta", "-1"], "--beta: expected a number >= 0"),
    (["--recon-variance", "0"], "--recon-variance: expected a positive number"),
    (["--image-size", "0"], "--image-size: expected a positive integer"),
    (["--image-size", "1e3"], "--image-size: expected a positive integer, got '1e3'"),
    (["--image-size", "10"], "image-size 10 must be a multiple of 4"),
    (["--image-size", "4"], "image-size 4 must be a multiple of 4, at least 8"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--limit", "-5"], "--limit: expected a positive integer"),
    (["--workers", "0"], "--workers: expected a positive integer"),
    (["--max-steps", "0"], "--max-steps: expected a positive integer"),
    (["--eval-images", "0"], "--eval-images: expected a positive integer"),
    (["--checkpoint-every", "0"], "--checkpoint-every: expected a positive integer"),
    (["--mc-samples", "0"], "--mc-samples: expected a positive integer"),
    (["--latent-dim", "0"], "--latent-dim: expected a positive integer"),
    (["--epochs", "1.5"], "--epochs: expected a positive integer, got '1.5'"),
    (["--seed", "abc"], "--seed: invalid int value"),
    (["--device", "tpu"], "--device: invalid choice"),
    (["--objective", "iwae"], "--objective: invalid choice"),
    (["--lrr", "0.1"], "unrecognized arguments: --lrr"),
    (["--resume", "--plot-only"], "not allowed with argument"),
    (["--force", "--plot-only"], "not allowed with argument"),
    (["--data", ""], "--data is empty"),
])
def test_options_no_run_can_use(tmp_path, args, says):
    out = tmp_path / "run"
    r = main(*TINY, "--out", out, *args)
    assert r.code == 2 and r.says(says), r
    assert not out.exists()


def test_an_empty_out_is_the_current_folder_and_a_used_one_is_refused(tmp_path, monkeypatch):
    """--out '' is '.', where the user's own files are: refused like any used folder, nothing touched."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    r = tiny("", "--epochs", 1)
    assert r.code == 2 and r.says("already holds files", "notes.txt", "--out DIR"), r
    assert changes(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("how", ["an empty folder", "a folder that does not exist", "a folder with only logs",
                                 "a folder of someone else's files"])
def test_resume_without_a_checkpoint(tmp_path, how):
    out = tmp_path / "run"
    if how != "a folder that does not exist":
        out.mkdir()
    if how == "a folder with only logs":
        (out / "log.csv").write_text("step,epoch,recon,kl,loss,lr,images_per_s\n1,1,2,3,4,5,6\n")
    if how == "a folder of someone else's files":
        (out / "thesis.tex").write_text("mine")
    before = snapshot(tmp_path)
    r = tiny(out, "--epochs", 1, "--resume")
    assert r.code == 2 and r.says("nothing to resume", "checkpoint.npz does not exist", "leave out --resume"), r
    assert changes(before, snapshot(tmp_path)) == [] and (out.exists() == (how != "a folder that does not exist"))


@pytest.mark.parametrize("args, says", [
    (["--seed", "1"], "seed: 0 (checkpoint) vs 1 (now)"),
    (["--batch-size", "4"], "batch_size: 8 (checkpoint) vs 4 (now)"),
    (["--image-size", "32"], "image_size: 16 (checkpoint) vs 32 (now)"),
    (["--limit", "40"], "limit: 48 (checkpoint) vs 40 (now)"),
    (["--beta", "2"], "beta: 1.0 (checkpoint) vs 2.0 (now)"),
    (["--objective", "prior-mc"], "objective: 'elbo' (checkpoint) vs 'prior-mc' (now)"),
])
def test_resume_with_options_that_change_the_run_is_refused(tmp_path, args, says):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    r = main(*TINY, "--out", out, "--epochs", 2, "--resume", *args)
    assert r.code == 2 and r.says("other options", says), r
    assert changes(before, snapshot(out)) == []


def test_a_new_run_in_a_used_folder_is_refused(tmp_path):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    r = tiny(out, "--epochs", 1)
    assert r.code == 2 and r.says("already holds files", "--resume", "--force"), r
    assert changes(before, snapshot(out)) == []


def test_force_keeps_the_users_own_files_and_a_finished_run_resumed_trains_nothing(tmp_path):
    out = finished_run(tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint.npz.damaged").write_text("kept by the user")
    r = tiny(out, "--epochs", 1, "--resume")
    assert r.code == 0 and r.says("nothing to train"), r
    r = tiny(out, "--epochs", 1, "--force")
    assert r.code == 0, r
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint.npz.damaged").read_text() == "kept by the user"


@pytest.mark.parametrize("leftover", ["checkpoint.npz.tmp-{dead}", "log.csv.tmp", "eval.csv.tmp",
                                      "summary.json.tmp", "samples.png.tmp-{dead}"])
def test_leftovers_of_a_killed_run_are_removed_on_resume(tmp_path, leftover):
    """Issue 5: a checkpoint.npz.tmp-PID of a killed run survived --resume; now removed, and said so."""
    out = finished_run(tmp_path / "run")
    dead = 2 ** 22 + 12345  # above Linux's pid_max default: no live process has it
    name = leftover.format(dead=dead)
    (out / name).write_bytes(b"half a file" if "checkpoint" in name else b"")
    (out / "notes.tmp").write_text("mine")  # a file of the user's with a like name stays
    r = tiny(out, "--epochs", 2, "--resume")
    assert r.code == 0 and r.says(f"removed {out / name}"), r
    assert not (out / name).exists() and (out / "notes.tmp").read_text() == "mine"
    assert log_steps(out / "log.csv") == list(range(1, 2 * PER_EPOCH + 1))


def test_a_temporary_checkpoint_of_a_live_process_is_left_alone(tmp_path):
    out = finished_run(tmp_path / "run")
    name = f"checkpoint.npz.tmp-{os.getppid()}"  # a process that is running: it may be writing it
    (out / name).write_bytes(b"being written")
    assert tiny(out, "--epochs", 2, "--resume").code == 0
    assert (out / name).read_bytes() == b"being written"


@pytest.mark.parametrize("args", [["--max-steps", "3"], ["--epochs", "1"]])
def test_options_that_stop_before_the_checkpoint_train_nothing(tmp_path, args):
    """A resumed run already past the stopping point: exit 0, no step trained, the log untouched."""
    out = finished_run(tmp_path / "run")
    log = (out / "log.csv").read_bytes()
    r = tiny(out, "--resume", *args)
    assert r.code == 0 and r.says("nothing to train"), r
    assert (out / "log.csv").read_bytes() == log and checkpoint_step(out) == PER_EPOCH


def test_a_checkpoint_of_an_older_version_without_its_data_resumes_with_a_note(tmp_path):
    import json

    import numpy
    from hostile_kit import checkpoint
    out = finished_run(tmp_path / "run")
    arrays = checkpoint(out)
    meta = json.loads(str(arrays["meta"]))
    del meta["data"]
    arrays["meta"] = json.dumps(meta)
    numpy.savez(out / "checkpoint.npz", **arrays)
    r = tiny(out, "--epochs", 2, "--resume")
    assert r.code == 0 and r.says("does not record its data"), r
