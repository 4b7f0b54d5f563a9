#!/usr/bin/env bash
# Start a one-node SLURM cluster on loopback for the tests marked `slurm` (tests/test_slurm.py,
# tests/test_slurm_faults.py).
#
#   sudo tests/slurm/start_cluster.sh                               # with accounting (slurmdbd)
#   sudo COHORTSEG_SLURM_ACCOUNTING=0 tests/slurm/start_cluster.sh  # without (sacct: "disabled")
#
# Idempotent: starts only the daemons that are not running, so it also brings back a controller
# stopped by `tests/slurm/stop_cluster.sh --controller` (the fault tests do that); switching the
# mode restarts the SLURM daemons with the other configuration. tests/slurm/stop_cluster.sh stops all.
# Needs Debian's slurm-wlm + munge, and for accounting slurmdbd + mariadb-server (see .ci/run), and
# root. Writes /etc/slurm/{slurm,gres,slurmdbd}.conf from the templates beside this script (a
# slurm.conf not written by this script is never overwritten unless COHORTSEG_SLURM_FORCE=1),
# starts munged, MariaDB + slurmdbd (accounting mode; a MariaDB already answering on its socket is
# used as it is), slurmctld and slurmd (node `localhost`, 4 CPUs, 64 GB, one GPU GRES backed by
# /dev/null) and waits until `sinfo` shows the node usable (and, with accounting, `sacct` answers).
# Exits non-zero, printing the daemon logs, when the cluster does not come up.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MARKER="cohortseg-test-cluster"
ETC=/etc/slurm
LOGDIR=/var/log/slurm
CTLD_PID=/var/spool/slurmctld/slurmctld.pid
SLURMD_PID=/var/spool/slurmd/slurmd.pid
DBD_PID=/var/spool/slurmdbd/slurmdbd.pid
DB_SOCK=/run/mysqld/mysqld.sock
DB_PID=/run/mysqld/cohortseg-mariadbd.pid  # only a MariaDB this script started (stop_cluster.sh)
TIMEOUT="${COHORTSEG_SLURM_TIMEOUT:-60}"
ACCOUNTING="${COHORTSEG_SLURM_ACCOUNTING:-1}"
case "$ACCOUNTING" in 0|1) ;; *) echo "start_cluster: COHORTSEG_SLURM_ACCOUNTING must be 0 or 1" >&2; exit 1 ;; esac

die() {
  echo "start_cluster: $*" >&2
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" "$LOGDIR/slurmdbd.log" "$LOGDIR/mariadb.log" \
           /var/log/munge/munged.log; do
    if [ -r "$f" ]; then
      echo "----- tail of $f -----" >&2
      tail -n 40 "$f" >&2
    fi
  done
  exit 1
}

