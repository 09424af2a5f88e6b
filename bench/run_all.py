"""Run every stream benchmark in turn, each in its own process; print one JSON line each.

    python bench/run_all.py [--only push_latency,drain] [--quiet-load 1.5] [--out FILE]

Each bench starts and stops its own gunicorn and scratch database. On a shared
2-core machine other work skews the numbers, so before each bench this waits
(at most --quiet-wait seconds) for the 1-minute load average to fall below
--quiet-load; the load seen is part of each result. The last line is a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "push_latency": [],
    "drain": [],
    "idle_cost": [],
    "capacity": [],
    "storm": [],
}
# Each bench bounds itself; this is the outer bound per bench.
LIMITS = {"push_latency": 700, "drain": 1000, "idle_cost": 400, "capacity": 500, "storm": 400}


def wait_quiet(threshold: float, most: float) -> float:
    deadline = time.monotonic() + most
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    args.add_argument("--only", default=",".join(BENCHES), help="comma-separated bench names")
    args.add_argument("--quiet-load", type=float, default=1.5)
    args.add_argument("--quiet-wait", type=float, default=120)
    args.add_argument("--out", default=None, help="also append the JSON lines to this file")
    opts = args.parse_args()
    results = []
    for name in opts.only.split(","):
        load = wait_quiet(opts.quiet_load, opts.quiet_wait)
        print(f"[run_all] {name} (load {load})", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(
                [sys.executable, str(HERE / f"{name}.py"), *BENCHES[name]],
                capture_output=True,
                text=True,
                timeout=LIMITS[name],
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            result = (
                json.loads(lines[-1])
                if lines
                else {"bench": name, "error": proc.stderr[-2000:], "exit": proc.returncode}
            )
        except subprocess.TimeoutExpired:
            result = {"bench": name, "error": f"no result within {LIMITS[name]} s"}
        result["loadavg_1m_at_start"] = load
        print(json.dumps(result), flush=True)
        results.append(result)
        if opts.out:
            with open(opts.out, "a", encoding="utf-8") as out:
                out.write(json.dumps(result) + "\n")
    summary = {
        "bench": "summary",
        "met": {r["bench"]: r.get("met") for r in results},
        "all_met": all(r.get("met") for r in results),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
