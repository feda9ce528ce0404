"""Figures of a training run, drawn from its folder alone: ``log.csv``, ``eval.csv`` and ``checkpoint.npz``.

``plot_run(run_dir)`` writes, with the names users of the derivation expect (``vae_mse`` is the
reconstruction term, the squared error summed over pixels by default, whatever ``--recon`` is):

* ``vae_mse.png``        the reconstruction term per step, raw and smoothed, with the held-out values;
* ``vae_kld.png``        the KL term per step, likewise;
* ``vae_recons.png``     held-out images above their reconstructions (decodes of the posterior means);
* ``samples.png``        decodes of z ~ N(0, I);
* ``interpolation.png``  decodes along straight lines between held-out faces' posterior means;
* ``traversal.png``      the latent dimensions that carry the most KL, each varied alone;
* ``elbo_gap.png``       the importance-sampled bound -L_k against k, down from the -ELBO at k = 1, and the
  spread of the per-image gap L_k - ELBO (from ``iw_bounds.csv``; runs with ``--iw-samples`` > 0);
* ``decoder_variance.png`` the learned decoder variance s^2 per step beside the batch's per-pixel squared
  error, which is its optimum, and the beta = 2 s^2 it amounts to (runs with ``--recon-variance learned``).

``plot_comparison`` puts the samples and reconstructions of several runs side by side in one figure.

Matplotlib is used through ``Figure`` objects only (never ``pyplot``), so no window or display is ever
needed and nothing global changes: the Agg renderer draws straight to PNG.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from . import backend
from .train import (CHECKPOINT, EVAL, EVAL_FIELDS, IW_BOUNDS, LOG, LOG_FIELDS, SAMPLE_STREAM, SUMMARY, ConfigError,
                    _reason, load_checkpoint, read_iw_bounds, read_log)
from .vae import VAE, kl_per_dimension

log = logging.getLogger(__name__)

DPI = 100
RECON_LABELS = {
    "sse": "squared error per image, sum over pixels",
    "gaussian": "Gaussian -log p(x|z) per image (nats)",
    "bce": "Bernoulli -log p(x|z) per image (nats)",
}


def smooth(values, window=None):
    """A trailing running mean: at each step, the mean of the last ``window`` values (default: 2% of them, 1 to 200).

    Trailing rather than centred, so the smoothed curve never uses steps that come after the point drawn.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return values
    window = window or max(1, min(len(values) // 50 or 1, 200))
    cumsum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def _columns(rows, *names):
    """Float columns from CSV rows (dicts of strings)."""
    return [np.array([float(r[n]) for r in rows]) for n in names]


def plot_curve(path, steps, values, eval_steps, eval_values, title, ylabel, log_scale=True,
               label="per step (training batch)"):
    """One loss term per step, raw and smoothed, with held-out values as points (log scale if asked and all > 0)."""
    fig = Figure(figsize=(7, 4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label=label)
    ax.plot(steps, smooth(values), color="tab:blue", linewidth=1.8, label="smoothed (running mean)")
    if len(eval_steps):
        ax.plot(eval_steps, eval_values, "o-", color="tab:orange", markersize=4, label="held-out (validation)")
    if log_scale and len(values) and min(np.min(values), np.min(eval_values, initial=np.inf)) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step (update)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path):
    """Write ``fig`` to the PNG ``path`` through a temporary file and a rename, so that a full disk or a crash
    leaves the figure that was there whole; returns ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def image_grid(images, ncol, pad=2):
    """Images ``(n, 3, H, W)`` in [0, 1] tiled in rows of ``ncol`` with a white ``pad``: one ``(H', W', 3)`` array."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0, 1)
    n, _, h, w = images.shape
    nrow = math.ceil(n / ncol)
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), np.float32)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = img.transpose(1, 2, 0)
    return grid


def _show_grid(path, grid, title, scale=2, ylabels=None, cell=None):
    """Save an image grid at ``scale`` screen pixels per image pixel, with a title and optional row labels."""
    h, w = grid.shape[:2]
    left = 1.1 if ylabels else 0.1
    fig = Figure(figsize=(w * scale / DPI + left + 0.1, h * scale / DPI + 0.45), dpi=DPI)
    ax = fig.add_axes((left / fig.get_figwidth(), 0.05 / fig.get_figheight(),
                       w * scale / DPI / fig.get_figwidth(), h * scale / DPI / fig.get_figheight()))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    if ylabels:
        ax.set_yticks([cell[0] / 2 + 2 + i * (cell[0] + 2) for i in range(len(ylabels))], ylabels, fontsize=8)
        ax.tick_params(length=0)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(title, fontsize=10, y=1 - 0.04 / fig.get_figheight(), va="top")
    return save_figure(fig, path)


