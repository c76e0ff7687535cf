"""Typed configuration: small dataclass sections, YAML files, ``section.key=value`` overrides.

Precedence: command-line overrides > YAML file > dataclass defaults. The defaults alone
describe the HSTU ``id`` model on the embedded ml-latest-small data. Modules never see
the whole :class:`Config`: the builders (``models/build.py``, ``train/``, ``eval/``,
``export/``) and the CLI hand each module its own section, or a small settings dataclass
that a section inherits (:class:`RqParams` of ``sids``, :class:`DecoderSettings` of
``eval``; :func:`narrow` cuts it out), so no setting is declared twice. The value types
(``Literal`` switches) live in :mod:`sidvid_rec.types`.

Example::

    cfg = load_config("configs/ml-100k/hstu.yaml", ["model.mode=sid_id", "train.epochs=3"])
"""

import dataclasses
import os
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, TypeVar

import yaml

from sidvid_rec import storage
from sidvid_rec.config.ranges import _ANY_VALUE, _RANGES, SEED_MAX, SELECT_K, Range, _validate
from sidvid_rec.config.sections import (Config, DataConfig, DecoderSettings, EvalConfig, LossConfig, ModelConfig,
                                        RetrievalConfig, RqParams, RqVaeParams, SidsConfig, TrainConfig)
from sidvid_rec.errors import ArtifactError, ConfigError

T = TypeVar("T")

__all__ = [  # the sections and the range table are re-exported: `from sidvid_rec.config import X` stays valid
    "Config", "DataConfig", "DecoderSettings", "EvalConfig", "LossConfig", "ModelConfig", "RetrievalConfig",
    "RqParams", "RqVaeParams", "SidsConfig", "TrainConfig", "Range", "SEED_MAX", "SELECT_K", "_RANGES", "_ANY_VALUE",
    "config_from_dict", "dump_config", "load_config", "load_run_config", "narrow", "parse_override",
    "resolve_config_path", "with_absolute_paths", "LOCAL_PATH_FIELDS", "RUN_OVERRIDE_SECTIONS",
]


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks ``value`` against a field annotation; converts int->float, list->tuple."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where}: {value!r} is not one of {choices}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is typing.Union and type(None) in args:
        return None if value is None else _coerce(value, args[0], where)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _section_types(section_cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _apply(cfg: Config, section: str, key: str, value: Any, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown config section {section!r} (sections: {', '.join(sections)})")
    obj = getattr(cfg, section)
    hints = _section_types(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown config key {section}.{key}")
    setattr(obj, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def parse_override(text: str) -> Tuple[str, str, Any]:
    """Splits ``section.key=value``; the value is parsed as YAML (``3``, ``true``, ``[1, 5]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"override {text!r}: the key must be section.key (e.g. train.epochs=3)")
    section, key = dotted.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def resolve_config_path(path: str) -> str:
    """Accepts a file path or a short name like ``ml-100k/hstu`` (looked up in ``./configs``)."""
    candidates = [path, f"configs/{path}", f"configs/{path}.yaml", f"{path}.yaml"]
    for candidate in candidates:
        if storage.exists(storage.expand(candidate)) and not storage.isdir(storage.expand(candidate)):
            return storage.expand(candidate)
    raise ConfigError(f"config file not found: {path}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Builds a :class:`Config` from defaults, an optional YAML file and overrides."""
    cfg = Config()
    if path:
        resolved = resolve_config_path(path)
        for section, values in _read_sections(resolved, ConfigError).items():
            for key, value in values.items():
                _apply(cfg, section, key, value, resolved)
    for text in overrides or []:
        section, key, value = parse_override(text)
        _apply(cfg, section, key, value, "override")
    _validate(cfg)
    return cfg


def narrow(section: Any, cls: Type[T]) -> T:
    """The ``cls`` part of a config section that inherits it (``narrow(cfg.eval, DecoderSettings)``),
    as a plain ``cls``: what a module takes instead of the whole section."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


def _read_sections(path: str, error: Type[Exception]) -> Dict[str, Dict[str, Any]]:
    """A YAML file of ``{section: {key: value}}``; anything else raises ``error`` in one line."""
    if storage.isdir(path):
        raise error(f"{path} is a directory, not a YAML config file")
    with storage.open_file(path, "rb") as f:
        data = f.read()
    try:
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise error(f"{path}: not a YAML text file (it is not UTF-8)")
    except (yaml.YAMLError, RecursionError) as e:
        raise error(f"{path}: not valid YAML ({(str(e).splitlines() or ['nested too deeply'])[0]})")
    _check_sections(raw, path, error)
    return raw


def _check_sections(raw: Any, where: str, error: Type[Exception]) -> None:
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise error(f"{where}: section {section!r} must be a mapping")


def config_from_dict(raw: Dict[str, Dict[str, Any]], where: str = "saved config") -> Config:
    """Rebuilds a :class:`Config` saved with :meth:`Config.to_dict` (e.g. a run's config.yaml)."""
    _check_sections(raw, where, ArtifactError)
    cfg = Config()
    for section, values in raw.items():
        for key, value in values.items():
            _apply(cfg, section, key, value, where)
    _validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved config (tuples written as lists)."""
    def plain(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        return obj
    return yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False)


LOCAL_PATH_FIELDS = (("data", "path"), ("data", "cache_dir"), ("sids", "embed_cache_dir"), ("sids", "dir"))
"""Fields naming local files or directories (``sids.encoder`` too, when it is a directory)."""


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with every relative local path made absolute against the current directory.

    A run directory's ``config.yaml`` is read by later commands from anywhere (``evaluate``
    from another directory, a serving host), so training stores paths that mean the same
    there. Empty values (defaults), ``~`` paths and URLs (``s3://``, iopath backends) stay
    as typed; ``sids.encoder`` changes only when it names an existing directory.
    """
    raw = cfg.to_dict()
    for section, key in LOCAL_PATH_FIELDS:
        raw[section][key] = _absolute(raw[section][key])
    encoder = raw["sids"]["encoder"]
    if os.path.isdir(encoder):
        raw["sids"]["encoder"] = _absolute(encoder)
    return config_from_dict(raw)


def _absolute(path: str) -> str:
    if not path or "://" in path or path.startswith("~") or os.path.isabs(path):
        return path
    return os.path.abspath(path)


RUN_OVERRIDE_SECTIONS = ("eval", "retrieval")
"""What a command reading a trained run may change: nothing that shapes the model."""


def load_run_config(run_dir: str, overrides: Sequence[str] = (), command: str = "evaluate") -> Config:
    """The resolved config a run directory was trained with (its ``config.yaml``), with
    ``eval.*`` / ``retrieval.*`` ``overrides`` (``command`` names the caller in the error)."""
    path = os.path.join(run_dir, "config.yaml")
    if not storage.exists(path):
        raise ArtifactError(f"{run_dir} is not a run directory (no config.yaml)")
    raw = config_from_dict(_read_sections(path, ArtifactError), path).to_dict()
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in RUN_OVERRIDE_SECTIONS:
            raise ConfigError(f"{command} takes eval.* and retrieval.* overrides only, got {section}.{key}")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw)
