#!/usr/bin/env bash
# Stop what .ci/slurm-up.sh started, by PID (jobs first: they outlive Snakemake and slurmd).
RUN=${SLURM_CI_RUN:-/tmp/slurmci}
scancel --user=root 2>/dev/null || true
for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
for d in slurmd slurmctld munged; do
  [ -f "$RUN/$d.pid" ] || continue
  P=$(cat "$RUN/$d.pid")
  if kill -TERM "$P" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$P" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$P" 2>/dev/null && kill -KILL "$P"
  fi
  rm -f "$RUN/$d.pid"
done
rm -rf /var/spool/slurmctld /var/spool/slurmd /run/munge /var/lib/munge/munged.seed
rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log
