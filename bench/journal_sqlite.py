"""Costs of row-level epochs for SQLite databases (corral.recover.journal.sqlite), measured:
`bash bench/journal_sqlite.sh` (or `.venv/bin/python bench/journal_sqlite.py [--mb N]`), as
root or not, in a throwaway directory. Prints a Markdown report (bench/journal_sqlite.md).

1. Epoch close of a database of --mb MB with 1,000 changed rows: row level against the file
   level alone (the same journal with row_level off), and what each stores.
2. Excise of one epoch from --epochs (rows; then the same at file level).
3. A writer's throughput (one-row transactions on that database, WAL) while epochs close every
   second: no journal, file level, row level.
"""
from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from corral.recover.journal.journal import Journal  # noqa: E402

ROW = 1000  # bytes of payload per row


def build(db: Path, mb: int) -> int:
    con = sqlite3.connect(db, isolation_level=None)
    con.executescript("PRAGMA journal_mode=WAL; CREATE TABLE items(id INTEGER PRIMARY KEY, "
                      "price REAL, payload BLOB)")
    rows = mb * 1_000_000 // (ROW + 30)
    rng = random.Random(1)
    con.execute("BEGIN")
    con.executemany("INSERT INTO items VALUES (?, ?, ?)",
                    ((i, 1.0, rng.randbytes(ROW)) for i in range(rows)))
    con.execute("COMMIT")
    con.close()
    return rows


def change(db: Path, rows: int, n: int, seed: int) -> int:
    """n rows updated (a new payload): returns the bytes changed."""
    rng = random.Random(seed)
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN")
    for i in rng.sample(range(rows), n):
        con.execute("UPDATE items SET price = ?, payload = ? WHERE id = ?",
                    (rng.random(), rng.randbytes(ROW), i))
    con.execute("COMMIT")
    con.close()
    return n * (ROW + 8)


def journal(root: Path, src: Path, row_level: bool) -> Journal:
    state = root / ("rows" if row_level else "files")
    (state / "volumes/v").mkdir(parents=True)
    shutil.copy(src, state / "volumes/v/app.db")
    j = Journal(state, "v")
    j.row_level = row_level
    j.ensure()
    return j


def close_cost(root: Path, src: Path, rows: int) -> list[str]:
    out = ["| journal | close (s) | stored (MB) | changeset (KB) | changed (KB) |",
           "|---|---|---|---|---|"]
    for row_level in (False, True):
        j = journal(root, src, row_level)
        if row_level:  # the first close makes the previous snapshot: measure the second
            change(j.volume / "app.db", rows, 1000, 1)
            j.close_epoch("mark")
        changed = change(j.volume / "app.db", rows, 1000, 2)
        started = time.monotonic()
        epoch = j.close_epoch("mark")
        took = time.monotonic() - started
        assert epoch is not None
        cs = [c["rows"]["changeset"]["size"] for c in j.diff(epoch)["changes"] if "rows" in c]
        out.append(f"| {'row level' if row_level else 'file level'} | {took:.2f} | "
                   f"{j.last_scan['stored_bytes'] / 1e6:.1f} | "
                   f"{(cs[0] / 1e3) if cs else 0:.0f} | {changed / 1e3:.0f} |")
        shutil.rmtree(j.dir.parent.parent)
    return out


def excise_cost(root: Path, src: Path, rows: int, epochs: int) -> list[str]:
    out = ["| journal | epochs | excise of one (s) | conflicts |", "|---|---|---|---|"]
    for row_level in (True, False):
        j = journal(root, src, row_level)
        for e in range(epochs):
            change(j.volume / "app.db", rows, 10, 100 + e)
            j.close_epoch("mark")
        started = time.monotonic()
        result = j.excise(epochs // 2, epochs // 2, stopped=True)
        took = time.monotonic() - started
        out.append(f"| {'row level' if row_level else 'file level'} | {epochs} | {took:.2f} | "
                   f"{len(result['conflicts'])} ({'rows' if row_level else 'whole file'}) |")
        shutil.rmtree(j.dir.parent.parent)
    return out


def _writer(db: str, rows: int, seconds: float, queue: multiprocessing.Queue) -> None:
    con = sqlite3.connect(db, isolation_level=None, timeout=30)
    rng, n = random.Random(3), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        con.execute("UPDATE items SET price = ? WHERE id = ?", (rng.random(),
                                                             rng.randrange(rows)))
        n += 1
    queue.put(n / seconds)


def throughput(root: Path, src: Path, rows: int, seconds: float) -> list[str]:
    out = ["| journal | writes/s | ratio | epochs closed |", "|---|---|---|---|"]
    base = None
    for mode in ("none", "file level", "row level"):
        j = journal(root, src, mode == "row level")
        queue: multiprocessing.Queue = multiprocessing.Queue()
        proc = multiprocessing.Process(target=_writer, args=(str(j.volume / "app.db"), rows,
                                                             seconds, queue))
        proc.start()
        closed = 0
        while proc.is_alive():
            time.sleep(1)
            if mode != "none" and proc.is_alive():
                closed += j.close_epoch("schedule") is not None
        rate = queue.get()
        proc.join()
        base = base or rate
        out.append(f"| {mode} | {rate:.0f} | {rate / base:.2f} | {closed} |")
        shutil.rmtree(j.dir.parent.parent)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corral-bench-sqlite-") as tmp:
        root = Path(tmp)
        src = root / "src.db"
        rows = build(src, args.mb)
        size = src.stat().st_size / 1e6
        print(f"# Row-level epochs of SQLite databases\n\n`bash bench/journal_sqlite.sh` "
              f"(--mb {args.mb} --epochs {args.epochs} --seconds {args.seconds:g}): a "
              f"{size:.0f} MB database, {rows} rows of {ROW} bytes, WAL.\n")
        print("## Epoch close, 1,000 changed rows\n")
        print("\n".join(close_cost(root, src, rows)) + "\n")
        print(f"## Excise one epoch (10 changed rows each) from {args.epochs}\n")
        print("\n".join(excise_cost(root, src, rows, args.epochs)) + "\n")
        print(f"## A writer's throughput, epochs closing every second ({args.seconds:g} s)\n")
        print("\n".join(throughput(root, src, rows, args.seconds)))


if __name__ == "__main__":
    main()
