"""python -m transfer pipeline --config FILE [key=value ...]: pretrain -> export -> all tasks -> report."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The demo: configs/pipeline/demo.yaml (Fashion-MNIST pretraining, generated scenes, local jobs).\n"
                     "On a cluster: configs/pipeline/imagenet_cluster.yaml. Keys: transfer/pipeline.py (PipelineConfig).")
    parser.add_argument("--config", metavar="FILE", help="pipeline YAML")
    parser.add_argument("--dry-run", action="store_true", help="print each job (and its sbatch flags) only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


def run(args: argparse.Namespace) -> None:
    from pretrain.config import load_config
    from transfer.pipeline import Pipeline, PipelineConfig
    Pipeline(load_config(PipelineConfig, args.config, args.overrides), dry_run=args.dry_run).run()
