#!/usr/bin/env bash
# Install what tests/etcdfix.py (a real 3-member etcd cluster on loopback, for phalanx's etcd
# control plane: coord/etcd*.py, coord/election.py) needs on a fresh Debian machine, so that
# tests/test_etcd.py never skips in CI. Idempotent: when everything is there it only checks and
# returns (no apt-get at all).
#   needs: etcd (etcd-server, 3.4+: its JSON gateway serves /v3/...), etcdctl (etcd-client, for
#          debugging a failed run), openssl (the TLS test makes a throwaway CA), setpriv
#          (util-linux: members die with the test process)
# Debian has no installable package named `etcd` (bookworm: only etcd-server + etcd-client).
# The package's own etcd service is not started (a temporary policy-rc.d denies it when the
# machine has none): the fixture runs its own members in temporary directories.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)

if [ ${#need[@]} -gt 0 ]; then
  bash "$(dirname "$0")/apt-install.sh" setup-etcd "${need[@]}"
fi

# The gateway paths the client uses (/v3/...) need etcd 3.4 or later.
version=$(etcd --version | sed -n 's/^etcd Version: //p')
case "$version" in
  3.[0-3].*|[0-2].*) echo "setup-etcd: etcd $version is too old: phalanx needs 3.4+" >&2; exit 1 ;;
esac
