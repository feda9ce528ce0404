"""The ELBO's pieces and the whole model against finite differences (float64), closed forms and statistics."""
import math

import numpy
import pytest

from scratchvae import backend, vae
from scratchvae.gradcheck import check_function, compare, directional_check
from scratchvae.optim import Adam
from scratchvae.vae import VAE

TOL = 1e-6          # element-wise relative error for the functions (see scratchvae.gradcheck)
MODEL_TOL = 1e-6    # the whole model: element-wise on small tensors, directional on the rest
MEASURED = {}


def record(name, report):
    err = max(report.values()) if isinstance(report, dict) else report
    MEASURED[name] = max(MEASURED.get(name, 0.0), err)


def randn(*shape, seed=0):
    return backend.rng(seed).standard_normal(shape).astype(numpy.float64)


def host(a):
    return backend.to_host(a)


# ---- reparameterization ----------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 3])
def test_reparameterize_gradients(xp, f64, m):
    mu, logvar, eps = randn(4, 5, seed=1), randn(4, 5, seed=2), randn(m, 4, 5, seed=3)
    z = vae.reparameterize(mu, logvar, eps)
    numpy.testing.assert_allclose(host(z), host(mu) + numpy.exp(0.5 * host(logvar)) * host(eps), rtol=1e-14)
    report = check_function(lambda mu, lv: vae.reparameterize(mu, lv, eps),
                            lambda dz: vae.reparameterize_backward(dz, logvar, eps),
                            {"mu": mu, "logvar": logvar}, backend.rng(4), tol=TOL)
    record(f"reparameterize (m={m})", report)


def test_reparameterize_samples_have_the_posterior_moments(xp):
    mu, logvar = xp.asarray([[0.5, -2.0]]), xp.asarray([[math.log(0.25), math.log(4.0)]])
    z = host(vae.reparameterize(mu, logvar, backend.rng(0).standard_normal((200_000, 1, 2))))
    numpy.testing.assert_allclose(z.mean(axis=(0, 1)), [0.5, -2.0], atol=0.02)
    numpy.testing.assert_allclose(z.std(axis=(0, 1)), [0.5, 2.0], rtol=0.01)


# ---- KL ----------------------------------------------------------------------------------------------------

def test_kl_gradients(xp, f64):
    mu, logvar = randn(3, 6, seed=5), randn(3, 6, seed=6)
    report = check_function(vae.kl_divergence, lambda dkl: vae.kl_divergence_backward(dkl, mu, logvar),
                            {"mu": mu, "logvar": logvar}, backend.rng(7), tol=TOL)
    record("kl_divergence", report)


def test_kl_matches_the_general_gaussian_formula(xp, f64):
    """The derivation's KL(N(mu0, S0) || N(mu1, S1)) with mu1 = 0, S1 = I, evaluated with dense matrices."""
    mu, logvar = host(randn(2, 4, seed=8)), host(randn(2, 4, seed=9))
    got = host(vae.kl_divergence(xp.asarray(mu), xp.asarray(logvar)))
    for n in range(2):
        s0, s1 = numpy.diag(numpy.exp(logvar[n])), numpy.eye(4)
        diff = -mu[n]
        want = 0.5 * (numpy.trace(numpy.linalg.inv(s1) @ s0) + diff @ numpy.linalg.inv(s1) @ diff - 4
                      + numpy.log(numpy.linalg.det(s1) / numpy.linalg.det(s0)))
        assert got[n] == pytest.approx(want, rel=1e-12)
    assert float(vae.kl_divergence(xp.zeros((1, 3)), xp.zeros((1, 3)))[0]) == 0.0  # q = p


