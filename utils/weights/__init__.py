"""Backbone weights: reading any file users have (load.py), released weights by name (registry.py, fetch.py,
resolve.py), whether a file was trained (inspect.py). May import backbones and utils.run.checkpoint.

Re-export for one release (deprecated path): ``from utils.weights import load_backbone`` was the
module utils/weights.py; new code imports ``utils.weights.load``.
"""
from utils.weights.load import (closest_network, compare_state_dicts, describe_backbone_file,  # noqa: F401
                                embedding_size_of, extract_backbone_state, guess_network, load_backbone,
                                load_backbone_file, matching_networks, network_signature, read_backbone_state,
                                split_classifier)
