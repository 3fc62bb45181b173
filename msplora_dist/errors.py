"""User-facing errors. Entry points catch UserError and print its one-line message (no traceback):
the message names the offending value and what was expected. RunStopped is the other kind an entry point reports
in one line: the run ended itself after keeping what it could, and exit_code says why."""


class UserError(ValueError):
    """Bad input from the user: a config, a path, a data row, a checkpoint. Its text is one line whatever it quotes
    (a library's multi-line message is joined), so an entry point always prints exactly one."""

    def __str__(self) -> str:
        return " ".join(part.strip() for part in super().__str__().splitlines() if part.strip())


class ConfigError(UserError):
    """A configuration value is invalid or contradicts another."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, or belongs to another model or adapter layout."""


class DataError(UserError):
    """A data file or row is malformed."""


class RowError(DataError):
    """One data row is malformed; the message says what, and the caller, which knows the file, says where (the row's
    line in it: data.tokenize_rows)."""


class RunStopped(RuntimeError):
    """A run stopped before its end; the message says where its last complete state is. exit_code: what an entry
    point exits with (3 here; subclasses differ)."""

    exit_code = 3


class WriteFailed(RunStopped):
    """Writing a checkpoint or the adapter failed (a full disk, an I/O error): the partial folder is removed and the
    previous checkpoint stays the latest."""

    exit_code = 4
