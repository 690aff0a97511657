"""User-facing errors.

Every error a user can cause derives from `LitHeadsError`. The CLI prints its message as one paragraph
and exits with status 2 instead of a traceback, so each message must name what is wrong and what
would be right.
"""


class LitHeadsError(Exception):
    """A problem with the user's input, config, data or environment (not a bug in lit_heads)."""


class DataError(LitHeadsError, ValueError):
    """Bad or missing data: files, record formats, empty sets, truncation."""


class ModelError(LitHeadsError, ValueError):
    """A model name, path, checkpoint or architecture that cannot be used."""


class ConfigError(LitHeadsError, ValueError):
    """Inconsistent or out-of-range options."""
