"""Configuration: loading a config file over configs/base.py (load.py), the validation rules
(rules.py) and output-path checks (paths.py). Imports nothing else of ours.

``from utils.config import load_config, to_plain, ConfigError`` keeps working (the names users had
when utils/config.py was one module).
"""
from utils.config.load import load_config, to_plain  # noqa: F401
from utils.config.rules import ConfigError  # noqa: F401
