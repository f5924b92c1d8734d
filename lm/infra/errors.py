"""The user errors that the lower layers raise and the boundary (``lm.infra.cli``) turns into
one line and exit code 2; they live here so that the boundary needs no higher layer."""

from __future__ import annotations


class DataError(RuntimeError):
    """Missing, corrupt or unusable data; the message says what to do."""


class UsageError(ValueError):
    """A bad command-line argument outside Hydra's config (argparse commands)."""
