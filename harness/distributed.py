"""Processes and collectives: the Accelerator, (sum, count) reductions, rank agreement, teardown."""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import NoReturn, Optional, Sequence

import torch

from harness.contracts import ConfigError

logger = logging.getLogger("harness")


class RankDivergence(RuntimeError):
    """Ranks disagree on something that must be identical (the LR of a param group)."""


class RankLost(RuntimeError):
    """A collective failed because another rank (or the launcher's store) is gone. Its traceback
    would only say where this rank happened to be; the lost rank's own output says why."""


# What a collective's error says when the other end has gone: gloo's TCP transport, NCCL's watchdog.
PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                     "remote process exited", "NCCL communicator was aborted")
# A collective that outlived train.collective_timeout_s: gloo's and NCCL's words for it.
TIMEOUT_MARKERS = ("Timed out waiting", "Watchdog caught collective operation timeout")


def lost_rank_error(exc: BaseException) -> Optional[RankLost]:
    """A one-line RankLost for ``exc`` if it is a collective failing because a peer is gone, else None."""
    store_gone = isinstance(exc, (torch.distributed.DistNetworkError, torch.distributed.DistStoreError))
    text = str(exc).strip()
    timed_out = isinstance(exc, RuntimeError) and any(m in text for m in TIMEOUT_MARKERS)
    peer_gone = isinstance(exc, RuntimeError) and any(m in text for m in PEER_LOST_MARKERS)
    if not (store_gone or timed_out or peer_gone):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(exc).__name__)  # gloo's [file.cc:N]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))
    if timed_out:
        return RankLost(f"rank {rank}: a peer became unreachable: a collective waited past train.collective_timeout_s "
                        f"({first.split('. ')[0].rstrip('.')}); a peer is frozen or the network between the ranks is "
                        "cut. Nothing was saved by this stop; run the same command again to resume from the newest "
                        "complete checkpoint")
    return RankLost(f"rank {rank} lost contact with the other ranks ({first.split('. ')[0].rstrip('.')}); "
                    "the output of the rank that stopped first says why. Run the same command again to "
                    "resume from the newest complete checkpoint")


def make_accelerator(device: str, mixed_precision: Optional[str], find_unused_parameters: bool = False,
                     collective_timeout_s: float = 600.0):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Without cpu=True, Accelerator on a GPU-less machine does not join the process group:
    # every rank believes it is rank 0 of 1.
    use_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' asked for, but torch sees no CUDA device (use auto or cpu)")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # A collective that waits longer than this (a peer frozen, a network cut) fails on every rank
    # that waits, instead of after torch's default of 30 minutes.
    handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=collective_timeout_s)))
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers)
    if accelerator.is_main_process and restarts_share_the_agent_store(os.environ):
        logger.warning("torchrun may restart these workers (--max-restarts %s) and shares its rendezvous store with "
                       "them: a restarted worker can then read the previous attempt's addresses and fail to connect "
                       "(pytorch/pytorch#135712). Launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its "
                       "environment.", os.environ["TORCHELASTIC_MAX_RESTARTS"])
    return accelerator


def restarts_share_the_agent_store(env) -> bool:
    """Under torchrun with restarts allowed, the workers use the agent's own store, which keeps one
    attempt's keys into the next (torch's comment says a new store is made for every retry; with the
    shared store it is not)."""
    try:
        restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    except ValueError:
        return False
    return restarts > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


# What a launcher's command line starts with: its console script (argv[0] or, after the
# interpreter, argv[1]) or the module run with `python -m`.
LAUNCHER_SCRIPTS = ("accelerate", "accelerate-launch", "torchrun")
LAUNCHER_MODULES = ("accelerate.commands.launch", "accelerate.commands.accelerate_cli", "torch.distributed.run",
                    "torch.distributed.launch")


