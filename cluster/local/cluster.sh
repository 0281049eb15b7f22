#!/usr/bin/env bash
# A single-node Ray cluster on this machine: start it, submit crackscale jobs, stop it.
#
#   cluster/local/cluster.sh up [-- EXTRA]          # ray start --head (token auth, dashboard on 127.0.0.1)
#   cluster/local/cluster.sh submit -- python jobs/train.py --config jobs/configs/train.yaml
#   cluster/local/cluster.sh status                 # ray status + ray job list
#   cluster/local/cluster.sh dashboard              # prints the dashboard URL
#   cluster/local/cluster.sh down                   # stop this cluster (the one on RAY_PORT) only
#   cluster/local/cluster.sh down --all             # `ray stop`: every Ray cluster on this machine
#
# Settings come from the environment (defaults in brackets):
#   RAY            the ray CLI                         [.venv/bin/ray if present, else ray]
#   RAY_PORT       GCS port                            [6379]
#   DASHBOARD_HOST where the dashboard listens         [127.0.0.1]
#   DASHBOARD_PORT dashboard / job API port            [8265]
#   NUM_CPUS       logical CPUs Ray may schedule       [all cores]
#   NUM_GPUS       GPUs Ray may schedule               [auto-detected]
#   TEMP_DIR       Ray's session/log directory         [Ray's default, /tmp/ray]
#   OBJECT_STORE_BYTES  object store size              [Ray's default, 30% of RAM]
#   RAY_START_ARGS more `ray start` flags, split on spaces   [none]
#
# Token authentication stays on: `ray start` uses (or creates) ~/.ray/auth_token, and every client
# command here runs with RAY_AUTH_MODE=token, which makes the client send that token.
# `submit` uploads the repository root (minus .gitignore'd files) as the job's working_dir.
# `up -- EXTRA` (or RAY_START_ARGS) passes more flags to `ray start`, e.g. the agents' ports
# (--dashboard-agent-listen-port=..., --ray-client-server-port=...) when several clusters share a machine.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$root/.venv/bin/ray" ]]; then RAY="$root/.venv/bin/ray"; else RAY="ray"; fi
fi
# Put the ray CLI's environment first on PATH: job entrypoints say `python ...`, and the driver
# resolves it through the PATH that `ray start` saw.
if [[ "$RAY" == */* ]]; then PATH="$(cd "$(dirname "$RAY")" && pwd):$PATH"; export PATH; fi
python="$(command -v python3 || command -v python)"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_HOST="${DASHBOARD_HOST:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
dashboard_url="http://127.0.0.1:${DASHBOARD_PORT}"
# Every command here names its cluster; a RAY_ADDRESS meant for another (or `local`) must not leak in.
unset RAY_ADDRESS
# Workers use tf.keras from tf-keras (Ray Train sets this too; Ray Data actors need it as well).
runtime_env='{"env_vars": {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}}'

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }

is_loopback() { [[ "$1" == "127.0.0.1" || "$1" == "localhost" || "$1" == "::1" ]]; }

cmd_up() {
  if ! is_loopback "$DASHBOARD_HOST"; then
    echo "warning: dashboard on $DASHBOARD_HOST:$DASHBOARD_PORT is reachable from the network;" \
         "anyone with the token in ~/.ray/auth_token can run code here. Prefer an SSH tunnel." >&2
  fi
  if [[ -n "$(cluster_pids)" ]]; then
    echo "error: a Ray cluster already runs with its GCS on port $RAY_PORT; use it, or \`$0 down\` first" >&2
    return 2
  fi
  local args=(start --head "--port=${RAY_PORT}" "--dashboard-host=${DASHBOARD_HOST}"
              "--dashboard-port=${DASHBOARD_PORT}" --disable-usage-stats)
  [[ -n "${NUM_CPUS:-}" ]] && args+=("--num-cpus=${NUM_CPUS}")
  [[ -n "${NUM_GPUS:-}" ]] && args+=("--num-gpus=${NUM_GPUS}")
  [[ -n "${TEMP_DIR:-}" ]] && args+=("--temp-dir=${TEMP_DIR}")
  [[ -n "${OBJECT_STORE_BYTES:-}" ]] && args+=("--object-store-memory=${OBJECT_STORE_BYTES}")
  # shellcheck disable=SC2206
  [[ -n "${RAY_START_ARGS:-}" ]] && args+=(${RAY_START_ARGS})
  [[ "${1:-}" == "--" ]] && shift
  # The cluster's processes inherit this: Train V2 frees a stopped Tune trial's placement group by
  # asking the state API, which it cannot find by itself when several clusters share the machine.
  # `ray start` gives the raylet a fixed 30 s to register; on a busy machine it can miss that and
  # leave half a cluster behind. Stop what this port started and try again, three times in all.
  local attempt
  for attempt in 1 2 3; do
    if RAY_API_SERVER_ADDRESS="$dashboard_url" "$RAY" "${args[@]}" "$@"; then break; fi
    cmd_down >/dev/null
    if [[ "$attempt" -eq 3 ]]; then
      echo "error: ray start failed three times; see ${TEMP_DIR:-/tmp/ray}/session_latest/logs/raylet.out" >&2
      return 1
    fi
    echo "(ray start failed; stopped what it left and trying again, attempt $((attempt + 1)))" >&2
    sleep 2
  done
  # The job API answers a little after `ray start` returns; wait so `submit` can follow at once.
  local i
  for i in $(seq 1 60); do
    if RAY_API_SERVER_ADDRESS="$dashboard_url" "$RAY" job list >/dev/null 2>&1; then
      echo "Ray is up. Dashboard: $dashboard_url (token: ~/.ray/auth_token)"
      return 0
    fi
    sleep 1
  done
  echo "error: the job API at $dashboard_url did not answer within 60 s; see ${TEMP_DIR:-/tmp/ray}/session_latest/logs/dashboard.log" >&2
  return 1
}

cmd_submit() {
  [[ "${1:-}" == "--" ]] && shift
  if [[ $# -eq 0 ]]; then
    echo "usage: $0 submit -- python jobs/train.py --config jobs/configs/train.yaml [--set key=value ...]" >&2
    return 2
  fi
  cd "$root"
  # Right after `up` the head's dashboard agent may still be starting; the job API then refuses the
  # submission (before creating any job) with "No available agent". Retry only that case.
  local out rc attempt
  out="$(mktemp)"
  for attempt in 1 2 3 4 5 6; do
    set +e
    RAY_API_SERVER_ADDRESS="$dashboard_url" "$RAY" job submit --working-dir . \
      --runtime-env-json "$runtime_env" -- "$@" 2>&1 | tee "$out"
    rc="${PIPESTATUS[0]}"
    set -e
    if [[ "$rc" -ne 0 ]] && grep -q "No available agent to submit job" "$out"; then
      echo "(job agent not ready yet; retrying in 5 s, attempt $attempt)" >&2
      sleep 5
      continue
    fi
    break
  done
  rm -f "$out"
  return "$rc"
}

cmd_status() {
  "$RAY" status --address "127.0.0.1:${RAY_PORT}"
  RAY_API_SERVER_ADDRESS="$dashboard_url" "$RAY" job list
}

# The Ray processes of the cluster whose GCS listens on RAY_PORT: every process whose command line
# names that GCS port (gcs_server, raylet, dashboard, monitors, client server), and all their
# descendants (dashboard modules, agents, workers). Other Ray clusters on the machine are untouched.
cluster_pids() {
  "$python" - "$RAY_PORT" <<'PY'
import os, re, sys
port = sys.argv[1]
own = re.compile(r"(--gcs[-_]address=\S+:%s\b|--gcs_server_port=%s\b|--address=\S+:%s\b)" % (port, port, port))
parent, roots = {}, set()
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
    except OSError:
        continue
    parent[pid] = ppid
    if own.search(args):
        roots.add(pid)
found, grew = set(roots), True
while grew:
    grew = False
    for pid, ppid in parent.items():
        if ppid in found and pid not in found:
            found.add(pid)
            grew = True
found.discard(str(os.getpid()))
print(" ".join(sorted(found, key=int)))
PY
}

cmd_down() {
  if [[ "${1:-}" == "--all" ]]; then
    # Every Ray process on this machine that `ray start` launched, whichever cluster it belongs to.
    "$RAY" stop || true
    "$RAY" stop --force >/dev/null 2>&1 || true
    echo "All Ray clusters on this machine stopped."
    return 0
  fi
  local pids i
  pids="$(cluster_pids)"
  if [[ -z "$pids" ]]; then
    echo "No Ray cluster with its GCS on port $RAY_PORT is running."
    return 0
  fi
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for i in $(seq 1 20); do
    pids="$(cluster_pids)"
    [[ -z "$pids" ]] && break
    sleep 0.5
  done
  if [[ -n "$pids" ]]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 1
  fi
  pids="$(cluster_pids)"
  if [[ -n "$pids" ]]; then
    echo "error: Ray processes of the cluster on port $RAY_PORT still running: $pids" >&2
    return 1
  fi
  echo "Ray cluster on port $RAY_PORT stopped."
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  submit) shift; cmd_submit "$@" ;;
  status) shift; cmd_status "$@" ;;
  dashboard) echo "$dashboard_url" ;;
  down) shift; cmd_down "$@" ;;
  -h|--help|help|"") usage ;;
  *) echo "unknown command: $1" >&2; usage >&2; exit 2 ;;
esac
