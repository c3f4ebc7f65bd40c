"""User-facing errors: one line that says what went wrong, where, and how to fix it."""


class FiseclipError(Exception):
    """An error caused by input or environment, reported to the user as one line (no traceback)."""


class WeightsUnavailableError(FiseclipError):
    """Pretrained weights are neither cached nor downloadable from here."""


class DatasetError(FiseclipError):
    """A dataset folder does not have the expected layout or content."""
