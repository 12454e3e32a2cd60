"""RetryPolicy (backoff with full jitter, classification, messages) and the FaultProxy itself,
without an object store."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dcp_ext.errors import StorageError
from tests.support.fault_proxy import FaultProxy, FaultRule
from dcp_ext.storage.object_store import split_bucket_url
from dcp_ext.storage.retry import RetryPolicy


class Flaky(Exception):
    pass


def _policy(**kw) -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []
    kw.setdefault("is_transient", lambda e: isinstance(e, Flaky))
    return RetryPolicy(sleep=slept.append, **kw), slept


def test_transient_errors_are_retried_with_growing_jittered_delays():
    p, slept = _policy(max_retries=5, base_delay=0.1, max_delay=0.25)
    calls = []

    def fn():
        calls.append(1)
        if len(calls) < 5:
            raise Flaky("503")
        return "ok"

    rewinds = []
    assert p.call(fn, "uploading x", on_retry=lambda: rewinds.append(1)) == "ok"
    assert len(calls) == 5 and len(slept) == 4 and len(rewinds) == 4
    caps = [0.1, 0.2, 0.25, 0.25]  # base * 2**n, capped at max_delay
    assert all(0 <= d <= c for d, c in zip(slept, caps)), slept


def test_retries_run_out_with_a_message_naming_the_object():
    p, slept = _policy(max_retries=2, base_delay=0.0, describe=lambda e: f"SlowDown ({e})")

    def fn():
        raise Flaky("503")

    with pytest.raises(StorageError, match=r"^uploading s3://b/k failed after 3 attempt\(s\) \(2 retries, "
                                           r"max_retries\): SlowDown \(503\)$") as ei:
        p.call(fn, "uploading s3://b/k")
    assert isinstance(ei.value.__cause__, Flaky) and len(slept) == 2


def test_other_errors_fail_at_once_translated_or_as_they_are():
    p, slept = _policy(translate=lambda e, what: StorageError(f"{what}: denied") if "403" in str(e) else e)
    with pytest.raises(StorageError, match="^reading k: denied$"):
        p.call(lambda: (_ for _ in ()).throw(ValueError("403")), "reading k")
    with pytest.raises(KeyError):
        p.call(lambda: {}["x"], "reading k")
    assert slept == []
    with pytest.raises(StorageError, match="already clear"):  # our own errors pass through untouched
        p.call(lambda: (_ for _ in ()).throw(StorageError("already clear")), "x")


def test_full_jitter_spreads_delays():
    p = RetryPolicy(base_delay=1.0, max_delay=100.0)
    ds = [p.delay(3) for _ in range(200)]
    assert all(0 <= d <= 8.0 for d in ds) and max(ds) - min(ds) > 2.0


@pytest.mark.parametrize("url,expect", [("s3://b/a/b/", ("b", "a/b")), ("s3://b", ("b", "")),
                                        ("gs://bk/x", ("bk", "x")), ("bk/run/1", ("bk", "run/1"))])
def test_split_bucket_url(url, expect):
    assert split_bucket_url(url, ("s3", "gs")) == expect


def test_split_bucket_url_errors():
    with pytest.raises(StorageError, match="expected a URL starting with s3://"):
        split_bucket_url("gs://b/x", ("s3",))
    with pytest.raises(StorageError, match="names no bucket: expected s3://BUCKET/PREFIX"):
        split_bucket_url("s3:///x", ("s3",))


# -- the fault proxy ---------------------------------------------------------------------------

class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply(b"x" * 100_000)

    def do_PUT(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                n = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(n + 2)[:n]  # the chunk and its CRLF (for 0: the final CRLF)
                if n == 0:
                    break
                data += chunk
        else:
            data = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(b"got %d" % len(data))

    def log_message(self, *a):
        pass


@pytest.fixture
def echo():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_proxy_forwards_keepalive_requests_and_injects_by_rule(echo):
    with FaultProxy("127.0.0.1", echo) as px:
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        c.request("PUT", "/k?partNumber=1", body=b"a" * 5000)
        assert c.getresponse().read() == b"got 5000"
        c.request("PUT", "/k?partNumber=2", body=iter([b"abc", b"defg"]), encode_chunked=True,
                  headers={"Transfer-Encoding": "chunked"})
        assert c.getresponse().read() == b"got 7"
        rule = px.add(FaultRule(r"partNumber=3", "503", times=1))
        c.request("PUT", "/k?partNumber=3", body=b"zz")  # same kept-alive connection
        r = c.getresponse()
        assert r.status == 503 and b"SlowDown" in r.read()
        assert rule.hits == 1 and not rule.live()
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        c.request("PUT", "/k?partNumber=3", body=b"zz")
        assert c.getresponse().read() == b"got 2"  # the rule was used up

        px.add(FaultRule(r"^GET ", "cut", times=1, after_bytes=1000))
        c.request("GET", "/big")
        r = c.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            r.read()
        px.add(FaultRule(r"^GET ", "drop", times=1))
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError, socket.error)):
            c.request("GET", "/big")
            c.getresponse()
        assert px.faults == 3


def test_fault_rule_rejects_unknown_actions():
    with pytest.raises(ValueError, match="action must be 'drop', 'cut' or an HTTP status"):
        FaultRule(".", "explode")


def test_fault_rule_window_starts_at_its_first_match(monkeypatch):
    import types

    from tests.support import fault_proxy

    now = [1000.0]  # a fake clock for the proxy module only: the window is tested without sleeping
    monkeypatch.setattr(fault_proxy, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    r = FaultRule(".", "503", times=None, seconds=0.2)
    now[0] += 0.3  # nothing matched yet: the window has not started
    assert r.live()
    r.hit()
    now[0] += 0.19
    assert r.live()
    now[0] += 0.02
    assert not r.live() and r.hits == 1


def test_part_buffers_are_reused_and_released():
    from dcp_ext.storage.buffers import BUFFERS, release_buffers

    release_buffers()
    a = BUFFERS.get(4096)
    BUFFERS.put(a)
    assert BUFFERS.get(4096) is a  # the next upload reuses mapped memory
    BUFFERS.put(a)
    release_buffers()
    assert BUFFERS.get(4096) is not a


def test_token_bucket_paces_to_its_rate():
    """A bucket of 1000 B/s: the burst passes at once, then every byte waits its turn (a fake
    clock: no timing in the test)."""
    from tests.support.fault_proxy import TokenBucket

    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    b = TokenBucket(1000, burst=100, clock=lambda: now[0], sleep=sleep)
    assert b.take(100) == 0  # the burst
    assert b.take(500) == pytest.approx(0.5)
    assert b.take(1000) == pytest.approx(1.0)
    now[0] += 10  # idle: the bucket refills up to its burst, not more
    assert b.take(100) == 0 and b.take(100) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="rate must be > 0"):
        TokenBucket(0)


def test_bandwidth_limited_proxy_forwards_everything_and_counts_it(echo):
    with FaultProxy("127.0.0.1", echo, bandwidth=50e6) as px:
        c = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        c.request("PUT", "/k", body=b"a" * 300_000)
        assert c.getresponse().read() == b"got 300000"
        c.request("GET", "/big")
        assert c.getresponse().read() == b"x" * 100_000
        assert px.bytes_up > 300_000 and px.bytes_down > 100_000
        px.limit_bandwidth(None)
        c.request("GET", "/big")
        assert c.getresponse().read() == b"x" * 100_000
