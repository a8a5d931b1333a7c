#!/usr/bin/env bash
# A throw-away TWO-node SLURM cluster on ONE machine (Debian's slurm-wlm 22.05 + munge), for CI and by hand.
# Each "node" is a network namespace with its own address on a private bridge, a UTS namespace with its
# own hostname (node1, node2) and a mount namespace whose /etc/hosts names the two nodes; each runs its
# own slurmd (`-N node1` / `-N node2`, own spool, log and pid files, NodeAddr = its address).
# munged and slurmctld run in the machine's own namespaces. Everything else (munge key and socket,
# slurm.conf, state, spool, logs, pid files) lives under DIR: the machine's /etc/slurm, /etc/munge,
# /etc/hosts and any SLURM or munge already running are left alone.
#
#   .ci/slurm-two-nodes.sh start DIR          install the packages if needed (root), then bring it all up
#   .ci/slurm-two-nodes.sh stop DIR           cancel the jobs, stop exactly the daemons of DIR, kill what is
#                                             left inside its namespaces, delete its namespaces, veths, bridge
#   .ci/slurm-two-nodes.sh on DIR NODE CMD... run CMD "on" node1 / node2 (inside its namespaces)
#   .ci/slurm-two-nodes.sh logs DIR           print the tails of the daemon logs
#   .ci/slurm-two-nodes.sh status DIR         the network, namespaces, daemons and what runs on each node
#
# Clients find the cluster through `export SLURM_CONF=DIR/etc/slurm.conf` (printed by start); DIR/env
# holds the names and addresses (NET, BRIDGE, NS1, NS2, ADDR1, ADDR2, ...). DIR/bin/node-ssh is an
# ssh stand-in for hydra (`mpiexec -launcher ssh -launcher-exec DIR/bin/node-ssh -hosts node1,node2`).
#
# Network safety: the only addresses used are those of one private /24, 10.231.N.0/24 (N = 40..49, the
# first one whose bridge name is free and that no route or address of this machine touches), put on the
# bridge (.1, the controller's side) and on the two namespaces (.11 = node1, .12 = node2). Nothing is
# routed or NATed beyond the bridge.
#
# start exits 77 (after a line "SKIPPED: ...") when it cannot run here: not root, no apt/packages, or no
# network namespaces. Knobs: SLURM_CI_NODE_CPUS (CPUs each node declares, default 8: oversubscribed on
# purpose, both nodes share this machine's cores and CI runs several small jobs side by side),
# SLURM_CI_PORTS ("ctld,slurmd"), SLURM_CI_NO_INSTALL=1 (never call apt-get).
#
# Pitfalls met while writing it (see also jobs/README.md):
# - slurmd is started with `nsenter --net=/run/netns/NAME`, not `ip netns exec`, which remounts /sys for
#   the namespace: /sys/fs/cgroup disappears and slurmd fails ("Unable to initialize cgroup plugin").
# - SlurmctldHost must name this machine's short hostname (with the bridge address in brackets), or
#   slurmctld says "This host ... not a valid controller".
# - every directory above DIR must be traversable by the munge user (mktemp -d makes 0700: chmod 755).
# - the nodes share the machine's cores and see all of them: a rank must size its torch threads from
#   what SLURM gave it (mpifedmeta's default is one thread per rank).
# - UCX decides "same machine, shared memory possible" from /proc/sys/kernel/random/boot_id, identical in
#   every namespace of one kernel: each node gets its own boot id (bind-mounted, see on_node).
# - a name the nodes must resolve (hydra's control port "node1:PORT", mpiexec -hosts node1,node2) needs
#   the nodes' own /etc/hosts: bind-mounted in each node's mount namespace; the machine's stays untouched.
set -euo pipefail

