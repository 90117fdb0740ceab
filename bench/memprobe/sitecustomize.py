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


# Taken out of the environment at once (the interpreter has read the other two already): serve's own children,
# such as the CAA look-up, must neither answer the pipe nor run traced.
_FIFO = os.environ.pop("INVERSE_CLOUD_MEMPROBE", "")
if _FIFO:
    os.environ.pop("PYTHONTRACEMALLOC", None)
    os.environ.pop("PYTHONPROFILEIMPORTTIME", None)
if _FIFO:
    threading.Thread(target=_serve, args=(_FIFO,), name="memprobe", daemon=True).start()
