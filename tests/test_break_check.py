"""The deliberate-break script (tests/break_check.py, run by CI after the suite) stays usable:
every break still applies to the current sources, and each names tests that exist. Running the
breaks themselves takes minutes: ``python tests/break_check.py``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import break_check as bc


@pytest.mark.parametrize("brk", bc.BREAKS, ids=lambda b: b.name)
def test_break_applies_to_the_current_sources(brk, tmp_path):
    for rel, _, _ in brk.edits:
        os.makedirs(tmp_path / os.path.dirname(rel), exist_ok=True)
        (tmp_path / rel).write_bytes(open(os.path.join(bc.ROOT, rel), "rb").read())
    bc.apply(brk, str(tmp_path))  # raises CheckError when an old text is not there exactly once
    for rel, old, new in brk.edits:
        assert new in (tmp_path / rel).read_text()
    files = [t.split("::")[0] for t in brk.tests if t.split("::")[0].endswith(".py")]
    assert files and all(os.path.isfile(os.path.join(bc.ROOT, f)) for f in files), brk.tests


def test_a_break_that_does_not_apply_is_an_error(tmp_path):
    brk = bc.Break("x", "y", (("dcp_ext/layout.py", "text that is not in the file", "z"),), ("tests/test_layout.py",))
    os.makedirs(tmp_path / "dcp_ext")
    (tmp_path / "dcp_ext" / "layout.py").write_text("other\n")
    with pytest.raises(bc.CheckError, match=r"break x does not apply: dcp_ext/layout.py holds 0 copies .* update "
                                            r"tests/break_check.py"):
        bc.apply(brk, str(tmp_path))


def test_list_names_every_break():
    r = subprocess.run([sys.executable, os.path.join(bc.ROOT, "tests", "break_check.py"), "--list"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for b in bc.BREAKS:
        assert f"{b.name}: {b.what}" in r.stdout
