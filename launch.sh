#!/usr/bin/env bash
# vitmpp launcher: runs `accelerate launch` (through python -m vitmpp.common.launcher) for one GPU,
# one node or many (SLURM), or CPU processes.
#
#   ./launch.sh pretrain CONFIG [key=value ...] [--resume auto]
#   ./launch.sh finetune CONFIG [key=value ...] [--resume auto]
#   ./launch.sh compare  CONFIG [--jobs N] [--overwrite] [key=value ...]
#   ./launch.sh shards   --source digits --out DIR [...]     (python -m vitmpp.datasets.make_shards)
#   ./launch.sh analyze  --encoder RUN --shards DIR --out DIR
#   ./launch.sh demo                                          (shards -> pretrain -> linear probe, on digits)
#   ./launch.sh test [pytest args]
#   ./launch.sh --dry-run pretrain ...                        (print the launch command, run nothing)
#
# Processes: one per GPU (nvidia-smi), or $VITMPP_NUM_PROCESSES (on a machine without GPUs: CPU
# processes in one gloo group; default 1). Errors are one sentence; the exit status is the
# training script's own (2: a problem with the input, 130: Ctrl-C).
# Under SLURM with several nodes: --num_machines, --machine_rank, --main_process_ip and
# --main_process_port come from SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST and
# MASTER_PORT (default 29500). Run one launch.sh per node (`srun --ntasks-per-node=1`).
# SIGTERM/SIGUSR1 to this script, or to every process of the job (systemd, SLURM's scancel),
# reach the training processes, which save a checkpoint at the next step and exit 0; rerun
# with --resume auto. Ctrl-C does the same and exits
# 130; a second Ctrl-C stops at once (only the steps since the last checkpoint are lost).
# Started in the background by a script (`./launch.sh ... &` without job control), it inherits
# SIGINT ignored, which bash cannot trap: stop such a run with SIGTERM.
# Under SLURM, SIGUSR1 (sbatch --requeue --signal=USR1@120) also requeues the job
# (scontrol requeue, from the first node), which then continues with --resume auto.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi

