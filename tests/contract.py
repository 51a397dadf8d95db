"""The one test contract every public object of dml_bias runs through (the kornia habit, issue #24).

An area's test file (``tests/test_contract_*.py``) declares a table of :class:`Entry` — the public object, a
factory of small valid inputs, the expected output, and which checks apply — and runs
``pytest.mark.parametrize(("entry", "check"), contract.params(ENTRIES))`` over :func:`run`. The checks:

``smoke``
    The object runs on the inputs; ``expect`` asserts the output's type, shape and dtype.
``bad_input``
    Delegates to the cases of ``tests/test_bad_input.py`` for the same object (there must be some) and runs them.
``reference``
    Values against a slow reference written in the test (or a peer: PML, sklearn, a closed form), in float64.
``gradcheck``
    ``torch.autograd.gradcheck`` in float64 on the named inputs.
``twin``
    A module equals its functional twin on the same inputs.
``dtype``
    float32 and float64 inputs give outputs in that dtype (``expect`` with the dtype) and the same values.
``device``
    On CUDA (``@pytest.mark.cuda``): the outputs are on the device and equal the CPU ones.
``unchanged``
    Nothing a user passes in (tensors inside tuples, lists, dicts, module parameters) changes value, dtype or
    device, backward pass included.
``pickle``
    A module or transform survives ``pickle`` and ``copy.deepcopy`` (transforms inside a ``v2.Compose``) and
    gives the same output.
``compile``
    ``torch.compile(backend="aot_eager")`` gives the same output, where the object's docstring claims it.

A check that does not apply is skipped with the reason the table writes in ``Entry.skip``; a check without the
data it needs and without a reason fails, so no check is dropped silently. A defect the contract finds is marked
for exactly that (entry, check) with ``Entry.xfail`` (a strict xfail whose reason starts with ``"bug: "``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from helpers import assert_close
from torch import nn

CHECKS = ("smoke", "bad_input", "reference", "gradcheck", "twin", "dtype", "device", "unchanged", "pickle", "compile")

#: The dtype of the inputs: ``expect`` compares floating outputs with it.
SAME = "same"

# Reasons written out once, used by many table entries.
FUNCTION = "a function: it is its own functional form, and there is no object to pickle"
NO_TWIN = "a class without a functional twin"
NOT_FLOAT = "takes no floating-point input: there is no dtype to follow"
NOT_DIFFERENTIABLE = "its output is not a differentiable function of its inputs (integers, booleans, floats)"
CPU_ONLY = "runs on the CPU only (reads files / samples indices on the host)"
NO_COMPILE_CLAIM = "the docstring makes no torch.compile claim"


@dataclass
class Call:
    """Positional and keyword arguments of one call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, fn: Callable[..., Any]) -> Any:
        return fn(*self.args, **self.kwargs)

    def get(self, slot: int | str) -> Any:
        return self.args[slot] if isinstance(slot, int) else self.kwargs[slot]

    def replace(self, values: Mapping[int | str, Any]) -> Call:
        args, kwargs = list(self.args), dict(self.kwargs)
        for slot, value in values.items():
            if isinstance(slot, int):
                args[slot] = value
            else:
                kwargs[slot] = value
        return Call(tuple(args), kwargs)


def call(*args: Any, **kwargs: Any) -> Call:
    """``Call(args, kwargs)`` written like the call itself."""
    return Call(args, kwargs)


