#!/usr/bin/env bash
# N transformer-jax processes on this machine, each with its own simulated CPU devices, joined by jax.distributed
# (coordinator 127.0.0.1:PORT, gloo CPU collectives). The multi-host code path without a cluster.
#
#   launch/local_multiprocess.sh [--num_processes=2] [--devices_per_process=4] [--port=PORT] [--logdir=DIR]
#                                [--dry-run] [COMMAND] [transformer-jax flags ...]
#
# COMMAND defaults to `train`; everything else is passed to `transformer-jax COMMAND`. Process 0 writes to this
# terminal (progress bar, final line); process i>0 to LOGDIR/process_i.log. If any process fails, the others are
# stopped and the script exits with that status. Example:
#   launch/local_multiprocess.sh --num_processes=2 --devices_per_process=4 train --workdir=/tmp/mp \
#       --config.num_train_steps=20
# Set TRANSFORMER_JAX to the command that runs the CLI (default: transformer-jax, or python -m transformer_jax.cli
# when it is not on PATH).
set -euo pipefail

num_processes=2
devices_per_process=4
port=""
logdir=""
dry_run=0
args=()

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

while (($#)); do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --logdir=*) logdir="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices_per_process" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: --num_processes and --devices_per_process must be positive integers" >&2
  exit 2
fi
if ((${#args[@]} == 0)) || [[ "${args[0]}" == -* ]]; then
  args=(train "${args[@]}")
fi
if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=12355
  else
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
logdir="${logdir:-${TMPDIR:-/tmp}/transformer_jax_local_mp.$$}"

if [[ -n "${TRANSFORMER_JAX:-}" ]]; then
  read -r -a cli <<< "$TRANSFORMER_JAX"
elif command -v transformer-jax > /dev/null 2>&1; then
  cli=(transformer-jax)
else
  cli=(python3 -m transformer_jax.cli)
fi

envs=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices_per_process}"
      TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1)

command_for() {  # command_for PROCESS_ID -> the full command line of that process in CMD
  CMD=(env "${envs[@]}" "${cli[@]}" "${args[@]:0:1}" "--coordinator_address=127.0.0.1:${port}"
       "--num_processes=${num_processes}" "--process_id=$1" "${args[@]:1}")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i"
    printf '%q ' "${CMD[@]}"
    if ((i > 0)); then printf '> %q 2>&1 &\n' "${logdir}/process_${i}.log"; else printf '&\n'; fi
  done
  echo "wait"
  exit 0
fi

mkdir -p "$logdir"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  if ((i == 0)); then
    "${CMD[@]}" &
  else
    "${CMD[@]}" > "${logdir}/process_${i}.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "started ${num_processes} processes x ${devices_per_process} CPU devices (coordinator 127.0.0.1:${port}); logs of processes 1.. in ${logdir}" >&2

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  set +e
  wait -n
  code=$?
  set -e
  remaining=$((remaining - 1))
  if ((code != 0 && status == 0)); then
    status=$code
    echo "a process exited with status ${code}: stopping the others (see ${logdir})" >&2
    cleanup
  fi
done
exit "$status"
