#!/usr/bin/env python3
"""Summarise py-spy raw (collapsed) stacks: where a thread spends its samples.

    python bench/stacks.py OUT.txt [--thread radicale] [--top 40] [--under FUNC]

Prints, per thread name, the share of samples; then for the chosen threads the functions with the
most inclusive (anywhere on the stack) and self (top frame) samples. Idle samples (a thread waiting
in a lock, select or epoll) are counted, so "inclusive" shares add up to wall time of that thread.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--thread", default="", help="only threads whose name contains this")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--under", default="", help="only stacks that contain this function name")
    args = ap.parse_args()
    threads: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    with open(args.path) as f:
        for line in f:
            stack, _, count_s = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_s)
            frames = stack.split(";")
            thread = re.sub(r"\s*\(?0x[0-9a-f]+\)?", "", frames[0])
            threads[thread] += count
            if args.thread not in thread:
                continue
            funcs = [re.sub(r" \((.*/)?([^/]+):\d+\)$", r" (\2)", fr) for fr in frames[1:]]
            if args.under and not any(args.under in fn for fn in funcs):
                continue
            total += count
            for fn in set(funcs):
                incl[fn] += count
            if funcs:
                self_[funcs[-1]] += count
    print("samples per thread:")
    for name, c in threads.most_common():
        print(f"  {c:7d}  {name}")
    if not total:
        print("no samples matched")
        return 1
    print(f"\ninclusive ({total} samples matched):")
    for fn, c in incl.most_common(args.top):
        print(f"  {100 * c / total:5.1f}%  {fn}")
    print("\nself:")
    for fn, c in self_.most_common(args.top):
        print(f"  {100 * c / total:5.1f}%  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