def test_kl_matches_monte_carlo_within_4_standard_errors(xp):
    """E_q[log q(z|x) - log p(z)] estimated from samples of q agrees with the analytic KL."""
    mu, logvar = xp.asarray([[0.8, -0.3, 1.5]]), xp.asarray([[-1.0, 0.5, -2.5]])
    n = 100_000
    eps = backend.rng(11).standard_normal((n, 1, 3))
    z = vae.reparameterize(mu, logvar, eps)
    log_q = (-0.5 * eps ** 2 - 0.5 * logvar - 0.5 * math.log(2 * math.pi)).sum(axis=2)
    log_p = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(axis=2)
    terms = host(log_q - log_p).ravel()
    estimate, stderr = terms.mean(), terms.std(ddof=1) / math.sqrt(n)
    analytic = float(vae.kl_divergence(mu, logvar)[0])
    assert abs(estimate - analytic) < 4 * stderr, (estimate, analytic, stderr)


# ---- reconstruction terms ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sse", "gaussian", "bce"])
@pytest.mark.parametrize("m", [1, 2])
def test_reconstruction_gradients(xp, f64, name, m):
    recon = vae.make_reconstruction(name, variance=0.3)
    x = backend.rng(12).random((3, 2, 4, 5))
    out = randn(m, 3, 2, 4, 5, seed=13) if name == "bce" else backend.rng(14).random((m, 3, 2, 4, 5))
    report = check_function(lambda o: recon.nll(x, o), lambda d: (recon.nll_backward(d, x, out),),
                            {"out": out}, backend.rng(15), tol=TOL)
    record(f"reconstruction {name}", report)


def test_reconstruction_values(xp, f64):
    x = backend.rng(16).random((2, 3, 4, 4))
    mean = backend.rng(17).random((1, 2, 3, 4, 4))
    hx, hm = host(x), host(mean)[0]
    d = hx[0].size
    sse = ((hx - hm) ** 2).reshape(2, -1).sum(1)
    numpy.testing.assert_allclose(host(vae.SquaredError().nll(x, mean))[0], sse, rtol=1e-12)
    # the Gaussian decoder's log density, written out, with variance 0.3
    s2 = 0.3
    logpdf = (-(hx - hm) ** 2 / (2 * s2) - 0.5 * numpy.log(2 * numpy.pi * s2)).reshape(2, -1).sum(1)
    numpy.testing.assert_allclose(host(vae.GaussianNLL(s2).nll(x, mean))[0], -logpdf, rtol=1e-12)
    # sigma^2 = 1/2: the squared error *is* -log p(x|z), up to the constant (D/2) log(pi)
    numpy.testing.assert_allclose(host(vae.GaussianNLL(0.5).nll(x, mean))[0],
                                  sse + vae.SquaredError().nats_offset(d), rtol=1e-12)
    # Bernoulli on logits equals binary cross-entropy on probabilities, and stays finite at +-1000
    logits = host(randn(1, 2, 3, 4, 4, seed=18))
    p = 1 / (1 + numpy.exp(-logits[0]))
    bce = -(hx * numpy.log(p) + (1 - hx) * numpy.log(1 - p)).reshape(2, -1).sum(1)
    numpy.testing.assert_allclose(host(vae.BernoulliNLL().nll(x, xp.asarray(logits)))[0], bce, rtol=1e-12)
    extreme = xp.full((1, 2, 3, 4, 4), 1000.0)
    assert numpy.isfinite(host(vae.BernoulliNLL().nll(x, extreme))).all()
    assert numpy.isfinite(host(vae.BernoulliNLL().nll_backward(xp.ones((1, 2)), x, -extreme))).all()


# ---- the loss, and the prior Monte-Carlo objective -------------------------------------------------------

def test_elbo_loss_gradients(xp, f64):
    nll, kl = backend.rng(19).random((3, 4)) * 10, backend.rng(20).random(4)
    loss, recon, kl_out = vae.elbo_loss(nll, kl, beta=2.5)
    assert float(loss) == pytest.approx(float((nll.mean(0) + 2.5 * kl).mean()), rel=1e-14)
    numpy.testing.assert_allclose(host(recon), host(nll.mean(0)), rtol=1e-14)
    report = check_function(lambda n, k: vae.elbo_loss(n, k, 2.5)[0],
                            lambda d: tuple(g * d for g in vae.elbo_loss_backward(nll, 2.5)),
                            {"nll": nll, "kl": kl}, backend.rng(21), tol=TOL)
    record("elbo_loss", report)


