r"""Testers with pytorch-metric-learning's names: embed a dataset, then score it with the AccuracyCalculator.

* :class:`BaseTester` — ``get_all_embeddings(dataset, trunk_model, embedder_model=None)`` runs the model over a
  dataset in evaluation mode, with a progress bar, and returns ``(embeddings, labels)`` with labels of shape
  ``(N, 1)`` (PML's layout: one column per label level).
* :class:`GlobalEmbeddingSpaceTester` — ``test(dataset_dict, epoch, trunk_model)`` adds PML's accuracy dictionary
  per split, keys ``"<metric>_level0"``.

Example:
    >>> import torch
    >>> from dml_bias import testers
    >>> data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 2)
    >>> emb, labels = testers.BaseTester(progress=False).get_all_embeddings(data, torch.nn.Linear(4, 3))
    >>> emb.shape, labels.shape
    (torch.Size([10, 3]), torch.Size([10, 1]))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dml_bias._checks import check_bool, check_number, describe

__all__ = ["BaseTester", "GlobalEmbeddingSpaceTester"]


def _default_getter(data: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` from a batch: the first two entries of a tuple/list, or ``"image"``/``"label"``."""
    if isinstance(data, Mapping):
        return data["image"], data["label"]
    return data[0], data[1]


def _progress(iterable: Iterable[Any], enabled: bool, total: int) -> Iterable[Any]:
    if not enabled:
        return iterable
    try:
        # tqdm.tqdm, as PML: tqdm.auto's wrapper starts the DataLoader iterator twice, which draws one more seed
        # from torch's global generator and would change the user's later random numbers.
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency; stay silent without it
        return iterable
    return tqdm(iterable, total=total, desc="embeddings", leave=False)


class BaseTester:
    r"""Compute the embeddings of a whole dataset (pytorch-metric-learning's ``BaseTester``).

    Args:
        normalize_embeddings: L2-normalise the embeddings (PML's default ``True``).
        use_trunk_output: Return ``trunk_model``'s output, ignoring ``embedder_model``.
        batch_size: Batch size of the evaluation DataLoader.
        dataloader_num_workers: Its ``num_workers`` (PML's default 2).
        data_device: Device the inputs are moved to; ``None``: the device of the model's first parameter (CPU
            for a model without parameters). PML uses CUDA whenever it is available instead.
        dtype: Optional dtype for floating-point inputs.
        data_and_label_getter: ``batch -> (inputs, labels)``; default: the first two entries of a tuple/list
            batch, or the ``"image"`` and ``"label"`` keys of a dict batch (dml_bias' datasets).
        accuracy_calculator: Used by :class:`GlobalEmbeddingSpaceTester`; ``None``: ``AccuracyCalculator()``.
        progress: Show a progress bar (tqdm).

    Not provided from PML's tester: ``pca``, label hierarchies (``label_hierarchy_level`` other than 0),
    ``set_min_label_to_zero``, visualizers and hooks.

    Example:
        >>> import torch
        >>> from dml_bias.testers import BaseTester
        >>> data = torch.utils.data.TensorDataset(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([7, 8]))
        >>> emb, labels = BaseTester(progress=False).get_all_embeddings(data, torch.nn.Identity())
        >>> emb, labels.squeeze(1)
        (tensor([[0.6000, 0.8000],
                [1.0000, 0.0000]]), tensor([7, 8]))
    """

    def __init__(
        self,
        normalize_embeddings: bool = True,
        use_trunk_output: bool = False,
        batch_size: int = 32,
        dataloader_num_workers: int = 2,
        data_device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        data_and_label_getter: Callable[[Any], tuple[Any, Any]] | None = None,
        accuracy_calculator: Any = None,
        progress: bool = True,
    ) -> None:
        for name, value in (
            ("normalize_embeddings", normalize_embeddings),
            ("use_trunk_output", use_trunk_output),
            ("progress", progress),
        ):
            check_bool(value, name)
        check_number(batch_size, "batch_size", low=1, integer=True)
        check_number(dataloader_num_workers, "dataloader_num_workers", low=0, integer=True)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {describe(dtype)}")
        if data_and_label_getter is not None and not callable(data_and_label_getter):
            raise TypeError(f"data_and_label_getter must be callable or None, got {describe(data_and_label_getter)}")
        self.normalize_embeddings = normalize_embeddings
        self.use_trunk_output = use_trunk_output
        self.batch_size = int(batch_size)
        self.dataloader_num_workers = int(dataloader_num_workers)
        self.data_device = None if data_device is None else torch.device(data_device)
        self.dtype = dtype
        self.data_and_label_getter = data_and_label_getter or _default_getter
        self.accuracy_calculator = accuracy_calculator
        self.progress = progress

    def _device(self, model: nn.Module) -> torch.device:
        if self.data_device is not None:
            return self.data_device
        param = next(iter(model.parameters()), None)
        return torch.device("cpu") if param is None else param.device

    def get_all_embeddings(
        self,
        dataset: torch.utils.data.Dataset,
        trunk_model: nn.Module,
        embedder_model: nn.Module | None = None,
        collate_fn: Callable[..., Any] | None = None,
        eval: bool = True,
        return_as_numpy: bool = False,
    ) -> tuple[Any, Any]:
        """Embed every item of ``dataset`` in order.

        Args:
            dataset: A map-style dataset whose items give ``(inputs, label)`` (see ``data_and_label_getter``).
            trunk_model: The model.
            embedder_model: Applied to the trunk's output (``None``: identity).
            collate_fn: The DataLoader's ``collate_fn``.
            eval: Put the models in evaluation mode first (they are left in it, as in PML).
            return_as_numpy: Return NumPy arrays instead of tensors.

        Returns:
            ``(embeddings, labels)``: ``(N, D)`` floating and ``(N, 1)`` integer (``(N, L)`` for ``L`` label
            columns), on ``data_device``.
        """
        if not isinstance(trunk_model, nn.Module) and not callable(trunk_model):
            raise TypeError(f"trunk_model must be an nn.Module or callable, got {describe(trunk_model)}")
        embedder = nn.Identity() if embedder_model is None else embedder_model
        if eval:
            for model in (trunk_model, embedder):
                if isinstance(model, nn.Module):
                    model.eval()
        device = self._device(trunk_model) if isinstance(trunk_model, nn.Module) else torch.device("cpu")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=self.dataloader_num_workers,
            collate_fn=collate_fn,
        )
        all_emb: list[torch.Tensor] = []
        all_labels: list[torch.Tensor] = []
        with torch.no_grad():
            for data in _progress(loader, self.progress, len(loader)):
                inputs, labels = self.data_and_label_getter(data)
                inputs = inputs.to(device)
                if self.dtype is not None and inputs.is_floating_point():
                    inputs = inputs.to(self.dtype)
                out = trunk_model(inputs)
                if not self.use_trunk_output:
                    out = embedder(out)
                labels = torch.as_tensor(labels).to(device)
                all_emb.append(out)
                all_labels.append(labels.unsqueeze(1) if labels.ndim == 1 else labels)
        if not all_emb:
            raise ValueError("dataset must hold at least one item, got an empty dataset")
        embeddings = torch.cat(all_emb)
        if self.normalize_embeddings:
            embeddings = torch.nn.functional.normalize(embeddings, dim=1)
        label_matrix = torch.cat(all_labels)
        if return_as_numpy:
            return embeddings.cpu().numpy(), label_matrix.cpu().numpy()
        return embeddings, label_matrix


