"""The dcp-ext commands ls, inspect FQN, verify --json, convert, diff, gc, rm: run as a user would
(subprocesses on real files and the S3 test server), plus their error messages (in process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dcp_ext
from dcp_ext.cli import main
from dcp_ext.storage.commit import STEP_INFO_NAME

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcp_ext.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def _managed_root(root: str, steps=(1, 2, 3), **opts) -> None:
    with dcp_ext.CheckpointManager(root, **opts) as mgr:
        for s in steps:
            mgr.save(s, {"w": torch.full((64, 64), float(s)), "b": torch.arange(3), "step": s},
                     metrics={"loss": 10.0 - s})


def test_help_everywhere(capsys):
    r = _cli("--help")
    assert r.returncode == 0 and "exit codes" in r.stdout and "convert" in r.stdout and "gc" in r.stdout
    for cmd in ("ls", "inspect", "verify", "convert", "diff", "gc", "rm", "demo"):
        with pytest.raises(SystemExit) as ei:
            main([cmd, "--help"])
        assert ei.value.code == 0
        assert f"usage: dcp-ext {cmd}" in capsys.readouterr().out


def test_ls_inspect_verify_on_a_manager_root(tmp_path):
    root = str(tmp_path / "run")
    _managed_root(root)
    dcp.save({"x": torch.ones(2)}, storage_writer=dcp_ext.storage_writer(f"{root}/step_0"))  # not the manager's
    os.makedirs(f"{root}/step_4")
    with open(f"{root}/step_4/__0_0.distcp", "wb") as f:
        f.write(b"x" * 100)
    r = _cli("ls", root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:4] == ["STEP", "STATE", "SIZE", "COMMITTED"]
    assert "not written by a CheckpointManager" in lines[1] and lines[1].startswith("0 ")
    assert lines[4].startswith("3 *") and "loss=7" in lines[4]
    assert lines[5].startswith("4") and "incomplete" in lines[5] and "100 B" in lines[5]
    doc = json.loads(_cli("ls", "--json", root).stdout)
    assert doc["latest"] == "step_3" and [s["step"] for s in doc["steps"]] == [0, 1, 2, 3, 4]
    s3 = doc["steps"][3]
    assert s3["state"] == "complete" and s3["metrics"] == {"loss": 7.0} and s3["managed"] and s3["latest"]
    assert s3["bytes"] > 64 * 64 * 4
    r = _cli("inspect", f"{root}/step_3", "w", "st*")
    assert r.returncode == 0 and "w: float32 [64, 64], 1 chunk(s)" in r.stdout and "step: object" in r.stdout
    r = _cli("verify", "--json", f"{root}/step_3")
    v = json.loads(r.stdout)
    assert r.returncode == 0 and v["ok"] and v["items"] == 3 and v["errors"] == []


def test_closed_pipe_is_quiet(tmp_path):
    state = {f"layers.{i}.weight": torch.zeros(1) for i in range(3000)}  # > 64 KiB of inspect output
    dcp.save(state, storage_writer=dcp_ext.storage_writer(str(tmp_path / "ck")))
    r = subprocess.run(["bash", "-c", f'set -o pipefail; "{sys.executable}" -m dcp_ext.cli inspect "{tmp_path}/ck" '
                        f'| head -1; echo "rc=${{PIPESTATUS[0]}}"'], capture_output=True, text=True, timeout=300)
    assert r.stdout.splitlines()[0].startswith(f"{tmp_path}/ck: 3000 tensors")
    assert r.stdout.splitlines()[-1] == "rc=141" and r.stderr == "", r.stderr


def test_convert_both_ways_and_diff(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    root = str(tmp_path / "run")
    _managed_root(root, steps=(1,))
    r = _cli("convert", f"{root}/step_1", str(tmp_path / "hf"), "--dtype", "bf16", "--keys", "w", "b")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout and "model.safetensors" in r.stdout
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert got["w"].dtype == torch.bfloat16 and torch.equal(got["b"], torch.arange(3))
    assert r.stderr == ""  # no warnings, and no progress bar when stderr is not a terminal
    r = _cli("convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "back"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tensors"] == 2 and r.stderr == "", r.stderr
    r = _cli("diff", f"{root}/step_1", str(tmp_path / "back"), "--keys", "w", "b", "--atol", "0")
    assert r.returncode == 1 and "w" in r.stdout and "dtype" in r.stdout and "1 of 2 keys differ" in r.stdout
    r = _cli("diff", str(tmp_path / "back"), str(tmp_path / "back"))
    assert r.returncode == 0 and r.stdout.startswith("identical: 2 keys")
    r = _cli("convert", f"{root}/step_1", str(tmp_path / "hf"))
    assert r.returncode == 2 and "already exist" in r.stderr and "--overwrite" in r.stderr


def test_gc_and_rm_dry_run_then_delete(tmp_path, capsys):
    root = str(tmp_path / "run")
    _managed_root(root, steps=(1, 2, 3, 4))
    rc, out, _ = _run(capsys, "gc", root, "--keep-last", "2")
    assert rc == 0 and "would delete" in out and "step_1" in out and "step_2" in out and "dry run" in out
    assert sorted(os.listdir(root)) == ["latest", "step_1", "step_2", "step_3", "step_4"]
    r = _cli("gc", root, "--keep-best", "1", "--metric", "loss", "--mode", "max", "--yes", "--json")
    assert r.returncode == 0 and [d["step"] for d in json.loads(r.stdout)["deleted"]] == [2, 3]  # 1 best, 4 newest
    assert sorted(os.listdir(root)) == ["latest", "step_1", "step_4"]
    rc, _, err = _run(capsys, "rm", root, "4")
    assert rc == 2 and "newest complete checkpoint" in err and "--allow-newest" in err
    rc, out, _ = _run(capsys, "rm", root, "step_1", "--yes")
    assert rc == 0 and "deleted" in out and not os.path.exists(f"{root}/step_1")
    # an incomplete leftover goes only with --incomplete, and not while it is young
    _managed_root(root, steps=(5,))
    os.remove(f"{root}/step_5/.metadata")
    rc, out, _ = _run(capsys, "gc", root, "--incomplete")
    assert rc == 0 and "nothing to delete" in out
    rec = json.loads(open(f"{root}/step_5/{STEP_INFO_NAME}").read())
    rec["created"] -= 7200
    with open(f"{root}/step_5/{STEP_INFO_NAME}", "w") as f:
        json.dump(rec, f)
    rc, out, _ = _run(capsys, "gc", root, "--incomplete", "--yes")
    assert rc == 0 and "step_5 (incomplete" in out and not os.path.exists(f"{root}/step_5")


@pytest.mark.parametrize("args,msg", [
    (["ls", "/nonexistent/dcp_ext_root"], "no such checkpoint root"),
    (["inspect", "/nonexistent/ck"], "location does not exist"),
    (["gc", "ROOT"], "say what to keep"),
    (["gc", "ROOT", "--keep-best", "2"], "--keep-best needs --metric"),
    (["gc", "ROOT", "--keep-last", "0"], "--keep-last must be >= 1"),
    (["rm", "ROOT", "9"], "has no step '9'; steps: 1"),
    (["inspect", "ROOT/step_1", "nope"], "has no key matching nope"),
    (["convert", "ROOT/step_1", "OUT", "--dtype", "int3"], "unknown dtype 'int3'"),
    (["convert", "--from", "torch", "ROOT/nothing.pt", "OUT"], "no such file"),
])
def test_cli_errors_are_one_clear_line(tmp_path, capsys, args, msg):
    root = str(tmp_path / "run")
    _managed_root(root, steps=(1,))
    args = [a.replace("ROOT", root).replace("OUT", str(tmp_path / "out")) for a in args]
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and msg in err and "Traceback" not in err, err
    assert err.startswith(f"dcp-ext {args[0]}: ")


@pytest.mark.s3
def test_cli_on_s3(s3_server, tmp_path):
    pytest.importorskip("safetensors")
    opts = s3_server.options(part_size="5MiB")
    root = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:10]}/run"
    _managed_root(root, steps=(1, 2), **opts)
    env = {"DCP_EXT_S3_ENDPOINT_URL": s3_server.endpoint, "DCP_EXT_S3_ACCESS_KEY_ID": s3_server.access_key,
           "DCP_EXT_S3_SECRET_ACCESS_KEY": s3_server.secret_key, "DCP_EXT_S3_REGION": s3_server.region}
    doc = json.loads(_cli("ls", "--json", root, env=env).stdout)
    assert [s["step"] for s in doc["steps"]] == [1, 2] and doc["latest"] == "step_2"
    r = _cli("convert", f"{root}/step_2", f"{root}/export", env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("convert", "--from", "safetensors", f"{root}/export", str(tmp_path / "local"), env=env)
    assert r.returncode == 0, r.stderr
    got = {"w": torch.zeros(64, 64)}
    dcp.load(got, storage_reader=dcp_ext.storage_reader(str(tmp_path / "local")))
    assert torch.equal(got["w"], torch.full((64, 64), 2.0))
    r = _cli("gc", root, "--keep-last", "1", "--yes", env=env)
    assert r.returncode == 0 and "deleted" in r.stdout
    assert [s["step"] for s in json.loads(_cli("ls", "--json", root, env=env).stdout)["steps"]] == [2]


def test_read_only_commands_never_unpickle_stored_objects(tmp_path, capsys):
    from tests.convert_rank_fns import Tripwire

    marker = tmp_path / "TRIPPED"
    root = str(tmp_path / "run")
    with dcp_ext.CheckpointManager(root) as mgr:
        mgr.save(1, {"w": torch.ones(4), "trip": Tripwire(str(marker))})
    ck = f"{root}/step_1"
    for args in (["ls", root], ["inspect", ck, "trip"], ["verify", ck], ["diff", ck, ck],
                 ["convert", ck, str(tmp_path / "st")], ["convert", ck, str(tmp_path / "m.pt"), "--to", "torch"]):
        rc, out, err = _run(capsys, *args)
        assert rc == 0, (args, out, err)
        assert not marker.exists(), f"dcp-ext {' '.join(args)} unpickled a stored object"
    assert "trip" in out and "weights_only" in out  # left out of the torch export, not executed
