"""Hostile input, numbers: learning rates and options that blow a run up, and NaN/Inf put into each part of its state.

A step is good only if the loss, the updated parameters, the optimiser's moments and BatchNorm's statistics are all
finite; a held-out -ELBO that is not finite is a divergence too. Either way the run stops with status 3, the last
checkpoint written is finite and resumes, and nothing written before is lost.
"""
import json
import math

import numpy
import pytest

from hostile_kit import (PER_EPOCH, all_finite, changes, checkpoint, checkpoint_step, finished_run, log_steps,
                         fast_figures, script, snapshot, tiny)  # noqa: F401  (fixtures)
from scratchvae import train
from scratchvae.vae import VAE


def no_nan_rows(path):
    return all("nan" not in line.lower() and "inf" not in line.lower() for line in open(path))


@pytest.mark.parametrize("every", [1, 250])
def test_a_huge_learning_rate_keeps_a_finite_checkpoint_that_resumes(tmp_path, every):
    """Issue 1: --lr 1e8; before, the "last good checkpoint" (with a checkpoint every step) held NaN weights."""
    out = tmp_path / "run"
    r = tiny(out, "--epochs", 2, "--lr", 1e8, "--checkpoint-every", every)
    assert r.code == 3 and r.says("diverged at step 2", "last good checkpoint"), r
    assert all_finite(out) and "done:" not in r.out
    step = checkpoint_step(out)
    assert step == (1 if every == 1 else 0) and f"(step {step})" in r.err
    before = snapshot(out)
    resumed = tiny(out, "--epochs", 2, "--resume", "--lr", 1e-6)
    assert resumed.says(f"resuming {out} at step {step}"), resumed
    if every == 1:  # step 1's weights are finite, but so large that their gradients overflow whatever the lr
        assert "cannot help" in r.err and "start over with a lower --lr than 1e+08" in r.err
        assert resumed.code == 3 and resumed.says("cannot help"), resumed
        assert [p for p in changes(before, snapshot(out)) if "checkpoint" in p] == []
    else:  # from the first checkpoint, the advice works
        assert "--resume --lr 1e+07" in r.err
        assert resumed.code == 0, resumed
        assert log_steps(out / "log.csv") == list(range(1, 2 * PER_EPOCH + 1))


def test_a_diverged_run_with_a_finite_training_loss_exits_3(tmp_path):
    """Issue 2: --lr 1e6 keeps the training loss finite while BatchNorm's statistics and the held-out -ELBO go NaN."""
    out = tmp_path / "run"
    r = tiny(out, "--epochs", 2, "--lr", 1e6)
    assert r.code == 3 and r.says("diverged", "--resume --lr"), r
    assert "done:" not in r.out and not (out / "summary.json").exists()
    assert all_finite(out) and no_nan_rows(out / "eval.csv")


def test_a_huge_beta_is_not_answered_with_a_lower_learning_rate(tmp_path):
    """Issue 3: --beta 1e300 overflows the loss for the initial weights; a lower lr cannot help, so it is not advised."""
    out = tmp_path / "run"
    r = tiny(out, "--epochs", 1, "--beta", 1e300)
    assert r.code == 3 and r.says("non-finite loss at step 1", "cannot help", "--beta 1e+300", "--force"), r
    assert "--resume --lr" not in r.err
    assert checkpoint_step(out) == 0 and all_finite(out)


def test_a_tiny_decoder_variance_is_named(tmp_path):
    r = tiny(tmp_path / "run", "--recon", "gaussian", "--recon-variance", 1e-40, "--epochs", 1)
    assert r.code == 3 and r.says("cannot help", "--recon-variance 1e-40"), r


def _poison(optimizer_class, where, value, at_call):
    """A ``step`` for ``optimizer_class`` that, at its ``at_call``-th call, puts ``value`` into the parameters,
    a BatchNorm statistic or Adam's moments after the real update (``step.model`` is the model trained)."""
    real, calls = optimizer_class.step, []

    def step(self):
        real(self)
        calls.append(1)
        if len(calls) == at_call:
            if where == "parameters":
                list(step.model.named_parameters())[3][1].reshape(-1)[0] = value
            elif where == "moments":
                moment = next(a for k, a in self.state_dict().items() if k.endswith("/v") and a.size > 5)
                moment.reshape(-1)[5] = value
            else:
                dict(step.model.named_buffers())[where].reshape(-1)[0] = value
    return step


LOWER_LR, CANNOT_HELP = "--resume --lr 0.0003", "lower learning rate cannot help"


