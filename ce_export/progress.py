"""Progress bars for long stages (tqdm): on a terminal only, so logs and captured output stay clean."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(disable: bool | None = None, **options) -> tqdm:
    """A tqdm bar on stderr with an estimate of the time left; disabled when stderr is not a terminal
    (or when `disable` is True)."""
    return tqdm(file=sys.stderr, disable=disable or not sys.stderr.isatty(), dynamic_ncols=True, mininterval=0.5,
                leave=False, **options)
