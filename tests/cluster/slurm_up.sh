#!/usr/bin/env bash
# Start a three-node SLURM on this machine for tests/test_cluster.py (Debian 12, as root).
#
#   tests/cluster/slurm_up.sh      # then: sinfo, sbatch, sacct ... ; stop with slurm_down.sh
#
# munged, MariaDB (a private data directory), slurmdbd, slurmctld and three slurmd run as plain
# background daemons: no systemd. Missing Debian packages are installed with apt-get. The
# partitions and the account are the names workflow/profiles/slurm uses:
#   main (the default): this machine's own node;
#   gpu: nodes equiav-n1 and equiav-n2, two fake GPUs each (GRES backed by /dev/null and
#        /dev/zero: `--gpus` requests schedule, nothing computes on them). Each runs in a network
#        namespace of its own (its own host name and address on a bridge to this machine), so
#        that a job on both nodes talks across a network as on a cluster. As Debian's installer
#        writes it, each node's /etc/hosts maps its own name to 127.0.1.1, an address the other
#        node cannot reach: what launches multi-node training has to cope with that.
# Running it again changes nothing that works; a daemon this script started is restarted when
# its configuration file changed. Only daemons and network devices started or made here are
# recorded (STATE/pids/<name>.pid, STATE/net/), and only those does slurm_down.sh stop or remove.
#
# Environment: EQUIAV_SLURM_STATE (default /tmp/equiav-slurm): logs, pid files, databases.
#              EQUIAV_SLURM_DB_PORT (default 3307): MariaDB on 127.0.0.1 (not 3306, so that a
#              MariaDB the machine already runs is left alone).
#              EQUIAV_SLURM_NET (default 10.254.207): the /24 of the bridge (.1, slurmctld's
#              address) and the gpu nodes (.2, .3); no other address is used.
set -euo pipefail
# shellcheck source=tests/cluster/common.sh
source "$(dirname "$0")/common.sh"  # STATE, NODES, BRIDGE, alive, ours

DB_PORT=${EQUIAV_SLURM_DB_PORT:-3307}
NET=${EQUIAV_SLURM_NET:-10.254.207}
CTLD_ADDR=$NET.1
CLUSTER=equiav-ci
ACCOUNT=equiav
GPU_FILES=(/dev/null /dev/zero)
DB_PASSWORD=equiav-ci  # MariaDB listens on 127.0.0.1 only and holds nothing but this test's jobs
HEADER="# written by tests/cluster/slurm_up.sh"
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)

say() { echo "slurm_up: $*"; }
fail() { echo "slurm_up: error: $*" >&2; exit 1; }
# Exit status 3: the packages cannot be installed here (no apt-get, no mirror); tests skip then.
cannot_install() { echo "slurm_up: error: $*" >&2; exit 3; }

# wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds.
wait_until() {
  local limit=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "gave up after ${limit}s waiting for $what (logs: $STATE/log, MariaDB's: $STATE/mysql-run/mariadbd.log)"
    sleep 0.3
  done
}

gone() { ! alive "$@"; }

record() { echo "$2" >"$STATE/pids/$1.pid"; say "started $1 (pid $2)"; }

# restart_if_changed NAME FLAG: stop a daemon of ours whose configuration changed.
restart_if_changed() {
  if [[ $2 == 1 ]] && ours "$1" >/dev/null; then
    say "configuration of $1 changed: restarting it"
    local pid
    pid=$(<"$STATE/pids/$1.pid")
    kill "$pid"
    wait_until 30 "$1 to stop" gone "$pid" "$1"
    rm -f "$STATE/pids/$1.pid"
  fi
}

# install_file PATH MODE OWNER < content: write PATH when its content differs; CHANGED=1 then.
install_file() {
  local new
  new=$(mktemp)
  cat >"$new"
  if cmp -s "$new" "$1"; then
    rm -f "$new"
    return
  fi
  if [[ -e $1 ]] && ! grep -qxF "$HEADER" "$1"; then
    cp -p "$1" "$1.before-equiav"
    say "kept the previous $1 as $1.before-equiav"
  fi
  install -m "$2" -o "$3" "$new" "$1"
  rm -f "$new"
  CHANGED=1
  say "wrote $1"
}

[[ $(id -u) == 0 ]] || fail "must run as root (it installs packages and starts system daemons)"

# --- packages --------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || cannot_install "${missing[*]} missing and no apt-get to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 -qq update || cannot_install "apt-get update failed"
  apt-get -o DPkg::Lock::Timeout=300 -qq install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || cannot_install "apt-get install ${missing[*]} failed"
fi