def is_launcher_command(argv: Sequence[str]) -> bool:
    """Whether a command line is ``accelerate launch`` or torchrun. Only the program and module
    names count, so a shell running ``~/accelerate-tests/train.sh`` or ``nohup python -m harness``
    is not mistaken for a launcher."""
    if not argv:
        return False
    if Path(argv[0]).name in LAUNCHER_SCRIPTS:
        return True
    if not Path(argv[0]).name.startswith("python"):
        return False
    rest = list(argv[1:])
    while rest and rest[0].startswith("-") and rest[0] != "-m":  # interpreter options: -u, -X dev, ...
        rest = rest[2:] if rest[0] in ("-X", "-W") else rest[1:]
    if rest and Path(rest[0]).name in LAUNCHER_SCRIPTS:
        return True
    return len(rest) > 1 and rest[0] == "-m" and rest[1] in LAUNCHER_MODULES


def launcher_argv(pid: int) -> Optional[list[str]]:
    """The command line of process ``pid`` if it is a launcher (is_launcher_command), else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    argv = [a for a in argv if a]
    return argv if is_launcher_command(argv) else None


def launcher_pid() -> Optional[int]:
    """The pid of the launcher that started this process (our parent), or None when the parent is
    anything else: a shell, nohup, srun's step daemon. Under torchrun's elastic agent
    (TORCHELASTIC_RUN_ID set) a Python parent is taken as the launcher even when it is a script
    of the user's that calls torch.distributed.launcher itself."""
    parent = os.getppid()
    if parent <= 1:
        return None
    if launcher_argv(parent) is not None:
        return parent
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        try:
            name = Path(f"/proc/{parent}/comm").read_text().strip()
        except OSError:
            return None
        return parent if name.startswith("python") else None
    return None


def requested_process_count(pid: Optional[int] = None) -> Optional[int]:
    """How many processes the launcher above us was asked for, read from its command line.

    ``accelerate launch --cpu --num_processes 2`` (or a MULTI_CPU config file) silently starts ONE
    process with world size 1; this lets us say so loudly instead of training alone.
    """
    argv = launcher_argv(os.getppid() if pid is None else pid)
    if argv is None:
        return None
    for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node", "--num-processes"):
        for i, arg in enumerate(argv):
            value = None
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            if value is not None and value.isdigit():
                return int(value)
    for flag in ("--config_file", "--config-file"):
        for i, arg in enumerate(argv):
            path = argv[i + 1] if arg == flag and i + 1 < len(argv) else (
                arg.split("=", 1)[1] if arg.startswith(flag + "=") else None)
            if path:
                try:
                    import yaml

                    launch_cfg = yaml.safe_load(Path(path).read_text()) or {}
                    return int(launch_cfg.get("num_processes", 1))
                except (OSError, ValueError, TypeError, AttributeError):
                    return None
    return None


def warn_if_ranks_lost(world_size: int) -> Optional[str]:
    requested = requested_process_count()
    if requested and requested > 1 and world_size == 1:
        message = (
            f"\n{'!' * 78}\n"
            f"!! The launcher was asked for {requested} processes but this run sees world size 1.\n"
            f"!! It is training on ONE process. On a CPU-only machine `accelerate launch --cpu\n"
            f"!! --num_processes N` and `distributed_type: MULTI_CPU` do this silently. Use\n"
            f"!!   accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m harness train ...\n"
            f"!! or torchrun --standalone --nproc_per_node {requested} -m harness train ...\n"
            f"{'!' * 78}"
        )
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)
        return message
    return None


