"""The backend's random generators: fixed by their seed, on the device under test, standard normal draws."""
import numpy

from scratchvae import backend
from strict_device import use_strict_device


def draws(seed, n=200_000):
    return backend.to_host(backend.rng(seed).standard_normal(n))


def test_a_generator_is_fixed_by_its_seed_and_draws_standard_normals(xp):
    assert backend.array_module(backend.rng(0).standard_normal(3)) is xp
    a, again, other = draws((3, 2, 7)), draws((3, 2, 7)), draws((3, 2, 8))
    numpy.testing.assert_array_equal(a, again)  # a resumed run redraws exactly the noise of each step
    n = len(a)
    for x in (a, other):  # the mean within 5 of its standard errors, the variance within 5 of its
        assert abs(x.mean()) < 5 / n ** 0.5 and abs(x.var() - 1) < 5 * (2 / n) ** 0.5
    assert abs(numpy.corrcoef(a, other)[0, 1]) < 5 / n ** 0.5  # another step's seed: another stream


def test_a_generator_on_the_stand_in_device_draws_device_arrays():
    with use_strict_device():  # the GPU branch of backend.rng, on the tests' stand-in for CuPy
        generator = backend.rng((1, 2))
        # Philox, whose set-up is a counter: XORWOW's (CuPy's default) skips every thread's state ahead
        assert generator.bit_generator_name == "Philox4x3210"
        x = generator.random((3, 4))
        assert backend.is_device_array(x)
        numpy.testing.assert_array_equal(backend.to_host(x), numpy.random.default_rng(backend.seed_to_int((1, 2)))
                                         .random((3, 4)))


def test_seeds_fold_into_distinct_63_bit_integers():
    seeds = [0, 1, (0, 2, 1), (0, 2, 2), (0, 1, 2), (2**40, 5)]
    folded = [backend.seed_to_int(s) for s in seeds]
    assert all(0 <= f < 2**63 for f in folded) and len(set(folded)) == len(seeds)
    assert folded == [backend.seed_to_int(s) for s in seeds]


def test_a_fused_formula_gives_the_formulas_numbers(xp):
    """``backend.fused`` runs a formula as written on NumPy (and the stand-in), and as one ``cupy.fuse`` kernel on
    CuPy arrays: there, the VAE's fused formulas (broadcasting included) agree with the same operations one by
    one to float32 rounding, and to float64 rounding in float64."""
    from scratchvae import vae  # noqa: PLC0415

    rng = numpy.random.default_rng(40)
    for dtype, rtol in ((numpy.float32, 1e-6), (numpy.float64, 1e-14)):
        mu, logvar = (xp.asarray(rng.standard_normal((5, 3)).astype(dtype)) for _ in range(2))
        eps = xp.asarray(rng.standard_normal((2, 5, 3)).astype(dtype))
        for fn, args in ((vae.kl_per_dimension, (mu, logvar)), (vae.reparameterize, (mu, logvar, eps))):
            got = fn(*args)
            assert backend.array_module(got) is xp and got.dtype == dtype
            want = fn.formula(*args)  # the operations one by one
            numpy.testing.assert_allclose(backend.to_host(got), backend.to_host(want), rtol=rtol, atol=rtol)
            if xp is numpy:
                numpy.testing.assert_array_equal(got, want)
    with use_strict_device() as dev:  # the stand-in runs the formula itself, operation by operation
        a = dev.asarray(numpy.ones(3))
        assert backend.is_device_array(vae.kl_per_dimension(a, a))
