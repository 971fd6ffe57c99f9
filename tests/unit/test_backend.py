"""Device choice: auto/cpu/cuda[:N], clear errors where CuPy or a GPU is missing."""

from __future__ import annotations

import types

import numpy as np
import pytest
from scipy import ndimage

from maskworks import backend
from maskworks.io import InputError

GPU = backend.resolve_device("auto") != "cpu"  # cupy imports and a device is visible


def fake_cupy(n_devices):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: n_devices)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.fixture()
def no_cupy(monkeypatch):
    monkeypatch.setattr(backend, "_import_cupy",
                        lambda: (None, None, "cupy cannot be imported (ImportError: No module named 'cupy')"))


@pytest.fixture()
def one_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_import_cupy", lambda: (fake_cupy(1), types.SimpleNamespace(), None))


def test_cpu_backend_is_numpy_and_scipy():
    b = backend.get_backend("cpu")
    assert b.device == "cpu" and b.xp is np and b.ndi is ndimage and not b.is_gpu
    a = b.asarray([1, 2, 3])
    assert isinstance(b.to_numpy(a), np.ndarray)
    with b.context():
        assert b.xp.asarray(a).sum() == 6


@pytest.mark.parametrize("value", ["cpu", "CPU", " cpu "])
def test_cpu_is_always_cpu(value, one_gpu):
    assert backend.resolve_device(value) == "cpu"


def test_auto_falls_back_to_cpu_without_cupy(no_cupy):
    assert backend.resolve_device("auto") == "cpu"
    assert backend.resolve_device(None) == "cpu"
    assert backend.get_backend("auto").xp is np


def test_auto_falls_back_to_cpu_without_a_visible_gpu(monkeypatch):
    monkeypatch.setattr(backend, "_import_cupy", lambda: (fake_cupy(0), None, None))
    assert backend.resolve_device("auto") == "cpu"


def test_auto_and_cuda_pick_the_gpu_when_there_is_one(one_gpu):
    assert backend.resolve_device("auto") == "cuda:0"
    assert backend.resolve_device("cuda") == "cuda:0"
    assert backend.resolve_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize("value", ["cuda", "cuda:0", "cuda:1"])
def test_asking_for_a_gpu_without_cupy_says_so(no_cupy, value):
    with pytest.raises(InputError, match=r"asks for a GPU but cupy cannot be imported.*maskworks\[gpu\]"):
        backend.resolve_device(value)


def test_asking_for_a_missing_gpu_says_how_many_there_are(one_gpu, monkeypatch):
    with pytest.raises(InputError, match="GPU 2 but only 1 CUDA device"):
        backend.resolve_device("cuda:2")
    monkeypatch.setattr(backend, "_import_cupy", lambda: (fake_cupy(0), None, None))
    with pytest.raises(InputError, match="no CUDA device"):
        backend.resolve_device("cuda")


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:-1", "tpu", ""])
def test_unknown_devices_are_refused(value):
    with pytest.raises(InputError, match="auto | cpu | cuda"):
        backend.resolve_device(value)


@pytest.mark.skipif(not GPU, reason="needs cupy and a CUDA device")
def test_gpu_backend_round_trip():
    b = backend.get_backend("cuda")
    assert b.is_gpu and b.device == "cuda:0" and b.xp.__name__ == "cupy"
    with b.context():
        a = b.asarray(np.arange(27).reshape(3, 3, 3) > 13)
        d = b.ndi.distance_transform_edt(a)
    np.testing.assert_allclose(b.to_numpy(d), ndimage.distance_transform_edt(np.arange(27).reshape(3, 3, 3) > 13))
