"""Run-dir bookkeeping shared by pretraining and the tasks: the config guard, the log, the cosine
schedule and the
resumable state."""

import logging
import math

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import UserError
from common.rundir import Progress, attach_log, detach_log, refuse_other_config, start_run_dir
from common.schedule import cosine_schedule


def test_cosine_schedule_follows_its_formula_and_stays_at_zero_after_the_end():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    schedule = cosine_schedule(optimizer, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [0.4 * 0.5 * (1 + math.cos(math.pi * min(k, 10) / 10)) for k in range(12)]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[5] == pytest.approx(0.2) and seen[10] == seen[11] == pytest.approx(0.0, abs=1e-12)


def test_progress_restores_what_it_saved_into_new_objects(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = cosine_schedule(optimizer, 5)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    schedule.step()
    Progress(
        tmp_path / "state.pt", "epoch", model=model, optimizer=optimizer, schedule=schedule
    ).save(7)

    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    fresh_schedule = cosine_schedule(fresh_optimizer, 5)
    saved = Progress(
        tmp_path / "state.pt",
        "epoch",
        model=fresh,
        optimizer=fresh_optimizer,
        schedule=fresh_schedule,
    )
    assert saved.restore() == 7
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
    )
    assert (
        fresh_schedule.last_epoch == 1
        and fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    )
    assert Progress(tmp_path / "absent.pt", model=fresh).restore() == 0


def test_another_config_is_refused_naming_the_keys_and_allowed_changes_pass(tmp_path):
    config = OmegaConf.create(
        {"run_dir": str(tmp_path), "seed": 0, "optim": {"lr": 0.1, "workers": 2}}
    )
    start_run_dir(tmp_path, config)
    refuse_other_config(
        tmp_path, OmegaConf.merge(config, {"optim": {"workers": 8}}), {"optim.workers"}
    )
    with pytest.raises(
        UserError, match=r"holds a depth run of another config \(differs at optim.lr, seed\)"
    ):
        refuse_other_config(
            tmp_path, OmegaConf.merge(config, {"seed": 1, "optim": {"lr": 0.2}}), set(), "depth"
        )
    start_run_dir(tmp_path, OmegaConf.merge(config, {"seed": 5}))  # config.yaml is written once
    assert OmegaConf.load(tmp_path / "config.yaml").seed == 0


def test_the_log_goes_to_the_run_dir_with_one_console_and_is_detached(tmp_path):
    logger = logging.getLogger("test_rundir")
    handlers = [
        attach_log(logger, tmp_path / name)
        for name in ("a", "b")
        if (tmp_path / name).mkdir() is None
    ]
    logger.info("hello")
    for handler in handlers:
        detach_log(logger, handler)
    logger.info("not logged")
    for name in ("a", "b"):
        text = (tmp_path / name / "log.txt").read_text()
        assert text.count("hello") == 1 and "not logged" not in text
    consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    assert len(consoles) == 1  # attaching twice adds no second console
