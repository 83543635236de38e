"""Deprecated import path, kept for one release: the module moved to ``utils.faces.mtcnn``."""
import warnings

from utils.faces.mtcnn import *  # noqa: F401,F403
from utils.faces import mtcnn as _moved

warnings.warn("utils.mtcnn moved to utils.faces.mtcnn; the old path goes away in the next release", DeprecationWarning,
              stacklevel=2)


def __getattr__(name: str):
    """Names ``import *`` does not carry (private helpers) still resolve, from the new module."""
    return getattr(_moved, name)