def test_prior_mc_objective_value_and_gradients(xp, f64):
    nll = backend.rng(22).random((5, 3)) * 50
    want = -numpy.log(numpy.mean(numpy.exp(-host(nll).astype(numpy.longdouble)), axis=0))
    numpy.testing.assert_allclose(host(vae.prior_mc_nll(nll)), want.astype(numpy.float64), rtol=1e-12)
    report = check_function(vae.prior_mc_nll, lambda d: (vae.prior_mc_nll_backward(d, nll),),
                            {"nll": nll}, backend.rng(23), tol=TOL)
    record("prior_mc_nll", report)
    # huge likelihood gaps (a sum over 12288 pixels) must not overflow the log-sum-exp
    big = xp.asarray([[1e5], [1e5 + 800.0]])
    assert float(vae.prior_mc_nll(big)[0]) == pytest.approx(1e5 + math.log(2), rel=1e-12)


# ---- the whole model ---------------------------------------------------------------------------------------

def tiny_model(engine="reference", **kw):
    model = VAE(image_size=8, preset="tiny", seed=3, engine=engine, **kw)
    model.train()
    return model


MODEL_H = 1e-5  # small enough that no LeakyReLU input crosses its kink between the two evaluations


def model_gradcheck(model, x, eps, name):
    """Element-wise check for tensors up to 200 numbers, directional check over everything."""
    model.zero_grad()
    model.forward_backward(x, eps=eps)
    analytic = {n: g.copy() for n, _, g in model.named_parameters()}
    params = {n: p for n, p, _ in model.named_parameters()}
    loss_fn = lambda: model.loss(x, eps)  # noqa: E731
    small = {n: p for n, p in params.items() if p.size <= 200}
    report = compare(small, analytic, loss_fn, eps=MODEL_H, tol=MODEL_TOL)
    big = {n: p for n, p in params.items() if p.size > 200}
    for n in big:  # every large tensor along its own random direction, then all tensors together
        report[n] = directional_check(loss_fn, {n: big[n]}, analytic, backend.rng(len(n)), MODEL_H, 2)
    report["<all tensors>"] = directional_check(loss_fn, params, analytic, backend.rng(99), MODEL_H, 3)
    record(name, report)
    assert set(report) >= set(params)
    assert max(report.values()) < MODEL_TOL, report
    return report


@pytest.mark.parametrize("m", [1, 2])
def test_whole_model_gradients_with_batchnorm_in_train_mode(xp, f64, engine, m):
    model = tiny_model(engine, mc_samples=m, beta=1.5)
    x = backend.rng(30).random((3, 3, 8, 8))
    eps = randn(m, 3, 4, seed=31)
    model_gradcheck(model, x, eps, f"VAE end to end ({engine}, sse, m={m})")


@pytest.mark.parametrize("kw", [{"recon": "bce"}, {"recon": "gaussian", "recon_variance": 0.2},
                                {"objective": "prior-mc", "mc_samples": 3}, {"in_channels": 1}])
def test_whole_model_gradients_other_objectives(xp, f64, engine, kw):
    model = tiny_model(engine, **kw)
    m = kw.get("mc_samples", 1)
    x = backend.rng(32).random((2, kw.get("in_channels", 3), 8, 8))
    model_gradcheck(model, x, randn(m, 2, 4, seed=33), f"VAE end to end ({engine}, {kw})")


def test_beta_scales_exactly_the_kl_part_of_the_gradient(xp, f64):
    x, eps = backend.rng(34).random((3, 3, 8, 8)), randn(1, 3, 4, seed=35)
    grads = {}
    model = tiny_model()
    for beta in (0.0, 1.0, 4.0):
        model.beta = beta
        model.zero_grad()
        model.forward_backward(x, eps=eps)
        grads[beta] = {n: host(g).copy() for n, _, g in model.named_parameters()}
    for n in grads[0.0]:
        kl_part = grads[1.0][n] - grads[0.0][n]
        numpy.testing.assert_allclose(grads[4.0][n], grads[0.0][n] + 4.0 * kl_part, rtol=1e-9, atol=1e-12)
    # the decoder never sees the KL; the mu head's bias gets exactly beta * mean(mu) from it
    assert numpy.abs(grads[1.0]["decoder.0.W"] - grads[0.0]["decoder.0.W"]).max() == 0.0
    mu = host(model.encode(x)[0])
    numpy.testing.assert_allclose(grads[1.0]["fc_mu.b"] - grads[0.0]["fc_mu.b"], mu.mean(axis=0), rtol=1e-9)


