#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it through a queued resource, copy and install this project on every
# worker, run `transformer-jax train` on all workers at once (--worker=all), stream the logs here, delete the TPU.
#
#   launch/tpu_vm.sh [ACTION] --zone=ZONE [--project=PROJECT] [--accelerator-type=v4-8] [--runtime-version=VERSION]
#                    [--name=NAME] [--spot] [--keep] [--check] [--dry-run] [--] [transformer-jax train flags ...]
#
# ACTION: all (default: create, setup, run, delete), create, setup, run, ssh (worker 0), delete,
#         exec (run the shell command given after -- on every worker, e.g. to mount a shared filesystem),
#         check (only the local compile check below).
#   --name             TPU node name (default transformer-jax-$USER); the queued resource is NAME-qr
#   --accelerator-type v4-8, v4-32, v5litepod-8, v5p-8, v6e-8, ... (default v4-8)
#   --runtime-version  default from the TPU generation: v4 and older tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
#                      v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   --spot             a Spot TPU (cheaper, can be preempted: training saves a checkpoint on SIGTERM; run
#                      again with the same gs:// --workdir to resume: it prints "resumed from step N")
#   --keep             with ACTION=all, do not delete the TPU at the end (or on failure); also what lets `all`
#                      train into a workdir that is not gs:// (it would be deleted with the TPU otherwise)
#   --python           Python for the workers' virtualenv (default 3.11; installed with uv)
#   --check            before creating anything, compile the run's programs for the accelerator type on this
#                      machine (`transformer-jax compile`, libtpu: the [tpu] extra) with the --config flags given;
#                      stop here if they do not fit the chips' HBM
#   --dry-run          print the gcloud commands instead of running them
# Everything after the flags (or after --) goes to `transformer-jax train` on every worker, e.g.
#   launch/tpu_vm.sh --zone=us-central2-b --accelerator-type=v4-32 -- --config=configs/big.py \
#       --config.mesh.data=1 --config.mesh.fsdp=-1 --workdir=gs://MY_BUCKET/runs/big
# The workdir is a gs:// bucket path (the default way: checkpoints, tokenizer and metrics outlive the TPU, every
# worker of a multi-host slice sees it, and a re-created Spot TPU resumes from it). A shared mount (NFS, Filestore)
# works too, with --keep under ACTION=all.
set -euo pipefail

action=all
name="transformer-jax-${USER:-user}"
zone="${ZONE:-}"
project="${PROJECT:-}"
accelerator_type=v4-8
runtime_version=""
spot=0
keep=0
check=0
dry_run=0
python_version=3.11
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
train_args=()

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

while (($#)); do
  case "$1" in
    all|create|setup|run|ssh|exec|delete|check) action="$1" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator-type=*|--accelerator_type=*) accelerator_type="${1#*=}" ;;
    --runtime-version=*|--runtime_version=*) runtime_version="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --python=*) python_version="${1#*=}" ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --check) check=1 ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1") ;;
  esac
  shift
done

if [[ -z "$zone" && "$action" != check ]]; then
  echo "error: --zone is required (e.g. --zone=us-central2-b for v4, us-west4-a for v5e)" >&2
  exit 2
fi
workdir=""
for arg in ${train_args[@]+"${train_args[@]}"}; do
  case "$arg" in --workdir=*) workdir="${arg#*=}" ;; esac