@pytest.mark.parametrize("where, value, names, advice", [
    ("parameters", float("nan"), "encoder.1", LOWER_LR),
    ("parameters", float("inf"), "encoder.1", LOWER_LR),
    ("moments", float("inf"), "optimiser", CANNOT_HELP),
    ("moments", float("nan"), "optimiser", CANNOT_HELP),
    ("encoder.1.running_var", float("nan"), "encoder.1.running_var", CANNOT_HELP),
    ("decoder.3.running_mean", float("-inf"), "decoder.3.running_mean", CANNOT_HELP),
])
def test_a_non_finite_state_after_an_update_stops_the_run_before_any_checkpoint(tmp_path, monkeypatch, where, value,
                                                                               names, advice):
    """A finite loss, but an update that left a NaN or Inf somewhere: the run stops there (status 3), and the
    checkpoint on disk is the one before, finite, untouched. The update from the checkpoint's own weights went
    wrong, so a lower learning rate is advised only where it changes the outcome (the parameters' step)."""
    out = tmp_path / "run"
    optimizer_class = type(VAE(image_size=16, preset="tiny").make_optimizer(lr=1e-3))  # the engine's Adam
    step = _poison(optimizer_class, where, value, at_call=9)  # the third update of epoch 2
    real_build = train.build_model

    def build(cfg):
        step.model = real_build(cfg)
        return step.model

    monkeypatch.setattr(train, "build_model", build)
    monkeypatch.setattr(optimizer_class, "step", step)
    r = tiny(out, "--epochs", 2, "--checkpoint-every", 4)
    assert r.code == 3 and r.says("diverged at step 9", names, "NaN or Inf", "(step 8)", advice), r
    assert checkpoint_step(out) == 8 and all_finite(out)
    assert log_steps(out / "log.csv") == list(range(1, 9))  # step 9 never counted
    monkeypatch.undo()
    resumed = tiny(out, "--epochs", 2, "--resume")
    assert resumed.code == 0, resumed
    assert log_steps(out / "log.csv") == list(range(1, 2 * PER_EPOCH + 1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_held_out_elbo_is_a_divergence(tmp_path, monkeypatch, bad):
    out = tmp_path / "run"
    real, calls = train.evaluate_images, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        metrics = real(*args, **kwargs)
        return {k: bad for k in metrics} if len(calls) == 2 else metrics

    monkeypatch.setattr(train, "evaluate_images", evaluate)
    r = tiny(out, "--epochs", 3)
    assert r.code == 3 and r.says("held-out evaluation at step 12 is not finite", "(step 6)"), r
    assert checkpoint_step(out) == PER_EPOCH and all_finite(out)
    assert not (out / "summary.json").exists() and no_nan_rows(out / "eval.csv")


def test_a_nan_loss_on_the_first_step_after_resume_says_the_learning_rate_cannot_help(tmp_path, monkeypatch):
    out = finished_run(tmp_path / "run")
    before = snapshot(out)
    real = VAE.forward_backward

    def nan(self, *args, **kwargs):
        loss, recon, kl = real(self, *args, **kwargs)
        return loss * float("nan"), recon, kl

    monkeypatch.setattr(VAE, "forward_backward", nan)
    r = tiny(out, "--epochs", 2, "--resume")
    assert r.code == 3 and r.says("non-finite loss at step 7", "checkpoint's weights", "cannot help"), r
    assert "--resume --lr" not in r.err
    assert [p for p in changes(before, snapshot(out)) if not p.endswith((".csv",))] == []


def test_a_nan_loss_after_updates_advises_a_lower_learning_rate(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = VAE.forward_backward, []

    def nan_at_6(self, *args, **kwargs):
        calls.append(1)
        loss, recon, kl = real(self, *args, **kwargs)
        return (loss * float("nan") if len(calls) == 6 else loss), recon, kl

    monkeypatch.setattr(VAE, "forward_backward", nan_at_6)
    r = tiny(out, "--epochs", 1, "--checkpoint-every", 4)
    assert r.code == 3 and r.says("non-finite loss at step 6", "(step 4)", "--resume --lr 0.0003"), r
    assert checkpoint_step(out) == 4


@pytest.mark.parametrize("key, value", [("model/encoder.0.W", float("nan")), ("optim/fc_mu.W/v", float("inf")),
                                        ("model/decoder.3.running_var", float("nan"))])
def test_a_checkpoint_holding_nan_is_refused_on_resume(tmp_path, key, value):
    """What older versions wrote after a divergence: refused with status 2 and left as it is."""
    out = finished_run(tmp_path / "run")
    arrays = checkpoint(out)
    arrays[key] = numpy.full_like(arrays[key], value)
    numpy.savez(out / "checkpoint.npz", **arrays)
    before = snapshot(out)
    r = tiny(out, "--epochs", 2, "--resume")
    assert r.code == 2 and r.says("NaN or Inf", key.split("/")[1], "cannot be resumed", "--force"), r
    assert changes(before, snapshot(out)) == []


def test_summary_json_is_standard_json_even_after_an_old_nan_evaluation(tmp_path):
    out = finished_run(tmp_path / "run")
    lines = (out / "eval.csv").read_text().splitlines()
    step = lines[-1].split(",")[0]
    lines[-1] = ",".join([step, "1.0"] + ["nan"] * 6)
    (out / "eval.csv").write_text("\n".join(lines) + "\n")
    r = tiny(out, "--epochs", 1, "--resume")
    assert r.code == 0, r

    def refuse(name):
        raise ValueError(f"non-standard JSON literal {name}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=refuse)
    assert all(math.isfinite(v) for v in summary["final_eval"].values())


def test_the_real_script_exits_3_on_divergence(tmp_path):
    out = tmp_path / "run"
    result = script("--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--epochs", "2",
                    "--device", "cpu", "--no-progress", "--lr", "1e6", "--out", out)
    assert result.returncode == 3, result.stderr
    assert "diverged" in result.stderr and "Traceback" not in result.stderr
    assert all_finite(out)
