"""phalanx's etcd control plane (coord/etcd.py, etcd_watch.py, etcd_lease.py, election.py)
against a real 3-member etcd cluster on loopback (tests/etcdfix.py): no mocks, real SIGKILLs.

Pure decisions (lease loss, tenure, resume revision, key ranges) are tested without etcd first.
"""

from __future__ import annotations

import threading
import time

import etcdfix
import pytest
from etcdfix import EtcdCluster, free_ports, skip_or_fail

from phalanx.coord.election import Election, LeadershipLost, ends_tenure, holds, still_leads
from phalanx.coord.etcd import (
    Cmp,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Op,
    parse_endpoint,
    range_end,
)
from phalanx.coord.etcd_lease import Lease, keepalive_interval, lease_deadline, lease_lost
from phalanx.coord.etcd_watch import WatchEvent, resume_revision
from phalanx.coord.etcd_wire import b64
from phalanx.errors import ConfigError, RendezvousError

etcd_cluster = etcdfix.etcd_cluster          # the fixtures (an import would be F811 below)
own_etcd_cluster = etcdfix.own_etcd_cluster

_job = iter(range(10**6))


def client(cluster: EtcdCluster, **kw) -> EtcdClient:
    """A client on a fresh job prefix, so tests sharing the module cluster never collide."""
    kw.setdefault("prefix", f"/phalanx/job{next(_job)}-{time.monotonic_ns()}/")
    return EtcdClient(cluster.endpoints, **kw)