[ "$(id -u)" -eq 0 ] || { echo "start_cluster: must run as root" >&2; exit 1; }
for cmd in munged munge unmunge slurmctld slurmd sinfo scontrol; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
  command -v "$cmd" >/dev/null 2>&1 || { echo "start_cluster: '$cmd' not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
if [ "$ACCOUNTING" = 1 ]; then
  for cmd in slurmdbd sacctmgr mariadbd mariadb-admin; do
    command -v "$cmd" >/dev/null 2>&1 || { echo "start_cluster: '$cmd' not found (apt-get install slurmdbd mariadb-server;" \
      "or COHORTSEG_SLURM_ACCOUNTING=0 for a cluster without accounting)" >&2; exit 1; }
  done
fi

alive() {  # alive PIDFILE NAME: the process in PIDFILE is running and is NAME (not a reused pid)
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# --- munge -------------------------------------------------------------------------------------
MUNGE_USER=root
id munge >/dev/null 2>&1 && MUNGE_USER=munge
install -d -m 0700 -o "$MUNGE_USER" /etc/munge /var/lib/munge /var/log/munge
install -d -m 0755 -o "$MUNGE_USER" /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null 2>&1; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown "$MUNGE_USER" /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ "$MUNGE_USER" = root ]; then
    munged --force
  else
    runuser -u munge -- munged
  fi
  for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
  done
  munge -n | unmunge >/dev/null || die "munged did not start"
fi

# --- configuration -----------------------------------------------------------------------------
install -d -m 0755 "$ETC" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd /var/spool/slurmdbd
# the fake GPU of gres.conf: a character device slurmd can stat, with no hardware behind it
ln -sfn /dev/null /var/spool/slurmd/fake-gpu0
if [ -e "$ETC/slurm.conf" ] && ! grep -q "$MARKER" "$ETC/slurm.conf" && [ "${COHORTSEG_SLURM_FORCE:-0}" != 1 ]; then
  echo "start_cluster: $ETC/slurm.conf exists and was not written by this script; not touching it" \
       "(set COHORTSEG_SLURM_FORCE=1 to replace it)" >&2
  exit 1
fi
RENDER="$(mktemp -d)"
trap 'rm -rf "$RENDER"' EXIT
cp "$HERE/gres.conf" "$HERE/slurmdbd.conf" "$RENDER/"
if [ "$ACCOUNTING" = 1 ]; then
  cp "$HERE/slurm.conf" "$RENDER/slurm.conf"
else
  sed -e 's#^AccountingStorageType=.*#AccountingStorageType=accounting_storage/none#' \
      -e '/^AccountingStorage\(Host\|Port\)=/d' "$HERE/slurm.conf" >"$RENDER/slurm.conf"
fi
changed=0
for f in slurm.conf gres.conf; do
  if ! cmp -s "$RENDER/$f" "$ETC/$f"; then
    install -m 0644 "$RENDER/$f" "$ETC/$f"
    changed=1
  fi
done
# slurmdbd refuses a configuration readable by others (it may hold a database password)
cmp -s "$RENDER/slurmdbd.conf" "$ETC/slurmdbd.conf" || install -m 0600 "$RENDER/slurmdbd.conf" "$ETC/slurmdbd.conf"

# --- accounting: MariaDB + slurmdbd ----------------------------------------------------------
db_up() { mariadb-admin --socket="$DB_SOCK" ping >/dev/null 2>&1; }
if [ "$ACCOUNTING" = 1 ]; then
  if ! db_up; then
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null \
      || die "mariadb-install-db failed"
    install -d -m 0755 -o mysql -g mysql /run/mysqld
    # no TCP: slurmdbd reaches it through the socket
    setsid mariadbd --user=mysql --datadir=/var/lib/mysql --socket="$DB_SOCK" --pid-file="$DB_PID" \
      --skip-networking --log-error="$LOGDIR/mariadb.log" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 1 "$TIMEOUT"); do db_up && break; sleep 1; done
    db_up || die "MariaDB did not start"
  fi
  if ! alive "$DBD_PID" slurmdbd; then
    slurmdbd || die "slurmdbd failed to start"
  fi
  for _ in $(seq 1 "$TIMEOUT"); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
  sacctmgr -n list cluster >/dev/null 2>&1 || die "slurmdbd does not answer sacctmgr"
  if [ -z "$(sacctmgr -n -P list cluster cohortseg format=cluster 2>/dev/null)" ]; then
    sacctmgr -i add cluster cohortseg >/dev/null || die "sacctmgr add cluster failed"
  fi
fi

# --- daemons -----------------------------------------------------------------------------------
if [ "$changed" = 1 ] && { alive "$CTLD_PID" slurmctld || alive "$SLURMD_PID" slurmd; }; then
  echo "start_cluster: configuration changed, restarting the daemons"
  "$HERE/stop_cluster.sh" --keep-munge
fi
if ! alive "$CTLD_PID" slurmctld; then
  # -i: ignore state files that do not match the configuration (e.g. from an older template)
  slurmctld -i || die "slurmctld failed to start"
fi
if ! alive "$SLURMD_PID" slurmd; then
  slurmd -N localhost || die "slurmd failed to start"
fi

# --- wait for the node -------------------------------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
  state="$(sinfo -h -N -n localhost -o '%T' 2>/dev/null | head -n 1 || true)"
  case "$state" in
    idle|mixed|allocated|completing) break ;;
    drained*|draining*|down*|inval*|fail*)
      # e.g. drained by an earlier run with another configuration: ReturnToService=2 does not
      # undo a drain, so resume once (and again after 20 s, in case slurmd registered late)
      if [ "$resumed" = 0 ] || [ $((SECONDS % 20)) = 0 ]; then
        scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
        resumed=1
      fi ;;
  esac
  alive "$CTLD_PID" slurmctld || die "slurmctld exited"
  alive "$SLURMD_PID" slurmd || die "slurmd exited"
  if [ "$SECONDS" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true
    scontrol show node localhost >&2 || true
    die "node 'localhost' not idle after ${TIMEOUT}s (state: '${state:-none}')"
  fi
  sleep 1
done
if [ "$ACCOUNTING" = 1 ]; then  # slurmctld registers with slurmdbd a moment after it starts
  for _ in $(seq 1 "$TIMEOUT"); do sacct -n -X -S now >/dev/null 2>&1 && break; sleep 1; done
  sacct -n -X -S now >/dev/null || die "sacct does not answer"
  echo "start_cluster: SLURM is up, with accounting (slurmdbd)"
else
  echo "start_cluster: SLURM is up, without accounting"
fi
sinfo -N -o '%N %T %c %m %G %P'
