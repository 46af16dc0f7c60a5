#!/usr/bin/env bash
# Start, stop and inspect a SLURM cluster on this machine, for tests of the
# harness's SLURM support (preemption via USR1, requeue, resume): one node on
# 127.0.0.1, or two nodes, each a network namespace of its own.
#
# Usage: scripts/slurm_local.sh up|down|status|env
#
#   up      install slurm+munge from Debian's packages if missing, then start
#           munged, slurmctld and slurmd (each under setsid) and wait until the
#           node is idle. Does nothing if the cluster is already up and healthy.
#           Ends by printing `export SLURM_CONF=...`.
#   down    stop the three daemons by their pid files (SIGTERM, bounded wait,
#           then SIGKILL). Jobs still queued or running are cancelled first.
#   status  print each daemon's state and `sinfo`; exit 0 if up, 1 if not.
#   env     print `export SLURM_CONF=...`; use as
#           eval "$(scripts/slurm_local.sh env)"
#
# Environment:
#   HARNESS_SLURM_DIR   folder holding all state, spool, pids, logs, the munge
#                       key/socket and slurm.conf (default /tmp/harness-slurm).
#                       Its munge socket path must stay under 108 bytes.
#   HARNESS_SLURM_CPUS  CPUs the node advertises (default 4: two 2-rank jobs
#                       fit at once even on a 2-core machine).
#   HARNESS_SLURM_PORT  slurmctld port; slurmd uses PORT+1 (default 6817).
#                       Two clusters at once need different ports.
#   HARNESS_SLURM_NODES 1 (default) or 2. Two nodes, node1 and node2: each
#                       slurmd runs in a network namespace of its own
#                       (hs<PORT>n1, hs<PORT>n2, with their own host name and
#                       /etc/netns/<namespace>/hosts), joined to slurmctld by
#                       a bridge (hsbr<PORT>, 10.214.<PORT % 250>.254/24; the
#                       nodes are .1 and .2). Jobs on a node run inside its
#                       namespace, so ranks on two nodes talk over that bridge.
#                       Root only. `down` removes the namespaces and the bridge.
#
# Known to work on Debian 12 (Slurm 22.05, munge 0.5.15), as root, without
# systemd. See /work/shared/SLURM_NOTES.md for why each setting is there.
set -euo pipefail

DIR="${HARNESS_SLURM_DIR:-/tmp/harness-slurm}"
CPUS="${HARNESS_SLURM_CPUS:-4}"
CTLD_PORT="${HARNESS_SLURM_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
# slurmctld refuses to start unless SlurmctldHost names this machine, and
# slurmd registers under the node name we pass with -N, so use the short host
# name for both; addresses are pinned to 127.0.0.1 so no DNS is involved.
NODE="$(hostname -s 2>/dev/null || uname -n)"
NODE="${NODE%%.*}"
NODE_COUNT="${HARNESS_SLURM_NODES:-1}"
if [[ "$NODE_COUNT" == 1 ]]; then
    NODE_NAMES=("$NODE")
    CTLD_ADDR=127.0.0.1
else
    [[ "$NODE_COUNT" == 2 ]] || { echo "[slurm_local] ERROR: HARNESS_SLURM_NODES must be 1 or 2, not '$NODE_COUNT'" >&2; exit 2; }
    NODE_NAMES=(node1 node2)
    SUBNET="10.214.$((CTLD_PORT % 250))"
    CTLD_ADDR="$SUBNET.254"
    BRIDGE="hsbr$CTLD_PORT"
fi

CONF="$DIR/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
MUNGE_KEY="$MUNGE_DIR/munge.key"
LOG_DIR="$DIR/log"
PID_DIR="$DIR/run"
UP_TIMEOUT_S=30     # bring-up normally takes well under a second
DOWN_TIMEOUT_S=15   # per daemon group, before SIGKILL

# Clients (sinfo, sbatch, ...) need the config path, or they fall back to a DNS
# lookup ("configless" mode) and fail. sbatch passes it on to the jobs.
export SLURM_CONF="$CONF"