# --- directories and host name ---------------------------------------------------------------
mkdir -p "$STATE"/{pids,net,run,log,ctld,spool,mysql,mysql-run}
chmod 755 "$STATE"
chown slurm:slurm "$STATE/log" "$STATE/ctld"
chown mysql:mysql "$STATE/mysql" "$STATE/mysql-run"
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
  echo "127.0.0.1 $HOST" >>/etc/hosts  # slurmctld and slurmd must resolve the node's name
  say "added $HOST to /etc/hosts"
fi

# --- the gpu nodes' network -------------------------------------------------------------------
node_addr() { echo "$NET.$(($1 + 2))"; }  # node index -> address
declare -A HOSTS_CHANGED
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  touch "$STATE/net/$BRIDGE"
  say "made bridge $BRIDGE ($CTLD_ADDR/24)"
fi
for i in "${!NODES[@]}"; do
  node=${NODES[i]}
  if [[ ! -e /run/netns/$node ]]; then
    ip netns add "$node"
    touch "$STATE/net/$node"
    ip link add "v-$node" type veth peer name eth0 netns "$node"
    ip link set "v-$node" master "$BRIDGE" up
    ip -n "$node" addr add "$(node_addr "$i")/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    say "made network namespace $node ($(node_addr "$i"))"
  fi
  # The node's processes see /etc/netns/<node>/hosts as /etc/hosts (as `ip netns exec` shows it).
  mkdir -p "/etc/netns/$node"
  CHANGED=0
  install_file "/etc/netns/$node/hosts" 644 root < <(
    echo "$HEADER"
    echo "127.0.0.1 localhost"
    echo "127.0.1.1 $node"
    echo "$CTLD_ADDR $HOST"
    for j in "${!NODES[@]}"; do ((j == i)) || echo "$(node_addr "$j") ${NODES[j]}"; done
  )
  HOSTS_CHANGED[$node]=$CHANGED  # its slurmd sees the new file once restarted
done

