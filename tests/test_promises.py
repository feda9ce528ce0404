"""Promises of the README and the docstrings that no other test held: each test here fails on a plausible bug.

The eight of issue 24 first (the logvar clamp's bounds; ``evaluate`` with beta != 1, its mse, its eval mode;
fresh noise every epoch; resuming from a periodic checkpoint after a hard crash; evaluation on the validation
split; one cache per image size), then a few more of the same kind. Everything runs on tiny models, 16x16
images and a few dozen built-in faces, through the public API only.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from PIL import Image

from scratchvae import backend, data, train, vae
from scratchvae.optim import Adam
from scratchvae.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
PER_EPOCH = 6  # 48 faces in batches of 8
TINY = dict(preset="tiny", image_size=16, limit=48, batch_size=8, lr=3e-3, device="cpu", progress=False)
TINY_CLI = ["--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--lr", "3e-3",
            "--device", "cpu", "--no-progress"]


def host(a):
    return backend.to_host(a)


def config(out, **options):
    """A TrainConfig of the tiny setup (the same run as the CLI's TINY_CLI) writing into ``out``."""
    return train.TrainConfig(out=str(out), **{**TINY, **options})


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(out):
    """log.csv without the timing column, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows(out / "log.csv")]


def checkpoint_meta(out):
    with numpy.load(out / "checkpoint.npz", allow_pickle=False) as f:
        return json.loads(str(f["meta"]))


def images(n, seed=0, size=16):
    """n random images (n, 3, size, size) in [0, 1], float32, on the current device."""
    return backend.to_device(numpy.random.default_rng(seed).random((n, 3, size, size)).astype(numpy.float32))


def trained_tiny_model(x, steps=2, **kw):
    """A tiny VAE after a few updates on ``x``: BatchNorm's running statistics are off their defaults."""
    model = VAE(image_size=x.shape[-1], preset="tiny", **kw)
    optimizer = Adam(model, lr=1e-2)
    for _ in range(steps):
        model.train_step(x, optimizer)
    return model


def logvar_head(model):
    """The state-dict names of the logvar head's weight and bias (whatever the engine calls them)."""
    names = [n for n in model.state_dict() if "logvar" in n]
    weight = [n for n in names if model.state_dict()[n].ndim == 2]
    bias = [n for n in names if model.state_dict()[n].ndim == 1]
    assert len(weight) == 1 and len(bias) == 1, f"cannot tell the logvar head's weight and bias apart in {names}"
    return weight[0], bias[0]


# ---- 1. the logvar clamp's bounds ------------------------------------------------------------------------------

def test_logvar_within_the_bounds_passes_with_its_gradient_and_beyond_them_is_clamped_without(xp, f64):
    """vae.py: logvar is clamped to [LOGVAR_MIN, LOGVAR_MAX] = [-30, 20], far wider than any real posterior needs;
    inside, encode returns it untouched and its gradient flows; beyond either bound, the gradient is zero."""
    with numpy.errstate(over="ignore"):  # why there is a clamp at all: exp(logvar) must stay finite in float32
        assert numpy.isfinite(numpy.exp(numpy.float32(vae.LOGVAR_MAX))), f"exp({vae.LOGVAR_MAX}) overflows float32"
    model = VAE(image_size=16, preset="tiny", latent_dim=4)
    x = images(3, seed=1).astype(numpy.float64)
    raw = numpy.array([-10.0, 10.0, vae.LOGVAR_MIN - 1.0, vae.LOGVAR_MAX + 1.0])
    w_name, b_name = logvar_head(model)
    state = {k: host(v).copy() for k, v in model.state_dict().items()}

    # a head with no weights: the raw logvar is exactly the bias, whatever the image
    state[w_name][...], state[b_name][...] = 0.0, raw
    model.load_state_dict(state)
    logvar = host(model.encode(x)[1])
    want = numpy.array([-10.0, 10.0, vae.LOGVAR_MIN, vae.LOGVAR_MAX])
    numpy.testing.assert_array_equal(logvar, numpy.broadcast_to(want, logvar.shape),
                                     err_msg="a logvar of -10 or +10 must pass unclamped; beyond the bounds clamp")

    # small weights: the raw logvar now depends on the image (by ~1e-3, never crossing a bound), so dL/dx
    # shows whether the gradient of each dimension of logvar reaches the encoder
    state[w_name][...] = 1e-3 * numpy.random.default_rng(2).standard_normal(state[w_name].shape)
    model.load_state_dict(state)
    zeros, v, h = xp.zeros((3, 4)), backend.to_device(numpy.random.default_rng(3).standard_normal(x.shape)), 1e-4
    for j, kind in enumerate(["raw -10", "raw +10", "below LOGVAR_MIN", "above LOGVAR_MAX"]):
        model.encode(x)
        dlogvar = xp.zeros((3, 4))
        dlogvar[:, j] = 1.0
        dx = host(model.encode_backward(zeros, dlogvar))
        if j < 2:  # the gradient of sum(logvar[:, j]), against central differences along v
            numeric = float(host(model.encode(x + h * v)[1][:, j].sum() - model.encode(x - h * v)[1][:, j].sum())) / (2 * h)
            assert numeric != 0 and float((dx * host(v)).sum()) == pytest.approx(numeric, rel=1e-5), \
                f"logvar dimension {j} ({kind}) is inside the bounds but its gradient is not passed on"
        else:
            largest = float(numpy.abs(dx).max())
            assert largest == 0, f"logvar dimension {j} ({kind}) is clamped but its gradient reached the encoder: {largest}"


# ---- 2.-4. evaluate ----------------------------------------------------------------------------------------------

def test_evaluate_with_beta_reports_the_true_bound_and_the_weighted_loss(xp):
    """evaluate's docstring: neg_elbo_nats is -ELBO (recon + KL + constant) whatever beta; loss is recon + beta KL."""
    x = images(4, seed=3)
    eps = backend.to_device(numpy.random.default_rng(4).standard_normal((1, 4, 4)).astype(numpy.float32))
    beta1 = VAE(image_size=16, preset="tiny", beta=1.0)
    beta4 = VAE(image_size=16, preset="tiny", beta=4.0)  # the same weights: same seed
    state = {k: host(v).copy() for k, v in beta1.state_dict().items()}
    state[logvar_head(beta1)[1]] += 1.5  # posteriors wider than the prior: a KL of a few nats
    beta1.load_state_dict(state)
    beta4.load_state_dict(state)
    a, b = beta1.evaluate(x, eps=eps), beta4.evaluate(x, eps=eps)
    offset = 0.5 * x[0].size * math.log(math.pi)
    assert b["kl"] > 1.0, b  # big enough for a stray factor of 4 to show
    assert b["recon"] == a["recon"] and b["kl"] == a["kl"]
    assert b["neg_elbo_nats"] - offset == pytest.approx(b["recon"] + b["kl"], rel=1e-5, abs=1e-4), \
        f"neg_elbo_nats with beta=4 is not recon + kl + (D/2) log pi: {b}"
    assert b["neg_elbo_nats"] == pytest.approx(a["neg_elbo_nats"], rel=0, abs=1e-4), "beta changed the bound"
    assert b["bits_per_dim"] == pytest.approx(a["bits_per_dim"], rel=1e-7)
    assert b["loss"] == pytest.approx(b["recon"] + 4.0 * b["kl"], rel=1e-5), f"loss is not recon + 4 kl: {b}"
    assert a["loss"] == pytest.approx(a["recon"] + a["kl"], rel=1e-5)


def test_evaluate_mse_is_that_of_the_posterior_mean_reconstruction(xp):
    """evaluate's docstring: mse is the per-pixel squared error of the reconstruction from mu(x), not from a sample."""
    x = images(5, seed=5)
    model = trained_tiny_model(x, steps=20)  # a decoder that has learnt to respond to z
    state = {k: host(v).copy() for k, v in model.state_dict().items()}
    state[logvar_head(model)[1]] += 3.0  # wide posteriors: a sampled z lies far from mu
    model.load_state_dict(state)
    want = float(host(((model.reconstruct(x) - x) ** 2).mean()))
    for seed in (6, 7):
        got = model.evaluate(x, rng=backend.rng(seed))["mse"]
        assert got == pytest.approx(want, rel=1e-5), f"evaluate's mse {got} != mse of reconstruct(x) {want}"


def test_evaluate_runs_in_eval_mode_and_leaves_batchnorm_alone(xp):
    """evaluate's docstring: no update, eval-mode BatchNorm (running statistics, untouched), the mode restored."""
    x = images(4, seed=8)
    x[:2] *= 0.2  # two dark images and two bright ones: each alone has batch statistics far from the batch's
    x[2:] = 0.8 + 0.2 * x[2:]
    model = trained_tiny_model(x)
    eps = backend.to_device(numpy.random.default_rng(9).standard_normal((1, 4, 4)).astype(numpy.float32))
    before = {k: host(v).copy() for k, v in model.state_dict().items()}
    model.train()
    whole = model.evaluate(x, eps=eps)
    assert model.training, "evaluate left the model in eval mode"
    for k, v in model.state_dict().items():
        numpy.testing.assert_array_equal(host(v), before[k], err_msg=f"evaluate changed {k}")
    # on running statistics each image's figures do not depend on the batch it came in
    single = [model.evaluate(x[i:i + 1], eps=eps[:, i:i + 1]) for i in range(len(x))]
    for k in ("recon", "kl", "neg_elbo_nats"):
        assert whole[k] == pytest.approx(numpy.mean([s[k] for s in single]), rel=1e-5), \
            f"evaluate's {k} depends on the batch: BatchNorm used batch statistics"
    model.eval()
    model.evaluate(x, eps=eps)
    assert not model.training, "evaluate did not restore eval mode"


# ---- 5. fresh noise every epoch --------------------------------------------------------------------------------

def record_noise(monkeypatch):
    """Wrap VAE.train_step to keep the noise each update uses; returns the list it fills."""
    noises, real = [], VAE.train_step

    def train_step(self, x, optimizer, eps=None, rng=None):
        if eps is None:
            eps = self.draw_eps(x.shape[0], rng)  # what train_step would draw from this generator
        noises.append(host(eps).copy())
        return real(self, x, optimizer, eps=eps)

    monkeypatch.setattr(VAE, "train_step", train_step)
    return noises


def test_every_update_of_every_epoch_draws_new_noise(tmp_path, monkeypatch):
    """README: every step's noise is drawn from (seed, step): step s and step s + steps_per_epoch differ."""
    noises = record_noise(monkeypatch)
    train.train(config(tmp_path / "run", epochs=3))
    assert len(noises) == 3 * PER_EPOCH
    for s in range(2 * PER_EPOCH):
        assert not numpy.array_equal(noises[s], noises[s + PER_EPOCH]), \
            f"updates {s + 1} and {s + 1 + PER_EPOCH} (a later epoch) drew the same noise"
    flat = {n.tobytes() for n in noises}
    assert len(flat) == len(noises), "some updates drew the same noise"
    # --seed seeds the noise too
    first_epoch = noises[:PER_EPOCH]
    noises.clear()
    train.train(config(tmp_path / "seed1", epochs=1, seed=1))
    for s, (a, b) in enumerate(zip(first_epoch, noises)):
        assert not numpy.array_equal(a, b), f"seeds 0 and 1 drew the same noise for update {s + 1}"


# ---- 6. resuming from a periodic checkpoint after a hard crash --------------------------------------------------

# Runs examples/celeba.py in a child process that SIGKILLs itself as update kill_at begins: no handler,
# no finally, no last checkpoint; what is on disk is all that is left.
KILLED_CHILD = """
import os, runpy, signal, sys
from scratchvae.vae import VAE
kill_at, calls, real = int(sys.argv[1]), [], VAE.train_step
def train_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)
VAE.train_step = train_step
sys.argv = [{script!r}] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_killed(out, kill_at, *args):
    """examples/celeba.py on the tiny setup, killed with SIGKILL when update ``kill_at`` begins."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    code = KILLED_CHILD.format(script=str(ROOT / "examples" / "celeba.py"))
    argv = [*TINY_CLI, "--out", str(out), *map(str, args)]
    done = subprocess.run([sys.executable, "-c", code, str(kill_at), *argv], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, f"the child was not killed: {done.returncode}\n{done.stderr[-2000:]}"


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_resume_from_a_periodic_checkpoint_after_sigkill_continues_exactly(tmp_path):
    """README: checkpoints every --checkpoint-every steps; resuming is exact. Killed during update 6 (after the
    periodic checkpoint of step 4, mid-epoch), the resumed run logs what an uninterrupted one does, row for row."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train(config(whole, epochs=2, checkpoint_every=4))
    run_killed(parts, 6, "--epochs", 2, "--checkpoint-every", 4)
    assert checkpoint_meta(parts)["step"] == 4, "no periodic checkpoint of step 4 was written"
    # log.csv is flushed row by row: all five finished updates are on disk, though the process died
    logged = [int(r["step"]) for r in rows(parts / "log.csv")]
    assert logged == [1, 2, 3, 4, 5], f"log.csv holds steps {logged} after the kill, not 1..5: rows were not flushed"
    train.train(config(parts, epochs=2, checkpoint_every=4, resume=True))
    assert losses(parts) == losses(whole), "the resumed log differs from the uninterrupted run's"
    assert rows(parts / "eval.csv") == rows(whole / "eval.csv")
    assert checkpoint_meta(parts)["step"] == 2 * PER_EPOCH


# ---- 7. evaluation on the validation split ----------------------------------------------------------------------

@pytest.mark.parametrize("eval_images", [None, 4])
def test_eval_csv_is_the_validation_split_evaluated_by_the_checkpoint(tmp_path, eval_images):
    """README: eval.csv holds the held-out evaluation on the validation split (--eval-images: its first N images).
    Recomputed from the final checkpoint, the last row comes back; on the training images it would not."""
    cfg = config(tmp_path / "run", epochs=1, eval_images=eval_images)
    train.train(cfg)
    last = rows(tmp_path / "run" / "eval.csv")[-1]
    assert int(last["step"]) == PER_EPOCH
    dataset = train.load_data(cfg.resolved())
    valid = dataset.valid.images
    assert len(valid) == 8
    model = VAE.load(tmp_path / "run" / "checkpoint.npz")
    n = len(valid) if eval_images is None else eval_images
    want = train.evaluate_images(model, valid[:n], 8, cfg.seed)
    for k in train.EVAL_FIELDS[2:]:
        assert float(last[k]) == pytest.approx(want[k], rel=1e-6), \
            f"eval.csv's {k} is not that of the first {n} validation images: {last[k]} vs {want[k]}"
    # the comparison can tell the splits (and the cap) apart
    others = {"the training images": dataset.train.images[:n]}
    if eval_images is not None:
        others["the whole validation split"] = valid
    for what, imgs in others.items():
        other = train.evaluate_images(model, imgs, 8, cfg.seed)
        assert abs(other["recon"] - want["recon"]) > 1e-3 * abs(want["recon"]), f"cannot tell {what} apart"
    # the figures' held-out images in the checkpoint are validation images too
    with numpy.load(tmp_path / "run" / "checkpoint.npz", allow_pickle=False) as f:
        heldout = f["heldout/images"]
    numpy.testing.assert_array_equal(heldout, numpy.asarray(valid[: train.HELDOUT_IMAGES]),
                                     err_msg="the checkpoint's held-out images are not the first validation images")


# ---- 8. one cache per image size ---------------------------------------------------------------------------------

def write_celeba_like(folder, n):
    """n aligned-CelebA-sized (178x218) JPEGs named as CelebA's."""
    folder.mkdir(parents=True)
    g = numpy.random.default_rng(10)
    for i in range(n, 0, -1):  # newest first: a folder listing in creation order is not in name order
        small = g.integers(0, 256, (9, 8, 3), dtype=numpy.uint8)
        Image.fromarray(small).resize((178, 218), Image.Resampling.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)


def test_each_image_size_keeps_its_own_cache(tmp_path):
    """data.py: a cache is built once and memory-mapped by later runs; alternating sizes (64, 32, 64) must not
    rebuild it: after a 32 px load, a 64 px load reuses the 64 px cache, file untouched."""
    folder, cache = tmp_path / "celeba", tmp_path / "cache"
    write_celeba_like(folder, 10)

    def load(size):
        return data.load_celeba(folder, image_size=size, cache_dir=cache, workers=1, progress=False)

    first64 = load(64)
    assert first64.cache_built
    stat64 = os.stat(first64.cache_path)
    pixels64 = numpy.array(first64.train.images)
    first32 = load(32)
    assert first32.cache_built and first32.train.images.shape[-1] == 32
    again64 = load(64)
    assert not again64.cache_built, "the 64 px cache was rebuilt after a 32 px load"
    after = os.stat(again64.cache_path)
    assert (after.st_ino, after.st_mtime_ns) == (stat64.st_ino, stat64.st_mtime_ns), "the 64 px cache was rewritten"
    numpy.testing.assert_array_equal(numpy.asarray(again64.train.images), pixels64)
    assert not load(32).cache_built, "the 32 px cache was rebuilt after a 64 px load"


# ---- more promises -------------------------------------------------------------------------------------------------

def test_max_steps_counts_the_updates_of_the_whole_run_across_resumes(tmp_path):
    """README: --max-steps counts all updates of the run, across resumes (not those of this invocation)."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train(config(whole, epochs=2, max_steps=9))
    train.train(config(parts, epochs=2, max_steps=4))
    summary = train.train(config(parts, epochs=2, max_steps=9, resume=True))
    assert summary["steps"] == 9, f"resumed with --max-steps 9 at step 4, the run ended at step {summary['steps']}"
    assert checkpoint_meta(parts)["step"] == 9
    assert len(rows(parts / "log.csv")) == 9, "the resumed run made max_steps more updates, not max_steps in all"
    assert losses(parts) == losses(whole)
    assert train.train(config(parts, epochs=2, max_steps=9, resume=True))["steps"] == 9  # nothing left to do
    assert len(rows(parts / "log.csv")) == 9


def test_every_evaluation_sees_the_same_noise(xp):
    """evaluate_images: every evaluation of a run draws the same noise, so that epochs compare like with like;
    the model's own generator (which advances with every call given none) must not be used."""
    x = (numpy.random.default_rng(11).random((12, 3, 16, 16)) * 255).astype(numpy.uint8)
    model = VAE(image_size=16, preset="tiny")
    first = train.evaluate_images(model, x, 5, seed=0)
    model.sample(3)  # draws from the model's own generator in between, as the figures do
    assert train.evaluate_images(model, x, 5, seed=0) == first, "a second evaluation drew other noise"
    assert train.evaluate_images(model, x, 5, seed=1) != first, "the evaluation noise ignores the seed"


def test_the_built_in_faces_hold_out_other_faces_than_they_train_on():
    """load_synthetic: each split has its own stream, so validation and test faces are not training faces."""
    ds = data.load_synthetic(48, 8, image_size=16, seed=0)
    train_faces = {img.tobytes() for img in numpy.asarray(ds.train.images)}
    for split in (ds.valid, ds.test):
        shared = sum(img.tobytes() in train_faces for img in numpy.asarray(split.images))
        assert shared == 0, f"{shared} of the {len(split)} {split.name} faces are training faces"
    assert not numpy.array_equal(numpy.asarray(ds.valid.images), numpy.asarray(ds.test.images)), \
        "the validation and test faces are the same faces"


def test_more_epochs_on_resume_continue_a_finished_run_exactly(tmp_path):
    """README: --epochs may change on resume: a finished 1-epoch run resumed with --epochs 2 is the 2-epoch run."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train.train(config(whole, epochs=2))
    train.train(config(parts, epochs=1))
    summary = train.train(config(parts, epochs=2, resume=True))
    assert summary["steps"] == 2 * PER_EPOCH, f"resumed with --epochs 2, the run ended at step {summary['steps']}"
    assert losses(parts) == losses(whole)
    assert rows(parts / "eval.csv") == rows(whole / "eval.csv")


def test_limit_keeps_the_first_images_by_file_name(tmp_path):
    """load_celeba: ``limit`` keeps the first N images by file name, whatever order the folder lists them in."""
    folder = tmp_path / "celeba"
    write_celeba_like(folder, 12)
    ds = data.load_celeba(folder, image_size=16, cache_dir=tmp_path / "cache", limit=5, workers=1, progress=False)
    names = [str(n) for split in (ds.train, ds.valid, ds.test) for n in split.names]
    assert sorted(names) == [f"{i:06d}.jpg" for i in range(1, 6)], f"limit=5 kept {sorted(names)}"
    first = data.decode_image(folder / str(ds.train.names[0]), 16)
    numpy.testing.assert_array_equal(numpy.asarray(ds.train.images[0]), first)
