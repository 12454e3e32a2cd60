"""Packaging a user can trust: the LICENSE matches pyproject, the CHANGELOG names the version, the
README's links resolve, and the built wheel installs into a clean venv with only the core
dependencies, imports, runs ``dcp-ext --help``, and reports missing extras as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def test_license_and_changelog():
    lic = open(os.path.join(ROOT, "LICENSE"), encoding="utf-8").read()
    assert _project()["license"] == {"text": "BSD-3-Clause"}
    assert lic.startswith("BSD 3-Clause License") and "Neither the name of the copyright holder" in lic
    log = open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8").read()
    assert re.search(rf"^## {re.escape(_project()['version'])}\b", log, flags=re.M)


def test_readme_and_docs_links_resolve():
    missing = []
    # the pages (docs/ also holds the benchmark plots, docs/img/, which the pages link to)
    pages = sorted(p for p in os.listdir(os.path.join(ROOT, "docs")) if p.endswith(".md"))
    for page in ["README.md"] + [os.path.join("docs", p) for p in pages]:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target)):
                missing.append(f"{page} -> {target}")
    assert missing == []


def _sh(cmd: list[str], cwd: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "DCP_EXT_", "VIRTUAL_ENV"))}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**clean, **env})


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv(tmp_path):
    """Build the wheel, install it with torch and only the core dependencies into a fresh venv
    (no system site-packages), and use it from outside the source tree."""
    r = _sh([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
             "-q"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    wheel = next(p for p in os.listdir(tmp_path / "w") if p.endswith(".whl"))
    import zipfile

    names = zipfile.ZipFile(tmp_path / "w" / wheel).namelist()
    assert any(n.endswith("LICENSE") for n in names) and not any(n.startswith("tests/") for n in names)
    venv = tmp_path / "venv"
    assert _sh([sys.executable, "-m", "venv", str(venv)], cwd=str(tmp_path)).returncode == 0
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    r = _sh(pip + ["torch==2.13.0"], cwd=str(tmp_path), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _sh(pip + [str(tmp_path / "w" / wheel)], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    have = _sh([py, "-m", "pip", "list", "--format=freeze"], cwd=str(tmp_path)).stdout.lower()
    for extra_only in ("botocore", "google-auth", "safetensors", "pyyaml", "tensorstore", "pytest"):
        assert f"\n{extra_only}==" not in "\n" + have, f"{extra_only} is not a core dependency"
    r = _sh([str(venv / "bin" / "dcp-ext"), "--help"], cwd=str(tmp_path))
    assert r.returncode == 0 and "usage: dcp-ext" in r.stdout, r.stderr
    # a missing extra: one clear line naming the pip command, no traceback
    r = _sh([str(venv / "bin" / "dcp-ext"), "ls", "s3://bucket/run"], cwd=str(tmp_path))
    assert r.returncode == 2 and "pip install 'dcp-ext[s3]'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    script = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import dcp_ext, torch, torch.distributed.checkpoint as dcp\n"
        "assert dcp_ext.__file__.startswith(%r), dcp_ext.__file__\n"
        "for url in ('gs://b/x',):\n"
        "    try:\n"
        "        dcp_ext.storage_writer(url)\n"
        "    except dcp_ext.MissingDependencyError as e:\n"
        "        assert \"pip install 'dcp-ext[gcs]'\" in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no MissingDependencyError')\n"
        "dcp.save({'w': torch.arange(6.0)}, storage_writer=dcp_ext.storage_writer('ck'))\n"
        "rep = dcp_ext.export_checkpoint('ck', 'out')\n"
        "print('OK', rep.tensors)\n" % str(venv))
    r = _sh([py, "-c", script], cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.strip() == "OK 1", r.stdout + r.stderr