# --- configuration ---------------------------------------------------------------------------
# The node's CPUs as slurmd detects them (a mismatch would drain the node).
HARDWARE=$(slurmd -C | head -1 | grep -o 'CPUs=.*ThreadsPerCore=[0-9]*')
REAL_MB=$(slurmd -C | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
MEMORY_MB=$((REAL_MB > 65536 ? REAL_MB : 65536))
GPUS=${#GPU_FILES[@]}

CHANGED=0
mkdir -p /etc/slurm
install_file /etc/slurm/slurm.conf 644 root <<EOF
$HEADER
ClusterName=$CLUSTER
SlurmctldHost=$HOST($CTLD_ADDR)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups (containers and CI machines often lack a writable cgroup tree): processes are
# tracked by parentage, and scancel / --signal reach every process of a job step.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Cores and GPUs are allocated per job; memory is not a consumable here (nothing enforces it),
# so requests only have to fit the node.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The node advertises at least 64 GB, whatever the machine has, so that the profile's
# paper-sized memory requests schedule on a small CI machine (see MEMORY_MB above).
SlurmdParameters=config_overrides
# A node that was down when the daemons stopped comes back as soon as slurmd registers.
ReturnToService=2
# Finished jobs stay in squeue for 5 minutes (the default, spelt out: the executor plugin reads
# it to decide whether squeue can report on finished jobs; sacct keeps them for good).
MinJobAge=300
# Accounting in slurmdbd: sacct (the executor plugin's status command) and accounts.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
# sacct shows each job's comment, where the executor plugin writes the rule and wildcards.
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 $HARDWARE RealMemory=$MEMORY_MB State=UNKNOWN
$(for i in "${!NODES[@]}"; do
  echo "NodeName=${NODES[i]} NodeAddr=$(node_addr "$i") $HARDWARE RealMemory=$MEMORY_MB Gres=gpu:$GPUS State=UNKNOWN"
done)
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$(IFS=,; echo "${NODES[*]}") MaxTime=INFINITE State=UP
EOF
# One fake GPU per device file: SLURM sets CUDA_VISIBLE_DEVICES from their index.
install_file /etc/slurm/gres.conf 644 root < <(
  echo "$HEADER"
  for node in "${NODES[@]}"; do
    for f in "${GPU_FILES[@]}"; do echo "NodeName=$node Name=gpu File=$f"; done
  done
)
SLURM_CHANGED=$CHANGED

CHANGED=0
install_file /etc/slurm/slurmdbd.conf 600 slurm <<EOF
$HEADER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASSWORD
StorageLoc=slurm_acct_db
EOF
DBD_CHANGED=$CHANGED

# --- munge -----------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
  mkdir -p /etc/munge
  head -c 1024 /dev/urandom >/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 755 /run/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  wait_until 20 munged bash -c 'munge -n | unmunge'
  record munged "$(</run/munge/munged.pid)"
fi

# --- MariaDB for slurmdbd --------------------------------------------------------------------
SOCKET=$STATE/mysql-run/mysqld.sock
sql() { mariadb --no-defaults --socket="$SOCKET" -uroot "$@"; }
if ! sql -e 'select 1' >/dev/null 2>&1; then
  if [[ ! -d $STATE/mysql/mysql ]]; then
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql" --skip-test-db \
      --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
      || fail "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
  fi
  # --no-defaults: the machine's /etc/mysql settings (datadir, port 3306) are not ours.
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql" \
    --socket="$SOCKET" --pid-file="$STATE/mysql-run/mariadbd.pid" --bind-address=127.0.0.1 \
    --port="$DB_PORT" --log-error="$STATE/mysql-run/mariadbd.log" </dev/null >/dev/null 2>&1 &
  record mariadbd $!
  wait_until 60 MariaDB sql -e 'select 1'
fi
sql -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- slurmdbd, then the cluster and the account in it ----------------------------------------
dbd_port_open() { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }
restart_if_changed slurmdbd "$DBD_CHANGED"
if ! dbd_port_open; then
  rm -f "$STATE/run/slurmdbd.pid"
  /usr/sbin/slurmdbd
  wait_until 60 "slurmdbd on port 6819" dbd_port_open
  record slurmdbd "$(<"$STATE/run/slurmdbd.pid")"
fi
# Registered before slurmctld starts, so that the account can be made at once.
if [[ -z $(sacctmgr -nP list cluster "$CLUSTER" format=cluster) ]]; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
fi
if [[ -z $(sacctmgr -nP list account "$ACCOUNT" format=account) ]]; then
  sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="equiav tests" organization=equiav >/dev/null
fi
# The executor plugin checks that its user belongs to the profile's slurm_account.
if [[ -z $(sacctmgr -nP list association user=root account="$ACCOUNT" format=user) ]]; then
  sacctmgr -i add user root account="$ACCOUNT" cluster="$CLUSTER" >/dev/null
fi

# --- slurmctld and slurmd --------------------------------------------------------------------
restart_if_changed slurmd "$SLURM_CHANGED"  # the one slurmd of an older version of this script
restart_if_changed "slurmd@$HOST" "$SLURM_CHANGED"
for node in "${NODES[@]}"; do
  restart_if_changed "slurmd@$node" $((SLURM_CHANGED | HOSTS_CHANGED[$node]))
done
restart_if_changed slurmctld "$SLURM_CHANGED"
if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
  rm -f "$STATE/run/slurmctld.pid"
  /usr/sbin/slurmctld
  wait_until 60 slurmctld bash -c "scontrol ping | grep -q 'is UP'"
  record slurmctld "$(<"$STATE/run/slurmctld.pid")"
fi
# start_slurmd NODE [COMMAND PREFIX...]: slurmd of NODE (its pid file names it), unless it runs.
start_slurmd() {
  local node=$1 pidfile=$STATE/run/slurmd-$1.pid
  shift
  if ! { [[ -s $pidfile ]] && alive "$(<"$pidfile")" slurmd; }; then
    rm -f "$pidfile"
    mkdir -p "$STATE/spool/$node"
    "$@" /usr/sbin/slurmd -N "$node"
    wait_until 30 "slurmd of $node" test -s "$pidfile"
    record "slurmd@$node" "$(<"$pidfile")"
  fi
}
start_slurmd "$HOST"
# A gpu node's slurmd: in the node's network namespace, with a host name (UTS namespace) and
# /etc/hosts (mount namespace) of its own. Not `ip netns exec`, whose fresh /sys lacks the
# cgroup mounts that slurmd needs.
in_node() {
  unshare --mount --uts --propagation private sh -c \
    'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec nsenter --net="/run/netns/$0" "$@"' "$@"
}
for node in "${NODES[@]}"; do start_slurmd "$node" in_node "$node"; done
node_idle() {
  case $(sinfo -h -n "$1" -o %T | head -1) in
    idle | mixed | allocated | completing) return 0 ;;
    down* | drain*) scontrol update nodename="$1" state=resume ;;  # left over from an old run
  esac
  return 1
}
for node in "$HOST" "${NODES[@]}"; do wait_until 60 "node $node to be idle" node_idle "$node"; done
say "up: cluster $CLUSTER, partitions main ($HOST) and gpu (${NODES[*]}, $GPUS fake GPUs each), account $ACCOUNT"
