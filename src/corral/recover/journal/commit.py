"""`corral state commit`: fold the oldest epochs of a journal into its baseline.

"When can you commit a state as good?" Here: once an epoch ended more than the manifest's
`quiet` ago and saw no incident; an incident epoch only together with the excision that took it
out, or when the operator accepts it (journal_plan.fold_prefix). Only a prefix folds, in
order: the baseline is always the state after some epoch. Nothing is folded while an incident
is open, since where its stretch begins and ends may still be decided.

The new baseline is written whole before head.json names it; the folded records and the old
baseline become garbage at that instant and are removed after, then the chunks nothing needs.
"""

from __future__ import annotations

from typing import Any

from corral.core.errors import RuntimeFailure
from corral.core.text import iso, parse_iso
from corral.recover.journal.log import Log
from corral.recover.journal.plan import apply, fold_prefix
from corral.recover.journal.store import (
    HEAD,
    digest,
    encode,
    failed,
    from_index_key,
    index_key,
    meta_from_row,
    meta_row,
    write_durable,
)


def commit(journal: Log, quiet_seconds: float, open_incidents: list[Any],
           accept: set[int]) -> dict[str, Any]:
    if open_incidents:
        ids = ", ".join(str(i.get("id", "?") if isinstance(i, dict) else i)
                        for i in open_incidents)
        raise RuntimeFailure(f"{len(open_incidents)} incident(s) open ({ids}); commit refused "
                             "until they are closed")
    with journal.locked():
        journal.recover_locked()
        head = journal.head()
        if head is None:
            return {"folded": [], "baseline_epoch": 0, "stopped": "not journaled yet",
                    "reclaimed_objects": 0, "reclaimed_bytes": 0}
        records = list(journal.records(head["first"], head["epoch"]))
        count, why = fold_prefix(records, [parse_iso(r["end"]) for r in records],
                                 journal.clock() - quiet_seconds, accept)
        if count:
            folded = records[:count]
            entries = {from_index_key(k): meta_from_row(r)
                       for k, r in journal.baseline(head)[0]["entries"].items()}
            for record in folded:
                apply(entries, record)
            last = folded[-1]["id"]
            anchor = journal.record(last)[1]
            data = encode({"format": 1, "epoch": last, "anchor": anchor,
                           "created": iso(journal.clock()),
                           "entries": {index_key(p): meta_row(m) for p, m in entries.items()}})
            name = f"baseline-{last}.json"
            try:
                write_durable(journal.dir / name, data)
                write_durable(journal.dir / HEAD, encode(dict(
                    head, first=last + 1,
                    baseline={"file": name, "hash": digest(data), "anchor": anchor})))
            except OSError as exc:
                raise failed(exc, f"committing epochs of {journal.volume}") from exc
            journal.recover_locked()  # the folded records and the old baseline are garbage now
        objects, size = journal.sweep()
        return {"folded": [r["id"] for r in records[:count]],
                "baseline_epoch": head["first"] - 1 + count, "stopped": why,
                "reclaimed_objects": objects, "reclaimed_bytes": size}
