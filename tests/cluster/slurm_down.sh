#!/usr/bin/env bash
# Stop the daemons that tests/cluster/slurm_up.sh started, and only those.
#
#   tests/cluster/slurm_down.sh              # every daemon slurm_up.sh started
#   tests/cluster/slurm_down.sh slurmd ...   # only these of them
#
# Each one is recorded in STATE/pids/<name>.pid with its process id; it is stopped only while
# that process still runs the same program. Jobs still queued or running are cancelled first.
# Packages, configuration files and STATE (its databases make the next start quick) are kept.
set -uo pipefail

# shellcheck source=tests/cluster/common.sh
source "$(dirname "$0")/common.sh"  # STATE, alive, ours
say() { echo "slurm_down: $*"; }
[[ $(id -u) == 0 ]] || { echo "slurm_down: error: must run as root" >&2; exit 1; }

stop() {
  local pid
  if pid=$(ours "$1"); then
    kill -TERM "$pid"
    for _ in $(seq 100); do alive "$pid" "$1" || break; sleep 0.3; done
    if alive "$pid" "$1"; then
      say "$1 (pid $pid) still runs after 30 s: killing it"
      kill -KILL "$pid"
    fi
    say "stopped $1 (pid $pid)"
  fi
  rm -f "$STATE/pids/$1.pid"
}

# Stopped in this order: the node, the controller, accounting, its database, authentication.
ALL=(slurmd slurmctld slurmdbd mariadbd munged)
WANTED=("${@:-${ALL[@]}}")
for name in "${WANTED[@]}"; do
  [[ " ${ALL[*]} " == *" $name "* ]] || { echo "slurm_down: error: unknown daemon $name (one of ${ALL[*]})" >&2; exit 2; }
done
wanted() { [[ " ${WANTED[*]} " == *" $1 "* ]]; }

if wanted slurmctld && ours slurmctld >/dev/null; then
  jobs=$(squeue -h -o %A | sort -u | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 60); do [[ -z $(squeue -h -o %A) ]] && break; sleep 0.5; done
  fi
fi

for name in "${ALL[@]}"; do
  if wanted "$name"; then stop "$name"; fi
done
say "done"
