#!/usr/bin/env bash
# Stop the one-node test cluster started by tests/slurm/start_cluster.sh.
#   tests/slurm/stop_cluster.sh                 # slurmd, slurmctld, slurmdbd, its MariaDB, munged
#   tests/slurm/stop_cluster.sh --keep-munge    # the same but munged (start_cluster.sh's restart)
#   tests/slurm/stop_cluster.sh --controller    # slurmctld only: a controller outage (fault tests);
#                                               # start_cluster.sh brings it back with its state
# Only the processes named in the daemons' pid files are signalled (a MariaDB that start_cluster.sh
# did not start is left alone). Configuration and state are left in place, so start_cluster.sh
# brings the same cluster back, with its queued and running jobs.
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
if [ "${1:-}" = "--controller" ]; then
  stop_pidfile slurmctld /var/spool/slurmctld/slurmctld.pid
  echo "stop_cluster: slurmctld stopped"
  exit 0
fi
stop_pidfile slurmd /var/spool/slurmd/slurmd.pid
stop_pidfile slurmctld /var/spool/slurmctld/slurmctld.pid
if [ "${1:-}" != "--keep-munge" ]; then
  stop_pidfile slurmdbd /var/spool/slurmdbd/slurmdbd.pid
  stop_pidfile mariadbd /run/mysqld/cohortseg-mariadbd.pid
  stop_pidfile munged /run/munge/munged.pid
fi
echo "stop_cluster: stopped"
