"""User-facing errors. Entry points catch UserError and print its one-line message (no traceback):
the message names the offending value and what was expected."""


class UserError(ValueError):
    """Bad input from the user: a config, a path, a data row, a checkpoint."""


class ConfigError(UserError):
    """A configuration value is invalid or contradicts another."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or belongs to another model or adapter layout."""


class DataError(UserError):
    """A data file or row is malformed."""
