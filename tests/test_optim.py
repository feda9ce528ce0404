"""Adam and SGD (the textbook ``scratchvae.optim``) against two steps worked out by hand, and their state round trip."""
import numpy
import pytest

from scratchvae import backend
from scratchvae.optim import SGD, Adam


def two_steps(xp, opt_cls, **kw):
    p = xp.asarray([1.0, -2.0])
    g = xp.zeros(2)
    opt = opt_cls([("p", p, g)], **kw)
    for grad in ([0.5, -1.0], [0.1, 0.2]):
        g[...] = xp.asarray(grad)
        opt.step()
    return backend.to_host(p), opt


def test_sgd_momentum_two_steps_by_hand(xp):
    # step 1: v = g1 = [0.5, -1];                p = [1, -2] - 0.1 v = [0.95, -1.9]
    # step 2: v = 0.9 [0.5, -1] + [0.1, 0.2] = [0.55, -0.7];  p = [0.95 - 0.055, -1.9 + 0.07]
    p, _ = two_steps(xp, SGD, lr=0.1, momentum=0.9)
    numpy.testing.assert_allclose(p, [0.895, -1.83], rtol=1e-14)


def test_sgd_plain_and_weight_decay(xp):
    # no momentum, decay 0.5: g' = g + 0.5 p.  step 1: g' = [1.0, -2.0] -> p = [0.9, -1.8]
    # step 2: g' = [0.1 + 0.45, 0.2 - 0.9] = [0.55, -0.7] -> p = [0.845, -1.73]
    p, _ = two_steps(xp, SGD, lr=0.1, weight_decay=0.5)
    numpy.testing.assert_allclose(p, [0.845, -1.73], rtol=1e-14)


def test_adam_two_steps_by_hand(xp):
    # lr 0.1, betas (0.9, 0.999), eps 1e-8.
    # step 1: m = 0.1 g1 = [0.05, -0.1], v = 0.001 g1^2 = [2.5e-4, 1e-3]; m^ = g1, v^ = g1^2,
    #         so the step is lr * sign(g1) (up to eps): p = [0.9, -1.9]
    # step 2: m = 0.9 m + 0.1 g2 = [0.055, -0.07];  v = 0.999 v + 0.001 g2^2 = [2.5975e-4, 1.039e-3]
    #         m^ = m / (1 - 0.9^2) = m / 0.19;      v^ = v / (1 - 0.999^2) = v / 0.001999
    #         p -= 0.1 m^ / (sqrt(v^) + 1e-8)
    m = numpy.array([0.055, -0.07]) / 0.19
    v = numpy.array([2.5975e-4, 1.039e-3]) / 0.001999
    step1 = 0.1 * numpy.array([0.5, -1.0]) / (numpy.abs([0.5, -1.0]) + 1e-8)
    want = numpy.array([1.0, -2.0]) - step1 - 0.1 * m / (numpy.sqrt(v) + 1e-8)
    p, opt = two_steps(xp, Adam, lr=0.1)
    assert opt.t == 2
    numpy.testing.assert_allclose(p, want, rtol=1e-12)
    numpy.testing.assert_allclose(p, [0.8196959, -1.8488974], atol=1e-7)  # the same, to 7 places


def test_adam_state_round_trip_continues_identically(xp):
    p1, opt1 = two_steps(xp, Adam, lr=0.1)
    state = {k: (backend.to_host(v) if hasattr(v, "shape") else v) for k, v in opt1.state_dict().items()}
    p2 = xp.asarray(p1.copy())
    g2 = xp.asarray([0.3, -0.4])
    opt2 = Adam([("p", p2, g2)], lr=0.5)
    opt2.load_state_dict(state)
    assert opt2.t == 2 and opt2.lr == pytest.approx(0.1)
    opt1.params[0][2][...] = xp.asarray([0.3, -0.4])
    opt1.step(), opt2.step()
    numpy.testing.assert_array_equal(backend.to_host(opt1.params[0][1]), backend.to_host(p2))
    with pytest.raises(KeyError, match="q"):
        opt2.load_state_dict({"t": 1, "lr": 0.1, "q/m": numpy.zeros(2)})
