"""The one error type the CLI turns into a one-line message and exit code 2."""


class ExportError(Exception):
    """A problem the user can fix: the message names it and says how."""