def all_reduce_sum(accelerator, values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """One packed all-reduce of float64 sums (sum, count, ...), identical on every rank."""
    if accelerator.num_processes == 1:
        return torch.as_tensor(values, dtype=torch.float64).clone()
    tensor = torch.as_tensor(values, dtype=torch.float64).to(accelerator.device, copy=True)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(tensor)  # in place; accelerator.reduce adds copies and checks
    return tensor.cpu()


def buffers_from_rank0(accelerator, model: torch.nn.Module) -> None:
    """Every rank's buffers (BatchNorm's running statistics and counts) set to rank 0's. Between
    DDP's broadcasts at each forward every rank holds its own; a validation uses rank 0's (the ones
    a checkpoint holds), so one redone after a resume computes exactly what the uninterrupted run
    did. One broadcast per buffer, at each validation; nothing without buffers."""
    if accelerator.num_processes == 1:
        return
    for buffer in model.buffers():
        torch.distributed.broadcast(buffer.data, src=0)


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when any rank passes True (one collective)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(all_reduce_sum(accelerator, [1.0 if flag else 0.0])[0] > 0)


def check_lrs_agree(accelerator, lrs: torch.Tensor, group_names: list[str], first_step: int, what: str) -> None:
    """Stop with a clear error if any rank's LRs differ from rank 0's.

    ``lrs`` is [steps, groups] of the LRs applied since the last check, so a per-step schedule is
    checked once per log interval instead of paying a collective every step.
    """
    if accelerator.num_processes == 1 or lrs.numel() == 0:
        return
    gathered = gather_rows(accelerator, lrs.flatten()).view(accelerator.num_processes, *lrs.shape)
    raise_if_lrs_differ(gathered, group_names, first_step, what)


def gather_rows(accelerator, values: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D float64 tensor (same length everywhere), as [world, n] on the CPU."""
    local = values.to(torch.float64).to(accelerator.device)
    return accelerator.gather(local.unsqueeze(0)).cpu()


def raise_if_lrs_differ(gathered: torch.Tensor, group_names: list[str], first_step: int, what: str) -> None:
    """``gathered`` is [world, steps, groups]; raise RankDivergence at the first disagreement."""
    differs = (gathered != gathered[0:1]).any(dim=0)  # [steps, groups]
    if bool(differs.any()):
        step_i, group_i = (int(v) for v in differs.nonzero()[0])
        values = ", ".join(f"rank {r}: {gathered[r, step_i, group_i].item():.10g}" for r in range(gathered.size(0)))
        raise RankDivergence(
            f"LR of param group {group_names[group_i]!r} differs between ranks at {what} "
            f"{first_step + step_i}: {values}. The schedule must be stepped identically on every rank "
            "(with a value reduced over all ranks for ReduceLROnPlateau)."
        )


_LEFT_PROCESS_GROUP = False


def shutdown_process_group(timeout_s: float = 30.0, exit_code: int = 0) -> None:
    """Leave the process group without hanging: gloo's destroy has been seen to hang at exit."""
    global _LEFT_PROCESS_GROUP
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    _LEFT_PROCESS_GROUP = True
    done = threading.Event()

    def _destroy() -> None:
        try:
            torch.distributed.destroy_process_group()
        finally:
            done.set()

    thread = threading.Thread(target=_destroy, name="harness-teardown", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        logger.warning("destroy_process_group did not return in %.0f s; exiting without it", timeout_s)
        exit_now(exit_code)


def flush_output() -> None:
    """Put what this process printed or logged on its way out (a closed stream is skipped)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def exit_now(exit_code: int) -> NoReturn:
    """End the process at once, output flushed, without Python's finalization (os._exit). Safe from
    any thread: no lock is taken (the harness's log lines go to stdout, flushed at every line)."""
    flush_output()
    os._exit(exit_code)


def end_rank_process(exit_code: int) -> int:
    """The last thing a ``harness`` command does: after a process group, end the process without
    Python's finalization. gloo's worker threads outlive destroy_process_group (the DDP wrapper
    still holds the group) and destroy a finished collective's work when they get to it; when that
    lands during finalization, the thread needs the GIL for the work's Python-made tensors, is
    ended by the interpreter mid-destructor and the process aborts (SIGABRT, "terminate called
    without an active exception"; seen under load, on the rank that exits last). Everything of
    ours is closed by now: logs and trackers flushed, checkpoints committed. Without a process
    group, returns ``exit_code`` for a normal exit."""
    if not _LEFT_PROCESS_GROUP and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return exit_code
    exit_now(exit_code)
