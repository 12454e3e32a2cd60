"""S3 and GCS backends against real servers started by the test session (SeaweedFS ``weed mini``
or MinIO for S3, fake-gcs-server for GCS): round trips, stock-format interop, the commit
protocol, bad input, retries under injected faults, and multi-rank (2 and 4 gloo ranks) saves
and resharded loads, compared exactly.
"""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

import dcp_ext
from dcp_ext.errors import (BucketNotFoundError, CheckpointExistsError, CheckpointNotFoundError, StorageAuthError,
                            StorageError)
from tests.support.errors import error_text
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.stores import Env
from dcp_ext.storage.manifest import MANIFEST_NAME, METADATA_NAME
from tests import fs_rank_fns as F
from tests import object_rank_fns as O

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(params=["s3", "gcs"])
def env(request) -> Env:
    return Env.of(request, request.param)


@pytest.fixture(params=["s3"])
def s3env(request) -> Env:
    return Env.of(request, request.param)


#: the core save/load/multipart/ranged tests run against a second, independent S3 implementation
#: too: moto (AWS's error codes and 5 MiB part minimum; the two differ elsewhere, e.g. SeaweedFS
#: refuses multipart parts listed out of order, moto accepts them)
CORE = pytest.mark.parametrize("env", ["s3", "s3-moto", "gcs"], indirect=True)
BOTH_S3 = pytest.mark.parametrize("s3env", ["s3", "s3-moto"], indirect=True)


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(1536, 4096, generator=g),  # 24 MiB: several 5 MiB parts
            "bf16": torch.randn(33, 65, generator=g).to(torch.bfloat16),
            "ints": torch.randint(0, 1 << 40, (100,), generator=g),
            "mask": torch.rand(17, generator=g) > 0.5,
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 3),
            "nested": {"w": torch.randn(8, 8, generator=g), "lr": 0.1, "name": "adam"}}


def _zeros_like(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _zeros_like(v)
        elif isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _save(url: str, state: dict, **opts) -> None:
    dcp.save(state, storage_writer=dcp_ext.storage_writer(url, **opts))


def _load(url: str, like: dict, **opts) -> dict:
    target = _zeros_like(like)
    dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **opts))
    return target


def _host_port(env: Env) -> tuple[str, int]:
    host, port = env.server.endpoint.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def _error_of(fn) -> str:
    """The message of what ``fn`` raises (DCP wraps rank errors in a BaseException)."""
    return error_text(fn)


# -- round trips and the standard format ------------------------------------------------------

@CORE
def test_round_trip(env):
    url, state = env.url(), _state(1)
    opts = env.opts(part_size="5MiB")
    _save(url, state, **opts)
    _assert_same(_load(url, state, **opts), state)
    names = env.names(url)
    assert METADATA_NAME in names and MANIFEST_NAME in names
    assert all(n in (METADATA_NAME, MANIFEST_NAME) or n.startswith("__0_") and n.endswith(".distcp")
               for n in names), names
    assert env.pending_uploads(url) == []  # the multipart upload was completed, its parts are gone


@CORE
def test_stock_fsspec_reader_loads_ours_and_we_load_stock(env):
    state = {k: v for k, v in _state(2).items() if k != "empty"}
    ours = env.url("ours")
    _save(ours, state, **env.opts(part_size="5MiB"))
    target = _zeros_like(state)
    dcp.load(target, storage_reader=O._fsspec_reader(ours, env.server.fsspec_options()), planner=DefaultLoadPlanner())
    _assert_same(target, state)

    stock = env.url("stock")
    dcp.save(state, storage_writer=O._fsspec_writer(stock, env.server.fsspec_options()))
    _assert_same(_load(stock, state, **env.opts()), state)


