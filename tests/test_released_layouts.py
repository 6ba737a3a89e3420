"""The released checkpoints as their code writes them (tests/released_checkpoints.py): SSL-HSIC's
np.save of haiku 0.0.5 / optax 0.1.0 state, BYOL's dill pickle, the haiku widths and depths, and the
PyTorch layouts of VISSL, MMPretrain / MMSelfSup, SimCLR's converter and torchvision. Each JAX
file's features equal the haiku network's own
forward (jax, SAME padding); pickles that would run code stay refused."""

import sys

import numpy as np
import pytest
import torch

from common.errors import UserError
from pretrain.networks import ARCHITECTURES, build_resnet
from tests import released_checkpoints as released
from transfer.backbone import ForeignRecord, detect_arch, load_backbone, read_checkpoint
from transfer.runner import backbone_record

BN = dict(decay_rate=0.9, eps=1e-5, create_scale=True, create_offset=True)


def haiku_resnet(arch: str):
    """byol/utils/networks.py's ResNetTorso for an architecture of the table (haiku's BlockGroups,
    channels times
    width_multiplier, SAME padding, global mean pooling), as a haiku transform with state."""
    import haiku as hk
    import jax
    import jax.numpy as jnp

    spec = ARCHITECTURES[arch]
    bottleneck = spec.block == "bottleneck"

    # modules made in __init__, as ResNetTorso does: paths res_net/~/initial_conv ...
    class Torso(hk.Module):
        def __init__(self, name):
            super().__init__(name=name)
            self.initial_conv = hk.Conv2D(
                64 * spec.width, 7, stride=2, with_bias=False, padding="SAME", name="initial_conv"
            )
            self.initial_batchnorm = hk.BatchNorm(name="initial_batchnorm", **BN)
            self.groups = [
                hk.nets.ResNet.BlockGroup(
                    channels=spec.stage_channels[i],
                    num_blocks=blocks,
                    stride=(1, 2, 2, 2)[i],
                    bn_config=BN,
                    resnet_v2=False,
                    bottleneck=bottleneck,
                    use_projection=bottleneck or i > 0,
                    name=f"block_group_{i}",
                )
                for i, blocks in enumerate(spec.layers)
            ]

        def __call__(self, x, is_training):
            x = jax.nn.relu(self.initial_batchnorm(self.initial_conv(x), is_training))
            x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
            for group in self.groups:
                x = group(x, is_training, False)
            return jnp.mean(x, axis=(1, 2))

    return hk.transform_with_state(
        lambda images, is_training: Torso(name="res_net")(images, is_training)
    )


def trained(network, seed: int, passes: int = 2):
    """Parameters with non-trivial BatchNorm scales / offsets, and state moved by training-mode
    passes (or, with
    passes=0, BatchNorm averages drawn at random)."""
    import jax

    rng = np.random.default_rng(seed)
    params, state = jax.jit(network.init, static_argnums=2)(
        jax.random.PRNGKey(seed), np.zeros((1, 32, 32, 3), np.float32), True
    )
    params = {m: {k: np.asarray(v) for k, v in e.items()} for m, e in params.items()}
    for entry in params.values():
        if "scale" in entry:
            entry["scale"] = rng.uniform(0.5, 1.5, entry["scale"].shape).astype(np.float32)
            entry["offset"] = rng.normal(0, 0.1, entry["offset"].shape).astype(np.float32)
    if not passes:
        state = {
            m: {
                k: (
                    rng.uniform(0.5, 1.5, np.shape(v))
                    if m.endswith("var_ema") and k != "counter"
                    else rng.normal(0, 0.1, np.shape(v))
                    if k != "counter"
                    else v
                ).astype(np.asarray(v).dtype)
                for k, v in e.items()
            }
            for m, e in state.items()
        }
    for _ in range(passes):
        _, state = network.apply(
            params, state, None, rng.normal(size=(4, 32, 32, 3)).astype(np.float32) + 0.5, True
        )
    state = {m: {k: np.asarray(v) for k, v in e.items()} for m, e in state.items()}
    return params, state


def perturbed(params: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        m: {k: (v * rng.uniform(0.8, 1.2, v.shape)).astype(v.dtype) for k, v in e.items()}
        for m, e in params.items()
    }


def assert_haiku_features(backbone, network, params, state, sizes=(32, 31)):
    rng = np.random.default_rng(7)
    model = backbone.model().eval()
    for size in sizes:  # even and odd sizes pad differently under SAME
        images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
        expected = np.asarray(network.apply(params, state, None, images, False)[0])
        with torch.no_grad():
            ours = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4, size


@pytest.fixture(scope="module")
def resnet18_jax():
    network = haiku_resnet("resnet18")
    params, state = trained(network, 0)
    return network, params, state


