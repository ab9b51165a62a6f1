"""Artifacts on disk: folders that appear complete or not at all, and JSON files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ce_export.errors import OutputError

MANIFEST = "manifest.json"
PARITY = "parity.json"
PARITY_PLOT = "parity.png"


@contextlib.contextmanager
def staged_folder(out: str | Path, force: bool = False):
    """Yield a temporary sibling of `out`; on success it replaces `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"{out}: folder is not empty (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as error:
        raise OutputError(f"{out}: cannot write here ({error.strerror or error})") from None
    try:
        yield staging
        replaced = None
        if out.exists():
            replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
            os.replace(out, replaced)
        os.replace(staging, out)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_json(path: str | Path, data) -> None:
    """Write JSON next to its final name, then rename, so readers never see half a file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)


def read_json(path: str | Path, what: str = "file"):
    path = Path(path)
    if not path.is_file():
        raise OutputError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise OutputError(f"{path}: not valid JSON ({error})") from None


def checkpoint_of(folder: str | Path, manifest: dict) -> Path:
    """The checkpoint a build folder was made from (the demo's copy lives inside the folder)."""
    source = manifest["source"]
    return Path(folder) / source["path"] if source["kind"] == "demo" else Path(source["path"])
