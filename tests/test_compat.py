"""The version shims of ``dml_bias._compat``, on this torch and with the newer switches taken away."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from dml_bias._compat import ieee_fp32_matmul, reduced_precision_fp32_matmul
from dml_bias.transforms import BackgroundMask, BackgroundSwap

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


def test_v2_transform_hooks_answer_to_the_names_before_torchvision_0_21() -> None:
    # torchvision < 0.21 drives a transform through _get_params / _transform: they must reach our public hooks.
    image = tv_tensors.Image(torch.full((3, 4, 4), 200, dtype=torch.uint8))
    mask = torch.zeros(1, 4, 4, dtype=torch.uint8)
    mask[..., 1:3, 1:3] = 255
    sample = {"image": image, "mask": tv_tensors.Mask(mask), "label": 3}
    transform = BackgroundMask()
    params = transform._get_params([image, sample["mask"]])
    assert params["mask"] is sample["mask"]
    old_style = transform._transform(image, params)
    assert torch.equal(old_style, transform(sample)["image"])
    assert int(old_style[0, 0, 0]) == 0
    assert int(old_style[0, 1, 1]) == 200

    class Inverted(BackgroundMask):
        def transform(self, inpt: object, params: dict[str, object]) -> object:
            return 255 - super().transform(inpt, params)

    assert torch.equal(Inverted()._transform(image, params), 255 - old_style)  # overrides are honoured
    for cls in (BackgroundMask, BackgroundSwap):
        assert "_get_params" in vars(cls.__mro__[1])  # the hooks come from the mixin, ahead of v2.Transform
