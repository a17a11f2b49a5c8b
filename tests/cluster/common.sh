# Sourced by slurm_up.sh and slurm_down.sh: where their state lives and which daemons are theirs.

STATE=${EQUIAV_SLURM_STATE:-/tmp/equiav-slurm}
# The gpu partition's nodes, each in a network namespace of that name, on bridge BRIDGE.
NODES=(equiav-n1 equiav-n2)
BRIDGE=equiav-br0

# alive PID NAME: the process runs program NAME and is not a zombie (the machine's init may
# be slow to reap daemons that exited).
# NAME may be program@node, for a node's slurmd.
alive() {
  [[ -r /proc/$1/comm && $(cat /proc/"$1"/comm 2>/dev/null) == "${2%@*}" ]] || return 1
  [[ $(awk '{print $3}' /proc/"$1"/stat 2>/dev/null) != Z ]]
}

# ours NAME: print the pid slurm_up.sh recorded for daemon NAME while that process still runs it.
ours() {
  local pidfile=$STATE/pids/$1.pid
  [[ -s $pidfile ]] && alive "$(<"$pidfile")" "$1" && cat "$pidfile"
}
