"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, a bad config value) is raised
as a :class:`UserError`. The CLI prints its message as one line on stderr and exits
with code 2; no traceback is shown.
"""


class UserError(Exception):
    """An error caused by the user's input; the message is shown as one line."""

    exit_code: int = 2

    def __str__(self) -> str:  # keep the message on one line whatever was passed
        return " ".join(str(a) for a in self.args).replace("\n", " ")


class ConfigError(UserError):
    """A config file or command-line override is unknown or has a bad value."""


class DataError(UserError):
    """An input data set is missing, malformed or unsupported."""


class ArtifactError(UserError):
    """A saved artifact (cache, SIDs, checkpoint, export) is missing, stale or tampered."""
