"""Config loading: dataclass schema <- YAML file <- `key=value` overrides (OmegaConf).

An unknown key or a value of the wrong type raises UserError naming the key and the closest valid
key; a value outside its field's rule (common.checks) raises UserError naming the key, the value and
what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    OmegaConfBaseException,
    ValidationError,
)

from common.checks import check_config
from common.errors import UserError
from common.files import atomic_write_bytes


def config_keys(config: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config, e.g. ['optim', 'optim.lr', 'optim.momentum', ...]."""
    keys = []
    for key in config:
        keys.append(f"{prefix}{key}")
        node = config._get_node(key)
        if isinstance(node, DictConfig):
            keys.extend(config_keys(node, f"{prefix}{key}."))
    return keys


def closest_key(key: str, valid: Sequence[str]) -> str:
    """The valid key nearest to `key`: by the whole dotted path, else by its last part."""
    whole = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if whole:
        return whole[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
    leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
    if leaf:
        return leaves[leaf[0]]
    return difflib.get_close_matches(key, valid, n=1, cutoff=0.0)[0]


def _config_error(error: OmegaConfBaseException, schema: type, source: str) -> UserError:
    key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        valid = config_keys(OmegaConf.structured(schema))
        return UserError(
            f"unknown config key '{key}' in {source}; did you mean "
            f"'{closest_key(str(key), valid)}'?"
        )
    first_line = str(error).splitlines()[0]
    if isinstance(error, ValidationError):
        return UserError(f"config key '{key}' in {source} has the wrong type: {first_line}")
    return UserError(f"bad config in {source} at '{key}': {first_line}")


def _replaced_mappings(schema: type, raw: dict) -> list[str]:
    """Top-level keys of `raw` that `schema` types as a plain dict (e.g. a pipeline's tasks), not
    a nested config."""
    hints = typing.get_type_hints(schema)
    return [
        f.name
        for f in dataclasses.fields(schema)
        if isinstance(raw.get(f.name), dict) and hints.get(f.name) is dict
    ]


def load_config(
    schema: type, path: str | Path | None = None, overrides: Sequence[str] = ()
) -> DictConfig:
    """Build a config: the schema's defaults, then the YAML file at `path`, then `key=value`
    overrides."""
    config = OmegaConf.structured(schema)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"config file {path} does not exist; pass an existing YAML file to --config"
            )
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            if "'\\t'" in str(error):
                raise UserError(
                    f"config file {path} has a tab{where}; YAML indents with spaces only"
                ) from None
            problem = getattr(error, "problem", None) or " ".join(str(error).split())
            raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from None
        if not isinstance(raw, dict):
            raise UserError(
                f"config file {path} must hold a mapping of keys, not a {type(raw).__name__}"
            )
        from_file = OmegaConf.load(path)
        # a mapping the file gives replaces the default, not adds to it
        for key in _replaced_mappings(schema, raw):
            config[key] = {}
        try:
            config = OmegaConf.merge(config, from_file)
        except OmegaConfBaseException as error:
            raise _config_error(error, schema, str(path)) from None
    for override in overrides:
        if "=" not in override:
            raise UserError(f"override '{override}' must look like key=value, e.g. optim.lr=0.1")
        try:
            config = OmegaConf.merge(config, OmegaConf.from_dotlist([override]))
        except OmegaConfBaseException as error:
            raise _config_error(error, schema, f"override '{override}'") from None
    missing = OmegaConf.missing_keys(config)
    if missing:
        raise UserError(
            f"config keys {sorted(missing)} have no value; set them in the YAML file or as "
            f"key=value"
        )
    check_config(config, schema)
    return config


def save_config(config: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_bytes(Path(path), OmegaConf.to_yaml(config, resolve=True).encode())


def flat_config(config: DictConfig | dict) -> dict[str, Any]:
    container = (
        OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config
    )
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(container, "")
    return flat


def config_differences(saved: dict, current: dict, ignore: set[str] = frozenset()) -> list[str]:
    """Dotted keys whose values differ between two configs, except those in `ignore`."""
    saved, current = flat_config(saved), flat_config(current)
    keys = sorted((set(saved) | set(current)) - set(ignore))
    return [k for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
