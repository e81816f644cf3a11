"""The one exception type the command line turns into a one-line error.

Library code raises :class:`KaggleCMRError` (or a subclass) for every problem a user can fix:
bad input files, malformed CSVs, invalid configs.  ``cli.py`` prints ``error: <message>`` and
exits with code 2, without a traceback.  Messages name the file (or key) and the problem.
"""

from __future__ import annotations


class KaggleCMRError(Exception):
    """A user-facing error: one line, names the file or key and what is wrong with it."""


class DataError(KaggleCMRError):
    """A dataset file or folder is missing, unreadable or inconsistent."""


class SubmissionError(KaggleCMRError):
    """A submission / solution CSV is malformed."""


class ConfigError(KaggleCMRError):
    """A config file or override is invalid."""
