"""Deprecated import path, kept for one release: the module moved to ``utils.run.checkpoint``."""
import warnings

from utils.run.checkpoint import *  # noqa: F401,F403
from utils.run import checkpoint as _moved

warnings.warn("utils.checkpoint moved to utils.run.checkpoint; the old path goes away in the next release", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str):
    """Names ``import *`` does not carry (private helpers) still resolve, from the new module."""
    return getattr(_moved, name)
