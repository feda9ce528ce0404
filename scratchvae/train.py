"""The training loop: data, model and optimiser; a per-step log; a held-out evaluation per epoch; checkpoints.

``train(TrainConfig(...))`` runs (or resumes) one training run and writes into its folder ``config.out``:

* ``log.csv``        one row per update: step, epoch, recon, kl, loss, lr, the beta in force (KL warm-up), the
  decoder variance s^2, images_per_s (flushed as it goes);
* ``eval.csv``       one row per held-out evaluation on the validation split (end of every epoch, end of run):
  -ELBO in nats per image and in bits per dimension, recon, KL, loss, per-pixel MSE; and on the first
  ``iw_images`` of them the importance-sampled -log p(x) estimate -L_k with k = ``IW_EVAL_SAMPLES``, the -ELBO
  from the same samples and the gap L_k - ELBO;
* ``iw_bounds.csv``  at the end, with k = ``iw_samples``: per image, -ELBO and -L_j for j = 1, 2, 4, ..., k;
* ``checkpoint.npz`` everything needed to continue exactly (see ``save_checkpoint``); ``VAE.load`` reads it too;
* ``summary.json``   the final numbers of the run (the bound of ``iw_bounds.csv`` under "importance_sampled").

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
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import __version__, backend
from .backend import array_module
from .vae import ENGINES, PRESETS, RECONSTRUCTIONS, VAE, NonFiniteLossError

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
LOG_FIELDS = ("step", "epoch", "recon", "kl", "loss", "lr", "beta", "decoder_variance", "images_per_s")
EVAL_FIELDS = ("step", "epoch", "neg_elbo_nats", "bits_per_dim", "recon", "kl", "loss", "mse")  # VAE.evaluate's
IW_FIELDS = ("iw_k", "iw_images", "iw_neg_elbo_nats", "neg_log_px_nats", "elbo_gap_nats")  # the bound's
EVAL_COLUMNS = EVAL_FIELDS + IW_FIELDS  # eval.csv
# columns that may be empty (no importance-sampled bound at that evaluation; no s^2 for a Bernoulli decoder),
# or absent from a log written before they existed
OPTIONAL_FIELDS = ("beta", "decoder_variance") + IW_FIELDS
IW_EVAL_SAMPLES = 4  # k of the bound in every eval.csv row: a cheap trend (the run's end adds --iw-samples)
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
# batches. The others (epochs, max_steps, lr, device, engine, checkpoint_every, ...) may change on resume.
MUST_MATCH = ("data", "limit", "image_size", "preset", "latent_dim", "recon", "recon_variance", "beta",
              "mc_samples", "objective", "seed", "batch_size", "resample", "beta_warmup")
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
    """The run diverged: a NaN or Inf in the loss, the updated parameters, the optimiser's state, BatchNorm's
    statistics or the held-out -ELBO. The last good checkpoint (all finite) was kept, not overwritten."""

    exit_code = 3


class CannotContinue(TrainingStopped):
    """The machine refused: a run file could not be written (disk full, read-only) or memory ran out.
    The last checkpoint is intact; the run resumes once the cause is removed."""

    exit_code = 2


class Interrupted(TrainingStopped):
    """Ctrl-C: the checkpoint was written (when the model was in a consistent state) and the run can resume."""

    exit_code = 130  # the shell's convention for "killed by SIGINT"


class Terminated(Interrupted):
    """SIGTERM (``kill``, a batch system's time limit): handled as Ctrl-C is."""

    exit_code = 143  # 128 + SIGTERM


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
    engine: str = "fast"             # 'fast' or 'reference' (the textbook layers: the same numbers, slower)
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
        if c.data is not None and not str(c.data).strip():
            raise ConfigError("--data is empty: give the CelebA location, or leave --data out to use the built-in "
                              "faces")
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
        need(self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
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
        need_bytes, available = memory_needed(self), physical_memory()
        need(available is None or need_bytes <= available,
             f"these options need about {need_bytes / 1e9:,.1f} GB of memory (the parameters with their gradients "
             f"and Adam's moments, and one batch's activations), more than this machine's {(available or 0) / 1e9:,.1f}"
             f" GB: use a smaller --latent-dim (now {self.latent_dim}), --mc-samples (now {self.mc_samples}), "
             f"--batch-size (now {self.batch_size}) or --image-size (now {self.image_size})")


# ---- the run folder ------------------------------------------------------------------------------------------

def prepare_out_dir(out, resume=False, force=False, clear=True) -> Path:
    """Make the run folder ready: refuse to touch a non-empty one unless resuming or forced; returns its Path.

    ``force`` deletes only the files a run writes (``RUN_FILES``), never anything else found there; with
    ``clear=False`` nothing is deleted or created, the folder is only checked.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if not clear:
        check_writable(out)
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


def check_writable(out) -> None:
    """Raise ConfigError unless files can be made in the run folder ``out`` (or, when it does not exist yet, in
    the folder that will hold it): found out by making and deleting an empty file, since the mode bits say
    nothing to root and nothing about a read-only file system."""
    out = Path(out)
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if base.exists() and not base.is_dir():
        raise ConfigError(f"--out {out} cannot be made: {base} is a file, not a folder; pass --out DIR elsewhere")
    probe = base / f".scratchvae-write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write in {base} ({e.strerror or e}), so the run's checkpoint and logs could not be "
                          "saved: pass --out DIR on a writable disk (a read-only file system, or no permission?)"
                          ) from None


def remove_stale_temporaries(out) -> list:
    """Delete the temporary files a killed run left in ``out`` (a checkpoint's or a figure's ``.tmp-PID`` whose
    process is gone, a log's ``.tmp``); returns their names."""
    removed = []
    for path in sorted(Path(out).glob("*.tmp*")):
        base, _, pid = path.name.partition(".tmp")
        if base not in OUTPUTS or (pid and not (pid.startswith("-") and pid[1:].isdigit())):
            continue  # not a file a run writes
        if pid:
            try:
                os.kill(int(pid[1:]), 0)
                continue  # a live process is writing it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's live process
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


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
               objective=cfg.objective, seed=cfg.seed, engine=cfg.engine)


def memory_needed(cfg: TrainConfig) -> int:
    """A rough lower bound on the bytes a training step of ``cfg`` (resolved) holds: the parameters four times
    (values, gradients, Adam's two moments) and a batch's activations with their gradients, in float32."""
    channels, size, d = PRESETS[cfg.preset]["channels"], cfg.image_size, cfg.latent_dim
    sides = [size // 2 ** (i + 1) for i in range(len(channels))]
    features = channels[-1] * sides[-1] ** 2
    convs = sum(9 * a * b for a, b in zip((3,) + tuple(channels), channels))
    params = 2 * convs + 3 * features * d
    encoder = sum(c * s * s for c, s in zip(channels, sides))  # numbers per image after each encoder layer
    decoder = encoder + 3 * size * size + d  # the decoder mirrors it, per latent sample
    activations = cfg.batch_size * (encoder + cfg.mc_samples * decoder)
    return 4 * (4 * params + 4 * activations)  # each activation: layer output, BatchNorm, LeakyReLU, gradient


def physical_memory():
    """Bytes of RAM of this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


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
    """Read a checkpoint: ``{"meta": dict, "config": dict, "model": {...}, "optim": {...}, "arrays": all}``.

    Raises ConfigError, saying what is wrong, for a file that is damaged (truncated, overwritten, not an .npz)
    or is not a training checkpoint of this version.
    """
    damaged = ("; the file is damaged (a copy cut short, or overwritten?). Start over with --force (which replaces "
               "it), or --out DIR for a new run")
    try:
        arrays = backend.load_npz(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (zipfile, zlib and NumPy raise a dozen types for damaged files)
        raise ConfigError(f"cannot read the checkpoint {path} ({_reason(e)}){damaged}") from None
    if "meta" not in arrays or "config" not in arrays:
        raise ConfigError(f"{path} is not a training checkpoint (no 'meta'); it may be a model saved with VAE.save")
    try:
        meta, config = json.loads(str(arrays["meta"])), json.loads(str(arrays["config"]))
    except ValueError as e:
        raise ConfigError(f"the checkpoint {path} has an unreadable 'meta' or 'config' entry ({e}){damaged}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ConfigError(f"{path} has checkpoint format {got}, this version reads {CHECKPOINT_FORMAT}")
    lacking = [k for k in ("step", "train_config", "seed", "train_seconds") if k not in meta]
    if (lacking or not isinstance(config, dict) or not isinstance(meta["train_config"], dict)
            or not isinstance(meta["step"], int) or meta["step"] < 0):
        raise ConfigError(f"the checkpoint {path} has an incomplete 'meta' entry "
                          f"(lacking {', '.join(lacking) or 'valid values'}){damaged}")
    return {"meta": meta, "config": config, "arrays": arrays,
            "model": {k[6:]: v for k, v in arrays.items() if k.startswith("model/")},
            "optim": {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}}


def _reason(error) -> str:
    """An exception in a few words: its message, or its type when it has none."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fields)
                w.writeheader()
                w.writerows(rows or [])
            os.replace(tmp, path)
        finally:  # a full disk must not leave a half-written copy behind (the old file is untouched)
            if os.path.exists(tmp):
                os.remove(tmp)
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fields)

    def write(self, row) -> None:
        """Append one row; floats are written with repr, which round-trips exactly."""
        self.writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        """Close the file (rows already written are on disk; a row a full disk refused is dropped)."""
        try:
            self.file.close()
        except OSError:
            pass  # the flush of a row that did not fit: the write already reported it


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


def read_log(path, fields) -> tuple:
    """The rows of a run's CSV log whose fields are all numbers (``OPTIONAL_FIELDS`` may also be empty, or absent
    from an older log), and a list of the lines dropped (with why).

    A log is the user's record, and a power loss or a full disk can leave it with a cut-off last row, a tail of
    NUL bytes, or garbage: every readable row is kept (as a dict of strings over ``fields``), and the rest are
    named so that the caller can say which. A missing file has no rows and drops nothing.
    """
    if not os.path.exists(path):
        return [], []
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = next(csv.reader([lines[0].rstrip("\r").replace("\0", "")]), []) if lines else []
    lacking = [k for k in fields if k not in header and k not in OPTIONAL_FIELDS]
    if lacking:
        return [], [f"{Path(path).name} has no columns {', '.join(lacking)} (its header is {lines[0][:60]!r}): "
                    f"none of its {max(len(lines) - 1, 0)} rows can be used"] if lines else []
    rows, dropped = [], []
    for number, line in enumerate(lines[1:], 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # a blank line holds no row to lose
        values = next(csv.reader([line.replace("\0", "")]), []) if "\0" not in line else None
        row = dict(zip(header, values)) if values is not None and len(values) == len(header) else None
        if row is None or not all(_is_number(row[k]) if k in row and (row[k] or k not in OPTIONAL_FIELDS)
                                  else k in OPTIONAL_FIELDS for k in fields) or not row["step"].isdigit():
            dropped.append(number)
            continue
        rows.append({k: row.get(k, "") for k in fields})
    if dropped:
        shown = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        example = lines[dropped[0] - 1][:40].replace("\0", "\\0")
        dropped = [f"{Path(path).name}: dropped {len(dropped)} unreadable line(s) (line {shown}; e.g. {example!r}), "
                   f"kept the {len(rows)} good row(s)"]
    return rows, dropped


def _is_number(text) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


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


def summarise_iw_bounds(path, seconds=None):
    """summary.json's account of ``iw_bounds.csv``: k, the images, their mean -ELBO, -L_k and gap, -L_j for every j
    (nats per image), and the seconds the evaluation took when measured in this session; None without the file."""
    found = read_iw_bounds(path)
    if found is None:
        return None
    ks, neg_elbo, neg_l = found
    return {"k": ks[-1], "images": len(neg_elbo), "neg_elbo_nats": float(neg_elbo.mean()),
            "neg_log_px_nats": float(neg_l[:, -1].mean()), "elbo_gap_nats": float((neg_elbo - neg_l[:, -1]).mean()),
            "neg_log_px_by_k": {str(k): float(neg_l[:, j].mean()) for j, k in enumerate(ks)}, "seconds": seconds}


# ---- the run's health --------------------------------------------------------------------------------------

def non_finite_state(model, optimizer) -> list:
    """The names of the parameters, buffers and optimiser moments that hold a NaN or an Inf; [] when all are finite.

    Cheap when all is well: one sum per array (a NaN or Inf anywhere makes the sum NaN or Inf) and one transfer;
    only when a sum is not finite (or overflowed) is every array looked at, to name the bad ones.
    """
    total = 0.0
    for a in model.state_arrays() + optimizer.state_arrays():
        total = total + a.sum()
    if math.isfinite(backend.to_float(total)):
        return []
    bad = [n for n, p, _ in model.named_parameters() if not bool(array_module(p).isfinite(p).all())]
    bad += [n for n, b in model.named_buffers() if not bool(array_module(b).isfinite(b).all())]
    bad += [f"optimiser {k}" for k, a in optimizer.state_dict().items()
            if hasattr(a, "shape") and not bool(array_module(a).isfinite(a).all())]
    return bad


def _names(bad) -> str:
    return ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")


def data_fingerprint(dataset) -> dict:
    """What a checkpoint records of its data, so that a resume on other data is refused: per split the number
    of images and, for CelebA, the first and last file names and a digest of all of them."""
    out = {}
    for split, images in dataset.splits.items():
        entry = {"images": len(images)}
        names = getattr(images, "names", None)
        if names is not None and len(names):
            entry.update(first=str(names[0]), last=str(names[-1]),
                         digest=hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()[:16])
        out[split] = entry
    return out


def data_differences(stored: dict, now: dict) -> list:
    """How the data recorded in a checkpoint (``data_fingerprint``) differs from the data now, split by split."""
    out = []
    for split in ("train", "valid", "test"):
        a, b = stored.get(split, {}), now.get(split, {})
        if a == b:
            continue
        files = (f" (files {a.get('first')} .. {a.get('last')} vs {b.get('first')} .. {b.get('last')})"
                 if "first" in a or "first" in b else "")
        if a.get("images") != b.get("images"):
            out.append(f"{split}: {a.get('images')} images (checkpoint) vs {b.get('images')} (now){files}")
        else:
            out.append(f"{split}: {a.get('images')} images, but other files{files}")
    return out


def _json_safe(value):
    """``value`` with every NaN or Inf float replaced by None, so that json.dumps writes standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _keep_damaged_copy(path) -> Path:
    """Copy a damaged log aside (``log.csv.damaged``, or ``-2``, ``-3``...) before it is rewritten; returns the copy."""
    path = Path(path)
    copy, n = path.with_name(path.name + ".damaged"), 1
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.damaged-{n}")
    shutil.copy2(path, copy)
    return copy


# ---- Ctrl-C and SIGTERM -------------------------------------------------------------------------------------

class _DeferredInterrupt:
    """Turn the first Ctrl-C (or SIGTERM) into a request to stop after the current update; a second one stops at once.

    An update interrupted half way (some parameters stepped, others not) must never reach a checkpoint,
    so the loop checks ``requested`` (the signal's number, or 0) only between updates.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = 0
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = signum
        signal.signal(signum, self.previous[signum])  # a second one acts as usual: KeyboardInterrupt, or the end

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ---- the loop ------------------------------------------------------------------------------------------------

def _say(message):
    """Print a line without breaking the progress bar."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    tqdm.write(message)


def train(config: TrainConfig) -> dict:
    """Run (or resume) the training run ``config`` describes; returns the summary also saved as summary.json.

    Raises ConfigError (bad options, run folder taken or not writable, checkpoint damaged or made with other
    options or data), data.DataError (bad data), NonFiniteLoss (the run diverged: the last good checkpoint is
    kept), CannotContinue (disk full, memory exhausted: the last checkpoint is kept) or Interrupted (Ctrl-C,
    SIGTERM: checkpoint written).
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
    fingerprint = data_fingerprint(dataset)
    if stored is not None:
        if "data" not in stored["meta"]:
            _say("the checkpoint does not record its data (an older version wrote it): resuming without checking it")
        elif differ := data_differences(stored["meta"]["data"], fingerprint):
            raise ConfigError(f"the data changed since the checkpoint in {out} was written, so the run cannot resume "
                              f"exactly (other batches, another validation split): {'; '.join(differ)}. Put the "
                              "data back as it was, or start a new run with --force or --out DIR")
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

    step, saved, train_seconds = 0, None, 0.0

    def kept():
        """What the failure left behind, in words."""
        if saved is None and stored is None:
            return "nothing was trained"
        return (f"the checkpoint of step {step if saved is None else saved} in {ckpt_path} is intact: continue "
                "with --resume once the cause is removed")

    def guarded(what, fn, *args):
        """``fn(*args)``, with an OSError (a full disk, a read-only folder) turned into CannotContinue."""
        try:
            return fn(*args)
        except OSError as e:
            raise CannotContinue(f"cannot write {what} in {out} ({e.strerror or _reason(e)}): free some space, or "
                                 f"make the folder writable; {kept()}", step) from None

    try:
        model = build_model(cfg)
        optimizer = model.make_optimizer(lr=cfg.lr)
    except MemoryError as e:
        raise CannotContinue(f"out of memory building the model ({_reason(e)}): these options need about "
                             f"{memory_needed(cfg) / 1e9:,.1f} GB; use a smaller --latent-dim, --batch-size or "
                             f"--mc-samples; {kept()}", 0) from None
    log_rows, eval_rows = [], []
    if stored is not None:
        try:
            model.load_state_dict(stored["model"])
            optimizer.load_state_dict(stored["optim"])
            step, train_seconds = int(stored["meta"]["step"]), float(stored["meta"]["train_seconds"])
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"the checkpoint {ckpt_path} does not fit the model its options describe "
                              f"({_reason(e)}); it is damaged: start over with --force, or --out DIR for a new run"
                              ) from None
        if bad := non_finite_state(model, optimizer):
            raise ConfigError(f"the checkpoint {ckpt_path} holds NaN or Inf values ({_names(bad)}): it was written "
                              "after the run had diverged (by an older version) and cannot be resumed; start over "
                              f"with --force and a lower --lr than {optimizer.lr:g}")
        if optimizer.lr != cfg.lr:
            _say(f"lr changed on resume: {optimizer.lr!r} -> {cfg.lr!r}")
            optimizer.lr = cfg.lr
    # --force deletes the old run only now, when the data has loaded and the model is built: a mistyped option
    # cannot cost a run
    guarded("the run folder", prepare_out_dir, out, cfg.resume, cfg.force)
    for name in remove_stale_temporaries(out):
        _say(f"removed {out / name}, left by a run that was killed while writing it")
    if stored is not None:
        # Rows written after the checkpoint (a crash, or a NaN) are replayed, so they are dropped here; damaged
        # rows are dropped too, and said so, and the log as it was is kept beside it.
        for name, fields, rows in ((LOG, LOG_FIELDS, log_rows), (EVAL, EVAL_COLUMNS, eval_rows)):
            good, dropped = read_log(out / name, fields)
            rows += [r for r in good if int(r["step"]) <= step]
            if dropped:
                copy = guarded(f"a copy of {name}", _keep_damaged_copy, out / name)
                _say(f"{'; '.join(dropped)}; the log as it was is kept as {copy.name}")
        _say(f"resuming {out} at step {step} (epoch {step // per_epoch + 1}, batch {step % per_epoch})")
    log = guarded(LOG, CsvLog, out / LOG, LOG_FIELDS, log_rows)
    try:
        evals = guarded(EVAL, CsvLog, out / EVAL, EVAL_COLUMNS, eval_rows)
    except CannotContinue:
        log.close()
        raise
    # (the importance-sampled columns are empty where that evaluation had none)
    last_eval = {k: float(v) for k, v in eval_rows[-1].items() if v != ""} if eval_rows else None
    if last_eval is not None and not all(map(math.isfinite, last_eval.values())):
        last_eval = None  # a NaN row an older version wrote: evaluated again at the end
    _say(f"model: preset {cfg.preset}, latent {cfg.latent_dim}, {model.num_parameters():,} parameters, "
         f"{backend.device_name()}; {per_epoch} batches of {cfg.batch_size} per epoch, {total} steps")
    if step >= total:
        _say(f"nothing to train: the run is at step {step}, and these options stop at step {total}")

    def checkpoint(at_step):
        if bad := non_finite_state(model, optimizer):  # never reached after the per-step check; never saved either
            raise NonFiniteLoss(f"the model's state at step {at_step} is not finite ({_names(bad)}); it was not "
                                f"saved, {kept()}", at_step)
        epoch, batch = divmod(at_step, per_epoch)
        meta = {"format": CHECKPOINT_FORMAT, "version": __version__, "step": at_step, "epoch": epoch,
                "batch_in_epoch": batch, "steps_per_epoch": per_epoch, "seed": cfg.seed,
                "train_seconds": train_seconds + time.perf_counter() - loop_start,
                "rng": {"noise": f"backend.rng(({cfg.seed}, {NOISE_STREAM}, step)) for update step (1-based)",
                        "batches": f"Batches(train, {cfg.batch_size}, seed={cfg.seed}).epoch(epoch, start=batch)",
                        "eval": f"backend.rng(({cfg.seed}, {EVAL_STREAM}, i)) for validation batch i"},
                "train_config": dataclasses.asdict(cfg), "data_source": dataset.source, "data": fingerprint}
        guarded(f"the checkpoint of step {at_step}", save_checkpoint, ckpt_path, model, optimizer, meta,
                {"heldout/images": heldout})
        return at_step

    def evaluate(at_step):
        model.beta = cfg.beta  # held-out losses at the run's beta, whatever the warm-up (each update sets its own)
        metrics = evaluate_images(model, valid, cfg.batch_size, cfg.seed)
        if not all(math.isfinite(v) for v in metrics.values()):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            raise NonFiniteLoss(f"the run diverged: the held-out evaluation at step {at_step} is not finite ({shown})"
                                f", although the training loss was. The last good checkpoint (step {saved}) is kept "
                                f"in {ckpt_path}; continue from it with a lower learning rate, e.g. --resume --lr "
                                f"{cfg.lr / 10:g}", at_step)
        row = {"step": at_step, "epoch": round(at_step / per_epoch, 4), **metrics}
        _say(f"step {at_step} (epoch {row['epoch']:g}) held-out: -ELBO {metrics['neg_elbo_nats']:.2f} nats/image "
             f"= {metrics['bits_per_dim']:.4f} bits/dim, recon {metrics['recon']:.2f}, KL {metrics['kl']:.2f}, "
             f"MSE {metrics['mse']:.5f}")
        # the importance-sampled -log p(x) on the first --iw-images: in every row with the same cheap k, so that the
        # rows do not depend on where the run ends (a resumed or extended run writes the same ones) ...
        if k := min(IW_EVAL_SAMPLES, cfg.iw_samples):
            bounds, elbo, seconds = iw_evaluation(k)
            row.update({"iw_k": k, "iw_images": len(elbo), "iw_neg_elbo_nats": -float(elbo.mean()),
                        "neg_log_px_nats": -float(bounds[k].mean()), "elbo_gap_nats": float((bounds[k] - elbo).mean())})
        guarded(EVAL, evals.write, row)
        # ... and at the end with --iw-samples, per image into iw_bounds.csv (the figure) and into summary.json
        if at_step >= total and cfg.iw_samples:
            bounds, elbo, final_iw["seconds"] = iw_evaluation(cfg.iw_samples)
            guarded(IW_BOUNDS, write_iw_bounds, out / IW_BOUNDS, bounds, elbo)
        elif at_step >= total and (out / IW_BOUNDS).exists():
            (out / IW_BOUNDS).unlink()  # a stale one, from before --iw-samples 0
        return row

    def iw_evaluation(k):
        tick = time.perf_counter()
        bounds, elbo = importance_sampled_images(model, iw_valid, k, cfg.batch_size, cfg.seed)
        seconds = round(time.perf_counter() - tick, 2)
        _say(f"  on {len(elbo)} of them, {k} samples of q(z|x) each: -log p(x) <= -L_{k} = {-bounds[k].mean():.2f} "
             f"nats/image, -ELBO {-elbo.mean():.2f}, gap L_{k} - ELBO {(bounds[k] - elbo).mean():.2f} ({seconds:.1f} s)")
        return bounds, elbo, seconds

    final_iw = {"seconds": None}

    loop_start = time.perf_counter()
    updating, bar = False, None
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
                        raise NonFiniteLoss(f"non-finite loss at step {step + 1} (epoch {epoch + 1}): "
                                            f"{str(e).split(' Lower the learning rate')[0]}\nThe last good checkpoint "
                                            f"(step {saved}) is kept in {ckpt_path}. "
                                            + _loss_advice(cfg, step, saved), step) from None
                    if bad := non_finite_state(model, optimizer):  # a finite loss, but an update that overflowed
                        params = {name for name, _, _ in model.named_parameters()}
                        raise NonFiniteLoss(
                            f"the run diverged at step {step + 1} (epoch {epoch + 1}): its loss was finite "
                            f"({logs['loss']:.4g}) but the update made {_names(bad)} NaN or Inf. The last good "
                            f"checkpoint (step {saved}) is kept in {ckpt_path}. "
                            + _update_advice(cfg, step, saved, all(name in params for name in bad)), step)
                    step += 1  # before clearing `updating`: a Ctrl-C in between must not lose the update's count
                    updating = False
                    rate = len(x) / max(time.perf_counter() - tick, 1e-9)  # data fetch + update
                    guarded(LOG, log.write, {"step": step, "epoch": epoch + 1,
                                             **{k: logs[k] for k in ("recon", "kl", "loss")},
                                             "lr": float(optimizer.lr), "images_per_s": round(rate, 2),
                                             "beta": model.beta, "decoder_variance": variance})
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
        stopped = Terminated if interrupt.requested == signal.SIGTERM else Interrupted
        what = "terminated (SIGTERM)" if stopped is Terminated else "interrupted"
        if saved is None:  # a second Ctrl-C while the step-0 checkpoint was written (atomically: all or nothing)
            raise stopped(f"{what} before training began; {ckpt_path} "
                          f"{'was written' if ckpt_path.exists() else 'was not written'}, nothing was trained. "
                          f"Run the same command again to start", step) from None
        if not updating and saved != step:
            saved = checkpoint(step)
        where = f" (inside update {step + 1}, which is discarded)" if updating else ""
        raise stopped(f"{what} at step {step}{where}; checkpoint of step {saved} in {ckpt_path}. "
                      f"Continue with the same options plus --resume", step) from None
    except MemoryError as e:
        raise CannotContinue(f"out of memory at step {step + 1} ({_reason(e)}): these options need about "
                             f"{memory_needed(cfg) / 1e9:,.1f} GB by a rough count, more than is free; {kept()}, or "
                             "start over with a smaller --batch-size, --mc-samples or --latent-dim", step) from None
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
               "importance_sampled": summarise_iw_bounds(out / IW_BOUNDS, final_iw["seconds"]) if cfg.iw_samples
               else None,
               "config": dataclasses.asdict(cfg)}
    tmp = out / f"{SUMMARY}.tmp"
    try:
        guarded(SUMMARY, tmp.write_text, json.dumps(_json_safe(summary), indent=2, allow_nan=False))
        guarded(SUMMARY, os.replace, tmp, out / SUMMARY)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _update_advice(cfg, step, saved, only_parameters) -> str:
    """What to do after update ``step + 1`` made the state non-finite, the last checkpoint being of step ``saved``."""
    if saved < step or only_parameters:  # a smaller step from the checkpoint goes elsewhere
        return f"Continue from it with a lower learning rate, e.g. --resume --lr {cfg.lr / 10:g}"
    # the gradients (or BatchNorm's batch statistics) of the checkpoint's weights themselves overflowed:
    # they do not depend on the learning rate of the update that follows
    return (f"The gradients of the checkpoint's weights themselves overflow, so a lower learning rate cannot help "
            f"from it: start over with a lower --lr than {cfg.lr:g} (the same command with --force, or --out DIR)")


def _loss_advice(cfg, step, saved) -> str:
    """What to do after a non-finite loss at update ``step + 1``, the last checkpoint being of step ``saved``."""
    if saved is not None and saved < step:  # updates were made since the checkpoint: smaller ones may go elsewhere
        return f"Continue from it with a lower learning rate, e.g. --resume --lr {cfg.lr / 10:g}"
    weights = "the initial weights" if step == 0 else "the checkpoint's weights"
    variance = cfg.recon_variance if isinstance(cfg.recon_variance, str) else f"{cfg.recon_variance:g}"  # or learned
    scale = [f"--beta {cfg.beta:g}"] + ([f"--recon-variance {variance}"] if cfg.recon == "gaussian" else [])
    return (f"The loss is not finite for {weights} themselves, before any update, so a lower learning rate cannot "
            f"help: check the options that scale the loss ({', '.join(scale)}) and the data for NaN pixels. Those "
            "options must match on resume, so start a new run: the same command with --force, or --out DIR")
