"""What each ``harness`` command does (the command line, harness/cli.py, only parses), and the
mapping of the harness's failures to exit codes (also for harness.train())."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from harness import checkpoint as ckpt
from harness.checkpoint import CheckpointError, CheckpointSaveError, EndFilesError
from harness.components import UserCodeError, user_frames
from harness.config import ConfigError, load_config
from harness.distributed import RankDivergence, RankLost, shutdown_process_group
from harness.exit_codes import (EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED,
                                EXIT_SAVE_FAILED)
from harness.inspection import (format_checkpoint, format_checkpoint_list, format_plan, list_checkpoints, plan_run,
                                read_checkpoint)
from harness.items import SampleError
from harness.loop import train
from harness.plots import PlotError, plot_lr_preview, plot_run, run_folder
from harness.preemption import Preempted
from harness.run_lock import RunFolderInUse
from harness.sharding import aliases_metadata, exported
from harness.verify import DEFAULT_LAUNCH_CONFIG, VerifyOptions, verify_resume


def run(args) -> int:
    """Run the parsed command ``args.command``; returns its exit code."""
    setup_logging()
    commands = {"train": run_train, "check": run_check, "ckpt": run_ckpt, "plot-lr": run_plot_lr,
                "verify-resume": run_verify_resume}
    return with_exit_codes(lambda: commands[args.command](args))


def with_exit_codes(command) -> int:
    """Run ``command`` and map the harness's failures to exit codes (also for harness.train())."""
    try:
        return command()
    except KeyboardInterrupt:
        # Training handles Ctrl-C itself (harness.preemption); this is one outside it.
        print("harness: interrupted by Ctrl-C", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"harness: config error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Preempted as exc:
        code = EXIT_INTERRUPTED if exc.interrupted else EXIT_PREEMPTED
        shutdown_process_group(exit_code=code)
        return code
    except RunFolderInUse as exc:  # every rank raises it together
        print(f"harness: run folder in use: {exc}", file=sys.stderr, flush=True)
        _leave_together(EXIT_CONFIG)
        return EXIT_CONFIG
    except CheckpointSaveError as exc:  # every rank raises it together, after the cleanup
        what = "" if isinstance(exc, EndFilesError) else "checkpoint save failed: "
        print(f"harness: {what}{exc}", file=sys.stderr, flush=True)
        _leave_together(EXIT_SAVE_FAILED)
        return EXIT_SAVE_FAILED
    except CheckpointError as exc:
        print(f"harness: checkpoint error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CHECKPOINT
    except RankDivergence as exc:
        print(f"harness: ranks diverged: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except RankLost as exc:
        print(f"harness: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except SampleError as exc:
        print(f"harness: data error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except UserCodeError as exc:
        # Your code failed: your file and line. Before training it is like a bad recipe.
        print(f"harness: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED if exc.while_training else EXIT_CONFIG
    except Exception as exc:
        worker_lost = worker_death_message(exc)
        if worker_lost is not None:
            print(f"harness: data error: {worker_lost}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        # An exception from the user's own code during training shows the user's file and line.
        if not user_frames(exc):
            raise
        print(f"harness: {UserCodeError('training', exc, True)}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def worker_death_message(exc: BaseException):
    """What to say when a DataLoader worker died without an exception of its own (torch reports
    it as "killed by signal: Killed", or, when its watchdog sees the exit first, as "exited
    unexpectedly"), else None."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "DataLoader worker" not in text:
        return None
    advice = ("Lower data.num_workers or data.prefetch_factor, or the memory an item takes.")
    if "signal: Killed" in text:
        return (f"{text}: a DataLoader worker was killed with SIGKILL, most likely by the out-of-memory "
                f"killer. {advice}")
    if "exited unexpectedly" in text:
        return (f"{text}: a DataLoader worker died without an error of its own; SIGKILL from the "
                f"out-of-memory killer is the usual cause (`dmesg` or `journalctl -k` says). {advice}")
    return None


def _leave_together(exit_code: int) -> None:
    """For a failure every rank raised at the same point: wait for each other (30 s at most), deaf
    to SIGTERM, then leave the process group. Otherwise the first rank to exit makes the launcher
    SIGTERM the others while they unwind, and they end with -15 instead of ``exit_code``."""
    if not dist.is_available() or not dist.is_initialized():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # exiting anyway; the launcher SIGKILLs after its timeout

    def barrier() -> None:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: leave anyway
            pass

    waiting = threading.Thread(target=barrier, name="harness-leave", daemon=True)
    waiting.start()
    waiting.join(30.0)
    shutdown_process_group(exit_code=exit_code)


def run_train(args) -> int:
    train(load_config(args.recipe, args.overrides))
    return EXIT_OK


def run_check(args) -> int:
    cfg = load_config(args.recipe, args.overrides)
    plan = plan_run(args.recipe, cfg, args.world_size)
    for line in format_plan(plan):
        print(line)
    if plan.lr_series and not args.no_png:

        title = f"{Path(args.recipe).name}: planned LR ({cfg.schedule.name}, per {cfg.schedule.interval})"
        try:
            path = plot_lr_preview(plan.lr_series, plan.steps_per_epoch, args.png, title,
                                   cfg.schedule.warmup_steps, plan.stop_step)
        except PlotError as exc:
            print(f"harness: check: {exc}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        print(f"LR preview plot: {path}")
    if plan.preview_error or (args.strict and plan.warnings):
        return EXIT_CONFIG
    return EXIT_OK


def run_ckpt(args) -> int:

    if args.ckpt_command == "export":
        return run_ckpt_export(args)
    if args.ckpt_command == "list":
        try:
            reports = list_checkpoints(args.run_dir)
        except FileNotFoundError as exc:
            print(f"harness: ckpt list: {exc}", file=sys.stderr, flush=True)
            return EXIT_CONFIG
        if not reports:
            print(f"harness: ckpt list: no checkpoints in {args.run_dir}", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINT
        for line in format_checkpoint_list(reports):
            print(line)
        return EXIT_OK if all(r.verified for r in reports) else EXIT_CHECKPOINT
    folder = args.checkpoint
    if not folder.is_dir():
        print(f"harness: ckpt inspect: {folder}: no such checkpoint folder", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if (folder / "checkpoints").is_dir():
        print(f"harness: ckpt inspect: {folder} is a run folder; inspect one of its checkpoints "
              f"(harness ckpt list {folder})", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    report = read_checkpoint(folder)
    for line in format_checkpoint(report):
        print(line)
    return EXIT_OK if report.verified else EXIT_CHECKPOINT


def run_ckpt_export(args) -> int:

    folder = args.checkpoint
    if (folder / "checkpoints").is_dir():
        info = ckpt.CheckpointStore(folder).latest_complete()
        if info is None:
            print(f"harness: ckpt export: {folder}: no complete checkpoint", file=sys.stderr, flush=True)
            return EXIT_CHECKPOINT
        folder = info.path
    if not folder.is_dir():
        print(f"harness: ckpt export: {folder}: no such checkpoint folder", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    if args.out.exists():
        print(f"harness: ckpt export: {args.out} exists; not overwritten", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    ckpt.verify(folder)
    tensors, aliases = exported(folder)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=aliases_metadata(aliases))
    print(f"wrote {args.out}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} parameters "
          f"from {folder}")
    return EXIT_OK


def run_plot_lr(args) -> int:

    out = args.out if args.out is not None else run_folder(args.run_dir) / "lr.png"
    try:
        drawn = plot_run(args.run_dir, out, log_lr=args.log_lr)
    except PlotError as exc:
        print(f"harness: plot-lr: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    resumes = ", ".join(str(s) for s in drawn["resumes"]) or "none"
    print(f"wrote {drawn['path']}: {', '.join(drawn['lr_tags'])} up to step {drawn['last_step']}; "
          f"losses: {', '.join(drawn['loss_tags']) or 'none'}; resumed from steps: {resumes}")
    return EXIT_OK


def run_verify_resume(args) -> int:

    opts = VerifyOptions(args.recipe, args.overrides, steps=args.steps, checkpoint_every=args.checkpoint_every,
                         kill_at=args.kill_at, nproc=args.nproc,
                         launch_config=args.launch_config or DEFAULT_LAUNCH_CONFIG, workdir=args.workdir,
                         keep=args.keep, break_overrides=args.break_overrides, timeout=args.timeout)
    return EXIT_OK if verify_resume(opts) else EXIT_FAILED


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(format=f"[harness{'' if rank == 0 else f' rank {rank}'}] %(message)s",
                        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout)
    # Their INFO notices (TensorBoard's event-file scan, matplotlib's font cache) would read as ours.
    for library in ("tensorboard", "matplotlib"):
        logging.getLogger(library).setLevel(logging.WARNING)
