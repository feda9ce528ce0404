"""The training run end to end through the CLI (examples/celeba.py), in process, on a few dozen tiny built-in faces.

What must hold: every output is written and valid; the reconstruction loss falls; an interrupted-and-resumed
run logs exactly what an uninterrupted one does; a NaN stops the run and keeps the last good checkpoint;
a used run folder is never overwritten by accident; bad options give one clear line and status 2.
"""
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from scratchvae import backend, train
from scratchvae.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
from cli_module import PER_EPOCH, TINY, cli, losses, rows, run  # noqa: E402, F401


def epoch_evals(out):
    """eval.csv rows at the ends of epochs (a run stopped mid-epoch adds one more row of its own)."""
    return [r for r in rows(out / "eval.csv") if int(r["step"]) % PER_EPOCH == 0]


def checkpoint_arrays(out):
    with numpy.load(out / "checkpoint.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def meta(out):
    return json.loads(str(checkpoint_arrays(out)["meta"]))


# ---- the whole run -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 5-epoch run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "celeba"
    saved = backend._state["xp"]
    assert run(out, "--epochs", 5, "--checkpoint-every", 4) == 0
    backend._state["xp"] = saved
    return out


def test_every_output_is_written_and_valid(finished_run):
    out = finished_run
    for name in train.OUTPUTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in train.FIGURES:
        with Image.open(out / name) as img:
            assert img.format == "PNG"
            img.verify()
        with Image.open(out / name) as img:
            pixels = numpy.asarray(img.convert("L"), dtype=float)
            assert img.width >= 100 and img.height >= 100 and pixels.std() > 5, f"{name} looks blank"

    log = rows(out / "log.csv")
    assert list(log[0]) == list(train.LOG_FIELDS)
    assert [int(r["step"]) for r in log] == list(range(1, 5 * PER_EPOCH + 1))
    assert [int(r["epoch"]) for r in log] == [s // PER_EPOCH + 1 for s in range(5 * PER_EPOCH)]
    for r in log:
        assert all(numpy.isfinite(float(r[k])) for k in ("recon", "kl", "loss", "images_per_s"))
        assert float(r["lr"]) == 3e-3 and float(r["images_per_s"]) > 0
        assert float(r["loss"]) == pytest.approx(float(r["recon"]) + float(r["kl"]), rel=1e-5)

    evals = rows(out / "eval.csv")
    assert list(evals[0]) == list(train.EVAL_COLUMNS)
    assert [int(r["step"]) for r in evals] == [PER_EPOCH * e for e in range(1, 6)]
    for r in evals:
        nats, bpd = float(r["neg_elbo_nats"]), float(r["bits_per_dim"])
        assert bpd == pytest.approx(nats / (3 * 16 * 16 * numpy.log(2)))
        assert 0 < float(r["mse"]) < 1 and float(r["kl"]) >= 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 * PER_EPOCH
    assert summary["final_eval"]["neg_elbo_nats"] == pytest.approx(float(evals[-1]["neg_elbo_nats"]))


def test_reconstruction_loss_fell(finished_run):
    recon = [float(r["recon"]) for r in rows(finished_run / "log.csv")]
    assert numpy.mean(recon[-5:]) < 0.8 * numpy.mean(recon[:5])
    held_out = [float(r["recon"]) for r in rows(finished_run / "eval.csv")]
    assert held_out[-1] < held_out[0]


def test_checkpoint_holds_the_whole_state(finished_run):
    arrays = checkpoint_arrays(finished_run)
    m = json.loads(str(arrays["meta"]))
    assert (m["step"], m["epoch"], m["batch_in_epoch"], m["seed"]) == (5 * PER_EPOCH, 5, 0, 0)
    assert m["train_config"]["preset"] == "tiny" and "noise" in m["rng"]
    assert any(k.startswith("model/") and "running_mean" in k for k in arrays), "BatchNorm buffers missing"
    assert int(arrays["optim/t"]) == 5 * PER_EPOCH
    assert any(k.startswith("optim/") and k.endswith("/m") for k in arrays), "Adam moments missing"
    assert arrays["heldout/images"].dtype == numpy.uint8
    model = VAE.load(finished_run / "checkpoint.npz")  # a checkpoint is also a saved model
    assert model.config["latent_dim"] == 4


def test_plot_only_redraws_a_finished_run(finished_run, capsys):
    for name in train.FIGURES:
        (finished_run / name).unlink()
    assert cli.main(["--plot-only", "--out", str(finished_run)]) == 0
    assert all((finished_run / name).is_file() for name in train.FIGURES)


def test_figures_can_go_elsewhere_with_fewer_colours(finished_run, tmp_path):
    from scratchvae.plots import plot_run
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()}
    paths = plot_run(finished_run, dest=tmp_path / "docs", scale=1, colors=64)
    assert sorted(p.name for p in paths) == sorted(train.FIGURES)
    for p in paths:
        with Image.open(p) as img:
            assert img.mode == "P" and len(img.getcolors(256)) <= 64
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.iterdir()} == before  # the run is untouched


