"""The importance-sampled log-likelihood against a model whose log p(x) is known in closed form, its identities
with the ELBO and the prior Monte Carlo estimate, its chunking; and the learned decoder variance (float64)."""
import math

import numpy
import pytest

from scratchvae import backend, vae
from scratchvae.gradcheck import check_function
from scratchvae.vae import VAE


def host(a):
    return backend.to_host(a)


# ---- a linear Gaussian decoder: p(x) = N(b, W W^T + s^2 I), its posterior Gaussian too ----------------------

D, d, S2 = 6, 3, 0.3


def linear_gaussian(seed=0):
    r = numpy.random.default_rng(seed)
    W, b, x = r.standard_normal((D, d)), r.standard_normal(D), r.standard_normal(D) * 2
    cov = W @ W.T + S2 * numpy.eye(D)
    diff = x - b
    log_px = -0.5 * (diff @ numpy.linalg.solve(cov, diff) + numpy.linalg.slogdet(cov)[1] + D * math.log(2 * math.pi))
    post_cov = numpy.linalg.inv(numpy.eye(d) + W.T @ W / S2)
    post_mean = post_cov @ W.T @ diff / S2
    return W, b, x, log_px, post_mean, post_cov


def gaussian_kl(m0, c0, m1, c1):
    """KL(N(m0, c0) || N(m1, c1)), closed form."""
    inv = numpy.linalg.inv(c1)
    return 0.5 * (numpy.trace(inv @ c0) + (m1 - m0) @ inv @ (m1 - m0) - len(m0)
                  + numpy.linalg.slogdet(c1)[1] - numpy.linalg.slogdet(c0)[1])


def linear_bounds(xp, k, n, chunk, seed=1, ks=None, q_shift=0.4, q_scale=1.6):
    """L_j estimates for n independent replicates of the same x, with a deliberately imperfect diagonal q."""
    W, b, x, log_px, post_mean, post_cov = linear_gaussian()
    q_mean = post_mean + q_shift
    q_logvar = numpy.log(numpy.diag(post_cov) * q_scale)
    Wd, bd, xd = xp.asarray(W), xp.asarray(b), xp.asarray(x)

    def log_px_given_z(z):  # log N(x; W z + b, s^2 I), z (c, n, d)
        r = xd - (z @ Wd.T + bd)
        return -0.5 * ((r * r).sum(axis=-1) / S2 + D * math.log(2 * math.pi * S2))

    rng = backend.rng(seed)
    mu = xp.asarray(numpy.tile(q_mean, (n, 1)))
    logvar = xp.asarray(numpy.tile(q_logvar, (n, 1)))
    bounds, elbo = vae.importance_sampled_bounds(log_px_given_z, mu, logvar, k, chunk=chunk, ks=ks,
                                                 draw_eps=lambda c: rng.standard_normal((c, n, d)))
    q_cov = numpy.diag(numpy.exp(q_logvar))
    exact_elbo = log_px - gaussian_kl(q_mean, q_cov, post_mean, post_cov)  # log p(x) - KL(q || p(z|x))
    return {j: host(v) for j, v in bounds.items()}, host(elbo), log_px, exact_elbo


def test_the_estimate_reaches_the_exact_log_likelihood_of_a_linear_gaussian_model(xp):
    n, k = 400, 1024  # 400 independent estimates of each L_j: their spread is the Monte Carlo error
    bounds, elbo, log_px, exact_elbo = linear_bounds(xp, k, n, chunk=100)  # 100: groups straddle chunks
    assert sorted(bounds) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    gap = log_px - exact_elbo  # the hidden KL(q(z|x) || p(z|x)), from the closed forms
    assert gap > 1.0  # q is far enough from the posterior for the gap to be worth closing
    means = {j: v.mean() for j, v in bounds.items()}
    errors = {j: v.std(ddof=1) / math.sqrt(n) for j, v in bounds.items()}
    # L_1 is the ELBO: its mean matches the closed-form ELBO within the Monte Carlo error (and so does the ELBO
    # estimate from the same samples, with the analytic KL)
    assert abs(means[1] - exact_elbo) < 4 * errors[1]
    assert abs(elbo.mean() - exact_elbo) < 4 * elbo.std(ddof=1) / math.sqrt(n)
    # and L_k closes in on log p(x): at k = 1024 within its error, and within 2% of the gap it started from
    assert abs(means[k] - log_px) < 4 * errors[k] + 0.02 * gap
    assert log_px - means[k] < 0.02 * gap
    remaining = [log_px - means[j] for j in sorted(bounds)]
    assert all(r >= -4 * errors[j] for r, j in zip(remaining, sorted(bounds)))  # never above log p(x)
    assert remaining[0] > 20 * errors[1]  # the gap at k = 1 is measured, not noise


