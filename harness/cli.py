"""Command line: ``harness COMMAND ...`` (also ``python -m harness``).

  train          train a recipe
  check          validate a recipe and preview its planned run and LR curve, without training
  ckpt           list a run's checkpoints, or inspect one (verified against its manifest)
  plot-lr        plot a run's logged LR per param group and its losses, marking resume points
  verify-resume  run a recipe straight and killed+resumed, and compare the two bitwise
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from harness.exit_codes import EXIT_INTERRUPTED

EPILOG = """examples:
  python -m harness train recipes/breast_cancer_mlp.yaml
  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m harness train recipes/gcn_plateau.yaml optim.lr=0.005
  torchrun --standalone --nproc_per_node 2 -m harness train recipes/gnn_graphs.yaml train.epochs=5
  harness check recipes/gnn_graphs.yaml --world-size 4
  harness ckpt list runs/breast_cancer_mlp
  harness ckpt inspect runs/breast_cancer_mlp/checkpoints/step-000750
  harness plot-lr runs/breast_cancer_mlp
  harness verify-resume recipes/breast_cancer_mlp.yaml

exit codes:
  0   done (train), recipe valid (check), checkpoints verified (ckpt), plot written, PASS (verify-resume)
  1   training failed (train); the runs differ or one failed: FAIL (verify-resume)
  2   bad recipe, override, argument or path; an unusable schedule (check); warnings with check --strict;
      the run folder is in use by another run (train)
  3   unusable checkpoint (train); a checkpoint that does not verify, or none found (ckpt)
  4   a checkpoint could not be written: disk full, quota, read-only, permission (train); the
      partial save is removed, earlier checkpoints are kept: run again to resume
  75  saved a checkpoint on a preemption signal (SIGTERM/SIGUSR1): requeue to resume (train)
  130 Ctrl-C: saved a checkpoint, run the same command to resume; a second Ctrl-C aborts without one
"""

TRAIN_EPILOG = """examples:
  python -m harness train recipes/breast_cancer_mlp.yaml
  accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m harness train recipes/gcn_plateau.yaml optim.lr=0.005
  torchrun --standalone --nproc_per_node 2 -m harness train recipes/gnn_graphs.yaml train.epochs=5

exit codes: 0 done, 1 training failed, 2 bad recipe/override/arguments or the run folder in use
            by another run, 3 unusable checkpoint, 4 a checkpoint could not be written (disk full,
            quota, read-only, permission: earlier ones are kept, run again to resume),
            75 saved a checkpoint on a preemption signal (SIGTERM/SIGUSR1): requeue to resume,
            130 Ctrl-C: saved a checkpoint, run the same command to resume (a second Ctrl-C aborts
            without one)
Under torchrun / accelerate launch the ranks also save and exit when the launcher dies.
"""

CHECK_EPILOG = """Builds the data, the model and the optimizer as training would (no Accelerator, no
processes, nothing written but the PNG) and prints: parameters per param group, samples per rank
for --world-size ranks, steps per epoch, total steps, and the planned LR of every param group at
the first steps, epoch starts and the last step. Warns when a schedule's own horizon (OneCycle
total_steps, cosine T_max, polynomial total_iters, lambda total, ...) does not match the planned run.

examples:
  harness check recipes/breast_cancer_mlp.yaml
  harness check recipes/gnn_graphs.yaml schedule.name=onecycle schedule.total_steps=400 --world-size 4
  harness check recipes/gcn_plateau.yaml --png /tmp/plateau_lr.png

exit codes: 0 valid, 2 bad recipe/override, a schedule that fails inside the planned run, or
            (with --strict) any warning
"""

CKPT_EPILOG = """examples:
  harness ckpt list runs/breast_cancer_mlp
  harness ckpt inspect runs/breast_cancer_mlp/checkpoints/step-000750
  harness ckpt export runs/breast_cancer_mlp model.safetensors

exit codes: 0 every checkpoint verified (list) / the checkpoint verified (inspect) / written (export),
            3 one does not verify against its MANIFEST.json, or none found, 2 no such folder
"""

PLOT_EPILOG = """Reads <RUN_DIR>/tb (what rank 0 logged): lr/<group> per optimizer step on the left,
train/loss, train/loss_epoch and val/loss on the right. Dashed red lines mark resume points: each
process writes its own event file, and a resumed one starts logging at the step after its checkpoint.

examples:
  harness plot-lr runs/breast_cancer_mlp
  harness plot-lr runs/gcn_plateau --out gcn_lr.png --log-lr

exit codes: 0 written, 2 no such run folder / nothing logged / matplotlib missing
"""

VERIFY_EPILOG = """Three runs in a work folder, each --steps optimizer steps long (train.max_steps), with
checkpoint.every_steps set so a mid-epoch checkpoint exists before the kill:
  1. uninterrupted;
  2. the same command killed with SIGKILL (launcher and every rank) after step --kill-at;
  3. the same command again in that folder: it resumes from the newest checkpoint.
Then compares the final weights (final/model.safetensors, bitwise) and every logged series (LR,
losses, metrics; read back from TensorBoard) and reports PASS or FAIL with the first difference.