usage() {  # usage [STATUS]: 0 when asked for (--help), 2 (the default) after a wrong command line
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

count_gpus() {
  if [[ -n "${VITMPP_GPUS_PER_NODE:-}" ]]; then
    echo "$VITMPP_GPUS_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

first_slurm_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
  else
    # without scontrol, expand the first entry of a simple list like node[01-04],other
    local list="${SLURM_JOB_NODELIST%%,*}"
    if [[ "$list" =~ ^([^\[]+)\[([0-9]+) ]]; then
      echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
    else
      echo "$list"
    fi
  fi
}

# A numeric environment variable that is set (empty too) must be a whole number in MIN..MAX: bash's own
# arithmetic would stop on "abc" with "unbound variable", read "08" as octal, or pass "1.5" on to accelerate.
check_number() {  # NAME MIN MAX WHAT
  local name="$1" min="$2" max="$3" what="$4" value
  [[ -v "$name" ]] || return 0
  value="${!name}"
  if [[ ! "$value" =~ ^(0|[1-9][0-9]{0,8})$ ]] || (( 10#$value < min || 10#$value > max )); then
    echo "error: $name='${value//[$'\n\r']/ }' must be $what; fix it, or unset it for the default." >&2
    exit 2
  fi
}

# The `accelerate launch` flags for this machine (and cluster), as an array.
accelerate_flags() {
  local gpus nodes procs
  check_number VITMPP_NUM_PROCESSES 1 999999999 "a whole number of processes, 1 or more"
  check_number VITMPP_GPUS_PER_NODE 0 999999999 "a whole number of GPUs, 0 or more"
  check_number SLURM_GPUS_ON_NODE 0 999999999 "a whole number of GPUs, 0 or more"
  check_number SLURM_NNODES 1 999999999 "a whole number of nodes, 1 or more"
  check_number SLURM_JOB_NUM_NODES 1 999999999 "a whole number of nodes, 1 or more"
  check_number SLURM_NODEID 0 999999999 "a whole number, 0 or more (this node's index)"
  check_number MASTER_PORT 1 65535 "a port number from 1 to 65535"
  gpus="$(count_gpus)"
  nodes="${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}"
  flags=(--num_machines "$nodes" --dynamo_backend no)
  if [[ "$gpus" -eq 0 ]]; then
    procs="${VITMPP_NUM_PROCESSES:-1}"
    flags+=(--num_processes "$procs" --mixed_precision no)
  else
    procs="${VITMPP_NUM_PROCESSES:-$((gpus * nodes))}"
    flags+=(--num_processes "$procs" --mixed_precision bf16)
  fi
  [[ "$procs" -gt 1 ]] && flags+=(--multi_gpu)
  if [[ "$nodes" -gt 1 ]]; then
    if [[ -z "${SLURM_JOB_NODELIST:-}" || "${SLURM_NODEID:-0}" -ge "$nodes" ]]; then
      echo "error: $nodes nodes need SLURM_JOB_NODELIST (their host names) and SLURM_NODEID below $nodes" \
           "(got '${SLURM_JOB_NODELIST:-}' and '${SLURM_NODEID:-0}'); run launch.sh under srun, or set both." >&2
      exit 2
    fi
    flags+=(--machine_rank "${SLURM_NODEID:-0}"
            --main_process_ip "$(first_slurm_host)" --main_process_port "${MASTER_PORT:-29500}"
            --rdzv_backend static)
  fi
  return 0
}

# The command runs in a process group of its own (set -m), so Ctrl-C, which a terminal sends
# to its foreground group, reaches this script alone, and the script decides who hears it.
# Under the launcher that is the training processes, never the launcher itself: torch's elastic
# agent answers a signal of its own with a traceback.
child_pid=""
child_is_launcher=0
interrupts=0
usr1_received=0

forward_signal() {
  # Pass the signal to the training processes (children of `accelerate launch`),
  # not to the launcher itself: they checkpoint and exit 0, and so does it.
  if [[ -n "$child_pid" ]]; then
    pkill "-$1" -P "$child_pid" 2>/dev/null || kill "-$1" "$child_pid" 2>/dev/null || true
  fi
}

on_interrupt() {
  interrupts=$((interrupts + 1))
  if [[ "$child_is_launcher" -eq 0 ]]; then
    kill -INT -- "-$child_pid" 2>/dev/null || true  # the command's whole group, as the terminal would
  elif [[ "$interrupts" -eq 1 ]]; then
    # SIGTERM, not SIGINT: the same checkpoint and stop, but the ranks exit 0, so the launcher stays quiet
    echo "interrupted: stopping with a checkpoint after this step; press Ctrl-C again to stop at once" \
         "and lose the steps since the last checkpoint" >&2
    forward_signal TERM
  else
    # every process at once, the launcher first (it would report the others' deaths); under torchrun
    # each rank leads a process group with its data-loading workers, a single rank shares the launcher's
    local ranks pid
    ranks="$(pgrep -P "$child_pid" || true)"
    kill -KILL -- "-$child_pid" 2>/dev/null || true
    for pid in $ranks; do
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    done
    echo "stopped at once; the steps since the last checkpoint are lost; continue with --resume auto" >&2
  fi
}

run() {
  if [[ "$dry_run" -eq 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  set -m
  "$@" &
  child_pid=$!
  set +m
  trap 'forward_signal TERM' TERM
  trap 'usr1_received=1; forward_signal USR1' USR1
  trap 'on_interrupt' INT
  local status=0
  while true; do
    # (2>/dev/null: no "Killed" notice from bash for the processes a second Ctrl-C ends)
    wait "$child_pid" 2>/dev/null && status=0 || status=$?
    # `wait` returns early (status > 128) when a trapped signal arrives: keep waiting
    if ! kill -0 "$child_pid" 2>/dev/null; then
      break
    fi
  done
  trap - TERM USR1 INT
  if [[ "$interrupts" -gt 0 && "$child_is_launcher" -eq 1 ]]; then
    exit 130
  fi
  if [[ "$usr1_received" -eq 1 && "$status" -eq 0 ]]; then
    requeue_slurm_job || status=$?
  fi
  return "$status"
}

# SLURM's warning before the time limit (`sbatch --signal=USR1@120`): the ranks have saved a
# checkpoint and stopped; the launch.sh of the first node puts the job back in the queue, and the
# job's `--resume auto` continues from that checkpoint when it runs again (needs `sbatch --requeue`
# or a cluster that allows requeueing).
requeue_slurm_job() {
  [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NODEID:-0}" -eq 0 ]] || return 0
  if scontrol requeue "$SLURM_JOB_ID"; then
    echo "requeued SLURM job $SLURM_JOB_ID: it continues from the last checkpoint (--resume auto) when it runs again" >&2
  else
    echo "error: scontrol could not requeue SLURM job $SLURM_JOB_ID; the checkpoint is saved: submit the job" \
         "again (with --resume auto) to continue" >&2
    return 1
  fi
}

launch() {
  local script="$1"
  shift
  accelerate_flags
  child_is_launcher=1
  # only this script passes SIGTERM/SIGUSR1 on (forward_signal): the launcher holds them
  # (common/launcher.py HOLD_STOP_SIGNALS); --dry-run prints the plain command
  local hold=(--hold-stop-signals)
  [[ "$dry_run" -eq 1 ]] && hold=()
  run python -m vitmpp.common.launcher ${hold[@]+"${hold[@]}"} "${flags[@]}" "$script" "$@"
  child_is_launcher=0
}

with_config() {
  # `./launch.sh pretrain CONFIG ...`: a first argument that is a YAML file is the --config
  if [[ $# -gt 0 && "$1" == *.yaml ]]; then
    local config="$1"
    shift
    set -- --config "$config" "$@"
  fi
  [[ $# -eq 0 ]] || printf '%s\0' "$@"
}

command="${1:-}"
[[ -z "$command" ]] && usage
shift

case "$command" in
  pretrain | finetune)
    args=()
    while IFS= read -r -d '' item; do args+=("$item"); done < <(with_config "$@")
    launch "$here/$command/main.py" ${args[@]+"${args[@]}"}
    ;;
  compare)
    args=()
    while IFS= read -r -d '' item; do args+=("$item"); done < <(with_config "$@")
    run python -m vitmpp.experiments.compare ${args[@]+"${args[@]}"}
    ;;
  shards)
    run python -m vitmpp.datasets.make_shards "$@"
    ;;
  analyze)
    run python -m vitmpp.analyze "$@"
    ;;
  demo)
    demo_dir="${VITMPP_DEMO_DIR:-runs/demo}"
    if [[ ! -f "$demo_dir/shards/_info.json" ]]; then
      run python -m vitmpp.datasets.make_shards --source digits --out "$demo_dir/shards" --image-size 32
    fi
    resume=()
    [[ -f "$demo_dir/pretrain/config.yaml" ]] && resume=(--resume auto)
    launch "$here/pretrain/main.py" --config "$here/configs/pretrain/mpp_digits.yaml" "data.shards=$demo_dir/shards" \
      "run.output_dir=$demo_dir" run.name=pretrain ${resume[@]+"${resume[@]}"} "$@"
    launch "$here/finetune/main.py" --config "$here/configs/finetune/linear_digits.yaml" "encoder=$demo_dir/pretrain" \
      "data.shards=$demo_dir/shards" "run.output_dir=$demo_dir" run.name=linear --resume auto
    ;;
  test)
    cd "$here"
    run python -m pytest -q "$@"
    ;;
  -h | --help | help)
    usage 0
    ;;
  *)
    echo "error: unknown command '$command'; use pretrain, finetune, compare, shards, analyze, demo or test." >&2
    exit 2
    ;;
esac
