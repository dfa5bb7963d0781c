"""Exceptions that carry a message a user can act on.

Library code raises :class:`UserError` (or a subclass) for bad input: the message names the problem
and the fix in one line. The CLI prints it as ``error: <message>`` and exits with code 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint). The message is one actionable line."""


class ConfigError(UserError):
    """An option or combination of options that cannot work."""


class DataError(UserError):
    """A dataset that is missing, malformed or does not fit the network."""


class CheckpointError(UserError):
    """A file or folder that is not a checkpoint ectune can load."""
