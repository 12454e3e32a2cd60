"""The dcp-ext command line: demo, inspect, verify (run as a user would, in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.verify import verify_checkpoint


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcp_ext.cli", *args], capture_output=True, text=True,
                          timeout=300)


def _save(path, **opts):
    state = {"w": torch.randn(300, 200), "b": torch.arange(7), "cfg": {"lr": 0.1}}
    dcp.save(state, storage_writer=dcp_ext.storage_writer(path, **opts))
    return state


def test_demo_end_to_end(tmp_path):
    r = _cli("demo", "--dir", str(tmp_path), "--save-ranks", "2", "--load-ranks", "2", "--steps", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: every tensor matches" in r.stdout
    assert "training blocked" in r.stdout and "TP=2" in r.stdout
    assert (tmp_path / "step_2" / ".metadata").exists()


def test_demo_bad_arguments():
    r = _cli("demo", "--save-ranks", "0")
    assert r.returncode == 2 and "must be >= 1" in r.stderr
    r = _cli("demo", "--load-ranks", "3")
    assert r.returncode == 2 and "must divide the model width 256" in r.stderr and "got 3" in r.stderr


def test_inspect(tmp_path):
    _save(tmp_path)
    r = _cli("inspect", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "2 tensors, 1 objects" in r.stdout and "float32" in r.stdout and "[300, 200]" in r.stdout
    info = json.loads(_cli("inspect", "--json", str(tmp_path)).stdout)
    w = info["tensors"]["w"]
    assert {k: w[k] for k in ("dtype", "size", "chunks")} == {"dtype": "float32", "size": [300, 200], "chunks": 1}
    assert 300 * 200 * 4 < w["bytes"] < 300 * 200 * 4 + 4096  # the raw data plus its record header
    assert info["world_size"] == 1 and info["checksummed"] is True


@pytest.mark.parametrize("algo", ["xxh3_64", "crc32c"])
def test_verify_ok_and_corrupt(tmp_path, algo):
    _save(tmp_path, checksum_block_size="4KiB", checksum_algorithm=algo)
    r = _cli("inspect", str(tmp_path))
    assert r.returncode == 0 and f"checksums: {algo}" in r.stdout, r.stdout + r.stderr
    assert json.loads(_cli("inspect", "--json", str(tmp_path)).stdout)["checksum_algorithm"] == algo
    r = _cli("verify", str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("OK:"), r.stdout + r.stderr
    f = tmp_path / "__0_0.distcp"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    r = _cli("verify", str(tmp_path))
    assert r.returncode == 1 and "CORRUPT" in r.stdout
    assert "fails its checksum" in r.stderr and "__0_0.distcp" in r.stderr


def test_verify_reports_all_damaged_items(tmp_path):
    _save(tmp_path, checksum_block_size="4KiB")
    m = json.loads((tmp_path / ".dcp_ext.json").read_text())
    f = tmp_path / "__0_0.distcp"
    raw = bytearray(f.read_bytes())
    for it in m["items"]:
        if it["index"][0] in ("w", "b"):
            raw[it["offset"] + it["data_offset"] + 1] ^= 0x01
    f.write_bytes(bytes(raw))
    rep = verify_checkpoint(str(tmp_path))
    assert not rep.ok and len(rep.errors) == 2


def test_cli_errors_are_clear(tmp_path):
    r = _cli("inspect", str(tmp_path / "missing"))
    assert r.returncode == 2 and "location does not exist" in r.stderr
    _save(tmp_path / "stock_like", checksum=False)
    r = _cli("verify", str(tmp_path / "stock_like"))
    assert r.returncode == 0 and "without checksums" in r.stdout
