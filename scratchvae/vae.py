r"""The VAE: the ELBO's pieces as functions with their gradients beside them, and the model that uses them.

The derivation (see README) maximises the evidence lower bound

.. math::
    \log p(x) \ge \mathbb{E}_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x) \,\|\, p(z)),
    \qquad q(z|x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x)), \quad p(z) = \mathcal N(0, I).

Naming, so that no function can confuse the two: ``logvar`` is always :math:`\log\sigma^2`, and
:math:`\sigma = \exp(\tfrac12 \mathrm{logvar})`. The noise ``eps`` is drawn once per step and used by
both the forward and the backward pass (never redrawn for the decoder).

Shapes: ``mu``, ``logvar`` ``(N, d)``; ``eps``, ``z`` ``(m, N, d)`` for ``m`` Monte-Carlo samples per image;
images ``x`` ``(N, C, H, W)`` in [0, 1]; decoder outputs ``(m, N, C, H, W)``.
"""
from __future__ import annotations

import json
import math

from . import backend, layers
from .backend import array_module, to_float, to_host
from .layers import Module, sigmoid
from .optim import Adam

# exp(logvar) must stay finite in float32 (max ~3.4e38 = exp(88)); sigma = exp(10) is already far
# wider than the prior, and sigma = exp(-15) far narrower than any pixel can resolve. Outside these
# bounds the encoder's logvar is clamped and its gradient is zero (the clamp is the documented guard).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ---- 1. The reparameterization trick -----------------------------------------------------------------

@backend.fused
def reparameterize(mu, logvar, eps):
    r"""z_i = mu + sigma * eps_i with sigma = exp(logvar / 2): a sample of q(z|x) that is differentiable in mu, logvar.

    ``eps`` ``(m, N, d)`` ~ N(0, I) is passed in, so the same noise serves forward, backward and checks.
    Returns z ``(m, N, d)``.
    """
    return mu + array_module(mu).exp(0.5 * logvar) * eps


def reparameterize_backward(dz, logvar, eps):
    r"""Gradients through z_i = mu + exp(logvar/2) eps_i with eps held fixed.

    :math:`\partial L/\partial\mu = \sum_i \partial L/\partial z_i`,
    :math:`\partial L/\partial \mathrm{logvar} = \sum_i \partial L/\partial z_i \cdot \epsilon_i \cdot \tfrac12 e^{\mathrm{logvar}/2}`.
    Returns ``(dmu, dlogvar)``, each ``(N, d)``.
    """
    sigma = array_module(dz).exp(0.5 * logvar)
    return dz.sum(axis=0), (dz * eps).sum(axis=0) * (0.5 * sigma)


# ---- 2. The KL divergence to the prior, in closed form --------------------------------------------------

@backend.fused
def kl_per_dimension(mu, logvar):
    r"""The KL's terms, one per latent dimension: :math:`\tfrac12 (\mu_j^2 + e^{\mathrm{logvar}_j} - \mathrm{logvar}_j - 1)`, ``(N, d)``."""
    xp = array_module(mu)
    return 0.5 * (mu * mu + xp.exp(logvar) - logvar - 1)


def kl_divergence(mu, logvar):
    r"""KL(N(mu, diag(exp(logvar))) || N(0, I)) per image: the sum over dimensions of ``kl_per_dimension``.

    Returns ``(N,)`` in nats.
    """
    return kl_per_dimension(mu, logvar).sum(axis=1)


def kl_divergence_backward(dkl, mu, logvar):
    r"""Gradient of the KL: :math:`\partial KL/\partial\mu = \mu`, :math:`\partial KL/\partial\,\mathrm{logvar} = \tfrac12(e^{\mathrm{logvar}} - 1)`.

    ``dkl`` ``(N,)`` is the upstream gradient per image. Returns ``(dmu, dlogvar)``, each ``(N, d)``.
    """
    xp = array_module(mu)
    dkl = dkl[:, None]
    return dkl * mu, dkl * 0.5 * (xp.exp(logvar) - 1)


# ---- 3. Reconstruction terms: -log p(x|z) ---------------------------------------------------------------
# Each works per Monte-Carlo sample: nll(x, out) returns (m, N); nll_backward returns d/d out.

class SquaredError:
    r"""The derived term: :math:`\|x - f(z)\|^2` summed over pixels, i.e. :math:`-\log p(x|z)` for a Gaussian
    decoder with covariance :math:`\tfrac12 I`, up to the constant :math:`\tfrac D2 \log\pi` (``nats_offset``)."""

    name = "sse"
    output_is_logits = False

    def nll(self, x, out):
        """Summed squared error per sample and image, ``(m, N)``."""
        diff = (out - x).reshape(out.shape[0], out.shape[1], -1)
        diff *= diff  # squared in place: no second image-sized array to allocate
        return diff.sum(axis=2)

    def nll_backward(self, dnll, x, out):
        """d/d out of sum(dnll * nll): 2 (f(z) - x) dnll."""
        grad = out - x
        grad *= 2 * dnll.reshape(dnll.shape + (1,) * (out.ndim - 2))
        return grad

    def nats_offset(self, num_pixels):
        """What to add to ``nll`` for the true -log p(x|z) in nats: (D/2) log(pi), from sigma^2 = 1/2."""
        return 0.5 * num_pixels * math.log(math.pi)


