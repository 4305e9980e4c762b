"""`corral state check`: repair what a crash may leave, then verify a journal end to end.

What is verified: head.json parses; the baseline's bytes hash to what head says; each live
record is where its id says, its `prev` is the hash of the record before it (the first one's is
the baseline's anchor), and each change's "before" is exactly what the previous epochs left
(the log replays); head names the latest record's hash; every object a record or the baseline
needs exists and its content hashes to its name; a file of several chunks adds up to its hash.
Unused objects are reclaimed only when all of that holds.
"""

from __future__ import annotations

from typing import Any

from corral.core.errors import RuntimeFailure
from corral.recover.journal.log import Log
from corral.recover.journal.plan import apply
from corral.recover.journal.store import (
    from_index_key,
    meta_from_json,
    meta_from_row,
    path_from_json,
    same,
)


def verify(journal: Log) -> dict[str, Any]:
    """The caller holds the journal's lock."""
    problems: list[str] = []
    out: dict[str, Any] = {"volume": str(journal.volume), "problems": problems, "epochs": 0,
                           "objects": 0, "reclaimed_objects": 0}
    try:
        out["recovered"] = journal.recover_locked()
        head = journal.head()
    except (RuntimeFailure, OSError, ValueError, KeyError) as exc:
        problems.append(f"cannot recover: {exc}")
        return out
    if head is None:
        return out  # nothing journaled yet
    try:
        baseline, baseline_hash = journal.baseline(head)
    except (OSError, ValueError) as exc:
        problems.append(f"baseline {head['baseline']['file']}: {exc}")
        return out
    if baseline_hash != head["baseline"]["hash"]:
        problems.append(f"baseline {head['baseline']['file']}: its hash is not the one in head")
    if baseline.get("anchor") != head["baseline"].get("anchor"):
        problems.append("baseline: its anchor is not the one in head")
    if baseline.get("epoch") != head["first"] - 1:
        problems.append("baseline: its epoch does not precede the first live epoch")
    state = {from_index_key(k): meta_from_row(r) for k, r in baseline["entries"].items()}
    prev = baseline.get("anchor")
    for epoch in range(head["first"], head["epoch"] + 1):
        try:
            record, record_hash = journal.record(epoch)
        except (OSError, ValueError) as exc:
            problems.append(f"epoch {epoch}: {exc}")
            prev = None  # the chain cannot be followed across a missing link
            continue
        if record.get("id") != epoch:
            problems.append(f"epoch {epoch}: its record says id {record.get('id')}")
        if prev is not None and record.get("prev") != prev:
            problems.append(f"epoch {epoch}: prev is not the hash of epoch {epoch - 1} "
                            "(the chain is broken: a record was edited or replaced)")
        for change in record.get("changes", []):
            if not same(meta_from_json(change["before"]), state.get(path_from_json(change))):
                problems.append(f"epoch {epoch}: {change['path']}: 'before' is not what the "
                                "previous epochs left")
        apply(state, record)
        prev = record_hash
        out["epochs"] += 1
    if prev is not None and prev != head["hash"]:
        problems.append("head: its hash is not that of the latest epoch record")
    out["objects"] = _verify_objects(journal, head, problems)
    if not problems:  # only a sound log says which objects nothing needs
        out["reclaimed_objects"] = journal.sweep()[0]
    return out


def _verify_objects(journal: Log, head: dict[str, Any], problems: list[str]) -> int:
    import blake3

    names = journal.referenced(head)
    problems.extend(journal.objects.bad)
    for name in sorted(names):
        try:
            journal.objects.read(name)
        except FileNotFoundError:
            problems.append(f"object {name}: missing")
        except Exception as exc:  # noqa: BLE001 - zstd's errors and ours: each is a problem
            problems.append(f"object {name}: {exc}")
    # A file of several chunks: their concatenation must be the file recorded.
    multi = {(m.digest, m.chunks) for m in journal.all_metas(head) if len(m.chunks) > 1}
    for whole, chunks in multi:
        hasher = blake3.blake3()
        try:
            for chunk in chunks:
                hasher.update(journal.objects.read(chunk, verify=False))
        except Exception:  # noqa: BLE001 - already listed above
            continue
        if hasher.hexdigest() != whole:
            problems.append(f"file content {whole}: its chunks do not add up to it")
    return len(names)

