"""GCS transport: our JSON-API client (``dcp_ext/storage/gcs.py``) vs ``google-cloud-storage``.

Issue 14 asked whether ``google-cloud-storage`` (resumable uploads, ranged downloads) should
carry our GCS bytes instead of the ~400 lines that speak the JSON API by hand: adopt it if it is
within 10% of our throughput. This moves the *same bytes* both ways, on fake-gcs-server started
here on 127.0.0.1, with the same shape of work:

* upload: ``--files`` objects uploaded in parallel (one thread each), each one resumable upload
  in ``--chunk-mib`` chunks, fed from memory (ours: ``GCSStore.open_writer``, which fills the next
  chunk while one is in flight; theirs: ``Blob.upload_from_file`` with ``chunk_size``);
* download: every object read back as ``--range-mib`` ranged GETs on ``--threads`` threads into
  one preallocated buffer (ours: ``GCSStore.read_into``; theirs: ``Blob.download_to_file`` with
  ``start``/``end`` into a writer over the buffer, the fastest in-memory ranged read it offers).

Transport checksums are off on both sides (``checksum=None`` for theirs; ours verifies block
crc32c at the checkpoint level, above the transport). Configs alternate within each round (the
order flips every round); the figure is the median of ``--rounds``. Both read back the exact
bytes (checked in the first round). Client and emulator share the machine's cores: the load
average is printed beside the figures, and ratios from the same run are what to compare.

    python benchmarks/bench_gcs_transport.py --size-mib 256 --rounds 5

Writes ``bench_out/bench_gcs_transport.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dcp_ext  # noqa: E402
from dcp_ext.storage.gcs import GCSStore  # noqa: E402
from tests.support.servers import GCSTestServer  # noqa: E402

MiB = 1024 * 1024


class _Into(io.RawIOBase):
    """A write-only file over a memoryview: what ``download_to_file`` writes lands in place."""

    def __init__(self, out: memoryview):
        self.out, self.pos = out, 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        n = len(b)
        self.out[self.pos:self.pos + n] = b
        self.pos += n
        return n


class _From(io.RawIOBase):
    """A read-only, seekable file over a memoryview (``read`` makes the one copy ``requests`` needs)."""

    def __init__(self, src: memoryview):
        self.src, self.pos = src, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.src) + pos)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = len(self.src) if n is None or n < 0 else min(self.pos + n, len(self.src))
        b = bytes(self.src[self.pos:end])
        self.pos = end
        return b

    def readinto(self, b) -> int:
        n = min(len(b), len(self.src) - self.pos)
        b[:n] = self.src[self.pos:self.pos + n]
        self.pos += n
        return n


def _pieces(total: int, files: int, range_size: int) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(file offset, size) per object, and (object index, start, end) per ranged read."""
    per = total // files
    objs = [(i * per, per if i < files - 1 else total - i * per) for i in range(files)]
    ranges = [(i, a, min(a + range_size, size)) for i, (_, size) in enumerate(objs) for a in range(0, size, range_size)]
    return objs, ranges


class Ours:
    name = "dcp_ext"

    def __init__(self, srv: GCSTestServer, chunk: int, threads: int):
        self.cfg = dcp_ext.load_config(environ={}, io_threads=threads,
                                       **srv.options(part_size=chunk, max_concurrency=threads))
        self.bucket = srv.bucket

    def upload(self, prefix: str, data: memoryview, objs, chunk: int) -> None:
        store = GCSStore(f"gs://{self.bucket}/{prefix}", self.cfg)

        def one(i: int) -> None:
            off, size = objs[i]
            with store.open_writer(f"obj{i}") as w:
                for a in range(off, off + size, chunk):  # fed a chunk at a time, like a record stream
                    w.write(data[a:min(a + chunk, off + size)])

        with ThreadPoolExecutor(len(objs)) as ex:
            list(ex.map(one, range(len(objs))))

    def download(self, prefix: str, out: memoryview, objs, ranges, threads: int) -> None:
        store = GCSStore(f"gs://{self.bucket}/{prefix}", self.cfg)

        def one(r) -> None:
            i, a, b = r
            store.read_into(f"obj{i}", a, out[objs[i][0] + a:objs[i][0] + b])

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, ranges))


