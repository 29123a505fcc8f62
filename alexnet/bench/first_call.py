"""The first ``alexnet predict`` of one image on a checkpoint never used before, against a
warm call (the same command again), as a user meets them:

    python -m alexnet.bench.first_call --checkpoint runs/demo/train [--rounds 5] [--json]

Each round copies the checkpoint to a new file (no engine cache beside it) under a fresh
``$ALEXNET_HOME`` (no per-machine timings either), then runs ``alexnet predict IMAGE`` on it
twice in new processes: the first call, then the warm one. Rounds alternate the two, so
drift of the machine falls on both. Prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _predict(checkpoint: Path, image: Path, env: dict) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "alexnet", "predict", str(image), "--checkpoint", str(checkpoint)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"alexnet predict failed: {done.stderr.strip()}")
    return time.perf_counter() - t0


def measure(checkpoint: Path, rounds: int) -> dict:
    from PIL import Image

    from alexnet.checkpoint import weights_of

    source, _ = weights_of(checkpoint)
    first, warm = [], []
    with tempfile.TemporaryDirectory(prefix="alexnet-first-call-") as tmp:
        image = Path(tmp) / "one.png"
        Image.new("RGB", (320, 240), (90, 140, 60)).save(image)
        for k in range(rounds):
            copy = Path(tmp) / f"c{k}" / source.name
            copy.parent.mkdir()
            shutil.copyfile(source, copy)
            env = {**os.environ, "ALEXNET_HOME": str(Path(tmp) / f"home{k}")}
            first.append(_predict(copy, image, env))
            warm.append(_predict(copy, image, env))
    f, w = statistics.median(first), statistics.median(warm)
    return {
        "first_s": first,
        "warm_s": warm,
        "first_median_s": f,
        "warm_median_s": w,
        "ratio": f / w,
        "target_ratio": 1.5,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alexnet.bench.first_call", description=__doc__)
    p.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    p.add_argument("--rounds", type=int, default=5, help="first and warm calls, alternated")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    r = measure(args.checkpoint, args.rounds)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(
            f"first call {r['first_median_s']:.2f} s, warm call {r['warm_median_s']:.2f} s "
            f"(medians of {args.rounds}): ratio {r['ratio']:.2f} (target <= 1.5)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
