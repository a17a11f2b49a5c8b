#!/usr/bin/env bash
# Stop the daemons that tests/cluster/slurm_up.sh started, and only those.
#
#   tests/cluster/slurm_down.sh              # every daemon slurm_up.sh started
#   tests/cluster/slurm_down.sh slurmd@vm ...   # only these of them (slurmd@<node>: a node's)
#
# Each one is recorded in STATE/pids/<name>.pid with its process id; it is stopped only while
# that process still runs the same program. Jobs still queued or running are cancelled first;
# the gpu nodes' network namespaces and bridge go with their slurmd.
# Packages, configuration files and STATE (its databases make the next start quick) are kept.
set -uo pipefail

# shellcheck source=tests/cluster/common.sh
source "$(dirname "$0")/common.sh"  # STATE, NODES, BRIDGE, alive, ours
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

# Stopped in this order: the nodes, the controller, accounting, its database, authentication.
NODE_DAEMONS=()
for pidfile in "$STATE"/pids/slurmd*.pid; do
  [[ -e $pidfile ]] && NODE_DAEMONS+=("$(basename "$pidfile" .pid)")
done
ALL=("${NODE_DAEMONS[@]}" slurmctld slurmdbd mariadbd munged)
EVERYTHING=$(($# == 0))
WANTED=("${@:-${ALL[@]}}")
for name in "${WANTED[@]}"; do
  [[ " ${ALL[*]} " == *" $name "* || $name == slurmd* ]] \
    || { echo "slurm_down: error: unknown daemon $name (one of ${ALL[*]})" >&2; exit 2; }
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

# The gpu nodes' network, with their slurmd: only what slurm_up.sh made (STATE/net/<name>).
for node in "${NODES[@]}"; do
  if ((EVERYTHING)) || wanted "slurmd@$node" && [[ -e $STATE/net/$node ]]; then
    ip netns del "$node" 2>/dev/null  # its end of the veth pair goes with it, and so the other
    rm -f "$STATE/net/$node" "/etc/netns/$node/hosts"
    rmdir "/etc/netns/$node" 2>/dev/null
    say "removed network namespace $node"
  fi
done
left=0
for node in "${NODES[@]}"; do [[ -e $STATE/net/$node ]] && left=1; done
if [[ -e $STATE/net/$BRIDGE ]] && ((!left)); then  # no node of ours left on it
  ip link del "$BRIDGE" 2>/dev/null
  rm -f "$STATE/net/$BRIDGE"
  say "removed bridge $BRIDGE"
fi
say "done"
