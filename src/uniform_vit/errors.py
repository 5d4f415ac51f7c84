"""Errors the command line reports as one clear line (no traceback)."""


class UserError(Exception):
    """Bad input from the user: a wrong name, an unreadable file, an impossible option. Message is one line."""
