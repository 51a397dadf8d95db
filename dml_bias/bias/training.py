"""Training one study model: build the network for a mask mode, then train it with one loss.

The third step of the study's data path (config → data → **train** → evaluate → report → figures). Internal to
the study (``__all__`` is empty).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from dml_bias.bias.config import RunSpec, StudyConfig
from dml_bias.bias.data import StudyData, model_input

__all__: list[str] = []


def build_model(config: StudyConfig, mode: str) -> nn.Module:
    """A fresh network for ``mode``: a SmallCNN (synthetic) or a ResNet-50 (CUB); 4 input channels for ``channel``."""
    from dml_bias.bias.models import SmallCNN, build_resnet50

    in_channels = 4 if mode == "channel" else 3
    if config.dataset == "cub":
        return build_resnet50(
            config.resolved_embedding_size(), in_channels=in_channels, weights=config.weights, warn=False
        )
    return SmallCNN(in_channels=in_channels, embedding_size=config.resolved_embedding_size(), width=config.width)


def freeze_bn(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode with frozen affine parameters (the Proxy-Anchor CUB recipe)."""
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block from torch's global random state seeded with ``seed``; afterwards the state is as before.

    Module initialisation (``reset_parameters``) and the training flips of torchvision's transforms draw from the
    global state, which takes no generator: the block gets a forked copy (CPU, and every CUDA device when
    ``device`` is one), so the caller's random state is neither read nor changed.
    """
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_model(
    config: StudyConfig,
    data: StudyData,
    spec: RunSpec,
    device: torch.device,
    bar_desc: str,
    on_epoch: Callable[[], None] | None = None,
) -> tuple[nn.Module, list[float], dict[str, Any]]:
    """Train one model; return it, the mean loss per epoch and the settings actually used.

    The settings (``lr``, ``weight_decay``, ``batch_size``, ``m_per_class``, ``epochs``) are the user's fields where
    set, else the recipe's (:meth:`~dml_bias.bias.StudyConfig.resolved_training`); a recipe batch larger than the
    training classes allow is shrunk to fit. Initialisation and training run from ``config.seed`` in a forked
    random state (:func:`seeded`); the sampler and the background donors have their own generators.
    ``on_epoch`` is called after every epoch (the study's progress bar).
    """
    with seeded(config.seed, device):
        model = build_model(config, spec.mode).to(device)
        return _train(config, data, spec, model, device, bar_desc, on_epoch)


def _train(
    config: StudyConfig,
    data: StudyData,
    spec: RunSpec,
    model: nn.Module,
    device: torch.device,
    bar_desc: str,
    on_epoch: Callable[[], None] | None,
) -> tuple[nn.Module, list[float], dict[str, Any]]:
    from tqdm.auto import tqdm

    from dml_bias.losses import MultiSimilarityLoss, ProxyAnchorLoss
    from dml_bias.miners import MultiSimilarityMiner

    mode, sigma, loss_name = spec.mode, spec.sigma, spec.loss
    cub = config.dataset == "cub"
    epochs = config.resolved_epochs()
    settings = config.resolved_training(loss_name)
    lr, wd, batch, m = settings["lr"], settings["weight_decay"], settings["batch_size"], settings["m_per_class"]
    if "batch_size" in settings["from_recipe"]:
        batch = m * min(batch // m, data.num_train_classes)  # a smaller copy of the data has fewer classes
    miner: Any = None
    if loss_name == "proxy_anchor":
        proxy_loss = ProxyAnchorLoss(data.num_train_classes, config.resolved_embedding_size()).to(device)
        loss_fn: nn.Module = proxy_loss
        groups = [{"params": list(model.parameters()), "lr": lr}, *proxy_loss.param_groups(lr, config.proxy_lr_mult)]
    else:
        loss_fn = MultiSimilarityLoss().to(device)
        miner = MultiSimilarityMiner()
        groups = [{"params": list(model.parameters()), "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    scheduler: Any = None
    warm = 0
    if cub:
        if loss_name == "proxy_anchor":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
            warm = min(5, epochs - 1)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=[int(0.4 * epochs), int(0.8 * epochs)], gamma=0.1
            )
    loader = data.train_loader(mode, batch, m, config.seed)
    params = [p for g in groups for p in g["params"]]
    history: list[float] = []
    bar = tqdm(range(epochs), desc=bar_desc, leave=False, disable=not config.progress, file=sys.stderr)
    for epoch in bar:
        model.train()
        if cub:
            # Warm-up (Proxy-Anchor's recipe): only the embedding head and the proxies learn in the first `warm` epochs.
            for pname, p in model.named_parameters():
                if pname.startswith("trunk."):
                    p.requires_grad_(epoch >= warm)
            freeze_bn(model)  # BatchNorm stays in eval mode with frozen affine parameters (same recipe)
        sampler: Any = loader.batch_sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        total, count = 0.0, 0
        for images, masks, labels in loader:
            images, masks, labels = images.to(device), masks.to(device), labels.to(device)
            emb = model(model_input(images, masks, mode, sigma, data.mean, data.std))
            indices = miner(emb, labels) if miner is not None else None
            loss = loss_fn(emb, labels, indices) if indices is not None else loss_fn(emb, labels)
            if not torch.isfinite(loss):
                raise RuntimeError(f"the {loss_name} loss became {loss.item()} in epoch {epoch + 1} ({bar_desc})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(params, 10.0)
            optimizer.step()
            total += float(loss.detach())
            count += 1
        if scheduler is not None:
            scheduler.step()
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
        if on_epoch is not None:
            on_epoch()
    bar.close()
    used = {"lr": lr, "weight_decay": wd, "batch_size": batch, "m_per_class": m, "epochs": epochs}
    return model, history, used
