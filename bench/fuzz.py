"""Long differential fuzzing run: COUNT random CNN graphs through the compiler's checks.

Each graph (tests/graph_fuzzer.py) is compiled for rzv2h with every lossless pass held to onnxruntime's
outputs on the original, the package must pass the simulator, and channel pruning at 0.5 must give a valid
package or refuse cleanly (tests/fuzz_checks.py). Prints how many graphs were tried and every failure with
its seed, so `random_model(np.random.default_rng(SEED))` reproduces it.

    python bench/fuzz.py --count 2000 --jobs 2
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run_one(seed: int) -> tuple[int, list[str]]:
    from fuzz_checks import check_model
    from graph_fuzzer import random_model

    try:
        return seed, check_model(random_model(np.random.default_rng(seed)), seed)
    except Exception as exc:  # a crash of the checks themselves is a failure too
        return seed, [f"crash: {type(exc).__name__}: {exc}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0, help="first seed; graphs use seed, seed+1, ...")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    start = time.perf_counter()
    failures = []
    tried = 0
    with ProcessPoolExecutor(args.jobs) as pool:
        for seed, problems in pool.map(run_one, range(args.seed, args.seed + args.count), chunksize=4):
            tried += 1
            if problems:
                failures.append((seed, problems))
                print(f"seed {seed}: {problems[0][:300]}", flush=True)
            if tried % 100 == 0:
                print(f"{tried} graphs tried, {len(failures)} failed, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"fuzz: {tried} graphs tried, {len(failures)} failed in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
