"""User-facing errors: the CLI prints ``error: MESSAGE`` and exits 2 for these, and only these."""


class UserError(ValueError):
    """A problem with the user's input, files or environment (not a bug of ours)."""


class JSONFileError(UserError):
    """A JSON file of the user's (config.json, tokenizer.json, ...) that is not readable JSON."""


def read_json(path) -> object:
    """``json.loads`` of a user's file; unreadable text or invalid JSON raise ``JSONFileError`` naming the file."""
    import json
    from pathlib import Path
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JSONFileError(f"{path}: invalid JSON ({e})") from None