def wait_for(cond, timeout: float, what: str) -> float:
    """Seconds until cond() holds; fails after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} not within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - t0


# -- pure decisions, no etcd
@pytest.mark.timeout(5)
def test_pure_rules() -> None:
    assert range_end(b"/phalanx/a/") == b"/phalanx/a0"
    assert range_end(b"a\xff\xff") == b"b" and range_end(b"\xff") == b"\0"
    assert parse_endpoint("10.0.0.1:2379", False) == ("http", "10.0.0.1", 2379)
    assert parse_endpoint("https://[::1]:2379", False) == ("https", "::1", 2379)
    assert parse_endpoint("h:1", True)[0] == "https"
    with pytest.raises(ConfigError, match=r"'nohost' \(--etcd\)"):
        parse_endpoint("nohost", False)
    assert keepalive_interval(3) == 1 and keepalive_interval(0.01) == 0.05
    assert lease_deadline(10.0, 5) == 15.0
    assert not lease_lost(14.9, 15.0) and lease_lost(15.0, 15.0)
    assert lease_lost(0.0, 15.0, server_ttl=0) and not lease_lost(0.0, 15.0, server_ttl=4)
    kv = KeyValue(b"leader", b"a", 9, 7, 2, 42)
    assert holds(kv, 42) and not holds(kv, 41) and not holds(None, 42)
    assert still_leads(7, 7) and not still_leads(8, 7) and not still_leads(None, 7)
    put = WatchEvent("put", b"leader", b"b", 12, 12, 5)
    assert ends_tenure(put, 7) and not ends_tenure(WatchEvent("put", b"leader", b"a", 12, 7, 42), 7)
    assert ends_tenure(WatchEvent("delete", b"leader", b"", 13, 0, 0), 7)
    assert resume_revision(0, 5) == 5 and resume_revision(17, 5) == 18


@pytest.mark.timeout(5)
def test_config_errors_name_the_option(tmp_path) -> None:
    ep = ["127.0.0.1:1"]
    with pytest.raises(ConfigError, match="prefix 'phalanx/j'"):
        EtcdClient(ep, prefix="phalanx/j")
    with pytest.raises(ConfigError, match=r"--etcd-cacert '.*/missing.pem': no such file"):
        EtcdClient(ep, prefix="/p/j/", cacert=str(tmp_path / "missing.pem"))
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="--etcd-cert and --etcd-key go together"):
        EtcdClient(ep, prefix="/p/j/", cert=str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="cannot load the etcd TLS files"):
        EtcdClient(ep, prefix="/p/j/", cacert=str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError, match="no etcd endpoint given"):
        EtcdClient([], prefix="/p/j/")


@pytest.mark.timeout(10)
def test_unreachable_endpoints_fail_fast_naming_them() -> None:
    eps = [f"127.0.0.1:{p}" for p in free_ports(2)]
    c = EtcdClient(eps, prefix="/phalanx/j/", timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(EtcdUnavailable) as info:
        c.put("k", b"v")
    took = time.monotonic() - t0
    assert 0.8 < took < 2.0, took
    msg = str(info.value)
    assert all(ep in msg for ep in eps) and "Connection refused" in msg
    assert "start etcd there" in msg and isinstance(info.value, RendezvousError)


# -- one shared cluster
@pytest.mark.timeout(20)
def test_kv_round_trips_and_cas(etcd_cluster) -> None:
    c = client(etcd_cluster)
    rev = c.put("gen", b"1")
    assert c.get("gen") == (b"1", rev) and c.get("nothing") is None
    c.put("members/a", b"A")
    c.put("members/b", b"")
    assert c.get_prefix("members/") == [(b"members/a", b"A", rev + 1), (b"members/b", b"", rev + 2)]
    assert not c.put_if("gen", b"2", mod_revision=0)          # exists: absent-only CAS fails
    assert not c.put_if("gen", b"2", mod_revision=rev + 99)   # stale revision fails
    assert c.put_if("gen", b"2", mod_revision=rev)
    assert c.get("gen")[0] == b"2"
    assert c.put_if("new", b"x", mod_revision=0) and not c.put_if("new", b"y", mod_revision=0)
    r = c.txn([Cmp("gen", "VALUE", b"2")], [Op("put", "step", b"40"), Op("get", "members/", prefix=True)])
    assert r.succeeded and [kv.key for kv in r.gets[0]] == [b"members/a", b"members/b"]
    assert c.delete("members/", prefix=True) == 2 and c.get_prefix("members/") == []
    assert c.delete("gen") == 1 and c.get("gen") is None
    t0, n = time.monotonic(), 50
    for i in range(n):
        assert c.put_if("cas", str(i).encode(), mod_revision=c.get("cas")[1] if i else 0)
    print(f"CAS (get + put_if) round trip: {(time.monotonic() - t0) / n * 1e3:.2f} ms")
    assert c.status()["version"].startswith("3.")


@pytest.mark.timeout(20)
def test_prefixes_isolate_jobs(etcd_cluster) -> None:
    a = client(etcd_cluster, prefix="/phalanx/a/")
    ab = client(etcd_cluster, prefix="/phalanx/ab/")
    a.put("gen", b"a1")
    ab.put("gen", b"ab1")
    a.put("../ab/gen", b"escape?")  # an opaque key under /phalanx/a/, not a path
    assert ab.get("gen")[0] == b"ab1" and a.get("gen")[0] == b"a1"
    assert [k for k, _, _ in a.get_prefix("")] == [b"../ab/gen", b"gen"]
    assert [k for k, _, _ in ab.get_prefix("")] == [b"gen"]
    assert a.delete("", prefix=True) == 2
    assert ab.get_prefix("") == [(b"gen", b"ab1", ab.get("gen")[1])]
    ab.delete("", prefix=True)


@pytest.mark.timeout(20)
def test_lease_expiry_deletes_keys(etcd_cluster) -> None:
    c = client(etcd_cluster)
    lease = c.grant(1)
    c.put("agent/h1", b"alive", lease=lease)
    took = wait_for(lambda: c.get("agent/h1") is None, 5, "an unrefreshed lease to expire")
    print(f"a 1 s lease without keepalive deleted its key after {took:.2f} s")
    assert c.keepalive_once(lease) == 0
    with Lease(c, 1) as kept:                       # kept alive past its TTL
        c.put("agent/h2", b"alive", lease=kept.id)
        time.sleep(2.2)
        assert c.get("agent/h2") is not None and not kept.lost.is_set()
    assert c.get("agent/h2") is None and kept.lost.is_set()  # stop() revoked it
    lost: list[str] = []
    other = Lease(c, 2, on_lost=lost.append).start()
    c.revoke(other.id)                               # someone else ends it: the holder learns
    assert other.lost.wait(3) and "expired" in lost[0]
    other.stop()


@pytest.mark.timeout(20)
def test_watch_sees_puts_and_deletes(etcd_cluster) -> None:
    c = client(etcd_cluster)
    first = c.put("m/a", b"1")
    c.put("other", b"not watched")
    events: list[WatchEvent] = []
    w = c.watch("m/", first, events.append)          # from the past: replays m/a
    c.put("m/b", b"2")
    c.delete("m/a")
    c.txn([], [Op("put", "m/c", b"3"), Op("put", "m/d", b"4")])  # two events, one revision
    wait_for(lambda: len(events) == 5, 5, "five events")
    assert [(e.type, e.key, e.value) for e in events] == [
        ("put", b"m/a", b"1"), ("put", b"m/b", b"2"), ("delete", b"m/a", b""),
        ("put", b"m/c", b"3"), ("put", b"m/d", b"4")]
    t0 = time.monotonic()
    w.cancel()
    assert not w._thread.is_alive() and time.monotonic() - t0 < 0.5
    c.call("kv/compaction", {"revision": str(c.put("m/e", b"5"))})
    errors: list[Exception] = []
    late = c.watch("m/", first, events.append, on_error=errors.append)  # history is gone
    wait_for(lambda: errors, 5, "the compaction error")
    assert "compacted" in str(errors[0]) and not late._thread.is_alive() and len(events) == 5


@pytest.mark.timeout(20)
def test_oversized_answer_is_refused(etcd_cluster) -> None:
    c = client(etcd_cluster)
    c.put("big", b"x" * 5000)
    small = EtcdClient(etcd_cluster.endpoints, prefix=c.prefix.decode(), max_response=4096)
    with pytest.raises(EtcdError, match="over 4096 bytes"):
        small.get("big")
    assert small.get_prefix("nothing/") == []   # the connection is usable again


@pytest.mark.timeout(30)
def test_election_one_leader_then_failover_and_fencing(etcd_cluster) -> None:
    c1, c2 = client(etcd_cluster), None
    c2 = EtcdClient(etcd_cluster.endpoints, prefix=c1.prefix.decode())
    e1, e2 = Election(c1, ttl=1), Election(c2, ttl=1)
    wins: list = [None, None]

    def run(i: int, e: Election) -> None:
        try:
            wins[i] = e.campaign(f"agent{i}".encode(), timeout=1.0)
        except LeadershipLost as err:
            wins[i] = err
    ts = [threading.Thread(target=run, args=(i, e)) for i, e in enumerate((e1, e2))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    leaders = [w for w in wins if not isinstance(w, Exception)]
    assert len(leaders) == 1, wins
    loser = next(w for w in wins if isinstance(w, Exception))
    assert "still leads" in str(loser)
    old = leaders[0]
    old_e, new_e = (e1, e2) if old is wins[0] else (e2, e1)
    assert old_e.leader() == (old.value, old.revision)
    old_e.fenced_put(old, "gen", b"1")

    got: list = []
    th = threading.Thread(target=lambda: got.append(new_e.campaign(b"next", timeout=10)))
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    old.lease.stop(revoke=False)    # its keepalive dies, as in a paused or cut-off coordinator
    th.join(10)
    took = time.monotonic() - t0
    print(f"new leader {took:.2f} s after the old leader's keepalive stopped (ttl 1 s)")
    new = got[0]
    assert new.revision > old.revision and took < 3.0
    with pytest.raises(LeadershipLost, match="stale"):
        old_e.fenced_put(old, "gen", b"from the old leader")
    assert c1.get("gen")[0] == b"1" and old.lost.is_set()
    new_e.fenced_put(new, "gen", b"2")
    assert not new.lost.is_set() and new_e.leader() == (b"next", new.revision)
    new.resign()
    assert new_e.leader() is None and new.lost.is_set()
    old.resign()


@pytest.mark.timeout(20)
def test_resign_hands_over_at_once(etcd_cluster) -> None:
    c = client(etcd_cluster)
    e = Election(c, ttl=5)
    first = e.campaign(b"a", timeout=2)
    got: list = []
    th = threading.Thread(target=lambda: got.append(e.campaign(b"b", timeout=5)))
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    first.resign()
    th.join(5)
    print(f"resign -> next leader: {(time.monotonic() - t0) * 1e3:.0f} ms")
    assert got and got[0].value == b"b" and time.monotonic() - t0 < 1.0
    got[0].resign()


# -- clusters of their own: members are killed
def _kill_in_use(cluster: EtcdCluster, victim: int, what: str) -> None:
    """Kill `victim`, the first endpoint of a client and of its watch: a put goes through
    another member at once, the watch resumes there, and nothing is lost or repeated."""
    others = [ep for i, ep in enumerate(cluster.endpoints) if i != victim]
    c = EtcdClient([cluster.endpoints[victim], *others], prefix="/phalanx/kill/")
    base = c.put("gen", b"0")
    events: list[WatchEvent] = []
    w = c.watch("", base + 1, events.append)
    assert w.created.wait(5)
    cluster.kill(victim)
    t0 = time.monotonic()
    if what == "follower":  # a txn too: the dead connection is seen before sending on it
        assert c.put_if("gen", b"1", mod_revision=base)
        rev = c.get("gen")[1]
    else:  # a write the follower forwarded to the dead leader is stuck: put is resent, a txn
        rev = c.put("gen", b"1")  # would raise EtcdIndeterminate (it may have been applied)
    print(f"put after SIGKILL of the {what} in use: {(time.monotonic() - t0) * 1e3:.0f} ms")
    assert c._current != 0 and c.get("gen") == (b"1", rev)
    for i in range(2, 6):
        c.put("gen", str(i).encode())
    took = wait_for(lambda: len(events) == 5, 10, "the watch to resume")
    assert [e.value for e in events] == [b"1", b"2", b"3", b"4", b"5"] and w.reconnects >= 1
    print(f"  watch resumed on another member ({w.reconnects} reconnects); all events "
          f"{took * 1e3:.0f} ms after the last put")
    cluster.restart(victim)
    c.put("gen", b"6")
    wait_for(lambda: len(events) == 6, 5, "the sixth event")
    w.cancel()


@pytest.mark.timeout(40)
def test_member_kill_fails_over_and_watch_resumes(own_etcd_cluster) -> None:
    cluster = own_etcd_cluster
    leader = cluster.leader()
    _kill_in_use(cluster, (leader + 1) % 3, "follower")
    _kill_in_use(cluster, cluster.leader(), "raft leader")


@pytest.mark.timeout(40)
def test_quorum_loss_fails_writes_in_time_then_heals(own_etcd_cluster) -> None:
    cluster = own_etcd_cluster
    c = client(cluster, timeout=1.5)
    c.put("gen", b"1")
    lease = Lease(c, 1).start()
    cluster.stop_quorum()
    t0 = time.monotonic()
    with pytest.raises(EtcdUnavailable) as info:
        c.put("gen", b"2")
    took = time.monotonic() - t0
    print(f"write with quorum lost failed after {took:.2f} s (timeout 1.5 s): {info.value}")
    assert took < 2.0 and all(ep in str(info.value) for ep in cluster.endpoints)
    with pytest.raises(EtcdUnavailable):
        c.get("gen")                      # linearizable reads need the quorum too
    assert lease.lost.wait(3), "a lease that cannot be refreshed must be reported lost"
    lease.stop()
    cluster.restart_all()
    t0 = time.monotonic()
    c.put("gen", b"3")
    print(f"write after quorum returned: {(time.monotonic() - t0) * 1e3:.0f} ms")
    assert c.get("gen")[0] == b"3"


@pytest.mark.timeout(40)
def test_tls_member_with_client_certificates(tmp_path) -> None:
    skip_or_fail()
    with EtcdCluster(1, tls=True) as cluster:
        c = EtcdClient(cluster.endpoints, prefix="/phalanx/tls/", cacert=cluster.cacert,
                       cert=cluster.cert, key=cluster.key)
        rev = c.put("gen", b"1")
        assert c.get("gen") == (b"1", rev)
        events: list[WatchEvent] = []
        w = c.watch("", rev, events.append)
        c.put("gen", b"2")
        wait_for(lambda: len(events) == 2, 5, "two events over TLS")
        w.cancel()
        plain = EtcdClient(cluster.endpoints, prefix="/phalanx/tls/", timeout=0.5)
        with pytest.raises(EtcdUnavailable, match=cluster.endpoints[0]):
            plain.get("gen")
        no_cert = EtcdClient(cluster.endpoints, prefix="/phalanx/tls/", timeout=0.5,
                             cacert=cluster.cacert)
        with pytest.raises(EtcdUnavailable, match="SSL"):
            no_cert.get("gen")                  # the member demands a client certificate
        wrong_ca = EtcdClient(cluster.endpoints, prefix="/phalanx/tls/", timeout=0.5,
                              cacert=cluster.cert)
        with pytest.raises(EtcdUnavailable, match="CERTIFICATE_VERIFY_FAILED.*--etcd-cacert"):
            wrong_ca.get("gen")


@pytest.mark.timeout(30)
def test_user_password_and_per_job_permissions() -> None:
    skip_or_fail()
    with EtcdCluster(1) as cluster:
        admin = EtcdClient(cluster.endpoints, prefix="/phalanx/j1/")
        job = b64(b"/phalanx/j1/"), b64(range_end(b"/phalanx/j1/"))
        for path, body in (("auth/user/add", {"name": "root", "password": "rootpw"}),
                           ("auth/user/grant", {"user": "root", "role": "root"}),
                           ("auth/user/add", {"name": "agent", "password": "pw"}),
                           ("auth/role/add", {"name": "j1"}),
                           ("auth/role/grant", {"name": "j1", "perm": {
                               "permType": "READWRITE", "key": job[0], "range_end": job[1]}}),
                           ("auth/user/grant", {"user": "agent", "role": "j1"}),
                           ("auth/enable", {})):
            if path == "auth/user/grant" and body["role"] == "root":
                admin.call("auth/role/add", {"name": "root"})
            admin.call(path, body)
        j1 = EtcdClient(cluster.endpoints, prefix="/phalanx/j1/", user="agent", password="pw")
        rev = j1.put("gen", b"1")
        assert j1.get("gen") == (b"1", rev)
        events: list[WatchEvent] = []
        w = j1.watch("", rev, events.append)        # the watch authenticates too
        wait_for(lambda: len(events) == 1, 5, "a watch event with auth")
        w.cancel()
        j2 = EtcdClient(cluster.endpoints, prefix="/phalanx/j2/", user="agent", password="pw")
        with pytest.raises(EtcdError, match="permission denied"):
            j2.put("gen", b"1")                      # etcd itself keeps jobs apart
        bad = EtcdClient(cluster.endpoints, prefix="/phalanx/j1/", user="agent", password="no")
        with pytest.raises(EtcdError, match="authentication failed"):
            bad.get("gen")
        with pytest.raises(EtcdError, match="user name is empty|permission denied"):
            admin.get("gen")                         # no credentials at all