Self-test: --break KEY=VALUE adds an override to the resumed run only, so the runs really differ
and verify-resume must say FAIL. A changed recipe is refused by the resumed run itself (exit 3:
the recipe differs from the checkpoint's), reported as FAIL; to see the difference it makes in
the series, allow it too: --break run.seed=1 --break run.on_change=allow (a data order that is not
reproducible across restarts).

examples:
  harness verify-resume recipes/breast_cancer_mlp.yaml
  harness verify-resume recipes/gnn_graphs.yaml --nproc 2 --steps 60
  harness verify-resume recipes/gcn_plateau.yaml schedule.patience=1 --workdir /tmp/vr --keep
  harness verify-resume recipes/breast_cancer_mlp.yaml --break run.seed=1     # must FAIL (refused)

exit codes: 0 PASS, 1 FAIL (a difference, or a run failed), 2 bad recipe/override/arguments
"""


def _command(sub, name: str, help_text: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/breast_cancer_mlp.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.005 schedule.name=cosine")


def _world_size_from_env() -> int:
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _command(sub, "train", "train a recipe", "Train RECIPE; key=value pairs override recipe keys.",
                     TRAIN_EPILOG)
    _recipe_arguments(train)

    check = _command(sub, "check", "validate a recipe, preview its planned run and LR curve (no training)",
                     "Validate RECIPE and preview the planned run without training.", CHECK_EPILOG)
    _recipe_arguments(check)
    check.add_argument("--world-size", type=int, default=_world_size_from_env(),
                       help="ranks to split batches across (default: $WORLD_SIZE, else 1)")
    check.add_argument("--png", type=Path, default=Path("lr_preview.png"),
                       help="where to write the LR preview plot (default: lr_preview.png)")
    check.add_argument("--no-png", action="store_true", help="do not write the plot")
    check.add_argument("--strict", action="store_true", help="exit 2 when there are warnings")

    ckpt = _command(sub, "ckpt", "list a run's checkpoints or inspect one",
                    "List a run's checkpoints, or inspect one, verifying them against their manifests.", CKPT_EPILOG)
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="{list,inspect,export}")
    listing = _command(ckpt_sub, "list", "every checkpoint of a run: step, epoch, LRs, metric, verified",
                       "Every checkpoint of RUN_DIR (and any interrupted save), oldest first.", CKPT_EPILOG)
    listing.add_argument("run_dir", type=Path, help="a run folder (run.output_dir), or its checkpoints/ folder")
    inspect = _command(ckpt_sub, "inspect", "one checkpoint in detail, verified against its manifest",
                       "Files, counters, LRs per param group, metric, world size, versions and the manifest "
                       "check of one checkpoint folder.", CKPT_EPILOG)
    inspect.add_argument("checkpoint", type=Path, help="a checkpoint folder, e.g. runs/x/checkpoints/step-000120")
    export = _command(ckpt_sub, "export", "one full model file from a checkpoint, sharded (FSDP) or not",
                      "Write the model weights of CHECKPOINT (verified first) as one safetensors file, loadable "
                      "with safetensors.torch.load_file alone.", CKPT_EPILOG)
    export.add_argument("checkpoint", type=Path, help="a checkpoint folder, or a run folder (its newest complete one)")
    export.add_argument("out", type=Path, help="the .safetensors file to write (not overwritten if it exists)")

    plot = _command(sub, "plot-lr", "plot a run's LR per param group and its losses (PNG)",
                    "Plot the LR of every param group of RUN_DIR against the optimizer step, losses beside it.",
                    PLOT_EPILOG)
    plot.add_argument("run_dir", type=Path, help="a run folder (run.output_dir)")
    plot.add_argument("--out", type=Path, help="PNG to write (default: <RUN_DIR>/lr.png)")
    plot.add_argument("--log-lr", action="store_true", help="logarithmic LR axis")

    verify = _command(sub, "verify-resume", "check that a SIGKILL + resume reproduces an uninterrupted run bitwise",
                      "Run RECIPE briefly straight through, then killed with SIGKILL mid-epoch and resumed; "
                      "compare final weights and every logged series.", VERIFY_EPILOG)
    _recipe_arguments(verify)
    verify.add_argument("--steps", type=int, help="optimizer steps per run (default: about 3 epochs, at least 20, "
                                                  "at most the planned run)")
    verify.add_argument("--checkpoint-every", type=int, help="checkpoint.every_steps (default: a third into the "
                                                             "epoch holding the middle of the run)")
    verify.add_argument("--kill-at", type=int, help="SIGKILL after this optimizer step (default: a few steps "
                                                    "after the checkpoint, in the same epoch)")
    verify.add_argument("--nproc", type=int, default=1,
                        help="processes; >1 runs through accelerate launch --config_file LAUNCH_CONFIG")
    verify.add_argument("--launch-config", type=Path, default=None,
                        help="accelerate config for --nproc > 1 (default: recipes/accelerate/cpu_2proc.yaml)")
    verify.add_argument("--workdir", type=Path, help="folder for the runs (new or empty; default: a temporary "
                                                     "folder, deleted after a PASS)")
    verify.add_argument("--keep", action="store_true", help="keep the temporary work folder after a PASS")
    verify.add_argument("--break", dest="break_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="self-test: an override for the resumed run only; verify-resume must then FAIL")
    verify.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but key=value overrides may also follow the options
    (``harness check RECIPE --world-size 4 optim.lr=0.01``): argparse alone stops the positional
    list at the first option and would reject the rest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def entry() -> None:
    """The ``harness`` console script and ``python -m harness``: main(), then end the process."""
    end_process(main())


def end_process(code: int) -> NoReturn:
    """End a ``harness`` process with ``code``. After a process group (harness.distributed imported:
    a training command ran), through harness.distributed.end_rank_process, without Python's
    finalization; main() itself returns, so that code calling it (several trainings in one
    process, as the tests do) goes on."""
    distributed = sys.modules.get("harness.distributed")
    if distributed is not None:
        code = distributed.end_rank_process(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    try:
        # Here, not at the top: `harness --help` and a bad argument answer without importing torch.
        from harness import commands
    except KeyboardInterrupt:  # a Ctrl-C while torch is imported is an interruption, not a traceback
        print("harness: interrupted by Ctrl-C", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    return commands.run(args)