class GaussianNLL(SquaredError):
    r"""Gaussian decoder with fixed variance :math:`s^2`:
    :math:`-\log p(x|z) = \|x - f(z)\|^2 / (2 s^2) + \tfrac D2 \log(2\pi s^2)` nats, constant included.

    With :math:`s^2 = 1/2` it is the squared error plus a constant: the same model, weighted.
    """

    name = "gaussian"

    def __init__(self, variance=0.5):
        if not variance > 0:
            raise ValueError(f"the Gaussian decoder's variance must be positive, got {variance}")
        self.variance = float(variance)

    def nll(self, x, out):
        """Gaussian negative log-likelihood in nats per sample and image, ``(m, N)``."""
        num_pixels = x[0].size
        return super().nll(x, out) / (2 * self.variance) + 0.5 * num_pixels * math.log(2 * math.pi * self.variance)

    def nll_backward(self, dnll, x, out):
        """d/d out: (f(z) - x) / s^2 * dnll."""
        return super().nll_backward(dnll, x, out) / (2 * self.variance)

    def nats_offset(self, num_pixels):
        """Zero: ``nll`` already includes the normalising constant."""
        return 0.0


class LearnedGaussianNLL(SquaredError):
    r"""Gaussian decoder whose variance :math:`s^2` is trained with the networks; the parameter is
    :math:`t = \log s^2` (``PARAM``, a scalar of the model, so it is checkpointed and updated by Adam):
    :math:`-\log p(x|z) = \mathrm{SSE} / (2 s^2) + \tfrac D2 (\log 2\pi + t)`, SSE = :math:`\|x - f(z)\|^2`.

    The decoder variance is beta: with :math:`s^2` fixed, :math:`\mathrm{SSE}/(2 s^2) + KL` times :math:`2 s^2 > 0`
    is :math:`\mathrm{SSE} + 2 s^2\, KL`, so minimising one minimises the other: :math:`\beta = 2 s^2`, and the
    derivation's :math:`s^2 = 1/2` is :math:`\beta = 1`. Learning :math:`s^2` learns the trade-off.
    """

    name = "gaussian"
    PARAM = "decoder_log_variance"

    def __init__(self, initial=0.5):
        self.initial = float(initial)
        self.owner = None

    def attach(self, module):
        """Register :math:`t = \\log s^2` (starting at log ``initial``) as a parameter of ``module`` (the VAE)."""
        xp = backend.get_xp()
        module._add_param(self.PARAM, xp.full((1,), math.log(self.initial), dtype=backend.get_default_dtype()))
        self.owner = module

    def log_variance(self):
        """The parameter t = log s^2, a ``(1,)`` array (a view into the model's parameters)."""
        return self.owner.params[self.PARAM]

    def current_variance(self):
        """s^2 as a Python float (a host transfer)."""
        return math.exp(to_float(self.log_variance()[0]))

    def nll(self, x, out):
        """Gaussian negative log-likelihood in nats per sample and image, ``(m, N)``, at the current s^2."""
        t = self.log_variance()
        self._sse = super().nll(x, out)  # kept for nll_backward, as a layer keeps its input
        return self._sse * (0.5 * array_module(t).exp(-t)) + 0.5 * x[0].size * (math.log(2 * math.pi) + t)

    def nll_backward(self, dnll, x, out):
        r"""d/d out: (f(z) - x) / s^2 * dnll; and into the parameter's gradient, summed over samples and images,

        :math:`\partial(-\log p)/\partial t = \tfrac D2 - \mathrm{SSE} / (2 s^2)`, zero at :math:`s^2 = \mathrm{SSE}/D`:
        the optimum of the batch's loss is the mean squared error per pixel, :math:`s^2 = \overline{\mathrm{SSE}} / D`.
        """
        t = self.log_variance()
        half_precision = 0.5 * array_module(t).exp(-t)
        self.owner.grads[self.PARAM] += (dnll * (0.5 * x[0].size - self._sse * half_precision)).sum()
        return super().nll_backward(dnll, x, out) * half_precision

    def nats_offset(self, num_pixels):
        """Zero: ``nll`` already includes the normalising constant."""
        return 0.0


class BernoulliNLL:
    r"""Bernoulli decoder on logits l: :math:`-\log p(x|z) = \sum_k \mathrm{softplus}(l_k) - x_k l_k`
    (binary cross-entropy), computed as :math:`\max(l, 0) - x l + \log(1 + e^{-|l|})`, which never overflows."""

    name = "bce"
    output_is_logits = True

    def nll(self, x, logits):
        """Binary cross-entropy summed over pixels per sample and image, ``(m, N)``."""
        xp = array_module(logits)
        per_pixel = xp.maximum(logits, 0) - x * logits + xp.log1p(xp.exp(-xp.abs(logits)))
        return per_pixel.reshape(logits.shape[0], logits.shape[1], -1).sum(axis=2)

    def nll_backward(self, dnll, x, logits):
        """d/d logits: (sigmoid(l) - x) * dnll."""
        return dnll.reshape(dnll.shape + (1,) * (logits.ndim - 2)) * (sigmoid(logits) - x)

    def nats_offset(self, num_pixels):
        """Zero: the Bernoulli likelihood has no constant."""
        return 0.0


