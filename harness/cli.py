"""Command line: ``harness train RECIPE [key=value ...]`` (also ``python -m harness``).

Exit codes: 0 done; 1 training failed; 2 bad recipe, override or arguments; 3 unusable checkpoint;
75 stopped on a preemption signal after saving a checkpoint (requeue to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_CHECKPOINT = 3
EXIT_PREEMPTED = 75  # saved a checkpoint on SIGTERM/SIGUSR1: requeue to resume

EPILOG = """examples:
  python -m harness train recipes/breast_cancer_mlp.yaml
  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m harness train recipes/gcn_plateau.yaml optim.lr=0.005
  torchrun --standalone --nproc_per_node 2 -m harness train recipes/gnn_graphs.yaml train.epochs=5

exit codes: 0 done, 1 training failed, 2 bad recipe/override/arguments, 3 unusable checkpoint,
            75 saved a checkpoint on a preemption signal (SIGTERM/SIGUSR1): requeue to resume
"""


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format=f"[harness{'' if rank == 0 else f' rank {rank}'}] %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe", formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=EPILOG, description="Train RECIPE; key=value pairs override recipe keys.")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/breast_cancer_mlp.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005 schedule.name=cosine")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging()
    from harness.checkpoint import CheckpointError
    from harness.preemption import Preempted
    from harness.config import ConfigError, load_config

    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.command == "train":
            from harness.loop import train

            train(cfg)
    except ConfigError as exc:
        print(f"harness: config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Preempted:
        from harness.distributed import shutdown_process_group

        shutdown_process_group(exit_code=EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except CheckpointError as exc:
        print(f"harness: checkpoint error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    return EXIT_OK
