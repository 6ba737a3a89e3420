"""The layout's rules: imports in one direction, each framework's glue in one module, one task
registry that every
entry point reads, and every shipped config loads against its schema."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.config import load_config
from common.errors import UserError
from pretrain.schema import PretrainConfig
from slurm.executor import ExecutorConfig
from slurm.pipeline import PipelineConfig
from slurm.steps import steps
from slurm.sweep import SweepConfig, plan
from tests.helpers import ROOT
from transfer.__main__ import commands
from transfer.report import metric_info
from transfer.tasks import TASKS, default_task_files, task_of
from transfer.tasks.contract import TaskConfig

PACKAGES = ("common", "pretrain", "transfer", "slurm")
# package -> the project packages it must not import: slurm -> transfer -> pretrain -> common, none
# back up
FORBIDDEN = {
    "common": {"pretrain", "transfer", "slurm"},
    "pretrain": {"transfer", "slurm"},
    "transfer": {"slurm"},
    "slurm": set(),
}
# third-party framework -> the only module allowed to import it
FRAMEWORK_HOMES = {
    "detectron2": "transfer/detectron2_glue.py",
    "mmseg": "transfer/mmseg_glue.py",
    "mmengine": "transfer/mmseg_glue.py",
    "mmcv": "transfer/mmseg_glue.py",
}
SUBMITIT_PACKAGE = "slurm"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, module level and inside functions, plus
    importlib.import_module("...") calls with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(
                (node.lineno, path.parent.relative_to(ROOT).parts[0] + "." + (node.module or ""))
            )
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def project_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_the_parser_sees_function_level_and_dynamic_imports(tmp_path):
    source = "import os\n\ndef f():\n    from slurm.jobs import StepJob\n    importlib.import_module('transfer.x')\n"
    tree_file = tmp_path / "probe.py"
    tree_file.write_text(source)
    assert [m for _, m in imported_modules(tree_file)] == ["os", "slurm.jobs", "transfer.x"]


def test_imports_run_in_one_direction_only():
    arrows = []
    for path in project_modules():
        package = path.relative_to(ROOT).parts[0]
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            if top in FORBIDDEN[package]:
                arrows.append(where)
            if top == "submitit" and package != SUBMITIT_PACKAGE:
                arrows.append(where + " (submitit belongs to slurm/)")
            home = FRAMEWORK_HOMES.get(top)
            if home and str(path.relative_to(ROOT)) != home:
                arrows.append(where + f" ({top} glue belongs in {home})")
    assert not arrows, "imports against the layering rule:\n" + "\n".join(arrows)


def test_importing_the_core_and_the_registry_stays_light():
    code = (
        "import sys, pretrain, pretrain.trainer, pretrain.hsic, transfer.tasks, transfer.runner; "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'mmseg', 'mmengine', 'mmcv', "
        "'detectron2', "
        "'submitit', 'slurm'}); print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_registered_task_is_complete_and_reachable_from_every_entry_point():
    """Each registry line names a module with the contract (a Config on the shared base, EXAMPLES,
    prepare and its run function), an existing default config that loads, scene keys its schema has,
    and metrics the
    report sees improve downwards; every entry point and the pipeline's defaults reach every task.
    """

    for name, task in TASKS.items():
        module = task.load()
        for attribute in ("Config", "EXAMPLES", "prepare"):
            assert hasattr(module, attribute), f"task module {task.module} has no {attribute}"
        assert callable(task.runner()), f"task {name}: {task.module} has no {task.entry}"
        assert issubclass(module.Config, TaskConfig), (
            f"task {name}: its Config does not extend TaskConfig"
        )
        # <task>_...: the task whose schema reads it
        prefix = Path(task.config_file).name.split("_")[0]
        assert prefix in TASKS and TASKS[prefix].module == task.module, task.config_file
        config = load_config(module.Config, ROOT / task.config_file)
        for key in task.scenes:
            assert OmegaConf.select(config, key) is not None, (
                f"task {name}: no config key {key} for the scenes"
            )
        assert all(metric_info(metric).lower_is_better for metric in task.lower_is_better)
    assert set(TASKS) <= set(commands()) and set(TASKS) <= set(steps())
    assert PipelineConfig().tasks == default_task_files()
    assert {task_of(key) for key in PipelineConfig().tasks} == set(TASKS)


def test_an_unknown_task_is_refused_by_the_sweep_and_the_pipeline(tmp_path):

    with pytest.raises(
        UserError, match="unknown sweep tasks \\['segmentaion'\\]; choose from linear, knn"
    ):
        plan(SweepConfig(backbones=["random:resnet18"], tasks={"segmentaion": "x.yaml"}))


def schema_of(path: Path):
    """The schema a shipped YAML is written against, from its folder (and, for transfer, its task
    prefix)."""

    kind = path.parent.name
    if kind == "transfer":
        task = path.stem.split("_")[0]
        assert task in TASKS, (
            f"{path.name}: transfer configs are named <task>_..., with a task of {list(TASKS)}"
        )
        return TASKS[task].load().Config
    return {"pretrain": PretrainConfig, "slurm": ExecutorConfig, "pipeline": PipelineConfig}[kind]


SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", SHIPPED, ids=[str(p.relative_to(ROOT / "configs")) for p in SHIPPED]
)
def test_every_shipped_config_loads_against_its_schema(path):

    config = load_config(schema_of(path), path)
    assert OmegaConf.to_container(config)
    # the files it names load against theirs, with the pipeline's overrides
    if path.parent.name == "pipeline":
        for key, task_config in config.tasks.items():
            load_config(
                TASKS[task_of(key)].load().Config,
                ROOT / task_config,
                list(config.task_overrides.get(key, [])),
            )


# Documents beside the checkout that a user who clones the project does not have; spelled in parts
# so that this file does not cite them itself.
OUTSIDE = ("../" + "shared", "SPEC" + ".md", "DESIGN" + ".md", "BASELINES" + ".md")


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = [
        name
        for name in tracked
        if Path(name).suffix in (".py", ".md", ".yaml", ".sh", ".toml", ".txt", ".ini")
        and any(marker in (ROOT / name).read_text(errors="replace") for marker in OUTSIDE)
    ]
    assert not outside, f"files that cite documents outside the repository: {outside}"


def test_the_slurm_tests_share_one_xdist_worker(tmp_path):
    """The suite's grouping holds on the installed pytest and pytest-xdist: tests on the session's
    SLURM cluster, in two modules, all run on one worker (one cluster), while the others spread
    (constraints.txt pins pytest for
    this)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\nfrom tests.conftest import pytest_collection_modifyitems  # noqa: F401 "
        "(the grouping)\n\n"
        "@pytest.fixture(scope='session')\ndef slurm_cluster():\n    return None\n"
    )
    body = "import os\nimport time\n\n" + "".join(
        f"def test_{i}({'slurm_cluster' if i < 3 else ''}):\n    time.sleep(0.3)\n"
        f"    with open({str(tmp_path / 'workers.txt')!r}, 'a') as f:\n"
        f"        f.write(f\"{{__name__}}.{i} {{os.environ['PYTEST_XDIST_WORKER']}}\\n\")\n"
        for i in range(6)
    )
    for module in ("test_one", "test_two"):
        (tmp_path / f"{module}.py").write_text(body)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-n",
            "2",
            "--dist",
            "loadgroup",
            "-p",
            "no:cacheprovider",
            "-q",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ran = dict(line.split() for line in (tmp_path / "workers.txt").read_text().splitlines())
    assert len(ran) == 12
    assert len({worker for test, worker in ran.items() if int(test.split(".")[-1]) < 3}) == 1
    assert len(set(ran.values())) == 2
