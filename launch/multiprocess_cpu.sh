#!/usr/bin/env bash
# N local processes on CPU, as a multi-host job would run them: each gets its own
# simulated devices, the KVJ_* coordinator variables and gloo collectives, and runs the
# same entry point. If one process fails, the others are stopped and its status returned.
#
#   launch/multiprocess_cpu.sh [--dry-run] [-n N] [--devices-per-process D] [--port P]
#                              [--] --config=experiments/demo.py [flags for kimi_vl_jax.main]
#
# Defaults: N=2, D=2, port 12355 on 127.0.0.1.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

dry_run=0
num_processes=2
devices=2
port=12355
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n|--num-processes) num_processes="${2:?-n needs a value}"; shift 2 ;;
    --num-processes=*) num_processes="${1#*=}"; shift ;;
    --devices-per-process) devices="${2:?--devices-per-process needs a value}"; shift 2 ;;
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --port=*) port="${1#*=}"; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "-n must be a positive integer, got '$num_processes'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$devices'"
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

python="$(default_python)"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
commands=()
for (( i = 0; i < num_processes; i++ )); do
  cmd=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu "KVJ_COORDINATOR=127.0.0.1:$port"
       "KVJ_NUM_PROCESSES=$num_processes" "KVJ_PROCESS_ID=$i" KVJ_CPU_COLLECTIVES=gloo
       "$python" -m kimi_vl_jax.main "${args[@]}")
  commands+=("$(quote_cmd "${cmd[@]}")")
done

if (( dry_run )); then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for (( i = 0; i < num_processes; i++ )); do
  eval "${commands[$i]} &"   # env execs python: $! is the process itself
  pids+=("$!")
done
for (( finished = 0; finished < num_processes; finished++ )); do
  status=0
  wait -n || status=$?
  if (( status != 0 )); then
    echo "error: multiprocess_cpu.sh: a process exited with status $status; stopping the others" >&2
    exit "$status"
  fi
done
pids=()  # all exited: nothing left for the EXIT trap to stop
