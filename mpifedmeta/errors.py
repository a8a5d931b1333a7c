"""The error classes that cross module boundaries (a leaf: imports nothing from mpifedmeta).

Defined here so that any module can raise or catch them without importing the module that owns
the feature (run.config, data.loaders), which would close import cycles. The owners re-export
them: ``from mpifedmeta.run.config import ConfigError`` and ``from mpifedmeta.data import
DataError`` keep working and name the same classes.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


class DataError(ValueError):
    """Invalid or missing data, or an impossible partition request."""
