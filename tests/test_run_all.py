"""``benchmarks/run_all.py``: the cheapest benchmarks in quick mode, into temporary directories
(never ``docs/img``), a failing benchmark reported while the others still run, bad names refused."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import run_all  # noqa: E402


def test_quick_run_writes_json_and_one_png_per_table(tmp_path):
    """``--quick --only hash,convert``: both scripts run, each writes its JSON into ``--out-dir``
    and its PNG into ``--img-dir``; the load average is printed before and after each."""
    pytest.importorskip("matplotlib")
    out, img = tmp_path / "out", tmp_path / "img"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--quick", "--only",
                        "hash,convert", "--out-dir", str(out), "--img-dir", str(img)],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(os.listdir(img)) == ["bench_convert.png", "bench_hash.png"]
    for name in ("bench_convert.png", "bench_hash.png"):
        with open(img / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    with open(out / "bench_convert.json") as f:
        doc = json.load(f)
    assert [x["direction"] for x in doc["results"]] == ["export", "import"]
    assert doc["size"] == 32 << 20
    with open(out / "bench_hash.json") as f:
        assert "crc32c" in json.dumps(json.load(f))
    assert r.stderr.count("load average before") == 2 and r.stderr.count("load average after") == 2
    assert "[1/2] hash" in r.stderr and "[2/2] convert" in r.stderr
    assert "2 of 2 benchmark(s) ran" in r.stderr


def test_a_failing_benchmark_is_reported_and_the_others_still_run(tmp_path, caplog):
    """A benchmark that exits non-zero is counted and logged with its output's last lines; the
    next one still runs and writes its results."""
    bad = run_all.Bench("broken", "bench_hash.py", ["--no-such-option"], ["--no-such-option"], [], 1, 1, "test")
    good = next(b for b in run_all.BENCHMARKS if b.name == "hash")
    with caplog.at_level(logging.INFO, logger="run_all"):
        failed = run_all.run_all([bad, good], True, str(tmp_path / "out"), str(tmp_path / "img"))
    assert failed == 1
    assert os.path.exists(tmp_path / "out" / "bench_hash.json")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("broken FAILED" in m and "exit status 2" in m and "--no-such-option" in m for m in errors), errors
    assert any(m.startswith("failed: broken:") for m in errors), errors
    with open(tmp_path / "out" / "bench_broken.log") as f:
        assert "unrecognized arguments: --no-such-option" in f.read()


def test_a_benchmark_past_its_timeout_is_killed_and_reported(tmp_path, caplog):
    """The timeout ends the benchmark's whole process group and the run goes on."""
    slow = run_all.Bench("slow", "bench_hash.py", [], [], [], 1, 1, "test")
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    with caplog.at_level(logging.INFO, logger="run_all"):
        ok, why = run_all.run_one(slow, cmd, str(tmp_path), str(tmp_path / "slow.log"), timeout=1.0)
    assert not ok and "ran past its timeout" in why
    with open(tmp_path / "slow.log") as f:
        assert "started" in f.read()  # its output was kept up to the kill


def test_unknown_benchmark_names_are_refused(capsys):
    for opt in ("--only", "--skip"):
        with pytest.raises(SystemExit) as e:
            run_all.main([opt, "hash,no_such_bench", "--list"])
        assert e.value.code == 2
        assert f"{opt}: unknown benchmark(s) no_such_bench; known: hash," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_all.main(["--only", "hash", "--skip", "hash", "--list"])
    assert "left no benchmark to run" in capsys.readouterr().err


def test_list_prints_every_command_with_the_doc_parameters(capsys):
    """``--list``: one line per benchmark with its estimate and the parameters ``docs/benchmarks.md``
    states (checked for two of them against the doc's own command lines)."""
    assert run_all.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines[:-1]] == [b.name for b in run_all.BENCHMARKS]
    assert lines[-1].startswith("total: about ")
    assert all(f"{os.path.join(ROOT, 'docs', 'img')}/" in ln for ln in lines[:-1])
    with open(os.path.join(ROOT, "docs", "benchmarks.md")) as f:
        doc = f.read()
    for name, doc_args in (("gcs_transport", "--size-mib 256 --rounds 7"),
                           ("compression", "--size-mib 256 --rounds 2 --steps 10 --bandwidth-mib 25")):
        assert doc_args in doc
        assert doc_args in next(ln for ln in lines if ln.startswith(name + " "))


def test_quick_mode_writes_outside_docs_img_by_default(capsys):
    """Tiny runs never replace the doc's figures unless told to: --quick defaults to bench_out/quick."""
    assert run_all.main(["--quick", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    quick = os.path.join(ROOT, "bench_out", "quick")
    assert lines and all(f"--out {quick}/" in ln and f"--plot {quick}/" in ln for ln in lines), lines
    assert not any(os.path.join("docs", "img") in ln for ln in lines)


def test_chart_writes_one_png_with_several_panels_and_says_when_matplotlib_is_missing(tmp_path, monkeypatch, capsys):
    """``plots.chart``: panels side by side (log scale, goal lines, a NaN for "not measured") in one
    PNG; without matplotlib it writes nothing, says so and returns False."""
    import plots

    path = str(tmp_path / "sub" / "c.png")
    panels = [plots.Panel(["a", "b"], {"x": [1.0, float("nan")], "y": [0.5, 2.0]}, "s", "left", logy=True,
                          hline=1.5, hline_label="goal"),
              plots.Panel(["a"], {"x vs y": [2.0]}, "ratio", hlines=[(1.0, "level"), (0.9, "goal")], color_offset=1)]
    if importlib.util.find_spec("matplotlib") is not None:
        assert plots.chart(path, "title", panels, plots.loadavg_note([1.0, 2.0, 3.0]))
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    other = str(tmp_path / "none.png")
    assert plots.chart(other, "title", panels) is False
    assert not os.path.exists(other)
    assert "matplotlib is not installed (pip install -e '.[bench]')" in capsys.readouterr().out
    assert plots.loadavg_note([1.0, 2.0, 3.0]).startswith("load average 1.0 / 2.0 / 3.0 -> ")