done
if [[ "$action" == all && "$keep" == 0 && "$workdir" != gs://* ]]; then
  echo "error: --workdir=${workdir:-runs/<config name> (the default)} is not a gs:// path: \`all\` deletes the TPU at the end," \
    "and its disk with the checkpoints; use --workdir=gs://BUCKET/runs/NAME (or --keep to keep the TPU)" >&2
  exit 2
fi
if [[ -z "$runtime_version" ]]; then
  case "$accelerator_type" in
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
    *) runtime_version=tpu-ubuntu2204-base ;;
  esac
fi

queued_resource="${name}-qr"
location=(--zone="$zone")
if [[ -n "$project" ]]; then location+=(--project="$project"); fi
# shellcheck disable=SC2088  # the tilde is for the workers' shell
remote_dir='~/transformer_jax'
# shellcheck disable=SC2088
remote_venv='~/transformer_jax_venv'

run() {  # run CMD...: execute, or print it under --dry-run
  if ((dry_run)); then
    printf '%q ' "$@" | sed -e 's/\\~/~/g'
    echo
  else
    "$@"
  fi
}

on_workers() {  # on_workers 'shell command': run it on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all --command="$1"
}

create() {
  local spot_flag=()
  if ((spot)); then spot_flag=(--spot); fi
  run gcloud compute tpus queued-resources create "$queued_resource" --node-id="$name" "${location[@]}" \
    --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" "${spot_flag[@]}"
  if ((dry_run)); then
    echo "# then poll until the state is ACTIVE:"
    run gcloud compute tpus queued-resources describe "$queued_resource" "${location[@]}" --format='value(state.state)'
    return
  fi
  local state=""
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$queued_resource" "${location[@]}" \
      --format='value(state.state)')"
    echo "queued resource ${queued_resource}: ${state}" >&2
    case "$state" in
      ACTIVE) break ;;
      FAILED|SUSPENDED|SUSPENDING)
        gcloud compute tpus queued-resources describe "$queued_resource" "${location[@]}" >&2 || true
        return 1 ;;
    esac
    sleep 30
  done
}

setup() {
  # Copy this working tree (without git history, runs or virtualenvs) to every worker and install it with TPU JAX.
  local tarball="${TMPDIR:-/tmp}/transformer_jax_src.tar.gz"
  run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=venv --exclude=.venv \
    --exclude='__pycache__' --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$tarball" "${name}:transformer_jax_src.tar.gz" "${location[@]}" --worker=all
  on_workers "set -e; rm -rf ${remote_dir} && mkdir -p ${remote_dir} && tar -xzf ~/transformer_jax_src.tar.gz -C ${remote_dir}
command -v uv > /dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
export PATH=\$HOME/.local/bin:\$HOME/.cargo/bin:\$PATH
uv venv --python ${python_version} ${remote_venv}
uv pip install --python ${remote_venv}/bin/python -e ${remote_dir}'[gcs]' 'jax[tpu]>=0.10.2,<0.13' \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
${remote_venv}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
}

train() {
  # All workers start the same command; jax.distributed finds its peers from the TPU metadata. Only process 0
  # prints the progress bar and the final line; everything is streamed here and kept in tpu-NAME.log.
  local quoted=""
  if ((${#train_args[@]})); then quoted="$(printf '%q ' "${train_args[@]}")"; fi
  local remote="cd ${remote_dir} && TF_CPP_MIN_LOG_LEVEL=2 ${remote_venv}/bin/transformer-jax train ${quoted}"
  if ((dry_run)); then
    on_workers "$remote"
  else
    on_workers "$remote" 2>&1 | tee -a "tpu-${name}.log"
  fi
}

compile_check() {
  # The run's config flags only (--config, --config.*): the TPU programs are compiled here, for this slice.
  local config_args=()
  for arg in ${train_args[@]+"${train_args[@]}"}; do
    case "$arg" in --config=*|--config.*) config_args+=("$arg") ;; esac
  done
  run "${TRANSFORMER_JAX:-transformer-jax}" compile --topology="$accelerator_type" ${config_args[@]+"${config_args[@]}"}
}

delete() {
  run gcloud compute tpus queued-resources delete "$queued_resource" "${location[@]}" --force --quiet
}

if ((check)) && [[ "$action" == all || "$action" == create ]]; then compile_check; fi

case "$action" in
  check) compile_check ;;
  create) create ;;
  setup) setup ;;
  run) train ;;
  ssh) run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=0 ;;
  exec)
    if ((${#train_args[@]} == 0)); then echo "error: exec needs a shell command after --" >&2; exit 2; fi
    on_workers "${train_args[*]}" ;;
  delete) delete ;;
  all)
    if ((!keep && !dry_run)); then trap 'echo "deleting ${queued_resource}" >&2; delete' EXIT; fi
    create
    setup
    train
    if ((dry_run && !keep)); then delete; fi
    ;;
esac