def _identity(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class Entry:
    """One public object's row of a contract table.

    Attributes:
        key: ``"module:name"`` as in ``tests/api_inventory.txt`` (the defining module is best).
        inputs: ``dtype -> Call``: fresh, small, valid inputs whose floating tensors have that dtype.
        expect: ``(output, dtype) -> None``: asserts the output's type, shape and dtype (see :func:`tensor`).
        make: ``dtype -> callable`` under test (a constructed module or transform); ``None``: the object itself.
        out: picks what the value checks compare (and gradcheck differentiates) from the output.
        reference: ``(*args, **kwargs) -> expected out(output)`` in float64, computed independently.
        grad: the input slots (positions or keyword names) gradcheck differentiates.
        twin: ``made object -> functional callable`` taking the same arguments.
        invoke: ``(made, *args, **kwargs) -> output`` for objects used through a method (``update`` /
            ``compute``, ``get_accuracy``); ``None``: ``made(*args, **kwargs)``.
        dtypes: the input dtypes the output follows (the first is the one of the other checks).
        compile: the docstring claims ``torch.compile`` support: check it.
        container: a v2 transform: pickle it inside a ``v2.Compose``.
        skip: check -> the reason it does not apply.
        xfail: check -> ``"bug: ..."`` (a strict xfail for a defect reported to the lead).
        tag: tells apart several entries of one key.
        tol: (rtol, atol) of the value comparisons; ``None``: by dtype.
    """

    key: str
    inputs: Callable[[torch.dtype], Call]
    expect: Callable[[Any, torch.dtype], None]
    make: Callable[[torch.dtype], Any] | None = None
    out: Callable[[Any], Any] = _identity
    reference: Callable[..., Any] | None = None
    grad: tuple[int | str, ...] = ()
    twin: Callable[[Any], Callable[..., Any]] | None = None
    invoke: Callable[..., Any] | None = None
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)
    compile: bool = False
    container: bool = False
    skip: Mapping[str, str] = field(default_factory=dict)
    xfail: Mapping[str, str] = field(default_factory=dict)
    tag: str = ""
    tol: tuple[float, float] | None = None

    @property
    def name(self) -> str:
        return self.key.split(":")[1] + (f"[{self.tag}]" if self.tag else "")

    @property
    def obj(self) -> Any:
        return resolve(self.key)

    @property
    def is_function(self) -> bool:
        return self.make is None and (inspect.isfunction(self.obj) or inspect.isbuiltin(self.obj))

    def build(self, dtype: torch.dtype) -> Any:
        return self.obj if self.make is None else self.make(dtype)

    def run_on(self, made: Any, c: Call) -> Any:
        """The output of one call of the made object on ``c``, from a fixed global seed."""
        torch.manual_seed(0)
        if self.invoke is None:
            return c(made)
        return self.invoke(made, *c.args, **c.kwargs)