def test_ssl_hsic_released_npy_imports_the_ema_network_without_running_its_classes(
    resnet18_jax, tmp_path
):
    network, online, state = resnet18_jax
    ema = perturbed(online, 1)
    path = tmp_path / "checkpoint.npy"
    released.save_ssl_hsic(path, released.ssl_hsic_checkpoint(online, state, ema))
    raw = path.read_bytes()
    for name in (
        b"haiku._src.data_structures",
        b"FlatMapping",
        b"optax._src.transform",
        b"ScaleByAdamState",
        b"optax._src.base",
        b"EmptyState",
        b"byol.utils.optimizers",
        b"ScaleByLarsState",
    ):
        assert name in raw, name  # the pickle names the released classes
    assert "optax" not in sys.modules and "byol" not in sys.modules
    backbone = load_backbone(path)  # --weights ema, the default
    assert (backbone.arch, backbone.weights, backbone.padding) == ("resnet18", "ema", "same")
    assert backbone.layout == (
        "SSL-HSIC checkpoint (experiment_state / ema_state), ema_state.online_params with "
        "experiment_state.online_state"
    )
    assert_haiku_features(backbone, network, ema, state)
    record = backbone_record(backbone)  # what metrics.json says of the backbone
    assert (record["weights"], record["layout"], record["arch"]) == (
        "ema",
        backbone.layout,
        "resnet18",
    )
    online_backbone = load_backbone(path, "online")
    assert (
        online_backbone.weights == "online"
        and "experiment_state.online_params" in online_backbone.layout
    )
    assert_haiku_features(online_backbone, network, online, state, sizes=(32,))
    # nothing of the file was imported
    assert "optax" not in sys.modules and "byol" not in sys.modules


@pytest.mark.parametrize(
    "mapping, create_array",
    [(released.FlatMap, False), (released.frozendict, True)],
    ids=["haiku-flatmapping", "haiku-frozendict"],
)
def test_byol_released_dill_pickle_imports_what_byols_evaluation_takes(
    resnet18_jax, tmp_path, mapping, create_array
):
    network, online, state = resnet18_jax
    target = perturbed(online, 2)
    path = tmp_path / "pretrain_res50x1.pkl"
    path.write_bytes(
        released.dill_dumps(released.byol_checkpoint(online, state, target, mapping), create_array)
    )
    raw = path.read_bytes()
    assert raw[:2] == b"\x80\x02" and b"dill._dill" in raw and b"_ByolExperimentState" in raw
    assert (
        b"haiku._src.data_structures\n"
        + (b"FlatMapping" if mapping is released.FlatMap else b"frozendict")
        in raw
    )
    # --weights ema: BYOL's eval takes experiment_state.online_params / online_state
    backbone = load_backbone(path)
    assert (backbone.arch, backbone.weights, backbone.padding) == ("resnet18", "online", "same")
    assert backbone.layout == (
        "BYOL checkpoint (_ByolExperimentState), experiment_state.online_params with online_state"
    )
    assert_haiku_features(backbone, network, online, state)
    target_backbone = load_backbone(path, "target")
    assert target_backbone.weights == "target"
    stem = next(
        entry["w"] for module, entry in target.items() if module.endswith("/~/initial_conv")
    )
    assert torch.equal(
        target_backbone.state_dict["conv1.weight"],
        torch.from_numpy(stem.transpose(3, 2, 0, 1).copy()),
    )
    assert "dill" not in sys.modules and "byol" not in sys.modules


# ------------------------------------------------------------------------------- code stays refused


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


@pytest.mark.parametrize(
    "payload, refused",
    [
        (b"\x80\x02" + _global("os", "system") + b"X\x07\x00\x00\x00echo hi\x85R.", "os.system"),
        (
            b"\x80\x02" + _global("posix", "system") + b"X\x07\x00\x00\x00echo hi\x85R.",
            "posix.system",
        ),
        (
            b"\x80\x02" + _global("builtins", "exec") + b"X\x0c\x00\x00\x00print('no!')\x85R.",
            "builtins.exec",
        ),
        (b"\x80\x02" + _global("subprocess", "Popen") + b".", "subprocess.Popen"),
        (
            b"\x80\x02" + _global("dill._dill", "_create_function") + b".",
            "dill._dill._create_function",
        ),
        (
            b"\x80\x02"
            + _global("dill._dill", "_get_attr")
            + _global("dill._dill", "_import_module")
            + b"X\x02\x00\x00\x00os\x85RX\x06\x00\x00\x00system\x86R.",
            "os.system",
        ),
        (b"\x80\x02" + _global("some.package", "run_this") + b".", "some.package.run_this"),
    ],
    ids=[
        "os.system",
        "posix.system",
        "exec",
        "Popen",
        "dill-function",
        "dill-get-attr",
        "unknown-function",
    ],
)
def test_pickles_that_would_run_code_stay_refused(tmp_path, payload, refused):
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(
        UserError, match=f"cannot be read safely: refusing to load {refused.replace('.', '[.]')}"
    ):
        load_backbone(path)