@CORE
def test_ranged_read_fetches_only_the_needed_part(env):
    """Loading the first 64 rows of a 1536-row tensor reads about 64 rows, not the whole object."""
    url = env.url()
    big = torch.randn(1536, 4096)
    opts = env.opts(part_size="5MiB")
    _save(url, {"big": big}, **opts)
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    # a DTensor-free way to read a sub-box: a 1-rank load whose planner asks for rows [0, 64)
    r = dcp_ext.storage_reader(url, **opts)

    class RowsPlanner(DefaultLoadPlanner):
        def create_local_plan(self):

            md = self.metadata.state_dict_metadata["big"]
            item = ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex("big", (0, 0)), dest_offsets=torch.Size([0, 0]),
                            storage_index=MetadataIndex("big", md.chunks[0].offsets),
                            storage_offsets=torch.Size([0, 0]), lengths=torch.Size([64, 4096]))
            return LoadPlan([item])

        def resolve_tensor(self, read_item):
            return out

    out = torch.zeros(64, 4096)
    dcp.load({"big": torch.zeros(1536, 4096)}, storage_reader=r, planner=RowsPlanner())
    assert torch.equal(out, big[:64])
    need = 64 * 4096 * 4
    assert r.stats.bytes_needed == need
    assert need <= r.stats.bytes_read <= need + 2 * 1024 * 1024  # checksum blocks at the ends
    assert r.stats.bytes_read < big.numel() * 4 / 10


@CORE
def test_small_tensors_share_requests_and_stay_verified(env):
    """120 small tensors in one object are fetched in a few ranged GETs (a request costs
    milliseconds), then copied out and each verified: a flipped byte in one names that tensor."""
    url = env.url()
    state = {f"s{i}": torch.full((256,), float(i)) for i in range(120)}
    opts = env.opts()
    _save(url, state, files_per_rank=1, **opts)
    r = dcp_ext.storage_reader(url, **opts)
    target = _zeros_like(state)
    dcp.load(target, storage_reader=r)
    _assert_same(target, state)
    assert r.stats.requests <= 4 and r.stats.blocks_verified >= 120, r.stats
    data_file = next(n for n in env.names(url) if n.endswith(".distcp"))
    raw = bytearray(env.get(url, data_file))
    at = bytes(raw).index(state["s77"].numpy().tobytes())
    raw[at + 100] ^= 0x01
    env.put(url, data_file, bytes(raw))
    msg = _error_of(lambda: _load(url, state, **opts))
    assert "checksum mismatch" in msg and " for s77 " in msg and data_file in msg, msg


def test_ranged_reads_reuse_connections(env):
    """A load's ranged GETs hand their connection back to the pool once the body is read: at
    most one new TCP connection per I/O thread, however many GETs (every GET used to open one)."""
    g = torch.Generator().manual_seed(7)
    state = {f"t{i}": torch.randn(1280, 1024, generator=g) for i in range(8)}  # 5 MiB each: one GET each
    with env.proxy() as px:
        opts = dict(env.opts(endpoint=px.endpoint), io_threads=2)
        _save(url := env.url(), state, files_per_rank=1, **opts)
        before_conns, before_reqs = px.connections, px.requests
        r = dcp_ext.storage_reader(url, **opts)
        target = _zeros_like(state)
        dcp.load(target, storage_reader=r)
        conns, reqs = px.connections - before_conns, px.requests - before_reqs
    _assert_same(target, state)
    assert r.stats.requests >= 8 and reqs >= 8, (r.stats, reqs)
    assert conns <= 2, f"{conns} new connections for {reqs} requests"


@CORE
def test_medium_tensors_share_a_request_read_in_place(env):
    """Whole tensors of a few MiB next to each other in one file come in one ranged GET, each
    straight into its tensor (the headers between them into scratch); a connection cut in the
    middle resumes at the right tensor and byte, and every tensor is still verified."""
    g = torch.Generator().manual_seed(3)
    state = {f"m{i}": torch.randn(512, 1024, generator=g) for i in range(6)}  # 2 MiB each
    url = env.url()
    with env.proxy() as px:
        opts = env.opts(endpoint=px.endpoint)
        _save(url, state, files_per_rank=1, **opts)
        cut = px.add(FaultRule(r"^GET .*__0_", "cut", times=2, after_bytes=5 * 1024 * 1024 + 123))
        r = dcp_ext.storage_reader(url, **opts)
        target = _zeros_like(state)
        dcp.load(target, storage_reader=r)
    _assert_same(target, state)
    assert cut.hits == 2
    assert r.stats.requests == 1 and r.stats.blocks_verified >= 6, r.stats
    data_file = next(n for n in env.names(url) if n.endswith(".distcp"))
    raw = bytearray(env.get(url, data_file))
    raw[bytes(raw).index(state["m4"].numpy().tobytes()[:4096]) + 1000] ^= 0x01
    env.put(url, data_file, bytes(raw))
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "checksum mismatch" in msg and " for m4 " in msg and data_file in msg, msg


