"""Validation helpers shared by every public function of dml_bias.

Every helper raises :class:`TypeError` (wrong kind or dtype) or :class:`ValueError` (wrong shape,
size or value) with a message that names the argument, says what was expected and what was passed,
e.g. ``labels must be a 1-D integer tensor of length 32 (embeddings.shape[0]), got shape (32, 1) and
dtype torch.float32``.

These helpers are private: their names and signatures may change between releases, except the checks switch
(:func:`set_checks`, :func:`checks_enabled` and the ``DML_BIAS_CHECKS`` environment variable), which is public
as ``dml_bias.set_checks`` and ``dml_bias.checks_enabled``.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_embeddings",
    "check_factory_kwargs",
    "check_finite",
    "check_generator",
    "check_has_data",
    "check_index_list",
    "check_labels",
    "check_number",
    "check_query_reference",
    "check_rows_finite",
    "check_same_device",
    "check_shape",
    "check_tensor",
    "checks_enabled",
    "describe",
    "set_checks",
]

_DTYPE_FAMILIES: dict[str, str] = {
    "floating": "floating-point",
    "integer": "integer",
    "bool": "boolean",
    "numeric": "numeric",
}


def describe(x: Any) -> str:
    """Return a short description of ``x`` for error messages (shape and dtype for tensors)."""
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} and dtype {x.dtype}"
    return f"{type(x).__name__} {x!r}" if isinstance(x, (int, float, str, bool)) else type(x).__name__


def _in_family(dtype: torch.dtype, family: str) -> bool:
    if family == "floating":
        return dtype.is_floating_point
    if family == "integer":
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    if family == "bool":
        return dtype == torch.bool
    if family == "numeric":
        return dtype != torch.bool and not dtype.is_complex
    raise ValueError(f"unknown dtype family {family!r}")


def check_tensor(x: Any, name: str) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a :class:`torch.Tensor`; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(x: torch.Tensor, name: str, family: str | torch.dtype | Sequence[torch.dtype]) -> None:
    """Check that ``x.dtype`` is in a family (``"floating"``, ``"integer"``, ``"bool"``, ``"numeric"``) or list.

    Args:
        x: The tensor to check.
        name: The argument's name, used in the message.
        family: A family name, one dtype, or a sequence of allowed dtypes.
    """
    check_tensor(x, name)
    if isinstance(family, str):
        ok = _in_family(x.dtype, family)
        expected = f"a {_DTYPE_FAMILIES[family]} tensor"
    else:
        allowed = (family,) if isinstance(family, torch.dtype) else tuple(family)
        ok = x.dtype in allowed
        expected = "a tensor of dtype " + " or ".join(str(d) for d in allowed)
    if not ok:
        raise TypeError(f"{name} must be {expected}, got {describe(x)}")


def check_shape(
    x: torch.Tensor,
    name: str,
    dims: Sequence[int | str | None],
    sizes: dict[str, int] | None = None,
    *,
    sources: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Check the shape of ``x`` against named or fixed dimensions.

    Args:
        x: The tensor to check.
        name: The argument's name, used in the message.
        dims: One entry per dimension: an ``int`` (that exact size), a ``str`` (a named size that must agree
            with the same name elsewhere, bound through ``sizes``) or ``None`` (any size).
        sizes: Named sizes already known (updated in place with the newly bound ones).
        sources: For named sizes, where the bound value came from (e.g. ``{"N": "embeddings.shape[0]"}``),
            quoted in the message.

    Returns:
        The dictionary of named sizes, including those bound by ``x``.

    Example:
        >>> import torch
        >>> check_shape(torch.zeros(4, 3), "embeddings", ("N", "D"))
        {'N': 4, 'D': 3}
    """
    check_tensor(x, name)
    sizes = {} if sizes is None else sizes
    sources = {} if sources is None else sources
    expected = "(" + ", ".join("*" if d is None else str(d) for d in dims) + ")"
    if x.ndim != len(dims):
        raise ValueError(f"{name} must be a {len(dims)}-D tensor of shape {expected}, got {describe(x)}")
    for axis, (want, got) in enumerate(zip(dims, x.shape, strict=False)):
        if want is None:
            continue
        if isinstance(want, int):
            if got != want:
                raise ValueError(
                    f"{name} must have size {want} in dimension {axis} (shape {expected}), got {describe(x)}"
                )
        elif want in sizes and sizes[want] != got:
            origin = f" ({sources[want]})" if want in sources else ""
            raise ValueError(
                f"{name} must have size {want}={sizes[want]}{origin} in dimension {axis}, got {describe(x)}"
            )
        else:
            sizes.setdefault(want, int(got))
    return sizes


