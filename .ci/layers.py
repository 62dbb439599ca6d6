#!/usr/bin/env python3
"""Checks that fanmq's modules import only layers below them.

The crate is a stack of floors (docs/ARCHITECTURE.md, "Layers"): a module may
name `crate::X` only for an X on a lower floor, or its own. That rules out
import circles, and the arrows the layout forbids (protocol/ importing
anything, observe/ importing session/ or shard/, ...). Test code is held to
the same rule, so fixtures live with the layer they build.

Reads every `crate::` path in src/ (comments and doc comments skipped), and
exits 1 listing each arrow that points up or sideways to an unknown module.
"""

import pathlib
import re
import sys

# Top floor first. A module imports only modules after it in this list.
# `store` and `cluster` are reserved for persistence and the NATS link:
# store/ is used by shard/ and session/ and imports protocol/ and config/;
# cluster/ is used by shard/ and never by session/, router/ or protocol/.
FLOORS = [
    "main",
    "cli",
    "fuzzing",
    "broker",
    "listener",
    "admin",
    "connection",
    "shard",
    "cluster",
    "mesh",
    "session",
    "store",
    "observe",
    "router",
    "net",
    "security",
    "protocol",
    "config",
    "test_rng",
]

CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def module_of(path: pathlib.Path, src: pathlib.Path) -> str:
    """The top-level module a file belongs to: its first component under src/."""
    first = path.relative_to(src).parts[0]
    return first[:-3] if first.endswith(".rs") else first


def main() -> int:
    src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
    rank = {name: i for i, name in enumerate(FLOORS)}
    bad = []
    for path in sorted(src.rglob("*.rs")):
        if path.name == "lib.rs" and path.parent == src:
            continue
        here = module_of(path, src)
        if here not in rank:
            bad.append(f"{path}: module `{here}` has no floor in .ci/layers.py")
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            for target in CRATE_PATH.findall(code):
                if target == here:
                    continue
                if target not in rank:
                    bad.append(f"{path}:{number}: `crate::{target}` has no floor")
                elif rank[target] <= rank[here]:
                    bad.append(
                        f"{path}:{number}: {here} imports {target}, a floor above it"
                    )
    for line in bad:
        print(line)
    if bad:
        print(f"{len(bad)} arrow(s) point up the layers (see FLOORS in .ci/layers.py)")
        return 1
    print(f"layers: every crate:: path in {src} points down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
