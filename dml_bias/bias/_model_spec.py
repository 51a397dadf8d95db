"""Loading the model an audit explains, from a spec string, and the preprocessing sidecar of saved study models.

Specs (nothing is ever downloaded):

* a TorchScript file (``torch.jit.load``), e.g. a model saved by ``dml-bias study --save-models``;
* a ``torch.export`` program file ending in ``.pt2`` (``torch.export.load(path).module()``);
* ``module.path:callable``: an importable factory returning an ``nn.Module``, with optional ``weights`` (a
  ``state_dict`` file, loaded strictly);
* ``torchvision:NAME`` with optional ``weights``: a torchvision architecture with its classification head replaced
  by identity (the pooled features are the embedding).

Every failure raises :class:`~dml_bias.bias.AuditError` with a one-line message. Internal (``__all__`` is empty).
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dml_bias.bias._modes import eval_mode
from dml_bias.bias.config import StudyError

__all__: list[str] = []

#: The ``schema`` of the JSON sidecar written next to a saved study model.
SIDECAR_SCHEMA = "dml_bias.model/1"


class AuditError(StudyError):
    """A problem with the audit's input that the user must fix: a model spec, a data folder, a flag.

    The command line prints its message on stderr (one line) and exits with status 2. It is a
    :class:`~dml_bias.bias.StudyError`.

    Example:
        >>> from dml_bias.bias import AuditError, StudyError
        >>> issubclass(AuditError, StudyError)
        True
    """


@dataclass
class LoadedModel:
    """A loaded model: the module, what kind of spec it came from, whether hooks work, and its sidecar."""

    module: nn.Module
    kind: str  # "torchscript", "export", "factory", "torchvision", "module"
    hookable: bool
    sidecar: dict[str, Any] | None
    name: str


class ExportedModule(nn.Module):
    """A ``torch.export`` program's module behind a plain module (the program refuses ``.eval()``/``.train()``).

    The program is kept out of the sub-modules, so switching the wrapper's mode never reaches it; an exported
    program runs in the mode it was exported in.
    """

    def __init__(self, program_module: Any) -> None:
        super().__init__()
        object.__setattr__(self, "_program", program_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        program: Any = self.__dict__["_program"]
        return program(x)


class L2Normalized(nn.Module):
    """A saved study model (which returns unnormalised embeddings) followed by L2 normalisation in Python.

    The study saves its models without their last :func:`torch.nn.functional.normalize`, so that the attribution,
    which holds the norm of ``F.normalize`` calls constant, can decompose the similarity of a compiled model too; a
    compiled normalisation would make every first-order map sum to zero.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.inner(x), dim=1)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The JSON sidecar of a saved model (``<stem>.json`` beside it), or ``None`` if there is none."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read the model's preprocessing sidecar {side}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SIDECAR_SCHEMA:
        raise AuditError(f'{side} is not a dml_bias model sidecar (expected "schema": {SIDECAR_SCHEMA!r})')
    return data


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load_state(weights: str | Path) -> dict[str, Any]:
    path = Path(weights)
    if not path.is_file():
        raise AuditError(f"--weights {str(path)!r} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a bad file
        raise AuditError(f"cannot read --weights {str(path)!r} as a state_dict: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise AuditError(f"--weights {str(path)!r} must hold a state_dict, got a {type(state).__name__}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")


def _load_strict(module: nn.Module, weights: str | Path, ignore_prefixes: tuple[str, ...] = ()) -> None:
    state = _load_state(weights)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(ignore_prefixes))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise AuditError(f"--weights {str(weights)!r} does not fit the model; " + "; ".join(parts))
    try:
        module.load_state_dict(state, strict=not ignore_prefixes)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise AuditError(f"--weights {str(weights)!r} does not fit the model: {' '.join(first[-2:]).strip()}") from None


def _torchvision(name: str, weights: str | Path | None) -> nn.Module:
    import torchvision

    try:
        model = torchvision.models.get_model(name, weights=None)
    except (ValueError, KeyError):
        known = ", ".join(sorted(torchvision.models.list_models(torchvision.models))[:8])
        raise AuditError(f"torchvision has no model {name!r} (e.g. {known}, …)") from None
    head = next(
        (h for h in ("fc", "classifier", "heads", "head") if isinstance(getattr(model, h, None), nn.Module)), None
    )
    if head is None:
        raise AuditError(f"torchvision:{name} has no fc / classifier / heads / head to replace by identity")
    if weights is not None:
        _load_strict(model, weights, ignore_prefixes=(f"{head}.",))
    setattr(model, head, nn.Identity())
    return model


def _factory(spec: str, weights: str | Path | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AuditError(f"--model {spec!r}: cannot import {module_name!r} ({exc})") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise AuditError(f"--model {spec!r}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if isinstance(factory, nn.Module):
        model = factory
    elif callable(factory):
        try:
            model = factory()
        except Exception as exc:  # the user's code
            raise AuditError(f"--model {spec!r}: calling the factory failed: {type(exc).__name__}: {exc}") from None
    else:
        raise AuditError(f"--model {spec!r} must name a callable returning a torch.nn.Module")
    if not isinstance(model, nn.Module):
        raise AuditError(f"--model {spec!r} must return a torch.nn.Module, got {type(model).__name__}")
    if weights is not None:
        _load_strict(model, weights)
    return model


def load_model(spec: str, weights: str | Path | None = None) -> LoadedModel:
    """Load the model of ``spec`` (see the module notes) on the CPU, in eval mode."""
    if not isinstance(spec, str) or not spec.strip():
        raise AuditError(f"--model must be a file, module.path:callable or torchvision:NAME, got {spec!r}")
    path = Path(spec)
    if spec.startswith("torchvision:"):
        model: nn.Module = _torchvision(spec.split(":", 1)[1], weights)
        return LoadedModel(model.eval(), "torchvision", True, None, spec)
    if path.suffix == ".pt2" or path.is_file():
        if not path.is_file():
            raise AuditError(f"--model {spec!r} is not a file")
        if weights is not None:
            raise AuditError("--weights is only used with a module.path:callable or torchvision:NAME model")
        sidecar = read_sidecar(path)
        if path.suffix == ".pt2":
            try:
                model = torch.export.load(str(path)).module()
            except Exception as exc:  # torch raises many kinds for a bad file
                raise AuditError(
                    f"cannot load {spec!r} as a torch.export program: {type(exc).__name__}: {exc}"
                ) from None
            return LoadedModel(ExportedModule(model), "export", False, sidecar, path.name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream; files still load
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AuditError(f"cannot load {spec!r} as a TorchScript model: {line}") from None
        if sidecar is not None and sidecar.get("normalize"):
            model = L2Normalized(model)
        return LoadedModel(model.eval(), "torchscript", False, sidecar, path.name)
    if ":" in spec and not spec.startswith(("/", ".")) and "/" not in spec.split(":", 1)[0]:
        model = _factory(spec, weights)
        return LoadedModel(model.eval(), "factory", True, None, spec)
    raise AuditError(
        f"--model {spec!r} is neither an existing file (TorchScript, or .pt2 from torch.export), nor "
        "module.path:callable, nor torchvision:NAME"
    )


def find_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last sub-module whose output is a 4-D ``(N, K, h, w)`` map with ``h·w > 1`` and that runs once (dry run).

    Raises:
        AuditError: No such module; the message lists the modules with their output shapes.
    """
    seen: list[tuple[str, tuple[int, ...] | None]] = []
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            seen.append((name, shape))

        return record

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    fitting = [n for n, s in seen if s is not None and len(s) == 4 and s[2] * s[3] > 1 and calls[n] == 1]
    if not fitting:
        shown = ", ".join(f"{n} {list(s) if s else '?'}" for n, s in seen[-8:]) or "none ran"
        raise AuditError(
            "no sub-module of the model outputs a 4-D (N, K, h, w) feature map; pass --layer NAME or --layer input "
            f"(last modules run: {shown})"
        )
    return fitting[-1]


def model_file_name(spec: dict[str, Any]) -> str:
    """``<loss>-<mode>`` (soft: ``<loss>-soft<σ>``), the file stem of a saved study model."""
    mode = f"soft{spec['sigma']:g}" if spec["mode"] == "soft" else str(spec["mode"])
    return f"{spec['loss']}-{mode}"


def study_sidecar(config: Any, data: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing and test data of a study model, as the audit reads them."""
    mode = spec["mode"]
    side: dict[str, Any] = {
        "schema": SIDECAR_SCHEMA,
        "format": "torchscript",
        "name": model_file_name(spec),
        "loss": spec["loss"],
        "mode": mode,
        "mask_input": "none" if mode == "bg_augment" else mode,
        "sigma": spec["sigma"] if mode == "soft" else None,
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": data.input_size,
        "resize": data.input_size if config.dataset == "synthetic" else round(data.input_size * 256 / 224),
        "seed": config.seed,
        "attribution_images": config.attribution_images,
        "dataset": config.dataset,
        # The file holds the model without its last F.normalize (see L2Normalized); normalise its output.
        "normalize": True,
    }
    if config.dataset == "synthetic":
        homes = config.resolved_homes()
        side["synthetic"] = {
            "num_classes": config.num_classes,
            "images_per_class": config.images_per_class,
            "image_size": config.resolved_image_size(),
            "background_correlation": config.background_correlation,
            "num_backgrounds": homes[0],
            "unique_homes": homes[1],
            "seed": config.seed,
        }
    return side


@contextmanager
def _without_normalize() -> Iterator[None]:
    """While tracing, :func:`torch.nn.functional.normalize` returns its input: the trace ends before it."""
    original = torch.nn.functional.normalize

    def identity(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return input

    torch.nn.functional.normalize = identity  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.nn.functional.normalize = original  # type: ignore[assignment]


def save_study_model(model: nn.Module, config: Any, data: Any, spec: dict[str, Any]) -> Path:
    """Trace ``model`` (eval mode) to TorchScript into ``out_dir/models/<name>.pt`` with its JSON sidecar.

    Both files are written to temporary names and renamed into place; the model's training flags are restored.
    """
    from dml_bias.bias.data import model_input

    folder = Path(str(config.out_dir)) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    name = model_file_name(spec)
    test = data.test
    example = model_input(test.images[:2], test.masks[:2], spec["mode"], spec["sigma"], data.mean, data.std).to(
        next(model.parameters()).device
    )
    with eval_mode(model), warnings.catch_warnings(), torch.no_grad(), _without_normalize():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
    path = folder / f"{name}.pt"
    tmp = folder / f".{name}.pt.tmp{os.getpid()}"
    try:
        traced.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(folder / f"{name}.json", study_sidecar(config, data, spec))
    return path