def test_the_same_item_read_twice_in_one_group(env):
    """Two reads of the same small item (a planner may ask for it into two tensors) overlap in
    the file: they still share one request and both land exactly."""
    url = env.url()
    state = {"a": torch.arange(300.0), "b": torch.arange(500.0) * 2}
    _save(url, state, files_per_rank=1, **env.opts())
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    outs = {"a": torch.zeros(300), "a2": torch.zeros(300), "b": torch.zeros(500)}

    class TwicePlanner(DefaultLoadPlanner):
        def create_local_plan(self):
            def item(dest: str, src: str, n: int) -> ReadItem:
                return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(dest, (0,)),
                                dest_offsets=torch.Size([0]), storage_index=MetadataIndex(src, (0,)),
                                storage_offsets=torch.Size([0]), lengths=torch.Size([n]))
            return LoadPlan([item("a", "a", 300), item("a2", "a", 300), item("b", "b", 500)])

        def resolve_tensor(self, read_item):
            return outs[read_item.dest_index.fqn]

    r = dcp_ext.storage_reader(url, **env.opts())
    dcp.load({k: torch.zeros_like(v) for k, v in state.items()}, storage_reader=r, planner=TwicePlanner())
    assert torch.equal(outs["a"], state["a"]) and torch.equal(outs["a2"], state["a"])
    assert torch.equal(outs["b"], state["b"])
    assert r.stats.requests == 1, r.stats


class _CappedStream:
    """A GET's body read at most 64 KiB per ``readinto`` call, counting what has arrived."""

    _fp = None  # the store then reads through readinto below

    def __init__(self, stream):
        from dcp_ext.storage.object_store import _readinto_of

        self.stream, self.read, self.count = stream, _readinto_of(stream), 0

    def readinto(self, b) -> int:
        n = self.read(memoryview(b)[:64 * 1024])
        self.count += n
        return n

    def release_conn(self) -> None:
        from dcp_ext.storage.object_store import _finish

        _finish(self.stream)


def test_ranged_reads_are_verified_as_they_arrive(env, monkeypatch):
    """An object-store read hands each piece to the verifier once its bytes landed, while the
    rest of the body is still arriving (one request); a piece that fails stops the read there."""
    url = env.url()
    data = bytes(range(256)) * (3 * 4096)  # 3 MiB
    env.put(url, "blob", data)
    store = dcp_ext.storage_reader(url, **env.opts()).store
    streams: list[_CappedStream] = []
    open_range = type(store)._open_range

    def capped(self, key, start, end):
        stream, n = open_range(self, key, start, end)
        streams.append(_CappedStream(stream))
        return streams[-1], n

    monkeypatch.setattr(type(store), "_open_range", capped)
    out = memoryview(bytearray(len(data) - 1000))
    seen: list[tuple[int, int, int]] = []  # (start, size, bytes arrived when handed over)
    piece = 256 * 1024
    store.read_into_pieces("blob", 1000, out, piece, lambda s, v: seen.append((s, len(v), streams[-1].count)))
    assert bytes(out) == data[1000:] and len(streams) == 1
    assert [(s, n) for s, n, _ in seen] == [(s, min(piece, len(out) - s)) for s in range(0, len(out), piece)]
    assert all(arrived < s + n + 64 * 1024 for s, n, arrived in seen), seen  # no later than the next readinto
    assert seen[0][2] < len(out) // 4, seen

    def fail(s: int, v: memoryview) -> None:
        if s == 2 * piece:
            raise ValueError("bad piece")

    with pytest.raises(ValueError, match="bad piece"):
        store.read_into_pieces("blob", 0, memoryview(bytearray(len(data))), piece, fail)
    assert len(streams) == 2 and streams[-1].count < 3 * piece + 64 * 1024, streams[-1].count


def test_load_reads_metadata_with_one_request_each(env):
    """Before its first data byte a load sends two requests: a GET of .metadata (its presence
    is what makes the checkpoint committed) and a GET of the manifest; no LIST, no HEAD."""
    url = env.url()
    _save(url, {"w": torch.arange(1000.0)}, **env.opts())
    seen: list[str] = []
    with FaultProxy(*_host_port(env), inspect=lambda line, headers: seen.append(line)) as px:
        target = {"w": torch.zeros(1000)}
        dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **env.opts(endpoint=px.endpoint)))
    assert torch.equal(target["w"], torch.arange(1000.0))
    meta = [ln.split()[0] for ln in seen if ".distcp" not in ln and "__0_" not in ln]
    assert meta == ["GET", "GET"], seen


