"""Check the attribution methods on models whose reliance is known, and draw the guide's figure.

Run from the repository root, and commit the PNG::

    python docs/make_attribution_checks.py [--out docs/_static/figures/attribution_windowed.png]

Prints (1) the foreground energy of every method on the windowed models of ``tests/bias/_windowed.py`` — the
embedding pools the object's window with weight ``alpha`` and the background with ``1 − alpha`` — at the layer and
at the input, and (2) Adebayo et al.'s cascading randomisation: Spearman's ρ between the maps of a briefly trained
SmallCNN and of the same model with its layers re-initialised from the top down. Draws, for the object-only and the
background-only model, one image with its decomposition and Grad-CAM maps. A minute on one CPU core.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "bias"))
from _windowed import WindowNet, scenes, trained_small_cnn  # noqa: E402 - the test models, shared with the tests

from dml_bias.bias import foreground_energy, similarity_attribution  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "_static" / "figures" / "attribution_windowed.png"
METHODS = [
    ("decomposition", "stem"),
    ("integrated_gradients", "stem"),
    ("gradcam", "stem"),
    ("decomposition", None),
    ("integrated_gradients", None),
]


def windowed_table() -> None:
    q, m, _ = scenes(8, seed=0)
    r, _, _ = scenes(8, seed=1)
    alphas = (1.0, 0.75, 0.5, 0.25, 0.0)
    print("foreground energy on the windowed models (chance 0.141); alpha = weight of the object window")
    print(f"{'method':<34}" + "".join(f"{a:>8.2f}" for a in alphas))
    for method, layer in METHODS:
        row = []
        for alpha in alphas:
            maps = similarity_attribution(WindowNet(alpha), q, r, layer=layer, method=method)
            row.append(foreground_energy(maps, m).summary()["mean"])
        name = f"{method} @ {'layer' if layer else 'input'}"
        print(f"{name:<34}" + "".join(f"{v:>8.3f}" for v in row))


def sanity_table() -> None:
    from scipy.stats import spearmanr

    model, q, r = trained_small_cnn()
    layers = ("head.linear", "features.8", "features.4", "features.0")
    print("\ncascading randomisation (Spearman's rho of the maps, mean over 6 queries), randomised down to:")
    print(f"{'method':<34}" + "".join(f"{n:>13}" for n in layers))
    for method, layer in [
        ("decomposition", "features"),
        ("integrated_gradients", "features"),
        ("gradcam", "features"),
        ("decomposition", None),
        ("integrated_gradients", None),
    ]:
        before = similarity_attribution(model, q, r, layer=layer, method=method)
        randomised = copy.deepcopy(model)
        g = torch.Generator().manual_seed(1)
        row = []
        for name in layers:
            weight = dict(randomised.named_modules())[name].weight
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=g) * weight.std())
            after = similarity_attribution(randomised, q, r, layer=layer, method=method)
            row.append(sum(float(spearmanr(before[i].flatten(), after[i].flatten())[0]) for i in range(6)) / 6)
        name = f"{method} @ {'features' if layer else 'input'}"
        print(f"{name:<34}" + "".join(f"{v:>13.2f}" for v in row))


def figure(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, m, _ = scenes(2, seed=0)
    r, _, _ = scenes(2, seed=1)
    columns = [("decomposition", "stem"), ("decomposition", None), ("gradcam", "stem")]
    fig, axes = plt.subplots(2, 4, figsize=(10, 5.4), layout="constrained")
    for row, (alpha, title) in enumerate([(1.0, "object-only model"), (0.0, "background-only model")]):
        model = WindowNet(alpha)
        axes[row, 0].imshow(q[0].permute(1, 2, 0).numpy())
        axes[row, 0].contour(m[0].float().numpy(), levels=[0.5], colors="white", linewidths=1)
        axes[row, 0].set_title(f"{title}\n(white: object)", fontsize=10)
        for col, (method, layer) in enumerate(columns, start=1):
            heat = similarity_attribution(model, q[:1], r[:1], layer=layer, method=method)[0]
            energy = foreground_energy(heat[None], m[:1]).summary()["mean"]
            top = float(heat.abs().max()) or 1.0
            ax = axes[row, col]
            image = ax.imshow(heat.numpy() / top, cmap="RdBu_r", vmin=-1, vmax=1)
            ax.contour(m[0].float().numpy(), levels=[0.5], colors="black", linewidths=0.8)
            where = "layer" if layer else "input"
            ax.set_title(f"{method} @ {where}\nforeground energy {energy:.2f}", fontsize=10)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes[:, 1:], shrink=0.8, label="contribution / largest |contribution|")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


def main() -> None:
    """Print both tables and draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    windowed_table()
    sanity_table()
    figure(args.out)


if __name__ == "__main__":
    main()
