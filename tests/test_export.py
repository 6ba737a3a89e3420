"""Backbone import / export: round trips, real detectron2 and mmsegmentation loading, and
refusals."""

import json
import os
import pickle
import re

import pytest
import torch
import torchvision

import transfer.verify as verify_module
from common.config import load_config
from common.errors import UserError
from pretrain.schema import PretrainConfig
from pretrain.trainer import train
from tests.helpers import TINY, randomise_batchnorm, run_cli
from transfer import export
from transfer.backbone import fingerprint, load_backbone
from transfer.verify import verify


def random_resnet(arch, seed=0):
    torch.manual_seed(seed)
    return randomise_batchnorm(getattr(torchvision.models, arch)(weights=None))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(random_resnet("resnet18").state_dict(), path)  # with fc, as torchvision ships it
    return path


@pytest.mark.parametrize("fmt", list(export.FORMATS))
def test_round_trip_of_every_format(resnet18_file, tmp_path, fmt):
    original = load_backbone(resnet18_file)
    assert original.arch == "resnet18" and "fc.weight" not in original.state_dict
    out = export.write(original, fmt, tmp_path / f"b{export.FORMATS[fmt]}")
    again = load_backbone(out)
    assert again.arch == "resnet18" and again.state_dict.keys() == original.state_dict.keys()
    for key, value in original.state_dict.items():
        if not key.endswith("num_batches_tracked"):  # detectron2 has no batch counters
            assert torch.equal(again.state_dict[key], value), key
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert (
        sidecar["arch"] == "resnet18"
        and sidecar["format"] == fmt
        and len(sidecar["source_sha256"]) == 64
    )


def test_channels_last_weights_export_and_fingerprint_like_contiguous_ones(resnet18_file, tmp_path):
    """A model trained in channels_last (CUDA, or train.cpu_amp) saves 1x1 conv weights whose
    strides count
    as contiguous but are not unit-stride: loading gives plain contiguous tensors, the same
    fingerprint."""
    state = torch.load(resnet18_file)
    torch.save(
        {
            k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
            for k, v in state.items()
        },
        tmp_path / "cl.pth",
    )
    plain, channels_last = load_backbone(resnet18_file), load_backbone(tmp_path / "cl.pth")
    assert fingerprint(channels_last.state_dict) == fingerprint(plain.state_dict)
    assert all(
        t.is_contiguous() and (t.dim() == 0 or t.stride(-1) == 1)
        for t in channels_last.state_dict.values()
    )
    again = load_backbone(export.write(channels_last, "safetensors", tmp_path / "cl.safetensors"))
    assert all(torch.equal(again.state_dict[k], v) for k, v in plain.state_dict.items())


def test_detectron2_pkl_is_a_plain_pickle_with_the_renames(resnet18_file, tmp_path):
    out = export.write(load_backbone(resnet18_file), "detectron2", tmp_path / "b.pkl")
    with open(out, "rb") as f:
        content = pickle.load(f)
    assert content["matching_heuristics"] is True and content["__author__"]
    model = content["model"]
    assert {
        "stem.conv1.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.norm.weight",
        "res3.0.shortcut.weight",
        "res3.0.shortcut.norm.bias",
        "res5.1.conv2.weight",
    } <= set(model)
    assert all(type(v).__module__ == "numpy" for v in model.values())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_and_mmseg_load_every_weight_and_match_torchvision(arch, tmp_path):
    path = tmp_path / f"{arch}.pth"
    torch.save(random_resnet(arch, seed=1).state_dict(), path)
    report = verify(load_backbone(path), image_size=64)
    assert report.unused == {"detectron2": [], "mmseg": []}
    assert set(report.max_abs_diff) == {"torchvision", "detectron2", "mmseg"}
    assert report.worst() <= 1e-4


def test_verify_catches_a_framework_that_differs(resnet18_file, monkeypatch):
    import transfer.mmseg_glue as mmseg_glue

    real = mmseg_glue.resnet_stages

    def shifted(model, x):
        stages = real(model, x)
        stages["res4"] = stages["res4"] + 1e-3
        return stages

    monkeypatch.setattr(mmseg_glue, "resnet_stages", shifted)
    with pytest.raises(verify_module.VerificationFailed, match=r"mmseg res4 \(1.00e-03\)"):
        verify(load_backbone(resnet18_file), image_size=32)


