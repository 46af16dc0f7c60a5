# shellcheck shell=bash
# Preemption-safe requeue for the harness's SLURM batch scripts. Sourced, never run:
#
#   source slurm/lib/preempt.sh
#   harness_slurm_start                      # log the job, install the signal traps
#   run_dir=$(harness_slurm_run_dir "$recipe" "${overrides[@]}") || exit 2
#   harness_slurm_launch "$run_dir" srun ... accelerate launch ... -m harness train ...
#
# What happens on a preemption warning (all of it is in this file; the .sbatch files only say what
# to launch):
#   1. SLURM sends SIGUSR1 to the batch shell: `#SBATCH --signal=B:USR1@SECONDS` before the time
#      limit, or by hand `scancel -s USR1 -b JOBID`. SIGTERM is forwarded the same way, so the
#      ranks save, but it is what SLURM sends when it ends the job (`scancel JOBID`, time limit,
#      preemption), so after a SIGTERM the job is never requeued by this script (see step 3).
#   2. The trap forwards SIGUSR1 to `srun`, the launcher this script started as `cmd & wait $!`.
#      srun passes it to every process of the job step on every node. The per-node launchers
#      (accelerate launch / torchrun) are started with SIGUSR1 ignored (`trap "" USR1; exec ...`),
#      so they live on; the harness ranks catch it, agree at the next optimizer step, save a
#      checkpoint, rank 0 writes RUN_DIR/PREEMPTED.json, every rank exits 75, the launchers exit 1.
#      Why SIGUSR1 and not SIGTERM: srun answers SIGTERM by SIGKILLing the step ("srun: forcing job
#      termination"), which would kill the ranks in the middle of the save.
#   3. When srun has returned, PREEMPTED.json present means "saved on a signal": then
#      `scontrol requeue` (for an array, only this task: ARRAYJOB_TASK), and exit at once (SLURM
#      SIGTERMs the job ~10 ms after the requeue). No marker: never requeued, whatever the exit code
#      (exit 75 without one: the ranks saved because their launcher died, not on a signal; the
#      job ends with exit code 75 and the checkpoint is kept).
#      Nor when the batch shell got SIGTERM or the job is no longer RUNNING (being cancelled or
#      timed out): the checkpoint is kept, the job ends with exit code 75.
#      A signal sent to the job steps instead (`scancel -s USR1 JOBID`, `--signal=USR1@N` without
#      B:) ends the same way: the ranks save and the marker is found.
#   4. The requeued job runs this same script again (SLURM_RESTART_COUNT=1, 2, ...); the harness
#      resumes from the newest complete checkpoint (run.resume=auto) and deletes the marker.
#   5. At most HARNESS_MAX_REQUEUES (default 3) restarts: past that the job stops with exit code 75
#      and says so; the checkpoint is kept, and submitting the same command again resumes it.
#
# Exit codes of the batch script: 0 training finished (or requeued); 75 saved but not requeued
# (cap reached, SIGTERM, job being ended, or scontrol requeue failed); otherwise the launcher's
# exit code (failed, not requeued).
# Why a warning with lead time (--signal=B:USR1@N) and not SLURM's final SIGTERM: on `scancel`,
# the time limit or a preemption SLURM sends SIGTERM to every process of the job, srun included,
# and srun answers SIGTERM by SIGKILLing its step; the ranks (which get SIGTERM too) then save
# only if they are quick enough, and KillWait later everything is SIGKILLed anyway.
#
# Environment (set at submission, e.g. `sbatch --export=ALL,HARNESS_MAX_REQUEUES=5 ...`; SLURM
# keeps it for the requeued runs):
#   HARNESS_MAX_REQUEUES  restarts allowed before the job stops requeueing itself (default 3).
#                         Counts every restart SLURM made of this job, ours or not.

HARNESS_SLURM_MARKER=PREEMPTED.json
HARNESS_SLURM_EXIT_PREEMPTED=75

_hs_signal=""       # name of the first signal that reached this batch shell (USR1, TERM)
_hs_signal_at=""    # $SECONDS when it arrived
_hs_got_term=""     # set once SIGTERM reached this batch shell, first or not
_hs_launcher_pid=""
_hs_forwarded=""

