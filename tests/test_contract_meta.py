"""The contract covers the whole public API: every name of ``tests/api_inventory.txt`` has a row in one of the
contract tables (``tests/test_contract_*.py``, ``tests/losses/test_loss_contract.py``) or a written exemption, so
a new public name without a contract entry fails here. And the contract's own checks can fail."""

from __future__ import annotations

import importlib
import inspect
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import contract as C
import pytest
import torch
from contract import Entry, call, tensor
from test_api_surface import read_inventory as inventory
from torch import nn
from torch.autograd.gradcheck import GradcheckError

sys.path.insert(0, str(Path(__file__).parent / "losses"))

TABLES = (
    "test_contract_metrics",
    "test_contract_heads",
    "test_contract_transforms",
    "test_contract_misc",
    "test_contract_datasets",
    "test_contract_attribution",
    "test_loss_contract",
)

RESULT = "a result type: built, and its fields checked, by the contract entry of the function that returns it"
CONFIG = "a config type: a frozen dataclass of settings, run through run_study's entry"
ALIAS = "a type alias (typing.Literal / dict type): nothing to call"

#: name -> why it has no contract entry of its own. Functions and modules cannot be exempt.
EXEMPT: dict[str, str] = {
    **{
        name: RESULT
        for name in (
            "BackgroundSensitivity",
            "ForegroundEnergy",
            "PairwiseDecomposition",
            "SimilarityDecomposition",
            "AuditResult",
            "StudyResult",
            "CompatibilityPairs",
            "DELGOutput",
            "LocalFeatures",
            "LocalHeadLosses",
            "LocalHeadOutput",
            "ReceptiveField",
            "FewShotResult",
            "PairIndices",
            "ConditionalSimilarityOutput",
            "GatheredIndices",
        )
    },
    "StudyConfig": CONFIG,
    "RunSpec": CONFIG,
    "Metric": ALIAS,
    "LossDict": ALIAS,
}


def resolve(entry: str) -> tuple[Any, bool]:
    """The object at ``module:name`` and whether reaching it warns of a deprecation (a moved name's alias)."""
    module, name = entry.split(":")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obj = getattr(importlib.import_module(module), name)
    return obj, any(issubclass(w.category, DeprecationWarning) for w in caught)


def all_entries() -> list[Entry]:
    return [e for table in TABLES for e in importlib.import_module(table).ENTRIES]


def is_callable_api(obj: Any) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj)


def test_every_public_name_has_a_contract_entry() -> None:
    covered = [e.obj for e in all_entries()]
    missing, wrongly_exempt = [], []
    for entry in inventory():
        obj, deprecated = resolve(entry)
        name = entry.split(":")[1]
        if any(obj is c for c in covered):
            continue
        if deprecated or not is_callable_api(obj):
            continue  # a deprecated alias of a covered name, or a constant
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue  # exception types are raised by the library; test_bad_input.py matches them
        if name in EXEMPT:
            if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, nn.Module)):
                wrongly_exempt.append(entry)
            continue
        missing.append(entry)
    assert not missing, f"public names without a contract entry (tests/test_contract_*.py): {missing}"
    assert not wrongly_exempt, f"functions and modules cannot be exempt from the contract: {wrongly_exempt}"


def test_every_entry_names_a_public_object() -> None:
    public = [resolve(entry)[0] for entry in inventory()]
    stale = [e.key for e in all_entries() if not any(e.obj is p for p in public)]
    assert not stale, f"contract entries for names that are not public (any more): {stale}"


def test_entries_use_the_current_homes() -> None:
    moved = [e.key for e in all_entries() if resolve(e.key)[1]]
    assert not moved, f"contract entries keyed on deprecated import paths (use the new home): {moved}"


def test_exemptions_are_still_public() -> None:
    names = {entry.split(":")[1] for entry in inventory()}
    assert not set(EXEMPT) - names, f"exemptions of names that are gone: {sorted(set(EXEMPT) - names)}"


def test_every_torch_compile_claim_is_checked() -> None:
    claimed = [e.name for e in all_entries() if C.claims_compile(e.obj) and not e.compile and "compile" not in e.skip]
    assert not claimed, f"docstrings claim torch.compile, the contract does not check it: {claimed}"


# --------------------------------------------------------------------------- the contract's checks can fail


def add_in_place(x: torch.Tensor) -> torch.Tensor:
    return x.add_(1.0)


def to_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() * 2


class Unpicklable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fn = lambda x: x  # a lambda attribute: pickle fails

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def broken(check: str) -> Entry:
    x = lambda dtype: call(torch.ones(3, dtype=dtype))  # noqa: E731
    rows = {
        "smoke": Entry("dml_bias.similarity:normalize", x, tensor((4,))),
        "reference": Entry("dml_bias.similarity:normalize", x, tensor((3,)), reference=lambda v: v.double()),
        "gradcheck": Entry("dml_bias.similarity:normalize", x, tensor((3,)), grad=(0,), make=lambda d: wrong_grad),
        "twin": Entry(
            "dml_bias.similarity:normalize",
            x,
            tensor((3,)),
            make=lambda d: nn.Identity(),
            twin=lambda m: lambda v: v + 1,
        ),
        "dtype": Entry("dml_bias.similarity:normalize", x, tensor((3,)), make=lambda d: to_float32),
        "unchanged": Entry("dml_bias.similarity:normalize", x, tensor((3,)), make=lambda d: add_in_place),
        "pickle": Entry("dml_bias.similarity:normalize", x, tensor((3,)), make=lambda d: Unpicklable()),
        "missing reason": Entry("dml_bias.similarity:normalize", x, tensor((3,))),
    }
    return rows[check]


class _WrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 3  # wrong: the derivative is 2


def wrong_grad(x: torch.Tensor) -> torch.Tensor:
    return _WrongGrad.apply(x)


@pytest.mark.parametrize("check", ["smoke", "reference", "gradcheck", "twin", "dtype", "unchanged", "pickle"])
def test_a_broken_object_fails_its_check(check: str) -> None:
    with pytest.raises((AssertionError, GradcheckError, pickle.PicklingError, AttributeError)):
        C.run(broken(check), check)


def test_a_check_without_data_or_reason_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="neither the data for 'reference' nor a skip reason"):
        C.run(broken("missing reason"), "reference")


def test_a_known_object_passes_every_applicable_check() -> None:
    entry = Entry(
        "dml_bias.similarity:normalize",
        lambda dtype: call(torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=dtype)),
        tensor((2, 2)),
        reference=lambda v: torch.tensor([[0.6, 0.8], [1.0, 0.0]], dtype=torch.float64),
        grad=(0,),
    )
    for check in ("smoke", "bad_input", "reference", "gradcheck", "dtype", "unchanged"):
        C.run(entry, check)


@pytest.mark.slow
def test_the_compile_check_runs_and_compares() -> None:
    entry = Entry(
        "dml_bias.heads:gem",
        lambda dtype: call(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1, p=2.0),
        tensor((2, 3)),
        compile=True,
    )
    C.run(entry, "compile")
