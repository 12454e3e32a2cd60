"""The ``dcp-ext`` subcommands (argument parsing lives in :mod:`dcp_ext.cli`). Each returns an
exit code and prints text, or one JSON document with ``--json``."""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

from .errors import CheckpointKeyError, CheckpointNotFoundError, DcpExtError
from .progress import _fmt_bytes

__all__ = ["cmd_ls", "cmd_inspect", "cmd_verify", "cmd_convert", "cmd_diff", "cmd_gc", "cmd_rm"]


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _json(doc: Any) -> None:
    _out(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _when(t: float | None) -> str:
    return "-" if t is None else datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(m: dict | None) -> str:
    if not m:
        return ""
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(m.items()))


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        _out("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _root(url: str):
    from .manager import CheckpointRoot

    root = CheckpointRoot(url)
    if not root.store.exists(""):
        raise CheckpointNotFoundError(f"{url}: no such checkpoint root (nothing is there)")
    return root


# -- ls -------------------------------------------------------------------------------------

def cmd_ls(args) -> int:
    from .storage.commit import METADATA_NAME

    root = _root(args.root)
    entries = root.scan()
    latest = root.read_latest()
    rows, docs = [], []
    for e in entries:
        size = root.checkpoint_bytes(e.name) if e.committed else None
        if not size:  # no manifest, or one that does not list byte ranges (zarr3)
            size = root.files_bytes(e.name)
        tier = _tier(e.url, args.cache) if args.cache else None
        info = e.info
        doc = {"step": e.step, "dir": e.name, "url": e.url, "state": "complete" if e.committed else "incomplete",
               "latest": e.name == latest, "bytes": size, "managed": e.owned,
               "created": info.created if info else None, "committed": info.committed if info else None,
               "metrics": info.metrics if info else None, "metadata": info.metadata if info else None,
               "world_size": info.world_size if info else None, "layout": info.layout if info else None,
               "fast_tier": info.tier if info else None}
        if tier is not None:
            doc["tier"] = tier
        docs.append(doc)
        note = "" if e.owned else "(not written by a CheckpointManager)"
        if not e.committed:
            note = "(a save did not finish here, or is running)" + (" " + note if note else "")
        rows.append([str(e.step) + (" *" if doc["latest"] else ""), doc["state"], _fmt_bytes(size),
                     _when(doc["committed"]), *([tier] if tier is not None else []),
                     (_metrics(doc["metrics"]) + " " + note).strip()])
    if args.json:
        _json({"root": root.url, "latest": latest, "steps": docs})
        return 0
    if not entries:
        if root.store.exists(METADATA_NAME):
            _out(f"{root.url} is a checkpoint, not a root of step directories: try dcp-ext inspect {args.root}")
        else:
            _out(f"{root.url}: no step directories ({root.prefix}<N>)")
        return 0
    _table(rows, ["STEP", "STATE", "SIZE", "COMMITTED", *(["TIER"] if args.cache else []), "METRICS / NOTES"])
    if latest is not None and latest not in {e.name for e in entries}:
        _out(f"warning: 'latest' names {latest}, which is not there")
    return 0


def _tier(url: str, cache: str) -> str:
    from .tiered import tier_status

    try:
        st = tier_status(url, cache=cache)
    except DcpExtError as e:
        return f"? ({e})"
    fast = "fast" if st.fast_complete else "-"
    durable = str(st.durable_state)
    return f"{fast}/{'durable' if durable == 'complete' else durable}"


# -- inspect / verify -------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from .verify import inspect_checkpoint

    info = inspect_checkpoint(args.ckpt, args.fqns or None)
    if args.json:
        _json(info)
        return 0
    _out(f"{info['url']}: {len(info['tensors'])} tensors, {len(info['objects'])} objects, "
         f"{info['bytes'] / 2**20:.1f} MiB in {len(info['files'])} files; saved by "
         f"{info['world_size'] or '?'} ranks; checksums: "
         f"{info.get('checksum_algorithm') or ('yes' if info['checksummed'] else 'no')}")
    if info.get("saved_layout"):
        _out(f"saved layout: {info['saved_layout']}")
    if info.get("layout"):
        _out(f"storage layout: {info['layout']}")
    if args.fqns:
        for fqn, d in info["details"].items():
            if d.get("object"):
                _out(f"{fqn}: object" + (f", {_fmt_bytes(d['bytes'])} stored" if "bytes" in d else ""))
            else:
                _out(f"{fqn}: {d['dtype']} {d['size']}, {d['chunks']} chunk(s)"
                     + (f", {_fmt_bytes(d['bytes'])} stored" if "bytes" in d else ""))
            for c in d["stored"]:
                where = f"{c['file']} @ {c['offset']}"
                _out(f"  offsets {c['offsets']} sizes {c['sizes']}: {_fmt_bytes(c['bytes'])} in {where}"
                     + ("" if c["checksummed"] else " (no checksums)"))
        return 0
    for fqn, t in info["tensors"].items():
        _out(f"  {fqn:50s} {t['dtype']:9s} {str(t['size']):22s} {t['chunks']} chunk(s)"
             + (f" {_fmt_bytes(t['bytes'])}" if "bytes" in t else ""))
    for fqn in info["objects"]:
        _out(f"  {fqn:50s} (object)")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify_checkpoint

    rep = verify_checkpoint(args.ckpt, progress=None)
    if args.json:
        _json({"url": rep.url, "ok": rep.ok, "items": rep.items, "bytes_checked": rep.bytes_checked,
               "unchecked_items": rep.unchecked_items, "errors": rep.errors})
        return 0 if rep.ok else 1
    for e in rep.errors:
        print(f"ERROR: {e}", file=sys.stderr)
    status = "OK" if rep.ok else "CORRUPT"
    _out(f"{status}: {rep.url}: {rep.items} items, {rep.bytes_checked / 2**20:.1f} MiB checked"
         + (f", {rep.unchecked_items} items without checksums" if rep.unchecked_items else ""))
    return 0 if rep.ok else 1


# -- convert / diff ---------------------------------------------------------------------------

def cmd_convert(args) -> int:
    from .convert import export_checkpoint, import_checkpoint

    common = dict(dtype=args.dtype, keys=args.keys, strip_prefix=args.strip_prefix, add_prefix=args.add_prefix,
                  buffer=args.buffer)
    if args.from_fmt:
        rep = import_checkpoint(args.src, args.out, fmt=args.from_fmt, overwrite=args.overwrite, **common)
    else:
        rep = export_checkpoint(args.src, args.out, to=args.to or "safetensors", max_shard_size=args.max_shard_size,
                                overwrite=args.overwrite, **common)
    if args.json:
        _json(rep.as_dict())
        return 0
    verb = "imported" if args.from_fmt else "exported"
    _out(f"{verb} {rep.source} -> {rep.output}: {rep.tensors} tensors"
         + (f", {rep.objects} objects" if rep.objects else "") + f", {_fmt_bytes(rep.bytes)} in {rep.seconds:.2f}s")
    for f in rep.files:
        _out(f"  {f}")
    if rep.skipped:
        _out(f"left out {len(rep.skipped)} key(s):")
        for k, why in list(rep.skipped.items())[:20]:
            _out(f"  {k}: {why}")
        if len(rep.skipped) > 20:
            _out(f"  ... and {len(rep.skipped) - 20} more (--json lists all)")
    return 0


def cmd_diff(args) -> int:
    from .convert import diff_checkpoints

    rep = diff_checkpoints(args.a, args.b, atol=args.atol, keys=args.keys)
    if args.json:
        _json(rep.as_dict())
        return 0 if rep.identical else 1
    diffs = rep.differences
    if not diffs:
        _out(f"identical: {len(rep.items)} keys" + (f" (within atol {args.atol})" if args.atol else ""))
        return 0
    rows = []
    for d in diffs:
        if d.status in ("values", "dtype") and d.numel:
            how = f"{d.count} of {d.numel} elements differ, max abs {d.max_abs:.6g}" if d.count else "equal values"
            how += f" ({d.detail})" if d.detail else ""
        else:
            how = {"only_a": "only in A", "only_b": "only in B", "bytes": "stored bytes differ"}.get(d.status, d.detail)
        rows.append([d.key, d.status, how])
    _table(rows, ["KEY", "STATUS", "DIFFERENCE"])
    _out(f"{len(diffs)} of {len(rep.items)} keys differ")
    return 1


# -- gc / rm ----------------------------------------------------------------------------------

def _delete_report(root, victims, yes: bool, as_json: bool, why: dict[str, str]) -> int:
    if as_json:
        _json({"root": root.url, "deleted" if yes else "would_delete": [
            {"step": e.step, "dir": e.name, "why": why[e.name]} for e in victims]})
    for e in victims:
        if yes:
            root.delete(e.name)
        if not as_json:
            _out(f"{'deleted' if yes else 'would delete'} {e.url} ({why[e.name]})")
    if not as_json:
        if not victims:
            _out("nothing to delete")
        elif not yes:
            _out("dry run: pass --yes to delete")
    return 0


def cmd_gc(args) -> int:
    from .manager.gc import leftover_victims, retention_victims
    from .manager.retention import RetentionPolicy

    if args.keep_best is not None and not args.metric:
        raise DcpExtError("--keep-best needs --metric NAME (the metrics key that ranks steps)")
    for name in ("keep_last", "keep_every", "keep_best"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise DcpExtError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    policy = RetentionPolicy(args.keep_last, args.keep_every, args.keep_best, args.metric, args.mode)
    if not policy.active and not args.incomplete:
        raise DcpExtError("say what to keep: --keep-last N, --keep-every K and/or --keep-best N --metric M "
                          "(or --incomplete to remove only leftovers of dead saves)")
    root = _root(args.root)
    entries = root.scan()
    victims = retention_victims(root, entries, policy) if policy.active else []
    why = {e.name: "retention" for e in victims}
    if args.incomplete:
        left = leftover_victims(entries, grace_s=args.grace)
        victims += left
        why.update({e.name: "incomplete: a save that did not finish" for e in left})
    return _delete_report(root, sorted(victims, key=lambda e: e.step), args.yes, args.json, why)


def cmd_rm(args) -> int:
    root = _root(args.root)
    entries = {e.name: e for e in root.scan(with_info=False)}
    newest = max((e.step for e in entries.values() if e.committed), default=None)
    victims = []
    for s in args.steps:
        name = root.step_name(int(s)) if s.isdigit() else s
        if name not in entries:
            raise CheckpointKeyError(f"{root.url} has no step {s!r}; steps: "
                                     f"{', '.join(str(e.step) for e in entries.values()) or 'none'}")
        e = entries[name]
        if e.committed and e.step == newest and not args.allow_newest:
            raise DcpExtError(f"step {e.step} is the newest complete checkpoint under {root.url}; pass "
                              f"--allow-newest to delete it")
        victims.append(e)
    return _delete_report(root, victims, args.yes, args.json, {e.name: "asked for" for e in victims})
