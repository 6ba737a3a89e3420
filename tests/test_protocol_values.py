"""Every shipped config loads against its schema, and every full-size value that a published
protocol fixes is the
one docs/protocol_values.yaml gives with its source."""

from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from common.config import load_config
from pretrain.schema import PretrainConfig
from slurm.executor import ExecutorConfig
from slurm.pipeline import PipelineConfig
from tests.helpers import ROOT
from transfer.tasks import TASKS
from transfer.tasks.classify import Config

TABLE = yaml.safe_load((ROOT / "docs" / "protocol_values.yaml").read_text())["values"]
CONFIGS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "configs").rglob("*.yaml"))


def schema_of(path: str) -> type:
    """The schema a config file is loaded with: its folder's, and for a transfer config its task's
    (the file name
    starts with the task)."""
    kind, name = Path(path).parts[1], Path(path).stem
    if kind == "pretrain":
        return PretrainConfig
    if kind == "slurm":
        return ExecutorConfig
    if kind == "pipeline":
        return PipelineConfig

    task = name.split("_")[0]
    assert task in TASKS, f"{path}: its name does not start with a task ({', '.join(TASKS)})"
    return TASKS[task].load().Config


@lru_cache(maxsize=None)
def loaded(path: str):

    return load_config(schema_of(path), ROOT / path, [])


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads_against_its_schema(path):
    assert OmegaConf.to_container(loaded(path))


def same(value, expected) -> bool:
    if isinstance(expected, list):
        return (
            isinstance(value, list)
            and len(value) == len(expected)
            and all(map(same, value, expected))
        )
    if (
        isinstance(expected, float)
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    ):
        return value == pytest.approx(expected, rel=1e-6)
    return value == expected and type(value) is type(expected)


@pytest.mark.parametrize("row", TABLE, ids=[f"{Path(r['config']).stem}:{r['key']}" for r in TABLE])
def test_each_published_value_is_the_configs(row):
    assert row["config"] in CONFIGS, f"{row['config']} is not a shipped config"
    assert row["source"].strip()
    value = OmegaConf.select(loaded(row["config"]), row["key"], default=KeyError)
    assert value is not KeyError, f"{row['config']} has no key {row['key']}"
    plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    assert same(plain, row["value"]), (
        f"{row['config']} {row['key']} = {plain!r}, published {row['value']!r} ({row['source']})"
    )


def test_the_table_names_each_value_once_and_every_full_size_config():
    keys = [(row["config"], row["key"]) for row in TABLE]
    assert len(keys) == len(set(keys))
    full_size = {
        "configs/pretrain/imagenet_resnet50.yaml",
        "configs/transfer/linear_imagenet.yaml",
        "configs/transfer/linear_imagenet_byol.yaml",
        "configs/transfer/finetune_imagenet.yaml",
        "configs/transfer/classify_kornblith.yaml",
        "configs/transfer/segmentation_voc_fcn.yaml",
        "configs/transfer/depth_nyu.yaml",
        "configs/transfer/detection_voc_r50_c4.yaml",
    }
    assert full_size <= {config for config, _ in keys}


def test_the_kornblith_defaults_in_code_are_the_published_grid():
    """The classify task's own defaults (a config that names no grid) are the published protocol
    too."""

    finetune = Config().finetune
    rows = {
        row["key"]: row["value"]
        for row in TABLE
        if row["config"].endswith("classify_kornblith.yaml")
    }
    for key in (
        "batch_size",
        "steps",
        "lr_grid",
        "weight_decay_grid",
        "weight_decay_over_lr",
        "bn_momentum_from_epoch",
    ):
        assert same(
            list(v) if isinstance(v := getattr(finetune, key), tuple) else v,
            rows[f"finetune.{key}"],
        ), key
