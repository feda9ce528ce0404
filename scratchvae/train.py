"""The training loop: data, model and optimiser; a per-step log; a held-out evaluation per epoch; checkpoints.

``train(TrainConfig(...))`` runs (or resumes) one training run and writes into its folder ``config.out``:

* ``log.csv``        one row per update: step, epoch, recon, kl, loss, lr, images_per_s, the beta in force (KL
  warm-up) and the decoder variance s^2 (flushed as it goes);
* ``eval.csv``       one row per held-out evaluation on the validation split (end of every epoch, end of run):
  -ELBO in nats per image and in bits per dimension, recon, KL, loss, per-pixel MSE; and on the first
  ``iw_images`` of them the importance-sampled -log p(x) estimate -L_k, the -ELBO from the same samples and
  the gap L_k - ELBO (k = ``iw_samples`` at the end of the run, ``IW_EPOCH_SAMPLES`` at the other evaluations);
* ``iw_bounds.csv``  per image of the last evaluation: -ELBO and -L_k for k = 1, 2, 4, ..., iw_samples;
* ``checkpoint.npz`` everything needed to continue exactly (see ``save_checkpoint``); ``VAE.load`` reads it too;
* ``summary.json``   the final numbers of the run.

The figures are drawn from these files by ``scratchvae.plots.plot_run``.

Exact resumption. A resumed run must log the same losses, bit for bit, as a run never interrupted. Nothing
random here keeps a hidden generator state: the noise of update ``s`` comes from
``backend.rng((seed, NOISE_STREAM, s))`` and the batches of epoch ``e`` from ``Batches(..., seed).epoch(e)``,
which can start at any batch. So the checkpoint needs only the parameters, the BatchNorm buffers, the
optimiser's moments and the step count; the "RNG state" it records is the seed and the recipe above.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, backend
from .optim import Adam
from .vae import PRESETS, RECONSTRUCTIONS, VAE, NonFiniteLossError

# Random streams, each a fixed second element of the seed tuple so none can overlap another
# (the VAE itself uses ``seed`` for its initial weights and ``(seed, 1, call number)`` for the
# generators of calls given none, ``VAE.own_rng``).
NOISE_STREAM = 2    # the reparameterization noise of update s: rng((seed, NOISE_STREAM, s))
EVAL_STREAM = 3     # held-out evaluation, batch i: rng((seed, EVAL_STREAM, i)); the same at every evaluation
SAMPLE_STREAM = 4   # the prior samples drawn for the figures
IW_STREAM = 5       # the importance-sampled bound, batch i: rng((seed, IW_STREAM, i)); the same at every evaluation

CHECKPOINT = "checkpoint.npz"
LOG = "log.csv"
EVAL = "eval.csv"
SUMMARY = "summary.json"
IW_BOUNDS = "iw_bounds.csv"
FIGURES = ("vae_mse.png", "vae_kld.png", "vae_recons.png", "samples.png", "interpolation.png", "traversal.png",
           "elbo_gap.png")  # elbo_gap.png unless --iw-samples 0
LEARNED_VARIANCE_FIGURE = "decoder_variance.png"  # only with --recon-variance learned
OUTPUTS = (CHECKPOINT, LOG, EVAL, SUMMARY, IW_BOUNDS) + FIGURES  # what a run writes (iw_bounds.csv unless --iw-samples 0)
RUN_FILES = OUTPUTS + (LEARNED_VARIANCE_FIGURE,)  # what --force may delete: a run's own files, nothing else
LOG_FIELDS = ("step", "epoch", "recon", "kl", "loss", "lr", "images_per_s", "beta", "decoder_variance")
EVAL_FIELDS = ("step", "epoch", "neg_elbo_nats", "bits_per_dim", "recon", "kl", "loss", "mse",
               "iw_k", "iw_images", "iw_neg_elbo_nats", "neg_log_px_nats", "elbo_gap_nats")
IW_EPOCH_SAMPLES = 4  # k of the bound at the evaluations before the last (which uses --iw-samples): a cheap trend
CHECKPOINT_FORMAT = 1
HELDOUT_IMAGES = 32  # validation images kept in the checkpoint for the figures (so plotting needs no data)

# The built-in data set, sized so the no-argument run takes a few minutes on two CPU cores.
SYNTHETIC_TRAIN = 4000
SYNTHETIC_VALID = 500
SYNTHETIC_SEED = 0  # the built-in faces are one fixed data set; --seed changes the model, noise and order
DEFAULTS = {  # per data source: (preset, epochs, batch size)
    "synthetic": ("small", 5, 32),
    "celeba": ("default", 10, 64),
}

# Options that must be equal to resume a run: they change the model, the data or the order of the
# batches. The others (epochs, max_steps, lr, device, checkpoint_every, ...) may change on resume.
MUST_MATCH = ("data", "limit", "image_size", "resample", "preset", "latent_dim", "recon", "recon_variance", "beta",
              "beta_warmup", "mc_samples", "objective", "seed", "batch_size")
# What a checkpoint written before an option existed was made with (CelebA was resized with Lanczos then;
# no run had a KL warm-up).
BEFORE_OPTION = {"resample": "lanczos", "beta_warmup": 0}


class ConfigError(ValueError):
    """A bad option, a run folder that may not be written, or a checkpoint that does not match: the message says which."""


class TrainingStopped(Exception):
    """Training stopped before the end; ``step`` is the last update made, ``exit_code`` what a CLI should return."""

    exit_code = 1

    def __init__(self, message, step):
        super().__init__(message)
        self.step = step


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or Inf; the last good checkpoint was kept, not overwritten."""

    exit_code = 3


