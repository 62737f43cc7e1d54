#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by slurm/start_local_slurm.sh:
# slurmd, slurmctld and (unless --keep-munge) munged. Job state is kept.
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_STATE_DIR:-/var/lib/slurm-local}
log() { echo "[stop_local_slurm] $*"; }

stop() {  # stop NAME PIDFILE: SIGTERM, then wait up to 15 s (SIGKILL after that)
  local name=$1 pidfile=$2 pid
  # only the daemon itself: a stale pid file's number may belong to another process by now
  if [[ -f $pidfile ]] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null \
     && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
    log "stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then log "$name still running: SIGKILL"; kill -9 "$pid" || true; fi
  else
    log "$name not running"
  fi
  rm -f "$pidfile"
}

stop slurmd "$STATE_DIR/slurmd.pid"
stop slurmctld "$STATE_DIR/slurmctld.pid"
[[ ${1:-} == --keep-munge ]] || stop munged /run/munge/munged.pid
