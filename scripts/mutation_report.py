"""Summarise a mutmut run (mutants/*.meta in the current folder): killed/total per module and the diff of every
surviving mutant. Run by scripts/mutate.sh after ``mutmut run``; arguments restrict the report to those modules.

``--previous REPORT``: this run re-checked only the survivors of REPORT (``RECHECK=REPORT scripts/mutate.sh``).
The module must be byte-identical to the one REPORT mutated (its sha256 line): then a mutant killed there is
still killed (tests were only added), and the score is REPORT's kills plus the survivors killed now. The
mutants an interrupted run did not reach are listed too, and a re-check runs them with the survivors.

Run it by hand in an interrupted run's scratch folder (or any folder holding ``mutants/MODULE.meta`` and the
module's source) to report what that run got to."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

KILLED = {1, 3, 37}            # a test failed (or the type checker refused the mutant)
SURVIVED = {0}
NO_TESTS = {33, 5}             # no selected test reaches the mutated function
NOT_RUN = {None, 34, 2}        # not checked yet (an interrupted run), skipped
TIMEOUT = {36, 24, -24, 152, 255}


def previous_counts(report: Path, module: str) -> tuple[Counter[str], str]:
    """REPORT's counts for ``module`` and the sha256 of the source it mutated."""
    text = report.read_text()
    digest = re.search(rf"^sha256 {re.escape(module)} ([0-9a-f]{{64}})$", text, re.M)
    row = re.search(rf"^{re.escape(module)}\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text, re.M)
    if digest is None or row is None:
        raise SystemExit(f"{report}: no sha256 line or no score row for {module}")
    names = ("killed", "timeout", "survived", "no tests", "not run")
    return Counter(dict(zip(names, map(int, row.groups()), strict=True))), digest.group(1)


def main(argv: list[str]) -> int:
    previous: Path | None = None
    if argv[:1] == ["--previous"]:
        previous, argv = Path(argv[1]), argv[2:]
    wanted = set(argv)
    mutmut = str(Path(sys.executable).parent / "mutmut")
    rows: list[tuple[str, Counter[str]]] = []
    survivors: list[str] = []
    not_run: list[str] = []     # an interrupted run's rest: RECHECK runs these too
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
                survivors.append(name)     # listed too: no test reaches it, so it survives
            elif code in NOT_RUN:
                counts["not run"] += 1
            else:
                counts["suspicious"] += 1
        if previous is not None:
            before, digest = previous_counts(previous, module)
            if digest != hashlib.sha256(Path(module).read_bytes()).hexdigest():
                raise SystemExit(f"{module} changed since {previous}: run the whole module again")
            rechecked = counts["killed"] + counts["timeout"] + counts["survived"] + counts["no tests"]
            survived_before = before["survived"] + before["no tests"]
            if not survived_before <= rechecked <= survived_before + before["not run"]:
                raise SystemExit(f"{rechecked} mutants re-checked, {previous} had {survived_before} survivors "
                                 f"and {before['not run']} not run")
            counts = Counter({"killed": before["killed"] + counts["killed"],
                              "timeout": before["timeout"] + counts["timeout"],
                              "survived": counts["survived"], "no tests": counts["no tests"],
                              "not run": survived_before + before["not run"] - rechecked})
        rows.append((module, counts))
        not_run.extend(name for name, code in codes.items() if code in NOT_RUN and previous is None)
    print(f"{'module':45} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'not run':>7} {'score':>6}")
    for module, c in rows:
        tested = sum(c.values()) - c["not run"]    # score over the mutants the run got to
        score = 100 * (c["killed"] + c["timeout"]) / tested if tested else 0.0
        print(f"{module:45} {c['killed']:7} {c['timeout']:7} {c['survived']:8} {c['no tests']:8} {c['not run']:7} "
              f"{score:5.1f}%" + ("  (re-check of the survivors of an earlier run)" if previous else ""))
    for module, _c in rows:
        print(f"sha256 {module} {hashlib.sha256(Path(module).read_bytes()).hexdigest()}")
    print(f"\n{len(survivors)} surviving mutant(s) (survived, or reached by no test):")
    for name in survivors:
        diff = subprocess.run([mutmut, "show", name], capture_output=True, text=True).stdout
        lines = [line for line in diff.splitlines()
                 if line.startswith(("-", "+")) and not line.startswith(("---", "+++"))]
        print(f"\n{name}")
        for line in lines:
            print(f"    {line}")
    if not_run:
        print(f"\n{len(not_run)} mutant(s) not run yet (the run was interrupted; RECHECK runs them too):")
        for name in not_run:
            print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
