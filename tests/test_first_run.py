"""The first thing a new user runs: `train --mem 4GB` on the bundled model, with nothing but a budget.

The trainer plans for itself (the planner's default sequence length 512 and batch 8) and the memory
guard stops any step whose peak resident set passes the budget (exit 3). So exit 0 here means the
plan the planner chose fitted the budget it was given, on this machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

BUDGET = 4 * 10**9


def _write_data(path, lines: int = 120) -> None:
    # ~90 tokens a line (words of the tokenizer's vocabulary): 2 steps x 8 blocks x 512 tokens
    # need 8,192 tokens, so the stream never runs dry.
    words = ["memory", "budget", "the", "plan", "fits", "small", "device", "train", "adapter", "rank", "layer", "token"]
    rows = [{"text": " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(80)) + "."} for i in range(lines)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.mark.slow
def test_first_run_with_only_a_budget_fits_its_own_plan(tmp_path):
    data = tmp_path / "train.jsonl"
    _write_data(data)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "lorasp_edge", "train", "--model", "smollm2-135m", "--mem", "4GB", "--data", str(data),
         "--out", str(out), "--steps", "2", "--no-progress"],
        capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    # The planner's own defaults, as a new user gets them.
    assert plan["seq_len"] == 512 and plan["micro_batch"] * plan["grad_accum"] == 8
    assert plan["budget_bytes"] == BUDGET
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["stopped"] is None
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [1, 2]
    # The guard's peak (what the budget limits: anonymous memory on CPU) stayed inside the budget,
    # and the plan's prediction plus its headroom covered it.
    peak = summary["peak_bytes"]
    assert 0 < peak <= BUDGET
    assert peak <= plan["memory"]["total_bytes"] + plan["headroom"] * BUDGET