# Seconds since $1 (an $EPOCHREALTIME value), one decimal.
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pidfile() { printf '%s/%s.pid' "$PID_DIR" "$1"; }

# The key (pid file name) of node $1's slurmd: slurmd alone, or slurmd-<node>
# (slurm.conf's %n) when there are two.
slurmd_key() { if [[ "$NODE_COUNT" == 1 ]]; then printf slurmd; else printf 'slurmd-%s' "$1"; fi; }
slurmd_keys() { local n; for n in "${NODE_NAMES[@]}"; do slurmd_key "$n"; echo; done; }
# The network namespace of node $1 (two-node clusters).
netns_of() { printf 'hs%sn%s' "$CTLD_PORT" "${1#node}"; }

# Pid of daemon $1 if its pid file names a live process of that name, else
# nothing. Checking the name guards against a stale pid file whose pid has
# been reused by an unrelated process, which we must never signal.
daemon_pid() {
    local f pid comm
    f="$(pidfile "$1")"
    [[ -r "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] || return 1
    comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$comm" == "${1%%-*}" ]] || return 1
    alive "$pid" || return 1
    printf '%s' "$pid"
}

# Whether pid $1 exists and is not a zombie. A killed daemon can stay a zombie
# for a while (its parent is pid 1, which here may reap slowly); `kill -0`
# and /proc/PID/comm still succeed for a zombie.
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    [[ "${stat%% *}" != Z ]]
}

running() { daemon_pid "$1" >/dev/null; }

# State of node $1 as sinfo reports it (idle, mixed, allocated, down*, ...),
# or nothing if slurmctld does not answer.
node_state() {
    sinfo -h -n "$1" -o '%T' 2>/dev/null | head -n1 || true
}

# Every node answers and can run jobs. A trailing '*' means "not
# responding"; drain/down/unknown mean jobs would never start.
node_healthy() {
    local n
    for n in "${NODE_NAMES[@]}"; do
        [[ "$(node_state "$n")" =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    done
}

# True once every slurmd we started at epoch $1 has registered with slurmctld.
# A restarted slurmctld restores the node as idle from its saved state before
# any slurmd has spoken to it, so "idle" alone does not prove slurmd is
# listening. SlurmdStartTime is only updated by a registration.
slurmd_registered() {
    [[ -z "$1" ]] && return 0
    local t n
    for n in "${NODE_NAMES[@]}"; do
        t="$(scontrol show node "$n" 2>/dev/null |
            sed -n 's/.*SlurmdStartTime=\([0-9T:-]*\).*/\1/p')"
        [[ -n "$t" ]] && t="$(date -d "$t" +%s 2>/dev/null)" && ((t >= $1)) || return 1
    done
}

all_slurmds_running() {
    local k
    for k in $(slurmd_keys); do running "$k" || return 1; done
}

any_slurmd_running() {
    local k
    for k in $(slurmd_keys); do running "$k" && return 0; done
    return 1
}

nodes_summary() {
    local n out=()
    for n in "${NODE_NAMES[@]}"; do out+=("$n $(node_state "$n")"); done
    printf '%s' "${out[*]}"
}

healthy() {
    running munged && running slurmctld && all_slurmds_running && node_healthy && net_healthy
}

# Two-node clusters: the bridge and each node's namespace, its link and hosts
# file. Idempotent; nothing to do for one node.
net_up() {
    [[ "$NODE_COUNT" == 1 ]] && return 0
    [[ "$(id -u)" == 0 ]] || die "two nodes need root (ip netns)"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local i ns
    for i in 1 2; do
        ns="$(netns_of "node$i")"
        if [[ ! -e "/run/netns/$ns" ]]; then
            ip netns add "$ns"
            ip link add "hsv${CTLD_PORT}n$i" type veth peer name hseth netns "$ns"
            ip link set "hsv${CTLD_PORT}n$i" master "$BRIDGE" up
            ip -n "$ns" addr add "$SUBNET.$i/24" dev hseth
            ip -n "$ns" link set hseth up
            ip -n "$ns" link set lo up
        fi
        # Bound over /etc/hosts for the node's slurmd and its jobs (and by
        # `ip netns exec`): the node names resolve, the machine's name to slurmctld.
        mkdir -p "/etc/netns/$ns"
        printf '127.0.0.1 localhost\n%s.1 node1\n%s.2 node2\n%s %s\n' \
            "$SUBNET" "$SUBNET" "$CTLD_ADDR" "$NODE" >"/etc/netns/$ns/hosts"
    done
}

net_healthy() {
    [[ "$NODE_COUNT" == 1 ]] && return 0
    ip link show "$BRIDGE" >/dev/null 2>&1 && [[ -e "/run/netns/$(netns_of node1)" && -e "/run/netns/$(netns_of node2)" ]]
}

# Whatever a two-node bring-up on this port made (also when `down` is called
# without HARNESS_SLURM_NODES=2).
net_down() {
    local ns
    for ns in "$(netns_of node1)" "$(netns_of node2)"; do
        if [[ -e "/run/netns/$ns" ]]; then
            ip netns delete "$ns" 2>/dev/null || true  # takes its end of the veth pair, and so the other
        fi
        rm -rf "/etc/netns/$ns"
    done
    if ip link show "hsbr$CTLD_PORT" >/dev/null 2>&1; then
        ip link delete "hsbr$CTLD_PORT" 2>/dev/null || true
    fi
}

# The slurmd pid files there are (one node's, or two), for `down`.
slurmd_keys_found() {
    local f
    for f in "$PID_DIR"/slurmd.pid "$PID_DIR"/slurmd-*.pid; do
        [[ -e "$f" ]] && basename "$f" .pid
    done
}

# Bring-up failed: show the logs, stop whatever of this cluster runs (so no
# half-started daemon is left behind holding ports), and exit 1.
fail_up() {
    log_tails
    stop_daemons $(slurmd_keys) slurmctld munged
    net_down
    die "$*"
}

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

log_tails() {
    local f
    for f in "$LOG_DIR"/*; do
        [[ -f "$f" ]] || continue
        printf '\n----- tail of %s -----\n' "$f" >&2
        tail -n 20 "$f" >&2 || true
    done
}

print_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    ((${#missing[@]} == 0)) && return 0
    [[ "$(id -u)" == 0 ]] || die "need root to install: ${missing[*]}"
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Always the full set: the packages depend on matching versions.
    apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local mem_mb tmp node_lines="" spool_suffix="" n i=0
    # Advertise (most of) the real memory so jobs that pass --mem can start;
    # memory is not a consumable resource here (CR_Core), only a ceiling.
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    for n in "${NODE_NAMES[@]}"; do
        i=$((i + 1))
        node_lines+="NodeName=$n NodeAddr=$([[ "$NODE_COUNT" == 1 ]] && echo 127.0.0.1 || echo "$SUBNET.$i")"
        node_lines+=" CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem_mb State=UNKNOWN"$'\n'
    done
    node_lines="${node_lines%$'\n'}"
    [[ "$NODE_COUNT" == 1 ]] || spool_suffix=/%n
    tmp="$CONF.tmp.$$"
    cat >"$tmp" <<EOF
# Written by scripts/slurm_local.sh; regenerated on every bring-up.
ClusterName=harness
SlurmctldHost=$NODE($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

# Munge on our own socket; without socket= everything looks for
# /run/munge/munge.socket.2. cred_expire=5 (the minimum) lets a requeued job
# start again after ~6 s instead of ~2 minutes.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5

# The default cgroup tracking fails silently here (job COMPLETED, nothing ran).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none

# No slurmdbd: no accounting (so no sacct; use scontrol show job).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none

JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to scontrol/squeue -t all for 5 minutes.
MinJobAge=300
# SIGTERM -> SIGKILL delay for cancelled/requeued jobs.
KillWait=5
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Lets the node advertise more CPUs than the machine has.
SlurmdParameters=config_overrides

StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool$spool_suffix
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$(pidfile "$(slurmd_key %n)")
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/$(slurmd_key %n).log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$DIR/plugstack.conf

$node_lines
PartitionName=debug Nodes=$(IFS=,; echo "${NODE_NAMES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    mv -f "$tmp" "$CONF"
    # Empty plugin stack: do not pick up the system's /etc/slurm plugins.
    : >"$DIR/plugstack.conf"
}

start_munged() {
    running munged && return 0
    # munged checks permissions: socket folder 0755, key 0600, owned by us.
    install -d -m 0755 "$MUNGE_DIR"
    if [[ ! -s "$MUNGE_KEY" ]]; then
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null ||
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chmod 0600 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # setsid so the daemon outlives the calling shell; -w so we wait for the
    # daemonizing parent and see its exit status. All fds go to files and the
    # lock fd is closed: a daemon holding a caller's pipe would make e.g.
    # subprocess.run(capture_output=True) hang forever.
    setsid -w munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$(pidfile munged)" --log-file="$LOG_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG_DIR/munged.out" 2>&1 9>&- ||
        fail_up "munged failed to start; logs in $LOG_DIR"
}

start_slurmctld() {
    running slurmctld && return 0
    # No -c: state survives a down/up, as on a real cluster. Use a fresh
    # HARNESS_SLURM_DIR for fresh state (job ids then restart at 1).
    setsid -w slurmctld -f "$CONF" \
        </dev/null >>"$LOG_DIR/slurmctld.out" 2>&1 9>&- ||
        fail_up "slurmctld failed to start; logs in $LOG_DIR"
}

# slurmd of node $1; of a two-node cluster inside the node's namespace, with
# the node's name as its host name (unshare --uts), so that a job's processes
# resolve their own name to their own address.
start_slurmd() {
    local key
    key="$(slurmd_key "$1")"
    running "$key" && return 0
    if [[ "$NODE_COUNT" == 1 ]]; then
        setsid -w slurmd -f "$CONF" -N "$1" \
            </dev/null >>"$LOG_DIR/slurmd.out" 2>&1 9>&- ||
            fail_up "slurmd failed to start; logs in $LOG_DIR"
    else
        mkdir -p "$DIR/spool/$1"
        # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup
        # mounts slurmd needs. Its own mount namespace for the hosts file.
        setsid -w nsenter --net="/run/netns/$(netns_of "$1")" unshare --uts --mount --propagation private \
            sh -c 'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -f "$2" -N "$1"' \
            sh "$1" "$CONF" "/etc/netns/$(netns_of "$1")/hosts" \
            </dev/null >>"$LOG_DIR/$key.out" 2>&1 9>&- ||
            fail_up "slurmd of $1 failed to start; logs in $LOG_DIR"
    fi
}

cmd_up() {
    local t0 deadline d
    t0=$EPOCHREALTIME
    # AF_UNIX paths are limited to 108 bytes; munged would fail obscurely.
    ((${#MUNGE_SOCKET} < 108)) ||
        die "munge socket path too long (${#MUNGE_SOCKET} bytes): pick a shorter HARNESS_SLURM_DIR"
    install_packages
    mkdir -p "$DIR"
    # Serialize concurrent `up`/`down` calls on the same folder.
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "timed out waiting for $DIR/.lock"

    if healthy; then
        log "already up ($(nodes_summary))"
        print_env
        return 0
    fi

    install -d -m 0755 "$DIR" "$LOG_DIR" "$PID_DIR" "$DIR/state" "$DIR/spool"
    # Keep a running slurmctld only if it reads the config we are about to
    # write; otherwise restart the slurm daemons (state is kept on disk).
    local old=""
    [[ -f "$CONF" ]] && old="$(cat "$CONF")"
    write_conf
    if [[ "$old" != "$(cat "$CONF")" ]] && { running slurmctld || any_slurmd_running; }; then
        log "config changed: restarting slurm daemons"
        stop_daemons $(slurmd_keys) slurmctld
    fi

    # Another cluster (or anything else) on our ports makes the daemons exit
    # at once with "Address already in use"; say so plainly.
    local port
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        if ! running slurmctld && ! any_slurmd_running && port_busy "$port"; then
            die "port $port is in use by another process: set HARNESS_SLURM_PORT (ctld port; slurmd uses +1)"
        fi
    done

    net_up
    start_munged
    start_slurmctld
    local slurmd_started_after="" n
    if ! all_slurmds_running; then
        slurmd_started_after=$(date +%s)
        for n in "${NODE_NAMES[@]}"; do start_slurmd "$n"; done
    fi

    # Bounded wait for the node to register and become usable.
    deadline=$(( $(date +%s) + UP_TIMEOUT_S ))
    # Normally "idle"; mixed/allocated if jobs survived a restart.
    until node_healthy && slurmd_registered "$slurmd_started_after"; do
        if (( $(date +%s) >= deadline )); then
            sinfo -N -l >&2 2>&1 || true
            fail_up "nodes not idle after ${UP_TIMEOUT_S}s ($(nodes_summary)); logs in $LOG_DIR"
        fi
        for d in munged slurmctld $(slurmd_keys); do
            running "$d" || fail_up "$d died during bring-up; logs in $LOG_DIR"
        done
        sleep 0.2
    done
    log "up in $(elapsed "$t0")s: $(nodes_summary), $CPUS CPUs each, dir $DIR"
    print_env
}

# Stop the named daemons: SIGTERM all of them, wait (bounded) for all to exit,
# then SIGKILL what is left. Only pids from our own pid files are signalled.
stop_daemons() {
    local d pid pids=() deadline
    for d in "$@"; do
        if pid="$(daemon_pid "$d")"; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    deadline=$(( $(date +%s) + DOWN_TIMEOUT_S ))
    for pid in "${pids[@]}"; do
        while alive "$pid"; do
            if (( $(date +%s) >= deadline )); then
                log "pid $pid ignored SIGTERM for ${DOWN_TIMEOUT_S}s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
    for d in "$@"; do rm -f "$(pidfile "$d")"; done
}

cmd_down() {
    local t0 deadline
    t0=$EPOCHREALTIME
    [[ -d "$DIR" ]] || { log "nothing to stop ($DIR does not exist)"; return 0; }
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "timed out waiting for $DIR/.lock"
    # Cancel leftover jobs while slurmctld and slurmd still run, so no job
    # step keeps running (and using the CPUs) after the cluster is gone.
    if running slurmctld && [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
        log "cancelling leftover jobs: $(squeue -h -o %i | tr '\n' ' ')"
        scancel --quiet $(squeue -h -o %i) 2>/dev/null || true
        # KillWait=5 s between SIGTERM and SIGKILL, so this ends in ~6 s.
        deadline=$(( $(date +%s) + 10 ))
        while [[ -n "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] &&
            (( $(date +%s) < deadline )); do
            sleep 0.2
        done
    fi
    # All three at once: none needs another to shut down. Each exits within
    # ~0.1 s of SIGTERM; it then stays a zombie until pid 1 reaps it (about
    # 2 s here), which alive() does not wait for.
    stop_daemons $(slurmd_keys_found) slurmctld munged
    net_down
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "down in $(elapsed "$t0")s"
}

cmd_status() {
    local d pid rc=0
    for d in munged slurmctld $(slurmd_keys); do
        if pid="$(daemon_pid "$d")"; then
            printf '%-10s running (pid %s)\n' "$d" "$pid"
        else
            printf '%-10s stopped\n' "$d"
            rc=1
        fi
    done
    printf 'SLURM_CONF=%s\n' "$CONF"
    if running slurmctld && sinfo 2>/dev/null; then
        node_healthy || rc=1
    else
        echo "sinfo: no answer from slurmctld"
        rc=1
    fi
    return "$rc"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) print_env ;;
    *)
        echo "usage: $0 up|down|status|env" >&2
        exit 2
        ;;
esac
