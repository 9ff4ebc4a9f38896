"""User-facing errors: one line naming the bad key, path or value."""


class DiffsensError(Exception):
    """An error the CLI reports as one line and a non-zero exit, without a traceback."""


class ConfigError(DiffsensError):
    """A config value that cannot be used: names its full key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def one_of(value, allowed, key: str):
    """``value`` if it is one of ``allowed``, else a ConfigError listing them."""
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not one of {', '.join(map(str, allowed))}")
    return value