def plot_reconstructions(model, x, path, ncol=8, scale=2):
    """Held-out images (rows 1, 3, ...) above their reconstructions from the posterior means (rows 2, 4, ...)."""
    ncol = min(ncol, len(x))
    x = x[:len(x) // ncol * ncol]  # whole rows only, so every original sits right above its reconstruction
    recon = backend.to_host(model.reconstruct(x))
    x = backend.to_host(x)
    rows = []
    for i in range(0, len(x), ncol):
        rows += [x[i:i + ncol], recon[i:i + ncol]]
    h = x.shape[2]
    labels = ["original", "reconstruction"] * (len(rows) // 2)
    return _show_grid(path, image_grid(np.concatenate(rows), ncol), "held-out images and their reconstructions",
                      scale, ylabels=labels, cell=(h, h))


def plot_samples(model, path, n=64, seed=0, scale=2):
    """Decodes of ``n`` latents z ~ N(0, I): what the model generates."""
    images = backend.to_host(model.sample(n, rng=backend.rng((seed, SAMPLE_STREAM))))
    return _show_grid(path, image_grid(images, int(math.sqrt(n))), "samples: decoder(z), z ~ N(0, I)", scale)


def plot_interpolation(model, x, path, steps=8, pairs=4, scale=2):
    """Rows of decodes along the line between two held-out images' posterior means, originals at the ends."""
    return model.in_eval(lambda: _plot_interpolation(model, x, path, steps, pairs, scale))


def _plot_interpolation(model, x, path, steps, pairs, scale):
    pairs = max(1, min(pairs, len(x) // 2))  # a single held-out image makes one (constant) row
    mu = model.encode(x)[0]
    xp = backend.array_module(mu)
    t = xp.linspace(0, 1, steps, dtype=mu.dtype)[:, None]
    rows = []
    for p in range(pairs):
        a, b = 2 * p, min(2 * p + 1, len(x) - 1)
        z = (1 - t) * mu[a] + t * mu[b]
        decoded = backend.to_host(model.output_to_image(model.decode(z)))
        rows += [backend.to_host(x[a:a + 1]), decoded, backend.to_host(x[b:b + 1])]
    return _show_grid(path, image_grid(np.concatenate(rows), steps + 2),
                      "interpolation: original | decodes of (1-t) mu_a + t mu_b, t = 0..1 | original", scale)


def plot_traversal(model, x, path, dims=8, steps=9, span=3.0, scale=2):
    """For the ``dims`` latent dimensions with the largest mean KL, vary that one from -span to +span, others fixed.

    The KL per dimension tells which dimensions the encoder uses: one with KL ~ 0 has collapsed to the
    prior and changes nothing. All rows start from the posterior mean of the first held-out image.
    """
    return model.in_eval(lambda: _plot_traversal(model, x, path, dims, steps, span, scale))


def _plot_traversal(model, x, path, dims, steps, span, scale):
    mu, logvar = model.encode(x)
    kl_dim = backend.to_host(kl_per_dimension(mu, logvar).mean(axis=0))
    order = np.argsort(-kl_dim)[:min(dims, model.latent_dim)]
    xp = backend.array_module(mu)
    values = xp.linspace(-span, span, steps, dtype=mu.dtype)
    rows = []
    for j in order:
        z = xp.repeat(mu[:1], steps, axis=0)
        z[:, int(j)] = values
        rows.append(backend.to_host(model.output_to_image(model.decode(z))))
    labels = [f"z[{j}]  KL {kl_dim[j]:.2f}" for j in order]
    h = x.shape[2]
    return _show_grid(path, image_grid(np.concatenate(rows), steps),
                      f"traversal: z[j] from {-span:g} to {span:g}, dimensions by KL", scale, ylabels=labels,
                      cell=(h, h))


def plot_elbo_gap(path, ks, neg_elbo, neg_l, title_note=""):
    r"""Left: the mean over images of -L_k against k, falling from the -ELBO (k = 1) toward -log p(x), with the
    standard error of its distance from the -ELBO (per image, paired: the images' own spread cancels); right: the
    histogram of the per-image gap L_K - ELBO at the largest k.

    ``neg_elbo`` ``(n,)`` and ``neg_l`` ``(n, len(ks))`` are per-image nats (``train.read_iw_bounds``).
    """
    n = len(neg_elbo)
    fig = Figure(figsize=(11, 4), dpi=DPI, layout="constrained")
    ax, hist = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    below = neg_elbo[:, None] - neg_l  # L_k - ELBO per image
    err = below.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(ks))
    ax.errorbar(ks, neg_l.mean(axis=0), yerr=err, fmt="o-", color="tab:blue", capsize=3,
                label="-L_k, importance-sampled bound on -log p(x)\n(bars: standard error of L_k - ELBO)")
    ax.axhline(neg_elbo.mean(), color="tab:orange", linestyle="--", label=f"-ELBO {neg_elbo.mean():,.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("k, samples of q(z|x) per image")
    ax.set_ylabel("nats per image (mean over images)")
    ax.set_title(f"-L_k falls from the -ELBO toward -log p(x) ({n} held-out images){title_note}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right")
    gap = neg_elbo - neg_l[:, -1]
    hist.hist(gap, bins=max(5, min(40, n // 4)), color="tab:blue", alpha=0.7)
    hist.axvline(gap.mean(), color="k", linestyle="--", label=f"mean {gap.mean():.2f} nats")
    hist.set_xlabel(f"L_{ks[-1]} - ELBO per image (nats): a lower bound on KL(q(z|x) || p(z|x))")
    hist.set_ylabel("images")
    hist.set_title(f"the gap per image, k = {ks[-1]}", fontsize=10)
    hist.legend()
    save_figure(fig, path)
    return path


def plot_decoder_variance(path, rows, num_pixels):
    r"""The learned decoder variance s^2 per step and the batch's per-pixel squared error (its optimum), log scale,
    with the equivalent beta = 2 s^2 on the right axis.

    The batch's squared error comes from the logged reconstruction term:
    :math:`\overline{\mathrm{SSE}} = 2 s^2 (\mathrm{recon} - \tfrac D2 \log 2\pi s^2)` (one s^2 for all images).
    """
    steps, recon, s2 = _columns(rows, "step", "recon", "decoder_variance")
    mse = 2 * s2 * (recon - 0.5 * num_pixels * np.log(2 * np.pi * s2)) / num_pixels
    fig = Figure(figsize=(7, 4), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(steps, mse, color="tab:orange", alpha=0.3, linewidth=0.8)
    ax.plot(steps, smooth(mse), color="tab:orange", linewidth=1.5,
            label="per-pixel squared error of the batch (the optimum of s^2)")
    ax.plot(steps, s2, color="tab:blue", linewidth=1.8, label="learned s^2")
    ax.set_yscale("log")
    ax.set_xlabel("step (update)")
    ax.set_ylabel("s^2 and per-pixel squared error")
    right = ax.secondary_yaxis("right", functions=(lambda v: 2 * v, lambda b: b / 2))
    right.set_ylabel("beta = 2 s^2 (the same model with SSE + beta KL)")
    ax.set_title(f"decoder variance learned: s^2 = {s2[-1]:.4g} at the end (beta = {2 * s2[-1]:.4g})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    return path


def plot_comparison(runs, path, n=12, ncol=6, seed=0, scale=2, colors=None):
    """One figure of several runs side by side: per run (a ``(label, run_dir)`` pair) its samples above held-out
    images alternating with their reconstructions, titled with its held-out -log p(x) estimate from summary.json
    (``colors``: reduce the PNG to that many colours).
    """
    import json  # noqa: PLC0415

    from .data import as_batch  # noqa: PLC0415

    panels = []
    for label, run_dir in runs:
        run = Path(run_dir)
        ckpt = load_checkpoint(run / CHECKPOINT)
        model = VAE.from_arrays(ckpt["arrays"])
        model.eval()
        x = as_batch(ckpt["arrays"]["heldout/images"][:n])
        recon = backend.to_host(model.reconstruct(x, rng=backend.rng((seed, SAMPLE_STREAM, 1))))
        x = backend.to_host(x)
        rows = []
        for i in range(0, len(x), ncol):
            rows += [x[i:i + ncol], recon[i:i + ncol]]
        samples = backend.to_host(model.sample(2 * n, rng=backend.rng((seed, SAMPLE_STREAM))))
        iw = json.loads((run / SUMMARY).read_text()).get("importance_sampled") if (run / SUMMARY).is_file() else None
        note = f"-log p(x) <= {iw['neg_log_px_nats']:,.1f} nats (k = {iw['k']}, {iw['images']} images)" if iw else ""
        panels.append((label, note, image_grid(samples, ncol), image_grid(np.concatenate(rows), ncol)))
    h, w = panels[0][2].shape[:2]
    h2 = panels[0][3].shape[0]
    fig = Figure(figsize=(len(panels) * (w * scale / DPI + 0.3), (h + h2) * scale / DPI + 1.2), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=[h, h2])
    for col, (label, note, samples, recons) in enumerate(panels):
        for ax, grid, what in ((axes[0, col], samples, "samples: decoder(z), z ~ N(0, I)"),
                               (axes[1, col], recons, "held-out images (odd rows) and reconstructions")):
            ax.imshow(grid, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label}\n{note}\n{what}" if ax is axes[0, col] else what, fontsize=9)
    save_figure(fig, path)
    if colors:
        _reduce_colors(path, colors)
    return path


def plot_run(run_dir, dest=None, scale=2, colors=None) -> list:
    """Draw every figure of the run in ``run_dir`` from its log, evaluation log and checkpoint; returns the paths.

    The figures go to ``dest`` (default: the run folder), image grids at ``scale`` screen pixels per image
    pixel; ``colors`` reduces each PNG to that many colours (smaller files, e.g. for documentation).
    """
    from .data import as_batch  # noqa: PLC0415

    run = Path(run_dir)
    if not (run / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{run / CHECKPOINT} not found: {run} holds no finished or interrupted run")
    out = Path(dest) if dest is not None else run
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(run / CHECKPOINT)
    (rows, dropped), (evals, dropped_evals) = read_log(run / LOG, LOG_FIELDS), read_log(run / EVAL, EVAL_FIELDS)
    for message in dropped + dropped_evals:  # one bad row must not cost the figures: drawn without it
        log.warning("%s; the figures are drawn from the good rows", message)
    try:  # before any figure is drawn: a damaged checkpoint replaces none of those there
        model = VAE.from_arrays(ckpt["arrays"])
        x = as_batch(ckpt["arrays"]["heldout/images"])
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"the checkpoint {run / CHECKPOINT} does not hold a model its config describes "
                          f"({_reason(e)}); it is damaged, so no figure was drawn") from None
    model.eval()
    recon_name = ckpt["config"].get("recon", "sse")
    paths = []
    steps, recon, kl = _columns(rows, "step", "recon", "kl")
    esteps, erecon, ekl = _columns(evals, "step", "recon", "kl")
    paths.append(plot_curve(out / "vae_mse.png", steps, recon, esteps, erecon, "reconstruction term",
                            RECON_LABELS.get(recon_name, recon_name)))
    paths.append(plot_curve(out / "vae_kld.png", steps, kl, esteps, ekl,
                            "KL(q(z|x) || p(z)) per image", "nats", log_scale=False))
    seed = int(ckpt["meta"]["seed"])
    paths.append(plot_reconstructions(model, x[:16], out / "vae_recons.png", scale=scale))
    paths.append(plot_samples(model, out / "samples.png", seed=seed, scale=scale))
    # interpolate between faces not shown in the reconstructions when there are enough
    paths.append(plot_interpolation(model, x[16:] if len(x) >= 24 else x, out / "interpolation.png", scale=scale))
    paths.append(plot_traversal(model, x, out / "traversal.png", scale=scale))
    iw = read_iw_bounds(run / IW_BOUNDS)
    if iw is not None:
        paths.append(plot_elbo_gap(out / "elbo_gap.png", *iw))
    if ckpt["config"].get("recon_variance") == "learned" and rows:
        paths.append(plot_decoder_variance(out / "decoder_variance.png", rows, int(x[0].size)))
    if colors:
        for path in paths:
            _reduce_colors(path, colors)
    return paths


def _reduce_colors(path, colors):
    """Rewrite a PNG with a palette of ``colors`` colours (no dithering, which would only add noise to compress)."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        reduced = img.convert("RGB").quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        reduced.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
