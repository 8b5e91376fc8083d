#!/usr/bin/env python3
"""Keep medfs's imports pointing down.

Each module of the package sits in a layer; it may import only from lower layers. Two
third-party libraries are fenced in: ipfshttpclient (only the IPFS adapter) and pyfuse3 (only the
filesystem and the mount lifecycle). A module missing from LAYERS is an error, so that every new
module gets a deliberate place.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LAYERS: list[set[str]] = [
    {"errors", "paths", "durable", "forked", "copies"},
    {"layout", "ipfs", "manifest", "control"},
    {"format", "kubo"},
    {"recipients", "content"},
    {"identity"},
    {"audit", "envelope"},
    {"state", "fs", "sharing"},
    {"backup"},
    {"access", "verify", "package"},
    {"mount"},
    {"cli"},
]
FENCED = {"ipfshttpclient": {"ipfs"}, "pyfuse3": {"fs", "mount"}}
ROOT = Path(__file__).resolve().parent.parent / "medfs"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0] if rel.parts[0] not in ("__init__", "__main__") else ""


def imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def main() -> int:
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    problems: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        if not me:
            continue
        if me not in rank:
            problems.append(f"{path}: module '{me}' has no layer in scripts/check_layers.py")
            continue
        for name in imported(ast.parse(path.read_text(), str(path))):
            top, _, rest = name.partition(".")
            if top in FENCED and me not in FENCED[top]:
                problems.append(f"{path}: imports {top}, which only {sorted(FENCED[top])} may")
            if top == "medfs" and rest:
                dep = rest.split(".")[0]
                if dep in rank and dep != me and rank[dep] >= rank[me]:
                    problems.append(f"{path}: '{me}' imports '{dep}', which is not below it")
    for problem in problems:
        print(f"check_layers: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
