"""The public surface: every name in ``dcp_ext.__all__`` exists, has a docstring, and is listed in
docs/api.md (and the page lists nothing else)."""

from __future__ import annotations

import inspect
import os
import re

import dcp_ext

API_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "api.md")


def test_all_names_exist_once_and_have_docstrings():
    assert len(dcp_ext.__all__) == len(set(dcp_ext.__all__)), "duplicate names in dcp_ext.__all__"
    undocumented = [n for n in dcp_ext.__all__ if not (inspect.getdoc(getattr(dcp_ext, n)) or "").strip()]
    assert undocumented == []


def test_api_page_lists_exactly_the_public_names():
    text = open(API_MD, encoding="utf-8").read()
    listed = re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", text, flags=re.M)
    assert sorted(set(listed)) == sorted(set(dcp_ext.__all__)), (
        f"docs/api.md is out of date: missing {sorted(set(dcp_ext.__all__) - set(listed))}, "
        f"stale {sorted(set(listed) - set(dcp_ext.__all__))}")


def test_public_functions_have_type_hints():
    missing = []
    for n in dcp_ext.__all__:
        obj = getattr(dcp_ext, n)
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            if sig.return_annotation is inspect.Signature.empty:
                missing.append(n)
    assert missing == [], f"public functions without a return annotation: {missing}"
