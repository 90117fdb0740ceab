"""Summarise a mutmut run (mutants/*.meta in the current folder): killed/total per module and the diff of every
surviving mutant. Run by scripts/mutate.sh after ``mutmut run``; arguments restrict the report to those modules."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 37}            # a test failed (or the type checker refused the mutant)
SURVIVED = {0}
NO_TESTS = {33, 5}             # no selected test reaches the mutated function
NOT_RUN = {None, 34, 2}        # not checked yet (an interrupted run), skipped
TIMEOUT = {36, 24, -24, 152, 255}


def main(argv: list[str]) -> int:
    wanted = set(argv)
    mutmut = str(Path(sys.executable).parent / "mutmut")
    rows: list[tuple[str, Counter[str]]] = []
    survivors: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        module = meta.relative_to("mutants").as_posix().removesuffix(".meta")
        if wanted and module not in wanted:
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts: Counter[str] = Counter()
        for name, code in codes.items():
            if code in KILLED:
                counts["killed"] += 1
            elif code in TIMEOUT:
                counts["timeout"] += 1     # the mutant made a test hang: a kill, counted apart
            elif code in SURVIVED:
                counts["survived"] += 1
                survivors.append(name)
            elif code in NO_TESTS:
                counts["no tests"] += 1
            elif code in NOT_RUN:
                counts["not run"] += 1
            else:
                counts["suspicious"] += 1
        rows.append((module, counts))
    print(f"{'module':45} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'not run':>7} {'score':>6}")
    for module, c in rows:
        tested = sum(c.values()) - c["not run"]    # score over the mutants the run got to
        score = 100 * (c["killed"] + c["timeout"]) / tested if tested else 0.0
        print(f"{module:45} {c['killed']:7} {c['timeout']:7} {c['survived']:8} {c['no tests']:8} {c['not run']:7} "
              f"{score:5.1f}%")
    print(f"\n{len(survivors)} surviving mutant(s):")
    for name in survivors:
        diff = subprocess.run([mutmut, "show", name], capture_output=True, text=True).stdout
        lines = [line for line in diff.splitlines()
                 if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
        print(f"\n{name}")
        for line in lines:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
