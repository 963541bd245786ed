#!/usr/bin/env python3
"""Checks the source layout that src/lib.rs describes, so that it stays true:

- the policy modules (`pub mod` in lib.rs, compiled in unit tests) use no FFI: no `ngx`,
  `nginx_sys` or `libc` path, no `extern "C"`, and none of the glue modules;
- the glue modules (`mod` under `#[cfg(not(test))]`) import each other without cycles (the
  crate root, which holds the module definition, is not counted);
- every module lib.rs declares is listed in its layout table.

Exits non-zero, naming what is wrong. Run by scripts/test.
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def code_of(path):
    """The file without comment lines (doc comments name other modules freely)."""
    return "\n".join(l for l in path.read_text().split("\n") if not l.strip().startswith("//"))


def main():
    lib = (SRC / "lib.rs").read_text()
    policy = re.findall(r"^pub mod ([a-z_]+);", lib, re.M)
    glue = re.findall(r"^#\[cfg\(not\(test\)\)\]\nmod ([a-z_]+);", lib, re.M)
    problems = []
    if not policy or not glue:
        problems.append("src/lib.rs: no `pub mod` (policy) or `#[cfg(not(test))] mod` (glue) lines found")

    def uses(module):
        code = code_of(SRC / f"{module}.rs")
        deps = set(re.findall(r"crate::([a-z_]+)", code))
        for group in re.findall(r"use crate::\{([^}]*)\}", code):
            deps |= {x.strip().split("::")[0] for x in group.split(",") if x.strip()}
        return code, deps - {module}

    for m in policy:
        code, deps = uses(m)
        for pattern, what in ((r"\bngx::", "ngx"), (r"\bnginx_sys::", "nginx_sys"), (r"\blibc::", "libc"), (r'extern\s+"C"', 'extern "C"')):
            if re.search(pattern, code):
                problems.append(f"src/{m}.rs is a policy module but uses {what}")
        for d in sorted(deps & set(glue)):
            problems.append(f"src/{m}.rs is a policy module but uses the glue module {d}")

    graph = {m: sorted(uses(m)[1] & set(glue)) for m in glue}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycle = path[path.index(d):] + [d]
                problems.append("glue import cycle: " + " -> ".join(cycle))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in glue:
        if m not in state:
            visit(m, [m])

    table = lib.split("pub mod", 1)[0]
    for m in policy + glue:
        if not re.search(rf"`{m}`|\[`{m}`\]|`{m}::|\[`{m}::", table):
            problems.append(f"src/lib.rs: module {m} is missing from the layout table")

    for p in problems:
        print("check_layout:", p, file=sys.stderr)
    if problems:
        return 1
    print(f"check_layout: {len(policy)} policy modules without FFI, {len(glue)} glue modules without import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
