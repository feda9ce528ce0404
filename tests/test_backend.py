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
