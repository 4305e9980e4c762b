"""Excision at the grain of lines and byte ranges (corral.recover.journal.merge), on real
journals of real directories: the stretch's edits to a file that changed again later are taken
out, the later ones kept, and only regions both touched are conflicts."""
from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from corral.recover.journal import merge
from test_journal import make_env, put

PAGE = [f"line {i}\n".encode() for i in range(12)]


def page(**changed: bytes) -> bytes:
    lines = list(PAGE)
    for key, value in changed.items():
        lines[int(key[1:])] = value
    return b"".join(lines)


def history(tmp_path, before: bytes, stretch: bytes, later: bytes, name: str = "f"):
    """Epoch 1 good, epoch 2 the attack (before -> stretch), epoch 3 good (-> later)."""
    env = make_env(tmp_path)
    put(env.vol, name, before)
    env.journal.ensure()
    put(env.vol, "other", b"good")
    env.journal.close_epoch("mark")
    put(env.vol, name, stretch)
    env.journal.close_epoch("incident", incidents=["inc-1"])
    put(env.vol, name, later)
    env.journal.close_epoch("mark")
    return env


def test_an_appended_line_goes_and_later_appends_stay(tmp_path):
    good1, bad, good2 = b'{"text": "good 1"}\n', b'{"text": "ATTACKER"}\n', b'{"text": "good 2"}\n'
    env = history(tmp_path, good1, good1 + bad, good1 + bad + good2, "notes.jsonl")
    result = env.journal.excise(2, 2, stopped=True)
    assert (env.vol / "notes.jsonl").read_bytes() == good1 + good2
    assert result["conflicts"] == []
    assert [(m["path"], m["how"], m["removed_bytes"]) for m in result["merged"]] == [
        ("notes.jsonl", "append", len(bad))]
    assert env.journal.diff(4)["merged"][0]["path"] == "notes.jsonl"
    assert env.journal.check()["problems"] == []
    assert env.journal.close_epoch("schedule") is None  # the log describes the volume


def test_a_defaced_line_is_restored_and_later_edits_kept(tmp_path):
    env = history(tmp_path, page(), page(l3=b"<script>steal()</script>\n"),
                  page(l3=b"<script>steal()</script>\n", l9=b"line 9, edited later\n"))
    result = env.journal.excise(2, 2, stopped=True)
    assert (env.vol / "f").read_bytes() == page(l9=b"line 9, edited later\n")
    assert result["conflicts"] == [] and result["merged"][0]["how"] == "lines"


def test_deleted_lines_come_back(tmp_path):
    env = history(tmp_path, page(), b"".join(PAGE[:4] + PAGE[8:]),
                  b"".join(PAGE[:4] + PAGE[8:]) + b"appended later\n")
    env.journal.excise(2, 2, stopped=True)
    assert (env.vol / "f").read_bytes() == page() + b"appended later\n"


def test_the_same_line_touched_by_both_is_a_conflict_listing_each_version(tmp_path):
    env = history(tmp_path, page(), page(l3=b"DEFACED\n", l6=b"DEFACED too\n"),
                  page(l3=b"fixed by the editor\n", l6=b"DEFACED too\n"))
    result = env.journal.excise(2, 2, stopped=True)
    # line 6 is the stretch's alone: undone; line 3 was rewritten later: kept, listed
    assert (env.vol / "f").read_bytes() == page(l3=b"fixed by the editor\n")
    [conflict] = result["conflicts"]
    assert conflict["path"] == "f" and conflict["review"] and conflict["kept"] == "after"
    [region] = conflict["regions"]
    assert region == {"line": 4, "kept": "after", "before_stretch": {"lines": ["line 3"]},
                      "stretch": {"lines": ["DEFACED"]},
                      "later": {"lines": ["fixed by the editor"]}}


def test_prefer_before_keeps_the_pre_stretch_lines_of_a_conflict(tmp_path):
    env = history(tmp_path, page(), page(l3=b"DEFACED\n"), page(l3=b"later\n", l8=b"new 8\n"))
    result = env.journal.excise(2, 2, "before", stopped=True)
    assert (env.vol / "f").read_bytes() == page(l8=b"new 8\n")
    assert result["conflicts"][0]["kept"] == "before"


def test_binary_files_stay_at_file_level(tmp_path):
    env = history(tmp_path, b"\0\1bin", b"\0\1bin attacked", b"\0\2rewritten later")
    result = env.journal.excise(2, 2, stopped=True)
    assert (env.vol / "f").read_bytes() == b"\0\2rewritten later"
    [conflict] = result["conflicts"]
    assert "regions" not in conflict and result["merged"] == []


def test_a_binary_log_that_only_grows_is_cut_by_byte_ranges(tmp_path):
    env = history(tmp_path, b"\0rec1", b"\0rec1\0evil", b"\0rec1\0evil\0rec2")
    env.journal.excise(2, 2, stopped=True)
    assert (env.vol / "f").read_bytes() == b"\0rec1\0rec2"


def test_the_stretchs_chmod_is_undone_and_the_later_content_kept(tmp_path):
    env = make_env(tmp_path)
    put(env.vol, "f", page(), mode=0o600)
    env.journal.ensure()
    os.chmod(env.vol / "f", 0o666)
    put(env.vol, "f", page(l1=b"bad\n"))
    env.journal.close_epoch("incident")
    put(env.vol, "f", page(l1=b"bad\n", l10=b"good\n"))
    env.journal.close_epoch("mark")
    env.journal.excise(1, 1, stopped=True)
    assert (env.vol / "f").read_bytes() == page(l10=b"good\n")
    assert os.stat(env.vol / "f").st_mode & 0o777 == 0o600


def test_dry_run_plans_and_changes_nothing(tmp_path):
    env = history(tmp_path, page(), page(l3=b"DEFACED\n"), page(l3=b"DEFACED\n", l9=b"x\n"))
    epochs = env.journal.info()["epoch"]
    result = env.journal.excise(2, 2, dry_run=True)
    assert result["dry_run"] and result["epoch"] is None
    assert result["merged"][0]["path"] == "f"
    assert (env.vol / "f").read_bytes() == page(l3=b"DEFACED\n", l9=b"x\n")
    assert env.journal.info()["epoch"] == epochs and env.journal.check()["problems"] == []


@given(st.lists(st.sampled_from([b"a", b"\n", b"\r", b"\r\n", b"\x0b", b"xyz"])))
def test_lines_split_only_at_newlines_and_join_back(parts):
    data = b"".join(parts)
    lines = merge.lines(data)
    assert b"".join(lines) == data
    assert all(line.count(b"\n") == (1 if line.endswith(b"\n") else 0) for line in lines)
