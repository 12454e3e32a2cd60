"""Every error message dcp-ext raises, read from the source (for docs/troubleshooting.md's test)."""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "dcp_ext")


@dataclass(frozen=True)
class Raised:
    path: str
    line: int
    error: str
    #: the message's static text, placeholders as "…"
    text: str

    @property
    def key(self) -> str:
        """The longest run of static text: what the troubleshooting page must quote."""
        parts = [p.strip(" :;,.()'\"") for p in self.text.split("…")]
        return max(parts, key=len)


def _static(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        a, b = _static(node.left), _static(node.right)
        return (a if a is not None else "…") + (b if b is not None else "…")
    return None


def raised_messages() -> list[Raised]:
    out = []
    for dirpath, _dirs, files in os.walk(PKG):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            tree = ast.parse(open(path, encoding="utf-8").read())
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args):
                    continue
                fn = node.exc.func
                name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
                if not name.endswith(("Error", "Exception")):
                    continue
                text = _static(node.exc.args[0])
                if text is None or len(re.sub(r"\W", "", text.replace("…", ""))) < 8:
                    continue
                out.append(Raised(os.path.relpath(path, os.path.dirname(PKG)), node.lineno, name, text))
    return out


if __name__ == "__main__":
    for r in raised_messages():
        print(f"{r.path}:{r.line} {r.error}: {r.key!r}")
