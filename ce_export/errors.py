"""User-facing errors. The CLI turns each into exit code 2 and one line; anything else is a bug."""


class CeExportError(Exception):
    """A problem with the user's input or environment, reported as one line."""

    exit_code = 2


class LoadError(CeExportError):
    """The checkpoint cannot be read or is inconsistent."""


class ExportError(CeExportError):
    """The model could not be exported."""


class OutputError(CeExportError):
    """The output location cannot be used."""


class VerifyError(CeExportError):
    """An artifact does not match PyTorch within its thresholds."""


class BuildError(CeExportError):
    """An engine could not be built."""


class RuntimeInputError(CeExportError, ValueError):
    """An input a runtime cannot take: beyond what it was built for (batch, sequence, context
    length) or malformed (shape, dtype, token ids outside the vocabulary)."""


def one_line(text: str, limit: int | None = None) -> str:
    """`text` on one line: line breaks become spaces, other characters that are not printable
    (controls, Unicode line separators) escapes; a library's message may quote a file's bytes.
    Cut to `limit` characters."""
    text = " ".join(text.replace("\r", "\n").split("\n")).strip()
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if limit is None or len(text) <= limit else text[: limit - 4] + " ..."
