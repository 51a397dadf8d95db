"""Test harness shared by every test module.

* ``device`` fixture: ``cpu`` always, ``cuda`` when a GPU is present (otherwise that case is skipped).
* ``dtype`` fixture: float32, float64, float16, bfloat16.
* ``cuda`` marker: tests that need a GPU are skipped without one.
* TF32 and reduced-precision reductions are switched off, so matmuls are exact enough to compare.
* Every test starts from the same seeds (``torch``, ``numpy``, ``random``).
* ``helpers.py`` (dtype-aware ``assert_close``, float64 ``gradcheck``) is importable as ``helpers``.
* pytest runs in its default import mode: test file basenames must be unique across ``tests/``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

CUDA = torch.cuda.is_available()


def _set_exact_math() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.set_float32_matmul_precision("highest")


_set_exact_math()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_checks_switch() -> Iterator[None]:
    """Leave ``dml_bias.set_checks`` (and its cached environment reading) as each test found it."""
    from dml_bias import _checks

    saved = list(_checks._checks_state)
    yield
    _checks._checks_state[:] = saved


@pytest.fixture(autouse=True)
def _seed_and_exact_math() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 - seeds legacy global-state users too
    random.seed(0)
    _set_exact_math()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(params=[torch.float16, torch.bfloat16], ids=str)
def half_dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param
