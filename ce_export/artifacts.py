"""Artifacts on disk: folders that appear complete or not at all, single files written atomically,
and the operating system's failures (full disk, I/O errors, signals, concurrent writers) turned
into one line with nothing left behind.

An output folder OUT is written as a sibling `.OUT.partial-PID-XXXX` and renamed into place. While
that happens, `.OUT.lock` (an flock'ed file holding the writer's PID) keeps a second process from
writing OUT; the kernel releases the lock when its holder dies, however it dies, so the next writer
knows that any staging folder it finds for OUT was left by a dead process and removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from ce_export.errors import OutputError

MANIFEST = "manifest.json"
PARITY = "parity.json"
PARITY_PLOT = "parity.png"

# Failures of the machine rather than of ce_export: reported as one line naming the path.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.ENAMETOOLONG})
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an I/O failure


def environment_errno(error: BaseException) -> int | None:
    """The errno behind `error` when it is one of ENVIRONMENT_ERRNOS: the error itself, its cause
    or context (libraries wrap), or a Rust library's "(os error N)"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = error.errno if isinstance(error, OSError) else None
        if code is None and type(error).__name__ == "SafetensorError":
            match = RUST_OS_ERROR.search(str(error))
            code = int(match.group(1)) if match else None
        if code in ENVIRONMENT_ERRNOS:
            return code
        error = error.__cause__ or error.__context__
    return None


def describe_environment_error(code: int, path: Path, needed_bytes: int | None = None) -> str:
    details = []
    if code in SPACE_ERRNOS and needed_bytes:
        details.append(f"this needs about {human_bytes(needed_bytes)}")
    if code in (errno.ENOSPC, errno.EDQUOT) and (free := free_bytes(path)) is not None:
        details.append(f"{human_bytes(free)} free there")
    return f"{path}: {os.strerror(code)}" + (f" ({'; '.join(details)})" if details else "")


def free_bytes(path: Path) -> int | None:
    for candidate in [path, *path.parents]:
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def human_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


@contextlib.contextmanager
def environment_errors(path: str | Path, shown_as: Callable[[Path], Path] | None = None):
    """Turn an operating-system failure (full disk, I/O error, read-only, no permission) raised in
    the block into an OutputError naming the file it concerns (the error's own, else the one a
    `writing` block named, else `path`), with the bytes needed when known and what is free. Other
    errors pass unchanged."""
    try:
        yield
    except OutputError:
        raise
    except Exception as error:
        code = environment_errno(error)
        if code is None:
            raise
        concerned = Path(getattr(error, "filename", None) or getattr(error, "ce_export_path", None) or path)
        raise OutputError(describe_environment_error(code, shown_as(concerned) if shown_as else concerned,
                                                     getattr(error, "ce_export_bytes", None))) from None


@contextlib.contextmanager
def writing(path: Path, needed_bytes: int | None = None):
    """Mark the block as writing `path` (about `needed_bytes`): an operating-system failure in it
    then names that file and size (write() failures carry no file name of their own)."""
    try:
        yield
    except Exception as error:
        if environment_errno(error) is not None and not hasattr(error, "ce_export_path"):
            with contextlib.suppress(AttributeError, TypeError):
                error.ce_export_path, error.ce_export_bytes = path, needed_bytes
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary name next to `path`; when the block succeeds it replaces `path` in one
    rename, otherwise it is removed. Readers never see half a file, a failure leaves nothing."""
    path = Path(path)
    # Not mkstemp: the writer creates the file, with the permissions the umask gives (mkstemp's are 0600).
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    with environment_errors(path):
        try:
            yield partial
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def write_json(path: str | Path, data) -> None:
    """Write JSON next to its final name, then rename, so readers never see half a file."""
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as partial:
        partial.write_text(text)


def read_json(path: str | Path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"{path}: missing {what}")
    try:
        with environment_errors(path):
            return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise OutputError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise OutputError(f"{path}: not valid JSON (nested too deeply)") from None


# --- output folders ---------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(out: str | Path, force: bool = False, report: Callable[[str], None] | None = print):
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On any error, or SIGINT / SIGTERM (cli.py turns SIGTERM into an exception), the temporary folder
    is removed and `out` is left as it was; an operating-system failure is reported as one line.
    While the block runs, `out` is locked against other ce_export processes; staging folders that
    dead processes left for `out` are removed first (and `report` says so).
    """
    out = Path(out).absolute()
    with output_lock(out) as previous_owner:
        if out.exists() and not out.is_dir():
            raise OutputError(f"{out}: exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise OutputError(f"{out}: folder is not empty (use --force to replace it)")
        remove_stale_staging(out, previous_owner, report)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
        except OSError as error:
            raise OutputError(f"{out}: cannot write here ({error.strerror or error})") from None

        def as_output(path: Path) -> Path:  # the staging folder is gone by the time anyone reads the message
            return out / path.relative_to(staging) if path.is_relative_to(staging) else path

        try:
            with environment_errors(out, shown_as=as_output):
                yield staging
                replaced = None
                if out.exists():
                    replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
                    os.replace(out, replaced)
                os.replace(staging, out)
                if replaced is not None:
                    shutil.rmtree(replaced, ignore_errors=True)
        except BaseException:
            with signals_held():
                shutil.rmtree(staging, ignore_errors=True)
            raise


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive flock on `.OUT.lock` (containing our PID) for the block; yields the PID the
    file held before (a writer that died without cleaning up), or None. Another live holder: one line."""
    import fcntl

    path = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{out}: cannot write here ({error.strerror or error})") from None
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"{out}: cannot write here ({error.strerror or error})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{out}: another ce_export process (PID {owner}) is writing it; wait for it to finish "
                              f"or choose another output") from None
        try:  # the holder we waited for may have removed the file: then lock the new one instead
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputError(f"{path}: could not be locked (it keeps being replaced)")
    try:
        previous = os.read(fd, 64).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield int(previous) if previous.isdigit() else None
    finally:
        with signals_held():
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)


# What staged_folder leaves beside OUT while it runs: .OUT.partial-PID-XXXXXXXX (and, from before
# PIDs were in the name, .OUT.partial-XXXXXXXX), and .OUT.replaced-PID during the final swap.
STAGING_SUFFIX = re.compile(r"partial-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}|replaced-(?P<replaced_pid>\d+)")


def remove_stale_staging(out: Path, previous_owner: int | None, report: Callable[[str], None] | None) -> None:
    """Remove what dead writers of `out` left beside it. Called with the lock held, so no live
    ce_export process is writing `out`; a folder named with a PID that is still alive is kept anyway."""
    prefix = f".{out.name}."
    for path in sorted(out.parent.iterdir()):
        match = STAGING_SUFFIX.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
        if match is None or not path.is_dir():
            continue
        pid = match.group("pid") or match.group("replaced_pid")
        pid = int(pid) if pid else previous_owner
        if pid is not None and pid != os.getpid() and process_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if report is not None:
            owner = f"process {pid}" if pid is not None else "an earlier run"
            report(f"removed {path}: a staging folder left by {owner}, which is no longer running")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def signals_held():
    """Ignore SIGINT / SIGTERM for the block (cleanup that a second Ctrl-C must not cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- build folders ------------------------------------------------------------------------------


def file_record(path: Path) -> dict:
    """Size and SHA-256 of a file, as manifest.json records the files verify and bench read."""
    digest = hashlib.sha256()
    with environment_errors(path), open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
