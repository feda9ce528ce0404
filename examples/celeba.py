"""Train the VAE on 64x64 faces and draw its figures: the whole run in one command.

    python examples/celeba.py                       # built-in synthetic faces, small model, a few minutes on a CPU
    python examples/celeba.py --data ~/data/celeba  # real CelebA, the default model (a GPU helps)
    python examples/celeba.py --resume              # continue the run in runs/celeba after a Ctrl-C
    python examples/celeba.py --plot-only           # redraw the figures of a finished run

Everything happens in ``scratchvae.train`` (the loop, logs, checkpoints) and ``scratchvae.plots`` (the
figures); this script only turns command-line options into a ``TrainConfig``. Exit status: 0 done;
2 bad options, data, checkpoint or logs, or a disk or memory that refused (the last checkpoint kept); 3 the
run diverged, a NaN/Inf anywhere (the last good checkpoint kept); 130 Ctrl-C and 143 SIGTERM (checkpoint
written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scratchvae import backend
from scratchvae.data import RESAMPLE, RESAMPLE_FILTERS
from scratchvae.train import DEFAULTS, FIGURES, ConfigError, TrainConfig, TrainingStopped, train
from scratchvae.vae import PRESETS, RECONSTRUCTIONS


def bounded(kind, low, strict, what):
    """An argparse type: ``kind(text)`` that is finite and above ``low`` (``strict``) or at least ``low``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > low if strict else value >= low) or not value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


positive_int = bounded(int, 0, True, "a positive integer")
positive_float = bounded(float, 0.0, True, "a positive number")
nonnegative_float = bounded(float, 0.0, False, "a number >= 0")
nonnegative_int = bounded(int, 0, False, "an integer >= 0")


def variance_or_learned(text):
    """``--recon-variance``: a positive number, or 'learned' (s^2 trained with the model)."""
    return "learned" if text == "learned" else bounded(float, 0.0, True, "a positive number or 'learned'")(text)