def test_plot_only_without_a_run_says_so(tmp_path, capsys):
    assert cli.main(["--plot-only", "--out", str(tmp_path)]) == 2
    assert "checkpoint.npz not found" in capsys.readouterr().err


# ---- resume --------------------------------------------------------------------------------------------------

def test_resume_after_max_steps_logs_the_same_losses(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--epochs", 3) == 0
    assert run(parts, "--epochs", 3, "--max-steps", 8) == 0  # stops mid-epoch 2
    assert meta(parts)["step"] == 8 and len(rows(parts / "log.csv")) == 8
    assert run(parts, "--epochs", 3, "--resume") == 0
    assert losses(parts) == losses(whole)  # every digit of every loss
    assert epoch_evals(parts) == epoch_evals(whole)
    a, b = checkpoint_arrays(whole), checkpoint_arrays(parts)
    for k in a:
        if k.startswith(("model/", "optim/")):
            numpy.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_ctrl_c_writes_a_checkpoint_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--epochs", 2) == 0
    real_step, calls = VAE.train_step, []

    def step_then_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            signal.raise_signal(signal.SIGINT)  # as a user's Ctrl-C, arriving in the middle of the update
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "train_step", step_then_ctrl_c)
    assert run(parts, "--epochs", 2, "--checkpoint-every", 100) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 9" in err and "--resume" in err
    assert meta(parts)["step"] == 9  # the update under way was finished, then saved
    monkeypatch.setattr(VAE, "train_step", real_step)
    assert run(parts, "--epochs", 2, "--resume") == 0
    assert losses(parts) == losses(whole)
    assert epoch_evals(parts) == epoch_evals(whole)


