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


def test_part_size_minimums_are_each_stores_own():
    """S3 refuses parts under 5 MiB (its multipart minimum); GCS resumable chunks only need to be
    multiples of 256 KiB, so a small GCS chunk is valid."""
    assert load_config(environ={}, gcs={"part_size": "256KiB"}).gcs.part_size == 256 * 1024
    with pytest.raises(ConfigError, match=r"s3.part_size: must be >= 5MiB \(S3 minimum\)"):
        load_config(environ={}, s3={"part_size": "256KiB"})


@pytest.mark.parametrize("opts,msg", [
    ({"io_thread": 4}, r"unknown option 'io_thread'; valid options: .*io_threads"),
    ({"s3": {"partsize": 1}}, r"unknown option 's3.partsize'; valid options in \[s3\]: .*part_size"),
    ({"io_threads": "four"}, r"io_threads: expected an integer, got 'four'"),
    ({"checksum": "yes"}, r"checksum: expected true/false"),
    ({"io_threads": 0}, r"io_threads: must be >= 1"),
    ({"checksum_block_size": "1KiB"}, r"checksum_block_size: must be >= 4096"),
    ({"checksum_algorithm": "xxh3"}, r"checksum_algorithm: must be one of 'crc32c', 'xxh3_64', got 'xxh3'$"),
    ({"checksum_algorithm": None}, r"checksum_algorithm: expected a string, got None"),
    ({"s3": {"part_size": "1MiB"}}, r"part_size: must be >= 5MiB"),
    ({"gcs": {"part_size": 5 * 1024 * 1024 + 1}}, r"gcs.part_size: must be a multiple of 256 KiB"),
    ({"gcs": {"part_size": 0}}, r"gcs.part_size: must be a multiple of 256 KiB"),
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


# -- backend-owned sections -----------------------------------------------------------------

import dataclasses  # noqa: E402
import pickle  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

from dcp_ext.config import ByteSize, Options, section_types  # noqa: E402


@dataclass
class VaultOptions(Options):
    """Options of a third-party backend used by the tests below."""

    endpoint: str | None = None
    chunk: ByteSize = ByteSize(4 * 1024 * 1024)
    streams: int = 2
    compress: bool = False
    timeout: float = 30.0
    extra: dict = field(default_factory=dict)
    api_key: str | None = field(default=None, repr=False)

    def validate(self, section: str) -> None:
        if self.streams < 1:
            raise ConfigError(f"{section}.streams: must be >= 1, got {self.streams}")


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the backend registry: what a test registers does not leak."""
    import dcp_ext.storage as storage

    monkeypatch.setattr(storage, "_REGISTRY", dict(storage._REGISTRY))
    monkeypatch.setattr(storage, "_SCHEMES", dict(storage._SCHEMES))
    return storage


@pytest.fixture
def vault(registry):
    """Register the ``vault`` backend; its writer/reader factories return (url, its section)."""
    def mk(url, cfg):
        return url, cfg.vault

    registry.register_backend(Backend("vault", ("vault",), mk, mk, options=VaultOptions))
    return mk


def test_third_party_section_from_file_env_and_kwargs(vault, tmp_path):
    f = tmp_path / "ck.toml"
    f.write_text('io_threads = 2\n[vault]\nendpoint = "https://vault.example"\nchunk = "8MiB"\nstreams = 3\n'
                 'extra = {retries = 5}\n')
    c = load_config(f, environ={})
    assert c.vault == VaultOptions(endpoint="https://vault.example", chunk=8 * 1024 * 1024, streams=3,
                                   extra={"retries": 5})
    env = {"DCP_EXT_VAULT_STREAMS": "4", "DCP_EXT_VAULT_COMPRESS": "on", "DCP_EXT_VAULT_TIMEOUT": "2.5",
           "DCP_EXT_VAULT_EXTRA": '{"retries": 1}', "DCP_EXT_VAULT_API_KEY": "k-123"}
    c = load_config(f, environ=env)
    assert (c.vault.streams, c.vault.compress, c.vault.timeout, c.vault.extra) == (4, True, 2.5, {"retries": 1})
    assert c.vault.endpoint == "https://vault.example" and c.io_threads == 2  # the file still applies
    c = load_config(f, environ=env, vault={"streams": 5, "chunk": 1 << 20})
    assert c.vault.streams == 5 and c.vault.chunk == 1 << 20 and c.vault.compress is True
    # storage_writer / storage_reader hand the backend its resolved section
    url, sec = dcp_ext.storage_writer("vault://b/run", config=f, vault={"streams": 6})
    assert url == "vault://b/run" and sec.streams == 6 and sec.endpoint == "https://vault.example"
    url, sec = dcp_ext.storage_reader("vault://b/run")
    assert sec == VaultOptions()
    # secrets: hidden from repr and redacted() like the built-ins' credentials
    assert "k-123" not in repr(c) and c.redacted()["vault"]["api_key"] == "***"
    assert c.redacted()["vault"]["streams"] == 5


@pytest.mark.parametrize("opts,msg", [
    ({"vault": {"stream": 1}},
     r"options: unknown option 'vault.stream'; valid options in \[vault\]: api_key, chunk, compress, endpoint, "
     r"extra, streams, timeout$"),
    ({"vault": {"streams": "two"}}, r"vault.streams: expected an integer, got 'two'"),
    ({"vault": {"chunk": "lots"}}, r"vault.chunk: expected a byte size"),
    ({"vault": {"compress": "yes"}}, r"vault.compress: expected true/false, got 'yes'"),
    ({"vault": {"endpoint": 5}}, r"vault.endpoint: expected a string, got 5"),
    ({"vault": {"extra": [1]}}, r"vault.extra: expected a mapping"),
    ({"vault": {"streams": 0}}, r"vault.streams: must be >= 1, got 0"),
    ({"vault": 3}, r"section 'vault' must be a mapping, got 3"),
    ({"vaults": {}}, r"unknown option 'vaults'; valid options: .*vault\.\*"),
])
def test_third_party_section_errors_name_the_key(vault, opts, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(environ={}, **opts)


def test_third_party_section_errors_from_env_and_file(vault, tmp_path):
    with pytest.raises(ConfigError, match=r"environment: unknown option 'vault.stream'; valid options in \[vault\]"):
        load_config(environ={"DCP_EXT_VAULT_STREAM": "1"})
    with pytest.raises(ConfigError, match=r"vault.timeout: expected a number, got 'soon'"):
        load_config(environ={"DCP_EXT_VAULT_TIMEOUT": "soon"})
    f = tmp_path / "ck.yaml"
    f.write_text("vault:\n  streams: 0\n")
    with pytest.raises(ConfigError, match=r"vault.streams: must be >= 1, got 0"):
        load_config(f, environ={})


def test_section_exists_only_while_its_backend_is_registered(registry):
    with pytest.raises(ConfigError, match=r"unknown option 'vault'"):
        load_config(environ={}, vault={"streams": 2})
    with pytest.raises(AttributeError, match="no attribute 'vault'"):
        Config().vault  # noqa: B018
    registry.register_backend(Backend("vault", ("vault",), print, print, options=VaultOptions))
    assert load_config(environ={}, vault={"streams": 2}).vault.streams == 2
    assert section_types()["vault"] is VaultOptions


def test_entry_point_backend_gets_its_section(registry, monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)

    class EP:
        name = "vault"

        def load(self):
            return Backend("vault", ("vault",), lambda u, c: c.vault, lambda u, c: c.vault, options=VaultOptions)

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [EP()])
    # the first config built loads the plugins: their sections are known at once
    c = load_config(environ={"DCP_EXT_VAULT_ENDPOINT": "http://127.0.0.1:1"})
    assert c.vault.endpoint == "http://127.0.0.1:1"
    assert dcp_ext.storage_writer("vault://x", vault={"streams": 7}).streams == 7


@pytest.mark.parametrize("name,options,exc,msg", [
    ("My-Vault", VaultOptions, ValueError, r"name must be lowercase letters, digits and '_'"),
    ("io_threads", VaultOptions, ValueError, r"'io_threads' is already a top-level option"),
    ("tier", VaultOptions, ValueError, r"'tier' is already a top-level option"),
    ("cache", VaultOptions, ValueError, r"'cache' is already a top-level option or keyword"),
    ("config", VaultOptions, ValueError, r"'config' is already a top-level option or keyword"),
    ("checksum", VaultOptions, ValueError, r"'checksum' is already a top-level option"),
    ("io", VaultOptions, ValueError, r"DCP_EXT_IO_\* variables would be ambiguous with DCP_EXT_IO_THREADS"),
    ("vault", {"streams": 1}, TypeError, r"options must be a dataclass type"),
    ("vault", VaultOptions(), TypeError, r"options must be a dataclass type"),
])
def test_register_backend_checks_its_options(registry, name, options, exc, msg):
    with pytest.raises(exc, match=msg):
        registry.register_backend(Backend(name, (name.lower(),), print, print, options=options))
    assert name not in registry._REGISTRY


def test_register_backend_checks_option_fields(registry):
    @dataclass
    class NoDefault:
        endpoint: str

    @dataclass
    class ListField:
        hosts: list = field(default_factory=list)

    with pytest.raises(TypeError, match=r"option vault.endpoint needs a default"):
        registry.register_backend(Backend("vault", ("vault",), print, print, options=NoDefault))
    with pytest.raises(TypeError, match=r"option vault.hosts has type <class 'list'>; supported: str, int"):
        registry.register_backend(Backend("vault", ("vault",), print, print, options=ListField))


def test_builtin_sections_are_declared_by_their_backends():
    from dcp_ext.storage import backends
    from dcp_ext.storage.fs import FsOptions
    from dcp_ext.storage.fsspec import FsspecOptions
    from dcp_ext.storage.gcs import GCSOptions
    from dcp_ext.storage.s3 import S3Options

    from dcp_ext.config import TensorStoreOptions

    declared = {n: b.options for n, b in backends().items() if n in ("fs", "fsspec", "s3", "gcs", "tensorstore")}
    assert declared == {"fs": FsOptions, "fsspec": FsspecOptions, "s3": S3Options, "gcs": GCSOptions,
                        "tensorstore": TensorStoreOptions}
    # still importable from dcp_ext.config, as before
    import dcp_ext.config as config

    assert (config.FsOptions, config.FsspecOptions, config.S3Options, config.GCSOptions) == (
        FsOptions, FsspecOptions, S3Options, GCSOptions)
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchOptions'"):
        config.NoSuchOptions  # noqa: B018
    c = Config()
    assert type(c.s3) is S3Options and type(c.tensorstore).__name__ == "TensorStoreOptions"
    for name, section in Config().sections.items():  # every default validates
        section.validate(name)


def test_importing_config_does_not_import_clients():
    import subprocess
    import sys

    code = ("import sys, dcp_ext.config as c; c.load_config(environ={}, s3={'region': 'x'}); "
            "print(sorted(m for m in ('botocore', 'google.auth', 'urllib3', 'gcsfs', 's3fs', 'tensorstore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sections_survive_replace_copy_pickle_and_compare():
    c = load_config(environ={}, s3={"region": "eu-1", "secret_access_key": "s"}, fs={"fsync": False})
    r = dataclasses.replace(c, io_threads=3)
    assert r.io_threads == 3 and r.s3.region == "eu-1" and r.fs.fsync is False
    r.s3.region = "other"  # the copy's sections are its own
    assert c.s3.region == "eu-1" and r != c
    assert dataclasses.replace(c) == c and c != Config() and Config() == Config()
    p = pickle.loads(pickle.dumps(c))
    assert p == c and p.s3.secret_access_key == "s" and p.fs.fsync is False
    base = Config(sections={"s3": c.s3})
    assert base.s3 is c.s3 and load_config(base, environ={}).s3.region == "eu-1"


def test_setting_sections_and_unknown_attributes():
    c = Config()
    with pytest.raises(ConfigError, match=r"section 's3' must be an instance of S3Options, got dict"):
        c.s3 = {"region": "x"}
    with pytest.raises(AttributeError, match=r"Config has no option or section 'io_thread'; options: .*io_threads"):
        c.io_thread = 4
    with pytest.raises(ConfigError, match=r"sections: 'tier' is not a backend section"):
        Config(sections={"tier": c.tier})
    with pytest.raises(AttributeError, match=r"no option or section 'nosuch'"):
        Config(sections={"nosuch": c.tier})
