#!/usr/bin/env bash
# Start a one-node SLURM cluster on loopback for the tests marked `slurm` (tests/test_slurm.py).
#
#   sudo tests/slurm/start_cluster.sh      # idempotent; tests/slurm/stop_cluster.sh stops it
#
# Needs Debian's slurm-wlm + munge (see .ci/run) and root. Writes /etc/slurm/{slurm,gres}.conf from
# the templates beside this script (a slurm.conf not written by this script is never overwritten
# unless COHORTSEG_SLURM_FORCE=1), starts munged, slurmctld and slurmd (node `localhost`, 4 CPUs,
# 64 GB, one GPU GRES backed by /dev/null) and waits until `sinfo` shows the node idle.
# Exits non-zero, printing the daemon logs, when the cluster does not come up.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
MARKER="cohortseg-test-cluster"
ETC=/etc/slurm
LOGDIR=/var/log/slurm
CTLD_PID=/var/spool/slurmctld/slurmctld.pid
SLURMD_PID=/var/spool/slurmd/slurmd.pid
TIMEOUT="${COHORTSEG_SLURM_TIMEOUT:-60}"

die() {
  echo "start_cluster: $*" >&2
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
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
install -d -m 0755 "$ETC" "$LOGDIR" /var/spool/slurmctld /var/spool/slurmd
# the fake GPU of gres.conf: a character device slurmd can stat, with no hardware behind it
ln -sfn /dev/null /var/spool/slurmd/fake-gpu0
if [ -e "$ETC/slurm.conf" ] && ! grep -q "$MARKER" "$ETC/slurm.conf" && [ "${COHORTSEG_SLURM_FORCE:-0}" != 1 ]; then
  echo "start_cluster: $ETC/slurm.conf exists and was not written by this script; not touching it" \
       "(set COHORTSEG_SLURM_FORCE=1 to replace it)" >&2
  exit 1
fi
changed=0
for f in slurm.conf gres.conf; do
  if ! cmp -s "$HERE/$f" "$ETC/$f"; then
    install -m 0644 "$HERE/$f" "$ETC/$f"
    changed=1
  fi
done

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
    idle|mixed|allocated) break ;;
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
echo "start_cluster: SLURM is up"
sinfo -N -o '%N %T %c %m %G %P'
