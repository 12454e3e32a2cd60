"""Config precedence, validation messages, backend registry and URL dispatch."""

from __future__ import annotations

import re

import pytest

import dcp_ext
from dcp_ext.config import Config, load_config, parse_size
from dcp_ext.errors import ConfigError, MissingDependencyError, UnknownBackendError
from dcp_ext.storage import Backend, get_backend, register_backend


def test_defaults():
    c = load_config(environ={})
    assert c.io_threads == 8 and c.checksum and c.verify and not c.overwrite
    assert c.checksum_block_size == 1024 * 1024 and c.s3.part_size == 16 * 1024 * 1024


def test_precedence_explicit_over_env_over_file_over_defaults(tmp_path):
    f = tmp_path / "ck.toml"
    f.write_text('io_threads = 2\nchecksum = false\n[s3]\npart_size = "8MiB"\nregion = "eu-west-1"\n')
    env = {"DCP_EXT_IO_THREADS": "3", "DCP_EXT_S3_REGION": "us-east-2"}
    c = load_config(f, environ=env)
    assert c.io_threads == 3  # env beats file
    assert c.checksum is False  # file beats default
    assert c.s3.part_size == 8 * 1024 * 1024 and c.s3.region == "us-east-2"
    c = load_config(f, environ=env, io_threads=5, s3={"region": "ap-south-1"})
    assert c.io_threads == 5 and c.s3.region == "ap-south-1"  # explicit beats env


def test_yaml_and_dict_and_env_file(tmp_path):
    y = tmp_path / "ck.yaml"
    y.write_text("verify: false\nfs:\n  fsync: false\n")
    c = load_config(y, environ={})
    assert c.verify is False and c.fs.fsync is False
    c = load_config({"overwrite": True, "gcs": {"token": "anon"}}, environ={})
    assert c.overwrite and c.gcs.token == "anon"
    c = load_config(environ={"DCP_EXT_CONFIG": str(y)})
    assert c.verify is False
    t = tmp_path / "nested.toml"
    t.write_text("[dcp_ext]\nio_threads = 7\n")
    assert load_config(t, environ={}).io_threads == 7


def test_config_object_is_not_mutated():
    base = Config(io_threads=2)
    c = load_config(base, environ={}, s3={"region": "x"})
    assert base.s3.region is None and c.s3.region == "x" and c.io_threads == 2


@pytest.mark.parametrize("opts,msg", [
    ({"io_thread": 4}, r"unknown option 'io_thread'; valid options: .*io_threads"),
    ({"s3": {"partsize": 1}}, r"unknown option 's3.partsize'; valid options in \[s3\]: .*part_size"),
    ({"io_threads": "four"}, r"io_threads: expected an integer, got 'four'"),
    ({"checksum": "yes"}, r"checksum: expected true/false"),
    ({"io_threads": 0}, r"io_threads: must be >= 1"),
    ({"checksum_block_size": "1KiB"}, r"checksum_block_size: must be >= 4096"),
    ({"s3": {"part_size": "1MiB"}}, r"part_size: must be >= 5MiB"),
    ({"gcs": {"part_size": 5 * 1024 * 1024 + 1}}, r"gcs.part_size: must be a multiple of 256 KiB"),
    ({"s3": {"max_concurrency": 0}}, r"s3.max_concurrency: must be >= 1, got 0"),
    ({"gcs": {"max_retries": -1}}, r"gcs.max_retries: must be >= 0, got -1"),
    ({"s3": {"retry_base_delay": 1.0, "retry_max_delay": 0.5}}, r"s3.retry_max_delay: must be >= retry_base_delay"),
    ({"s3": {"addressing_style": "sideways"}}, r"s3.addressing_style: must be 'path', 'virtual' or 'auto'"),
    ({"gcs": {"timeout": 0}}, r"gcs.timeout: must be > 0 seconds"),
    ({"s3": {"storage_options": {}}}, r"unknown option 's3.storage_options'; valid options in \[s3\]: .*client_config"),
    ({"s3": 5}, r"section 's3' must be a mapping"),
    ({"checksum_block_size": "lots"}, r"checksum_block_size: expected a byte size"),
])
def test_bad_options_name_the_key(opts, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(environ={}, **opts)


def test_bad_env_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"environment: io_threads: expected an integer|io_threads: expected an integer"):
        load_config(environ={"DCP_EXT_IO_THREADS": "many"})
    with pytest.raises(ConfigError, match="environment: unknown option 'bogus'"):
        load_config(environ={"DCP_EXT_BOGUS": "1"})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml", environ={})
    bad = tmp_path / "bad.toml"
    bad.write_text("io_threads = = 3")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad, environ={})
    ini = tmp_path / "x.ini"
    ini.write_text("")
    with pytest.raises(ConfigError, match="must end in .toml, .yaml or .yml"):
        load_config(ini, environ={})
    with pytest.raises(ConfigError, match="expected a Config, dict or file path"):
        load_config(42, environ={})


def test_env_bool_and_size_parsing():
    c = load_config(environ={"DCP_EXT_CHECKSUM": "off", "DCP_EXT_S3_PART_SIZE": "32MiB",
                             "DCP_EXT_FSSPEC_STORAGE_OPTIONS": '{"anon": true}'})
    assert c.checksum is False and c.s3.part_size == 32 * 1024 * 1024
    assert c.fsspec.storage_options == {"anon": True}
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("64KiB") == 65536 and parse_size(7) == 7


def test_redacted_hides_secrets():
    c = load_config(environ={}, s3={"secret_access_key": "hunter2", "access_key_id": "AKIA"})
    r = c.redacted()
    assert r["s3"]["secret_access_key"] == "***" and "hunter2" not in repr(r)