cmd=${1:-}
DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop|on|logs|status DIR [NODE CMD...]" >&2; exit 2; }
case $DIR in /*) ;; *) DIR=$(pwd)/$DIR ;; esac

export PATH=$PATH:/usr/sbin:/sbin
say() { echo "[slurm-two-nodes $(date +%T)] $*"; }
NODES=(node1 node2)

load_env() { [ -f "$DIR/env" ] && . "$DIR/env"; }

logs() {
  local f
  for f in "$DIR"/log/*.log; do
    [ -f "$f" ] || continue
    echo "----- tail $f"
    tail -n 30 "$f"
  done
}

need_packages() {
  local missing=0 c
  for c in munged mungekey slurmctld slurmd sbatch scontrol squeue sinfo srun scancel nsenter unshare ip; do
    command -v "$c" >/dev/null 2>&1 || missing=1
  done
  return $((1 - missing))   # 0 = something is missing
}

install_packages() {
  need_packages || return 0
  if [ "${SLURM_CI_NO_INSTALL:-0}" = 1 ]; then
    echo "SKIPPED: SLURM/munge/iproute2 are not installed and SLURM_CI_NO_INSTALL=1"; return 77
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "SKIPPED: SLURM/munge are not installed and there is no apt-get"; return 77
  fi
  local pkgs="slurmctld slurmd slurm-client munge iproute2 util-linux"
  say "apt-get install $pkgs"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  if ! apt-get install -y -qq --no-install-recommends $pkgs >"$DIR/apt.log" 2>&1; then
    apt-get update -qq >>"$DIR/apt.log" 2>&1 || true
    # shellcheck disable=SC2086
    if ! apt-get install -y -qq --no-install-recommends $pkgs >>"$DIR/apt.log" 2>&1; then
      tail -n 5 "$DIR/apt.log"
      echo "SKIPPED: apt-get could not install $pkgs (see above)"; return 77
    fi
  fi
  if need_packages; then
    echo "SKIPPED: packages installed but some SLURM/munge/iproute2 commands are still missing"; return 77
  fi
}

free_ports() {
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(",".join(str(s.getsockname()[1]) for s in socks))
EOF
}

wait_pidfile() {   # wait_pidfile FILE SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# a /24 of 10.231.40-49 that nothing on this machine uses: no address in it, no route into or over it
# (except a default route), and our bridge name for it is free. Claims it by creating the bridge.
claim_network() {
  local n net br
  for n in $(seq 40 49); do
    net=10.231.$n br=mfm${n}br
    ip link show "$br" >/dev/null 2>&1 && continue
    [ -n "$(ip -4 addr show to "$net.0/24" 2>/dev/null)" ] && continue
    [ -n "$(ip -4 route show root "$net.0/24" 2>/dev/null)" ] && continue
    [ -n "$(ip -4 route show match "$net.0/24" 2>/dev/null | grep -v '^default')" ] && continue
    ip netns list 2>/dev/null | grep -q "^mfm$n-" && continue
    if ip link add name "$br" type bridge 2>/dev/null; then
      echo "$n"; return 0
    fi
  done
  return 1
}

# run a command inside NODE's namespaces: net (the address), uts (the hostname), and a fresh mount
# namespace (slave of the machine's: every file system is shared) in which DIR/etc/hosts is /etc/hosts
# and the node's own boot id is /proc/sys/kernel/random/boot_id. The boot id is what UCX (the mpich
# wheel's network layer) compares to decide that two processes share a machine and may use shared
# memory: without it the two "nodes" look like one machine to UCX, which then tries shared memory
# between them and aborts (mm_posix.c "open(/proc/PID/fd/N) failed").
on_node() {   # on_node NODE CMD...
  local node=$1 i ns=""; shift
  for i in 1 2; do [ "$node" = "node$i" ] && ns=$(eval echo "\$NS$i"); done
  [ -n "$ns" ] || { echo "$0: unknown node $node (node1 or node2)" >&2; return 2; }
  exec nsenter --net="/run/netns/$ns" --uts="$DIR/ns/uts-$node" \
    unshare --mount --propagation slave \
    sh -c 'mount --bind "$1" /etc/hosts && mount --bind "$2" /proc/sys/kernel/random/boot_id && shift 2 && exec "$@"' \
    on-node "$DIR/etc/hosts" "$DIR/etc/boot_id-$node" "$@"
}

start() {
  if [ "$(id -u)" != 0 ]; then
    echo "SKIPPED: starting SLURM daemons and network namespaces needs root (uid $(id -u))"; return 77
  fi
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  chmod 755 "$DIR"
  [ ! -f "$DIR/env" ] || { say "$DIR already holds a cluster (stop it first)"; return 1; }
  install_packages || return $?
  mkdir -p "$DIR"/{etc,run,state,spool,log,munge,ns,bin}
  chmod 755 "$DIR/munge" "$DIR/run"   # munged wants the socket directory traversable

  # --- the network: bridge + two namespaces joined to it by veth pairs ----------------------------
  local n
  if ! n=$(claim_network); then
    echo "SKIPPED: no free private /24 in 10.231.40-49.0/24 (or this machine cannot create a bridge)"; return 77
  fi
  NET=10.231.$n
  cat >"$DIR/env" <<ENV
NET=$NET
BRIDGE=mfm${n}br
NS1=mfm$n-node1
NS2=mfm$n-node2
VETH1=mfm${n}v1
VETH2=mfm${n}v2
ADDR0=$NET.1
ADDR1=$NET.11
ADDR2=$NET.12
ENV
  load_env
  ip addr add "$ADDR0/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local i ns veth addr
  for i in 1 2; do
    ns=$(eval echo "\$NS$i") veth=$(eval echo "\$VETH$i") addr=$(eval echo "\$ADDR$i")
    if ! ip netns add "$ns"; then
      echo "SKIPPED: this machine cannot create network namespaces (ip netns add failed)"; return 77
    fi
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE"
    ip link set "$veth" up
    nsenter --net="/run/netns/$ns" ip addr add "$addr/24" dev eth0
    nsenter --net="/run/netns/$ns" ip link set eth0 up
    nsenter --net="/run/netns/$ns" ip link set lo up
    # a persistent UTS namespace (hostname nodeI), bind-mounted on a file under DIR
    cat /proc/sys/kernel/random/uuid >"$DIR/etc/boot_id-node$i"
    : >"$DIR/ns/uts-node$i"
    unshare --uts="$DIR/ns/uts-node$i" hostname "node$i"
  done
  cat >"$DIR/etc/hosts" <<HOSTS
# generated by .ci/slurm-two-nodes.sh: what /etc/hosts says inside the test nodes
127.0.0.1 localhost
::1 localhost
$ADDR1 node1
$ADDR2 node2
HOSTS
  # hydra's ssh stand-in: `node-ssh [ssh options] HOST COMMAND...` runs COMMAND inside HOST's
  # namespaces (HOST: node1/node2 or their address), as ssh would run it by the remote shell
  cat >"$DIR/bin/node-ssh" <<SSH
#!/bin/bash
# generated by .ci/slurm-two-nodes.sh for $DIR: an ssh stand-in that enters a test node
while [[ \${1:-} == -* ]]; do shift; done
host=\${1:?usage: node-ssh [options] HOST COMMAND...}; shift
case \$host in node1 | $ADDR1) node=node1 ;; node2 | $ADDR2) node=node2 ;;
  *) echo "node-ssh: \$host is not a node of the test cluster in $DIR" >&2; exit 255 ;; esac
exec "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" on "$DIR" "\$node" sh -c "\$*"
SSH
  chmod 755 "$DIR/bin/node-ssh"

  # --- munge and SLURM ----------------------------------------------------------------------------
  local ports ctld_port slurmd_port sock ncpu
  ports=${SLURM_CI_PORTS:-$(free_ports)}
  ctld_port=${ports%,*}
  slurmd_port=${ports#*,}
  ncpu=${SLURM_CI_NODE_CPUS:-8}
  sock=$DIR/munge/munge.socket
  # job ids that differ from run to run: MPICH names its shared-memory segment after the PMI job name
  # (derived from the job/step id) and orphans it when a rank is killed (see .ci/slurm-cluster.sh)
  local first_job=${SLURM_CI_FIRST_JOB_ID:-$(( ($(date +%s) % 600000) * 100 + 500 + 7 * (n - 40) ))}
  mungekey --create --keyfile="$DIR/munge/munge.key" --force >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 600 "$DIR/munge/munge.key"
  munged --force --socket="$sock" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
         --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_pidfile "$DIR/run/munged.pid" 10 || { say "munged did not start"; logs; return 1; }
  cat >"$DIR/etc/slurm.conf" <<CONF
# generated by .ci/slurm-two-nodes.sh: two nodes in network namespaces on one machine, for CI only
ClusterName=mfmtwo
SlurmctldHost=$(hostname -s)($ADDR0)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~10 s instead of the default 120 s
AuthInfo=socket=${sock},cred_expire=10
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool/slurmd-%n
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd-%n.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# schedule every 2 s (a requeued job restarts ~12 s after its requeue instead of minutes)
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the nodes declare what is configured here, not what slurmd counts (both count the whole machine)
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
FirstJobId=${first_job}
KillWait=10
Waittime=0
NodeName=node1 NodeAddr=${ADDR1} CPUs=${ncpu} State=UNKNOWN
NodeName=node2 NodeAddr=${ADDR2} CPUs=${ncpu} State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$DIR/etc/slurm.conf
  say "network $NET.0/24 on bridge $BRIDGE: node1 $ADDR1 (netns $NS1), node2 $ADDR2 (netns $NS2), controller $ADDR0"
  say "slurm.conf: ${ncpu} CPUs per node, ports ${ctld_port}/${slurmd_port}, first job id ${first_job}"
  slurmctld -i -f "$SLURM_CONF"
  wait_pidfile "$DIR/run/slurmctld.pid" 20 || { say "slurmctld did not start"; logs; return 1; }
  local node
  for node in "${NODES[@]}"; do
    ( on_node "$node" slurmd -f "$SLURM_CONF" -N "$node" )
    wait_pidfile "$DIR/run/slurmd-$node.pid" 20 || { say "slurmd $node did not start"; logs; return 1; }
  done
  for ((i = 0; i < 60; i++)); do
    [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle')" = 2 ] && break
    sleep 0.5
  done
  if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle')" != 2 ]; then
    say "the two nodes did not become idle"; sinfo -N || true; logs; return 1
  fi
  sinfo -N -o '%N %T %c %o'
  say "up: export SLURM_CONF=$SLURM_CONF"
}

stop_pid() {   # stop_pid FILE: SIGTERM the pid in FILE, SIGKILL after 15 s
  local f=$1 pid i
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$(basename "$f" .pid) ($pid) ignores SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

stop() {
  [ -d "$DIR" ] || return 0
  DIR=$(cd "$DIR" && pwd)
  set +e
  load_env
  if [ -f "$DIR/etc/slurm.conf" ] && [ -s "$DIR/run/slurmctld.pid" ] && kill -0 "$(cat "$DIR/run/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$DIR/etc/slurm.conf
    # end the jobs (and with them their slurmstepd) before the daemons go
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --full -u root 2>/dev/null
      local i
      for ((i = 0; i < 20; i++)); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 1
      done
    fi
  fi
  local node ns i p left
  for node in "${NODES[@]}"; do stop_pid "$DIR/run/slurmd-$node.pid"; done
  stop_pid "$DIR/run/slurmctld.pid"
  if [ -s "$DIR/run/munged.pid" ]; then
    munged --stop --socket="$DIR/munge/munge.socket" >/dev/null 2>&1
    stop_pid "$DIR/run/munged.pid"
  fi
  # whatever still runs inside our network namespaces was started there by this cluster (job tasks
  # that outlived their slurmd, a hydra proxy): end it, then delete the namespaces
  for i in 1 2; do
    ns=$(eval echo "\${NS$i:-}")
    [ -n "$ns" ] && [ -e "/run/netns/$ns" ] || continue
    left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "${left// /}" ]; then
      say "ending processes left on node$i: $left"
      for p in $left; do kill -TERM "$p" 2>/dev/null; done
      sleep 1
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
      sleep 0.2
    fi
    ip netns del "$ns"
  done
  for node in "${NODES[@]}"; do
    if [ -e "$DIR/ns/uts-$node" ]; then umount "$DIR/ns/uts-$node" 2>/dev/null; rm -f "$DIR/ns/uts-$node"; fi
  done
  for i in 1 2; do
    p=$(eval echo "\${VETH$i:-}")
    [ -n "$p" ] && ip link show "$p" >/dev/null 2>&1 && ip link del "$p"
  done
  [ -n "${BRIDGE:-}" ] && ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
  # what is left? (nothing, normally)
  left=""
  for i in 1 2; do ns=$(eval echo "\${NS$i:-}"); [ -n "$ns" ] && [ -e "/run/netns/$ns" ] && left+=" netns $ns"; done
  for p in ${VETH1:-} ${VETH2:-} ${BRIDGE:-}; do ip link show "$p" >/dev/null 2>&1 && left+=" link $p"; done
  for p in "$DIR"/run/*.pid; do [ -s "$p" ] && kill -0 "$(cat "$p")" 2>/dev/null && left+=" $(basename "$p")"; done
  rm -f "$DIR/env"
  if [ -n "$left" ]; then say "could not remove:$left"; return 1; fi
  say "stopped the daemons of $DIR and removed its namespaces, veths and bridge${BRIDGE:+ ($BRIDGE, ${NET:-?}.0/24)}"
  return 0
}

status() {
  load_env || { echo "no cluster in $DIR"; return 1; }
  echo "network ${NET}.0/24, bridge $BRIDGE, netns $NS1 / $NS2"
  ip -br addr show "$BRIDGE" 2>/dev/null
  local i ns
  for i in 1 2; do
    ns=$(eval echo "\$NS$i")
    echo "node$i ($ns): $(nsenter --net="/run/netns/$ns" ip -br -4 addr show eth0 2>/dev/null)"
    ip netns pids "$ns" 2>/dev/null | xargs -r ps -o pid=,args= -p 2>/dev/null | sed 's/^/    /'
  done
  [ -f "$DIR/etc/slurm.conf" ] && SLURM_CONF=$DIR/etc/slurm.conf sinfo -N 2>/dev/null
}

case $cmd in
  start) start ;;
  stop) stop ;;
  on) shift 2; load_env || { echo "no cluster in $DIR" >&2; exit 2; }; on_node "$@" ;;
  logs) logs ;;
  status) status ;;
  *) echo "usage: $0 start|stop|on|logs|status DIR [NODE CMD...]" >&2; exit 2 ;;
esac
