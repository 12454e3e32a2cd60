"""A fault-injecting HTTP proxy on 127.0.0.1, for testing object-store clients against
throttling and dropped connections without touching the server.

The proxy forwards TCP connections to a target server and follows HTTP/1.1 request framing
(``Content-Length`` or chunked bodies, ``Expect: 100-continue``), so faults can be aimed at
*requests*, also on kept-alive connections. A :class:`FaultRule` matches the request line
(``"PUT /bucket/key?partNumber=2&uploadId=..."``) with a regular expression and does one of:

* ``"503"`` (or any status): answer with that status (an S3 ``SlowDown`` XML body for 503,
  JSON for the rest) and close the connection, as a throttling server does;
* ``"drop"``: close the connection the moment the request head arrives (a reset);
* ``"cut"``: forward the request, then cut the connection after ``after_bytes`` bytes of the
  response (a connection dropped mid-download).

Each rule fires ``times`` times (``None``: until removed) or for ``seconds`` from the first
request it matches. Requests that match no rule pass through untouched. An ``inspect``
callable sees every request's line and headers first (e.g. to record or check credentials) and
may refuse it by returning an HTTP status. Used by the S3/GCS fault-injection tests::

    with FaultProxy("127.0.0.1", 9000) as proxy:
        proxy.add(FaultRule(r"^PUT ", "503", times=5))
        ... client with endpoint proxy.endpoint ...

**Bandwidth limit** (no ``tc`` needed): ``FaultProxy(..., bandwidth=50e6)`` or
``proxy.limit_bandwidth(50e6)`` passes at most that many bytes per second *each way* over all
connections together (a :class:`TokenBucket` per direction), like a link to a remote store; used
by ``benchmarks/bench_compression.py``. ``bytes_up`` / ``bytes_down`` count what went through.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["FaultProxy", "FaultRule", "TokenBucket"]

logger = logging.getLogger(__name__)

_S3_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b'<Message>Please reduce your request rate.</Message></Error>')


@dataclass
class FaultRule:
    """What to do to requests whose request line matches ``pattern`` (see the module doc)."""

    pattern: str
    action: str = "503"
    times: int | None = 1
    seconds: float | None = None
    after_bytes: int = 0
    hits: int = 0
    _re: re.Pattern = field(init=False, repr=False)
    _until: float | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.action not in ("drop", "cut") and not self.action.isdigit():
            raise ValueError(f"FaultRule action must be 'drop', 'cut' or an HTTP status, got {self.action!r}")
        self._re = re.compile(self.pattern)

    def live(self) -> bool:
        if self._until is not None and time.monotonic() > self._until:
            return False
        return self.times is None or self.hits < self.times

    def hit(self) -> None:
        """Count a matched request; the ``seconds`` window starts at the first one."""
        if self.hits == 0 and self.seconds is not None:
            self._until = time.monotonic() + self.seconds
        self.hits += 1


class TokenBucket:
    """At most ``rate`` bytes per second, with bursts of up to ``burst`` bytes (default: 50 ms
    worth). :meth:`take` reserves bytes at once (the bucket may go into debt) and sleeps until
    they are paid for, so concurrent takers share the rate fairly. ``clock``/``sleep`` can be
    replaced (tests)."""

    def __init__(self, rate: float, burst: float | None = None, clock=time.monotonic, sleep=time.sleep):
        if rate <= 0:
            raise ValueError(f"TokenBucket rate must be > 0 bytes/s, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 20)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst
        self._t = clock()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Account ``n`` bytes; sleep as long as the rate requires. Returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate) - n
            self._t = now
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class _Conn:
    def __init__(self, client: socket.socket):
        self.client = client
        self.server: socket.socket | None = None
        self.back = 0  # response bytes forwarded so far
        self.cut_at: int | None = None  # reset the connection once `back` reaches this
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for s in (self.client, self.server):
            if s is None:
                continue
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


class _Reader:
    """Buffered reads from a socket: lines, exact byte counts."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _more(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def until(self, sep: bytes, limit: int = 1 << 20) -> bytes | None:
        while sep not in self.buf:
            if len(self.buf) > limit or not self._more():
                return None
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n: int, sink) -> bool:
        while n > 0:
            if not self.buf and not self._more():
                return False
            take = self.buf[:n]
            self.buf = self.buf[len(take):]
            n -= len(take)
            sink(take)
        return True


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_host:target_port``, injecting faults by rule."""

    def __init__(self, target_host: str, target_port: int, port: int = 0,
                 inspect: Callable[[str, dict[str, str]], int | None] | None = None, bandwidth: float | None = None):
        self.target = (target_host, target_port)
        self.inspect = inspect
        self.rules: list[FaultRule] = []
        self.requests = 0
        self.faults = 0
        self.connections = 0  # TCP connections clients opened to the proxy
        self.bytes_up = 0  # request bytes forwarded to the server
        self.bytes_down = 0  # response bytes forwarded to clients
        self._up: TokenBucket | None = None
        self._down: TokenBucket | None = None
        if bandwidth:
            self.limit_bandwidth(bandwidth)
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(128)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def limit_bandwidth(self, bytes_per_second: float | None, burst: float | None = None) -> None:
        """Pass at most ``bytes_per_second`` each way (None: no limit), over all connections."""
        if bytes_per_second:
            self._up, self._down = TokenBucket(bytes_per_second, burst), TokenBucket(bytes_per_second, burst)
        else:
            self._up = self._down = None

    def _forward_up(self, c: "_Conn", data: bytes) -> None:
        if self._up is not None:
            self._up.take(len(data))
        with self._lock:  # counted before sending: the reply it causes may reach the client first
            self.bytes_up += len(data)
        c.server.sendall(data)

    # -- rules -------------------------------------------------------------------------
    def add(self, rule: FaultRule) -> FaultRule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def drop_all_connections(self) -> None:
        """Reset every open connection now (in-flight requests see a dropped connection)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()

    def _match(self, line: str) -> FaultRule | None:
        with self._lock:
            self.requests += 1
            for r in self.rules:
                if r.live() and r._re.search(line):
                    r.hit()
                    self.faults += 1
                    return r
        return None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            self._sock.close()
        except OSError:
            pass
        self.drop_all_connections()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        self._sock.settimeout(0.1)  # wake up to notice stop(): closing a socket does not end accept()
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls on small heads
            c = _Conn(client)
            with self._lock:
                self._conns.add(c)
                self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True, name="fault-proxy-conn").start()

    # -- per connection ----------------------------------------------------------------
    def _serve(self, c: _Conn) -> None:
        try:
            c.server = socket.create_connection(self.target, timeout=30)
            c.server.settimeout(None)
            c.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump_back, args=(c,), daemon=True, name="fault-proxy-back").start()
            rd = _Reader(c.client)
            while not c.closed:
                head = rd.until(b"\r\n\r\n")
                if head is None:
                    break
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                headers = _headers(head)
                refused = self.inspect(line, headers) if self.inspect is not None else None
                rule = FaultRule(".", str(refused)) if refused is not None else self._match(line)
                if rule is not None:
                    logger.debug("fault proxy: %s -> %s", line, rule.action)
                    if rule.action == "drop":
                        break
                    if rule.action.isdigit():
                        # like a throttling server: take the body (unless the client waits for a
                        # 100 Continue before sending it), answer, close gracefully
                        if "100-continue" not in headers.get("expect", "").lower():
                            self._body(rd, headers, lambda b: None)
                        self._answer(c, int(rule.action))
                        break
                    c.cut_at = c.back + rule.after_bytes
                self._forward_up(c, head)
                if not self._body(rd, headers, lambda b: self._forward_up(c, b)):
                    break
        except OSError:
            pass
        finally:
            c.close()
            with self._lock:
                self._conns.discard(c)

    def _body(self, rd: _Reader, headers: dict[str, str], sink) -> bool:
        """Pass a request body (Content-Length or chunked) to ``sink``; False if the client left."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                line = rd.until(b"\r\n")
                if line is None:
                    return False
                sink(line)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:  # trailers, then the blank line
                    while True:
                        t = rd.until(b"\r\n")
                        if t is None:
                            return False
                        sink(t)
                        if t == b"\r\n":
                            return True
                if not rd.exactly(size + 2, sink):
                    return False
        n = int(headers.get("content-length", "0") or 0)
        return rd.exactly(n, sink) if n else True

    def _answer(self, c: _Conn, status: int) -> None:
        if status == 503:
            body, ctype, reason = _S3_SLOWDOWN, "application/xml", "Slow Down"
        else:
            body = (b'{"error":{"code":%d,"message":"injected by FaultProxy"}}' % status)
            ctype, reason = "application/json", "Injected Fault"
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Retry-After: 0\r\nConnection: close\r\n\r\n").encode()
        try:
            c.client.sendall(head + body)
            c.client.shutdown(socket.SHUT_WR)
            c.client.settimeout(2)
            while c.client.recv(1 << 16):  # until the client closes: no reset eats the answer
                pass
        except OSError:
            pass

    def _pump_back(self, c: _Conn) -> None:
        try:
            while not c.closed:
                data = c.server.recv(1 << 16)
                if not data:
                    break
                cut = c.cut_at
                if cut is not None and c.back + len(data) >= cut:
                    room = cut - c.back
                    c.back = cut
                    if room > 0:
                        c.client.sendall(data[:room])
                    break
                c.back += len(data)  # before sending: the client's next request comes after it
                if self._down is not None:
                    self._down.take(len(data))
                with self._lock:  # counted before sending: the client may check it on receipt
                    self.bytes_down += len(data)
                c.client.sendall(data)
        except OSError:
            pass
        finally:
            c.close()


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return out
