#!/usr/bin/env bash
# bash scripts/gpu_check.sh [WORKDIR]
# bash scripts/gpu_check.sh --rehearse [WORKDIR]   the same checks on the CPU (device cpu, fp16 -> bf16,
#                                                  no grad scaler expected): tests this script's own logic
# On a machine with a CUDA GPU: everything the CPU test suite cannot reach. One PASS/FAIL line per
# check, then a summary; exit 0 only when every check passed. Never part of the test suite.
#
#   1. bf16 training on one GPU finishes with a sane accuracy
#   2. fp16: the grad scaler's state is saved and restored; SIGKILL mid-epoch + resume is bitwise
#   3. checkpoint.async_save with pinned staging buffers: SIGKILL + resume is bitwise
#   4. FSDP2 on one GPU (torchrun, one rank: a one-rank mesh) trains and its checkpoint exports
#   5. two ranks sharing one GPU over gloo (NCCL refuses two ranks on one device) train and resume
#   6. SIGTERM preemption: exit 75, PREEMPTED.json, resume bitwise
set -uo pipefail
cd "$(dirname "$0")/.."
rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
py=${HARNESS_PYTHON:-.venv/bin/python}
bin=$(dirname "$py")
work=${1:-$(mktemp -d /tmp/harness-gpu-check.XXXXXX)}
mkdir -p "$work"
recipe=recipes/breast_cancer_mlp.yaml
device=cuda; fp16=fp16
if [ "$rehearse" = 1 ]; then device=cpu; fp16=bf16; fi
base=(train.epochs=4 data.batch_size=64 checkpoint.every_steps=5 model.dropout=0.1 train.device=$device)
passed=0; failed=0

result() {  # result NAME STATUS DETAIL
    if [ "$2" = 0 ]; then echo "PASS $1 $3"; passed=$((passed + 1)); else echo "FAIL $1 $3"; failed=$((failed + 1)); fi
}
train() {  # train RUN_DIR [overrides...] -- one process
    local dir=$1; shift
    "$py" -m harness train "$recipe" "run.output_dir=$dir" "${base[@]}" "$@" >>"$work/log.txt" 2>&1
}
same_weights() {  # same_weights RUN_A RUN_B
    "$py" - "$1/final/model.safetensors" "$2/final/model.safetensors" <<'EOF'
import sys, torch
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
sys.exit(0 if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else 1)
EOF
}
killed_and_resumed() {  # killed_and_resumed NAME [overrides...]: straight vs SIGKILL at step 13 + resume
    local name=$1; shift
    train "$work/$name-straight" "$@" && \
        { HARNESS_TEST_KILL_AT_STEP=13 train "$work/$name-killed" "$@"; train "$work/$name-killed" "$@"; } && \
        same_weights "$work/$name-straight" "$work/$name-killed"
}

if [ "$rehearse" = 1 ]; then
    echo "REHEARSAL on the CPU: the script's logic, not the GPU paths"
elif ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "FAIL cuda: torch sees no CUDA device ($("$py" -c 'import torch; print(torch.__version__)'))"
    exit 1
fi
[ "$rehearse" = 1 ] || "$py" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

train "$work/bf16" train.mixed_precision=bf16
acc=$("$py" -c "import json; print(json.load(open('$work/bf16/metrics.json')).get('test_accuracy', 0))" 2>/dev/null)
result bf16 $? "test_accuracy=${acc:-none}"

killed_and_resumed fp16 train.mixed_precision=$fp16
status=$?
scaler=$("$py" -c "
import json, glob, os
d = sorted(glob.glob('$work/fp16-killed/checkpoints/step-*'))[-1]
f = os.path.join(d, 'grad_scaler.json')
print(json.load(open(f)) if os.path.isfile(f) else None)" 2>/dev/null)
[ "$status" = 0 ] && [ -n "$scaler" ] && { [ "$scaler" != None ] || [ "$rehearse" = 1 ]; }
result fp16_scaler_resume $? "grad_scaler=${scaler:-missing}"

killed_and_resumed async checkpoint.async_save=true
result async_save_pinned $? ""

"$bin/torchrun" --standalone --nproc_per_node 1 -m harness train "$recipe" "run.output_dir=$work/fsdp1" \
    "${base[@]}" train.strategy=fsdp >>"$work/log.txt" 2>&1 && \
    "$py" -m harness ckpt export "$work/fsdp1" "$work/fsdp1.safetensors" >>"$work/log.txt" 2>&1
result fsdp_one_gpu $? ""

two=("$bin/accelerate" launch --config_file recipes/accelerate/cpu_2proc.yaml --main_process_port 29533
     -m harness train "$recipe" "${base[@]}")
# gloo ranks whose tensors live on the GPU: train.device=cuda with the CPU (gloo) launch config.
# The check includes where the ranks really ran: the start line says "device cuda..." or "device cpu"
# (use_cpu in the launch config may win over train.device); a CPU run is a FAIL, not a pass.
"${two[@]}" "run.output_dir=$work/shared" >"$work/shared.log" 2>&1 && cat "$work/shared.log" >>"$work/log.txt" && \
    { grep -q "| device $device" "$work/shared.log" || { echo "(the ranks ran on: $(grep -o '| device [a-z:0-9]*' "$work/shared.log" | head -1))"; false; }; } && \
    { HARNESS_TEST_KILL_AT_STEP=13 "${two[@]}" "run.output_dir=$work/shared-killed" >>"$work/log.txt" 2>&1;
      "${two[@]}" "run.output_dir=$work/shared-killed" >>"$work/log.txt" 2>&1; } && \
    same_weights "$work/shared" "$work/shared-killed"
result two_ranks_one_gpu_gloo $? ""

# The python process itself in the background (a backgrounded shell function would be a subshell,
# and the signal would stop the subshell, not the training); signalled once it has saved a checkpoint
# (a long run: the signal must land while it trains, however fast the machine).
"$py" -m harness train "$recipe" "run.output_dir=$work/term" "${base[@]}" train.epochs=5000 >>"$work/log.txt" 2>&1 &
pid=$!
for _ in $(seq 600); do
    compgen -G "$work/term/checkpoints/step-*" >/dev/null && break
    sleep 0.2
done
kill -TERM "$pid"
wait "$pid"
code=$?
[ "$code" = 75 ] && [ -f "$work/term/PREEMPTED.json" ] && \
    train "$work/term" train.epochs=5000 train.max_steps=$(("$("$py" -c "import json; print(json.load(open('$work/term/PREEMPTED.json'))['step'])")" + 20)) \
    && grep -q "resumed from" "$work/log.txt"
result sigterm_preemption $? "exit=$code"

echo "gpu_check: $passed passed, $failed failed (logs: $work/log.txt)"
[ "$failed" = 0 ]
