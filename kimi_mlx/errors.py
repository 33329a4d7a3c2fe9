"""User-facing errors: each carries one line that names the problem and what to do."""


class KimiError(Exception):
    """A mistake the user can fix (bad path, bad config, corrupt file). The CLI prints it as one line."""


class ConfigError(KimiError):
    pass


class WeightsError(KimiError):
    pass
