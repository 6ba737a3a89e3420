"""Checkpoints people have: the official SSL-HSIC JAX checkpoint as ssl_hsic/experiment.py writes it
(tests/released_checkpoints.py; checked against the haiku network's own forward pass in jax), DINO's
and timm's training checkpoints, and networks that are not ResNets. BYOL's dill pickles, the widths
and the other released
layouts: tests/test_released_layouts.py."""

import argparse

import numpy as np
import pytest
import torch

from common.errors import UserError
from pretrain.networks import build_resnet
from tests import released_checkpoints as released
from transfer.backbone import load_backbone

# ------------------------------------------------------------------------------- the JAX
# checkpoints


def haiku_resnet50():
    """The official code's ResNet-50 torso (byol/utils/networks.py's ResNetTorso: haiku's
    BlockGroups, SAME
    padding, BatchNorm decay 0.9 / eps 1e-5, global mean pooling), as a haiku transform with state.
    """
    import haiku as hk
    import jax
    import jax.numpy as jnp

    bn_config = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)

    class Torso(hk.Module):
        def __call__(self, x, is_training):
            x = hk.Conv2D(64, 7, stride=2, with_bias=False, padding="SAME", name="initial_conv")(x)
            x = jax.nn.relu(hk.BatchNorm(name="initial_batchnorm", **bn_config)(x, is_training))
            x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
            for i, (blocks, channels, stride) in enumerate(
                zip((3, 4, 6, 3), (256, 512, 1024, 2048), (1, 2, 2, 2))
            ):
                x = hk.nets.ResNet.BlockGroup(
                    channels=channels,
                    num_blocks=blocks,
                    stride=stride,
                    bn_config=bn_config,
                    resnet_v2=False,
                    bottleneck=True,
                    use_projection=True,
                    name=f"block_group_{i}",
                )(x, is_training, False)
            return jnp.mean(x, axis=(1, 2))

    return hk.transform_with_state(
        lambda images, is_training: Torso(name="res_net50")(images, is_training)
    )


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """A checkpoint laid out as the official experiment saves it (np.save of a dict), from a haiku
    network whose
    BatchNorm scales, offsets and statistics are all non-trivial; and the network's eval-mode
    features."""
    import jax

    network = haiku_resnet50()
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    params, state = network.init(jax.random.PRNGKey(0), images, True)
    params = {
        module: {name: np.asarray(value) for name, value in entry.items()}
        for module, entry in params.items()
    }
    # the zero-initialised last scales would hide a mis-mapped BatchNorm
    for module, entry in params.items():
        if "scale" in entry:
            entry["scale"] = rng.uniform(0.5, 1.5, entry["scale"].shape).astype(np.float32)
            entry["offset"] = rng.normal(0, 0.1, entry["offset"].shape).astype(np.float32)
    for _ in range(3):  # training-mode passes move the BatchNorm averages away from their init
        _, state = network.apply(
            params, state, None, rng.normal(size=(4, 64, 64, 3)).astype(np.float32) * 2 + 0.5, True
        )
    state = jax.tree_util.tree_map(np.asarray, state)
    folder = tmp_path_factory.mktemp("jax")
    path = folder / "ssl_hsic_checkpoint.npy"
    # as ssl_hsic/experiment.py saves it: haiku 0.0.5 FlatMappings, optax 0.1.0 / BYOL optimizer
    # NamedTuples
    released.save_ssl_hsic(path, released.ssl_hsic_checkpoint(params, state, params))
    features = {}
    for size in (64, 57):  # even and odd sizes pad differently under SAME
        batch = rng.normal(size=(2, size, size, 3)).astype(np.float32)
        features[size] = (batch, np.asarray(network.apply(params, state, None, batch, False)[0]))
    return path, features, (params, state)


def test_the_official_jax_checkpoint_imports_to_the_haiku_networks_features(official_checkpoint):
    path, features, _ = official_checkpoint
    backbone = load_backbone(path, "ema")
    assert backbone.arch == "resnet50" and backbone.padding == "same" and backbone.weights == "ema"
    assert backbone.layout == (
        "SSL-HSIC checkpoint (experiment_state / ema_state), ema_state.online_params with "
        "experiment_state.online_state"
    )
    model = backbone.model().eval()
    symmetric = build_resnet("resnet50", backbone.state_dict).eval()  # torchvision's own padding
    for size, (images, expected) in features.items():
        with torch.no_grad():
            inputs = torch.from_numpy(images).permute(0, 3, 1, 2)
            ours, shifted = model(inputs).numpy(), symmetric(inputs).numpy()
        scale = np.abs(expected).max()
        assert np.abs(ours - expected).max() / scale < 1e-4, size
        assert np.abs(shifted - expected).max() / scale > 1e-2, size  # the padding matters


