"""The tests' stand-in for CuPy's user-defined kernels (``standin_kernels``) follows CuPy's rules where the package's
kernels depend on them: raw inputs read by logical index, broadcasting, typed scalars; and refuses what CuPy would
not do right (host arrays, reads outside a raw array)."""
import numpy
import pytest
from strict_device import HostDeviceMixError, use_strict_device


def test_a_raw_input_is_read_in_the_c_order_of_its_own_shape_whatever_its_strides():
    with use_strict_device() as dev:
        kernel = dev.ElementwiseKernel("raw T x, int32 shift", "T y", "y = x[(i + shift) % 6]", name="read_raw")
        x = dev.arange(6.0).reshape(2, 3).T  # (3, 2), not contiguous: logical order 0 3 1 4 2 5
        y = kernel(x, 1, dev.empty(6))
        numpy.testing.assert_array_equal(y.view(numpy.ndarray), [3, 1, 4, 2, 5, 0])
        # a raw input takes no part in broadcasting: the output's shape sets the range of i
        z = kernel(dev.arange(6.0), 0, dev.empty((2, 2)))
        numpy.testing.assert_array_equal(z.view(numpy.ndarray), [[0, 1], [2, 3]])


def test_a_read_outside_a_raw_input_raises():
    with use_strict_device() as dev:
        kernel = dev.ElementwiseKernel("raw T x, int32 shift", "T y", "y = x[i + shift]", name="read_past")
        kernel(dev.arange(4.0), 1, dev.empty(3))  # reads 1..3: inside
        with pytest.raises(IndexError, match="1 reads"):
            kernel(dev.arange(4.0), 1, dev.empty(4))
        with pytest.raises(IndexError, match="2 reads"):
            kernel(dev.arange(4.0), -2, dev.empty(3))


def test_scalars_take_their_declared_type_and_host_arrays_are_refused():
    with use_strict_device() as dev:
        kernel = dev.ElementwiseKernel("T x, int32 k, float64 f", "T y", "y = x * k + f", name="scale_shift")
        y = kernel(dev.ones(3, dtype=numpy.float32), 2, 1)  # the 1 becomes a double
        assert y.dtype == numpy.float32
        numpy.testing.assert_array_equal(y.view(numpy.ndarray), 3)
        y = kernel(dev.ones(3, dtype=numpy.float64), -3, 0.5)
        numpy.testing.assert_array_equal(y.view(numpy.ndarray), -2.5)
        with pytest.raises(HostDeviceMixError):
            kernel(numpy.ones(3, dtype=numpy.float32), 2, 0.5)
