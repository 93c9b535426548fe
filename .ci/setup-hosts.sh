#!/usr/bin/env bash
# Install what tests/simhosts.py (simulated hosts: netns + veth + bridge + sshd) needs on a fresh
# Debian machine, so that its tests never skip in CI. Idempotent: when everything is there it
# only checks and returns (no apt-get at all).
#   needs: sshd (openssh-server), ssh + ssh-keygen (openssh-client, pulled in by the server),
#          ip + tc (iproute2), unshare + nsenter (util-linux)
# The package's own ssh service is not started (a temporary policy-rc.d denies it when the
# machine has none): the fixture runs its own sshd per simulated host and needs no system one.
set -euo pipefail

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
{ command -v ssh && command -v ssh-keygen; } >/dev/null 2>&1 || need+=(openssh-client)
{ command -v ip && command -v tc; } >/dev/null 2>&1 || need+=(iproute2)
{ command -v unshare && command -v nsenter; } >/dev/null 2>&1 || need+=(util-linux)

if [ ${#need[@]} -gt 0 ]; then
  bash "$(dirname "$0")/apt-install.sh" setup-hosts "${need[@]}"
fi

# sshd's privilege-separation directory (normally made by the service unit / tmpfiles.d).
mkdir -p /run/sshd
chmod 755 /run/sshd
