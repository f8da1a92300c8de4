"""tools/bench_formats.py's report: the speed ratios the targets name and each format's read-bound ceiling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"
_SPEC = importlib.util.spec_from_file_location("bench_formats", TOOLS / "bench_formats.py")
formats = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(formats)

ROWS = [
    ("pytorch", "PyTorch fp32 (reference)", "-", "-", 540e6, 14.269, 1.0),
    ("onnx", "ONNX fp32 (onnxruntime)", 40.0, 0.6, 500e6, 14.269, 1.0),
    ("gguf-f16", "GGUF f16 (llama.cpp)", 50.0, 1.1, 250e6, 14.270, 1.0),
]


def test_ratios_and_ceilings():
    text = formats.table(ROWS, "header", 512, bandwidth=20e9)
    lines = text.splitlines()
    assert lines[2].endswith("| read-bound ceiling, tokens/s |")
    assert lines[4].endswith("| 14.269 | 100.0% | - |")  # no ceiling for the PyTorch reference
    assert lines[5] == "| ONNX fp32 (onnxruntime) | 40.0 | 600 | 500.0 | 14.269 | 100.0% | 40.0 |"  # 20 GB/s over 500 MB
    assert lines[6].endswith("| 80.0 |")
    assert "onnx / gguf-f16: 0.80x" in text and "Memory read bandwidth in this run: 20.0 GB/s" in text


def test_without_a_bandwidth_the_table_has_no_ceiling_column():
    text = formats.table(ROWS, "header", 512)
    assert "ceiling" not in text and text.splitlines()[5].endswith("| 100.0% |")


def test_read_bandwidth_is_a_rate():
    rate = formats.read_bandwidth(1, gigabytes=0.05, repeats=3)
    assert 1e8 < rate < 1e12  # bytes per second: between 0.1 GB/s and 1 TB/s on any machine that runs this
