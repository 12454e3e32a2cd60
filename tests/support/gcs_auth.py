"""Google service-account credentials without Google: a fresh RSA key, the JSON key file a user
downloads (its ``token_uri`` pointing here) and a fake OAuth 2.0 token endpoint on 127.0.0.1.

The endpoint does what Google's does for a service account (RFC 7523 JWT bearer grant): it
checks the assertion's RS256 signature against the key's public half and its claims (issuer,
audience, scope, lifetime), then issues a random access token with an ``expires_in``.
google-auth treats a token as expired ``REFRESH_THRESHOLD`` (3 min 45 s) before its expiry, so
``lifetime`` is how long the *client* will use a token before fetching the next one.

:meth:`FakeTokenServer.check` is a request inspector for :class:`FaultProxy`: put the proxy in
front of fake-gcs-server (which ignores credentials) and every request without a token this
endpoint issued is refused with 401, and every token used is recorded.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

__all__ = ["FakeTokenServer", "Grant", "service_account_key", "SCOPE"]

#: the scope dcp_ext's GCS backend asks for
SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
#: how long before ``expires_in`` google-auth already refreshes (google.auth._helpers.REFRESH_THRESHOLD)
GOOGLE_REFRESH_THRESHOLD_S = 225
#: the audience google-auth puts in a service account's grant, whatever the key's token_uri (Google accepts it)
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def service_account_key(token_uri: str, email: str = "ckpt-writer@dcp-ext-test.iam.gserviceaccount.com"):
    """A new RSA key and the service-account JSON key file's content (a dict) for it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "dcp-ext-test", "private_key_id": uuid.uuid4().hex,
            "private_key": pem, "client_email": email, "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri}
    return key, info


@dataclass
class Grant:
    """One request to the token endpoint and what it answered."""

    claims: dict
    token: str | None
    error: str | None
    at: float = field(default_factory=time.monotonic)


class FakeTokenServer:
    """The OAuth 2.0 token endpoint of one service account (``POST /token``)."""

    def __init__(self, lifetime: float = 3600.0):
        self.lifetime = lifetime
        self.public_key = None
        self.email: str | None = None
        self.grants: list[Grant] = []
        self.issued: dict[str, float] = {}  # token -> when it was issued (monotonic)
        self.used: list[tuple[str, str]] = []  # (token or "", request line) seen by check()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                status, doc = server._grant(self.path, parse_qs(body))
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.token_uri = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fake-token-server", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeTokenServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FakeTokenServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def key_file(self, path: str) -> str:
        """Write a new service-account JSON key for this endpoint to ``path``; returns ``path``."""
        key, info = service_account_key(self.token_uri)
        self.public_key, self.email = key.public_key(), info["client_email"]
        with open(path, "w") as f:
            json.dump(info, f)
        return path

    # -- the endpoint -----------------------------------------------------------------------
    def _grant(self, path: str, form: dict) -> tuple[int, dict]:
        claims: dict = {}
        try:
            if path != "/token":
                raise ValueError(f"unknown path {path}")
            if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                raise ValueError(f"unsupported grant_type {form.get('grant_type')}")
            claims = self._verify(form["assertion"][0])
        except Exception as e:  # noqa: BLE001 - any bad grant is refused like Google does
            with self.lock:
                self.grants.append(Grant(claims, None, str(e)))
            return 400, {"error": "invalid_grant", "error_description": str(e)}
        token = f"ya29.test-{uuid.uuid4().hex}"
        with self.lock:
            self.issued[token] = time.monotonic()
            self.grants.append(Grant(claims, token, None))
        return 200, {"access_token": token, "token_type": "Bearer",
                     "expires_in": int(GOOGLE_REFRESH_THRESHOLD_S + self.lifetime)}

    def _verify(self, assertion: str) -> dict:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        head, payload, sig = assertion.split(".")
        header = json.loads(_b64d(head))
        if header.get("alg") != "RS256":
            raise ValueError(f"assertion signed with {header.get('alg')}, not RS256")
        try:
            self.public_key.verify(_b64d(sig), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise ValueError("Invalid JWT Signature.") from None
        claims = json.loads(_b64d(payload))
        now = time.time()
        problems = []
        if claims.get("iss") != self.email:
            problems.append(f"iss {claims.get('iss')!r}")
        if claims.get("aud") not in (self.token_uri, GOOGLE_TOKEN_AUDIENCE):
            problems.append(f"aud {claims.get('aud')!r}")
        if SCOPE not in str(claims.get("scope", "")).split():
            problems.append(f"scope {claims.get('scope')!r}")
        if not (claims.get("iat", 0) - 300 <= now <= claims.get("exp", 0) <= claims.get("iat", 0) + 3600):
            problems.append(f"iat/exp {claims.get('iat')}/{claims.get('exp')}")
        if problems:
            raise ValueError("bad assertion claims: " + ", ".join(problems))
        return claims

    # -- for the proxy in front of the storage server ------------------------------------------
    def check(self, line: str, headers: dict[str, str]) -> int | None:
        """Record the request's bearer token; refuse (401) one this endpoint did not issue."""
        auth = headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        with self.lock:
            self.used.append((token, line))
            return None if token in self.issued else 401

    def tokens(self) -> list[str]:
        """The issued tokens, oldest first."""
        with self.lock:
            return list(self.issued)
