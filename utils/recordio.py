"""Deprecated import path, kept for one release: the module moved to ``utils.data.recordio``."""
import warnings

from utils.data.recordio import *  # noqa: F401,F403
from utils.data import recordio as _moved

warnings.warn("utils.recordio moved to utils.data.recordio; the old path goes away in the next release", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str):
    """Names ``import *`` does not carry (private helpers) still resolve, from the new module."""
    return getattr(_moved, name)