def test_an_unknown_class_is_an_inert_record_never_called(tmp_path):
    """A REDUCE of a class the project does not know builds a record of its arguments; nothing is
    imported."""
    payload = (
        b"\x80\x02}X\x01\x00\x00\x00a"
        + _global("evil.module", "Launcher")
        + b"X\x08\x00\x00\x00rm -rf /\x85Rs."
    )
    path = tmp_path / "record.pkl"
    path.write_bytes(payload)
    record = read_checkpoint(path)["a"]
    assert (
        isinstance(record, ForeignRecord)
        and tuple(record) == ("rm -rf /",)
        and record.source == "evil.module.Launcher"
    )
    assert "evil" not in sys.modules
    with pytest.raises(
        UserError, match="unknown layout, no ResNet backbone found .* tried the layouts: .*BYOL"
    ):
        load_backbone(path)


# ------------------------------------------------------------------------------- widths and depths


def drawn(network, seed: int):
    """Parameters and state of the haiku network's shapes (jax.eval_shape: no jax init, which takes
    half a minute at width 2 on two cores), drawn with numpy: He-scaled kernels, BatchNorm scales,
    offsets and averages away from
    their init."""
    import jax

    rng = np.random.default_rng(seed)
    params, state = jax.eval_shape(
        lambda: network.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), True)
    )

    def draw(module, name, leaf):
        shape = leaf.shape
        if name == "w":
            return (
                rng.standard_normal(shape, np.float32) * np.sqrt(2 / np.prod(shape[:-1]))
            ).astype(np.float32)
        if name == "counter":
            return np.zeros(shape, leaf.dtype)
        if name == "scale" or module.endswith("var_ema"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)

    return (
        {m: {k: draw(m, k, v) for k, v in e.items()} for m, e in params.items()},
        {m: {k: draw(m, k, v) for k, v in e.items()} for m, e in state.items()},
    )


def test_the_haiku_import_of_a_wide_resnet_matches_haikus_forward(tmp_path):
    """ResNet-50 (2x): haiku's width_multiplier scales every channel; the names are those of
    width 1."""
    network = haiku_resnet("resnet50x2")
    params, state = drawn(network, 3)
    path = tmp_path / "res50x2.npy"
    released.save_ssl_hsic(
        path, {"params": released.to_haiku(params), "state": released.to_haiku(state)}
    )
    backbone = load_backbone(path)
    assert (backbone.arch, backbone.layout) == ("resnet50x2", "haiku parameters")
    assert_haiku_features(backbone, network, params, state, sizes=(32,))


@pytest.mark.parametrize("arch", ["resnet50x4", "resnet200", "resnet200x2"])
def test_haiku_names_and_shapes_of_the_wide_and_deep_resnets_map_onto_the_table(arch):
    """haiku's module paths and shapes (abstract: jax.eval_shape, no weights made) against the
    torchvision network of
    the table (on the meta device)."""
    import jax

    from transfer.haiku_import import torchvision_layout

    network = haiku_resnet(arch)
    params, state = jax.eval_shape(
        lambda: network.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), True)
    )
    with torch.device("meta"):
        expected = build_resnet(arch).state_dict()
    shapes = {}
    for target, (module, kind) in torchvision_layout({**params, **state}).items():
        if kind == "conv":
            h, w, i, o = params[module]["w"].shape
            shapes[f"{target}.weight"] = (o, i, h, w)
        else:
            shapes[f"{target}.weight"] = shapes[f"{target}.bias"] = (
                int(np.prod(params[module]["scale"].shape)),
            )
            shapes[f"{target}.running_mean"] = (
                int(np.prod(state[f"{module}/~/mean_ema"]["average"].shape)),
            )
            shapes[f"{target}.running_var"] = (
                int(np.prod(state[f"{module}/~/var_ema"]["average"].shape)),
            )
    assert shapes == {
        k: tuple(v.shape) for k, v in expected.items() if not k.endswith("num_batches_tracked")
    }
    assert detect_arch({k: torch.empty(v, device="meta") for k, v in shapes.items()}) == arch


# ------------------------------------------------------------------------------- other released
# ResNets


def state(arch: str, seed: int, prefix: str = "", fc: bool = False) -> dict:
    torch.manual_seed(seed)
    model = build_resnet(arch)
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    if fc:
        sd[prefix + "fc.weight"], sd[prefix + "fc.bias"] = (
            torch.zeros(
                10, sd[prefix + "layer4.1.bn2.weight"].numel() if arch == "resnet18" else 2048
            ),
            torch.zeros(10),
        )
    return sd