class Theirs:
    name = "google-cloud-storage"

    def __init__(self, srv: GCSTestServer, chunk: int, threads: int):
        try:
            import requests.adapters
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage
        except ImportError as e:
            raise SystemExit(f"this benchmark needs google-cloud-storage ({e}): pip install -e '.[bench]'") from e

        self.client = storage.Client(project="bench", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": srv.endpoint})
        # one connection per thread, like ours (requests' default pool keeps 10)
        adapter = requests.adapters.HTTPAdapter(pool_connections=threads, pool_maxsize=max(threads, 10))
        self.client._http.mount("http://", adapter)
        self.bucket = self.client.bucket(srv.bucket)
        self.chunk = chunk

    def upload(self, prefix: str, data: memoryview, objs, chunk: int) -> None:
        def one(i: int) -> None:
            off, size = objs[i]
            blob = self.bucket.blob(f"{prefix}/obj{i}", chunk_size=chunk)
            # resumable because chunk_size is set
            blob.upload_from_file(_From(data[off:off + size]), size=size, content_type="application/octet-stream",
                                  checksum=None)

        with ThreadPoolExecutor(len(objs)) as ex:
            list(ex.map(one, range(len(objs))))

    def download(self, prefix: str, out: memoryview, objs, ranges, threads: int) -> None:
        blobs = [self.bucket.blob(f"{prefix}/obj{i}") for i in range(len(objs))]

        def one(r) -> None:
            i, a, b = r
            blobs[i].download_to_file(_Into(out[objs[i][0] + a:objs[i][0] + b]), start=a, end=b - 1,
                                      raw_download=True, checksum=None)

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, ranges))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=4, help="objects uploaded in parallel")
    ap.add_argument("--chunk-mib", type=int, default=16, help="resumable-upload chunk size (multiple of 0.25)")
    ap.add_argument("--range-mib", type=int, default=16, help="size of each ranged GET")
    ap.add_argument("--threads", type=int, default=8, help="ranged GETs in flight")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench_out/bench_gcs_transport.json")
    ap.add_argument("--plot", default="", help="write a PNG of the table here (needs matplotlib)")
    args = ap.parse_args()

    import torch

    total, chunk = args.size_mib * MiB, args.chunk_mib * MiB
    data = torch.randint(0, 256, (total,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    src = memoryview(data.numpy()).cast("B")
    objs, ranges = _pieces(total, args.files, args.range_mib * MiB)
    results: dict[str, dict[str, list[float]]] = {}
    loads = []
    with GCSTestServer() as srv:
        contenders = [Ours(srv, chunk, args.threads), Theirs(srv, chunk, args.threads)]
        for rnd in range(args.rounds):
            order = contenders if rnd % 2 == 0 else contenders[::-1]
            for c in order:
                prefix = f"bench/{c.name}/{uuid.uuid4().hex[:8]}"
                t = time.perf_counter()
                c.upload(prefix, src, objs, chunk)
                up = time.perf_counter() - t
                out = torch.zeros(total, dtype=torch.uint8)
                t = time.perf_counter()
                c.download(prefix, memoryview(out.numpy()).cast("B"), objs, ranges, args.threads)
                down = time.perf_counter() - t
                if rnd == 0 and not torch.equal(out, data):
                    raise SystemExit(f"{c.name}: the bytes read back differ from the bytes written")
                r = results.setdefault(c.name, {"upload_mib_s": [], "download_mib_s": []})
                r["upload_mib_s"].append(args.size_mib / up)
                r["download_mib_s"].append(args.size_mib / down)
                GCSStore(f"gs://{srv.bucket}/{prefix}", Ours(srv, chunk, 1).cfg).remove([f"obj{i}" for i in
                                                                                         range(args.files)])
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds} done (load {loads[-1]:.2f})", flush=True)
    summary = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}
    ours, theirs = summary["dcp_ext"], summary["google-cloud-storage"]
    print(f"\n{args.size_mib} MiB in {args.files} objects, {args.chunk_mib} MiB chunks, {args.range_mib} MiB ranges on "
          f"{args.threads} threads; median of {args.rounds} rounds; load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"{'transport':24s} {'upload MiB/s':>13s} {'download MiB/s':>15s}")
    for name, s in summary.items():
        print(f"{name:24s} {s['upload_mib_s']:13.0f} {s['download_mib_s']:15.0f}")
    print(f"google-cloud-storage / ours: upload {theirs['upload_mib_s'] / ours['upload_mib_s']:.2f}, "
          f"download {theirs['download_mib_s'] / ours['download_mib_s']:.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "runs": results, "median": summary, "loadavg": loads}, f, indent=1)
    if args.plot:
        plot(summary, loads, args)


def plot(summary: dict, loads: list[float], args: argparse.Namespace) -> None:
    """Upload and download MiB/s of both transports (one PNG)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import bar_chart

    ours = summary["dcp_ext"]
    bar_chart(args.plot, f"GCS transport: {args.size_mib} MiB as {args.files} objects (higher is better)",
              ["upload", "download"],
              {f"{n} ({s['upload_mib_s'] / ours['upload_mib_s']:.2f}x / {s['download_mib_s'] / ours['download_mib_s']:.2f}x ours)"
               if n != "dcp_ext" else n: [s["upload_mib_s"], s["download_mib_s"]] for n, s in summary.items()},
              "MiB/s", f"fake-gcs-server; median of {args.rounds} interleaved rounds; load average (1 min) "
              f"{min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
    main()
