"""User-facing errors: the CLI prints ``error: MESSAGE`` and exits 2 for these, and only these."""


class UserError(ValueError):
    """A problem with the user's input, files or environment (not a bug of ours)."""
