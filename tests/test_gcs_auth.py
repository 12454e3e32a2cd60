"""GCS with real service-account credentials: a JSON key file whose ``token_uri`` points at a
fake OAuth token endpoint (tests/support/gcs_auth.py) that verifies the signed JWT grant, and a
proxy in front of fake-gcs-server that refuses every request without a token the endpoint
issued. Checked: the token is fetched with a valid grant, sent as the bearer token on every
request, fetched again once it expires, and a key the endpoint refuses is a clear error."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.errors import StorageAuthError
from tests.support.fault_proxy import FaultProxy
from tests.support.gcs_auth import GOOGLE_TOKEN_AUDIENCE, SCOPE, FakeTokenServer, service_account_key

pytestmark = [pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
              # google-auth's generic loader (which also runs external-account programs) is not used
              pytest.mark.filterwarnings("error:The .* method is deprecated because of a potential security risk")]

LIFETIME = 2.0  # seconds google-auth uses a token before fetching the next one


@pytest.fixture
def authed(gcs_server, tmp_path):
    """(token endpoint, proxy endpoint, key file): fake-gcs-server behind a proxy demanding tokens."""
    with FakeTokenServer(lifetime=LIFETIME) as tokens:
        key = tokens.key_file(str(tmp_path / "sa-key.json"))
        host, port = gcs_server.endpoint.split("//", 1)[1].rsplit(":", 1)
        with FaultProxy(host, int(port), inspect=tokens.check) as proxy:
            yield tokens, proxy.endpoint, key


def _state() -> dict:
    g = torch.Generator().manual_seed(5)
    return {"w": torch.randn(1024, 2048, generator=g), "b": torch.arange(7), "step": 3}


def _zeros() -> dict:
    return {"w": torch.zeros(1024, 2048), "b": torch.zeros(7, dtype=torch.long), "step": -1}


def test_service_account_token_fetched_sent_and_refreshed(authed, gcs_server):
    tokens, endpoint, key = authed
    opts = {"gcs": {"endpoint_url": endpoint, "token": key, "part_size": "5MiB"}}
    url = f"gs://{gcs_server.bucket}/sa-{time.monotonic_ns()}/ck"
    state = _state()
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, **opts))

    first = list(tokens.grants)
    assert first and all(g.error is None for g in first), [g.error for g in first]
    c = first[0].claims  # the grant was signed by the key and names the account, endpoint and scope
    assert c["iss"] == tokens.email and c["aud"] in (tokens.token_uri, GOOGLE_TOKEN_AUDIENCE)
    assert SCOPE in c["scope"].split()
    saved = list(tokens.used)
    assert len(saved) > 5 and all(t in tokens.issued for t, _ in saved), saved[:3]  # every request carried one
    assert any(line.startswith("PUT /upload/") for _, line in saved)  # resumable chunks too

    # wait (bounded) until the last token is past the lifetime the client gives it (counted from
    # when the client received it: a little after it was issued, hence the margin)
    deadline = time.monotonic() + 60
    while time.monotonic() - tokens.issued[tokens.tokens()[-1]] <= LIFETIME + 1.0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    n_grants, before = len(tokens.grants), set(tokens.issued)
    target = _zeros()
    dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **opts))
    assert torch.equal(target["w"], state["w"]) and torch.equal(target["b"], state["b"]) and target["step"] == 3
    assert len(tokens.grants) > n_grants and all(g.error is None for g in tokens.grants)
    loaded = tokens.used[len(saved):]
    assert loaded and not {t for t, _ in loaded} & before, "an expired token was sent instead of a fresh one"


def test_key_refused_by_the_token_endpoint_is_a_clear_error(authed, gcs_server, tmp_path):
    tokens, endpoint, key = authed
    _, doc = service_account_key(tokens.token_uri)  # another key: its JWT signature does not verify
    bad = str(tmp_path / "other-key.json")
    with open(bad, "w") as f:
        json.dump(doc, f)
    url = f"gs://{gcs_server.bucket}/sa-bad-{time.monotonic_ns()}/ck"
    with pytest.raises(BaseException) as ei:
        dcp.save({"x": torch.ones(3)}, storage_writer=dcp_ext.storage_writer(
            url, gcs={"endpoint_url": endpoint, "token": bad, "max_retries": 1, "retry_base_delay": 0.01}))
    msg = str(ei.value)
    assert "refreshing the Google credentials failed" in msg and "gcs.token" in msg, msg
    assert "PRIVATE KEY" not in msg and doc["private_key_id"] not in msg
    assert tokens.grants and tokens.grants[-1].error == "Invalid JWT Signature."
    assert not tokens.issued and {t for t, _ in tokens.used} <= {""}  # no token; nothing got through
    reader = dcp_ext.storage_reader(url, gcs={"endpoint_url": endpoint, "token": bad})
    with pytest.raises(StorageAuthError, match="refreshing the Google credentials failed"):
        reader.read_metadata()


@pytest.mark.parametrize("content, match", [
    ({"type": "external_account", "audience": "x", "subject_token_type": "y", "token_url": "http://127.0.0.1:9/t",
      "credential_source": {"executable": {"command": "touch /tmp/dcp_ext_must_not_run"}}},
     r"holds credentials of type 'external_account'; only 'service_account' and 'authorized_user'"),
    ({"type": "service_account", "client_email": "a@b"}, r"is not a valid service_account key file: .*missing"),
    ("not json {", r"cannot read the JSON key file .*key.json"),
])
def test_key_files_that_are_not_keys_are_refused(gcs_server, tmp_path, content, match):
    """Only service-account and authorized-user keys: an external-account configuration (which
    can name a program to run for a token) is refused before anything runs."""
    key = tmp_path / "key.json"
    key.write_text(content if isinstance(content, str) else json.dumps(content))
    w = dcp_ext.storage_writer(f"gs://{gcs_server.bucket}/bad-key/ck", gcs={"endpoint_url": gcs_server.endpoint,
                                                                            "token": str(key)})
    with pytest.raises(StorageAuthError, match=match):
        w.prepare_local_plan(None)
    assert not os.path.exists("/tmp/dcp_ext_must_not_run")