def test_metadata_and_manifest_are_read_at_once(env):
    """The manifest's GET goes out while the GET of .metadata is still unanswered (one round
    trip before the first data byte, not two): the proxy holds .metadata's request until the
    manifest's arrives (or 20 s pass, which fails the test)."""
    url = env.url()
    state = {"w": torch.arange(1000.0)}
    _save(url, state, **env.opts())
    manifest_seen = threading.Event()
    held: list[bool] = []

    def inspect(line: str, headers: dict) -> None:
        if MANIFEST_NAME in line:
            manifest_seen.set()
        elif METADATA_NAME in line and line.startswith("GET"):
            held.append(manifest_seen.wait(20))

    with FaultProxy(*_host_port(env), inspect=inspect) as px:
        target = {"w": torch.zeros(1000)}
        dcp.load(target, storage_reader=dcp_ext.storage_reader(url, **env.opts(endpoint=px.endpoint)))
    assert torch.equal(target["w"], state["w"])
    assert held == [True], held


@BOTH_S3
def test_parts_upload_concurrently_within_the_bound(s3env, monkeypatch):
    from dcp_ext.storage.s3 import S3Store

    cond, live, peak, parts = threading.Condition(), [0], [0], [0]
    orig = S3Store._upload_part

    def counting(self, *a, **kw):
        with cond:
            live[0] += 1
            parts[0] += 1
            peak[0] = max(peak[0], live[0])
            cond.notify_all()
            # hold each part until max_concurrency parts are in flight together (or the last part
            # started; at most 60 s): a serial upload would never get there and fails below
            cond.wait_for(lambda: live[0] >= 3 or parts[0] >= 10, timeout=60)
        try:
            return orig(self, *a, **kw)
        finally:
            with cond:
                live[0] -= 1

    monkeypatch.setattr(S3Store, "_upload_part", counting)
    url, big = s3env.url(), torch.randn(12 * 1024 * 1024)  # 48 MiB in one file: ~10 parts
    opts = s3env.opts(part_size="5MiB", max_concurrency=3)
    _save(url, {"big": big}, files_per_rank=1, **opts)
    assert parts[0] == 10  # 48 MiB in 5 MiB parts
    assert peak[0] == 3, peak  # parallel, and never more than max_concurrency in flight
    assert torch.equal(_load(url, {"big": big}, **opts)["big"], big)


# -- the commit protocol and bad input ---------------------------------------------------------

@CORE
def test_incomplete_prefix_is_refused(env):
    url, state = env.url(), _state(3)
    _save(url, state, **env.opts())
    env.rm(url, METADATA_NAME)
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "is an incomplete checkpoint" in msg and "no .metadata" in msg and url in msg, msg


@CORE
def test_missing_location(env):
    url = env.url("never_saved")
    msg = _error_of(lambda: _load(url, _state(), **env.opts()))
    assert f"no checkpoint at {url}: the location does not exist" in msg, msg
    r = dcp_ext.storage_reader(url, **env.opts())
    with pytest.raises(CheckpointNotFoundError):
        r.read_metadata()


@CORE
def test_missing_bucket(env):
    url = f"{env.scheme}://no-such-bucket-{uuid.uuid4().hex[:6]}/run/step_1"
    msg = _error_of(lambda: _save(url, _state(), **env.opts()))
    assert "BucketNotFoundError" in msg and "does not exist" in msg and "no-such-bucket" in msg, msg
    r = dcp_ext.storage_reader(url, **env.opts())
    with pytest.raises(BucketNotFoundError, match="bucket .*no-such-bucket.* does not exist"):
        r.read_metadata()


@CORE
def test_overwrite_refused_unless_asked(env):
    url = env.url()
    _save(url, {"x": torch.ones(3)}, **env.opts())
    msg = _error_of(lambda: _save(url, {"x": torch.zeros(3)}, **env.opts()))
    assert "already holds a complete checkpoint; refusing to overwrite it" in msg, msg
    _save(url, {"x": torch.full((3,), 5.0)}, overwrite=True, **env.opts())
    assert torch.equal(_load(url, {"x": torch.ones(3)}, **env.opts())["x"], torch.full((3,), 5.0))
    w = dcp_ext.storage_writer(url, **env.opts())
    with pytest.raises(CheckpointExistsError):
        w.prepare_local_plan(None)


