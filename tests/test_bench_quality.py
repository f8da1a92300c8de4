"""tools/bench_quality.py's report from several grids run side by side, and the data writer they share."""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
_SPEC = importlib.util.spec_from_file_location("bench_quality", TOOLS / "bench_quality.py")
quality = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_quality"] = quality  # its dataclasses look their module up while being defined
_SPEC.loader.exec_module(quality)


def grid(seeds, settings=None, seconds=60.0):
    runs = {name: [{"seed": seed, "exact_match": seed / 100} for seed in seeds] for name in ("lora", "offset-2xlr")}
    return {"settings": settings or {"task": "chat", "steps": 50}, "bases": {"base": {"exact_match": 0.06}}, "runs": runs,
            "methods": {"lora": {}, "offset-2xlr": {}}, "total_seconds": seconds, "command": f"grid {seeds}"}


def test_grids_of_other_seeds_report_as_one():
    merged = quality.merged_grids([grid([0, 1, 2]), grid([2, 3]), grid([4])], [Path("a"), Path("b"), Path("c")])
    assert [run["seed"] for run in merged["runs"]["lora"]] == [0, 1, 2, 3, 4]  # seed 2 once, from the first file
    assert merged["total_seconds"] == 180.0 and merged["bases"] == {"base": {"exact_match": 0.06}}


def test_grids_of_other_settings_are_refused():
    with pytest.raises(SystemExit, match="b: a grid of other settings than a"):
        quality.merged_grids([grid([0]), grid([1], {"task": "chat", "steps": 40})], [Path("a"), Path("b")])


def test_writers_of_one_folder_never_share_a_temp_file(tmp_path):
    examples = [{"prompt": str(i), "completion": "x" * 50} for i in range(2000)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: quality.task.write_jsonl(tmp_path / "train.jsonl", examples), range(16)))
    assert quality.task.read_jsonl(tmp_path / "train.jsonl") == examples
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temp file left