RECONSTRUCTIONS = {"sse": SquaredError, "gaussian": GaussianNLL, "bce": BernoulliNLL}


def make_reconstruction(name, variance=0.5):
    """The reconstruction term called ``name`` ('sse', 'gaussian' or 'bce'); ``variance="learned"`` with 'gaussian'
    makes s^2 a parameter (``LearnedGaussianNLL``, which the model must ``attach``)."""
    if name not in RECONSTRUCTIONS:
        raise ValueError(f"unknown reconstruction {name!r}; choose one of {sorted(RECONSTRUCTIONS)}")
    if variance == "learned":
        if name != "gaussian":
            raise ValueError(f"a learned decoder variance needs recon 'gaussian', not {name!r}")
        return LearnedGaussianNLL()
    return GaussianNLL(variance) if name == "gaussian" else RECONSTRUCTIONS[name]()


# ---- 4. The loss: mean over the batch of (reconstruction + beta * KL) --------------------------------------

def elbo_loss(nll, kl, beta=1.0):
    r"""The training loss, -ELBO with a weight on the KL:
    :math:`\frac1N \sum_n \big[\frac1m \sum_i \mathrm{nll}_{i,n} + \beta\, KL_n\big]`.

    ``nll`` ``(m, N)`` per-sample reconstruction term, ``kl`` ``(N,)``. beta = 1 is the VAE, beta > 1 beta-VAE.
    Returns ``(loss, recon, kl)``: the scalar loss and the per-image reconstruction ``(N,)`` and KL ``(N,)``.
    """
    recon = nll.mean(axis=0)
    return (recon + beta * kl).mean(), recon, kl


def elbo_loss_backward(nll, beta=1.0):
    """Gradients of ``elbo_loss`` with respect to ``nll`` ``(m, N)`` and ``kl`` ``(N,)``: 1/(mN) and beta/N."""
    xp = array_module(nll)
    m, n = nll.shape
    return xp.full(nll.shape, 1.0 / (m * n), dtype=nll.dtype), xp.full((n,), beta / n, dtype=nll.dtype)


# ---- 5. The baseline the derivation starts from: Monte Carlo over the prior --------------------------------

