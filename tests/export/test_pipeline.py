"""Export as one pipeline: the source chosen by the memory estimate, a format added as one module and
one registry line, formats required by others written and removed, every format from either source."""

from __future__ import annotations

import json
import textwrap

import gguf
import numpy as np
import pytest
from tiny import leftovers, make_model_dir, train_adapter

from lorasp_edge.cli import main
from lorasp_edge.errors import UserError
from lorasp_edge.export import formats
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.export.sources import pick


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base = make_model_dir(root / "base", "llama")
    return base, train_adapter(base, root / "adapter", steps=2)


@pytest.mark.parametrize(("forced", "in_memory", "streamed", "budget", "expected"), [
    ("auto", 3, 2, 8, "in-memory"),  # fits in memory: the fast source
    ("auto", 9, 2, 8, "streamed"),  # does not: streamed, which does
    ("auto", 9, None, 8, "in-memory"),  # cannot stream: in memory, and the budget check refuses it
    ("memory", 9, 2, 8, "in-memory"),
    ("streamed", 3, 2, 8, "streamed"),
])
def test_the_source_is_chosen_by_the_estimate_against_the_budget(forced, in_memory, streamed, budget, expected):
    assert pick(forced, in_memory, streamed, budget) == expected


def test_a_format_is_one_module_and_one_registry_line(tiny, tmp_path, monkeypatch):
    """A dummy format: its writer, flag check, disk estimate and verification in one module."""
    (tmp_path / "dummy_format.py").write_text(textwrap.dedent('''
        from lorasp_edge.errors import VerificationError
        from lorasp_edge.export.formats.entry import ExportFormat

        def write(context):
            folder = context.folder / "dummy"
            folder.mkdir()
            keys = context.weights.keys()
            (folder / "keys.txt").write_text("\\n".join(keys))
            total = float(sum(context.weights.read(key).double().sum() for key in keys))
            if not keys:
                raise VerificationError("no weights; nothing was written")
            context.manifest["files"]["dummy"] = (folder / "keys.txt").stat().st_size
            context.manifest["verification"]["dummy"] = {"tensors": len(keys), "sum": total, "merged": context.is_merged}

        def flag_problems(settings):
            return [] if settings.tolerance < 1 else ["--tolerance: the dummy format wants < 1"]

        FORMAT = ExportFormat("dummy", "weight names", "dummy_format:write", disk_bytes=lambda parameters, settings: 1 << 10,
                              streams=True, flag_problems=flag_problems)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import dummy_format

    monkeypatch.setitem(formats.FORMATS, "dummy", dummy_format.FORMAT)  # the registry line
    sums = {}
    for source in ("memory", "streamed"):
        report = export(ExportSettings(adapter=tiny[1], out=tmp_path / source, format="dummy", source=source, eval_tokens=64))
        record = report.manifest["verification"]["dummy"]
        assert record["tensors"] > 10 and record["merged"] and report.manifest["source"] == ("in-memory" if source == "memory" else "streamed")
        assert sorted(p.name for p in report.out.iterdir()) == [".lorasp-edge", "dummy", "manifest.json"]  # no hf/ left by the streamed merge
        sums[source] = record["sum"]
    assert sums["memory"] == pytest.approx(sums["streamed"], rel=1e-6)  # the same merged weights from either source
    with pytest.raises(UserError, match="the dummy format wants < 1"):
        export(ExportSettings(adapter=tiny[1], out=tmp_path / "bad", format="dummy", tolerance=2.0))


def test_a_required_format_is_written_first_and_removed_when_not_asked(tiny, tmp_path):
    pytest.importorskip("onnxruntime_genai")
    assert [item.name for item in formats.in_order(["genai"])] == ["onnx", "genai"]
    report = export(ExportSettings(adapter=tiny[1], out=tmp_path / "out", format="genai", source="streamed", eval_tokens=64, min_agreement=0))
    assert sorted(p.name for p in report.out.iterdir()) == [".lorasp-edge", "genai", "manifest.json"]
    manifest = json.loads((report.out / "manifest.json").read_text())
    assert "onnx" not in manifest["files"] and "onnx" not in manifest["verification"] and list(manifest["formats"]) == ["genai"]
    assert manifest["verification"]["genai"]["greedy_equal"] and manifest["streamed"] is True
    assert not leftovers(tmp_path)


def test_gguf_from_a_streamed_source_equals_gguf_from_memory(tiny, tmp_path):
    tensors = {}
    for source in ("memory", "streamed"):
        report = export(ExportSettings(adapter=tiny[1], out=tmp_path / source, format="gguf", source=source, eval_tokens=64))
        assert report.manifest["source"] == ("in-memory" if source == "memory" else "streamed")
        reader = gguf.GGUFReader(report.out / "gguf" / "model-f16.gguf")
        tensors[source] = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    assert tensors["memory"].keys() == tensors["streamed"].keys()
    for name, data in tensors["memory"].items():
        assert np.array_equal(data, tensors["streamed"][name]), name


def test_the_streamed_reference_generates_what_the_model_in_memory_does(tiny, tmp_path):
    """GGUF and genai checks run a greedy continuation through the reference's KV cache."""
    from transformers import AutoConfig

    from lorasp_edge.export import agreement
    from lorasp_edge.export.sources.layered import LayerStreamed
    from lorasp_edge.export.sources.weights import FolderWeights
    from lorasp_edge.models import load_model

    base = tiny[0]
    model = load_model(str(base), device="cpu").eval()
    streamed = LayerStreamed(AutoConfig.from_pretrained(base), FolderWeights(base))
    prompt = [3, 17, 42, 5, 9]
    assert agreement.greedy_continuation(streamed, prompt, 12) == agreement.greedy_continuation(model, prompt, 12)


def test_a_source_that_cannot_be_had_and_a_flag_without_its_format_are_one_line(tiny, tmp_path, capsys):
    gpt2 = make_model_dir(tmp_path / "gpt2", "gpt2")
    adapter = train_adapter(gpt2, tmp_path / "gpt2-adapter", steps=1)
    code = main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "o1"), "--format", "hf", "--source", "streamed"])
    error = capsys.readouterr().err.strip().splitlines()[-1]  # transformers warns of the tiny GPT-2's token ids before it
    assert code == 2 and "--source streamed: this model family's linear weights are not streamed" in error
    code = main(["export", "--adapter", str(tiny[1]), "--out", str(tmp_path / "o2"), "--format", "hf", "--gguf-type", "q8_0"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "--gguf-type is for --format gguf" in error
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert "Traceback" not in error