@CORE
def test_corrupt_and_truncated_objects_are_detected(env):
    url, state = env.url(), {"w": torch.randn(512, 512), "v": torch.randn(10)}
    _save(url, state, **env.opts())
    data_file = next(n for n in env.names(url) if n.endswith(".distcp"))
    raw = bytearray(env.get(url, data_file))
    good = bytes(raw)
    raw[len(raw) // 2] ^= 0xFF
    env.put(url, data_file, bytes(raw))
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "checksum mismatch" in msg and data_file in msg and url in msg and " for w " in msg, msg

    env.put(url, data_file, good[: len(good) // 3])
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "is truncated" in msg and data_file in msg, msg

    env.rm(url, data_file)
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "is missing: the checkpoint is damaged" in msg and data_file in msg, msg


def test_wrong_credentials_are_a_clear_error(s3env):
    url = s3env.url()
    bad_secret = s3env.opts(secret_access_key="not-the-secret")
    msg = _error_of(lambda: _save(url, {"x": torch.ones(2)}, **bad_secret))
    assert "StorageAuthError" in msg and "SignatureDoesNotMatch" in msg and "check the credentials" in msg, msg
    assert "not-the-secret" not in msg
    unknown = s3env.opts(access_key_id="nobody", secret_access_key="x" * 20)
    r = dcp_ext.storage_reader(url, **unknown)
    with pytest.raises(StorageAuthError, match="InvalidAccessKeyId"):
        r.read_metadata()
    assert s3env.names(url) == []  # nothing was written


def test_gcs_refused_credentials_and_bad_token(gcs_server):
    env = Env("gcs", gcs_server)
    with env.proxy() as px:
        px.add(FaultRule(".", "401", times=None))
        msg = _error_of(lambda: _save(env.url(), {"x": torch.ones(2)}, **env.opts(endpoint=px.endpoint)))
    assert "StorageAuthError" in msg and "refused the request (HTTP 401" in msg and "gcs.token" in msg, msg
    msg = _error_of(lambda: dcp_ext.storage_writer(env.url(), **env.opts(token="/no/such/key.json"))
                    .prepare_local_plan(None))
    assert "gcs.token must be None, 'anon', 'google_default' or the path of a JSON key file" in msg, msg


def test_secrets_never_logged_or_stored(s3env, caplog):
    secret = s3env.server.secret_key
    if secret in s3env.server.access_key:  # an external server whose key id equals its secret
        pytest.skip("the S3 test server's secret equals its access key id (which is logged by botocore)")
    url = s3env.url()
    opts = s3env.opts()
    with caplog.at_level(logging.DEBUG):
        w = dcp_ext.storage_writer(url, **opts)
        dcp.save({"x": torch.arange(5)}, storage_writer=w)
        r = dcp_ext.storage_reader(url, **opts)
        dcp.load({"x": torch.zeros(5, dtype=torch.long)}, storage_reader=r)
    assert caplog.records and secret not in caplog.text
    for name in s3env.names(url):
        assert secret.encode() not in s3env.get(url, name), name
    cfg = dcp_ext.load_config(**opts)
    assert secret not in repr(cfg) and secret not in repr(cfg.s3) and secret not in str(cfg.redacted())
    assert secret not in repr(w.store.__dict__.get("config"))


def test_aws_environment_conventions(s3env, monkeypatch):
    """No explicit options: the endpoint, region and keys come from the standard AWS variables."""
    srv = s3env.server
    monkeypatch.setenv("AWS_ENDPOINT_URL", srv.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", srv.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", srv.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    url = s3env.url()
    _save(url, {"x": torch.arange(4)})
    assert torch.equal(_load(url, {"x": torch.arange(4)})["x"], torch.arange(4))
    # and the backend can be chosen by config for a scheme-less "bucket/prefix"
    plain = url.split("://", 1)[1]
    assert torch.equal(_load(plain, {"x": torch.arange(4)}, backend="s3")["x"], torch.arange(4))


def test_gcs_emulator_host_convention(gcs_server, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.endpoint)
    env = Env("gcs", gcs_server)
    url = env.url()
    _save(url, {"x": torch.arange(6)})
    assert torch.equal(_load(url, {"x": torch.arange(6)})["x"], torch.arange(6))


def test_config_file_and_env_select_s3_options(s3env, tmp_path, monkeypatch):
    srv = s3env.server
    f = tmp_path / "ckpt.toml"
    f.write_text(f'[s3]\nendpoint_url = "{srv.endpoint}"\npart_size = "5MiB"\nmax_retries = 2\n')
    monkeypatch.setenv("DCP_EXT_S3_ACCESS_KEY_ID", srv.access_key)
    monkeypatch.setenv("DCP_EXT_S3_SECRET_ACCESS_KEY", srv.secret_key)
    w = dcp_ext.storage_writer(s3env.url(), config=str(f))
    assert w.store.part_size == 5 * 1024 * 1024 and w.store.retry.max_retries == 2
    dcp.save({"x": torch.ones(2)}, storage_writer=w)


# -- faults: throttling, dropped connections, cut downloads -----------------------------------

def test_transient_faults_are_retried_and_the_checkpoint_is_exact(env):
    state, url = _state(4), env.url()
    with env.proxy() as px:
        opts = env.opts(endpoint=px.endpoint, part_size="5MiB", retry_base_delay=0.01)
        # (4 + 3 faults may all hit one request: fewer than its 24 retries)
        rules = [px.add(FaultRule(r"^(PUT|POST) ", "503", times=4)),       # throttled uploads
                 px.add(FaultRule(r"^(PUT|POST) ", "drop", times=3)),      # connections reset
                 px.add(FaultRule(r"^GET .*(alt=media|__0_)", "cut", times=3, after_bytes=64 * 1024))]  # cut reads
        _save(url, state, **opts)
        loaded = _load(url, state, **opts)
    _assert_same(loaded, state)
    assert [r.hits for r in rules] == [4, 3, 3], rules  # every fault happened
    assert env.pending_uploads(url) == []


def test_throttling_window_is_survived(env):
    """Every request is answered 503 for a while; backoff outlasts it."""
    state, url = {"w": torch.randn(256, 1024)}, env.url()
    with env.proxy() as px:
        rule = px.add(FaultRule(".", "503", times=None, seconds=1.0))
        opts = env.opts(endpoint=px.endpoint, retry_base_delay=0.05, max_retries=12)
        _save(url, state, **opts)
        assert rule.hits > 0
    _assert_same(_load(url, state, **env.opts()), state)


@CORE
def test_permanent_part_failure_aborts_and_commits_nothing(env):
    """One part of one data file can never be uploaded: the save fails naming the object, the
    multipart upload is aborted (no parts left behind), and nothing looks committed. (GCS: with
    ``composite_uploads``, parallel part objects composed at the end.)"""
    state, url = _state(5), env.url()
    part = r"[?&]partNumber=2[& ]" if env.kind == "s3" else r"dcp_ext-part\.[0-9a-f]+\.00002"
    extra = {} if env.kind == "s3" else {"composite_uploads": True}
    with env.proxy() as px:
        rule = px.add(FaultRule(part, "503", times=None))
        opts = env.opts(endpoint=px.endpoint, part_size="5MiB", max_retries=2, retry_base_delay=0.01, **extra)
        msg = _error_of(lambda: _save(url, state, files_per_rank=1, **opts))
    assert rule.hits == 3  # the first try and two retries
    assert "uploading part 2 of " in msg and "__0_0.distcp" in msg and "failed after 3 attempt(s)" in msg, msg
    assert METADATA_NAME not in env.names(url) and MANIFEST_NAME not in env.names(url)
    assert env.pending_uploads(url) == []
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "no checkpoint at" in msg or "incomplete checkpoint" in msg, msg


def test_gcs_resumable_upload_resumes_and_fails_cleanly(gcs_server):
    """GCS streams a large file as one resumable upload: chunks cut or refused halfway are
    resumed from what the server kept (exact result); a chunk that can never be sent cancels
    the session, and nothing is committed."""
    env = Env("gcs", gcs_server)
    state, url = _state(7), env.url()
    with env.proxy() as px:
        cut = px.add(FaultRule(r"^PUT /upload/.*upload_id", "drop", times=2))
        slow = px.add(FaultRule(r"^PUT /upload/.*upload_id", "503", times=2))
        opts = env.opts(endpoint=px.endpoint, part_size="5MiB", retry_base_delay=0.01)
        _save(url, state, files_per_rank=1, **opts)
        assert cut.hits == 2 and slow.hits == 2 and px.requests > 8  # several chunks went through
        _assert_same(_load(url, state, **opts), state)

        url2 = env.url("fails")
        rule = px.add(FaultRule(r"^PUT /upload/.*upload_id", "503", times=None))
        opts = env.opts(endpoint=px.endpoint, part_size="5MiB", max_retries=2, retry_base_delay=0.01)
        msg = _error_of(lambda: _save(url2, state, files_per_rank=1, **opts))
    assert rule.hits == 5  # three tries of the first chunk, and a status query before each retry
    assert "uploading bytes 0-5242880 of " in msg and "__0_0.distcp" in msg and "failed after 3 attempt(s)" in msg, msg
    assert env.names(url2) == []  # the session was cancelled: no object, no metadata


@CORE
def test_commit_failure_leaves_an_incomplete_checkpoint(env):
    state, url = {"w": torch.randn(64, 64)}, env.url()
    meta = r"^PUT .*\.metadata" if env.kind == "s3" else r"^POST .*\.metadata"  # the commit's write only
    with env.proxy() as px:
        px.add(FaultRule(meta, "500", times=None))
        opts = env.opts(endpoint=px.endpoint, max_retries=1, retry_base_delay=0.01)
        msg = _error_of(lambda: _save(url, state, **opts))
    assert ".metadata" in msg and "failed after 2 attempt(s)" in msg, msg
    names = env.names(url)
    assert METADATA_NAME not in names and any(n.endswith(".distcp") for n in names), names
    msg = _error_of(lambda: _load(url, state, **env.opts()))
    assert "is an incomplete checkpoint" in msg, msg


def test_default_retries_ride_out_21_dropped_connections_in_a_row(env):
    """Stock FsspecWriter survives 21 faulty connections in a row here (botocore and s3fs both
    retry); with the default max_retries ours does too, even when one request meets all of them."""
    state, url = {"w": torch.randn(128, 128)}, env.url()
    with env.proxy() as px:
        rule = px.add(FaultRule(".", "drop", times=21))
        opts = env.opts(endpoint=px.endpoint, retry_base_delay=0.001, retry_max_delay=0.01)
        _save(url, state, **opts)
    assert rule.hits == 21
    _assert_same(_load(url, state, **env.opts()), state)


def test_retry_limit_names_the_object(env):
    with env.proxy() as px:
        px.add(FaultRule(".", "drop", times=None))
        opts = env.opts(endpoint=px.endpoint, max_retries=2, retry_base_delay=0.01)
        r = dcp_ext.storage_reader(env.url("x"), **opts)
        with pytest.raises(StorageError, match=r"reading .*x/\.metadata failed after 3 attempt\(s\) \(2 retries, max_retries\)"):
            r.read_metadata()


# -- several ranks ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_save,n_load", [(2, 4), (4, 2)])
@CORE
def test_multirank_resharded_round_trip(ranks, env, n_save, n_load):
    url = env.url()
    opts = env.opts(part_size="5MiB")
    ranks(n_save).run(F.save_dtensors, url, 7, {"w": "row", "emb": "col", "b": "row"}, opts)
    assert METADATA_NAME in env.names(url)
    out = ranks(n_load).run(F.load_dtensors_and_compare, url, 7, {"w": "col", "emb": "row"}, "ours", opts)
    for res in out:
        assert all(res["equal"].values()), res
        assert res["step"] == 7 and res["meta"] == {"note": "hello", "ranks": n_save}


def test_multirank_stock_fsspec_interop(ranks, env):
    so = env.server.fsspec_options()
    ours = env.url("ours")
    ranks(2).run(F.save_dtensors, ours, 8, {"w": "row", "emb": "row"}, env.opts())
    for res in ranks(4).run(O.load_stock_fsspec, ours, 8, {"w": "col"}, so):
        assert all(res["equal"].values()), res
    stock = env.url("stock")
    ranks(4).run(O.save_stock_fsspec, stock, 9, {"w": "col", "emb": "row"}, so)
    for res in ranks(2).run(F.load_dtensors_and_compare, stock, 9, {"w": "row"}, "ours", env.opts()):
        assert all(res["equal"].values()), res


@pytest.mark.parametrize("save,load", [((2, 2, 1), (4, 1, 1)), ((1, 2, 2), (2, 1, 2))])
def test_multirank_reshard_planners(ranks, env, save, load):
    url = env.url()
    opts = {**env.opts(part_size="5MiB"), "checksum_block_size": "64KiB"}
    for r, res in enumerate(ranks(4).run(O.reshard_planners, url, save, load, opts)):
        assert res["bad"] == [] and res["step"] == 3, (r, res)
        assert res["tensor_bytes"] <= res["bytes_needed"] <= res["tensor_bytes"] + 4096, res
    # the same checkpoint, stock planner: full global tensors
    assert O.full_params_from_reshard_checkpoint(url, opts) == []


def test_multirank_failed_upload_commits_nothing_and_keeps_earlier(ranks, env):
    """Rank 1's data can never be uploaded: every rank reports the failure, no metadata is
    written, no upload is left open, and an earlier checkpoint elsewhere is untouched."""
    earlier = env.url("earlier")
    ranks(2).run(F.save_dtensors, earlier, 3, {"w": "row"}, env.opts())
    url = env.url("failing")
    pattern = r"__1_\d+\.distcp"  # rank 1's data file (S3: in the path; GCS: in the name= query)
    with env.proxy() as px:
        px.add(FaultRule(pattern, "503", times=None))
        opts = env.opts(endpoint=px.endpoint, max_retries=1, retry_base_delay=0.01)
        msgs = ranks(2).run(O.save_expect_failure, url, opts)
    for m in msgs:
        assert "CheckpointException" in m and "__1_0.distcp" in m and "failed after 2 attempt(s)" in m, m
    assert METADATA_NAME not in env.names(url)
    assert env.pending_uploads(url) == []
    for m in ranks(2).run(O.load_expect_failure, url, env.opts()):
        assert "incomplete checkpoint" in m, m
    for res in ranks(2).run(F.load_dtensors_and_compare, earlier, 3, {"w": "col"}, "ours", env.opts()):
        assert all(res["equal"].values()), res


# -- async and tiered saves onto object stores ----------------------------------------------------

def test_writer_and_reader_pickle_for_the_process_executor(env):
    """The process-based async executor pickles the writer: clients are rebuilt on the other side."""
    import pickle

    url = env.url()
    w = pickle.loads(pickle.dumps(dcp_ext.storage_writer(url, **env.opts())))
    dcp.save({"x": torch.arange(3)}, storage_writer=w)
    r = pickle.loads(pickle.dumps(dcp_ext.storage_reader(url, **env.opts())))
    assert torch.equal(_load(url, {"x": torch.arange(3)}, **env.opts())["x"], torch.arange(3))
    target = {"x": torch.zeros(3, dtype=torch.long)}
    dcp.load(target, storage_reader=r)
    assert torch.equal(target["x"], torch.arange(3))


def test_async_save_and_tiered_persist_to_object_store(env, tmp_path):
    state = {k: v for k, v in _state(6).items() if k != "empty"}
    url = env.url("async")
    fut = dcp.async_save(state, storage_writer=dcp_ext.storage_writer(url, **env.opts()))
    fut.result()
    _assert_same(_load(url, state, **env.opts()), state)

    url = env.url("tiered")
    w = dcp_ext.storage_writer(url, cache=str(tmp_path / "fast"), **env.opts())
    dcp.save(state, storage_writer=w)
    res = w.wait_persisted(120)
    assert res.url == url and res.bytes > 0
    names = env.names(url)
    assert METADATA_NAME in names and not [n for n in names if n.startswith(".dcp_ext_persist")], names
    # the durable copy alone (an empty fast tier elsewhere) is complete and exact
    _assert_same(_load(url, state, cache=str(tmp_path / "other"), **env.opts()), state)
    _assert_same(_load(url, state, **env.opts()), state)



@pytest.mark.parametrize("composite", [False, True])
def test_gcs_accepts_chunks_below_the_s3_minimum(gcs_server, composite):
    """GCS resumable chunks need only be multiples of 256 KiB (no 5 MiB minimum as on S3): a
    12 MB tensor goes up in ~46 chunks (or part objects) of 256 KiB and comes back exact."""
    opts = gcs_server.options(part_size="256KiB", composite_uploads=composite)
    url = f"gs://{gcs_server.bucket}/small-chunks-{uuid.uuid4().hex[:8]}"
    x = torch.arange(3_000_000, dtype=torch.float32)
    dcp.save({"x": x}, storage_writer=dcp_ext.storage_writer(url, **opts))
    y = {"x": torch.zeros_like(x)}
    dcp.load(y, storage_reader=dcp_ext.storage_reader(url, **opts))
    assert torch.equal(y["x"], x)