def test_logvar_is_clamped_so_exp_stays_finite(xp):
    model = VAE(image_size=8, preset="tiny")
    model.fc_logvar.params["b"][...] = 1e4  # an encoder gone wild
    x = backend.rng(36).random((2, 3, 8, 8)).astype(numpy.float32)
    mu, logvar = model.encode(x)
    assert float(logvar.max()) == vae.LOGVAR_MAX
    model.zero_grad()
    loss, _, kl = model.forward_backward(x)
    assert numpy.isfinite(float(loss)) and numpy.isfinite(host(kl)).all()
    # beyond the clamp the logvar head gets no gradient (it cannot be pushed further out)
    assert float(xp.abs(model.fc_logvar.grads["b"]).max()) == 0.0


def test_sample_and_reconstruct_shapes_and_ranges(xp):
    for recon in ("sse", "bce"):
        model = VAE(image_size=16, preset="tiny", recon=recon)
        x = backend.rng(37).random((5, 3, 16, 16)).astype(numpy.float32)
        for images in (model.sample(4), model.reconstruct(x)):
            h = host(images)
            assert h.dtype == numpy.float32 and h.min() >= 0.0 and h.max() <= 1.0
        assert model.sample(4).shape == (4, 3, 16, 16)
        assert model.reconstruct(x).shape == x.shape
        assert model.training  # the eval-mode helpers restore the mode they found


def test_reconstruct_uses_the_posterior_mean_in_eval_mode(xp):
    model = VAE(image_size=16, preset="tiny")
    x = backend.rng(38).random((3, 3, 16, 16)).astype(numpy.float32)
    model.train_step(x, Adam(model))  # moves the running statistics off their defaults
    model.eval()
    want = model.decode(model.encode(x)[0])
    model.train()
    numpy.testing.assert_array_equal(host(model.reconstruct(x)), host(want))
    # batch-independent (up to float32 rounding, as BLAS blocks a 1-image product differently)
    numpy.testing.assert_allclose(host(model.reconstruct(x[:1])), host(want[:1]), rtol=1e-5)


def test_evaluate_reports_a_bound_in_nats_and_bits(xp):
    x = backend.rng(39).random((4, 3, 16, 16)).astype(numpy.float32)
    eps = backend.rng(40).standard_normal((1, 4, 4)).astype(numpy.float32)
    sse, gauss = VAE(image_size=16, preset="tiny"), VAE(image_size=16, preset="tiny", recon="gaussian")
    a, b = sse.evaluate(x, eps=eps), gauss.evaluate(x, eps=eps)
    d = x[0].size
    assert a["neg_elbo_nats"] == pytest.approx(a["recon"] + a["kl"] + 0.5 * d * math.log(math.pi), rel=1e-6)
    assert a["bits_per_dim"] == pytest.approx(a["neg_elbo_nats"] / (d * math.log(2)), rel=1e-12)
    # sigma^2 = 1/2 Gaussian and the squared error are the same model: the same bound, constant included
    assert b["neg_elbo_nats"] == pytest.approx(a["neg_elbo_nats"], rel=1e-5)
    assert 0 < a["mse"] < 1 and a["kl"] >= 0


