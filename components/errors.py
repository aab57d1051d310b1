"""User-facing errors: the CLI prints their message as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Bad input found before expensive work: the message names the file or key and the fix."""
