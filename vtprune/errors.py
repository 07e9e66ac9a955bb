"""The errors a user can cause. The CLI turns each into one line on stderr and exit code 2; a fault of the machine
(a full disk, a cache folder it cannot write) is one line and exit code 1 (``vtprune.cli.common.handle_errors``)."""

import reprlib


class VtpruneError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class ConfigError(VtpruneError):
    """A config file, key or value that is not allowed."""


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 2, 60, 60
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 6


def shown(value) -> str:
    """``repr(value)`` cut short: an error line must stay one line and cheap, whatever the user's value (a YAML alias
    bomb's repr alone would take forever)."""
    text = _SHOWN.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