def test_hard_interrupt_inside_an_update_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside an update (a second Ctrl-C) must not save a half-updated model."""
    real_step, calls = VAE.train_step, []

    def broken_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(VAE, "train_step", broken_step)
    out = tmp_path / "run"
    assert run(out, "--epochs", 2, "--checkpoint-every", 4) == 130
    assert "discarded" in capsys.readouterr().err
    assert meta(out)["step"] == PER_EPOCH  # the end-of-epoch checkpoint, not a half-made step 7


def test_ctrl_c_during_the_last_evaluation_lets_the_finished_run_end(tmp_path, monkeypatch):
    """Training is complete when the last evaluation runs: a Ctrl-C then still ends with summary.json, exit 0."""
    real_eval, calls = train.evaluate_images, []

    def eval_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after the last step of the second (last) epoch
            signal.raise_signal(signal.SIGINT)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate_images", eval_then_ctrl_c)
    out = tmp_path / "run"
    assert run(out, "--epochs", 2) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2 * PER_EPOCH
    assert meta(out)["step"] == 2 * PER_EPOCH


def test_ctrl_c_during_the_first_checkpoint_saves_step_0_and_resume_continues_exactly(tmp_path, monkeypatch, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--epochs", 1) == 0
    real_save, calls = train.save_checkpoint, []

    def ctrl_c_then_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # arrives while the step-0 checkpoint is being written
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", ctrl_c_then_save)
    assert run(parts, "--epochs", 1) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 0; checkpoint of step 0" in err and "--resume" in err
    assert meta(parts)["step"] == 0
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert run(parts, "--epochs", 1, "--resume") == 0
    assert losses(parts) == losses(whole)


def test_second_ctrl_c_during_the_first_checkpoint_says_nothing_was_trained(tmp_path, monkeypatch, capsys):
    def hard_interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl-C, before the checkpoint file was replaced

    monkeypatch.setattr(train, "save_checkpoint", hard_interrupt)
    out = tmp_path / "run"
    assert run(out, "--epochs", 1) == 130
    err = capsys.readouterr().err
    assert "before training began" in err and "was not written" in err and "nothing was trained" in err
    assert not (out / "checkpoint.npz").exists()


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1) == 0
    before = (out / "checkpoint.npz").read_bytes()
    assert run(out, "--epochs", 2, "--resume", "--latent-dim", 3, "--recon", "bce") == 2
    err = capsys.readouterr().err
    assert "latent_dim: 4 (checkpoint) vs 3 (now)" in err and "recon: 'sse' (checkpoint) vs 'bce' (now)" in err
    assert "epochs" not in err.split("with these:")[1]  # epochs may change on resume
    assert (out / "checkpoint.npz").read_bytes() == before
    assert run(out, "--epochs", 2, "--resume") == 0  # more epochs: allowed
    assert meta(out)["step"] == 2 * PER_EPOCH


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    assert run(tmp_path / "nothing", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err


# ---- failure without loss --------------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_fb, calls, seen = VAE.forward_backward, [], {}
    out = tmp_path / "run"

    def nan_at_step_10(self, *args, **kwargs):
        calls.append(1)
        loss, recon, kl = real_fb(self, *args, **kwargs)
        if len(calls) == 10:
            seen["bytes"] = (out / "checkpoint.npz").read_bytes()  # the checkpoint as it was before the NaN
            seen["mtime"] = (out / "checkpoint.npz").stat().st_mtime_ns
            return loss * float("nan"), recon, kl
        return loss, recon, kl

    monkeypatch.setattr(VAE, "forward_backward", nan_at_step_10)
    assert run(out, "--epochs", 3, "--checkpoint-every", 4) == 3
    err = capsys.readouterr().err
    assert "non-finite loss at step 10" in err and "step 8" in err and "--resume --lr" in err
    assert "Traceback" not in err
    assert (out / "checkpoint.npz").read_bytes() == seen["bytes"]
    assert (out / "checkpoint.npz").stat().st_mtime_ns == seen["mtime"]
    assert meta(out)["step"] == 8
    assert len(rows(out / "log.csv")) == 9  # steps 1..9 were logged; step 10 never happened

    # the advice works: resume from step 8 with a lower learning rate, the rows after 8 are replayed
    monkeypatch.setattr(VAE, "forward_backward", real_fb)
    assert run(out, "--epochs", 3, "--resume", "--lr", "1e-3") == 0
    log = rows(out / "log.csv")
    assert [int(r["step"]) for r in log] == list(range(1, 3 * PER_EPOCH + 1))
    assert {float(r["lr"]) for r in log[8:]} == {1e-3} and float(log[7]["lr"]) == 3e-3


def test_a_used_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert run(out, "--epochs", 1) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--resume" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_force_overwrites_only_the_runs_own_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "log.csv").write_text("stale")
    assert run(out, "--epochs", 1, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert len(rows(out / "log.csv")) == PER_EPOCH


# ---- bad arguments -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--batch-size", "-3"], "--batch-size: expected a positive integer, got -3"),
    (["--batch-size", "many"], "--batch-size: expected a positive integer"),
    (["--preset", "huge"], "--preset: invalid choice: 'huge'"),
    (["--data", "/no/such/celeba"], "data path /no/such/celeba does not exist"),
    (["--image-size", "30"], "image-size 30 must be a multiple of 4, at least 8, for preset 'tiny'"),
    (["--seed", "-1"], "seed must be an integer >= 0"),
    (["--lr", "0"], "--lr: expected a positive number"),
    (["--recon", "l1"], "--recon: invalid choice"),
    (["--resume", "--force"], "not allowed with argument"),
    (["--epochs", "0"], "--epochs: expected a positive integer"),
    (["--recon-variance", "learned"], "--recon-variance learned needs --recon gaussian"),
    (["--recon-variance", "lots"], "expected a positive number or 'learned'"),
    (["--iw-samples", "-1"], "--iw-samples: expected an integer >= 0"),
    (["--beta-warmup", "1.5"], "--beta-warmup: expected an integer >= 0"),
    (["--iw-images", "0"], "--iw-images: expected a positive integer"),
])
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + ["--out", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_data_without_images_is_a_clear_error_and_force_keeps_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty").mkdir()
    assert run(out, "--epochs", 1, "--force", "--data", tmp_path / "empty") == 2
    err = capsys.readouterr().err
    assert "no CelebA images found" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the failed --force deleted nothing


@pytest.mark.skipif(backend.gpu_available(), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_is_a_clear_error(tmp_path, capsys):
    assert cli.main(TINY[:-3] + ["--device", "gpu", "--no-progress", "--out", str(tmp_path / "run")]) == 2
    assert "pip install .[gpu]" in capsys.readouterr().err


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path, capsys):
    assert run(tmp_path / "run", "--batch-size", 64) == 2
    assert "larger than the split" in capsys.readouterr().err


def test_help_explains_every_option():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "celeba.py"), "--help"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0
    for option in ["--data", "--epochs", "--batch-size", "--lr", "--latent-dim", "--beta", "--mc-samples",
                   "--recon", "--objective", "--preset", "--device", "--seed", "--out", "--resume", "--max-steps",
                   "--limit", "--plot-only", "--force", "--image-size"]:
        assert option in result.stdout, option


# ---- pieces ---------------------------------------------------------------------------------------------------

def test_config_differences_name_only_what_matters():
    a = train.TrainConfig(preset="tiny", image_size=16).resolved()
    b = train.TrainConfig(preset="tiny", image_size=16, epochs=9, max_steps=3, lr=0.1, device="cpu").resolved()
    assert train.config_differences(vars(a), vars(b)) == []
    c = train.TrainConfig(preset="small", image_size=16, beta=4.0).resolved()
    diff = train.config_differences(vars(a), vars(c))
    assert [d.split(":")[0] for d in diff] == ["preset", "latent_dim", "beta"]


def test_defaults_depend_on_the_data_source(tmp_path):
    synthetic = train.TrainConfig().resolved()
    celeba = train.TrainConfig(data=str(tmp_path)).resolved()
    assert (synthetic.preset, synthetic.latent_dim) == ("small", 32)
    assert (celeba.preset, celeba.latent_dim, celeba.data) == ("default", 128, str(tmp_path))
    assert train.TrainConfig(preset="tiny", latent_dim=7).resolved().latent_dim == 7


def test_smooth_is_a_trailing_running_mean():
    from scratchvae.plots import smooth
    numpy.testing.assert_allclose(smooth([1, 2, 3, 4], window=2), [1, 1.5, 2.5, 3.5])
    assert len(smooth(numpy.arange(1000.0))) == 1000


def test_the_loop_and_the_figures_keep_arrays_on_the_device(tmp_path, monkeypatch):
    """Under the stand-in for CuPy (device arrays that refuse to mix with host arrays), as on a GPU."""
    from strict_device import use_strict_device

    from scratchvae.plots import plot_run
    with use_strict_device() as strict:
        monkeypatch.setattr(backend, "set_device", lambda device: strict)  # keep the stand-in as the device
        summary = train.train(train.TrainConfig(out=str(tmp_path / "run"), preset="tiny", image_size=16, limit=32,
                                                batch_size=8, epochs=1, progress=False))
        plot_run(tmp_path / "run")
    assert summary["device"] == "gpu"  # it did run on the stand-in
    assert summary["steps"] == 4 and numpy.isfinite(summary["final_eval"]["neg_elbo_nats"])
    assert all((tmp_path / "run" / name).is_file() for name in train.FIGURES)


def test_a_training_split_kept_on_the_device_trains_exactly_as_one_on_the_host(tmp_path, monkeypatch, capsys):
    """On a GPU with room for it, the training images go to the device once and batches are gathered there; the
    run's losses are those of a run whose batches cross from the host at every step (both on the stand-in)."""
    from strict_device import use_strict_device
    losses, said = {}, {}
    with use_strict_device() as strict:
        monkeypatch.setattr(backend, "set_device", lambda device: strict)
        for name, free in (("kept", 2**30), ("host", 1000)):
            monkeypatch.setattr(backend, "device_free_memory", lambda free=free: free)
            train.train(train.TrainConfig(out=str(tmp_path / name), preset="tiny", image_size=16, limit=32,
                                          batch_size=8, epochs=2, progress=False))
            said[name] = capsys.readouterr().out
            with open(tmp_path / name / "log.csv") as f:
                losses[name] = [(row["step"], row["loss"], row["kl"]) for row in csv.DictReader(f)]
    assert "the 32 training images (0.0 MB) are kept on the GPU" in said["kept"]
    assert "the 32 training images (0.0 MB) stay on the host (more than 25% of the GPU's free memory" in said["host"]
    assert len(losses["kept"]) == 8 and losses["kept"] == losses["host"]