def test_the_jax_import_takes_the_network_asked_for_and_refuses_what_is_missing(
    official_checkpoint, tmp_path
):
    path, _, (params, state) = official_checkpoint
    target = load_backbone(path, "target")
    assert target.weights == "target" and target.layout == (
        "SSL-HSIC checkpoint (experiment_state / ema_state), experiment_state.target_params with "
        "experiment_state.target_state"
    )
    content = released.ssl_hsic_checkpoint(params, state, params)
    del content["ema_state"]
    released.save_ssl_hsic(tmp_path / "no_ema.npy", content)
    with pytest.raises(UserError, match="no ema_state.online_params"):
        load_backbone(tmp_path / "no_ema.npy", "ema")
    content["experiment_state"]["online_state"] = released.to_haiku({})
    released.save_ssl_hsic(tmp_path / "no_state.npy", content)
    with pytest.raises(UserError, match="holds no BatchNorm statistics"):
        load_backbone(tmp_path / "no_state.npy", "online")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickled_npy_that_would_run_code_is_refused(tmp_path):
    np.save(tmp_path / "evil.npy", {"experiment_state": Payload()}, allow_pickle=True)
    with pytest.raises(UserError, match="cannot be read safely: refusing to load builtins.print"):
        load_backbone(tmp_path / "evil.npy")


# ----------------------------------------------------------------------------------- DINO and timm


def resnet_state(seed: int, prefix: str = "") -> dict:
    torch.manual_seed(seed)
    return {prefix + k: v for k, v in build_resnet("resnet50").state_dict().items()}


def test_a_dino_full_checkpoint_loads_its_teacher_by_default_and_its_student_on_request(tmp_path):
    teacher, student = resnet_state(1, "backbone."), resnet_state(2, "module.backbone.")
    head = {"head.mlp.0.weight": torch.zeros(4, 2048)}
    torch.save(
        {
            "teacher": {**teacher, **head},
            "student": {**student, **{"module." + k: v for k, v in head.items()}},
            "optimizer": {},
            "epoch": 100,
            "args": argparse.Namespace(arch="resnet50", out_dim=65536),
        },
        tmp_path / "dino.pth",
    )
    default, chosen = (
        load_backbone(tmp_path / "dino.pth"),
        load_backbone(tmp_path / "dino.pth", "student"),
    )
    assert default.weights == "teacher" and torch.equal(
        default.state_dict["conv1.weight"], teacher["backbone.conv1.weight"]
    )
    assert chosen.weights == "student"
    assert torch.equal(chosen.state_dict["conv1.weight"], student["module.backbone.conv1.weight"])


def test_a_flat_checkpoint_of_both_dino_networks_gives_the_teacher_unless_asked(tmp_path):
    teacher, student = resnet_state(1, "teacher.backbone."), resnet_state(2, "student.backbone.")
    torch.save({**student, **teacher}, tmp_path / "flat.pth")
    default, chosen = (
        load_backbone(tmp_path / "flat.pth"),
        load_backbone(tmp_path / "flat.pth", "student"),
    )
    assert default.weights == "teacher" and "prefix 'teacher.backbone.'" in default.layout
    assert torch.equal(
        default.state_dict["layer4.2.bn3.weight"], teacher["teacher.backbone.layer4.2.bn3.weight"]
    )
    assert chosen.weights == "student"
    assert torch.equal(
        chosen.state_dict["layer4.2.bn3.weight"], student["student.backbone.layer4.2.bn3.weight"]
    )


def test_a_timm_training_checkpoint_loads_its_ema_weights(tmp_path):
    model, ema = resnet_state(3), resnet_state(4)
    torch.save(
        {
            "epoch": 300,
            "arch": "resnet50",
            "state_dict": {**model, "fc.weight": torch.zeros(1000, 2048)},
            "state_dict_ema": {**ema, "fc.weight": torch.zeros(1000, 2048)},
            "optimizer": {},
            "args": argparse.Namespace(model="resnet50", lr=0.1),
            "version": 2,
        },
        tmp_path / "timm.pth.tar",
    )
    default, raw = (
        load_backbone(tmp_path / "timm.pth.tar"),
        load_backbone(tmp_path / "timm.pth.tar", "online"),
    )
    assert default.layout == "'state_dict_ema' entry" and torch.equal(
        default.state_dict["conv1.weight"], ema["conv1.weight"]
    )
    assert raw.layout == "'state_dict' entry" and torch.equal(
        raw.state_dict["conv1.weight"], model["conv1.weight"]
    )


# ------------------------------------------------------------------------------------ not a ResNet


@pytest.mark.parametrize(
    "keys, looks_like",
    [
        (
            {
                "cls_token": (1, 1, 384),
                "pos_embed": (1, 197, 384),
                "patch_embed.proj.weight": (384, 3, 16, 16),
                **{f"blocks.{i}.attn.qkv.weight": (1152, 384) for i in range(12)},
            },
            "a Vision Transformer (12 blocks, width 384)",
        ),
        (
            {
                "downsample_layers.0.0.weight": (96, 3, 4, 4),
                "stages.0.0.dwconv.weight": (96, 1, 7, 7),
            },
            "a ConvNeXt",
        ),
        (
            {"features.0.weight": (64, 3, 3, 3), "classifier.0.weight": (4096, 25088)},
            "a VGG / AlexNet-style network",
        ),
    ],
)
def test_a_network_that_is_not_a_resnet_is_refused_saying_what_it_looks_like(
    tmp_path, keys, looks_like
):
    torch.save({k: torch.zeros(shape) for k, shape in keys.items()}, tmp_path / "other.pth")
    with pytest.raises(UserError) as error:
        load_backbone(tmp_path / "other.pth")
    assert str(error.value) == (
        f"{tmp_path / 'other.pth'}: looks like {looks_like}, not a ResNet; this platform "
        "evaluates torchvision-style ResNets (resnet18, resnet34, "
        "resnet50, resnet101, resnet152, "
        "resnet50x2, resnet50x4, resnet200, resnet200x2)"
    )