def test_the_bound_does_not_decrease_with_k_on_average(xp):
    n, k = 400, 256
    bounds, _, _, _ = linear_bounds(xp, k, n, chunk=64, seed=3)
    ks = sorted(bounds)
    for small, large in zip(ks, ks[1:]):
        diff = bounds[large] - bounds[small]  # per replicate, from the same samples
        assert diff.mean() > -3 * diff.std(ddof=1) / math.sqrt(n), (small, large)
    assert bounds[ks[-1]].mean() - bounds[1].mean() > 0.5  # and it does rise


def test_the_estimate_is_exact_when_q_is_the_true_posterior(xp):
    # with q = p(z|x) every weight is p(x): L_k = log p(x) for every k, with no Monte Carlo error at all.
    # (only with a diagonal posterior: make W's columns orthogonal)
    W, b, x, log_px, post_mean, post_cov = linear_gaussian()
    q, _ = numpy.linalg.qr(W)
    W = q * numpy.array([1.5, 0.7, 2.0])
    cov = W @ W.T + S2 * numpy.eye(D)
    log_px = -0.5 * ((x - b) @ numpy.linalg.solve(cov, x - b) + numpy.linalg.slogdet(cov)[1] + D * math.log(2 * math.pi))
    post_cov = numpy.linalg.inv(numpy.eye(d) + W.T @ W / S2)
    assert numpy.allclose(post_cov, numpy.diag(numpy.diag(post_cov)))
    post_mean = post_cov @ W.T @ (x - b) / S2
    Wd, bd, xd = xp.asarray(W), xp.asarray(b), xp.asarray(x)

    def log_px_given_z(z):
        r = xd - (z @ Wd.T + bd)
        return -0.5 * ((r * r).sum(axis=-1) / S2 + D * math.log(2 * math.pi * S2))

    rng = backend.rng(0)
    bounds, elbo = vae.importance_sampled_bounds(
        log_px_given_z, xp.asarray(post_mean[None]), xp.asarray(numpy.log(numpy.diag(post_cov))[None]), 16,
        chunk=5, draw_eps=lambda c: rng.standard_normal((c, 1, d)))
    for j, v in bounds.items():
        numpy.testing.assert_allclose(host(v), [log_px], rtol=0, atol=1e-9, err_msg=f"L_{j}")


# ---- on the VAE ------------------------------------------------------------------------------------------------

def tiny_model(recon="sse", objective="elbo", **kw):
    return VAE(image_size=16, preset="tiny", recon=recon, objective=objective, seed=2, **kw)


def images(n=3, seed=5):
    return backend.rng(seed).random((n, 3, 16, 16))


@pytest.mark.parametrize("recon", ["sse", "gaussian", "bce"])
def test_l1_is_the_elbo_with_the_same_noise(xp, f64, recon):
    model, x, k = tiny_model(recon, recon_variance=0.2), images(), 40
    bounds, elbo = model.importance_bounds(x, k, rng=backend.rng(7))
    eps = backend.rng(7).standard_normal((k, 3, model.latent_dim))  # the same noise, drawn in one piece
    # the ELBO from the same samples is VAE.evaluate's, constants included
    assert -elbo.mean() == pytest.approx(model.evaluate(x, eps=eps)["neg_elbo_nats"], rel=1e-12)
    # L_1, averaged over the k samples, is that ELBO with the KL replaced by its sampled value log q(z|x) - log p(z),
    # written here from the densities of z (not through eps as the estimator does)
    mu, logvar = model.in_eval(lambda: model.encode(x))
    mu, logvar, eps = host(mu), host(logvar), host(eps)
    z = mu + numpy.exp(0.5 * logvar) * eps
    log_q = -0.5 * (((z - mu) ** 2 / numpy.exp(logvar)) + logvar + math.log(2 * math.pi)).sum(axis=-1)
    log_p = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(axis=-1)
    sampled_kl = (log_q - log_p).mean(axis=0)
    analytic_kl = vae.kl_divergence(mu, logvar)
    numpy.testing.assert_allclose(bounds[1], elbo + analytic_kl - sampled_kl, rtol=1e-12, atol=1e-9)
    assert set(bounds) == {1, 2, 4, 8, 16, 32, 40}