hs_log() { printf '[slurm-harness %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# The job id to requeue: for an array task only that task (ARRAYJOBID_TASKID). `scontrol requeue
# $SLURM_JOB_ID` would work too (each task has its own id), but ARRAY_TASK names it unambiguously
# and `scontrol requeue $SLURM_ARRAY_JOB_ID` would requeue the whole array.
harness_slurm_requeue_target() {
    if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
        printf '%s_%s\n' "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID"
    else
        printf '%s\n' "${SLURM_JOB_ID:?not inside a SLURM job}"
    fi
}

# A rendezvous port derived from the job id: the same on every node and across requeues, different
# for jobs (and array tasks) that share a node. 20000-29999 stays below Linux's ephemeral range.
harness_slurm_port() { printf '%s\n' "$((20000 + ${SLURM_JOB_ID:?not inside a SLURM job} % 10000))"; }

# Expand %j (job id), %A (array job id), %a (array task id) in one argument, as in sbatch's file
# names, so that `run.output_dir=runs/sweep-%a run.seed=%a` gives each array task its own run.
harness_slurm_expand() {
    local s=$1
    s=${s//%j/${SLURM_JOB_ID:-}}
    s=${s//%A/${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}}
    s=${s//%a/${SLURM_ARRAY_TASK_ID:-0}}
    printf '%s\n' "$s"
}

# harness_slurm_args "$@": set `recipe` and the array `overrides` from the batch script's arguments
# (RECIPE [key=value ...]), else from HARNESS_RECIPE and HARNESS_OVERRIDES (split on spaces), with
# %j/%A/%a expanded in the overrides.
harness_slurm_args() {
    local raw=() item
    if (($# > 0)); then
        recipe=$1
        shift
        raw=("$@")
    elif [[ -n "${HARNESS_RECIPE:-}" ]]; then
        recipe=$HARNESS_RECIPE
        read -r -a raw <<<"${HARNESS_OVERRIDES:-}"
    else
        hs_log "usage: sbatch SCRIPT RECIPE [key=value ...], or set HARNESS_RECIPE (and HARNESS_OVERRIDES)"
        exit 2
    fi
    overrides=()
    for item in "${raw[@]}"; do overrides+=("$(harness_slurm_expand "$item")"); done
}

# Log where we are and install the traps. Call it first: a signal that arrives before the launcher
# starts is remembered (and the job requeued without running).
harness_slurm_start() {
    local array=""
    [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]] && array=" (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-?})"
    hs_log "job ${SLURM_JOB_ID:-?}${array} '${SLURM_JOB_NAME:-?}' on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-unset (first run)}," \
        "at most ${HARNESS_MAX_REQUEUES:-3} requeues (HARNESS_MAX_REQUEUES), dir $PWD"
    trap '_hs_on_signal USR1' USR1
    trap '_hs_on_signal TERM' TERM
}

_hs_on_signal() {
    local sig=$1
    [[ "$sig" == TERM ]] && _hs_got_term=1
    if [[ -z "$_hs_signal" ]]; then
        _hs_signal=$sig
        _hs_signal_at=$SECONDS
    fi
    if [[ -z "$_hs_launcher_pid" ]]; then
        hs_log "got SIG$sig before the launcher started"
        return
    fi
    if [[ -n "$_hs_forwarded" ]]; then
        hs_log "got SIG$sig again: already forwarded, still waiting for the checkpoint"
        return
    fi
    _hs_forwarded=1
    hs_log "got SIG$sig: forwarding SIGUSR1 to the launcher (pid $_hs_launcher_pid) so that every rank" \
        "saves a checkpoint at its next optimizer step"
    kill -s USR1 "$_hs_launcher_pid" 2>/dev/null ||
        hs_log "the launcher (pid $_hs_launcher_pid) is already gone"
}

# Print the run folder the harness will use for RECIPE + OVERRIDES (run.output_dir resolved as the
# harness does, relative to the current directory). Exit 2 with the harness's message if the recipe
# or an override is unusable.
harness_slurm_run_dir() {
    "${HARNESS_PYTHON:-python}" - "$@" <<'EOF'
import sys
from harness.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    print(cfg.run_dir)
    if cfg.run.resume != "auto":
        print(f"[slurm-harness] WARNING: run.resume={cfg.run.resume}: a requeued run will not resume from "
              "its newest checkpoint (run.resume=auto, the default, does)", file=sys.stderr)
except ConfigError as exc:
    print(f"harness: config error: {exc}", file=sys.stderr)
    sys.exit(2)
EOF
}

# This job's state as slurmctld sees it (RUNNING; COMPLETING once SLURM is ending it), or nothing.
harness_slurm_job_state() {
    scontrol show job -o "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1
}

# Requeue this job (or array task) if under the cap, then exit; otherwise say why not and exit 75.
harness_slurm_requeue_or_stop() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${HARNESS_MAX_REQUEUES:-3} target state
    # SIGTERM to the batch shell is how SLURM ends a job: `scancel JOBID`, the time limit, a
    # preemption. The ranks may well have saved (they catch SIGTERM too), but requeueing here would
    # bring back a job its owner just cancelled: say so and stop. (A preemption with
    # PreemptMode=REQUEUE is requeued by SLURM itself and resumes from this checkpoint.)
    if [[ -n "$_hs_got_term" ]]; then
        hs_log "NOT requeueing: this batch shell got SIGTERM, i.e. SLURM is ending the job (scancel," \
            "time limit or preemption). The checkpoint is kept: submit the same command again to" \
            "resume. (Requeue-on-warning needs SIGUSR1: --signal=B:USR1@SECONDS or scancel -s USR1 -b.)"
        exit "$HARNESS_SLURM_EXIT_PREEMPTED"
    fi
    state=$(harness_slurm_job_state)
    if [[ -n "$state" && "$state" != RUNNING ]]; then
        hs_log "NOT requeueing: the job is $state (SLURM is ending it: scancel, time limit or" \
            "preemption). The checkpoint is kept: submit the same command again to resume."
        exit "$HARNESS_SLURM_EXIT_PREEMPTED"
    fi
    if ! [[ "$max" =~ ^[0-9]+$ ]]; then
        hs_log "HARNESS_MAX_REQUEUES='$max' is not a whole number: using 3"
        max=3
    fi
    if ((restarts >= max)); then
        hs_log "NOT requeueing: requeue cap reached (this job has restarted $restarts time(s)," \
            "HARNESS_MAX_REQUEUES=$max). The checkpoint is kept: submit the same command again to" \
            "resume from it, or raise HARNESS_MAX_REQUEUES. Exiting with code $HARNESS_SLURM_EXIT_PREEMPTED."
        exit "$HARNESS_SLURM_EXIT_PREEMPTED"
    fi
    target=$(harness_slurm_requeue_target)
    hs_log "requeueing: scontrol requeue $target (restart $((restarts + 1)) of at most $max);" \
        "the next run resumes from the checkpoint"
    # SLURM SIGTERMs this shell right after the requeue: nothing must be left to do but exit.
    trap - USR1 TERM
    if scontrol requeue "$target"; then
        exit 0
    fi
    hs_log "ERROR: 'scontrol requeue $target' failed (was the job submitted with --requeue? is" \
        "JobRequeue disabled?). The checkpoint is kept: submit the same command again to resume."
    exit "$HARNESS_SLURM_EXIT_PREEMPTED"
}

# One-line summary of the marker the harness wrote (signal, step, checkpoint, save time).
_hs_marker_summary() {
    local f=$1 key out=""
    for key in signal step checkpoint seconds_from_signal_to_saved; do
        out+="$key=$(sed -n "s/^ *\"$key\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\} *$/\1/p" "$f" | head -n1) "
    done
    printf '%s\n' "${out% }"
}

# harness_slurm_launch RUN_DIR CMD...: run CMD (srun ...) in the background, forward preemption
# signals to it, and when it is done: exit 0 if training finished, requeue (or stop at the cap) if
# it saved a checkpoint on a signal, else exit with its exit code. Never returns.
harness_slurm_launch() {
    local run_dir=$1 marker rc again
    shift
    marker="$run_dir/$HARNESS_SLURM_MARKER"
    # A marker left by an earlier run that was killed before it could resume must not be taken
    # for "saved just now" (the harness deletes it at start too, but only once it gets that far).
    rm -f "$marker"
    if [[ -n "$_hs_got_term" ]]; then
        hs_log "SIGTERM arrived before training started: not starting it (nothing was saved)"
        exit 143
    fi
    if [[ -n "$_hs_signal" ]]; then
        hs_log "SIG$_hs_signal arrived before training started: nothing to save"
        harness_slurm_requeue_or_stop
    fi
    hs_log "run folder $run_dir; launching: $*"
    local t0=$SECONDS
    "$@" &
    _hs_launcher_pid=$!
    # A trapped signal interrupts `wait` (status 128+n) while the launcher still runs: wait again
    # until it has really exited, to get its own exit code.
    while :; do
        wait "$_hs_launcher_pid"
        rc=$?
        ((rc > 128)) || break
        kill -0 "$_hs_launcher_pid" 2>/dev/null && continue
        # Exited meanwhile (or died by a signal): bash keeps its status for one more wait.
        wait "$_hs_launcher_pid" 2>/dev/null
        again=$?
        ((again != 127)) && rc=$again
        break
    done
    local took=$((SECONDS - t0)) since=""
    [[ -n "$_hs_signal" ]] && since=", $((SECONDS - _hs_signal_at)) s after SIG$_hs_signal"
    hs_log "launcher exited with code $rc after ${took} s${since}"

    if [[ -f "$marker" ]] && grep -q '"signal": "SIGINT"' "$marker"; then
        # Ctrl-C (scancel -s INT): the ranks saved, but someone meant to stop. Keep the checkpoint.
        hs_log "stopped by SIGINT after saving: $(_hs_marker_summary "$marker"); NOT requeueing (rerun to resume)"
        exit 130
    fi
    if [[ -f "$marker" ]]; then
        hs_log "checkpoint saved on a preemption signal: $(_hs_marker_summary "$marker")"
        [[ -z "$_hs_signal" ]] &&
            hs_log "(the signal went to the job steps, not to this batch shell)"
        harness_slurm_requeue_or_stop
    fi
    if ((rc == 0)); then
        hs_log "training finished (exit 0)"
        exit 0
    fi
    if ((rc == HARNESS_SLURM_EXIT_PREEMPTED)); then
        # The ranks saved and stopped, but not on a signal (no marker): their launcher died.
        hs_log "exit code $rc without $marker: the ranks saved a checkpoint because their launcher died," \
            "not on a preemption signal: NOT requeueing (submit the same command again to resume)"
        exit "$rc"
    fi
    if [[ -n "$_hs_signal" ]]; then
        hs_log "got SIG$_hs_signal but no checkpoint was saved (no $marker): NOT requeueing"
    fi
    hs_log "launcher failed with exit code $rc: NOT requeueing"
    exit "$rc"
}
