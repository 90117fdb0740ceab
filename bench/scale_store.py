"""The stores scale_bench.py and import_bench.py serve: N vCards (the seed workload's) or one-hour events,
written as files into Radicale's folder layout, as a restore or an import would leave them."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from pathlib import Path

from carddav_bench import make_vcard
from dav_bench import USER

BOOK = "book"


def make_event(i: int, rng: random.Random) -> tuple[str, str]:
    uid = str(uuid.UUID(int=rng.getrandbits(128)))
    start = dt.datetime(2016, 1, 1, 8) + dt.timedelta(hours=3 * i + rng.randrange(3))
    fmt = "%Y%m%dT%H%M%SZ"
    text = "\r\n".join([
        "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//inverse-cloud//scale_bench//EN", "BEGIN:VEVENT",
        f"UID:{uid}", f"DTSTAMP:{start.strftime(fmt)}", f"DTSTART:{start.strftime(fmt)}",
        f"DTEND:{(start + dt.timedelta(hours=1)).strftime(fmt)}", f"SUMMARY:Meeting {i}",
        f"DESCRIPTION:Agenda item {rng.randrange(10**6)}", "END:VEVENT", "END:VCALENDAR", ""])
    return uid, text


class Kind:
    def __init__(self, calendar: bool) -> None:
        self.calendar = calendar
        self.tag = "VCALENDAR" if calendar else "VADDRESSBOOK"
        self.suffix = ".ics" if calendar else ".vcf"
        self.ctype = "text/calendar" if calendar else "text/vcard"
        self.label = "calendar events" if calendar else "vCards"

    def make(self, i: int, rng: random.Random) -> tuple[str, str]:
        return make_event(i, rng) if self.calendar else make_vcard(i, rng, 15000 if i % 10 == 0 else 0)

    def multiget(self, hrefs: list[str]) -> bytes:
        if self.calendar:
            head = ('<c:calendar-multiget xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav">'
                    '<d:prop><d:getetag/><c:calendar-data/></d:prop>')
            tail = "</c:calendar-multiget>"
        else:
            head = ('<c:addressbook-multiget xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:carddav">'
                    '<d:prop><d:getetag/><c:address-data/></d:prop>')
            tail = "</c:addressbook-multiget>"
        return ('<?xml version="1.0"?>' + head + "".join(f"<d:href>{h}</d:href>" for h in hrefs) + tail).encode()


def write_store(folder: Path, kind: Kind, n: int, seed: int = 42) -> list[str]:
    """N items of ``kind`` as files in ``folder``/collection-root/USER/BOOK (Radicale's layout); their uids."""
    coll = folder / "collection-root" / USER / BOOK
    coll.mkdir(parents=True)
    (coll / ".Radicale.props").write_text(json.dumps({"tag": kind.tag, "D:displayname": "bench"}))
    rng = random.Random(seed)
    uids = []
    for i in range(n):
        uid, text = kind.make(i, rng)
        (coll / f"{uid}{kind.suffix}").write_bytes(text.encode())
        uids.append(uid)
    return uids
