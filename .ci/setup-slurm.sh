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
  if [ "$(id -u)" != 0 ]; then
    echo "setup-slurm: need root to install: ${need[*]}" >&2
    exit 1
  fi
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  echo "setup-slurm: installed ${need[*]}"
fi
