"""The main job: pretraining -> export + verification -> every transfer task on the pretrained backbone and on
the same network at random init -> the report. Every step runs as a submitit job (the local executor by
default, one job at a time); a rerun skips the steps whose results exist.

Layout under `root`: pretrain/, scenes/, export/, <task>/<pretrained|random>/seed<k>/, report/.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.checks import NON_NEGATIVE, Rule, checked, each, existing_file, one_of
from pretrain.errors import UserError
from transfer.tasks import TASKS


def _task_files(value) -> bool:
    return isinstance(value, dict) and all(task in TASKS and Path(path).is_file() for task, path in value.items())


def _scene_sizes(value) -> bool:
    return (isinstance(value, dict) and set(value) == {"train", "test", "size", "seed"}
            and all(isinstance(v, int) for v in value.values())
            and value["train"] >= 1 and value["test"] >= 1 and value["size"] >= 32 and value["seed"] >= 0)


TASK_FILES = Rule(f"a mapping of tasks ({', '.join(TASKS)}) to existing config files", _task_files)
TASK_OVERRIDES = Rule(f"a mapping of tasks ({', '.join(TASKS)}) to lists of key=value",
                      lambda v: isinstance(v, dict) and all(t in TASKS and isinstance(o, list) for t, o in v.items()))
SCENE_SIZES = Rule("{train: >= 1, test: >= 1, size: >= 32, seed: >= 0}", _scene_sizes)


@dataclass
class PipelineConfig:
    root: str = "runs/demo"
    executor: str = checked("configs/slurm/local.yaml", existing_file())
    executor_overrides: list = field(default_factory=list)
    pretrain_config: str = checked("configs/pretrain/fashion_mnist_resnet18.yaml", existing_file())
    pretrain_overrides: list = field(default_factory=list)
    scenes: dict = checked({"train": 200, "test": 50, "size": 128, "seed": 0}, SCENE_SIZES)
    tasks: dict = checked({
        "linear": "configs/transfer/linear_fashion_mnist.yaml", "knn": "configs/transfer/linear_fashion_mnist.yaml",
        "segmentation": "configs/transfer/segmentation_scenes.yaml",
        "detection": "configs/transfer/detection_scenes.yaml", "depth": "configs/transfer/depth_scenes.yaml"},
        TASK_FILES)
    task_overrides: dict = checked({}, TASK_OVERRIDES)      # task -> [key=value, ...]
    seeds: list = checked([0], each(NON_NEGATIVE))
    weights: str = checked("ema", one_of("ema", "online", "target"))  # which network the tasks evaluate
    use_scenes: bool = True                               # generate scenes and point the dense tasks at them


def scene_overrides(task: str, scenes: Path) -> list[str]:
    """Point a scenes-based task config at the pipeline's own generated scenes."""
    coco = scenes / "coco"
    return {"segmentation": [f"data.root={scenes / 'voc' / 'VOC2012'}"],
            "detection": [f"data.train_json={coco / 'annotations' / 'instances_train.json'}",
                          f"data.train_images={coco / 'train'}",
                          f"data.test_json={coco / 'annotations' / 'instances_val.json'}",
                          f"data.test_images={coco / 'val'}"],
            "depth": [f"data.root={scenes / 'nyu'}"]}.get(task, [])


class Pipeline:
    def __init__(self, config: PipelineConfig, dry_run: bool = False):
        from slurm.executor import load_executor_config
        self.config = config
        self.root = Path(config.root)
        self.executor_config = load_executor_config(config.executor, list(config.executor_overrides))
        self.executor_config.folder = str(self.root / "jobs")
        self.timings: dict[str, float] = {}
        self.dry_run = dry_run

    def _job(self, name: str, step: str, argv: list[str], done: Path | None) -> None:
        """Run one step as a job and wait for it; skip it when `done` exists."""
        from slurm.executor import build_executor, describe, report_failure
        from slurm.jobs import StepJob
        if self.dry_run:
            for line in describe(self.executor_config, name, step, argv).splitlines():
                print(f"[pipeline] {line}")
            return
        if done is not None and done.exists():
            print(f"[pipeline] {name}: done before, skipped")
            return
        started = time.time()
        job = build_executor(self.executor_config).submit(StepJob(step, argv, self.executor_config.signal_delay_s))
        print(f"[pipeline] {name}: job {job.job_id} ({self.executor_config.cluster})", flush=True)
        try:
            job.result()
        except Exception:
            raise UserError(f"pipeline step {name} failed: " + report_failure(job).replace("\n", " |")) from None
        self.timings[name] = time.time() - started
        print(f"[pipeline] {name}: finished in {self.timings[name]:.0f} s", flush=True)

    def run(self) -> dict:
        c, root = self.config, self.root
        started = time.time()
        pretrain_dir = root / "pretrain"
        self._job("pretrain", "pretrain", ["--config", c.pretrain_config, f"run_dir={pretrain_dir}",
                                           *c.pretrain_overrides], pretrain_dir / "metrics.json")
        checkpoint = pretrain_dir / "checkpoints" / "last.pt"
        s = c.scenes
        scenes = root / "scenes"
        if c.use_scenes:
            self._job("scenes", "scenes", ["--out", str(scenes), "--train", str(s["train"]), "--test",
                                           str(s["test"]), "--size", str(s["size"]), "--seed", str(s["seed"])],
                      scenes / "classes.json")
        export_dir = root / "export"
        self._job("export", "export", ["--checkpoint", str(checkpoint), "--format", "all", "--out", str(export_dir),
                                       "--weights", c.weights], export_dir / f"backbone_{c.weights}.pkl.json")
        self._job("verify", "verify", ["--checkpoint", str(checkpoint), "--weights", c.weights],
                  root / "export" / "verified")
        if self.dry_run:
            arch = "ARCH"
        else:
            (root / "export" / "verified").touch()
            arch = json.loads((export_dir / f"backbone_{c.weights}.pkl.json").read_text())["arch"]
        run_dirs = [pretrain_dir]
        for task, task_config in c.tasks.items():
            for kind, backbone in (("pretrained", str(checkpoint)), ("random", f"random:{arch}")):
                for seed in c.seeds:
                    run_dir = root / task / kind / f"seed{seed}"
                    argv = ["--backbone", backbone, "--weights", c.weights, "--config", task_config,
                            f"run_dir={run_dir}", f"seed={seed}",
                            *(scene_overrides(task, scenes) if c.use_scenes else []),
                            *c.task_overrides.get(task, [])]
                    self._job(f"{task}/{kind}/seed{seed}", task, argv, run_dir / "metrics.json")
                    run_dirs.append(run_dir)
        if self.dry_run:
            return {}
        from transfer.report import build_report
        report = build_report(run_dirs, root / "report")
        total = time.time() - started
        timing = {"total_s": round(total, 1), **{k: round(v, 1) for k, v in self.timings.items()}}
        (root / "report" / "timings.json").write_text(json.dumps(timing, indent=2))
        print(f"[pipeline] done in {total / 60:.1f} min; report: {root / 'report' / 'report.md'}")
        return report
