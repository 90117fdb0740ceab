#!/usr/bin/env python3
"""L1 benchmark (docs/test-matrix.md L1): ten vdirsyncer clients, each with its own 200-card address book,
three sync rounds of two-way changes, against ``inverse-cloud serve`` and the seed laptop side, interleaved.

    .venv/bin/python bench/l1_bench.py            # 10 clients x 200 cards, 3 rounds (~4 min on 2 cores)
    .venv/bin/python bench/l1_bench.py --quick    # 3 clients x 20 cards, 1 round (~20 s): a smoke run

The workload is the one of integration/test_data_safety.py (``L1Workload``, imported, not copied):

  * prepare: each user gets an address book (ours predefines ``contacts``; on Radicale's own server the bench
    creates it with MKCOL), ``vdirsyncer discover`` for all, N new cards in each client's local folder;
  * "initial upload": all clients sync at once (each uploads its N cards);
  * rounds 1..R: each client edits/deletes/adds 5%/1.5%/2.5% of its cards locally and "another device" does
    the same to other cards on the server, then all clients sync at once;
  * "no-change sync": all clients sync at once once more, nothing changed.

After every step each server collection and each client folder are compared with the expected union of the
edits (FN and NOTE per UID); a mismatch makes the exit code 1. Timings are printed, never asserted.

The two servers are started exactly as bench/dav_bench.py starts them (its ``SeedSide``, ``OurSide`` and
``make_certificates``): (a) ours, no relay; (b) the seed side, Radicale's own server behind nginx, from
bench/seed-stack/infra/radicale.sh + nginx.sh. Same certificate (throwaway CA -> intermediate -> leaf for
laptop.test), the same htpasswd lines for the users on both sides (bcrypt cost 5, as ``htpasswd -B``).
Steps alternate which server goes first.

vdirsyncer resolves laptop.test itself: each client runs in a private mount namespace whose /etc/hosts maps
it to 127.0.0.1 (integration/dav_helpers.Vdirsyncer; needs root, as CI runs). The real /etc/hosts is untouched.

Per step and side it prints the p50 and p95 of the clients' sync durations (each vdirsyncer process from
start to exit, all started at the same moment), the ratio ours/seed, and the server's CPU seconds for the
step (ours: our process; seed: radicale + nginx master + workers), which other load disturbs far less than
wall time. The clients themselves (N vdirsyncer processes) need most of the CPU of a step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "integration"))
sys.path.insert(0, str(HERE))

import bcrypt  # noqa: E402
from dav_bench import HOST, OurSide, SeedSide, cpu_seconds, make_certificates, write_json  # noqa: E402
from dav_helpers import DOMAIN, access_statuses, require_root_tools  # noqa: E402
from test_data_safety import L1Workload, percentile  # noqa: E402

from inverse_cloud.fsutil import atomic_write  # noqa: E402

SIDES = ("ours", "seed")


def log(msg: str) -> None:
    print(f"[l1_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def htpasswd_text(users: list[tuple[str, str]], rounds: int) -> str:
    """One bcrypt line per user, as ``htpasswd -B -C ROUNDS`` writes them; both sides get these very lines."""
    return "".join(f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds)).decode()}\n" for name, pw in users)


def nginx_statuses(access_log: Path) -> list[int]:
    """HTTP statuses in nginx's access log (combined format)."""
    text = access_log.read_text(errors="replace") if access_log.exists() else ""
    return [int(m.group(1)) for m in re.finditer(r'^\S+ \S+ \S+ \[[^]]*\] "[^"]*" (\d{3}) ', text, re.M)]


def run_step(name: str, side: Any, workload: L1Workload, step: str, round_no: int, timeout_s: float) -> dict[str, Any]:
    """One step of the workload against one side: changes (for a round), the sync of every client at once,
    then the comparison. Returns durations, server CPU and mismatches."""
    if round_no:
        workload.change_both_sides(round_no)
    pids = [p for ps in side.pids().values() for p in ps]
    cpu0 = cpu_seconds(pids)
    durations = workload.sync_all(timeout_s)
    cpu = cpu_seconds([p for ps in side.pids().values() for p in ps]) - cpu0
    problems = workload.mismatches()
    log(f"  {name} {step}: p50 {percentile(durations, 50):.2f} s, p95 {percentile(durations, 95):.2f} s, "
        f"server CPU {cpu:.2f} s" + (f"  MISMATCH: {problems}" if problems else ""))
    return {"durations_s": durations, "p50_s": percentile(durations, 50), "p95_s": percentile(durations, 95),
            "server_cpu_s": cpu, "problems": problems}