def check_embeddings(
    x: Any,
    name: str = "embeddings",
    *,
    dim: int | None = None,
    dim_source: str | None = None,
    allow_empty: bool = False,
) -> None:
    """Check that ``x`` is a 2-D floating-point tensor of shape ``(N, D)`` with ``N >= 1``.

    Args:
        x: The tensor to check.
        name: The argument's name, used in the message.
        dim: If given, the required embedding size ``D``.
        dim_source: Where ``dim`` comes from, e.g. ``"embeddings.shape[1]"``, quoted in the message.
        allow_empty: Whether ``N == 0`` is accepted.

    Example:
        >>> import torch
        >>> check_embeddings(torch.zeros(3, 1), "embeddings", dim=2)
        Traceback (most recent call last):
        ...
        ValueError: embeddings must have size D=2 ...
    """
    check_tensor(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor of shape (N, D), got {describe(x)}")
    check_dtype(x, name, "floating")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one row (N >= 1), got {describe(x)}")
    if dim is not None and x.shape[1] != dim:
        origin = f" ({dim_source})" if dim_source else ""
        raise ValueError(f"{name} must have size D={dim}{origin} in dimension 1, got {describe(x)}")


def check_labels(
    labels: Any,
    name: str = "labels",
    *,
    length: int | None = None,
    length_source: str | None = None,
    num_classes: int | None = None,
) -> None:
    """Check that ``labels`` is a 1-D integer tensor, optionally of a given length and class range.

    Args:
        labels: The tensor to check.
        name: The argument's name, used in the message.
        length: The required length.
        length_source: Where the length comes from, e.g. ``"embeddings.shape[0]"``.
        num_classes: If given, every label must lie in ``[0, num_classes)``.

    Example:
        >>> import torch
        >>> check_labels(torch.zeros(32, 1), length=32, length_source="embeddings.shape[0]")
        Traceback (most recent call last):
        ...
        TypeError: labels must be a 1-D integer tensor of length 32 (embeddings.shape[0]), got shape (32, 1) ...
    """
    check_tensor(labels, name)
    what = "a 1-D integer tensor"
    if length is not None:
        what += f" of length {length}" + (f" ({length_source})" if length_source else "")
    if not _in_family(labels.dtype, "integer"):
        raise TypeError(f"{name} must be {what}, got {describe(labels)}")
    if labels.ndim != 1 or (length is not None and labels.shape[0] != length):
        raise ValueError(f"{name} must be {what}, got {describe(labels)}")
    if num_classes is not None and labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}] (num_classes={num_classes}), got values in [{lo}, {hi}]"
            )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Check that all given tensors (``None`` skipped) live on one device.

    Example:
        >>> import torch
        >>> check_same_device(embeddings=torch.zeros(2, 2), labels=torch.zeros(2))
    """
    named = [(n, t) for n, t in tensors.items() if t is not None]
    if not named:
        return
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} must be on the same device as {first_name} ({first.device}), got device {t.device}")


def _raise_not_finite(x: torch.Tensor, name: str) -> None:
    """The counting check behind :func:`check_finite` (input-sized temporaries; run only on a suspect input)."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name} must be finite, got {bad} NaN or infinite value(s) in a tensor of {describe(x)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values (this synchronises a CUDA stream).

    The common case costs two reductions and one host sync, with no temporary of the input's size: the minimum
    and the maximum are both finite exactly when every value is (NaN propagates through both). Only then is
    the input counted, to report how many values are bad.

    Example:
        >>> import torch
        >>> check_finite(torch.tensor([1.0, float("nan")]), "scores")
        Traceback (most recent call last):
        ...
        ValueError: scores must be finite, got 1 NaN or infinite value(s) in a tensor of shape (2,) ...
    """
    if not x.is_floating_point() or x.numel() == 0:
        return
    if not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):
        _raise_not_finite(x, name)


def check_rows_finite(
    tensors: Mapping[str, torch.Tensor],
    *,
    nonzero: bool = False,
    originals: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Check the rows of 2-D floating-point tensors with one host sync for all of them.

    Raises ``ValueError`` naming the first tensor (in the mapping's order) that holds NaN or infinite values
    and, with ``nonzero=True`` (for inputs that are L2-normalised next), one with a row of zero norm (its
    direction, so its cosine, is undefined; this includes rows whose squared entries all underflow, below about
    ``4e-23`` in float32) or a row whose norm overflows (normalising would silently turn it into a zero row).
    Norms are computed in float32 at least.

    Each tensor is reduced to its row norms (``(N,)``, no temporary of the input's size) and these to their sum
    and minimum; the sum is finite exactly when every value is finite and no norm overflows. Only a tensor that
    fails is examined further, to tell the cases apart and count. All tensors must share one device.

    Args:
        tensors: ``{argument name: (N, D) tensor}``.
        nonzero: Also reject zero-norm rows and overflowing norms.
        originals: The tensors as the user passed them, where ``tensors`` holds copies (e.g. upcast to float32):
            messages describe and count these.

    Example:
        >>> import torch
        >>> check_rows_finite({"embeddings": torch.ones(2, 3), "proxies": torch.zeros(4, 3)}, nonzero=True)
        Traceback (most recent call last):
        ...
        ValueError: proxies must have no row of zero norm (its direction is undefined), got 4 such row(s), ...
    """
    named = [(n, t) for n, t in tensors.items() if t.numel() > 0]
    if not named:
        return
    # Norms in float32 at least (a float16 norm overflows at 65504); a float32/float64 input is not copied.
    norms = [torch.linalg.vector_norm(t, dim=1, dtype=torch.promote_types(t.dtype, torch.float32)) for _, t in named]
    stats = torch.stack([s for nrm in norms for s in (nrm.sum(), nrm.amin())]).tolist()
    for i, ((name, t), nrm) in enumerate(zip(named, norms, strict=True)):
        total, smallest = stats[2 * i], stats[2 * i + 1]
        t = t if originals is None else originals.get(name, t)
        if not math.isfinite(total):
            _raise_not_finite(t, name)
            if nonzero and bool(torch.isinf(nrm).any()):
                row = int(torch.isinf(nrm).nonzero()[0, 0])
                raise ValueError(
                    f"{name} must have row norms that fit {nrm.dtype} (they are L2-normalised), got an overflowing "
                    f"norm in row {row} (largest value {float(t[row].detach().abs().max()):.3g}); rescale the rows"
                )
        if nonzero and smallest == 0:
            zero = nrm == 0
            raise ValueError(
                f"{name} must have no row of zero norm (its direction is undefined), got {int(zero.sum())} such "
                f"row(s), the first at index {int(zero.nonzero()[0, 0])}, in a tensor of {describe(t)} (a row of "
                f"zeros, or of values so small that their squares underflow to 0 in {nrm.dtype})"
            )


