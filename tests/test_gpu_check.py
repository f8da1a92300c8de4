"""tools/gpu_check.py --dry-run: the whole GPU check on CPU at toy sizes, so the tool cannot rot
between the runs on a GPU machine. About a minute on two cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_section_with_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    sections = report["sections"]
    assert report["mode"] == "dry-run"
    assert list(sections) == ["env", "speed", "train", "planner", "pytest", "speed-big"]
    failed = {name: section.get("error") for name, section in sections.items() if section["status"] not in ("ok", "skipped")}
    assert not failed, failed

    env = sections["env"]
    assert env["torch"] and env["cuda_available"] in (True, False) and env["disk_free_bytes"] > 0

    methods = sections["speed"]["methods"]
    assert set(methods) == {"lorasp-bf16", "lorasp-nf4", "peft-lora", "peft-qlora"}
    for name, method in methods.items():
        if method["status"] == "skipped":  # only the 4-bit ones, and only when bitsandbytes cannot run 4-bit here
            assert name in ("lorasp-nf4", "peft-qlora") and "bitsandbytes" in method["reason"]
            continue
        assert method["status"] == "ok", (name, method)
        assert method["tokens_per_s"] > 0 and method["measured_steps"] == report["sizes"]["steps"]
        assert method["peak_allocated_bytes"] > 0 and method["peak_reserved_bytes"] > 0
    assert methods["lorasp-bf16"]["compute_dtype"] == "float32" and methods["peft-lora"]["compute_dtype"] == "float32"

    train = sections["train"]
    for budget in ("12GB", "24GB"):
        run = train["runs"][budget]
        assert run["exit_code"] == 0, run
        assert run["peak_bytes"] > 0 and run["plan_total_bytes"] > 0 and run["peak_vs_plan"] > 0
        assert run["budget_bytes"] == int(budget[:2]) * 10**9 and run["steps_logged"] == report["sizes"]["train_steps"]
    guard = train["guard"]
    assert guard["exit_code"] == 3 and "went over the budget" in guard["message"], guard

    planner = sections["planner"]
    assert planner["measured_points"] == planner["requested_points"] >= 1
    assert planner["held_out_points"] >= 1 and planner["held_out_median_pct"] >= 0
    assert all(point["measured_bytes"] > 0 and point["predicted_bytes"] > 0 for point in planner["points"])

    tests = sections["pytest"]
    assert tests["exit_code"] == 0 and tests["tests"] >= 3 and tests["failures"] == tests["errors"] == 0

    assert sections["speed-big"]["status"] == "skipped"
    names = [row["name"] for row in report["targets"]]
    assert len(names) == 7, names  # two speed ratios, planner, two budgets, guard, pytest
    assert all(row["result"] in ("pass", "miss", "n/a") for row in report["targets"])
    assert {row["name"]: row["result"] for row in report["targets"]}["memory guard on a budget set too small"] == "pass"
    assert "| target" in done.stdout and "DRY RUN" in done.stdout
