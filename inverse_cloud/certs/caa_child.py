"""The CAA look-up as a short-lived child process: ``python -m inverse_cloud.certs.caa_child DOMAIN [HOST:PORT]``.

serve checks CAA at start and then daily, for the life of the process. dnspython is some 70 modules and ~3 MiB
of heap that an import never gives back, so the long-running server runs the look-up here
(:func:`inverse_cloud.certs.caa.lookup_caa_isolated`) and never imports it. Prints one JSON line:
``{"records": [[flags, tag, value], ...], "owner": NAME}``, or ``{"error": TEXT}`` when the look-up failed.
Exit code 0 either way; anything else means the child itself broke.
"""

from __future__ import annotations

import json
import sys

from inverse_cloud.certs.caa import lookup_caa_sync

__all__ = ["main"]


def main(argv: list[str]) -> int:
    domain = argv[0]
    nameserver = None
    if len(argv) > 1:
        host, _, port = argv[1].rpartition(":")
        nameserver = (host, int(port))
    try:
        records, owner = lookup_caa_sync(domain, nameserver)
    except OSError as exc:
        print(json.dumps({"error": str(exc)}))
        return 0
    print(json.dumps({"records": [[r.flags, r.tag, r.value] for r in records], "owner": owner}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