def test_chunked_equals_one_chunk(xp, f64):
    model, x, k = tiny_model("gaussian", recon_variance=0.3), images(4), 37
    whole = model.importance_bounds(x, k, chunk=k, rng=backend.rng(3))
    for chunk in (1, 5, 16):
        part = model.importance_bounds(x, k, chunk=chunk, rng=backend.rng(3))
        assert sorted(part[0]) == sorted(whole[0])
        for j in whole[0]:
            numpy.testing.assert_allclose(part[0][j], whole[0][j], rtol=1e-13, err_msg=f"L_{j}, chunk {chunk}")
        numpy.testing.assert_allclose(part[1], whole[1], rtol=1e-13)


def test_accumulator_matches_a_direct_logsumexp_with_groups_across_chunks():
    r = numpy.random.default_rng(0)
    log_w = r.standard_normal((50, 3)) * 30 - 7000  # thousands of nats, spread wide: exp would underflow
    acc = vae.ImportanceBounds([1, 4, 7, 50], numpy)
    for piece in numpy.split(log_w, [3, 4, 20, 31]):
        acc.add(piece)
    got = acc.bounds()
    for k in (1, 4, 7, 50):
        groups = log_w[: len(log_w) // k * k].reshape(-1, k, 3)
        top = groups.max(axis=1)
        direct = (top + numpy.log(numpy.exp(groups - top[:, None]).sum(axis=1)) - math.log(k)).mean(axis=0)
        numpy.testing.assert_allclose(got[k], direct, rtol=1e-14)
    with pytest.raises(ValueError, match="cannot report L_64"):
        vae.importance_sampled_bounds(None, numpy.zeros((1, 2)), numpy.zeros((1, 2)), 32, None, 4, ks=[64])


def test_prior_mc_model_is_importance_sampled_with_the_prior_as_proposal(xp, f64):
    # q = p(z): the weights are p(x|z), so -L_k is exactly the prior Monte Carlo estimate from the same draws
    model, x, k = tiny_model(objective="prior-mc"), images(), 24
    bounds, elbo = model.importance_bounds(x, k, rng=backend.rng(9))
    z = backend.rng(9).standard_normal((k, 3, model.latent_dim))
    nll = model.in_eval(lambda: model.recon.nll(x, model.decode(z))) + model.recon.nats_offset(x[0].size)
    numpy.testing.assert_allclose(-bounds[k], host(vae.prior_mc_nll(nll)), rtol=1e-13)
    numpy.testing.assert_allclose(-elbo, host(nll.mean(axis=0)), rtol=1e-13)  # KL = 0 with q = p
    # its "reconstruction" is its best prior draw: for each image, no other draw of the same 64 comes closer
    recon = host(model.reconstruct(x, rng=backend.rng(4)))
    zs = backend.rng(4).standard_normal((vae.PRIOR_RECON_SAMPLES, 3, model.latent_dim))
    outs = host(model.in_eval(lambda: model.decode(zs)))
    err = ((outs - host(x)) ** 2).sum(axis=(2, 3, 4))
    numpy.testing.assert_allclose(((recon - host(x)) ** 2).sum(axis=(1, 2, 3)), err.min(axis=0), rtol=1e-12)


def test_estimate_uses_eval_mode_and_leaves_the_mode_alone(f64):
    model, x = tiny_model(), images(4)
    model.train()
    a = model.importance_bounds(x, 8, rng=backend.rng(1))[0][8]
    assert model.training
    # the first image alone, with the noise it had in the batch of 4, gets the same estimate: eval-mode BatchNorm
    # treats images one by one (in training mode the batch's statistics would change it)
    eps = backend.rng(1).standard_normal((8, 4, model.latent_dim))
    one = model.importance_bounds(x[:1], 8, rng=_FixedNoise(eps[:, :1]))[0][8]
    numpy.testing.assert_allclose(one, a[:1], rtol=1e-12)


class _FixedNoise:
    """A generator stand-in that hands out the given noise, chunk after chunk."""

    def __init__(self, eps):
        self.eps, self.at = eps, 0

    def standard_normal(self, shape):
        out = self.eps[self.at:self.at + shape[0]]
        self.at += shape[0]
        assert out.shape == tuple(shape)
        return out


# ---- the learned decoder variance -------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_learned_variance_is_a_parameter_saved_and_updated(tmp_path, engine):
    model = tiny_model("gaussian", recon_variance="learned", engine=engine)
    name = vae.LearnedGaussianNLL.PARAM
    assert name in dict((n, p) for n, p, _ in model.named_parameters())
    assert host(model.state_dict()[name]) == pytest.approx([math.log(0.5)])  # starts at the derivation's 1/2
    if engine == "fast":  # flattened with the rest, so the fast Adam updates it with them
        from scratchvae.fast.workspace import flat_parameters
        assert flat_parameters(model) is not None
    opt = model.make_optimizer(lr=1e-2)
    before = model.recon.current_variance()
    x = images(8).astype(numpy.float32)
    for s in range(3):
        model.train_step(x, opt, rng=backend.rng(s))
    after = model.recon.current_variance()
    assert after < before  # the pixels' error is far below 1/2 per pixel: s^2 falls
    model.save(tmp_path / "m.npz")
    loaded = VAE.load(tmp_path / "m.npz")
    assert loaded.recon.current_variance() == after
    assert loaded.config["recon_variance"] == "learned"


def test_learned_variance_gradient_by_finite_differences(f64):
    model, x = tiny_model("gaussian", recon_variance="learned"), images(3)
    name = vae.LearnedGaussianNLL.PARAM
    model.params[name][...] = math.log(0.07)
    eps = backend.rng(3).standard_normal((2, 3, model.latent_dim))
    model.zero_grad()
    model.forward_backward(x, eps=eps)
    analytic = float(model.grads[name][0])
    h, t = 1e-5, model.params[name]
    t[0] += h
    plus = float(model.loss(x, eps))
    t[0] -= 2 * h
    minus = float(model.loss(x, eps))
    t[0] += h
    numeric = (plus - minus) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-7)
    assert abs(analytic) > 100  # far from its optimum, so the check is not 0 == 0