def test_resuming_a_finished_run_trains_nothing_and_reevaluates_if_needed(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1) == 0
    log_before = (out / "log.csv").read_bytes()
    (out / "eval.csv").unlink()  # lost: the final evaluation is made again
    assert run(out, "--epochs", 1, "--resume") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert (out / "log.csv").read_bytes() == log_before
    assert [int(r["step"]) for r in rows(out / "eval.csv")] == [PER_EPOCH]


def test_figure_helpers_leave_the_model_in_its_mode_and_keep_rows_aligned(tmp_path):
    """Plotting switches BatchNorm to eval for its decodes and back; a partial last row is dropped."""
    from scratchvae import plots
    model = VAE(image_size=16, preset="tiny")
    x = backend.to_device(numpy.random.default_rng(0).random((12, 3, 16, 16)), numpy.float32)
    for draw in (lambda: plots.plot_interpolation(model, x, tmp_path / "i.png"),
                 lambda: plots.plot_traversal(model, x, tmp_path / "t.png"),
                 lambda: plots.plot_reconstructions(model, x, tmp_path / "r.png", ncol=8)):
        model.train()
        draw()
        assert model.training
    seen = {}
    real_grid = plots.image_grid
    plots.image_grid = lambda images, ncol: seen.setdefault("n", (len(images), ncol)) and real_grid(images, ncol)
    try:
        plots.plot_reconstructions(model, x, tmp_path / "r.png", ncol=8)
    finally:
        plots.image_grid = real_grid
    assert seen["n"] == (16, 8)  # one whole row of 8 originals above its 8 reconstructions; 4 images left out
