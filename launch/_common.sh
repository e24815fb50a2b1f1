# Shared by the launchers (sourced, not run). Each launcher builds its commands as bash
# arrays and hands them to `run_or_print`, so --dry-run prints exactly what would run.

KVJ_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The interpreter: $PYTHON, else the repo's .venv (what `make venv` builds), else python3.
default_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$KVJ_REPO/.venv/bin/python" ]]; then
    echo "$KVJ_REPO/.venv/bin/python"
  else
    echo python3
  fi
}

# One copy-pasteable line for a command array: plain words as they are, others in single
# quotes (readable for the nested --command of tpu_pod.sh, unlike printf %q).
quote_cmd() {
  local out='' arg q="'"
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//$q/$q\\$q$q}' "
    fi
  done
  echo "${out% }"
}

die() {
  echo "error: $(basename "$0"): $*" >&2
  exit 2
}
