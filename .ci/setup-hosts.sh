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
  if [ "$(id -u)" != 0 ]; then
    echo "setup-hosts: need root to install: ${need[*]}" >&2
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
  echo "setup-hosts: installed ${need[*]}"
fi

# sshd's privilege-separation directory (normally made by the service unit / tmpfiles.d).
mkdir -p /run/sshd
chmod 755 /run/sshd