@pytest.mark.parametrize(
    "prefix, wrapper",
    [
        ("module.", None),
        ("module.encoder_q.", "state_dict"),
        ("backbone.", "model"),
        ("online_network.encoder.", None),
    ],
)
def test_common_ssl_layouts_are_detected(resnet18_file, tmp_path, prefix, wrapper):
    state = {prefix + k: v for k, v in torch.load(resnet18_file, weights_only=True).items()}
    # a head beside the backbone
    state[prefix.split(".")[0] + ".projector.0.weight"] = torch.zeros(4, 4)
    path = tmp_path / "ssl.pth"
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    backbone = load_backbone(path)
    assert backbone.arch == "resnet18" and prefix in backbone.layout
    key = "layer4.1.conv2.weight"
    assert torch.equal(backbone.state_dict[key], load_backbone(resnet18_file).state_dict[key])


def test_pretraining_checkpoint_gives_the_requested_network(tmp_path):
    train(
        load_config(
            PretrainConfig,
            "configs/pretrain/fashion_mnist_resnet18.yaml",
            [f"run_dir={tmp_path}", *TINY, "optim.max_steps=2"],
        )
    )
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    raw = torch.load(checkpoint, weights_only=True)
    for weights, part, prefix in (
        ("ema", "ema", "encoder.backbone."),
        ("online", "online", "encoder.backbone."),
        ("target", "target", "backbone."),
    ):
        backbone = load_backbone(checkpoint, weights)
        assert backbone.weights == weights
        assert torch.equal(
            backbone.state_dict["layer3.0.conv1.weight"],
            raw[part][prefix + "layer3.0.conv1.weight"],
        )
    assert not torch.equal(
        load_backbone(checkpoint, "ema").state_dict["conv1.weight"],
        load_backbone(checkpoint, "online").state_dict["conv1.weight"],
    )


# ------------------------------------------------------------------------------------------
# refusals


def test_wrong_architecture_lists_the_keys(resnet18_file):
    with pytest.raises(
        UserError,
        match=r"does not load strictly into resnet50 .* looks like resnet18\): missing "
        r"\d+ \(.*\), unexpected \d+ \(.*\), wrong shape",
    ):
        load_backbone(resnet18_file, arch="resnet50")


def test_a_missing_layer_is_listed(resnet18_file, tmp_path):
    state = torch.load(resnet18_file, weights_only=True)
    del state["layer2.1.conv1.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(UserError, match=r"missing 1 \(layer2.1.conv1.weight\)"):
        load_backbone(tmp_path / "partial.pth")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": Exploit(), "__author__": "x"}))
    with pytest.raises(UserError, match="cannot be read safely: refusing to load posix.system"):
        load_backbone(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "is unreadable \\(truncated or not a checkpoint\\)"),
        ("head_only", "unknown layout, only a classifier head found"),
        ("unknown", "unknown layout, no ResNet backbone found .* tried the layouts"),
        ("wrong_arch", "match no torchvision ResNet"),
    ],
)
def test_cli_refuses_bad_checkpoints_with_exit_2(resnet18_file, tmp_path, case, message):
    path = tmp_path / f"{case}.pth"
    if case == "truncated":
        path.write_bytes(resnet18_file.read_bytes()[:100_000])
    elif case == "head_only":
        torch.save({"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, path)
    elif case == "unknown":
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    else:  # a ResNet-18 with a fifth block in layer4: no torchvision ResNet has that
        state = torch.load(resnet18_file, weights_only=True)
        state.update(
            {
                k.replace("layer4.1.", "layer4.2."): v
                for k, v in state.items()
                if k.startswith("layer4.1.")
            }
        )
        torch.save(state, path)
    out = tmp_path / "out.pth"
    result = run_cli(
        "transfer",
        "export",
        "--checkpoint",
        str(path),
        "--format",
        "torchvision",
        "--out",
        str(out),
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert re.search(message, result.stderr), result.stderr
    assert not out.exists() and not list(tmp_path.glob("out*"))


def test_cli_exports_all_formats_and_verifies(resnet18_file, tmp_path):
    result = run_cli(
        "transfer",
        "export",
        "--checkpoint",
        str(resnet18_file),
        "--format",
        "all",
        "--out",
        str(tmp_path / "all"),
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(
        f"backbone_as-is{suffix}{extra}"
        for suffix in export.FORMATS.values()
        for extra in ("", ".json")
    )
    result = run_cli(
        "transfer", "verify", "--checkpoint", str(tmp_path / "all" / "backbone_as-is.pkl")
    )
    assert result.returncode == 0, result.stderr
    assert "ok: every weight used" in result.stdout
