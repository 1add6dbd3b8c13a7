"""Resolving a run's settings from files and the command line.

Precedence, lowest first: the typed dataclass defaults (:mod:`lowshot.config.schema`) < ``--config
FILE.yaml`` (one or more, merged in order) < the ``LOWSHOT_DATA_ROOT`` / ``LOWSHOT_CACHE`` environment
variables < command-line overrides. Overrides are dotted ``key=value`` or ``--key=value`` (so W&B sweeps'
``${args}`` and ``${args_no_hyphens}`` both work) and mode flags such as ``--probe``. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the key, with a suggestion for misspellings.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checks import ConfigError
from .notes import setting_notes
from .schema import Config

DATA_ROOT_ENV = "LOWSHOT_DATA_ROOT"
CACHE_ENV = "LOWSHOT_CACHE"

# Bare ``--flag`` arguments and the (key, value) each one sets.
FLAGS = {"probe": ("train.probe", "true"), "warn-only": ("check.leakage", "warn")}


def all_keys(schema: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``['seed', ..., 'train.lr', ...]``."""
    keys = []
    for f in fields(schema):
        factory = f.default_factory
        if isinstance(factory, type) and is_dataclass(factory):
            keys += all_keys(factory, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a misspelt section or leaf alone: compare the last part
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run with --help to list the keys"
    if key in RENAMED:
        hint = f"; it is now '{RENAMED[key]}'"
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _merge(cfg: DictConfig, other: Any, where: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        if type(err).__name__ in ("ConfigKeyError", "ConfigAttributeError"):
            raise _unknown_key_error(str(key), where) from None
        msg = str(err).splitlines()[0]
        raise ConfigError(f"config key '{key}' in {where}: {msg}") from None
    assert isinstance(merged, DictConfig)
    return merged


def _parse_value(key: str, raw: str) -> Any:
    if raw.lower() in ("on", "off", "yes", "no", "y", "n"):  # YAML 1.1 booleans; strings here, as in
        return raw  # OmegaConf's files (channels_last=on, data.augment_compile=off)
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def parse_args(argv: list[str]) -> tuple[Config, list[str]]:
    """Resolve the config from command-line arguments.

    Returns the typed config and the list of overrides as given (recorded with the run).
    """
    cfg = OmegaConf.structured(Config)
    files: list[str] = []
    overrides: list[tuple[str, str]] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a YAML file path")
            files.append(path)
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg:
            key, raw = arg.lstrip("-").split("=", 1)
            overrides.append((key, raw))
        elif arg.startswith("--") and arg[2:] in FLAGS:
            overrides.append(FLAGS[arg[2:]])
        elif arg.startswith("--"):
            key = arg[2:]
            if key in all_keys():
                raise ConfigError(f"'{arg}' needs a value: write {arg}=VALUE")
            raise _unknown_key_error(key, "the command line")
        else:
            raise ConfigError(f"cannot read argument '{arg}': write key=value, --key=value or --config FILE")
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # yaml scanner errors and the like
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        cfg = _merge(cfg, loaded, f"config file {path}")
    for env, key in ((DATA_ROOT_ENV, "data.root"), (CACHE_ENV, "data.cache_dir")):
        if os.environ.get(env):
            cfg = _merge(cfg, OmegaConf.from_dotlist([f"{key}={os.environ[env]}"]), f"${env}")
    for key, raw in overrides:
        if key not in all_keys() and not any(
            key.startswith(k + ".") for k in all_keys() if k.endswith("kwargs")
        ):
            raise _unknown_key_error(key, "the command line")
        cfg = _merge(cfg, OmegaConf.create(_nest(key, _parse_value(key, raw))), "the command line")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    assert isinstance(obj, Config)
    return obj, [f"{k}={v}" for k, v in overrides]


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(container, dict)
    return {str(k): v for k, v in container.items()}


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys an earlier lowshot wrote under another name: old -> new. A config.yaml saved beside an older run or
# checkpoint is read with them moved; a user's file or command line gets the new name in the error.
RENAMED = {"check.copy_ncc": "data.duplicate_ncc"}


def load_yaml(path: str | Path) -> Config:
    """Read a resolved ``config.yaml`` written beside a run or checkpoint (strict: unknown keys fail, but
    keys a former version wrote under another name (``RENAMED``) are moved to their new name)."""
    saved = OmegaConf.load(path)
    for old, new in RENAMED.items():
        section, key = old.split(".")
        if isinstance(saved, DictConfig) and key in saved.get(section, {}):
            value = saved[section].pop(key)
            s2, k2 = new.split(".")
            if k2 not in saved.get(s2, {}):
                OmegaConf.update(saved, new, value, force_add=True)
    return _to_config(_merge(OmegaConf.structured(Config), saved, str(path)))


def _to_config(cfg: DictConfig) -> Config:
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'train': {'lr': 1e-3}}`` → ``{'train.lr': 1e-3}`` (for trackers and tables)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Settings that make runs repeats of one experiment (the draws; the view path draws the same
# distributions in another order), and settings that say where things go or what is logged rather than
# what is learned: neither makes a different experiment.
REPEAT_KEYS = {
    "seed",
    "data.fold",
    "data.split_seed",
    "data.train_draw",
    "data.augment_path",
    "data.augment_compile",
}
PLACE_KEYS = {
    "name",
    "out_dir",
    "resume",
    "overwrite",
    "data.root",
    "data.cache_dir",
    "data.num_workers",
    "train.eval_train",
}


def setting_key(config: dict[str, Any]) -> str:
    """A short digest of what defines an experiment in a resolved config dict: equal for runs that
    differ only in seed, fold, split seed, label draw, paths or tracking. Keys an older lowshot did
    not write take today's defaults (the behaviour it had)."""
    flat = {**flatten(to_dict(Config())), **flatten(config)}
    kept = {
        k: v
        for k, v in sorted(flat.items())
        if k not in REPEAT_KEYS | PLACE_KEYS and not k.startswith(("track.", "state."))
    }
    return hashlib.sha1(json.dumps(kept, default=str).encode()).hexdigest()[:12]


def help_text() -> str:
    """``--help``: every setting with its default and what it means (its comment in the schema; the full
    reference is docs/configuration.md)."""
    notes = setting_notes()
    lines = [
        "Settings (key=value or --key=value; --config FILE.yaml; --probe); docs/configuration.md has them all:"
    ]
    for k, v in flatten(to_dict(Config())).items():
        note = notes.get(k, "")
        lines.append(
            f"  {k}={v}" + (f"\n      {note[:200] + ('…' if len(note) > 200 else '')}" if note else "")
        )
    return "\n".join(lines)
