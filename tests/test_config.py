"""The config system: schema defaults <- YAML <- key=value, and its one-line errors."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import closest_key, load_config
from common.errors import UserError
from pretrain.schema import PretrainConfig
from tests.helpers import run_cli


def test_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  base_lr: 0.2\n  epochs: 5\nmodel:\n  backbone: resnet50\n")
    config = load_config(PretrainConfig, path, ["optim.epochs=7"])
    assert config.optim.base_lr == 0.2
    assert config.optim.epochs == 7
    assert config.model.backbone == "resnet50"
    assert config.loss.gamma == 3.0  # a default untouched


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(
        UserError, match=r"unknown config key 'optim.base_lrr'.*did you mean 'optim.base_lr'"
    ):
        load_config(PretrainConfig, None, ["optim.base_lrr=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbon: resnet18\n")
    with pytest.raises(
        UserError, match=rf"unknown config key 'model.backbon' in {path}.*'model.backbone'"
    ):
        load_config(PretrainConfig, path)


def test_misplaced_key_is_matched_by_its_last_part():
    assert closest_key("base_lr", ["optim.base_lr", "optim.momentum", "seed"]) == "optim.base_lr"
    with pytest.raises(UserError, match=r"'epochs'.*did you mean 'optim.epochs'"):
        load_config(PretrainConfig, None, ["epochs=3"])


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match=r"config key 'optim.base_lr' .* wrong type"):
        load_config(PretrainConfig, None, ["optim.base_lr=fast"])
    with pytest.raises(UserError, match=r"config key 'train.amp' .* wrong type"):
        load_config(PretrainConfig, None, ["train.amp=maybe"])


def test_malformed_inputs(tmp_path):
    with pytest.raises(UserError, match="must look like key=value"):
        load_config(PretrainConfig, None, ["optim.base_lr"])
    with pytest.raises(UserError, match="does not exist"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(PretrainConfig, scalar)


def test_every_shipped_config_loads():

    for path in sorted(Path("configs/pretrain").glob("*.yaml")):
        config = load_config(PretrainConfig, path)
        assert OmegaConf.to_container(config)


@pytest.mark.parametrize("package", ["pretrain", "transfer", "slurm"])
def test_help_is_real(package):
    result = run_cli(package, "--help")
    assert result.returncode == 0, result.stderr
    assert f"python -m {package}" in result.stdout and "usage" in result.stdout


def test_cli_wrong_key_is_one_line_and_exit_2(tmp_path):
    result = run_cli("pretrain", "optim.base_lrr=0.1", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: unknown config key 'optim.base_lrr'")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
