"""Through the CLI on tiny runs: KL warm-up (its schedule, its log column, exact resume), the learned decoder
variance's log and figure, and the held-out importance-sampled -log p(x) in eval.csv, summary.json and figures."""
import csv
import json
from pathlib import Path

import pytest

from scratchvae import backend, train

ROOT = Path(__file__).resolve().parents[1]
from cli_module import PER_EPOCH, TINY, cli, losses, rows, run  # noqa: E402, F401


def test_warmup_schedule():
    assert [train.warmup_beta(s, 2.0, 4) for s in range(1, 8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [train.warmup_beta(s, 0.7, 0) for s in (1, 2, 100)] == [0.7, 0.7, 0.7]  # 0: off
    assert train.warmup_beta(1, 1.0, 1) == 0.0 and train.warmup_beta(2, 1.0, 1) == 1.0


def test_warmup_is_logged_used_and_resumed_exactly(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run(whole, "--epochs", 2, "--beta", 2, "--beta-warmup", 8) == 0
    log = rows(whole / "log.csv")
    betas = [float(r["beta"]) for r in log]
    assert betas == [2.0 * min(1.0, s / 8) for s in range(12)]
    for r in log:  # the loss of each update is recon + (the beta in force) * KL
        assert float(r["loss"]) == pytest.approx(float(r["recon"]) + float(r["beta"]) * float(r["kl"]), rel=1e-5)
    # stopped inside the warm-up and resumed: every logged number, beta included, as in the run never stopped
    assert run(parts, "--epochs", 2, "--beta", 2, "--beta-warmup", 8, "--max-steps", 5) == 0
    assert run(parts, "--epochs", 2, "--beta", 2, "--beta-warmup", 8, "--resume") == 0
    assert losses(parts) == losses(whole)
    # a warm-up changes the training, so a checkpoint made without it is not resumed with it
    assert run(parts, "--epochs", 3, "--beta", 2, "--resume") == 2


def test_checkpoints_from_before_the_warmup_option_still_resume():
    stored = {k: getattr(train.TrainConfig(), k) for k in train.MUST_MATCH}
    del stored["beta_warmup"]  # a checkpoint written before the option existed
    now = dict(stored, beta_warmup=0)
    assert train.config_differences(stored, now) == []
    assert train.config_differences(stored, dict(now, beta_warmup=5)) == ["beta_warmup: 0 (checkpoint) vs 5 (now)"]


def test_heldout_log_likelihood_estimate_is_reported_and_drawn(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--epochs", 2, "--iw-samples", 8, "--iw-images", 4) == 0
    printed = capsys.readouterr().out
    assert "held-out -log p(x) <= -L_8" in printed
    evals = rows(out / "eval.csv")
    assert [int(r["iw_k"]) for r in evals] == [4, 4]  # the same cheap k in every row
    last = evals[-1]
    assert int(last["iw_images"]) == 4
    ks, neg_elbo, neg_l = train.read_iw_bounds(out / "iw_bounds.csv")  # the end's, with --iw-samples
    assert ks == [1, 2, 4, 8] and neg_l.shape == (4, 4)
    summary = json.loads((out / "summary.json").read_text())["importance_sampled"]
    assert summary["k"] == 8 and summary["images"] == 4 and summary["seconds"] >= 0
    assert summary["neg_log_px_nats"] == pytest.approx(neg_l[:, -1].mean(), rel=1e-12)
    assert summary["neg_elbo_nats"] == pytest.approx(neg_elbo.mean(), rel=1e-12)
    assert summary["elbo_gap_nats"] == pytest.approx((neg_elbo - neg_l[:, -1]).mean(), rel=1e-9)
    assert summary["neg_log_px_by_k"]["4"] == pytest.approx(neg_l[:, 2].mean())
    assert summary["elbo_gap_nats"] > 0  # the bound is above the ELBO
    # eval.csv's k = 4 is the same ELBO from the first 4 of the same 8 samples, and a bound no tighter than L_8's
    assert float(last["elbo_gap_nats"]) > 0 and float(last["neg_log_px_nats"]) > summary["neg_log_px_nats"] - 0.05
    # the estimate is a bound on -log p(x) of the same magnitude as the -ELBO on all the held-out images
    assert abs(float(last["neg_log_px_nats"]) - float(last["neg_elbo_nats"])) < 0.1 * float(last["neg_elbo_nats"])
    assert (out / "elbo_gap.png").is_file() and not (out / "decoder_variance.png").exists()


def test_iw_samples_0_turns_it_off(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1, "--iw-samples", 0) == 0
    assert all(r["iw_k"] == "" and r["neg_log_px_nats"] == "" for r in rows(out / "eval.csv"))
    assert not (out / "iw_bounds.csv").exists() and not (out / "elbo_gap.png").exists()
    assert json.loads((out / "summary.json").read_text())["importance_sampled"] is None


def test_learned_variance_is_logged_drawn_and_resumed(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = ["--epochs", 2, "--recon", "gaussian", "--recon-variance", "learned"]
    assert run(whole, *args) == 0
    s2 = [float(r["decoder_variance"]) for r in rows(whole / "log.csv")]
    assert s2[0] == pytest.approx(0.5, rel=1e-6) and s2[-1] < s2[0]  # from the derivation's 1/2, downwards
    assert (whole / "decoder_variance.png").is_file()
    assert run(parts, *args, "--max-steps", 7) == 0
    assert run(parts, *args, "--resume") == 0
    assert losses(parts) == losses(whole)  # s^2 itself continues exactly: it is in the checkpoint
    assert run(whole, "--epochs", 1, "--force") == 0  # a fixed-variance run over it: no stale figure of s^2 left
    assert not (whole / "decoder_variance.png").exists()


def test_decoder_variance_column_for_the_fixed_terms(tmp_path):
    out = tmp_path / "run"
    assert run(out, "--epochs", 1, "--recon", "bce", "--iw-samples", 0) == 0
    assert {r["decoder_variance"] for r in rows(out / "log.csv")} == {""}
    assert {r["beta"] for r in rows(out / "log.csv")} == {"1.0"}
    model = train.build_model(train.TrainConfig(preset="tiny", image_size=16).resolved())
    assert train.decoder_variance(model) == 0.5  # the squared error is the Gaussian decoder with s^2 = 1/2


def test_comparison_figure_composes_two_runs(tmp_path):
    from PIL import Image

    from scratchvae.plots import plot_comparison

    vae_run, prior_run = tmp_path / "vae", tmp_path / "prior"
    assert run(vae_run, "--epochs", 1, "--iw-samples", 4) == 0
    assert run(prior_run, "--epochs", 1, "--objective", "prior-mc", "--iw-samples", 4) == 0
    one = plot_comparison([("VAE", vae_run)], tmp_path / "one.png", colors=32)
    two = plot_comparison([("VAE", vae_run), ("prior MC", prior_run)], tmp_path / "two.png")
    with Image.open(one) as a, Image.open(two) as b:
        assert b.size[0] > 1.8 * a.size[0] and b.size[1] == a.size[1]
        assert len(a.convert("RGB").getcolors(1 << 16)) <= 32


def test_learned_variance_warmup_and_bound_keep_arrays_on_the_device(tmp_path, monkeypatch):
    """Under the stand-in for CuPy (device arrays that refuse to mix with host arrays), as on a GPU."""
    from strict_device import use_strict_device

    from scratchvae.plots import plot_run
    with use_strict_device() as strict:
        monkeypatch.setattr(backend, "set_device", lambda device: strict)
        summary = train.train(train.TrainConfig(
            out=str(tmp_path / "run"), preset="tiny", image_size=16, limit=32, batch_size=8, epochs=1, progress=False,
            recon="gaussian", recon_variance="learned", beta_warmup=3, iw_samples=6))
        plot_run(tmp_path / "run")
    assert summary["device"] == "gpu" and summary["importance_sampled"]["k"] == 6
    assert (tmp_path / "run" / "decoder_variance.png").is_file() and (tmp_path / "run" / "elbo_gap.png").is_file()
