"""The torch-version shims of ``dml_bias._compat``, on this torch and with the newer switches taken away."""

from __future__ import annotations

import pytest
import torch

from dml_bias._compat import ieee_fp32_matmul, reduced_precision_fp32_matmul

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def per_backend_available() -> bool:
    return hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision")


@pytest.fixture
def legacy_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the per-backend ``fp32_precision`` switches, as on torch releases before 2.9."""
    monkeypatch.delattr(type(torch.backends.mkldnn), "matmul", raising=False)
    assert not per_backend_available()


@pytest.fixture
def user_precision() -> object:
    """Restore the global float32 matmul precision after a test that changes it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(("precision", "reduced"), [("highest", False), ("high", True), ("medium", True)])
def test_reduced_precision_follows_the_user_setting(
    legacy: bool, precision: str, reduced: bool, user_precision: object, request: pytest.FixtureRequest
) -> None:
    if legacy:
        request.getfixturevalue("legacy_torch")
    elif not per_backend_available():
        pytest.skip("this torch has no per-backend fp32_precision switches")
    torch.set_float32_matmul_precision(precision)
    # "high" (TF32) counts as reduced on the CPU too: the per-backend switch reads "tf32" there on newer torch.
    assert reduced_precision_fp32_matmul(CPU) is reduced
    assert reduced_precision_fp32_matmul(CUDA) is reduced


@pytest.mark.parametrize("legacy", [False, True])
def test_ieee_fp32_matmul_pins_and_restores(
    legacy: bool, user_precision: object, request: pytest.FixtureRequest
) -> None:
    if legacy:
        request.getfixturevalue("legacy_torch")
    elif not per_backend_available():
        pytest.skip("this torch has no per-backend fp32_precision switches")
    torch.set_float32_matmul_precision("medium")
    cublas = torch.backends.cuda.matmul
    cublas.allow_fp16_reduced_precision_reduction = True
    try:
        with ieee_fp32_matmul():
            assert not reduced_precision_fp32_matmul(CPU)
            assert not reduced_precision_fp32_matmul(CUDA)
            assert cublas.allow_fp16_reduced_precision_reduction is False
        assert reduced_precision_fp32_matmul(CPU)
        assert cublas.allow_fp16_reduced_precision_reduction is True
        with pytest.raises(RuntimeError, match="inside"), ieee_fp32_matmul():
            raise RuntimeError("inside")
        assert reduced_precision_fp32_matmul(CPU)  # restored on the way out of an error too
    finally:
        cublas.allow_fp16_reduced_precision_reduction = False
