#!/usr/bin/env bash
# A single-node Slurm (controller + node daemon + munge) for the CI's Slurm test, as root, no systemd.
# Debian 12 packages; after ../shared/docs/slurm-recipe.md. Daemon PIDs go to $SLURM_CI_RUN/*.pid so
# that .ci/slurm-down.sh stops exactly these. One fake GPU (File=/dev/null) so `--gpus=1` jobs schedule.
set -euo pipefail
RUN=${SLURM_CI_RUN:-/tmp/slurmci}
mkdir -p "$RUN"
export DEBIAN_FRONTEND=noninteractive
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  # policy-rc.d (exit 101) in the image keeps the packages' postinst from starting the daemons
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
[ -s /etc/munge/munge.key ] || mungekey -c
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
setpriv --reuid=munge --regid=munge --clear-groups /usr/sbin/munged -F >"$RUN/munged.log" 2>&1 &
echo $! >"$RUN/munged.pid"
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
munge -n | unmunge >/dev/null
H=$(hostname -s); CPUS=$(nproc); MEM=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=ci
SlurmctldHost=${H}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ReturnToService=2
# squeue, the profile's status command, must still list finished jobs: keep MinJobAge >= 3 x the
# profile's slurm-init-seconds-before-status-checks
MinJobAge=300
SlurmctldPidFile=/var/spool/slurmctld/slurmctld.pid
SlurmdPidFile=/var/spool/slurmd/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
NodeName=${H} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=${H} Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=1000
CONF
# slurmd 22.05 silently drops a GPU GRES without File= and then drains the node
echo "NodeName=${H} Name=gpu Count=1 File=/dev/null" >/etc/slurm/gres.conf
install -d -m 0755 /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
/usr/sbin/slurmctld -D -c >"$RUN/slurmctld.out" 2>&1 &
echo $! >"$RUN/slurmctld.pid"
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
/usr/sbin/slurmd -D >"$RUN/slurmd.out" 2>&1 &
echo $! >"$RUN/slurmd.pid"
st=""
for _ in $(seq 100); do
  st=$(sinfo -h -n "$H" -o %t 2>/dev/null || true); [[ "$st" == idle* ]] && break; sleep 0.2
done
sinfo -N -l
[[ "$st" == idle* ]] || { scontrol show node "$H"; tail -20 /var/log/slurm/slurmctld.log; exit 1; }
