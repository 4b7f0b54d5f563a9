#!/usr/bin/env bash
# Stop the one-node test cluster started by tests/slurm/start_cluster.sh (slurmd, slurmctld, munged).
#   tests/slurm/stop_cluster.sh [--keep-munge]
# Only the processes named in the daemons' pid files are signalled. Configuration and state are
# left in place, so start_cluster.sh brings the same cluster back.
set -uo pipefail

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local name="$1" pidfile="$2" pid
  [ -s "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  # only the daemon itself: a stale pid file may name an unrelated process by now
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 40); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "stop_cluster: $name ($pid) did not stop on TERM, sending KILL" >&2
      kill -KILL "$pid" 2>/dev/null
    fi
  fi
  rm -f "$pidfile"
}

[ "$(id -u)" -eq 0 ] || { echo "stop_cluster: must run as root" >&2; exit 1; }
stop_pidfile slurmd /var/spool/slurmd/slurmd.pid
stop_pidfile slurmctld /var/spool/slurmctld/slurmctld.pid
if [ "${1:-}" != "--keep-munge" ]; then
  stop_pidfile munged /run/munge/munged.pid
fi
echo "stop_cluster: stopped"
