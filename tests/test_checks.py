"""The validation helpers name the argument, the expectation and what was passed."""

from __future__ import annotations

import pytest
import torch

from dml_bias import _checks as checks


def test_labels_message_is_exact() -> None:
    with pytest.raises(TypeError) as err:
        checks.check_labels(torch.zeros(32, 1), length=32, length_source="embeddings.shape[0]")
    assert str(err.value) == (
        "labels must be a 1-D integer tensor of length 32 (embeddings.shape[0]), "
        "got shape (32, 1) and dtype torch.float32"
    )


def test_labels_wrong_length_and_range() -> None:
    with pytest.raises(ValueError, match=r"length 4, got shape \(3,\)"):
        checks.check_labels(torch.zeros(3, dtype=torch.long), length=4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\] \(num_classes=3\), got values in \[0, 3\]"):
        checks.check_labels(torch.tensor([0, 3]), num_classes=3)
    checks.check_labels(torch.tensor([0, 2]), num_classes=3, length=2)


def test_embeddings_checks() -> None:
    with pytest.raises(ValueError, match=r"embeddings must be a 2-D tensor of shape \(N, D\), got shape \(3,\)"):
        checks.check_embeddings(torch.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        checks.check_embeddings(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one row"):
        checks.check_embeddings(torch.zeros(0, 2))
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor, got list"):
        checks.check_embeddings([[1.0]])
    checks.check_embeddings(torch.zeros(0, 2), allow_empty=True)


def test_shape_named_dims() -> None:
    sizes = checks.check_shape(torch.zeros(4, 3), "query", ("N", "D"))
    assert sizes == {"N": 4, "D": 3}
    with pytest.raises(ValueError, match=r"reference must have size D=3 \(query.shape\[1\]\) in dimension 1"):
        checks.check_shape(torch.zeros(5, 2), "reference", ("M", "D"), sizes, sources={"D": "query.shape[1]"})
    with pytest.raises(ValueError, match=r"mask must be a 3-D tensor of shape \(1, \*, \*\)"):
        checks.check_shape(torch.zeros(2, 2), "mask", (1, None, None))
    with pytest.raises(ValueError, match="must have size 1 in dimension 0"):
        checks.check_shape(torch.zeros(2, 2, 2), "mask", (1, None, None))


def test_dtype_families() -> None:
    checks.check_dtype(torch.zeros(1, dtype=torch.bool), "m", "bool")
    checks.check_dtype(torch.zeros(1, dtype=torch.uint8), "m", "integer")
    checks.check_dtype(torch.zeros(1, dtype=torch.uint8), "m", [torch.uint8, torch.float32])
    with pytest.raises(TypeError, match=r"m must be a tensor of dtype torch.uint8 or torch.float32, got"):
        checks.check_dtype(torch.zeros(1, dtype=torch.int64), "m", [torch.uint8, torch.float32])
    with pytest.raises(TypeError, match="numeric"):
        checks.check_dtype(torch.zeros(1, dtype=torch.bool), "m", "numeric")


def test_device_and_finite() -> None:
    checks.check_same_device(a=torch.zeros(1), b=None, c=torch.zeros(2))
    with pytest.raises(ValueError, match="b must be on the same device as a"):
        checks.check_same_device(a=torch.zeros(1), b=torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match=r"x must be finite, got 2 NaN or infinite"):
        checks.check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "x")
    checks.check_finite(torch.tensor([1, 2]), "x")
    checks.check_finite(torch.zeros(0), "x")
    checks.check_finite(torch.full((4,), 6e4, dtype=torch.float16), "x")  # a float16 sum would overflow: not an error


def test_finite_check_has_no_input_sized_temporary_when_finite(monkeypatch: pytest.MonkeyPatch) -> None:
    # The common case reduces to the minimum and maximum first; the counting isfinite(x) runs only on failure.
    seen: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    checks.check_finite(torch.randn(100, 10), "x")
    checks.check_rows_finite({"a": torch.randn(100, 10), "b": torch.randn(7, 10)}, nonzero=True)
    assert seen == [2]
    with pytest.raises(ValueError, match="x must be finite"):
        checks.check_finite(torch.tensor([[0.0, float("inf")]] * 50), "x")
    assert seen[-1] == 100


def test_rows_finite_names_the_argument_and_the_case() -> None:
    good, bad = torch.randn(3, 2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"proxies must be finite, got 1 NaN or infinite value\(s\)"):
        checks.check_rows_finite({"embeddings": good, "proxies": bad})
    zero = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    checks.check_rows_finite({"embeddings": zero})
    with pytest.raises(ValueError, match=r"embeddings must have no row of zero norm .* got 2 such row.*index 1"):
        checks.check_rows_finite({"embeddings": zero}, nonzero=True)
    huge = torch.tensor([[3e38, 3e38], [1.0, 0.0]])
    checks.check_rows_finite({"embeddings": huge})
    with pytest.raises(ValueError, match=r"embeddings must have row norms that fit torch.float32 .* row 0"):
        checks.check_rows_finite({"embeddings": huge}, nonzero=True)
    # The rows of a float16 tensor are measured in float32: 6e4 is a fine value.
    checks.check_rows_finite({"embeddings": torch.full((2, 4), 6e4, dtype=torch.float16)}, nonzero=True)
    # Messages describe the tensor the caller passed, not the upcast copy that was checked.
    half = torch.tensor([[float("inf"), 1.0]], dtype=torch.float16)
    with pytest.raises(ValueError, match=r"dtype torch.float16"):
        checks.check_rows_finite({"embeddings": half.float()}, originals={"embeddings": half})


@pytest.mark.parametrize(
    ("value", "kwargs", "error"),
    [
        (0.0, {"low": 0.0, "low_inclusive": False}, ValueError),
        (1.0, {"high": 1.0, "high_inclusive": False}, ValueError),
        (float("nan"), {}, ValueError),
        ("a", {}, TypeError),
        (True, {}, TypeError),
        (1.5, {"integer": True}, TypeError),
        (-1, {"low": 0, "integer": True}, ValueError),
    ],
)
def test_number_rejects(value: object, kwargs: dict, error: type) -> None:
    with pytest.raises(error, match="x must be"):
        checks.check_number(value, "x", **kwargs)


def test_number_accepts() -> None:
    checks.check_number(0.5, "sigma", low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    checks.check_number(3, "k", low=1, integer=True)
    checks.check_number(torch.tensor(0.2), "t", low=0.0)


def test_choice() -> None:
    with pytest.raises(ValueError, match="mode must be one of 'hard', 'soft', got 'x'"):
        checks.check_choice("x", "mode", ("hard", "soft"))


def test_factory_kwargs() -> None:
    assert checks.check_factory_kwargs(None, None) is None
    assert checks.check_factory_kwargs("meta", torch.float16) == torch.device("meta")
    assert checks.check_factory_kwargs(torch.device("cpu"), None) == torch.device("cpu")
    with pytest.raises(TypeError, match=r"dtype must be None or a floating-point torch\.dtype, got torch\.int64"):
        checks.check_factory_kwargs(None, torch.int64)
    with pytest.raises(TypeError, match=r"dtype must be None or a floating-point torch\.dtype, got str 'float32'"):
        checks.check_factory_kwargs(None, "float32")
    with pytest.raises(TypeError, match=r"device must be None, a torch\.device, a device string or a CUDA index"):
        checks.check_factory_kwargs(True, None)
    with pytest.raises(ValueError, match="device must name a device such as 'cpu' or 'cuda:0', got 'cpu:x'"):
        checks.check_factory_kwargs("cpu:x", None)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1' is not available"):
            checks.check_factory_kwargs("cuda:1", None)


def test_check_bool_accepts_only_bools() -> None:
    checks.check_bool(True, "flag")
    checks.check_bool(False, "flag")
    for value, shown in ((1, "int 1"), (0.0, "float 0.0"), ("yes", "str 'yes'"), (None, "NoneType")):
        with pytest.raises(TypeError) as err:
            checks.check_bool(value, "flag")
        assert str(err.value) == f"flag must be a bool, got {shown}"
    with pytest.raises(TypeError, match=r"flag must be a bool, got shape \(\) and dtype torch.bool"):
        checks.check_bool(torch.tensor(True), "flag")
    with pytest.raises(TypeError, match=r"^flag must be a bool, got NoneType$"):
        checks.check_bool(None, "flag")
    checks.check_bool(None, "flag", allow_none=True)
    with pytest.raises(TypeError, match=r"^flag must be a bool or None, got int 0$"):
        checks.check_bool(0, "flag", allow_none=True)


def test_check_generator() -> None:
    checks.check_generator(None)
    checks.check_generator(torch.Generator())
    with pytest.raises(TypeError, match=r"rng must be a torch\.Generator or None, got int 3"):
        checks.check_generator(3, "rng")


@pytest.mark.cuda
def test_check_generator_rejects_a_cuda_generator() -> None:
    with pytest.raises(ValueError, match=r"generator must be a CPU torch\.Generator .*got cuda"):
        checks.check_generator(torch.Generator(device="cuda"))


def test_check_has_data_names_the_meta_tensor() -> None:
    checks.check_has_data(a=torch.zeros(1), b=None)
    with pytest.raises(ValueError) as err:
        checks.check_has_data(a=torch.zeros(1), b=torch.empty(2, 3, device="meta"))
    assert str(err.value) == (
        "b must hold values (a tensor on a device such as cpu or cuda), got a meta tensor of shape (2, 3)"
    )


def test_check_index_list_reads_every_integer_form() -> None:
    import numpy as np

    read = checks.check_index_list
    assert read([3, np.int64(1), torch.tensor(2)], "i", what="indices") == [3, 1, 2]
    assert read(torch.tensor([4, 0], dtype=torch.int32), "i", what="indices") == [4, 0]
    assert read(np.array([5, 6]), "i", what="indices") == [5, 6]
    assert read((v for v in (7,)), "i", what="indices") == [7]
    assert read([], "i", what="indices") == []
    with pytest.raises(TypeError, match=r"^i must hold indices, got an element True$"):
        read([1, True], "i", what="indices")
    with pytest.raises(TypeError, match=r"^i must hold indices, got an element .*1\.0\)?$"):
        read(np.array([1.0]), "i", what="indices")
    expected = r"^i must be a 1-D integer tensor or an iterable of indices, got shape \(1, 1\)"
    with pytest.raises(TypeError, match=expected):
        read(torch.zeros(1, 1, dtype=torch.long), "i", what="indices")
    with pytest.raises(TypeError, match=r"^i must be an iterable of indices \(hint\), got int 5$"):
        read(5, "i", what="indices", hint=" (hint)")
    with pytest.raises(TypeError, match="got str"):
        read("12", "i", what="indices")
