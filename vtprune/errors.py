"""The errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class VtpruneError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(VtpruneError):
    """A config file, key or value that is not allowed."""