def resolve(key: str) -> Any:
    """The public object at ``"module:name"``."""
    module, name = key.split(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return getattr(importlib.import_module(module), name)


def params(entries: Sequence[Entry]) -> list[Any]:
    """``pytest.param(entry, check)`` for every entry and check, with the cuda and xfail marks."""
    seen: set[str] = set()
    out = []
    for entry in entries:
        assert entry.name not in seen, f"two contract entries are named {entry.name}: give one a tag"
        seen.add(entry.name)
        unknown = (set(entry.skip) | set(entry.xfail)) - set(CHECKS)
        assert not unknown, f"{entry.name}: unknown checks {unknown}"
        for check in CHECKS:
            marks: list[Any] = [pytest.mark.cuda] if check == "device" else []
            if check in entry.xfail:
                reason = entry.xfail[check]
                assert reason.startswith("bug: "), f"{entry.name}: an xfail reason starts with 'bug: '"
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            out.append(pytest.param(entry, check, id=f"{entry.name}-{check}", marks=marks))
    return out


def run(entry: Entry, check: str) -> None:
    """Run one check of the contract on one entry (skipping with the entry's written reason)."""
    if check in entry.skip:
        pytest.skip(entry.skip[check])
    CHECK_FUNCTIONS[check](entry)


def _needs(entry: Entry, check: str, have: bool) -> None:
    """Fail when a check lacks its data and the table gives no reason for it."""
    if not have:
        pytest.fail(f"{entry.name}: the contract table gives neither the data for '{check}' nor a skip reason")


# ------------------------------------------------------------------------------------------------- tree helpers


def tensors_in(obj: Any, _seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj``: containers, dataclasses, NamedTuples, module parameters and buffers."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.Module):
        yield from obj.parameters()
        yield from obj.buffers()
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item, seen)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from tensors_in(getattr(obj, f.name), seen)


def to_device(obj: Any, device: torch.device) -> Any:
    """A copy of ``obj`` with every tensor (and module) on ``device``; other leaves as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj).to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(x, device) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def assert_same(actual: Any, expected: Any, tol: tuple[float, float] | None = None, path: str = "output") -> None:
    """Equal structure and close values: tensors, numbers, sequences, mappings, dataclasses, NamedTuples."""
    rtol, atol = tol if tol is not None else (None, None)
    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        a = actual.detach().cpu() if isinstance(actual, torch.Tensor) else torch.as_tensor(actual)
        e = expected.detach().cpu() if isinstance(expected, torch.Tensor) else torch.as_tensor(expected)
        assert a.shape == e.shape, f"{path}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if a.dtype == torch.bool or e.dtype == torch.bool or not (a.is_floating_point() or e.is_floating_point()):
            assert torch.equal(a, e), f"{path}: {a} != {e}"
        else:
            assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{path}: {m}")
    elif dataclasses.is_dataclass(expected) and not isinstance(expected, type):
        assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), tol, f"{path}.{f.name}")
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{path}: {type(actual).__name__} is not a mapping"
        assert set(actual) == set(expected), f"{path}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for k in expected:
            assert_same(actual[k], expected[k], tol, f"{path}[{k!r}]")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"{path}: {type(actual).__name__} is not a sequence"
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, tol, f"{path}[{i}]")
    elif isinstance(expected, float) or isinstance(actual, float):
        assert_close(torch.tensor(float(actual)), torch.tensor(float(expected)), rtol=rtol, atol=atol, equal_nan=True)
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def differentiable(out: Any) -> tuple[torch.Tensor, ...]:
    """The floating tensors of an output that require grad."""
    return tuple(t for t in tensors_in(out) if t.is_floating_point() and t.requires_grad)


# -------------------------------------------------------------------------------------------- expect helpers


def tensor(
    shape: tuple[int, ...] | Callable[[Any], tuple[int, ...]] | None,
    dtype: torch.dtype | str | None = SAME,
    *,
    kind: type = torch.Tensor,
) -> Callable[[Any, torch.dtype], None]:
    """``expect`` of a tensor of that shape (``None``: any) and dtype (``SAME``: the inputs'; ``None``: any)."""

    def check(value: Any, in_dtype: torch.dtype) -> None:
        assert isinstance(value, kind), f"expected a {kind.__name__}, got {type(value).__name__}"
        out: Any = value
        if shape is not None:
            want = shape(out) if callable(shape) else shape
            assert tuple(out.shape) == tuple(want), f"shape {tuple(out.shape)}, expected {tuple(want)}"
        if dtype is not None:
            want_dtype = in_dtype if dtype == SAME else dtype
            assert out.dtype == want_dtype, f"dtype {out.dtype}, expected {want_dtype}"

    return check


def instance(
    kind: type | tuple[type, ...], **fields: Callable[[Any, torch.dtype], None]
) -> Callable[[Any, torch.dtype], None]:
    """``expect`` of an instance of ``kind`` whose named attributes (or keys) pass their own ``expect``."""

    def check(out: Any, in_dtype: torch.dtype) -> None:
        assert isinstance(out, kind), f"expected {kind}, got {type(out).__name__}"
        for name, sub in fields.items():
            value = out[name] if isinstance(out, Mapping) else getattr(out, name)
            try:
                sub(value, in_dtype)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None

    return check


def number(low: float = float("-inf"), high: float = float("inf")) -> Callable[[Any, torch.dtype], None]:
    """``expect`` of a Python float (or int) in ``[low, high]``."""

    def check(out: Any, _: torch.dtype) -> None:
        assert isinstance(out, (float, int)), f"expected a number, got {type(out).__name__}"
        assert not isinstance(out, bool), "expected a number, got a bool"
        assert low <= out <= high, f"{out} outside [{low}, {high}]"

    return check


def nothing(out: Any, _: torch.dtype) -> None:
    """``expect`` of ``None`` (functions that act by side effect)."""
    assert out is None, f"expected None, got {type(out).__name__}"


# ------------------------------------------------------------------------------------------------------ checks


def check_smoke(entry: Entry) -> None:
    dtype = entry.dtypes[0] if entry.dtypes else torch.float32
    entry.expect(entry.run_on(entry.build(dtype), entry.inputs(dtype)), dtype)


def bad_input_cases(obj: Any) -> list[Any]:
    """The cases of ``tests/test_bad_input.py`` whose key names ``obj`` (by identity, re-exports included)."""
    import test_bad_input as bad

    found = []
    for key, cases in bad.CASES.items():
        if key.startswith("cli:"):
            continue
        try:
            target = resolve(key)
        except (ImportError, AttributeError):
            continue
        if target is obj:
            found.extend(cases)
    return found


def check_bad_input(entry: Entry) -> None:
    import test_bad_input as bad

    cases = bad_input_cases(entry.obj)
    _needs(entry, "bad_input", bool(cases))
    made = len(bad._TMP)
    try:
        for case in cases:
            if case.known:  # a reported defect: test_bad_input.py holds its strict xfail
                continue
            with pytest.raises(case.error, match=case.match):
                case.call()
    finally:
        for path in bad._TMP[made:]:
            shutil.rmtree(path, ignore_errors=True)
        del bad._TMP[made:]


def check_reference(entry: Entry) -> None:
    _needs(entry, "reference", entry.reference is not None)
    assert entry.reference is not None
    dtype = torch.float64 if torch.float64 in entry.dtypes else (entry.dtypes[0] if entry.dtypes else torch.float64)
    c = entry.inputs(dtype)
    got = entry.out(entry.run_on(entry.build(dtype), c))
    expected = entry.inputs(dtype)(entry.reference)  # fresh inputs, whatever the call did to its own
    assert_same(got, expected, entry.tol)


def check_gradcheck(entry: Entry) -> None:
    _needs(entry, "gradcheck", bool(entry.grad))
    fn = entry.build(torch.float64)
    c = entry.inputs(torch.float64)
    leaves = [c.get(slot).detach().clone().requires_grad_(True) for slot in entry.grad]

    def f(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = differentiable(entry.out(entry.run_on(fn, c.replace(dict(zip(entry.grad, xs, strict=True))))))
        assert out, "no output of the call requires grad"
        return out

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-5, rtol=1e-4)


def check_twin(entry: Entry) -> None:
    if entry.twin is None and entry.is_function:
        pytest.skip(FUNCTION)
    _needs(entry, "twin", entry.twin is not None)
    assert entry.twin is not None
    dtype = entry.dtypes[-1] if entry.dtypes else torch.float64
    made = entry.build(dtype)
    got = entry.out(entry.run_on(made, entry.inputs(dtype)))
    twin = entry.twin(made)
    torch.manual_seed(0)
    expected = entry.out(entry.inputs(dtype)(twin))
    assert_same(got, expected, entry.tol)


def check_dtype(entry: Entry) -> None:
    _needs(entry, "dtype", len(entry.dtypes) >= 2)
    outs = []
    for dtype in entry.dtypes:
        out = entry.run_on(entry.build(dtype), entry.inputs(dtype))
        entry.expect(out, dtype)
        outs.append(entry.out(out))
    for other in outs[1:]:  # the same values in every dtype, to the precision of the lowest
        assert_same(outs[0], other, entry.tol or (1e-4, 1e-5))


def check_device(entry: Entry) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dtype = entry.dtypes[0] if entry.dtypes else torch.float32
    cuda = torch.device("cuda")
    expected = entry.out(entry.run_on(entry.build(dtype), entry.inputs(dtype)))
    made = to_device(entry.build(dtype), cuda)
    out = entry.run_on(made, to_device(entry.inputs(dtype), cuda))
    entry.expect(out, dtype)
    got = entry.out(out)
    for t in tensors_in(got):
        assert t.device.type == "cuda", f"an output tensor is on {t.device}"
    assert_same(got, expected, entry.tol or (1e-4, 1e-5))


def check_unchanged(entry: Entry) -> None:
    dtype = entry.dtypes[0] if entry.dtypes else torch.float32
    made = entry.build(dtype)
    c = entry.inputs(dtype)
    # the made object's parameters too (its buffers are state: a memory queue, running statistics)
    own = list(made.parameters()) if isinstance(made, nn.Module) else []
    watched = [*tensors_in(c.args), *tensors_in(c.kwargs), *own]
    before = [(t.detach().clone(), t.dtype, t.device) for t in watched]
    out = entry.run_on(made, c)
    grads = [t for t in differentiable(entry.out(out)) if t.grad_fn is not None]
    if grads:
        torch.autograd.backward([t.sum() for t in grads])
    for i, ((saved, dtype_, device), now) in enumerate(zip(before, watched, strict=True)):
        assert now.dtype == dtype_, f"input tensor {i}: dtype {dtype_} became {now.dtype}"
        assert now.device == device, f"input tensor {i}: moved from {device} to {now.device}"
        torch.testing.assert_close(
            now.detach(), saved, rtol=0, atol=0, equal_nan=True, msg=f"input tensor {i} was modified in place"
        )


def check_pickle(entry: Entry) -> None:
    if entry.is_function:
        pytest.skip(FUNCTION)
    dtype = entry.dtypes[0] if entry.dtypes else torch.float32
    made = entry.build(dtype)
    if entry.container:
        from torchvision.transforms import v2

        made = v2.Compose([made])
    expected = entry.out(entry.run_on(made, entry.inputs(dtype)))
    for name, clone in [("pickle", pickle.loads(pickle.dumps(made))), ("deepcopy", copy.deepcopy(made))]:
        assert type(clone) is type(made)
        try:
            assert_same(entry.out(entry.run_on(clone, entry.inputs(dtype))), expected, entry.tol)
        except AssertionError as exc:
            raise AssertionError(f"after {name}: {exc}") from None


def claims_compile(obj: Any) -> bool:
    """Whether the object's docstring claims ``torch.compile`` support."""
    return "torch.compile" in (inspect.getdoc(obj) or "")


def check_compile(entry: Entry) -> None:
    if not entry.compile:
        if claims_compile(entry.obj):
            pytest.fail(f"{entry.name}'s docstring claims torch.compile: set compile=True or give a reason")
        pytest.skip(NO_COMPILE_CLAIM)
    dtype = entry.dtypes[0] if entry.dtypes else torch.float32
    made = entry.build(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(made, backend="aot_eager")
    expected = entry.out(entry.run_on(made, entry.inputs(dtype)))
    assert_same(entry.out(entry.run_on(compiled, entry.inputs(dtype))), expected, entry.tol)


CHECK_FUNCTIONS: dict[str, Callable[[Entry], None]] = {
    "smoke": check_smoke,
    "bad_input": check_bad_input,
    "reference": check_reference,
    "gradcheck": check_gradcheck,
    "twin": check_twin,
    "dtype": check_dtype,
    "device": check_device,
    "unchanged": check_unchanged,
    "pickle": check_pickle,
    "compile": check_compile,
}
assert tuple(CHECK_FUNCTIONS) == CHECKS
