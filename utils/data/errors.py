"""The error every data module raises for unusable training data.

``DatasetError`` lives here, apart from the datasets and the samplers that both raise it, so that
neither has to import the other for it, and so that torch-free tools can catch it without loading
torch. ``from dataset import DatasetError`` keeps working (re-exported there).
"""
from __future__ import annotations


class DatasetError(ValueError):
    """Unusable training data or a config that disagrees with it; the message is one line."""