def build_parser():
    """The command line: one option per TrainConfig field that a user would change."""
    syn, cel = DEFAULTS["synthetic"], DEFAULTS["celeba"]
    p = argparse.ArgumentParser(
        prog="celeba.py", description="Train a from-scratch VAE on faces: progress, loss curves, reconstructions, "
        "samples, checkpoints, resume, held-out evaluation.",
        epilog="Outputs (in --out): log.csv, eval.csv, iw_bounds.csv, checkpoint.npz, summary.json, "
        + ", ".join(FIGURES) + " (and decoder_variance.png with --recon-variance learned).")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="PATH", help="CelebA: folder of img_align_celeba JPEGs, img_align_celeba.zip, "
                   "or torchvision's root (default: the built-in synthetic faces)")
    d.add_argument("--image-size", type=positive_int, default=64, metavar="N", help="side of the square images in pixels (default 64)")
    d.add_argument("--resample", choices=list(RESAMPLE_FILTERS), default=RESAMPLE, help="filter resizing CelebA's "
                   "148x148 centre crop (default bilinear, as torchvision's Resize; lanczos was the default before)")
    d.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N images (quick runs)")
    d.add_argument("--workers", type=positive_int, metavar="N", help="processes decoding CelebA into the cache on "
                   "the first run (default: one per core)")
    d.add_argument("--cache-dir", metavar="DIR", help="where the decoded CelebA cache goes (default: beside the images)")
    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=sorted(PRESETS), help=f"architecture (default: {syn[0]} on the built-in "
                   f"faces, {cel[0]} with --data)")
    m.add_argument("--latent-dim", type=positive_int, metavar="D", help="latent dimensions (default: the preset's)")
    m.add_argument("--recon", choices=sorted(RECONSTRUCTIONS), default="sse", help="reconstruction term: sse (the "
                   "derivation's, sigma^2 = 1/2), gaussian (with --recon-variance), bce (Bernoulli)")
    m.add_argument("--recon-variance", type=variance_or_learned, default=0.5, metavar="S2",
                   help="decoder variance s^2 for --recon gaussian (default 0.5), or 'learned': trained with the "
                   "model (it acts as beta = 2 s^2)")
    m.add_argument("--beta", type=nonnegative_float, default=1.0, metavar="B", help="weight of the KL term (1: VAE, >1: beta-VAE)")
    m.add_argument("--beta-warmup", type=nonnegative_int, default=0, metavar="STEPS",
                   help="KL warm-up: beta rises linearly from 0 to --beta over the first STEPS updates (default 0: off)")
    m.add_argument("--mc-samples", type=positive_int, default=1, metavar="M", help="latent samples per image per step")
    m.add_argument("--objective", choices=("elbo", "prior-mc"), default="elbo",
                   help="elbo (the VAE) or prior-mc (the encoder-free baseline the derivation starts from)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=positive_int, metavar="N", help=f"passes over the training images (default: {syn[1]} on the "
                   f"built-in faces, {cel[1]} with --data)")
    t.add_argument("--batch-size", type=positive_int, metavar="N", help=f"images per step (default: {syn[2]} built-in, {cel[2]} CelebA)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--max-steps", type=positive_int, metavar="N", help="stop after N updates in all, even mid-epoch")
    t.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the weights, the noise and the batch order (default 0)")
    t.add_argument("--device", choices=backend.DEVICES, default="auto",
                   help="cpu (NumPy), gpu (CuPy) or auto (the GPU when CuPy sees one)")
    t.add_argument("--engine", choices=("fast", "reference"), default="fast",
                   help="fast (the default) or reference: the textbook layers, the same numbers, several times slower")
    t.add_argument("--eval-images", type=positive_int, metavar="N",
                   help="validation images per evaluation (default: the whole split)")
    t.add_argument("--iw-samples", type=nonnegative_int, default=32, metavar="K",
                   help="held-out -log p(x) estimated with K importance samples of q(z|x) per image at the end of "
                   "the run (4 at every evaluation, in eval.csv), with the ELBO's gap; 0: off (default 32)")
    t.add_argument("--iw-images", type=positive_int, default=128, metavar="N",
                   help="validation images (the first N) for that estimate (default 128)")
    t.add_argument("--checkpoint-every", type=positive_int, default=250, metavar="N",
                   help="write the checkpoint every N steps (also at each epoch's end, the end and on Ctrl-C)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="runs/celeba", metavar="DIR", help="run folder (default runs/celeba)")
    g = o.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, exactly")
    g.add_argument("--force", action="store_true", help="start over in a used --out, overwriting the run's own files")
    g.add_argument("--plot-only", action="store_true", help="only redraw the figures of the run in --out")
    o.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    return p


def config_from_args(args) -> TrainConfig:
    """The TrainConfig the parsed options describe."""
    return TrainConfig(
        data=args.data, out=args.out, image_size=args.image_size, preset=args.preset, latent_dim=args.latent_dim,
        recon=args.recon, recon_variance=args.recon_variance, beta=args.beta, beta_warmup=args.beta_warmup,
        mc_samples=args.mc_samples, iw_samples=args.iw_samples, iw_images=args.iw_images,
        objective=args.objective, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, engine=args.engine, max_steps=args.max_steps, limit=args.limit, eval_images=args.eval_images,
        checkpoint_every=args.checkpoint_every, resume=args.resume, force=args.force, workers=args.workers,
        cache_dir=args.cache_dir, resample=args.resample, progress=not args.no_progress)


def draw(out) -> int:
    """Draw the figures of the run in ``out`` and list them; 0 on success, 2 when there is no readable run there
    or the figures cannot be written (the figures already there are kept whole)."""
    from scratchvae.plots import plot_run  # noqa: PLC0415  (matplotlib loads only when drawing)

    try:
        paths = plot_run(out)
    except (FileNotFoundError, ConfigError) as e:
        print(f"celeba.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"celeba.py: error: cannot write the figures in {out} ({e.strerror or e}); the figures already there "
              "are kept. Free some space, or make the folder writable, then run again with --plot-only",
              file=sys.stderr)
        return 2
    print("figures: " + ", ".join(str(p) for p in paths))
    return 0


def main(argv=None) -> int:
    """Parse ``argv``, train (or resume, or only plot) and draw the figures; returns the exit status."""
    from scratchvae.data import DataError  # noqa: PLC0415

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_only:
        return draw(args.out)
    config = config_from_args(args)
    try:
        config.resolved()  # every option checked before any work: a bad one is a usage error (status 2)
    except ConfigError as e:
        parser.error(str(e))
    try:
        summary = train(config)
    except (ConfigError, DataError) as e:
        print(f"celeba.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"celeba.py: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before the loop began (loading data): nothing to save
        print("celeba.py: interrupted before training began; nothing was saved", file=sys.stderr)
        return 130
    except MemoryError as e:  # loading the data
        print(f"celeba.py: error: out of memory before training began ({type(e).__name__}: {e}); use a smaller "
              "--limit or --image-size", file=sys.stderr)
        return 2
    ev, wall = summary["final_eval"], summary["wall_seconds"]
    print(f"done: {summary['steps']} steps ({summary['epochs']:g} epochs) in {int(wall // 60)}m {wall % 60:.0f}s on "
          f"{summary['device']}. Held-out -ELBO {ev['neg_elbo_nats']:.2f} nats/image = {ev['bits_per_dim']:.4f} "
          f"bits/dim (recon {ev['recon']:.2f}, KL {ev['kl']:.2f}, per-pixel MSE {ev['mse']:.5f})")
    if iw := summary.get("importance_sampled"):
        cost = f", {iw['seconds']:.1f} s" if iw["seconds"] is not None else ""
        print(f"held-out -log p(x) <= -L_{iw['k']} = {iw['neg_log_px_nats']:.2f} nats/image on {iw['images']} images "
              f"({iw['k']} importance samples each{cost}); -ELBO there {iw['neg_elbo_nats']:.2f}, gap L_k - ELBO "
              f"{iw['elbo_gap_nats']:.2f} nats")
    status = draw(Path(config.out))
    print(f"log: {Path(config.out) / 'log.csv'}, {Path(config.out) / 'eval.csv'}; "
          f"checkpoint: {Path(config.out) / 'checkpoint.npz'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
