"""Protocol fuzzing against a live coordinator: malformed headers and random frames, both
authenticated and not, never kill a connection thread or the server."""

from __future__ import annotations

from coordtools import *  # noqa: F403 - the shared helpers and imports of these tests


# ----------------------------------------------------------------------------- malformed headers
ANSWERED = [
    {}, {"op": 7}, {"op": ["get"]}, {"op": None}, {"op": "x" * 5000}, {"op": "__init__"},
    {"op": "hello"}, {"op": "hello", "worker": 3},
    {"op": "hello", "worker": "w", "heartbeat": "yes"},
    {"op": "hello", "worker": "w", "heartbeat": True, "token": "\u00e9"},
    {"op": "get", "key": ["k"]}, {"op": "get", "key": "k", "timeout": float("nan")},
    {"op": "get", "key": "k", "timeout": float("inf")}, {"op": "wait", "keys": "k"},
    {"op": "add", "key": "k", "amount": 10 ** 4000}, {"op": "add", "key": "k", "amount": 1.5},
    {"op": "join", "worker": "w", "host": "h", "pid": 10 ** 30},
    {"op": "rendezvous", "worker": "w", "timeout": -1},
    {"op": "event", "worker": "w", "kind": "k", "info": [1]},
    {"op": "compare_set", "key": "k", "expected": "zz"},
]
DROPPED = [b"[]", b"1", b'"op"', b"null", b"not json", b'{"op":"\xff"}', b"[" * 50000,
           b'{"op": ' + b"1" * 5000 + b"}", b""]


@pytest.mark.timeout(30)
def test_malformed_headers_get_an_error_or_a_clean_drop(caplog) -> None:
    with serving() as srv:
        c = authed(srv)
        try:
            for h in ANSWERED:
                reply = ask(c, h)
                assert reply["ok"] is False and reply["error"], h
            assert ask(c, {"op": "set", "key": "k"}, b"v")["ok"]  # the connection lives on
        finally:
            c.sock.close()
        for head in DROPPED:
            c = authed(srv)
            send_raw(c, head)
            assert hung_up(c.sock, 3), head[:20]
            c.sock.close()
        assert "frame header is" in caplog.text and "Traceback" not in caplog.text
        assert wait_until(lambda: conn_threads() == 0, 5)


# ----------------------------------------------------------------------------- fuzz
OPS = ["hello", "set", "get", "add", "check", "wait", "compare_set", "delete", "num_keys", "join",
       "heartbeat", "status", "leave", "event", "rendezvous", "nope", "", "_op_set", "__class__"]
BLOCKING = {"get", "wait", "rendezvous"}  # their waits are bounded by 'timeout': keep it short
TEXT = st.text(alphabet="abcw0é/\x00\u2028", max_size=12)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), TEXT,
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([2 ** 63, -(2 ** 64), 10 ** 4000]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(TEXT, inner, max_size=4), max_leaves=8)
SHORT_WAITS = st.one_of(st.floats(max_value=0.05), st.none(), TEXT, st.integers(max_value=0))
INT = st.integers(-3, 3)
WELL_TYPED = {  # each field as a real client sends it, so requests get past validation too
    "worker": TEXT, "key": TEXT, "keys": st.lists(TEXT, max_size=3), "amount": INT,
    "expected": st.binary(max_size=4).map(bytes.hex), "host": TEXT, "rank_hint": INT, "pid": INT,
    "after": INT, "step": INT, "generation": INT, "heartbeat": st.booleans(), "token": TEXT,
    "kind": TEXT, "info": st.dictionaries(TEXT, SCALARS, max_size=3)}
HEADERS = st.one_of(  # requests as a client would send them, and wild ones
    st.fixed_dictionaries({"op": st.sampled_from(OPS)}, optional=WELL_TYPED),
    st.fixed_dictionaries({"op": st.one_of(st.sampled_from(OPS), VALUES)},
                          optional={f: VALUES for f in WELL_TYPED}))
RAW_HEADERS = st.one_of(st.binary(max_size=64), VALUES.map(lambda v: json.dumps(v).encode()),
                        st.sampled_from(DROPPED))
PREFIX = st.builds(struct.pack, st.just("!II"), st.integers(0, 2 ** 32 - 1),
                   st.integers(0, 2 ** 32 - 1))
SMALL_PREFIX = st.builds(struct.pack, st.just("!II"), st.integers(0, 200), st.integers(0, 200))
FORGED = st.tuples(st.binary(max_size=40), st.binary(min_size=32, max_size=32)).map(
    lambda t: struct.pack("!II", len(t[0]), 0) + t[0] + t[1])  # a whole frame, wrong tag
UNAUTH = st.lists(st.one_of(st.binary(max_size=64), PREFIX, SMALL_PREFIX, FORGED), max_size=6)
FRAMES = st.lists(st.tuples(HEADERS, st.binary(max_size=32), SHORT_WAITS), min_size=1, max_size=5)
LAST = st.one_of(st.none(), RAW_HEADERS)  # then maybe a frame whose header is not a JSON object


@pytest.mark.timeout(60)
def test_protocol_fuzz(caplog) -> None:
    caplog.set_level(logging.ERROR, logger="phalanx.coord")  # drops are expected by the thousand
    with serving() as srv:
        baseline = threading.active_count()
        fuzz = settings(max_examples=120, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))

        @fuzz
        @given(chunks=UNAUTH)
        def unauthenticated(chunks: list[bytes]) -> None:
            with raw(srv) as s:
                try:
                    for chunk in chunks:
                        s.sendall(chunk)
                except OSError:
                    pass  # the server hung up first

        @fuzz
        @given(frames=FRAMES, last=LAST)
        def authenticated(frames: list[tuple[dict, bytes, object]], last: bytes | None) -> None:
            with raw(srv) as s:
                chan = Channel(s, connection_key(srv._secret, recv_exact(s, NONCE_BYTES)),
                               is_server=False)
                for header, payload, wait in frames:
                    if isinstance(header["op"], str) and header["op"] in BLOCKING:
                        header["timeout"] = wait
                    chan.send(header, payload)
                    reply, _ = chan.recv(deadline=time.monotonic() + 5)  # never dropped
                    assert isinstance(reply.get("ok"), bool), reply
                if last is not None:
                    send_raw(chan, last)
                    try:  # a JSON object is answered; anything else is dropped
                        chan.recv(deadline=time.monotonic() + 5)
                    except ConnectionError:
                        pass

        t0 = time.monotonic()
        unauthenticated()
        authenticated()
        assert time.monotonic() - t0 < 40
        assert wait_until(lambda: threading.active_count() == baseline, 5), \
            f"{threading.active_count()} threads, {baseline} before the fuzz"
        c = CoordClient(srv.address, srv._secret, "legit", connect_timeout=2)
        try:
            c.set("after-fuzz", b"ok")
            assert c.get("after-fuzz", timeout=1) == b"ok"
        finally:
            c.close()
        assert "Traceback" not in caplog.text and "failed" not in caplog.text
