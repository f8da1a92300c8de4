"""Wall time of `lorasp-edge export` for two source trees of lorasp-edge, side by side.

    git archive OLD_COMMIT | tar -x -C /tmp/old        # the tree to compare against
    python tools/time_export.py --adapter run/adapter --trees /tmp/old . --rounds 2 -- --format both

Each export runs in a fresh process (`python -m lorasp_edge export`, the tree first on PYTHONPATH, so
the same virtual environment runs both), into a fresh --out, in alternating order (ABBA...), and is
timed from the process's start to its exit: imports, model load, merge, every format and every
check. Prints each run, the median per tree and the ratio of medians, and each manifest's source
and peak RSS. Run it alone on the machine (the ratio is the figure; absolute seconds move with the CPU).
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


def run_export(tree: Path, adapter: Path, out: Path, extra: list[str]) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(tree.resolve()))
    command = [sys.executable, "-m", "lorasp_edge", "export", "--adapter", str(adapter), "--out", str(out), *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: export exited {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": round(seconds, 1), "source": manifest.get("source", "streamed" if manifest.get("streamed") else "in-memory"),
            "peak_rss_gb": round(manifest["peak_rss_bytes"] / 1e9, 2), "formats": sorted(manifest.get("formats", {}))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--trees", type=Path, nargs=2, required=True, metavar=("A", "B"), help="two lorasp-edge source trees (repository roots)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: export options, e.g. --format both")
    args = parser.parse_args()
    extra = [item for item in args.extra if item != "--"]
    runs: dict[str, list[dict]] = {str(tree): [] for tree in args.trees}
    with tempfile.TemporaryDirectory(prefix="time-export-") as scratch:
        for round_index in range(args.rounds):
            order = args.trees if round_index % 2 == 0 else args.trees[::-1]
            for tree in order:
                out = Path(scratch) / f"out-{round_index}-{len(runs[str(tree)])}-{tree.name or 'tree'}"
                result = run_export(tree, args.adapter, out, extra)
                runs[str(tree)].append(result)
                print(f"round {round_index + 1}  {tree}: {result['seconds']:.1f} s  ({result['source']}, peak RSS {result['peak_rss_gb']} GB, "
                      f"{', '.join(result['formats'])})", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    medians = {tree: statistics.median(run["seconds"] for run in results) for tree, results in runs.items()}
    first, second = (str(tree) for tree in args.trees)
    print(f"median: {first} {medians[first]:.1f} s, {second} {medians[second]:.1f} s; {second} / {first} = {medians[second] / medians[first]:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"export_options": extra, "runs": runs, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
