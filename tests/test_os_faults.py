"""Operating-system faults while building: a full disk or an I/O error while writing, SIGINT,
SIGTERM, SIGKILL, and two builds into the same folder. Each ends in exit 2 (or the signal's exit)
with one line naming the path, and leaves nothing behind but, at most, the complete first output."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ce_export.cli import main
from ce_export.manifest import Parity, read_manifest
from checkpoints import TINY_LIMITS, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ce_export: error: "), (code, err)
    return err[0]


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


# --- a full disk, an I/O error --------------------------------------------------------------------


def test_full_disk_during_export_names_the_file_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """onnx_ir's writer fails half-way through model.onnx, as write() does: no file name in the error
    (this was a traceback from onnx's writer)."""
    import onnx_ir

    def failing_save(model, path, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_ir, "save", failing_save)
    out = tmp_path / "out"
    line = one_line_error(capsys, main(["build", str(tiny), "--out", str(out), "--no-verify", *TINY_LIMITS]))
    assert f"{out / 'model.onnx'}: No space left on device (this needs about " in line and "free there)" in line
    assert leftovers(tmp_path) == []


def test_io_error_while_writing_a_checkpoint_names_the_file_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """EIO from safetensors' writer (the demo checkpoint, in its staging folder)."""
    import ce_export.demo

    def failing_save(tensors, path, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ce_export.demo, "save_file", failing_save)
    line = one_line_error(capsys, main(["demo", str(tmp_path / "out")]))
    assert line == f"ce_export: error: {tmp_path / 'out' / 'model.safetensors'}: Input/output error"
    assert leftovers(tmp_path) == []


def test_write_failure_of_verify_outputs_leaves_the_build_folder_as_it_was(demo_build, tmp_path, capsys, monkeypatch):
    """parity.png fails half-way; the parity run itself is replayed from the folder's parity.json."""
    import json

    import matplotlib.figure

    from ce_export import pipeline

    folder = tmp_path / "build"
    shutil.copytree(demo_build, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    monkeypatch.setattr(pipeline, "run_parity",
                        lambda *args, **kwargs: Parity.model_validate(json.loads(before["parity.json"])))

    def failing_savefig(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    line = one_line_error(capsys, main(["verify", str(folder)]))
    assert f"{folder / 'parity.png'}: No space left on device" in line
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert after.keys() == before.keys() and after["parity.png"] == before["parity.png"]


# Runs a command with files limited to 1 MB; SIGXFSZ ignored, so write() fails with EFBIG instead
# of the process being killed (both survive exec; no preexec_fn, which is unsafe with threads).
LIMITED_FILE_SIZE = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                     "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY)); "
                     "os.execv(sys.argv[1], sys.argv[1:])")


def test_a_real_write_failure_from_the_kernel(tmp_path):
    """No monkeypatching: the kernel refuses a write past RLIMIT_FSIZE (EFBIG) inside safetensors'
    Rust writer, in a child process."""
    result = subprocess.run([sys.executable, "-c", LIMITED_FILE_SIZE, sys.executable, "-m", "ce_export", "demo",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"ce_export: error: {tmp_path / 'out' / 'model.safetensors'}: File too large (this needs about 4.8 MB)"]
    assert leftovers(tmp_path) == []


def test_a_real_full_disk_on_a_small_tmpfs(tmp_path):
    """A 2 MB tmpfs in a private mount namespace (unprivileged through a user namespace where the
    kernel allows it): the demo's 4.8 MB of weights hit a real ENOSPC."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare (util-linux) is not installed")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=2m tmpfs {disk} || exit 77; {sys.executable} -m ce_export demo {disk}/out; "
              f"rc=$?; echo left: $(ls -A {disk}); exit $rc")
    for flags in (["--user", "--map-root-user", "--mount"], ["--mount"]):
        result = subprocess.run([unshare, *flags, "sh", "-c", script], capture_output=True, text=True, timeout=300)
        if result.returncode not in (1, 77) or "ce_export" in result.stderr:
            break
    else:
        pytest.skip(f"cannot mount a tmpfs here (no user or mount namespaces): {result.stderr.strip()[:200]}")
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"ce_export: error: {disk / 'out' / 'model.safetensors'}: No space left on device "
                           f"(this needs about 4.8 MB; "), line
    assert result.stdout.strip().splitlines()[-1] == "left:"


# --- signals and concurrent builds ------------------------------------------------------------------


def start_build(checkpoint: Path, out: Path) -> subprocess.Popen:
    # A child inherits an ignored SIGINT (POSIX), and Python then never raises KeyboardInterrupt: start
    # it with the default handler whatever an earlier test or the runner left in this process.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "ce_export", "build", str(checkpoint), "--out", str(out),
                                 "--no-verify", *TINY_LIMITS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def staging_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".out.partial-")]


def test_signals_clean_up_and_the_next_build_removes_what_sigkill_left(tiny, tmp_path, capsys):
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        # One at a time: each is signalled as soon as its staging folder exists. (Started together,
        # a later one could finish before its turn on a busy machine, and prove nothing.)
        parent = tmp_path / sig.name
        parent.mkdir()
        process = start_build(tiny, parent / "out")
        wait_for(lambda: staging_folders(parent) or process.poll() is not None, f"{sig.name} build's staging folder")
        assert process.poll() is None, f"the {sig.name} build ended before it could be signalled"
        process.send_signal(sig)
        runs[sig] = (parent, process)
    for sig, (parent, process) in runs.items():
        _, stderr = process.communicate(timeout=120)
        if sig == signal.SIGKILL:
            assert process.returncode == -signal.SIGKILL
            continue
        # SIGINT: CPython may end a process whose KeyboardInterrupt passed through a C extension's
        # PyRun_* call by re-raising SIGINT at exit, even after main() caught it and returned 130;
        # shells report both as 130.
        expected = {128 + sig, -signal.SIGINT} if sig == signal.SIGINT else {128 + sig}
        assert process.returncode in expected, (process.returncode, stderr)
        assert stderr.strip().splitlines()[-1] == f"ce_export: {'interrupted' if sig == signal.SIGINT else 'terminated'}"
        assert leftovers(parent) == [], f"{sig.name} left {leftovers(parent)}"

    # SIGKILL: no handler ran, so the staging folder and the lock file (with the dead PID) remain.
    parent, killed = runs[signal.SIGKILL]
    stale = staging_folders(parent)
    assert len(stale) == 1 and (parent / ".out.lock").read_text().strip() == str(killed.pid)

    # The next build removes it and says so; while it runs, a second build into the same folder is
    # refused with one line and touches nothing.
    first = start_build(tiny, parent / "out")
    wait_for(lambda: (parent / ".out.lock").is_file() and (parent / ".out.lock").read_text().strip() == str(first.pid),
             "the next build to hold the lock")
    out = parent / "out"
    line = one_line_error(capsys, main(["build", str(tiny), "--out", str(out), "--no-verify", *TINY_LIMITS]))
    assert line == (f"ce_export: error: {out}: another ce_export process (PID {first.pid}) is writing it; "
                    f"wait for it to finish or choose another output")
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"removed {stale[0]}: a staging folder left by process {killed.pid}, which is no longer running" in stdout
    assert leftovers(parent) == ["out"]
    manifest = read_manifest(out)  # complete: every recorded file present, sizes and SHA-256 as written
    assert manifest.onnx.files["model.onnx"].bytes == (out / "model.onnx").stat().st_size