class Interrupted(TrainingStopped):
    """Ctrl-C: the checkpoint was written (when the model was in a consistent state) and the run can resume."""

    exit_code = 130  # the shell's convention for "killed by SIGINT"


@dataclass
class TrainConfig:
    """Every option of a training run. ``None`` means "the default for this data source" (see ``resolved``)."""

    data: str | None = None          # CelebA location; None: the built-in synthetic faces
    out: str = "runs/celeba"
    image_size: int = 64
    resample: str = "bilinear"       # CelebA's resize filter (data.RESAMPLE_FILTERS); the built-in faces have none
    preset: str | None = None        # 'small' on the built-in faces, 'default' on CelebA
    latent_dim: int | None = None    # None: the preset's
    recon: str = "sse"
    recon_variance: float | str = 0.5  # s^2 of --recon gaussian, or "learned" (a trained parameter)
    beta: float = 1.0
    beta_warmup: int = 0             # updates over which beta rises linearly from 0 (0: none)
    mc_samples: int = 1
    objective: str = "elbo"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None     # stop after this many updates in all (counted from the run's start)
    limit: int | None = None         # use only the first N training images
    eval_images: int | None = None   # cap on the validation images per evaluation; None: the whole split
    iw_samples: int = 32             # k of the importance-sampled -log p(x) at the end of the run; 0: none
    iw_images: int = 128             # validation images (the first ones) that bound is computed on
    checkpoint_every: int = 250
    resume: bool = False
    force: bool = False
    workers: int | None = None       # processes decoding CelebA into the cache (first run only)
    cache_dir: str | None = None
    progress: bool = True

    @property
    def source(self) -> str:
        """'celeba' when a data path is given, else 'synthetic'."""
        return "synthetic" if self.data is None else "celeba"

    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` default filled in for the data source, checked; raises ConfigError."""
        preset, epochs, batch_size = DEFAULTS[self.source]
        c = dataclasses.replace(self)
        c.preset = c.preset or preset
        c.epochs = epochs if c.epochs is None else c.epochs
        c.batch_size = batch_size if c.batch_size is None else c.batch_size
        if c.preset in PRESETS and c.latent_dim is None:
            c.latent_dim = PRESETS[c.preset]["latent_dim"]
        if c.data is not None:
            c.data = os.path.abspath(os.path.expanduser(c.data))
        c.check()
        return c

    def check(self) -> None:
        """Raise ConfigError with a one-line reason for the first invalid option."""
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        def positive_int(name, value, allow_none=False):
            if value is None and allow_none:
                return
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be a positive integer, got {value!r}")

        need(self.preset in PRESETS, f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        need(self.recon in RECONSTRUCTIONS, f"unknown recon {self.recon!r}; choose one of {', '.join(RECONSTRUCTIONS)}")
        need(self.objective in ("elbo", "prior-mc"), f"objective must be 'elbo' or 'prior-mc', got {self.objective!r}")
        from .data import RESAMPLE_FILTERS  # noqa: PLC0415  (Pillow's filters; data loads Pillow)

        need(self.resample in RESAMPLE_FILTERS,
             f"unknown resample filter {self.resample!r}; choose one of {', '.join(RESAMPLE_FILTERS)}")
        need(self.device in backend.DEVICES, f"device must be one of {', '.join(backend.DEVICES)}, got {self.device!r}")
        for name in ("image_size", "epochs", "batch_size", "mc_samples", "latent_dim", "checkpoint_every"):
            positive_int(name.replace("_", "-"), getattr(self, name))
        for name in ("max_steps", "limit", "eval_images", "workers"):
            positive_int(name.replace("_", "-"), getattr(self, name), allow_none=True)
        positive_int("iw-images", self.iw_images)
        for name in ("iw_samples", "beta_warmup"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                 f"{name.replace('_', '-')} must be an integer >= 0 (0 turns it off), got {value!r}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr}")
        need(math.isfinite(self.beta) and self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        if self.recon_variance == "learned":
            need(self.recon == "gaussian", f"--recon-variance learned needs --recon gaussian (got --recon {self.recon})")
        else:
            need(isinstance(self.recon_variance, (int, float)) and math.isfinite(self.recon_variance)
                 and self.recon_variance > 0, f"recon-variance must be a positive number or 'learned', "
                 f"got {self.recon_variance!r}")
        halvings = len(PRESETS[self.preset]["channels"])
        m = 2 ** halvings
        near = " or ".join(str(v) for v in (self.image_size // m * m, self.image_size // m * m + m) if v >= max(8, m))
        need(self.image_size >= 8 and self.image_size % m == 0,
             f"image-size {self.image_size} must be a multiple of {m}, at least 8, for preset {self.preset!r} "
             f"(its encoder halves the image {halvings} times): e.g. {near}")
        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an integer >= 0, got {self.seed!r}")
        need(not (self.resume and self.force), "--resume continues the run in the folder and --force overwrites "
             "it: give one of them, not both")
        if self.data is not None:
            need(os.path.exists(self.data), f"data path {self.data} does not exist; give the folder holding "
                 "img_align_celeba (or the zip), or leave --data out to use the built-in faces")


# ---- the run folder ------------------------------------------------------------------------------------------

def prepare_out_dir(out, resume=False, force=False, clear=True) -> Path:
    """Make the run folder ready: refuse to touch a non-empty one unless resuming or forced; returns its Path.

    ``force`` deletes only the files a run writes (``RUN_FILES``), never anything else found there; with
    ``clear=False`` nothing is deleted or created, the folder is only checked.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise ConfigError(f"nothing to resume: {out / CHECKPOINT} does not exist; leave out --resume to start "
                              "a new run")
        return out
    if present and not force:
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ConfigError(f"{out} already holds files ({shown}); pass --resume to continue that run, --force to "
                          "overwrite its outputs, or --out DIR for a new folder")
    if clear:
        for name in present:
            if name in RUN_FILES or name.startswith(CHECKPOINT + ".tmp"):
                (out / name).unlink()
        out.mkdir(parents=True, exist_ok=True)
    return out


# ---- data and model ------------------------------------------------------------------------------------------

def load_data(cfg: TrainConfig):
    """The data set of a resolved config: CelebA from ``cfg.data``, or the built-in synthetic faces."""
    from . import data  # noqa: PLC0415  (keeps `import scratchvae.train` light for tools that only read logs)

    if cfg.data is not None:
        return data.load_celeba(cfg.data, image_size=cfg.image_size, cache_dir=cfg.cache_dir, limit=cfg.limit,
                                workers=cfg.workers, progress=cfg.progress, resample=cfg.resample)
    n_train = cfg.limit or SYNTHETIC_TRAIN
    # with --limit, hold out an eighth as many faces (at least 8), so a quick run evaluates quickly too
    n_valid = SYNTHETIC_VALID if cfg.limit is None else min(SYNTHETIC_VALID, max(8, cfg.limit // 8))
    return data.load_synthetic(n_train, n_valid, image_size=cfg.image_size, seed=SYNTHETIC_SEED)


def build_model(cfg: TrainConfig) -> VAE:
    """The VAE a resolved config describes (weights drawn from ``cfg.seed``)."""
    return VAE(image_size=cfg.image_size, preset=cfg.preset, latent_dim=cfg.latent_dim, recon=cfg.recon,
               recon_variance=cfg.recon_variance, beta=cfg.beta, mc_samples=cfg.mc_samples,
               objective=cfg.objective, seed=cfg.seed)


# ---- checkpoints ---------------------------------------------------------------------------------------------

def save_checkpoint(path, model, optimizer, meta, extra=None) -> None:
    """Write model parameters and buffers, optimiser state, ``meta`` (JSON) and ``extra`` arrays to one .npz.

    Keys: ``model/<name>`` (``VAE.state_dict``: weights and BatchNorm running statistics), ``optim/<name>``
    (``Adam.state_dict``: step count, lr, moments), ``config`` (the VAE's, so ``VAE.load`` works), ``meta``
    (step, epoch, batch in epoch, seed, the training config, the RNG recipe). Atomic: the file is
    replaced whole or not at all, and no pickle is involved.
    """
    arrays = {**model.to_arrays(), "meta": json.dumps(meta)}
    arrays.update({f"optim/{k}": v for k, v in optimizer.state_dict().items()})
    arrays.update(extra or {})
    backend.save_npz(path, arrays)


def load_checkpoint(path) -> dict:
    """Read a checkpoint: ``{"meta": dict, "config": dict, "model": {...}, "optim": {...}, "arrays": all}``."""
    try:
        arrays = backend.load_npz(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the checkpoint {path} ({e}); it is damaged: start over with --force") from None
    if "meta" not in arrays or "config" not in arrays:
        raise ConfigError(f"{path} is not a training checkpoint (no 'meta'); it may be a model saved with VAE.save")
    meta = json.loads(str(arrays["meta"]))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} has checkpoint format {meta.get('format')}, this version reads {CHECKPOINT_FORMAT}")
    return {"meta": meta, "config": json.loads(str(arrays["config"])), "arrays": arrays,
            "model": {k[6:]: v for k, v in arrays.items() if k.startswith("model/")},
            "optim": {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}}


def config_differences(stored: dict, requested: dict) -> list:
    """``"name: stored -> requested"`` for every option in MUST_MATCH on which two training configs differ."""
    def value(config, k):
        if k == "resample" and config.get("data") is None:
            return None  # the built-in faces are drawn at their size: no filter touches them
        return config.get(k, BEFORE_OPTION.get(k))

    return [f"{k}: {value(stored, k)!r} (checkpoint) vs {value(requested, k)!r} (now)"
            for k in MUST_MATCH if value(stored, k) != value(requested, k)]


# ---- logs ----------------------------------------------------------------------------------------------------

class CsvLog:
    """Append rows to a CSV file, flushed after each, so the log on disk is complete up to the last step."""

    def __init__(self, path, fields, rows=None):
        """Open ``path`` and write the header then ``rows`` (the kept history when resuming), replacing the file."""
        self.fields = fields
        tmp = f"{path}.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rows or [])
        os.replace(tmp, path)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fields)

    def write(self, row) -> None:
        """Append one row; floats are written with repr, which round-trips exactly."""
        self.writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        """Close the file (rows already written are on disk)."""
        self.file.close()


def warmup_beta(step, beta, warmup) -> float:
    """The KL weight of update ``step`` (1-based): beta (step - 1) / warmup for the first ``warmup`` updates, then beta.

    KL warm-up: the first updates weigh the KL little or not at all, so the encoder learns to carry information
    before the KL pulls q(z|x) to the prior (the usual remedy for a KL that collapses to zero early).
    It depends on the step alone, so a resumed run uses the same betas.
    """
    return beta if warmup <= 0 else beta * min(1.0, max(step - 1, 0) / warmup)


def decoder_variance(model):
    """The decoder variance s^2 in force (learned or fixed; 1/2 for the squared error), or "" for Bernoulli."""
    recon = model.recon
    if hasattr(recon, "current_variance"):
        return recon.current_variance()
    if hasattr(recon, "variance"):
        return recon.variance
    return 0.5 if recon.name == "sse" else ""


def read_csv(path) -> list:
    """The rows of a CSV file as dicts of strings (empty list if the file is missing)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- evaluation ----------------------------------------------------------------------------------------------

def evaluate_images(model, images, batch_size, seed) -> dict:
    """``VAE.evaluate`` over uint8 images ``(n, 3, H, W)`` in batches: per-image means over all of them.

    Batch i always draws its noise from ``rng((seed, EVAL_STREAM, i))``, so every evaluation of a run
    sees the same images with the same noise and the numbers are comparable from epoch to epoch.
    """
    from .data import Batches  # noqa: PLC0415

    totals, n = {}, 0
    for i, x in enumerate(Batches(images, batch_size, shuffle=False, drop_last=False).epoch(0)):
        metrics = model.evaluate(x, rng=backend.rng((seed, EVAL_STREAM, i)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * len(x)
        n += len(x)
    return {k: v / n for k, v in totals.items()}


def importance_sampled_images(model, images, k, batch_size, seed):
    """``VAE.importance_bounds`` over uint8 images in batches: per image, ``({j: L_j}, elbo)`` as float64 arrays.

    Batch i draws its samples from ``rng((seed, IW_STREAM, i))``: every evaluation sees the same noise.
    """
    import numpy  # noqa: PLC0415
    from .data import Batches  # noqa: PLC0415

    bounds, elbos = {}, []
    for i, x in enumerate(Batches(images, batch_size, shuffle=False, drop_last=False).epoch(0)):
        b, elbo = model.importance_bounds(x, k, rng=backend.rng((seed, IW_STREAM, i)))
        for j, v in b.items():
            bounds.setdefault(j, []).append(v)
        elbos.append(elbo)
    return {j: numpy.concatenate(v) for j, v in bounds.items()}, numpy.concatenate(elbos)


def write_iw_bounds(path, bounds, elbo) -> None:
    """Write ``iw_bounds.csv``: per image, -ELBO and -L_k for each k, in nats (atomically)."""
    ks = sorted(bounds)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "neg_elbo_nats"] + [f"neg_L_{k}" for k in ks])
        for i in range(len(elbo)):
            w.writerow([i, repr(-float(elbo[i]))] + [repr(-float(bounds[k][i])) for k in ks])
    os.replace(tmp, path)


def read_iw_bounds(path):
    """``iw_bounds.csv`` back: ``(ks, -ELBO (n,), -L (n, len(ks)))`` as NumPy arrays, or None if there is none."""
    import numpy  # noqa: PLC0415

    rows = read_csv(path)
    if not rows:
        return None
    ks = [int(c[len("neg_L_"):]) for c in rows[0] if c.startswith("neg_L_")]
    neg_elbo = numpy.array([float(r["neg_elbo_nats"]) for r in rows])
    neg_l = numpy.array([[float(r[f"neg_L_{k}"]) for k in ks] for r in rows])
    return ks, neg_elbo, neg_l


def _mean_bounds(path):
    # {"k": mean -L_k} and the -ELBO over the images of iw_bounds.csv, for summary.json
    ks, neg_elbo, neg_l = read_iw_bounds(path)
    return {"elbo": float(neg_elbo.mean()), **{str(k): float(neg_l[:, j].mean()) for j, k in enumerate(ks)}}


# ---- Ctrl-C --------------------------------------------------------------------------------------------------

class _DeferredInterrupt:
    """Turn the first Ctrl-C into a request to stop after the current update; a second one stops at once.

    An update interrupted half way (some parameters stepped, others not) must never reach a checkpoint,
    so the loop checks ``requested`` only between updates.
    """

    def __init__(self):
        self.requested = False
        self.installed = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C raises KeyboardInterrupt as usual

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
            self.installed = True
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGINT, self.previous)


# ---- the loop ------------------------------------------------------------------------------------------------

def _say(message):
    """Print a line without breaking the progress bar."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    tqdm.write(message)


def train(config: TrainConfig) -> dict:
    """Run (or resume) the training run ``config`` describes; returns the summary also saved as summary.json.

    Raises ConfigError (bad options, run folder taken, checkpoint mismatch), data.DataError (bad data),
    NonFiniteLoss (NaN/Inf loss: the last good checkpoint is kept) or Interrupted (Ctrl-C: checkpoint written).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415
    from .data import DEVICE_SHARE, Batches, keep_on_device  # noqa: PLC0415

    started = time.perf_counter()
    cfg = config.resolved()
    try:
        backend.set_device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    out = prepare_out_dir(cfg.out, resume=cfg.resume, force=cfg.force, clear=False)  # refuse early, delete late
    ckpt_path = out / CHECKPOINT
    stored = load_checkpoint(ckpt_path) if cfg.resume else None
    if stored is not None:  # refuse a mismatched checkpoint before spending time on the data
        differ = config_differences(stored["meta"]["train_config"], dataclasses.asdict(cfg))
        if differ:
            raise ConfigError(f"the checkpoint in {out} was made with other options, so it cannot be resumed "
                              f"with these: {'; '.join(differ)}. Use the run's options, or --out DIR for a new run")

    dataset = load_data(cfg)
    _say(f"data: {dataset.source}")
    train_images = keep_on_device(dataset.train.images)  # on a GPU, when it fits: no host work per batch
    if backend.device_name() == "gpu":
        size = f"{len(train_images):,} training images ({train_images.nbytes / 2**20:,.1f} MB)"
        _say(f"data: the {size} are kept on the GPU" if backend.is_device_array(train_images) else
             f"data: the {size} stay on the host (more than {DEVICE_SHARE:.0%} of the GPU's free memory, or no "
             "room for the copy): each batch is gathered there and copied over")
    batches = Batches(train_images, cfg.batch_size, shuffle=True, seed=cfg.seed)
    per_epoch = len(batches)
    total = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.epochs * per_epoch, cfg.max_steps)
    valid = dataset.valid.images if cfg.eval_images is None else dataset.valid.images[: cfg.eval_images]
    iw_valid = dataset.valid.images[: cfg.iw_images]
    heldout = backend.to_host(dataset.valid.images[:HELDOUT_IMAGES]).copy()

    # --force deletes the old run only now, when the data has loaded: a mistyped option cannot cost a run
    prepare_out_dir(out, resume=cfg.resume, force=cfg.force)
    model = build_model(cfg)
    optimizer = Adam(model, lr=cfg.lr)
    step, train_seconds = 0, 0.0
    log_rows, eval_rows = [], []
    if stored is not None:
        model.load_state_dict(stored["model"])
        optimizer.load_state_dict(stored["optim"])
        if optimizer.lr != cfg.lr:
            _say(f"lr changed on resume: {optimizer.lr!r} -> {cfg.lr!r}")
            optimizer.lr = cfg.lr
        step, train_seconds = stored["meta"]["step"], stored["meta"]["train_seconds"]
        # Rows written after the checkpoint (a crash, or a NaN) are replayed, so they are dropped here.
        log_rows = [r for r in read_csv(out / LOG) if int(r["step"]) <= step]
        eval_rows = [r for r in read_csv(out / EVAL) if int(r["step"]) <= step]
        _say(f"resuming {out} at step {step} (epoch {step // per_epoch + 1}, batch {step % per_epoch})")
    log = CsvLog(out / LOG, LOG_FIELDS, log_rows)
    evals = CsvLog(out / EVAL, EVAL_FIELDS, eval_rows)
    last_eval = {k: float(v) if v != "" else None for k, v in eval_rows[-1].items()} if eval_rows else None
    _say(f"model: preset {cfg.preset}, latent {cfg.latent_dim}, {model.num_parameters():,} parameters, "
         f"{backend.device_name()}; {per_epoch} batches of {cfg.batch_size} per epoch, {total} steps")
    if step >= total:
        _say(f"nothing to train: the run is at step {step}, and these options stop at step {total}")

    def checkpoint(at_step):
        epoch, batch = divmod(at_step, per_epoch)
        meta = {"format": CHECKPOINT_FORMAT, "version": __version__, "step": at_step, "epoch": epoch,
                "batch_in_epoch": batch, "steps_per_epoch": per_epoch, "seed": cfg.seed,
                "train_seconds": train_seconds + time.perf_counter() - loop_start,
                "rng": {"noise": f"backend.rng(({cfg.seed}, {NOISE_STREAM}, step)) for update step (1-based)",
                        "batches": f"Batches(train, {cfg.batch_size}, seed={cfg.seed}).epoch(epoch, start=batch)",
                        "eval": f"backend.rng(({cfg.seed}, {EVAL_STREAM}, i)) for validation batch i"},
                "train_config": dataclasses.asdict(cfg), "data_source": dataset.source}
        save_checkpoint(ckpt_path, model, optimizer, meta, {"heldout/images": heldout})
        return at_step

    def evaluate(at_step):
        model.beta = cfg.beta  # held-out losses at the run's beta, whatever the warm-up (each update sets its own)
        metrics = evaluate_images(model, valid, cfg.batch_size, cfg.seed)
        row = {"step": at_step, "epoch": round(at_step / per_epoch, 4), **metrics}
        # the importance-sampled -log p(x): k = --iw-samples at the end, a cheap IW_EPOCH_SAMPLES before
        k = cfg.iw_samples if at_step >= total else min(IW_EPOCH_SAMPLES, cfg.iw_samples)
        if k:
            tick = time.perf_counter()
            bounds, elbo = importance_sampled_images(model, iw_valid, k, cfg.batch_size, cfg.seed)
            row.update({"iw_k": k, "iw_images": len(elbo), "iw_neg_elbo_nats": -float(elbo.mean()),
                        "neg_log_px_nats": -float(bounds[k].mean()), "elbo_gap_nats": float((bounds[k] - elbo).mean())})
            seconds = round(time.perf_counter() - tick, 2)
            if at_step >= total:
                write_iw_bounds(out / IW_BOUNDS, bounds, elbo)
        evals.write(row)
        if k:  # the cost goes to the screen and summary.json, not eval.csv: a resumed run must write the same rows
            row["iw_seconds"] = seconds
        _say(f"step {at_step} (epoch {row['epoch']:g}) held-out: -ELBO {metrics['neg_elbo_nats']:.2f} nats/image "
             f"= {metrics['bits_per_dim']:.4f} bits/dim, recon {metrics['recon']:.2f}, KL {metrics['kl']:.2f}, "
             f"MSE {metrics['mse']:.5f}")
        if k:
            _say(f"  on {row['iw_images']} of them, {k} samples of q(z|x) each: -log p(x) <= -L_{k} = "
                 f"{row['neg_log_px_nats']:.2f} nats/image, -ELBO {row['iw_neg_elbo_nats']:.2f}, gap L_{k} - ELBO "
                 f"{row['elbo_gap_nats']:.2f} ({row['iw_seconds']:.1f} s)")
        return row

    loop_start = time.perf_counter()
    saved, updating, bar = None, False, None
    try:
        with _DeferredInterrupt() as interrupt:
            saved = checkpoint(step) if stored is None else step  # step 0 saved: a NaN at once still leaves one
            if interrupt.requested and step < total:
                raise KeyboardInterrupt
            while step < total:
                epoch, start = divmod(step, per_epoch)
                bar = tqdm(total=per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                           disable=not cfg.progress, dynamic_ncols=True, leave=True)
                smooth = {}
                tick = time.perf_counter()
                for x in batches.epoch(epoch, start=start):
                    updating = True
                    model.beta = warmup_beta(step + 1, cfg.beta, cfg.beta_warmup)  # the KL weight of this update
                    variance = decoder_variance(model)  # s^2 in force for this update (it changes when learned)
                    try:
                        logs = model.train_step(x, optimizer, rng=backend.rng((cfg.seed, NOISE_STREAM, step + 1)))
                    except NonFiniteLossError as e:
                        raise NonFiniteLoss(
                            f"non-finite loss at step {step + 1} (epoch {epoch + 1}): {e}\nThe last good checkpoint "
                            f"(step {saved}) is kept in {ckpt_path}. Continue from it with a lower learning rate, "
                            f"e.g. --resume --lr {cfg.lr / 10:g}", step) from None
                    step += 1  # before clearing `updating`: a Ctrl-C in between must not lose the update's count
                    updating = False
                    rate = len(x) / max(time.perf_counter() - tick, 1e-9)  # data fetch + update
                    log.write({"step": step, "epoch": epoch + 1, **{k: logs[k] for k in ("recon", "kl", "loss")},
                               "lr": float(optimizer.lr), "images_per_s": round(rate, 2), "beta": model.beta,
                               "decoder_variance": variance})
                    for k, v in (("img/s", rate), ("recon", logs["recon"]), ("kl", logs["kl"])):
                        smooth[k] = v if k not in smooth else 0.9 * smooth[k] + 0.1 * v
                    bar.set_postfix({k: f"{v:.1f}" if k == "img/s" else f"{v:.4g}" for k, v in smooth.items()},
                                    refresh=False)
                    bar.update(1)
                    epoch_done = step % per_epoch == 0
                    if epoch_done or step == total:
                        bar.close()
                        last_eval = evaluate(step)
                    if epoch_done or step == total or step % cfg.checkpoint_every == 0 or interrupt.requested:
                        saved = checkpoint(step)
                    if step == total:  # done: a Ctrl-C during the last evaluation has nothing left to stop
                        break
                    if interrupt.requested:
                        raise KeyboardInterrupt
                    tick = time.perf_counter()  # evaluations and checkpoints do not count against images/s
                bar.close()
            if last_eval is None or int(last_eval["step"]) != step:  # a finished run resumed, its eval.csv lost
                last_eval = evaluate(step)
    except KeyboardInterrupt:
        if saved is None:  # a second Ctrl-C while the step-0 checkpoint was written (atomically: all or nothing)
            raise Interrupted(f"interrupted before training began; {ckpt_path} "
                              f"{'was written' if ckpt_path.exists() else 'was not written'}, nothing was trained. "
                              f"Run the same command again to start", step) from None
        if not updating and saved != step:
            saved = checkpoint(step)
        where = f" (inside update {step + 1}, which is discarded)" if updating else ""
        raise Interrupted(f"interrupted at step {step}{where}; checkpoint of step {saved} in {ckpt_path}. "
                          f"Continue with the same options plus --resume", step) from None
    finally:
        if bar is not None:
            bar.close()  # before the caller prints why training stopped
        log.close()
        evals.close()

    wall = time.perf_counter() - started
    summary = {"steps": step, "epochs": round(step / per_epoch, 4), "wall_seconds": round(wall, 2),
               "train_seconds_total": round(train_seconds + time.perf_counter() - loop_start, 2),
               "device": backend.device_name(), "data": dataset.source,
               "final_eval": {k: v for k, v in last_eval.items() if k not in ("step", "epoch")},
               "neg_log_px_by_k": _mean_bounds(out / IW_BOUNDS) if last_eval.get("iw_k") else None,
               "config": dataclasses.asdict(cfg)}
    tmp = out / f"{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / SUMMARY)
    return summary
