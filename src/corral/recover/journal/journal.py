"""The journal of a volume, whole: the redo log (`Log`) plus folding old epochs into the
baseline (`commit`) and verifying it end to end (`check`). Those two live in modules of their own
that drive a `Log`; this class only puts them behind one name, so they need not import it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from corral.recover.journal import commit as journal_commit
from corral.recover.journal import verify as journal_verify
from corral.recover.journal.log import Log


class Journal(Log):
    def commit(self, quiet_seconds: float, open_incidents: Iterable[Any] = (),
               accept: Iterable[int] = ()) -> dict[str, Any]:
        """Fold the oldest quiet epochs without incident into the baseline and reclaim what
        nothing needs any more; refused while an incident is open. See journal.commit."""
        return journal_commit.commit(self, quiet_seconds, list(open_incidents), set(accept))

    def check(self) -> dict[str, Any]:
        """Repair what a crash may leave (garbage, an unfinished excision), then verify the
        whole journal; see journal.verify. Its "problems" list is empty when all is sound."""
        with self.locked():
            return journal_verify.verify(self)