class GlobalEmbeddingSpaceTester(BaseTester):
    r"""Score each split's embeddings with the AccuracyCalculator (pytorch-metric-learning's tester).

    Same arguments as :class:`BaseTester`. :meth:`test` returns (and stores in ``all_accuracies``) a
    dictionary ``{split: {"<metric>_level0": value}}``.

    Example:
        >>> import torch
        >>> from dml_bias.testers import GlobalEmbeddingSpaceTester
        >>> from dml_bias.utils.accuracy_calculator import AccuracyCalculator
        >>> x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> data = torch.utils.data.TensorDataset(x, torch.tensor([0, 0, 1, 1]))
        >>> tester = GlobalEmbeddingSpaceTester(
        ...     accuracy_calculator=AccuracyCalculator(include=("precision_at_1",), k=1), progress=False)
        >>> tester.test({"val": data}, 0, torch.nn.Identity())
        {'val': {'precision_at_1_level0': 1.0}}
    """

    def test(
        self,
        dataset_dict: Mapping[str, torch.utils.data.Dataset],
        epoch: int,
        trunk_model: nn.Module,
        embedder_model: nn.Module | None = None,
        splits_to_eval: Sequence[tuple[str, Sequence[str]]] | None = None,
        collate_fn: Callable[..., Any] | None = None,
    ) -> dict[str, dict[str, float]]:
        """Accuracies of each query split against its reference splits.

        Args:
            dataset_dict: ``{split_name: dataset}``.
            epoch: The epoch (kept for PML's signature).
            trunk_model: The model.
            embedder_model: Applied to the trunk's output.
            splits_to_eval: ``[(query_split, [reference_splits...])]``; default: each split against itself. A
                query split among its references counts as ``ref_includes_query`` (its own items excluded).
            collate_fn: The DataLoader's ``collate_fn``.
        """
        from dml_bias.utils.accuracy_calculator import AccuracyCalculator

        if not isinstance(dataset_dict, Mapping) or not dataset_dict:
            raise TypeError(f"dataset_dict must be a non-empty dict of datasets, got {describe(dataset_dict)}")
        calc = self.accuracy_calculator if self.accuracy_calculator is not None else AccuracyCalculator()
        pairs = splits_to_eval if splits_to_eval is not None else [(name, [name]) for name in dataset_dict]
        needed = {name for q, refs in pairs for name in (q, *refs)}
        unknown = sorted(needed - set(dataset_dict))
        if unknown:
            raise ValueError(f"splits_to_eval names splits not in dataset_dict: {unknown}")
        cache = {
            name: self.get_all_embeddings(dataset_dict[name], trunk_model, embedder_model, collate_fn)
            for name in sorted(needed)
        }
        self.all_accuracies: dict[str, dict[str, float]] = {}
        for query_split, refs in pairs:
            q_emb, q_lab = cache[query_split]
            includes = query_split in refs
            ordered = [query_split, *[r for r in refs if r != query_split]] if includes else list(refs)
            r_emb = torch.cat([cache[r][0] for r in ordered])
            r_lab = torch.cat([cache[r][1] for r in ordered])
            acc = calc.get_accuracy(q_emb, q_lab[:, 0], r_emb, r_lab[:, 0], ref_includes_query=includes)
            self.all_accuracies[query_split] = {f"{k}_level0": v for k, v in acc.items()}
        return self.all_accuracies