def check_factory_kwargs(device: Any, dtype: Any) -> torch.device | None:
    """Check the ``device`` / ``dtype`` factory arguments of a module that creates parameters; return the device.

    ``dtype`` must be ``None`` or a floating-point :class:`torch.dtype` (``TypeError``: parameters need gradients);
    ``device`` ``None``, a :class:`torch.device`, a device string or a CUDA index (``TypeError`` otherwise) that
    names a device this process can use (``ValueError`` otherwise, e.g. ``"gpu"`` or ``"cuda:7"`` on a machine
    without it), checked by creating an empty tensor there.

    Example:
        >>> import torch
        >>> check_factory_kwargs("cpu", torch.float64)
        device(type='cpu')
        >>> check_factory_kwargs(None, torch.int64)
        Traceback (most recent call last):
        ...
        TypeError: dtype must be None or a floating-point torch.dtype, got torch.int64
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        got = repr(dtype) if isinstance(dtype, torch.dtype) else describe(dtype)
        raise TypeError(f"dtype must be None or a floating-point torch.dtype, got {got}")
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (torch.device, str, int)):
        raise TypeError(f"device must be None, a torch.device, a device string or a CUDA index, got {describe(device)}")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a device such as 'cpu' or 'cuda:0', got {device!r}") from err
    try:
        torch.empty(0, device=device, dtype=dtype)
    except (RuntimeError, AssertionError) as err:  # no driver, a bad CUDA ordinal, torch built without it
        raise ValueError(f"device {str(device)!r} is not available: {err}") from err
    return device


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    integer: bool = False,
) -> None:
    """Check that ``value`` is a real number (or an integer) inside a range.

    Args:
        value: The value to check.
        name: The argument's name, used in the message.
        low: Lower bound (``None``: unbounded).
        high: Upper bound (``None``: unbounded).
        low_inclusive: Whether ``low`` itself is allowed.
        high_inclusive: Whether ``high`` itself is allowed.
        integer: Require an ``int`` (``bool`` is rejected).

    Example:
        >>> check_number(0.0, "temperature", low=0.0, low_inclusive=False)
        Traceback (most recent call last):
        ...
        ValueError: temperature must be a number in (0.0, inf), got 0.0
    """
    kind = "an integer" if integer else "a number"
    interval = (
        ("[" if low_inclusive and low is not None else "(")
        + str(low if low is not None else "-inf")
        + ", "
        + str(high if high is not None else "inf")
        + ("]" if high_inclusive and high is not None else ")")
    )
    if isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
        if isinstance(value, torch.Tensor) and value.numel() == 1 and not integer:
            value = float(value)
        else:
            raise TypeError(f"{name} must be {kind} in {interval}, got {describe(value)}")
    if not integer and not math.isfinite(float(value)):
        raise ValueError(f"{name} must be {kind} in {interval}, got {value}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        raise ValueError(f"{name} must be {kind} in {interval}, got {value}")


def check_choice(value: Any, name: str, choices: Iterable[Any]) -> None:
    """Check that ``value`` is one of ``choices``.

    Example:
        >>> check_choice("mean", "reduction", ("mean", "sum", "none"))
        >>> check_choice("avg", "reduction", ("mean", "sum"))
        Traceback (most recent call last):
        ...
        ValueError: reduction must be one of 'mean', 'sum', got 'avg'
    """
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in options)}, got {value!r}")


def check_query_reference(
    query: Any, reference: Any, query_name: str = "query", reference_name: str = "reference"
) -> torch.Tensor:
    """Check ``(N, D)`` query and ``(M, D)`` reference embeddings; return the reference (``query`` if ``None``).

    Both must be 2-D floating-point tensors with at least one row, the same ``D`` and the same device.

    Example:
        >>> import torch
        >>> q = torch.zeros(2, 3)
        >>> check_query_reference(q, None) is q
        True
        >>> check_query_reference(q, torch.zeros(4, 2))
        Traceback (most recent call last):
        ...
        ValueError: reference must have size D=3 in dimension 1, got shape (4, 2) and dtype torch.float32
    """
    check_embeddings(query, query_name)
    if reference is None:
        return query
    check_embeddings(reference, reference_name, dim=query.shape[1])
    check_same_device(**{query_name: query, reference_name: reference})
    return reference


def check_bool(value: Any, name: str, *, allow_none: bool = False) -> None:
    """Check that ``value`` is a ``bool`` (``0``/``1`` and tensors are rejected: a flag is a ``bool``).

    With ``allow_none=True``, ``None`` (e.g. "decide from the data") is accepted too.

    Example:
        >>> check_bool(True, "normalize")
        >>> check_bool(None, "normalize", allow_none=True)
        >>> check_bool(1, "normalize")
        Traceback (most recent call last):
        ...
        TypeError: normalize must be a bool, got int 1
    """
    if isinstance(value, bool) or (allow_none and value is None):
        return
    raise TypeError(f"{name} must be a bool{' or None' if allow_none else ''}, got {describe(value)}")


def check_generator(generator: Any, name: str = "generator") -> None:
    """Check that ``generator`` is ``None`` or a CPU :class:`torch.Generator` (random indices are drawn on the CPU).

    Example:
        >>> import torch
        >>> check_generator(torch.Generator().manual_seed(0))
        >>> check_generator(0)
        Traceback (most recent call last):
        ...
        TypeError: generator must be a torch.Generator or None, got int 0
    """
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {describe(generator)}")
    if generator.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU torch.Generator (indices are drawn on the CPU), got {generator.device}")


def check_has_data(**tensors: torch.Tensor | None) -> None:
    """Raise :class:`ValueError` naming the first of ``tensors`` (``None`` skipped) that is a meta tensor.

    A meta tensor has a shape but no values: checks and results that need values would fail later with torch's
    "Tensor.item() cannot be called on meta tensors".

    Example:
        >>> import torch
        >>> check_has_data(x=torch.zeros(2), y=torch.zeros(3, device="meta"))
        Traceback (most recent call last):
        ...
        ValueError: y must hold values (a tensor on a device such as cpu or cuda), got a meta tensor of shape (3,)
    """
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            raise ValueError(
                f"{name} must hold values (a tensor on a device such as cpu or cuda), got a meta tensor of shape "
                f"{tuple(tensor.shape)}"
            )


def check_index_list(value: Any, name: str, *, what: str, hint: str = "") -> list[int]:
    """Read integer indices as a list of ints: a 1-D integer tensor, or an iterable of integers (NumPy arrays too).

    Bounds are the caller's to check. ``bool`` elements and floating-point values are rejected.

    Args:
        value: The indices.
        name: The argument's name, used in the message.
        what: What the indices are, e.g. ``"integer sample indices"``.
        hint: Appended to the "must be an iterable" message, e.g. ``" (one per query)"``.

    Example:
        >>> import torch
        >>> check_index_list(torch.tensor([3, 1]), "items", what="integer sample indices")
        [3, 1]
        >>> check_index_list([0, 2.5], "items", what="integer sample indices")
        Traceback (most recent call last):
        ...
        TypeError: items must hold integer sample indices, got an element 2.5
    """
    if isinstance(value, torch.Tensor):
        if value.ndim != 1 or not _in_family(value.dtype, "integer"):
            raise TypeError(f"{name} must be a 1-D integer tensor or an iterable of {what}, got {describe(value)}")
        return [int(v) for v in value.tolist()]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an iterable of {what}{hint}, got {describe(value)}")
    items = []
    for element in value:
        try:
            if isinstance(element, bool):
                raise TypeError
            items.append(operator.index(element))  # Python and NumPy integers, 0-d integer tensors
        except TypeError:
            raise TypeError(f"{name} must hold {what}, got an element {element!r}") from None
    return items


# ---------------------------------------------------------------------------------------------- checks switch

#: The environment variable read (once, on first use) when :func:`set_checks` has not been called.
CHECKS_ENV_VAR = "DML_BIAS_CHECKS"
_OFF_VALUES = ("0", "false", "off", "no")
_ON_VALUES = ("1", "true", "on", "yes", "")
#: Empty until :func:`set_checks` is called or the environment variable is read; then one ``bool``.
_checks_state: list[bool] = []


def _checks_from_environment() -> bool:
    raw = os.environ.get(CHECKS_ENV_VAR, "1")
    value = raw.strip().lower()
    if value in _OFF_VALUES:
        return False
    if value in _ON_VALUES:
        return True
    raise ValueError(
        f"the environment variable {CHECKS_ENV_VAR} must be one of {', '.join(map(repr, _OFF_VALUES))} (value "
        f"checks off) or {', '.join(map(repr, _ON_VALUES))} (on), got {raw!r}"
    )


def checks_enabled() -> bool:
    """Whether the value checks that synchronise the host run (the default: ``True``).

    The switch is set by :func:`set_checks`; until that is called it comes from the environment variable
    ``DML_BIAS_CHECKS`` (``0``, ``false``, ``off`` or ``no`` switch the checks off; ``1``, ``true``, ``on``, ``yes``
    or unset leave them on; anything else raises :class:`ValueError` naming the variable), read on the first
    call. See :func:`set_checks` for what is skipped.

    Returns:
        ``True`` when the value checks run.

    Raises:
        ValueError: If ``DML_BIAS_CHECKS`` holds a value that is neither on nor off.

    Example:
        >>> import dml_bias
        >>> dml_bias.checks_enabled()
        True
    """
    if not _checks_state:
        _checks_state.append(_checks_from_environment())
    return _checks_state[0]


def set_checks(enabled: bool) -> bool:
    """Switch the value checks that synchronise the host on or off, for the whole process; return the old setting.

    The losses and miners check their inputs' *values*: embeddings, references and proxies must be finite and,
    for a normalising metric, have no row of zero norm; labels must lie in ``[0, num_classes)`` for the
    class-weight losses; the indices of ``indices_tuple`` must lie inside the batch. Each such check reduces a
    tensor and reads the result on the host: free on the CPU, but on a GPU it stalls the pipeline once per call,
    because the host waits for the device. ``set_checks(False)`` skips these value checks; the checks of types,
    shapes, dtypes and devices (which read only metadata) still run.

    Risk: with the checks off, bad values are no longer reported. A NaN or infinite embedding gives a NaN loss
    (and NaN gradients that corrupt the model's weights at the next optimiser step) or, for the hinge losses
    (contrastive, SupCon), a finite loss that silently leaves out the pairs it touches; a zero row gives a NaN
    or an arbitrary direction; an out-of-range label or index fails later inside torch (on CUDA as a device-side
    assert that ends the process) or reads the wrong row. Switch them off only for a training loop whose
    inputs are known to be valid, e.g. after a first epoch run with the checks on.

    Args:
        enabled: ``True`` to run the value checks (the default), ``False`` to skip them.

    Returns:
        The previous setting, so a caller can restore it.

    Raises:
        TypeError: If ``enabled`` is not a ``bool``.

    Example:
        >>> import torch
        >>> import dml_bias
        >>> from dml_bias.losses import TripletMarginLoss
        >>> embeddings = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> previous = dml_bias.set_checks(False)
        >>> TripletMarginLoss()(embeddings, labels)  # not checked: the NaN flows into the loss
        tensor(nan)
        >>> _ = dml_bias.set_checks(previous)
        >>> TripletMarginLoss()(embeddings, labels)
        Traceback (most recent call last):
        ...
        ValueError: embeddings must be finite, got 1 NaN or infinite value(s) in a tensor of shape (3, 2) ...
    """
    check_bool(enabled, "enabled")
    previous = checks_enabled()
    _checks_state[0] = enabled
    return previous
