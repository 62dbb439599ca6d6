#!/usr/bin/env python3
"""Fails when the bench crate's modules import each other in a circle.

Reads every `crate::NAME` path in bench/src/*.rs (in `use` lines and inline
paths alike; comments and doc comments are skipped), builds the graph
module -> module, and prints every strongly connected component of more than
one module. LAYOUT.md item 7: the bench's modules form a tree, no circle.

Usage: bench/check-imports.py [SRC_DIR]   (default: bench/src next to this file)
"""
import pathlib
import re
import sys

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "src")
modules = {p.stem: p for p in src.glob("*.rs")}
# `use crate::{a, b::c}` and `crate::a::...`: the names right after `crate::`.
group = re.compile(r"crate::\{([^}]*)\}")
single = re.compile(r"crate::([a-z_][a-z0-9_]*)")
graph = {m: set() for m in modules}
for name, path in modules.items():
    code = "\n".join(
        line.split("//", 1)[0] for line in path.read_text().splitlines()
    )
    # Braced groups may span lines: join the file before matching them.
    for g in group.findall(code):
        for item in g.split(","):
            head = item.strip().split("::", 1)[0].strip()
            if head in modules and head != name:
                graph[name].add(head)
    for head in single.findall(code):
        if head in modules and head != name:
            graph[name].add(head)

# Tarjan's strongly connected components.
index, low, stack, on_stack, sccs = {}, {}, [], set(), []
counter = [0]


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
        if w not in index:
            visit(w)
            low[v] = min(low[v], low[w])
        elif w in on_stack:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on_stack.discard(w)
            comp.append(w)
            if w == v:
                break
        sccs.append(sorted(comp))


for v in sorted(graph):
    if v not in index:
        visit(v)
circles = [c for c in sccs if len(c) > 1]
for c in circles:
    print("import circle:", " <-> ".join(c))
    for m in c:
        print(f"  {m} imports", ", ".join(sorted(graph[m] & set(c))))
if circles:
    sys.exit(1)
print(f"bench imports: {len(modules)} modules, no circle")
