"""Cost of the background-bias audit (``dml-bias audit``), against one plain embedding-extraction pass.

1. ``study``: the quick study trains and saves one model (Proxy-Anchor, no mask), then ``dml-bias audit`` runs on the
   built-in test split (384 images, 1,000 bootstrap resamples) as a fresh process: its wall time, Python start
   and imports included. Goal: under 60 s on a 2-core CPU.
2. ``resnet50``: a torchvision ResNet-50 (random initialisation, nothing downloaded, head replaced by identity) at
   224 px on a small folder in the generic format (the synthetic objects rendered at 224 px and written as PNG):
   the audit's stages in images per second, its total against one plain extraction pass of the same images
   (DataLoader → resize/crop → normalise → model, same batch size, measured in the same process), and the peak
   resident memory of each. Goal of the issue: the variants and attribution cost at most 3 × one extraction pass.

Each case runs in its own process, so the peak memory (``ru_maxrss``) is that case's alone.

    python benchmarks/audit.py [--case study|resnet50|all] [--classes 5] [--per-class 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_study(work: Path) -> dict[str, float]:
    from dml_bias.bias import StudyConfig, run_study

    t0 = time.perf_counter()
    cfg = StudyConfig.quick(losses=("proxy_anchor",), modes=("none",), out_dir=str(work / "study"), save_models=True)
    cfg.progress = False
    run_study(cfg)
    train = time.perf_counter() - t0
    model = work / "study" / "models" / "proxy_anchor-none.pt"
    t1 = time.perf_counter()
    cmd = ["dml-bias", "audit", "--model", str(model), "--data", "synthetic", "--no-progress"]
    out = subprocess.run([*cmd, "--out", str(work / "audit")], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t1
    result = json.loads((work / "audit" / "results.json").read_text())
    verdict = result["verdict"]
    print(out.stdout.splitlines()[2] if len(out.stdout.splitlines()) > 2 else out.stdout)
    return {
        "train_one_quick_model_s": train,
        "audit_cli_wall_s": wall,
        "audit_in_process_s": result["timings"]["total"],
        "images": result["num_images"],
        "verdict": verdict,  # type: ignore[dict-item]
    }


def _write_folder(root: Path, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    from dml_bias.datasets import SyntheticBackgrounds

    data = SyntheticBackgrounds("test", num_classes=classes, images_per_class=per_class, image_size=size)
    images, masks = data.render_all()
    for i, label in enumerate(data.labels.tolist()):
        name = f"class{label:02d}"
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        (root / "masks" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(root / "images" / name / f"{i:04d}.png")
        Image.fromarray(masks[i, 0].numpy()).save(root / "masks" / name / f"{i:04d}.png")


def case_resnet50(work: Path, classes: int, per_class: int, batch: int) -> dict[str, float]:
    import torch
    import torchvision
    from torch import nn

    from dml_bias.bias import audit
    from dml_bias.bias.data import IMAGENET_MEAN, IMAGENET_STD, model_input
    from dml_bias.datasets import MaskedFolder

    root = work / "folder"
    _write_folder(root, classes, per_class, 256)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    model.eval()
    data = MaskedFolder(root)
    n = len(data)

    # one plain extraction pass: the same loader, resize/crop and normalisation, the model once per image
    from dml_bias.bias.audit import _collate, _Prepared

    loader = torch.utils.data.DataLoader(_Prepared(data, 224, None, True), batch_size=batch, collate_fn=_collate)
    t0 = time.perf_counter()
    with torch.no_grad():
        for b in loader:
            model(model_input(b["images"], b["masks"], "none", None, IMAGENET_MEAN, IMAGENET_STD))
    extraction = time.perf_counter() - t0
    peak_extraction = _peak_mib()
    t1 = time.perf_counter()
    result = audit(model, data, image_size=224, batch_size=batch, bootstrap=1000, progress=False)
    total = time.perf_counter() - t1
    stages = result.timings
    attributed = result.foreground_energy["num_images"]
    return {
        "images": n,
        "attributed_images": attributed,
        "extraction_s": extraction,
        "extraction_images_per_s": n / extraction,
        "audit_total_s": total,
        "variants_and_sensitivity_s": stages["variants_and_sensitivity"],
        "variants_and_sensitivity_images_per_s": n / stages["variants_and_sensitivity"],
        "metrics_s": stages["metrics"],
        "attribution_s": stages["attribution"],
        "attribution_images_per_s": attributed / stages["attribution"] if stages["attribution"] else float("nan"),
        "ratio_total_vs_one_extraction": total / extraction,
        "ratio_total_vs_seven_extractions": total / (7 * extraction),
        "peak_rss_after_extraction_mib": peak_extraction,
        "peak_rss_mib": _peak_mib(),
        "layer": result.settings["layer"],  # type: ignore[dict-item]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("study", "resnet50", "all"), default="all")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case == "all" or not args.child:
        import torch

        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
        cases = ("study", "resnet50") if args.case == "all" else (args.case,)
        for case in cases:
            argv = [sys.executable, __file__, "--case", case, "--child", "--classes", str(args.classes)]
            argv += ["--per-class", str(args.per_class), "--batch", str(args.batch)]
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode:
                print(out.stdout, out.stderr)
                raise SystemExit(out.returncode)
            print(out.stdout.strip())
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "study":
            numbers = case_study(Path(tmp))
        else:
            numbers = case_resnet50(Path(tmp), args.classes, args.per_class, args.batch)
    print(f"[{args.case}]")
    for key, value in numbers.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