def vissl(sd):
    """vissl/utils/checkpoint.py: classy_state_dict.base_model.model.{trunk, heads}, trunk keys
    _feature_blocks.*."""
    return {
        "phase_idx": 3,
        "iteration": 5004,
        "type": "checkpoint",
        "train_phase_idx": 1,
        "classy_state_dict": {
            "train": True,
            "base_model": {
                "model": {
                    "trunk": {"_feature_blocks." + k: v for k, v in sd.items()},
                    "heads": {"0.clf.0.weight": torch.zeros(128, 512)},
                },
                "meta": {"trunk": {}, "heads": {}},
            },
            "loss": {},
            "optimizer": {},
        },
    }


def mmpretrain(sd):
    """MMPretrain's published checkpoints (tools/model_converters/publish_model.py: meta and
    state_dict), ResNet
    names as torchvision's (mmcv's build_norm_layer names bn1..bn3), under backbone. with neck. /
    head."""
    return {
        "meta": {
            "mmpretrain_version": "1.2.0",
            "dataset_meta": {"classes": ["a", "b"]},
            "epoch": 200,
            "seed": 0,
            "experiment_name": "mocov2_resnet18",
        },
        "state_dict": {
            **{"backbone." + k: v for k, v in sd.items()},
            "neck.mlp.0.weight": torch.zeros(8, 512),
            "head.loss_module.weight": torch.zeros(1),
        },
    }


def mmselfsup(sd):
    """MMSelfSup 0.x (mmcv era): meta with mmcv_version / config text, and BYOL / MoCo's EMA copy
    as target_net."""
    return {
        "meta": {
            "mmcv_version": "1.7.0",
            "time": "Tue Jun  1 12:00:00 2021",
            "config": "model = dict(...)",
            "epoch": 200,
            "iter": 1000,
        },
        "state_dict": {
            **{"backbone." + k: v for k, v in sd.items()},
            **{"target_net.module.0." + k: torch.zeros_like(v) for k, v in sd.items()},
            "neck.mlp.0.weight": torch.zeros(8, 512),
        },
    }


def simclr_converted(sd):
    """tonylins/simclr-converter convert.py:85: torch.save({'state_dict': model.state_dict()}),
    torchvision names
    with fc (resnet_wider.py), the widths 1x / 2x / 4x as the table's resnet50 / resnet50x2 /
    resnet50x4."""
    return {"state_dict": sd}


@pytest.mark.parametrize(
    "layout, arch, build, found",
    [
        (
            "vissl",
            "resnet18",
            lambda: vissl(state("resnet18", 1)),
            "VISSL checkpoint (classy_state_dict.base_model.model.trunk), prefix "
            "'_feature_blocks.'",
        ),
        (
            "mmpretrain",
            "resnet18",
            lambda: mmpretrain(state("resnet18", 2)),
            "'state_dict' entry, prefix 'backbone.'",
        ),
        (
            "mmselfsup",
            "resnet18",
            lambda: mmselfsup(state("resnet18", 3)),
            "'state_dict' entry, prefix 'backbone.'",
        ),
        (
            "simclr-converted",
            "resnet50x2",
            lambda: simclr_converted(state("resnet50x2", 4, fc=True)),
            "'state_dict' entry",
        ),
        ("torchvision-v1", "resnet18", lambda: state("resnet18", 5, fc=True), "top level"),
        ("torchvision-v2", "resnet50", lambda: state("resnet50", 6, fc=True), "top level"),
    ],
    ids=[
        "vissl",
        "mmpretrain",
        "mmselfsup",
        "simclr-converted",
        "torchvision-v1",
        "torchvision-v2",
    ],
)
def test_other_released_resnet_layouts_load_their_backbone(tmp_path, layout, arch, build, found):
    content = build()
    torch.save(content, tmp_path / f"{layout}.pth")
    backbone = load_backbone(tmp_path / f"{layout}.pth")
    assert backbone.arch == arch and backbone.layout == found and backbone.padding == "torch"
    flat = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[f"{prefix}{k}"] = v

    walk(content)
    source = next(
        v for k, v in flat.items() if k.endswith("layer4.1.bn2.weight") and "target_net" not in k
    )
    assert torch.equal(backbone.state_dict["layer4.1.bn2.weight"], source)


def test_a_file_no_reader_recognises_is_refused_on_one_line_naming_the_layouts(tmp_path):
    torch.save({"encoder": {"blocks.0.weight": torch.zeros(3)}}, tmp_path / "mystery.pth")
    with pytest.raises(UserError) as error:
        load_backbone(tmp_path / "mystery.pth")
    message = str(error.value)
    assert "\n" not in message and "unknown layout" in message
    for layout in (
        "SSL-HSIC",
        "BYOL",
        "VISSL",
        "MMPretrain",
        "SimCLR",
        "torchvision",
        "detectron2",
    ):
        assert layout in message
