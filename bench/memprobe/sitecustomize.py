"""Loaded by ``inverse-cloud serve`` only when bench/memory_bench.py puts this folder first on PYTHONPATH for its
analysis run (never in a product start). With INVERSE_CLOUD_MEMPROBE=FIFO set, a daemon thread waits on that
named pipe; each line written to it names a file, and the thread writes a tracemalloc snapshot there (the
process must run with PYTHONTRACEMALLOC), then a ``.done`` file beside it. A blocking read, no polling."""

from __future__ import annotations

import os
import threading


def _serve(fifo: str) -> None:
    import tracemalloc

    while True:
        with open(fifo) as f:
            for line in f:
                out = line.strip()
                if not out:
                    continue
                snap = tracemalloc.take_snapshot()
                snap.dump(out)
                with open(out + ".done", "w") as done:
                    done.write(f"{len(threading.enumerate())}\n")


_FIFO = os.environ.get("INVERSE_CLOUD_MEMPROBE", "")
if _FIFO:
    threading.Thread(target=_serve, args=(_FIFO,), name="memprobe", daemon=True).start()