def logsumexp(a, axis=0):
    """log(sum(exp(a))) along ``axis``, shifted by the maximum so it neither overflows nor underflows."""
    xp = array_module(a)
    top = a.max(axis=axis, keepdims=True)
    return (top + xp.log(xp.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def prior_mc_nll(nll):
    r"""-log p(x) estimated with z_i ~ p(z) = N(0, I) and no encoder:
    :math:`-\log p(x) \approx -\big(\mathrm{logsumexp}_i(-\mathrm{nll}_i) - \log m\big)`.

    ``nll`` ``(m, N)`` = -log p(x|z_i) per prior sample. Returns ``(N,)``. Almost every prior sample
    explains x badly, so one sample dominates and training drifts to the average face: why VAEs need q(z|x).
    """
    m = nll.shape[0]
    return -(logsumexp(-nll, axis=0) - math.log(m))


def prior_mc_nll_backward(dout, nll):
    r"""Gradient of ``prior_mc_nll``: :math:`\partial/\partial \mathrm{nll}_i = w_i`, with
    :math:`w = \mathrm{softmax}_i(-\mathrm{nll}_i)` (each sample weighted by its posterior responsibility).

    ``dout`` ``(N,)``. Returns ``(m, N)``.
    """
    xp = array_module(nll)
    w = xp.exp(-nll - (-nll).max(axis=0, keepdims=True))
    w /= w.sum(axis=0, keepdims=True)
    return w * dout


# ---- 6. Importance sampling: log p(x) itself, and how far below it the ELBO lies ----------------------------
# The ELBO is log p(x) - KL(q(z|x) || p(z|x)); the second term cannot be computed, but with k samples of q
#     log p(x) >= L_k = E[ log (1/k) sum_i w_i ],   w_i = p(x|z_i) p(z_i) / q(z_i|x),   z_i ~ q(z|x),
# with L_1 the ELBO, L_k <= L_{k+1}, and L_k -> log p(x) as k grows (Burda et al., the IWAE bound). So
# L_k - ELBO is a lower bound on the hidden KL(q(z|x) || p(z|x)) that closes in on it as k grows.

LOG_2PI = math.log(2 * math.pi)


def log_prior(z):
    r"""log p(z) for p(z) = N(0, I): :math:`-\tfrac12 \sum_j (z_j^2 + \log 2\pi)` over the last axis, in nats."""
    return -0.5 * ((z * z).sum(axis=-1) + z.shape[-1] * LOG_2PI)


def log_posterior(eps, logvar):
    r"""log q(z|x) at z = mu + sigma * eps: :math:`-\tfrac12 \sum_j (\epsilon_j^2 + \mathrm{logvar}_j + \log 2\pi)`,
    since :math:`(z - \mu) / \sigma = \epsilon`. ``eps`` ``(k, N, d)``, ``logvar`` ``(N, d)``; returns ``(k, N)`` nats."""
    return -0.5 * ((eps * eps).sum(axis=-1) + logvar.sum(axis=-1) + eps.shape[-1] * LOG_2PI)


def importance_log_weights(log_px_given_z, z, eps, logvar):
    r""":math:`\log w_i = \log p(x|z_i) + \log p(z_i) - \log q(z_i|x)`, each ``(k, N)``."""
    return log_px_given_z + log_prior(z) - log_posterior(eps, logvar)


class ImportanceBounds:
    r"""Estimates of :math:`L_k` per image for several k at once, from log-weights given a chunk at a time.

    For each k the samples are cut into consecutive groups of k, and the estimate is the mean over groups of
    :math:`\mathrm{logsumexp}_{i \in \mathrm{group}} \log w_i - \log k` (each group an unbiased draw of L_k;
    samples left over after the last whole group are not used). Each group's log-sum-exp is kept as a running
    maximum and sum of exponentials, so a group may straddle chunks: memory is O(N) per k, whatever k is.
    Sums are in float64, since the log-weights are thousands of nats and the gaps a few.
    """

    def __init__(self, ks, xp):
        self.ks = sorted({int(k) for k in ks})
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"the ks must be positive integers, got {ks}")
        self.xp = xp
        self.state = {k: {"top": None, "sumexp": None, "count": 0, "total": 0.0, "groups": 0} for k in self.ks}

    def _fold(self, st, rows):
        # merge rows (r, N) into the group's running (top, sumexp): sum exp(a) = exp(top) * sumexp
        xp, top = self.xp, rows.max(axis=0)
        if st["top"] is None:
            st["top"], st["sumexp"] = top, xp.exp(rows - top).sum(axis=0)
        else:
            new = xp.maximum(st["top"], top)
            st["sumexp"] = st["sumexp"] * xp.exp(st["top"] - new) + xp.exp(rows - new).sum(axis=0)
            st["top"] = new
        st["count"] += len(rows)

    def _close(self, st, k):
        st["total"] = st["total"] + st["top"] + self.xp.log(st["sumexp"]) - math.log(k)
        st["groups"] += 1
        st["top"], st["sumexp"], st["count"] = None, None, 0

    def add(self, log_w):
        """Take the next chunk of log-weights, ``(c, N)`` (samples along the first axis)."""
        log_w = log_w.astype(self.xp.float64)
        for k, st in self.state.items():
            pos, c = 0, len(log_w)
            if st["count"]:  # finish the group the last chunk left open
                take = min(k - st["count"], c)
                self._fold(st, log_w[:take])
                pos = take
                if st["count"] == k:
                    self._close(st, k)
            whole = (c - pos) // k
            if whole:
                block = log_w[pos:pos + whole * k].reshape(whole, k, -1)
                st["total"] = st["total"] + (logsumexp(block, axis=1) - math.log(k)).sum(axis=0)
                st["groups"] += whole
                pos += whole * k
            if pos < c:
                self._fold(st, log_w[pos:])

    def bounds(self):
        """``{k: L_k per image (N,)}`` for every k with at least one whole group."""
        return {k: st["total"] / st["groups"] for k, st in self.state.items() if st["groups"]}


def power_of_two_ks(k):
    """1, 2, 4, ... up to ``k``, and ``k`` itself: the ks at which the bound is reported."""
    ks = [1 << j for j in range(int(k).bit_length()) if 1 << j <= k]
    return ks + ([int(k)] if ks[-1] != k else [])


def importance_sampled_bounds(log_px_given_z, mu, logvar, k, draw_eps, chunk, ks=None):
    r"""L_j per image for j in ``ks`` (default ``power_of_two_ks(k)``) from k samples of q(z|x) = N(mu, diag e^logvar),
    and the ELBO from the same samples, :math:`\frac1k \sum_i \log p(x|z_i) - KL(q \| p)`.

    ``log_px_given_z(z)`` maps latents ``(c, N, d)`` to :math:`\log p(x|z)` ``(c, N)`` in nats; ``draw_eps(c)`` returns
    the next ``c`` noise vectors ``(c, N, d)``; samples are drawn and decoded ``chunk`` per image at a time, so memory
    does not grow with k. Returns ``({j: (N,)}, elbo (N,))``, float64 arrays of mu's module.
    """
    xp = array_module(mu)
    if k < 1 or chunk < 1:
        raise ValueError(f"need k >= 1 samples and chunks of >= 1, got k={k}, chunk={chunk}")
    acc = ImportanceBounds(power_of_two_ks(k) if ks is None else ks, xp)
    if acc.ks[-1] > k:
        raise ValueError(f"cannot report L_{acc.ks[-1]} from {k} samples")
    mean_log_px = 0.0
    for start in range(0, k, chunk):
        eps = draw_eps(min(chunk, k - start))
        z = reparameterize(mu, logvar, eps)
        log_px = log_px_given_z(z)
        acc.add(importance_log_weights(log_px, z, eps, logvar))
        mean_log_px = mean_log_px + log_px.astype(xp.float64).sum(axis=0) / k
    return acc.bounds(), mean_log_px - kl_divergence(mu.astype(xp.float64), logvar.astype(xp.float64))


PRIOR_RECON_SAMPLES = 64  # prior draws per image for the prior-mc model's "reconstruction" (it has no encoder)
IW_DECODES = 256  # images decoded per call by the importance-sampled bound: its memory, whatever k


# ---- 7. The model ------------------------------------------------------------------------------------------

PRESETS = {
    # the widely used 64x64 CelebA conv VAE: five 3x3 stride-2 convs, latent 128
    "default": {"channels": (32, 64, 128, 256, 512), "latent_dim": 128},
    # learns the built-in faces in a few minutes on two CPU cores
    "small": {"channels": (16, 32, 64, 128), "latent_dim": 32},
    # for gradient checks and fast tests
    "tiny": {"channels": (4, 8), "latent_dim": 4},
}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the step was not applied."""


ENGINES = ("fast", "reference")


def _check_number(what, value, ok, rule):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{what} must be {rule}, got {value!r}")
    return value


class VAE(Module):
    r"""Convolutional VAE: encoder -> (mu, logvar) -> reparameterize -> decoder -> reconstruction term.

    Encoder: per width c, Conv2d(3x3, stride 2, pad 1) -> BatchNorm -> LeakyReLU; Flatten; two Linear heads.
    Decoder: Linear -> Reshape -> per width, ConvTranspose2d(3x3, stride 2, pad 1, output_padding 1) ->
    BatchNorm -> LeakyReLU, a last ConvTranspose2d at the first width, then Conv2d(3x3) to the image
    channels and, unless the reconstruction works on logits (bce), a Sigmoid so pixels lie in [0, 1].
    Images enter and leave as ``(N, C, H, W)``; inside, the layers work channels-last.

    ``engine`` picks the layers: ``"reference"`` builds this class on ``scratchvae.layers``, the textbook
    engine; ``"fast"`` (the default) builds its subclass ``scratchvae.fast.FastVAE`` on ``scratchvae.fast``'s
    layers, the same model (parameter names, initialisation, numbers) made fast. Checkpoints load in either.
    """

    engine = "reference"
    layers = layers  # the engine's layer classes

    # VAE(engine="fast") builds a FastVAE, the subclass with the fast layers, as pathlib's Path() builds a PosixPath;
    # copies and pickles pass their engine back in (__getnewargs_ex__), so they keep it
    def __new__(cls, *args, engine=None, **kwargs):
        if engine is not None and engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        if cls is VAE and (engine or "fast") == "fast":
            from .fast.vae import FastVAE  # noqa: PLC0415  (the fast engine builds on this module)
            cls = FastVAE
        elif cls is not VAE and engine not in (None, cls.engine):
            raise ValueError(f"{cls.__name__} is the {cls.engine} engine's VAE; for the {engine} engine build "
                             f"VAE(engine={engine!r})")
        return super().__new__(cls)

    def __getnewargs_ex__(self):
        return (), {"engine": self.engine}

    def __init__(self, image_size=64, channels=None, latent_dim=None, in_channels=3, preset="default",
                 recon="sse", recon_variance=0.5, beta=1.0, mc_samples=1, objective="elbo", seed=0, engine=None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        channels = tuple(PRESETS[preset]["channels"] if channels is None else channels)
        latent_dim = PRESETS[preset]["latent_dim"] if latent_dim is None else latent_dim
        for what, value in [("image_size", image_size), ("latent_dim", latent_dim), ("in_channels", in_channels),
                            ("mc_samples", mc_samples), *((f"channels[{i}]", c) for i, c in enumerate(channels))]:
            _check_number(what, value, lambda v: v == int(v) and v >= 1, "a whole number >= 1")
        if not channels:
            raise ValueError("channels must name at least one encoder width")
        _check_number("beta", beta, lambda v: v >= 0, "a finite number >= 0 (1: the VAE, > 1: a beta-VAE)")
        if image_size % 2 ** len(channels):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(channels)} "
                             f"(one halving per encoder width {channels})")
        if objective not in ("elbo", "prior-mc"):
            raise ValueError(f"objective must be 'elbo' or 'prior-mc', got {objective!r}")
        image_size, latent_dim, in_channels, mc_samples = map(int, (image_size, latent_dim, in_channels, mc_samples))
        channels = tuple(int(c) for c in channels)
        self.config = {"image_size": image_size, "channels": list(channels), "latent_dim": latent_dim,
                       "in_channels": in_channels, "recon": recon, "recon_variance": recon_variance,
                       "beta": beta, "mc_samples": mc_samples, "objective": objective, "seed": seed}
        self.recon = make_reconstruction(recon, recon_variance)
        if hasattr(self.recon, "attach"):  # a learned decoder variance: a parameter of the model, saved and trained
            self.recon.attach(self)
        self.beta, self.mc_samples, self.objective = beta, mc_samples, objective
        self.latent_dim = latent_dim
        self._own_noise_calls = 0  # see own_rng
        rng = backend.rng(seed)
        L = self.layers

        enc, c_prev = [], in_channels
        for c in channels:
            enc += [L.Conv2d(c_prev, c, 3, stride=2, padding=1, rng=rng), L.BatchNorm2d(c), L.LeakyReLU()]
            c_prev = c
        enc.append(L.Flatten())
        self.encoder = L.Sequential(*enc)
        side = image_size // 2 ** len(channels)
        features = channels[-1] * side * side
        self.fc_mu = L.Linear(features, latent_dim, rng=rng)
        self.fc_logvar = L.Linear(features, latent_dim, rng=rng)

        dec = [L.Linear(latent_dim, features, rng=rng), L.Reshape(side, side, channels[-1])]
        rev = channels[::-1]
        for c_in, c_out in zip(rev[:-1], rev[1:]):
            dec += [L.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1, rng=rng),
                    L.BatchNorm2d(c_out), L.LeakyReLU()]
        dec += [L.ConvTranspose2d(rev[-1], rev[-1], 3, stride=2, padding=1, output_padding=1, rng=rng),
                L.BatchNorm2d(rev[-1]), L.LeakyReLU(), L.Conv2d(rev[-1], in_channels, 3, padding=1, rng=rng)]
        if not self.recon.output_is_logits:
            dec.append(L.Sigmoid())
        self.decoder = L.Sequential(*dec)

    def named_children(self):
        return [("encoder", self.encoder), ("fc_mu", self.fc_mu), ("fc_logvar", self.fc_logvar),
                ("decoder", self.decoder)]

    # -- the pieces -----------------------------------------------------------------------------------------
    def encode(self, x):
        """Images ``(N, C, H, W)`` -> ``(mu, logvar)`` of q(z|x), each ``(N, d)`` (logvar clamped, see LOGVAR_MIN)."""
        self.check_images(x)
        xp = array_module(x)
        h = self.encoder.forward(x.transpose(0, 2, 3, 1))  # to channels-last
        raw = self.fc_logvar.forward(h)
        self._logvar_free = (raw > LOGVAR_MIN) & (raw < LOGVAR_MAX)
        return self.fc_mu.forward(h), xp.clip(raw, LOGVAR_MIN, LOGVAR_MAX)

    def encode_backward(self, dmu, dlogvar, input_grad=True):
        """Backward of ``encode``: accumulate encoder gradients; returns dL/dx ``(N, C, H, W)``.

        With ``input_grad=False`` (training: the images need no gradient) the first convolution skips
        dL/dx, its costliest product, and None is returned.
        """
        dh = self.fc_mu.backward(dmu) + self.fc_logvar.backward(dlogvar * self._logvar_free)
        first, saved = self.encoder[0], self.encoder[0].input_grad
        first.input_grad = input_grad
        try:
            dx = self.encoder.backward(dh)
        finally:
            first.input_grad = saved  # only for this call
        return None if dx is None else dx.transpose(0, 3, 1, 2)

    def check_images(self, x):
        """A ValueError that says what was expected unless x is a batch of this model's images ``(N, C, H, W)``."""
        c, size = self.config["in_channels"], self.config["image_size"]
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, size, size):
            raise ValueError(f"this VAE takes images (N, {c}, {size}, {size}), got shape {tuple(x.shape)}: resize "
                             f"the images to {size}x{size}, or build the model with image_size={x.shape[-1]}")

    def decode(self, z):
        """Latents ``(..., d)`` -> decoder outputs ``(..., C, H, W)``: pixel means, or logits for 'bce'."""
        lead = z.shape[:-1]
        out = self.decoder.forward(z.reshape(-1, self.latent_dim))
        return out.transpose(0, 3, 1, 2).reshape(lead + (out.shape[3], out.shape[1], out.shape[2]))

    def decode_backward(self, dout):
        """Backward of ``decode``: accumulate decoder gradients; returns dL/dz."""
        lead = dout.shape[:-3]
        d = dout.reshape((-1,) + dout.shape[-3:]).transpose(0, 2, 3, 1)
        return self.decoder.backward(d).reshape(lead + (self.latent_dim,))

    def own_rng(self):
        """The generator for a call given none: a new one each call, seeded by (seed, 1, call number).

        A counter rather than one stored generator, so that a deep copy of the model draws what the original
        would draw next, on either device: CuPy's generators cannot be copied."""
        self._own_noise_calls += 1
        return backend.rng((self.config["seed"], 1, self._own_noise_calls))

    def draw_eps(self, n, rng=None):
        """Standard normal noise ``(m, n, d)`` for the reparameterization (or for prior samples)."""
        rng = rng or self.own_rng()
        return rng.standard_normal((self.mc_samples, n, self.latent_dim)).astype(backend.get_default_dtype())

    # -- the loss, forward and backward -----------------------------------------------------------------------
    def forward_backward(self, x, eps=None, rng=None):
        """Loss of a batch and its gradient, accumulated into ``grads``; returns ``(loss, recon (N,), kl (N,))``.

        ``eps`` ``(m, N, d)`` is the noise (drawn from ``rng``, or from ``own_rng`` when neither is given):
        it is the same array in the forward and the backward pass.
        """
        self.check_images(x)
        if eps is None:
            eps = self.draw_eps(x.shape[0], rng)
        if self.objective == "prior-mc":
            return self._prior_mc_forward_backward(x, eps)
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, eps)
        out = self.decode(z)
        nll = self.recon.nll(x, out)
        kl = kl_divergence(mu, logvar)
        loss, recon, kl = elbo_loss(nll, kl, self.beta)

        dnll, dkl = elbo_loss_backward(nll, self.beta)
        dz = self.decode_backward(self.recon.nll_backward(dnll, x, out))
        dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
        dmu_kl, dlogvar_kl = kl_divergence_backward(dkl, mu, logvar)
        self.encode_backward(dmu + dmu_kl, dlogvar + dlogvar_kl, input_grad=False)
        return loss, recon, kl

    def _prior_mc_forward_backward(self, x, z):
        out = self.decode(z)  # z ~ N(0, I): eps *is* the prior sample, no encoder involved
        nll = self.recon.nll(x, out)
        per_image = prior_mc_nll(nll)
        xp = array_module(x)
        dnll = prior_mc_nll_backward(xp.full(per_image.shape, 1.0 / len(per_image), dtype=nll.dtype), nll)
        self.decode_backward(self.recon.nll_backward(dnll, x, out))
        return per_image.mean(), per_image, xp.zeros_like(per_image)

    def loss(self, x, eps):
        """The training loss for a batch with fixed noise, forward only (for checks); a 0-d array."""
        if self.objective == "prior-mc":
            return prior_mc_nll(self.recon.nll(x, self.decode(eps))).mean()
        mu, logvar = self.encode(x)
        nll = self.recon.nll(x, self.decode(reparameterize(mu, logvar, eps)))
        return elbo_loss(nll, kl_divergence(mu, logvar), self.beta)[0]

    def train_step(self, x, optimizer, eps=None, rng=None):
        """One update: forward, loss, backward, optimiser step. Returns the logged scalars as Python floats.

        Raises NonFiniteLossError, leaving parameters and BatchNorm statistics untouched, if the loss is NaN or Inf.
        """
        self.train()
        self.zero_grad()
        # BatchNorm updates its running statistics during the forward pass: keep them, to put them back
        # if this batch's loss turns out NaN
        saved_buffers = self.snapshot_buffers()
        loss, recon, kl = self.forward_backward(x, eps=eps, rng=rng)
        logs = self.logged_scalars(loss, recon, kl)
        if not all(math.isfinite(v) for v in logs.values()):
            self.restore_buffers(saved_buffers)
            raise NonFiniteLossError(f"non-finite loss {logs}; parameters and BatchNorm statistics were not "
                                     "updated. Lower the learning rate, or check the input batch for NaN pixels.")
        optimizer.step()
        return logs

    def logged_scalars(self, loss, recon, kl):
        """The step's loss and its batch means of recon and KL as Python floats: one transfer to the host."""
        loss, recon, kl = to_host(array_module(loss).stack([loss, recon.mean(), kl.mean()]))
        return {"loss": float(loss), "recon": float(recon), "kl": float(kl)}

    def state_arrays(self):
        """The arrays a training step changes in the model: its parameters and buffers (for checks of the whole)."""
        return [p for _, p, _ in self.named_parameters()] + [b for _, b in self.named_buffers()]

    def make_optimizer(self, lr=1e-3):
        """Adam over this model's parameters (the engine's own Adam: ``FastVAE`` gives the fast one)."""
        return Adam(self, lr=lr)

    # -- using a trained model --------------------------------------------------------------------------------
    def in_eval(self, fn):
        """``fn()`` run with the model in eval mode (BatchNorm on running statistics); the mode is restored after."""
        was_training = self.training
        self.eval()
        try:
            return fn()
        finally:
            self.train(was_training)

    def output_to_image(self, out):
        """Decoder outputs -> pixel means in [0, 1] (applies the sigmoid for logits)."""
        return sigmoid(out) if self.recon.output_is_logits else out

    def sample(self, n, rng=None):
        """n images ``(n, C, H, W)`` in [0, 1] decoded from z ~ N(0, I) (eval-mode BatchNorm)."""
        rng = rng or self.own_rng()
        z = rng.standard_normal((n, self.latent_dim)).astype(backend.get_default_dtype())
        return self.in_eval(lambda: self.output_to_image(self.decode(z)))

    def reconstruct(self, x, rng=None):
        """Decodes of the posterior means mu(x): images ``(N, C, H, W)`` in [0, 1] (eval mode).

        The prior-mc objective has no encoder: there, each image's best of ``PRIOR_RECON_SAMPLES`` prior draws
        (the largest p(x|z)), the closest the model comes to x when z is drawn from the prior.
        """
        if self.objective == "prior-mc":
            self.check_images(x)
            return self.in_eval(lambda: self._best_prior_decode(x, rng or self.own_rng()))
        return self.in_eval(lambda: self.output_to_image(self.decode(self.encode(x)[0])))

    def _best_prior_decode(self, x, rng):
        xp = array_module(x)
        out = self.decode(rng.standard_normal((PRIOR_RECON_SAMPLES, x.shape[0], self.latent_dim)).astype(x.dtype))
        best = self.recon.nll(x, out).argmin(axis=0)
        return self.output_to_image(out[best, xp.arange(x.shape[0])])

    def evaluate(self, x, eps=None, rng=None):
        """Held-out figures for a batch, no update, eval-mode BatchNorm. Python floats, per image unless noted:

        ``neg_elbo_nats`` (-ELBO in nats, constants included, so a true bound on -log p(x)),
        ``bits_per_dim`` (the same / (D ln 2)), ``recon`` and ``kl`` (the training terms), ``loss``
        (recon + beta KL), and ``mse`` (per-pixel squared error of the posterior-mean reconstruction; for
        the prior-mc objective, which has no encoder, of the decode of the first prior sample).
        """
        self.check_images(x)

        def run():
            noise = eps if eps is not None else self.draw_eps(x.shape[0], rng)
            num_pixels = x[0].size
            if self.objective == "prior-mc":
                nll = self.recon.nll(x, self.decode(noise))
                recon, kl = prior_mc_nll(nll), array_module(x).zeros(x.shape[0], dtype=x.dtype)
                mse = ((self.output_to_image(self.decode(noise[0])) - x) ** 2).mean()
            else:
                mu, logvar = self.encode(x)
                recon = self.recon.nll(x, self.decode(reparameterize(mu, logvar, noise))).mean(axis=0)
                kl = kl_divergence(mu, logvar)
                mse = ((self.output_to_image(self.decode(mu)) - x) ** 2).mean()
            nats = to_float((recon + kl).mean()) + self.recon.nats_offset(num_pixels)
            return {"neg_elbo_nats": nats, "bits_per_dim": nats / (num_pixels * math.log(2)),
                    "recon": to_float(recon.mean()), "kl": to_float(kl.mean()),
                    "loss": to_float((recon + self.beta * kl).mean()), "mse": to_float(mse)}
        return self.in_eval(run)

    def importance_bounds(self, x, k, ks=None, chunk=None, rng=None):
        r"""Per image, in nats with every constant: :math:`L_j` for j in ``ks`` (default 1, 2, 4, ..., k) from k
        samples of q(z|x), and the ELBO from the same samples (see ``importance_sampled_bounds``); eval-mode BatchNorm.

        For the prior-mc objective, which has no encoder, the proposal is the prior itself (q = p(z), KL = 0).
        The samples are decoded ``chunk`` per image at a time (default: ``IW_DECODES // N``, at least 1), drawn in
        that order from ``rng`` (NumPy draws the same numbers whatever the chunk). Returns
        ``({j: (N,)}, elbo (N,))`` as float64 host arrays.
        """
        self.check_images(x)
        xp = array_module(x)
        rng = rng or self.own_rng()
        chunk = chunk or max(1, IW_DECODES // x.shape[0])
        offset = self.recon.nats_offset(x[0].size)

        def log_px_given_z(z):  # log p(x|z) = -(nll + constant), summed in float64: thousands of nats, gaps of a few
            return -(self.recon.nll(x, self.decode(z)).astype(xp.float64) + offset)

        def run():
            if self.objective == "prior-mc":
                mu = logvar = xp.zeros((x.shape[0], self.latent_dim), dtype=x.dtype)
            else:
                mu, logvar = self.encode(x)
            return importance_sampled_bounds(log_px_given_z, mu, logvar, k, chunk=chunk, ks=ks, draw_eps=lambda c: (
                rng.standard_normal((c,) + mu.shape).astype(mu.dtype)))

        bounds, elbo = self.in_eval(run)
        return {j: to_host(v) for j, v in bounds.items()}, to_host(elbo)

    def log_likelihood(self, x, k, chunk=None, rng=None):
        """The importance-sampled estimate L_k of log p(x) per image, ``(N,)`` host float64 nats (k samples of q)."""
        return self.importance_bounds(x, k, ks=[k], chunk=chunk, rng=rng)[0][k]

    # -- saving -------------------------------------------------------------------------------------------------
    def to_arrays(self):
        """The config (as JSON) and every parameter and buffer under ``model/<name>``: what files store."""
        arrays = {f"model/{k}": v for k, v in self.state_dict().items()}
        return {"config": json.dumps(self.config), **arrays}

    @classmethod
    def from_arrays(cls, arrays, engine="fast"):
        """A VAE rebuilt from ``to_arrays``'s entries (other entries, such as a checkpoint's, are ignored)."""
        model = cls.from_config(json.loads(str(arrays["config"])), engine=engine)
        model.load_state_dict({k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")})
        return model

    def save(self, path):
        """Write every parameter and buffer, and the config, to an ``.npz`` file (no pickle), atomically."""
        backend.save_npz(path, self.to_arrays())

    @classmethod
    def from_config(cls, config, engine="fast"):
        """A fresh VAE on ``engine`` built from a ``config`` dict (as saved in files and checkpoints)."""
        return VAE(**{k: v for k, v in config.items() if k in _VAE_ARGS}, engine=engine)

    @classmethod
    def load(cls, path, engine="fast"):
        """Build a VAE on ``engine`` from a file written by ``save`` (or a training checkpoint) and load its state."""
        return cls.from_arrays(backend.load_npz(path), engine=engine)


_VAE_ARGS = ("image_size", "channels", "latent_dim", "in_channels", "recon", "recon_variance", "beta",
             "mc_samples", "objective", "seed")
