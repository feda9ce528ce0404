"""The library as a learner calls it: bad arguments and wrong inputs get a ValueError that names the problem and
what to do, at construction or at the call, on both engines; never a ZeroDivisionError, a broadcast error deep
in NumPy, a silently replaced value, or a bare AttributeError."""
import numpy
import pytest

from scratchvae import fast, layers
from scratchvae.vae import VAE


@pytest.mark.parametrize("kwargs,words", [
    ({"image_size": 0}, "image_size must be a whole number >= 1"),
    ({"image_size": -8}, "image_size must be a whole number >= 1"),
    ({"image_size": 2.5}, "image_size must be a whole number >= 1"),
    ({"image_size": 18}, "must be divisible by 2**2"),
    ({"latent_dim": 0}, "latent_dim must be a whole number >= 1"),
    ({"in_channels": 0}, "in_channels must be a whole number >= 1"),
    ({"mc_samples": 0}, "mc_samples must be a whole number >= 1"),
    ({"channels": (4, 0)}, "channels[1] must be a whole number >= 1"),
    ({"channels": ()}, "channels must name at least one encoder width"),
    ({"beta": -1}, "beta must be a finite number >= 0"),
    ({"beta": float("nan")}, "beta must be a finite number >= 0"),
    ({"beta": float("inf")}, "beta must be a finite number >= 0"),
    ({"recon": "gaussian", "recon_variance": 0.0}, "variance must be positive"),
    ({"recon": "l1"}, "unknown reconstruction 'l1'"),
    ({"objective": "iwae"}, "objective must be 'elbo' or 'prior-mc'"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"engine": "turbo"}, "unknown engine 'turbo'"),
])
def test_a_vae_with_bad_settings_is_refused_at_construction(kwargs, words):
    settings = {"image_size": 16, "preset": "tiny", **kwargs}
    with pytest.raises(ValueError) as error:
        VAE(**settings)
    assert words in str(error.value)


def test_latent_dim_zero_is_not_replaced_by_the_presets():
    assert VAE(image_size=16, preset="tiny", latent_dim=None).latent_dim == 4  # None: the preset's
    with pytest.raises(ValueError):
        VAE(image_size=16, preset="tiny", latent_dim=0)


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 16, 16), (2, 3, 16, 8), (3, 16, 16)])
@pytest.mark.parametrize("objective", ["elbo", "prior-mc"])
def test_a_vae_fed_images_of_another_shape_says_which_it_takes(engine, shape, objective):
    model = VAE(image_size=16, preset="tiny", engine=engine, objective=objective)
    x = numpy.zeros(shape, dtype=numpy.float32)
    for call in (model.encode, model.reconstruct, model.evaluate, model.forward_backward):
        with pytest.raises(ValueError, match=r"this VAE takes images \(N, 3, 16, 16\).*image_size"):
            call(x)


@pytest.mark.parametrize("engine", [layers, fast], ids=["reference", "fast"])
@pytest.mark.parametrize("make,words", [
    (lambda L: L.Conv2d(3, 4, 3, stride=0), "Conv2d's stride must be an integer >= 1"),
    (lambda L: L.Conv2d(3, 4, 0), "Conv2d's kernel_size must be an integer >= 1"),
    (lambda L: L.Conv2d(3, 4, 3, padding=-1), "Conv2d's padding must be an integer >= 0"),
    (lambda L: L.Conv2d(0, 4, 3), "Conv2d's in_channels must be an integer >= 1"),
    (lambda L: L.Conv2d(3, 4, (3, 1.5)), "Conv2d's kernel_size must be an integer >= 1"),
    (lambda L: L.ConvTranspose2d(3, 4, 3, stride=0), "ConvTranspose2d's stride must be an integer >= 1"),
    (lambda L: L.ConvTranspose2d(3, 4, 3, stride=2, output_padding=2), "output_padding must be in [0, stride)"),
    (lambda L: L.ConvTranspose2d(3, 0, 3), "ConvTranspose2d's out_channels must be an integer >= 1"),
    (lambda L: L.Linear(0, 3), "Linear's in_features must be an integer >= 1"),
    (lambda L: L.BatchNorm2d(0), "BatchNorm2d's num_features must be an integer >= 1"),
    (lambda L: L.LeakyReLU(-0.5), "slope must lie in [0, 1]"),
])
def test_a_layer_with_bad_settings_is_refused_at_construction(engine, make, words):
    with pytest.raises(ValueError) as error:
        make(engine)
    assert words in str(error.value)


@pytest.mark.parametrize("engine", [layers, fast], ids=["reference", "fast"])
@pytest.mark.parametrize("make,shape,words", [
    (lambda L: L.BatchNorm2d(3), (2, 4, 4, 5), "BatchNorm2d expects 3 channels on the last axis"),
    (lambda L: L.Conv2d(3, 4, 3), (2, 3, 8, 8), r"Conv2d expects 3 input channels, channels-last \(NHWC"),
    (lambda L: L.Conv2d(3, 4, 3), (2, 8, 3), r"Conv2d expects 3 input channels"),
    (lambda L: L.Conv2d(3, 4, 5), (2, 3, 3, 3), "does not fit 3x3 images"),
    (lambda L: L.ConvTranspose2d(2, 4, 3), (2, 5, 5, 3), "ConvTranspose2d expects 2 input channels"),
    (lambda L: L.ConvTranspose2d(2, 4, 3, padding=5), (1, 2, 2, 2), "crops the whole"),
    (lambda L: L.Linear(5, 3), (2, 4), r"Linear expects inputs \(N, 5\)"),
])
def test_a_layer_fed_the_wrong_shape_says_what_it_expects(engine, make, shape, words):
    with pytest.raises(ValueError, match=words):
        make(engine).forward(numpy.zeros(shape, dtype=numpy.float32))


@pytest.mark.parametrize("engine", [layers, fast], ids=["reference", "fast"])
@pytest.mark.parametrize("make,shape", [
    (lambda L: L.Linear(4, 3), (2, 3)),
    (lambda L: L.Conv2d(2, 3, 3, padding=1), (1, 4, 4, 3)),
    (lambda L: L.ConvTranspose2d(2, 3, 3, stride=2), (1, 5, 5, 3)),
    (lambda L: L.BatchNorm2d(3), (2, 4, 4, 3)),
    (lambda L: L.LeakyReLU(), (2, 3)),
    (lambda L: L.Sigmoid(), (2, 3)),
    (lambda L: L.Sequential(L.BatchNorm2d(3), L.LeakyReLU()), (2, 4, 4, 3)),
])
def test_backward_before_forward_says_to_call_forward_first(engine, make, shape):
    with pytest.raises(AttributeError, match=r"call forward\(\) first"):
        make(engine).backward(numpy.ones(shape, dtype=numpy.float32))


def test_a_missing_attribute_is_still_an_attribute_error_for_hasattr_and_copies():
    import copy  # noqa: PLC0415

    layer = layers.Linear(2, 2)
    assert not hasattr(layer, "x") and not hasattr(layer, "__deepcopy__")
    assert copy.deepcopy(layer).params["W"].shape == (2, 2)
