"""User-facing errors: each carries one line that names the problem and what to do."""


class KimiError(Exception):
    """A mistake the user can fix (bad path, bad config, corrupt file). The CLI prints it as one line."""


class ConfigError(KimiError):
    pass


class WeightsError(KimiError):
    pass


def first_line(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when empty), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
