"""What ``import dml_bias`` costs on top of ``import torch``, measured in fresh interpreters in the same run.

Each repeat starts a new Python process that imports torch, then dml_bias, and reports both wall times; the
best of the repeats is taken (the least disturbed by other load). ``import dml_bias`` loads its sub-packages
lazily, so the losses, metrics and miners (the torch-only core) are timed as a second step. Goal: dml_bias adds
under 100 ms, a small fraction of torch's own import. ``tests/test_import.py`` checks *which* modules the
import pulls in; this script checks how long it takes.

    python benchmarks/import_time.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

PROBE = (
    "import json, time\n"
    "t0 = time.perf_counter()\n"
    "import torch\n"
    "t1 = time.perf_counter()\n"
    "import dml_bias\n"
    "t2 = time.perf_counter()\n"
    "import dml_bias.losses, dml_bias.metrics, dml_bias.miners\n"
    "t3 = time.perf_counter()\n"
    "print(json.dumps({'torch': t1 - t0, 'dml_bias': t2 - t1, 'core': t3 - t2}))\n"
)


def measure_once() -> dict[str, float]:
    """One fresh interpreter: seconds for ``import torch``, then ``import dml_bias``, then its torch-only core."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh interpreters to start (best taken)")
    args = parser.parse_args()
    runs = [measure_once() for _ in range(args.repeats)]
    torch_s = min(r["torch"] for r in runs)
    ours_s = min(r["dml_bias"] for r in runs)
    machine = f"Python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}"
    print(f"{machine}, best of {args.repeats} fresh interpreters")
    print(f"import torch               {torch_s * 1000:8.1f} ms")
    print(f"import dml_bias (after it) {ours_s * 1000:8.1f} ms  ({ours_s / torch_s:.1%} of torch's import)")
    core_s = min(r["core"] for r in runs)
    print(f"+ losses, metrics, miners  {core_s * 1000:8.1f} ms  ({core_s / torch_s:.1%} of torch's import)")
    print(f"goal: import dml_bias under 100 ms -> {'met' if ours_s < 0.100 else 'NOT met'}")


if __name__ == "__main__":
    main()
