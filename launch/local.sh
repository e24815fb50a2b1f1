#!/usr/bin/env bash
# One host, one process: the entry point with the given flags.
#
#   launch/local.sh [--dry-run] [--] --config=experiments/demo.py --workdir=workdir/demo [flags]
#
# Every argument not meant for this script goes to `python -m kimi_vl_jax.main`.
# --dry-run prints the command instead of running it. $PYTHON overrides the interpreter.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

dry_run=0
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done

cmd=("$(default_python)" -m kimi_vl_jax.main "${args[@]}")
if (( dry_run )); then
  quote_cmd "${cmd[@]}"
else
  exec "${cmd[@]}"
fi
