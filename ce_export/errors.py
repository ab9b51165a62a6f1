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
