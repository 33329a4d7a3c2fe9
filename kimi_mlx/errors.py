"""User-facing errors: each carries one line that names the problem and what to do."""


class KimiError(Exception):
    """A mistake the user can fix (bad path, bad config, corrupt file). The CLI prints it as one line."""


class ConfigError(KimiError):
    pass


class WeightsError(KimiError):
    pass


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, whole (its type name when empty), for one-line errors: a
    library's first line is its sentence, and the advice often comes at the end of it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
