"""One source of truth for a run's settings: the typed sections (:mod:`.schema`) and how files, the
environment and the command line resolve them (:mod:`.resolve`)."""

from .checks import ConfigError
from .resolve import (
    CACHE_ENV,
    DATA_ROOT_ENV,
    RENAMED,
    all_keys,
    flatten,
    help_text,
    load_yaml,
    parse_args,
    setting_key,
    to_dict,
    to_yaml,
)
from .schema import (
    AugConfig,
    CheckConfig,
    Config,
    DataConfig,
    EvalConfig,
    FewShotConfig,
    ModelConfig,
    SSLConfig,
    StateConfig,
    TrackConfig,
    TrainConfig,
)

__all__ = [
    "CACHE_ENV",
    "DATA_ROOT_ENV",
    "RENAMED",
    "AugConfig",
    "CheckConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FewShotConfig",
    "ModelConfig",
    "SSLConfig",
    "StateConfig",
    "TrackConfig",
    "TrainConfig",
    "all_keys",
    "flatten",
    "help_text",
    "load_yaml",
    "parse_args",
    "setting_key",
    "to_dict",
    "to_yaml",
]