def test_learned_variance_term_gradients_against_finite_differences(f64):
    # the reconstruction term alone, as a function of the decoder output and of t = log s^2
    module = vae.Module()
    term = vae.LearnedGaussianNLL(0.3)
    term.attach(module)
    r = numpy.random.default_rng(0)
    x, out = r.random((2, 3, 4, 4)), r.random((3, 2, 3, 4, 4))

    def forward(out, t):
        module.params[term.PARAM] = t
        return term.nll(x, out)

    def backward(dnll):
        module.grads[term.PARAM] = numpy.zeros(1)
        return term.nll_backward(dnll, x, out), module.grads[term.PARAM]

    report = check_function(forward, backward, {"out": out, "t": numpy.array([math.log(0.3)])}, backend.rng(1), tol=1e-6)
    assert max(report.values()) < 1e-6


def test_learned_variance_reaches_the_per_pixel_squared_error(f64):
    # with the decoder outputs fixed, gradient descent on t alone ends where s^2 = mean SSE / D
    module = vae.Module()
    term = vae.LearnedGaussianNLL(0.5)
    term.attach(module)
    r = numpy.random.default_rng(1)
    x = r.random((5, 3, 8, 8))
    out = numpy.clip(x[None] + 0.05 * r.standard_normal((2,) + x.shape), 0, 1)
    mse = ((out - x) ** 2).mean()
    dnll = numpy.full((2, 5), 1 / 10)  # the batch mean, as elbo_loss_backward gives it
    for _ in range(200):
        module.grads[term.PARAM][...] = 0
        term.nll(x, out)
        term.nll_backward(dnll, x, out)
        module.params[term.PARAM] -= module.grads[term.PARAM] / (0.5 * x[0].size)  # Newton: d2/dt2 = D/2 at the optimum
    assert term.current_variance() == pytest.approx(mse, rel=1e-9)
    assert mse < 0.01  # far from where it started


def test_fixed_variance_is_beta(f64):
    # SSE / (2 s^2) + KL and SSE + 2 s^2 KL have parallel gradients: the network's gradients of the first,
    # times 2 s^2, are those of the squared error with beta = 2 s^2. Likewise for the learned s^2 held at that value.
    s2, x = 0.15, images(3)
    eps = backend.rng(2).standard_normal((1, 3, 4))
    grads = {}
    for key, kw in (("gaussian", dict(recon="gaussian", recon_variance=s2)),
                    ("sse", dict(recon="sse", beta=2 * s2)),
                    ("learned", dict(recon="gaussian", recon_variance="learned"))):
        model = tiny_model(**kw)
        if key == "learned":
            model.params[vae.LearnedGaussianNLL.PARAM][...] = math.log(s2)
        model.zero_grad()
        model.forward_backward(x, eps=eps)
        grads[key] = {n: g.copy() for n, _, g in model.named_parameters() if n != vae.LearnedGaussianNLL.PARAM}
    for n, g in grads["sse"].items():
        numpy.testing.assert_allclose(grads["gaussian"][n] * 2 * s2, g, rtol=1e-9, atol=1e-12, err_msg=n)
        numpy.testing.assert_allclose(grads["learned"][n], grads["gaussian"][n], rtol=1e-12, atol=1e-15, err_msg=n)


def test_learned_variance_needs_the_gaussian_decoder():
    with pytest.raises(ValueError, match="needs recon 'gaussian'"):
        tiny_model("sse", recon_variance="learned")
