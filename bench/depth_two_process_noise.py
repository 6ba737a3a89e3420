"""How far 2 processes end from 1 process in the depth task, against how far a real bug would put
them: the measurement behind
tests/test_transfer_distributed.py::test_depth_on_two_processes_follows_one_process.

    .venv/bin/python bench/depth_two_process_noise.py
    env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2 OPENBLAS_CORETYPE=Haswell \
        .venv/bin/python bench/depth_two_process_noise.py      # the AVX2 kernels

For 1, 2 and 3 steps, prints the relative difference from 1 process of rms / rel / log10 for 2
processes (float noise) and for 1 process on half the batch (what a rank that skipped the all-reduce
would compute). About 2 min."""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_transfer_distributed import run_processes  # noqa: E402
from transfer.scenes import write_all  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="depth-noise-"))
    write_all(work / "scenes", 16, 6, 64, 3)

    def args(folder: Path, steps: int, batch: int) -> list[str]:
        return [
            "depth",
            "--backbone",
            "random:resnet18",
            "--config",
            "configs/transfer/depth_scenes.yaml",
            f"run_dir={folder}",
            f"data.root={work / 'scenes' / 'nyu'}",
            "data.resize=[64,64]",
            "data.crop=[64,64]",
            f"batch_size={batch}",
            "data.num_workers=0",
            f"steps={steps}",
            f"log_every={steps}",
        ]

    for steps in (1, 2, 3):
        metrics = {}
        for name, world, batch in (("one", 1, 4), ("two", 2, 4), ("half", 1, 2)):
            folder = work / f"{name}{steps}"
            results = run_processes(args(folder, steps, batch), world)
            if any(r.returncode for r in results):
                raise SystemExit(results[0].stderr[-2000:])
            metrics[name] = json.loads((folder / "metrics.json").read_text())["metrics"]
        for name in ("two", "half"):
            shown = ", ".join(
                f"{k} {abs(metrics[name][k] - v) / abs(v):.1e}"
                for k, v in metrics["one"].items()
                if k in ("rms", "rel", "log10")
            )
            print(f"{steps} steps, {name}: {shown}")


if __name__ == "__main__":
    main()