def report(results: dict[str, dict[str, dict[str, Any]]], steps: list[str], args: argparse.Namespace,
           answers: dict[str, list[int]]) -> list[str]:
    lines = [f"l1_bench clients={args.clients} cards={args.cards} rounds={args.rounds} "
             f"({dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, bcrypt cost {args.bcrypt_rounds}, "
             f"seed {args.seed})", "",
             f"{'sync time of the clients (all at once)':40} {'ours p50':>9} {'seed p50':>9} {'ratio':>6}"
             f" {'ours p95':>9} {'seed p95':>9} {'ratio':>6}   server CPU ours/seed"]
    for step in steps:
        o, s = results["ours"][step], results["seed"][step]
        lines.append(f"{step:40} {o['p50_s']:8.2f}s {s['p50_s']:8.2f}s {o['p50_s'] / s['p50_s']:6.2f}"
                     f" {o['p95_s']:8.2f}s {s['p95_s']:8.2f}s {o['p95_s'] / s['p95_s']:6.2f}"
                     f"   {o['server_cpu_s']:.2f} s / {s['server_cpu_s']:.2f} s")
    lost = {name: sum(len(r["problems"]) for r in results[name].values()) for name in SIDES}
    lines += ["", f"mismatches (lost or stale cards): ours {lost['ours']}, seed {lost['seed']}; "
                  "5xx answers: " + ", ".join(f"{name} {sum(1 for s in answers[name] if s >= 500)} of {len(answers[name])}"
                                              for name in SIDES) + " (seed: nginx's access log)"]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10, help="vdirsyncer clients, one user each (default 10)")
    ap.add_argument("--cards", type=int, default=200, help="cards per address book (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of two-way changes (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 clients x 20 cards, 1 round: a smoke run")
    ap.add_argument("--bcrypt-rounds", type=int, default=5, help="bcrypt cost of the users (htpasswd -B: 5)")
    ap.add_argument("--seed", type=int, help="seed of the edit choices (default: random, printed)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per step and side (default 600)")
    ap.add_argument("--state", help="state directory (default: a fresh one under /tmp, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the state directory (logs, storage, clients)")
    ap.add_argument("--json-out", help="write all figures as JSON here (bench/results/ is git-ignored)")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.cards, args.rounds = 3, 20, 1
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    if shutil.which("nginx") is None:
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 2
    try:
        require_root_tools()
    except AssertionError as exc:
        print(exc, file=sys.stderr)
        return 2
    assert HOST == DOMAIN  # the bench certificate is for the name the vdirsyncer clients resolve

    state = Path(args.state) if args.state else Path(tempfile.mkdtemp(prefix="icbench-l1-"))
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)   # nginx workers (www-data) traverse it to their temp files
    cafile, chain, key = make_certificates(state / "cert")
    users = [(f"l1user{i}", f"l1-password-{i}") for i in range(args.clients)]
    steps = ["initial upload"] + [f"round {r}" for r in range(1, args.rounds + 1)] + ["no-change sync"]
    sides: dict[str, Any] = {}
    workloads: dict[str, L1Workload] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in SIDES}
    answers: dict[str, list[int]] = {name: [] for name in SIDES}  # HTTP statuses from each side's access log
    t_start = time.monotonic()
    try:
        seed = SeedSide(state / "seed", state / "cert", args.bcrypt_rounds)
        sides["seed"] = seed
        seed.start()
        # Radicale's own server reads its htpasswd file at every login (no cache): replacing the single bench
        # user written by radicale.sh with our users takes effect at once.
        atomic_write(state / "seed" / "radicale" / "users", htpasswd_text(users, args.bcrypt_rounds).encode(),
                     mode=0o644)
        ours = OurSide(state / "ours", chain, key, seed.htpasswd_line(), "", {})
        sides["ours"] = ours
        ours.start()
        ports = {"ours": ours.port, "seed": int(seed.env["NGINX_HTTPS_PORT"])}
        for name in SIDES:
            workloads[name] = L1Workload(state / f"clients-{name}", ports[name], cafile, users, cards=args.cards,
                                         seed=args.seed)
            log(f"{name}: prepare {args.clients} users x {args.cards} cards ({sides[name].base_url})")
            workloads[name].prepare(args.timeout)
        for k, step in enumerate(steps):
            order = SIDES if k % 2 == 0 else SIDES[::-1]
            round_no = k if 0 < k <= args.rounds else 0
            for name in order:
                results[name][step] = run_step(name, sides[name], workloads[name], step, round_no, args.timeout)
        answers["ours"] = access_statuses(ours.proc.log())
        answers["seed"] = nginx_statuses(state / "seed" / "nginx" / "access.log")
    finally:
        for w in workloads.values():
            w.close()
        for side in list(sides.values())[::-1]:
            side.stop()
    elapsed = time.monotonic() - t_start
    print("\n".join(report(results, steps, args, answers)))
    print(f"\n(total {elapsed:.0f} s; state {state}{'' if args.keep or args.state else ' removed'})")
    if args.json_out:
        write_json(args.json_out, args, results=results, elapsed_s=elapsed,
                   statuses={name: sorted(set(answers[name])) for name in SIDES})
    if not (args.keep or args.state):
        shutil.rmtree(state, ignore_errors=True)
    failed = (any(r["problems"] for name in SIDES for r in results[name].values())
              or any(s >= 500 for name in SIDES for s in answers[name]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