def test_save_and_load_round_trip(xp, tmp_path, engine):
    """A model saved by one engine loads in both, with every array and the same reconstructions."""
    model = VAE(image_size=16, preset="tiny", latent_dim=3, recon="bce", beta=2.0, engine=engine)
    x = backend.rng(41).random((3, 3, 16, 16)).astype(numpy.float32)
    model.train_step(x, model.make_optimizer())
    model.save(tmp_path / "m.npz")
    for other in ("reference", "fast"):
        again = VAE.load(tmp_path / "m.npz", engine=other)
        assert again.config == model.config and again.engine == other
        for (n, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
            numpy.testing.assert_array_equal(host(a), host(b), err_msg=n)
        numpy.testing.assert_allclose(host(model.reconstruct(x)), host(again.reconstruct(x)), rtol=1e-5, atol=1e-6)


def test_train_step_refuses_a_nan_batch_without_updating(xp, engine):
    model = VAE(image_size=16, preset="tiny", engine=engine)
    before = {n: host(p).copy() for n, p in model.state_dict().items()}
    assert any("running_mean" in n for n in before)
    x = xp.full((2, 3, 16, 16), float("nan"), dtype=numpy.float32)
    with pytest.raises(vae.NonFiniteLossError, match="not updated"):
        model.train_step(x, model.make_optimizer())
    for n, p in model.state_dict().items():  # parameters and BatchNorm's running statistics
        numpy.testing.assert_array_equal(host(p), before[n], err_msg=n)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        VAE(image_size=60)
    with pytest.raises(ValueError, match="preset"):
        VAE(preset="huge")
    with pytest.raises(ValueError, match="reconstruction"):
        VAE(preset="tiny", image_size=16, recon="l1")


def smooth_images(n, size, seed, channels=3):
    """Blurry colour blobs: low-resolution noise upsampled, so a small model can fit them."""
    low = numpy.random.default_rng(seed).random((n, channels, 4, 4))
    return numpy.kron(low, numpy.ones((size // 4, size // 4))).astype(numpy.float32)


def copy_and_draw(engine="fast"):
    """Noise a model draws with no generator passed (``VAE.own_rng``): its first ``draw_eps``, then, after a
    deep copy of it, ``[(draw_eps, sample) of the model, (draw_eps, sample) of the copy]``."""
    import copy  # noqa: PLC0415

    model = VAE(image_size=16, preset="tiny", seed=5, engine=engine)
    first = host(model.draw_eps(3))
    clone = copy.deepcopy(model)
    assert type(clone) is type(model)  # a copy keeps its engine
    return first, [(host(m.draw_eps(3)), host(m.sample(2))) for m in (model, clone)]


def test_a_deep_copy_draws_the_noise_the_original_draws_next(xp, engine):
    first, (nxt, clone_nxt) = copy_and_draw(engine)
    for got, want in zip(clone_nxt, nxt):
        numpy.testing.assert_array_equal(got, want)
    assert not numpy.array_equal(first, nxt[0])  # each call draws new noise


def test_a_model_on_the_gpu_can_be_deep_copied():
    """CuPy's generators cannot be copied; the stand-in device's refuse too, so a model that kept one would fail."""
    from strict_device import use_strict_device  # noqa: PLC0415

    with use_strict_device():
        first, (nxt, clone_nxt) = copy_and_draw()
    numpy.testing.assert_array_equal(clone_nxt[0], nxt[0])


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1], ids=["rgb", "grayscale"])
def test_small_model_overfits_one_batch(xp, channels):
    """The small preset on one fixed batch of 16 images: the loss falls by a clear factor in 150 steps."""
    model = VAE(image_size=32, preset="small", seed=0, in_channels=channels)
    x = xp.asarray(smooth_images(16, 32, seed=0, channels=channels))
    opt = model.make_optimizer(lr=2e-3)
    losses = [model.train_step(x, opt, rng=backend.rng((0, step)))["loss"] for step in range(150)]
    first, last = numpy.mean(losses[:5]), numpy.mean(losses[-5:])
    MEASURED[f"overfit loss ratio, {channels} channel(s) (first/last 5 steps)"] = first / last
    assert last < first / 4, (first, last)


def test_report_measured_errors(capsys):
    """Prints the largest errors the checks above measured (for the issue note)."""
    with capsys.disabled():
        for name, err in sorted(MEASURED.items()):
            print(f"\n  {name:60s} {err:.3g}", end="")
        print()
    assert all(err <= MODEL_TOL for name, err in MEASURED.items() if "ratio" not in name)
