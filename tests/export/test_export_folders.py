"""The export folder: a user's folder is never written over, a re-export keeps the formats it does not
write, a killed export's temporary folders are cleaned up, modes follow the umask, every OS error is
one line. Through the CLI (`main` in-process, a subprocess for SIGTERM), on a tiny model, --format hf
where the case allows (a tiny export takes a second or two)."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import export_a_different_model, leftovers, make_model_dir, train_adapter

from lorasp_edge.cli import main
from lorasp_edge.export import output
from lorasp_edge.files import OWNER_MARKER


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """root/base and root/run/adapter, laid out as `train --model ./base --out run` run in root writes them."""
    root = tmp_path_factory.mktemp("folders")
    base = make_model_dir(root / "base")
    return base, train_adapter(base, root / "run" / "adapter")


def export_cli(capsys, adapter, out, *flags):
    """(exit code, stdout, stderr) of `lorasp-edge export` run in-process."""
    code = main(["export", "--adapter", str(adapter), "--out", str(out), *(flags or ("--format", "hf"))])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line(err: str, *words: str) -> str:
    """The error is one line, the last on stderr (progress lines come before it), with no traceback."""
    lines = err.splitlines()
    assert "Traceback" not in err and lines[-1].startswith("lorasp-edge export: error: "), err
    assert sum(line.startswith("lorasp-edge") for line in lines) == 1, err
    for word in words:
        assert word in lines[-1], err
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def hf_export(run, tmp_path_factory):
    """An export folder holding hf/, written once; tests copy it."""
    from lorasp_edge.export.run import ExportSettings, export

    out = tmp_path_factory.mktemp("hf-export") / "out"
    export(ExportSettings(adapter=run[1], out=out, format="hf", eval_tokens=64))
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "out", symlinks=True))


# ------------------------------------------------------------------------------- ownership


def test_a_user_folder_is_refused_and_left_unchanged(run, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("my notes")
    code, _, err = export_cli(capsys, run[1], out)
    assert code == 2
    assert_one_line(err, f"--out {out}: not empty and was not written by lorasp-edge export", "--overwrite")
    assert snapshot(out) == {"adapter/mine.txt": b"my notes"} and not leftovers(tmp_path)


def test_overwrite_replaces_a_user_folder(run, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "mine.txt").write_text("my notes")
    code, printed, _ = export_cli(capsys, run[1], out, "--format", "hf", "--overwrite")
    assert code == 0 and "removed (--overwrite): adapter" in printed
    assert sorted(path.name for path in out.iterdir()) == [OWNER_MARKER, "hf", "manifest.json"]
    assert output.is_export(out) and not leftovers(tmp_path)


def test_out_that_is_a_file_or_below_one(run, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"weights")
    code, _, err = export_cli(capsys, run[1], target)
    assert code == 2 and assert_one_line(err, f"--out {target}: is a file, not a folder")
    code, _, err = export_cli(capsys, run[1], target / "out")
    assert code == 2 and assert_one_line(err, f"{target} is a file, not a folder")
    assert target.read_bytes() == b"weights" and not leftovers(tmp_path)


def test_out_holding_the_adapter_is_refused_even_with_overwrite(run, tmp_path, capsys):
    code, _, err = export_cli(capsys, run[1], run[1].parent, "--format", "hf", "--overwrite")
    assert code == 2 and assert_one_line(err, "holds the adapter folder")
    assert (run[1] / "lorasp.json").is_file()


# ------------------------------------------------------------------------------- re-export


def test_reexport_of_onnx_keeps_hf_and_its_records(run, hf_export, tmp_path, capsys):
    out = copy_of(hf_export, tmp_path)
    hf_files, before = snapshot(out / "hf"), json.loads((out / "manifest.json").read_text())
    code, printed, _ = export_cli(capsys, run[1], out, "--format", "onnx")
    assert code == 0 and "kept from the earlier export: hf" in printed and "replaced:" not in printed
    assert snapshot(out / "hf") == hf_files and (out / "onnx" / "model.onnx").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["hf"] == before["files"]["hf"] and manifest["verification"]["hf_reload"] == before["verification"]["hf_reload"]
    assert "onnx" in manifest["verification"] and "onnx" in manifest["perplexity"]
    assert manifest["formats"]["hf"] == before["formats"]["hf"] and set(manifest["formats"]) == {"hf", "onnx"}
    # hf again: replaced, onnx kept
    code, printed, _ = export_cli(capsys, run[1], out)
    assert code == 0 and "replaced: hf" in printed and "kept from the earlier export: onnx" in printed
    assert set(json.loads((out / "manifest.json").read_text())["formats"]) == {"hf", "onnx"} and not leftovers(tmp_path)


def test_an_export_from_before_the_marker_is_ours(run, hf_export, tmp_path, capsys):
    out = copy_of(hf_export, tmp_path)
    (out / OWNER_MARKER).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["formats"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "gguf").mkdir()  # an earlier format this export does not write
    (out / "gguf" / "model-f16.gguf").write_bytes(b"GGUF")
    code, printed, _ = export_cli(capsys, run[1], out)
    assert code == 0 and "replaced: hf" in printed and "kept from the earlier export: gguf" in printed
    assert (out / "gguf" / "model-f16.gguf").read_bytes() == b"GGUF" and (out / OWNER_MARKER).is_file()


def test_failed_reexport_exits_4_and_keeps_the_earlier_export(run, hf_export, tmp_path, monkeypatch, capsys):
    out = copy_of(hf_export, tmp_path)
    before = snapshot(out)
    export_a_different_model(monkeypatch)
    code, _, err = export_cli(capsys, run[1], out, "--format", "onnx")
    assert code == 4 and "ONNX logits differ from PyTorch" in err.splitlines()[-1]
    assert snapshot(out) == before and not leftovers(tmp_path)


# --------------------------------------------------------------------- killed exports


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_exports_temporary_folders_are_removed(run, hf_export, tmp_path, capsys):
    out = copy_of(hf_export, tmp_path)
    stale = tmp_path / ".out-dead1234"  # a kill -9 mid-export: marker, pid file of a process that ended, part of hf/
    (stale / "hf").mkdir(parents=True)
    (stale / "hf" / "model.safetensors").write_bytes(b"half")
    (stale / OWNER_MARKER).write_text('{"written_by": "lorasp-edge export"}\n')
    (stale / output.PID_FILE).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    running = tmp_path / ".out-live5678"  # another export into the same --out, still running: left alone
    running.mkdir()
    (running / output.PID_FILE).write_text(f"{os.getppid()} {socket.gethostname()}\n")
    theirs = tmp_path / ".out-notours1"  # a name like ours holding someone else's files: left alone
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for name, age in ((".out-oldver01", 2 * 3600), (".out-oldver02", 60)):  # a lorasp-edge from before pid files
        (tmp_path / name / "onnx").mkdir(parents=True)
        os.utime(tmp_path / name, (time.time() - age, time.time() - age))  # the younger one may still be writing
    code, _, _ = export_cli(capsys, run[1], out)
    assert code == 0 and leftovers(tmp_path) == [".out-live5678", ".out-notours1", ".out-oldver02"]


def test_a_kill_between_the_two_renames_is_undone(run, hf_export, tmp_path, capsys):
    out = copy_of(hf_export, tmp_path)
    (out / "gguf").mkdir()
    (out / "gguf" / "model-f16.gguf").write_bytes(b"GGUF")
    out.rename(tmp_path / ".out.old")  # replace_dir moved the old export aside, then the process died
    code, printed, _ = export_cli(capsys, run[1], out)
    assert code == 0 and "kept from the earlier export: gguf" in printed
    assert (out / "gguf" / "model-f16.gguf").read_bytes() == b"GGUF" and not leftovers(tmp_path)


def test_sigterm_during_export_removes_the_temporary_folder(run, hf_export, tmp_path):
    out = copy_of(hf_export, tmp_path)
    before = snapshot(out)
    command = [sys.executable, "-m", "lorasp_edge", "export", "--adapter", str(run[1]), "--out", str(out), "--format", "onnx"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any((folder / output.PID_FILE).is_file() for folder in tmp_path.glob(".out-*")) and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("lorasp-edge export: stopped by SIGTERM")
    assert snapshot(out) == before and not leftovers(tmp_path)


# ------------------------------------------------------------------------ modes and errors


def test_exported_files_follow_the_umask(run, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, _ = export_cli(capsys, run[1], tmp_path / "out")
    finally:
        os.umask(old)
    assert code == 0
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.parametrize(
    ("where", "code", "words"),
    [
        ("replace_dir", errno.ENOSPC, "no space left on the device: free some space"),
        ("make_temp_dir", errno.EROFS, "the file system is read-only: choose a writable folder"),
        ("make_temp_dir", errno.EACCES, "permission denied"),
    ],
)
def test_an_os_error_is_one_line_and_leaves_the_earlier_export(run, hf_export, tmp_path, monkeypatch, capsys, where, code, words):
    # Tests run as root, where a 0o555 folder does not stop writes: the error is raised in-process instead.
    out = copy_of(hf_export, tmp_path)
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path))

    monkeypatch.setattr(output, where, fail)
    exit_code, _, err = export_cli(capsys, run[1], out)
    assert exit_code == 2
    assert_one_line(err, f"writing the export to {tmp_path}: {words}", "nothing was left half-written")
    assert snapshot(out) == before and not leftovers(tmp_path)


def test_an_os_error_inside_the_temporary_folder_names_out(run, tmp_path, monkeypatch, capsys):
    import lorasp_edge.export.hf as hf

    def full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "config.json"))

    monkeypatch.setattr(hf, "write_portable_config", full)
    monkeypatch.setattr("lorasp_edge.export.sources.streamed.write_portable_config", full)
    exit_code, _, err = export_cli(capsys, run[1], tmp_path / "out")
    assert exit_code == 2 and assert_one_line(err, f"writing the export to {tmp_path / 'out'}: no space left")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------- base path


def relative_adapter(run, tmp_path) -> Path:
    """A copy of the run whose lorasp.json names the base as `train --model ./base` run in its root did."""
    import shutil

    root = tmp_path / "project"
    shutil.copytree(run[0], root / "base")
    adapter = Path(shutil.copytree(run[1], root / "run" / "adapter"))
    info = json.loads((adapter / "lorasp.json").read_text())
    (adapter / "lorasp.json").write_text(json.dumps({**info, "base_model": "./base"}))
    return adapter


def test_a_relative_base_path_is_found_from_another_folder(run, tmp_path, monkeypatch, capsys):
    adapter = relative_adapter(run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = export_cli(capsys, adapter, "out")
    assert code == 0, err
    manifest = json.loads((elsewhere / "out" / "manifest.json").read_text())
    assert manifest["base_model"] == str(adapter.resolve().parent.parent / "base")


def test_a_relative_base_path_not_found_asks_for_model(run, tmp_path, monkeypatch, capsys):
    import shutil

    adapter = relative_adapter(run, tmp_path)
    shutil.rmtree(adapter.parent.parent / "base")
    monkeypatch.chdir(tmp_path)
    code, _, err = export_cli(capsys, adapter, "out")
    assert code == 2 and assert_one_line(err, "names the base model as the relative path './base'", "pass --model")
    assert not (tmp_path / "out").exists()
