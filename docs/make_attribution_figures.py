"""Draw the attribution figure of the study guide: ``docs/_static/figures/study_attribution.png``.

Run from the repository root after changing the study or its attribution measures, and commit the PNG::

    python docs/make_attribution_figures.py [--out docs/_static/figures/study_attribution.png]
    python docs/make_attribution_figures.py --method gradcam --out docs/_static/figures/study_attribution_gradcam.png

It trains the default study's Proxy-Anchor models for the modes ``none``, ``hard`` and ``bg_augment`` (the default
configuration restricted to those runs, seed 0, one torch thread: the same models as in the default study, up to
float reductions that depend on the thread count) and draws
:func:`dml_bias.bias.plots.plot_attribution` for them: three query/neighbour pairs from the classes the per-class
bias report ranks first. About a minute on one CPU core.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dml_bias.bias import StudyConfig, run_study
from dml_bias.bias.plots import plot_attribution

DEFAULT_OUT = Path(__file__).resolve().parent / "_static" / "figures" / "study_attribution.png"


def main() -> None:
    """Train the three models and write the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--method",
        default="decomposition",
        choices=["decomposition", "gradcam"],
        help="attribution method of the maps (gradcam: the earlier default, for the comparison in the guide)",
    )
    args = parser.parse_args()
    if args.method != "decomposition":
        import functools

        import dml_bias.bias.attribution as attribution

        attribution.similarity_attribution = functools.partial(  # the study calls it from this module
            attribution.similarity_attribution, method=args.method
        )
    config = StudyConfig(
        losses=("proxy_anchor",),
        modes=("none", "hard", "bg_augment"),
        variants=("original", "mixed_rand"),
        num_threads=1,
        progress=False,
    )
    result = run_study(config)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.method == "decomposition":
        plot_attribution(result, args.out)
    else:
        plot_attribution(result, args.out, method=f"{args.method} of the cosine similarity")
    for run in result.runs:
        a = run["attribution"]
        print(
            f"{run['name']:<12} foreground energy {a['foreground_energy']:.3f} (chance {a['foreground_chance']:.3f}), "
            f"background sensitivity {a['background_sensitivity']:.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
