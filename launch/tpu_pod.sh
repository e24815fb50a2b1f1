#!/usr/bin/env bash
# A TPU pod slice: the same entry point on every host, over `gcloud ... ssh --worker=all`.
# jax finds the pod topology itself (KVJ_AUTO_DISTRIBUTED=1 -> jax.distributed.initialize()).
#
#   launch/tpu_pod.sh --name NAME --zone ZONE [--project P] [--remote-dir DIR]
#                     [--remote-python PY] [--dry-run] [--] --config=experiments/x.py[:arg] [flags]
#
# The repository must already be at DIR (default: kimi-vl-jax under the remote home) on
# every worker, with a TPU build of jax in PY (default: .venv/bin/python inside DIR);
# e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all . NAME:kimi-vl-jax --zone=ZONE`.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

dry_run=0
name=''
zone=''
project=''
remote_dir='kimi-vl-jax'
remote_python='.venv/bin/python'
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --name=*) name="${1#*=}"; shift ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --zone=*) zone="${1#*=}"; shift ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --project=*) project="${1#*=}"; shift ;;
    --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift 2 ;;
    --remote-dir=*) remote_dir="${1#*=}"; shift ;;
    --remote-python) remote_python="${2:?--remote-python needs a value}"; shift 2 ;;
    --remote-python=*) remote_python="${1#*=}"; shift ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1"); shift ;;
  esac
done
[[ -n "$name" ]] || die '--name (the TPU VM name) is required'
[[ -n "$zone" ]] || die '--zone is required'

# The command every worker runs, quoted once for the remote shell.
remote=(env KVJ_AUTO_DISTRIBUTED=1 "$remote_python" -m kimi_vl_jax.main "${args[@]}")
remote_cmd="cd $(printf '%q' "$remote_dir") && $(quote_cmd "${remote[@]}")"

cmd=(gcloud compute tpus tpu-vm ssh "$name" "--zone=$zone")
[[ -n "$project" ]] && cmd+=("--project=$project")
cmd+=(--worker=all "--command=$remote_cmd")

if (( dry_run )); then
  quote_cmd "${cmd[@]}"
else
  command -v gcloud >/dev/null || die 'gcloud is not installed (see https://cloud.google.com/sdk)'
  exec "${cmd[@]}"
fi
