"""The classify task: linear transfer (L-BFGS over 45 penalties, refit on train + val) checked
against scikit-learn on the very features it used, fine-tuning chosen on val and refit, the
multi-label VOC2007 path,
and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests import classify_layouts
from tests.helpers import ROOT
from transfer.features import FeatureCache
from transfer.logistic import fit_binary_logistic, fit_logistic, voc07_map
from transfer.runner import run_task

CONFIG = str(ROOT / "configs/transfer/classify_digits.yaml")
SMALL = [
    "images.size=16",
    "finetune.batch_size=100",
    "finetune.lr_grid=[0.05,0.01]",
    "finetune.epochs_grid=[1]",
]


def cached(cache_dir, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    for description in (cache_dir).glob("*/description.json"):
        if json.loads(description.read_text())["split"] == split:
            return FeatureCache(cache_dir).get(description.parent.name)[:2]
    raise AssertionError(f"no cached {split} features")


def test_digits_linear_transfer_equals_scikit_learn_on_the_same_features_and_finetune_is_chosen_on_val(
    tmp_path,
):
    record = run_task(
        "classify",
        "random:resnet18",
        "ema",
        CONFIG,
        [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *SMALL],
    )
    assert record["dataset"] == "digits" and set(record["metrics"]) == {
        "linear.top1",
        "finetune.top1",
    }
    assert record["sizes"] == {"train": 1008, "val": 250, "test": 539}
    penalty = record["linear"]["penalty"]
    assert len(record["linear"]["validation"]) == 45
    # the refit again, by hand on the cached train + val features (raw, or standardised with the
    # train split's mean and std where the task did: the record's linear.standardize, else
    # select_and_fit's default, raw) with the task's penalty: the same test top-1. The solver
    # converges: scikit-learn's lbfgs at tol 1e-10 on the same objective, started from our solution,
    # finds no value lower by 1e-8 relative (our solver gets within ~1e-11; objectives compared, not
    # parameters: the softmax's bias shift is free). From zero, scikit-learn needs ~3,600 iterations
    # (a minute) on these raw features at the small penalties chosen here, and its own stopping rule
    # (relative decrease per step) can leave it short of the optimum by more than ours is
    from sklearn.linear_model import LogisticRegression

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        cached(tmp_path / "cache", s) for s in ("train", "val", "test")
    )
    if record["linear"].get("standardize", False):
        mean, std = train_x.double().mean(0), train_x.double().std(0) + 1e-8
    else:
        mean, std = 0.0, 1.0
    x, y = (torch.cat([train_x, val_x]).double() - mean) / std, torch.cat([train_y, val_y])
    scaled_test = (test_x.double() - mean) / std
    weight, bias = fit_logistic(x, y, 10, penalty)
    ours = 100 * ((scaled_test @ weight.T + bias).argmax(1) == test_y).double().mean().item()
    assert record["metrics"]["linear.top1"] == pytest.approx(ours, abs=1e-9)

    def objective(w, b):
        w, b = torch.as_tensor(w, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        return (
            torch.nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * penalty * w.square().sum()
        ).item()

    model = LogisticRegression(
        C=1 / (penalty * len(x)), max_iter=20_000, tol=1e-10, warm_start=True
    )
    model.coef_ = (weight - weight.mean(0)).numpy().copy()
    model.intercept_ = (bias - bias.mean()).numpy().copy()
    model.fit(x.numpy(), y.numpy())
    assert model.n_iter_[0] < 20_000
    assert objective(weight, bias) <= objective(model.coef_, model.intercept_) * (1 + 1e-8)
    theirs = 100 * (model.predict(scaled_test.numpy()) == test_y.numpy()).mean()
    assert ours == pytest.approx(theirs, abs=1.0)
    # fine-tuning: both lrs scored on val, the best retrained on train + val and scored on test
    validation = record["finetune"]["validation"]
    assert set(validation) == {"lr0.05_ep1_wd0", "lr0.01_ep1_wd0"}
    best = max(validation, key=lambda tag: (validation[tag], tag == "lr0.05_ep1_wd0"))
    assert f"lr{record['finetune']['chosen']['lr']:g}_ep1_wd0" == best
    assert (tmp_path / "run" / "finetune" / f"refit_{best}.pt").exists()
    assert 0 <= record["metrics"]["finetune.top1"] <= 100
    rerun = run_task(
        "classify",
        "random:resnet18",
        "ema",
        CONFIG,
        [f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}", *SMALL],
    )
    assert rerun["metrics"] == record["metrics"]


def test_voc2007_linear_transfer_is_one_binary_classifier_per_class_scored_by_11_point_map(
    tmp_path,
):
    classify_layouts.voc2007(tmp_path / "voc")
    record = run_task(
        "classify",
        "random:resnet18",
        "ema",
        CONFIG,
        [
            f"run_dir={tmp_path / 'run'}",
            f"cache_dir={tmp_path / 'cache'}",
            "data.dataset=voc2007",
            f"data.root={tmp_path / 'voc'}",
            "protocols=[linear]",
            "images.size=16",
            "linear.max_iter=50",
        ],
    )
    assert set(record["metrics"]) == {"linear.voc07_map"}
    _, test_y = cached(tmp_path / "cache", "test")
    assert test_y.dim() == 2 and test_y.shape[1] == 20
    # ties ranked in order
    chance = voc07_map(torch.zeros(test_y.shape, dtype=torch.float64), test_y)
    assert 0 <= record["metrics"]["linear.voc07_map"] <= 100 and chance >= 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.dataset=imagenet", r"data.dataset.*food101, cifar10"),
        ("data.val_fraction=1.0", r"data.val_fraction"),
        ("protocols=[svm]", r"protocols.*linear or finetune"),
    ],
)
def test_bad_classify_input_is_one_line_and_writes_nothing(tmp_path, override, message):
    with pytest.raises(UserError, match=message) as caught:
        run_task(
            "classify", "random:resnet18", "ema", CONFIG, [f"run_dir={tmp_path / 'run'}", override]
        )
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_dataset_missing_its_standard_validation_split_is_refused_before_anything_is_written(
    tmp_path,
):
    classify_layouts.flowers102(tmp_path / "flowers")
    setid = tmp_path / "flowers" / "flowers-102" / "setid.mat"
    import scipy.io

    ids = scipy.io.loadmat(setid)
    scipy.io.savemat(setid, {"trnid": ids["trnid"], "tstid": ids["tstid"]})  # no valid
    with pytest.raises(UserError, match="validation") as caught:
        run_task(
            "classify",
            "random:resnet18",
            "ema",
            CONFIG,
            [
                f"run_dir={tmp_path / 'run'}",
                "data.dataset=flowers102",
                f"data.root={tmp_path / 'flowers'}",
            ],
        )
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()
    assert np.asarray(ids["valid"]).size  # the fixture did have one


def test_binary_logistic_per_class_equals_scikit_learn_one_class_at_a_time_leaving_difficult_entries_out():
    from sklearn.linear_model import LogisticRegression

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=generator, dtype=torch.float64)
    scores = x @ torch.randn(6, 3, generator=generator, dtype=torch.float64)
    targets = torch.where(scores > 0, 1, -1)
    targets[torch.rand(120, 3, generator=generator) < 0.15] = 0  # 'difficult'
    penalty = 0.05
    weight, bias = fit_binary_logistic(x, targets, penalty)
    for c in range(3):
        known = targets[:, c] != 0
        reference = LogisticRegression(
            C=1 / (penalty * int(known.sum())), tol=1e-12, max_iter=10_000
        ).fit(x[known].numpy(), (targets[known, c] > 0).numpy())
        np.testing.assert_allclose(weight[c].numpy(), reference.coef_[0], rtol=1e-4, atol=1e-6)
        assert bias[c].item() == pytest.approx(reference.intercept_[0], abs=1e-5)