# -- registry -------------------------------------------------------------------------------

def test_url_dispatch(tmp_path):
    c = load_config(environ={})
    assert get_backend(str(tmp_path), c).name == "fs"
    assert get_backend(f"file://{tmp_path}", c).name == "fs"
    assert get_backend("memory://x/y", c).name == "fsspec"
    assert get_backend("zip://x", c).name == "fsspec"  # any fsspec protocol


def test_unknown_scheme_lists_known():
    with pytest.raises(UnknownBackendError, match=r"no backend for URL scheme 'nosuch'.*known schemes: .*file.*memory"):
        dcp_ext.storage_writer("nosuch://bucket/x")


def test_unknown_backend_name():
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'nope'; known backends: .*fs"):
        dcp_ext.storage_writer("/tmp/x", backend="nope")


def test_missing_optional_dependency_names_the_extra():
    register_backend(Backend("fakecloud", ("fakecloud",), lambda u, c: None, lambda u, c: None,
                             extra="fakecloud", requires=("no_such_module_dcp_ext",)), replace=True)
    with pytest.raises(MissingDependencyError, match=r"pip install 'dcp-ext\[fakecloud\]'"):
        dcp_ext.storage_reader("fakecloud://b/p")


def test_third_party_backend(tmp_path):
    made = {}

    def mk(url, cfg):
        made["url"], made["threads"] = url, cfg.io_threads
        return "writer"

    register_backend(Backend("mine", ("mine",), mk, mk), replace=True)
    assert dcp_ext.storage_writer("mine://a/b", io_threads=3) == "writer"
    assert made == {"url": "mine://a/b", "threads": 3}
    assert "mine" in dcp_ext.backends()
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Backend("mine", ("mine2",), mk, mk))


def test_backend_forced_by_config(tmp_path):
    w = dcp_ext.storage_writer(str(tmp_path / "x"), backend="fsspec")
    assert type(w.store).__name__ == "FsspecStore"


def test_entry_point_backends_are_loaded_and_broken_ones_ignored(monkeypatch, caplog):
    """Third parties add backends through the ``dcp_ext.backends`` entry-point group."""
    import importlib.metadata

    import dcp_ext.storage as storage

    monkeypatch.setattr(storage, "_REGISTRY", dict(storage._REGISTRY))
    monkeypatch.setattr(storage, "_SCHEMES", dict(storage._SCHEMES))
    monkeypatch.setattr(storage, "_ENTRY_POINTS_LOADED", False)

    def mk(url, cfg):
        return ("made", url, cfg.io_threads)

    class EP:
        def __init__(self, name, obj):
            self.name, self._obj = name, obj

        def load(self):
            if isinstance(self._obj, Exception):
                raise self._obj
            return self._obj

    eps = [EP("plug", Backend("plug", ("plug",), mk, mk)),
           EP("factory", lambda: Backend("factory", ("fac",), mk, mk)),
           EP("broken", ImportError("No module named 'plug_dep'")),
           EP("wrong", 42)]
    seen_groups = []

    def entry_points(group=None):
        seen_groups.append(group)
        return eps

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with caplog.at_level("WARNING", logger="dcp_ext"):
        assert dcp_ext.storage_writer("plug://x/y", io_threads=2) == ("made", "plug://x/y", 2)
    assert seen_groups == ["dcp_ext.backends"]
    assert dcp_ext.storage_reader("fac://z") == ("made", "fac://z", 8)
    assert {"plug", "factory"} <= set(dcp_ext.backends()) and "broken" not in dcp_ext.backends()
    assert "ignoring dcp_ext backend entry point 'broken'" in caplog.text and "plug_dep" in caplog.text
    assert "entry point wrong gave int, not a Backend" in caplog.text


@pytest.mark.parametrize("url,extra,modules", [
    ("s3://bucket/ckpt", "s3", ("botocore",)),
    ("gs://bucket/ckpt", "gcs", ("google.auth",)),
])
def test_missing_real_optional_dependency_names_the_extra(monkeypatch, url, extra, modules):
    """Simulate a machine without the S3 / GCS packages (a None entry in sys.modules makes
    ``import`` fail): the error names the pip extra that installs them."""
    import sys

    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)
    for make in (dcp_ext.storage_writer, dcp_ext.storage_reader):
        with pytest.raises(MissingDependencyError, match=re.escape(f"pip install 'dcp-ext[{extra}]'")):
            make(url)


def test_missing_yaml_names_the_extra(tmp_path, monkeypatch):
    import sys

    y = tmp_path / "ck.yaml"
    y.write_text("io_threads: 2\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'dcp-ext[yaml]'")):
        load_config(y, environ={})


def test_docs_config_lists_every_option():
    """docs/config.md has a row for every Config field and every section field (and no others)."""
    import dataclasses
    import os

    from dcp_ext.config import _SECTIONS

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")
    text = open(path, encoding="utf-8").read()
    documented: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        m = re.match(r"^#+ .*`\[(\w+)\]`", line)
        if m:
            section = m.group(1)
        elif line.startswith("## Top level"):
            section = ""
        elif line.startswith("| `"):
            first_cell = line.split("|")[1]
            documented.setdefault(section, set()).update(re.findall(r"`(\w+)`", first_cell))
    expected = {"": {f.name for f in dataclasses.fields(Config) if f.name not in _SECTIONS}}
    for name in _SECTIONS:
        expected[name] = {f.name for f in dataclasses.fields(type(getattr(Config(), name)))}
    assert documented == expected
