#!/usr/bin/env bash
# Install what tests/slurmfix.py (a real Slurm cluster on simulated hosts: slurmctld on the
# machine, one slurmd per simulated host, authenticated by munge) needs on a fresh Debian
# machine, so that tests/test_slurm.py never skips in CI. Idempotent: when everything is there
# it only checks and returns (no apt-get at all).
#   needs: slurmctld, slurmd, munged + mungekey (munge), srun, salloc, sbatch, scontrol
#          (slurm-client, pulled in by slurmd and slurmctld)
# No service is started (a temporary policy-rc.d denies it when the machine has none): the
# fixture runs its own munged, slurmctld and slurmds with a generated key and slurm.conf, and
# needs no system one.
set -euo pipefail

need=()
[ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
[ -x /usr/sbin/slurmd ] || need+=(slurmd)
{ [ -x /usr/sbin/munged ] && command -v mungekey; } >/dev/null 2>&1 || need+=(munge)
{ command -v srun && command -v salloc && command -v sbatch && command -v scontrol; } \
  >/dev/null 2>&1 || need+=(slurm-client)

if [ ${#need[@]} -gt 0 ]; then
  bash "$(dirname "$0")/apt-install.sh" setup-slurm "${need[@]}"
fi
