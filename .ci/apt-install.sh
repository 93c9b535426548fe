#!/usr/bin/env bash
# Shared by .ci/setup-*.sh: `apt-install.sh WHO PACKAGE...` installs the packages on Debian
# without starting any service they ship (a temporary policy-rc.d denies it when the machine has
# none), and says what it installed. Needs root.
set -euo pipefail
who=$1
shift
if [ "$(id -u)" != 0 ]; then
  echo "$who: need root to install: $*" >&2
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
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
echo "$who: installed $*"
