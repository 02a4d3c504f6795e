"""One exception type for mistakes a user can fix (bad flags, missing files, bad data).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported without a traceback."""
