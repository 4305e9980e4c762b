"""core.record against dataclasses: the same classes written both ways behave the same (the
launch path's records replaced dataclasses, bench/README.md)."""

from __future__ import annotations

import dataclasses

import pytest

from corral.core import record as rec


def _pair(**options):
    """The same class as a dataclass and as a record."""
    made = []
    for deco, field in ((dataclasses.dataclass, dataclasses.field), (rec.record, rec.field)):
        class Point:
            x: int
            y: str = "y"
            tags: list[str] = field(default_factory=list)
            z: float = field(default=1.5)

        Point.__qualname__ = "Point"
        made.append(deco(**options)(Point))
    return made


@pytest.mark.parametrize("options", [{}, {"frozen": True}, {"frozen": True, "order": True},
                                     {"eq": False}, {"slots": True}])
def test_a_record_behaves_as_the_dataclass(options):
    dc, rc = _pair(**options)
    for args, kwargs in (((1,), {}), ((1, "a"), {"z": 2.0}), ((), {"x": 3, "tags": ["t"]})):
        a, b = dc(*args, **kwargs), rc(*args, **kwargs)
        assert repr(a) == repr(b)
        assert dataclasses.asdict(a) == rec.asdict(b)
        assert (a == dc(*args, **kwargs)) == (b == rc(*args, **kwargs))
        assert (a.__hash__ is None) == (b.__hash__ is None)
        if options.get("frozen"):  # the fields' tuple's hash: unhashable with a list in it
            with pytest.raises(TypeError):
                hash(a)
            with pytest.raises(TypeError):
                hash(b)
            assert hash(rec.replace(b, tags=())) == hash(rc(*args, **kwargs | {"tags": ()}))
    assert rc(1).tags is not rc(1).tags  # a fresh list per instance
    assert hasattr(rc, "__dict__") == hasattr(dc, "__dict__")
    assert hasattr(rc, "y") == hasattr(dc, "y") and hasattr(rc, "tags") == hasattr(dc, "tags")
    if options.get("order"):
        assert (rc(1, "a") < rc(1, "b")) and (rc(2) > rc(1)) and rc(1) <= rc(1)
    if options.get("frozen"):
        with pytest.raises(AttributeError):
            rc(1).x = 2  # type: ignore[misc]
    else:
        b = rc(1)
        b.x = 2
        assert b.x == 2
    assert rec.replace(rc(1, "a"), z=9.0) == rc(1, "a", z=9.0) or not options.get("eq", True)
    assert rec.replace(rc(1, "a"), z=9.0).z == 9.0


def test_wrong_arguments_are_refused_as_by_the_dataclass():
    dc, rc = _pair()
    for args, kwargs in (((), {}), ((1, "a", [], 1.0, 5), {}), ((1,), {"x": 2}),
                         ((1,), {"w": 2})):
        with pytest.raises(TypeError):
            dc(*args, **kwargs)
        with pytest.raises(TypeError):
            rc(*args, **kwargs)


def test_post_init_nested_records_and_a_hand_written_init():
    @rec.record(frozen=True)
    class Inner:
        text: str

        def __post_init__(self) -> None:
            object.__setattr__(self, "text", self.text.upper())

    @rec.record
    class Outer:
        inner: Inner
        items: list[Inner]
        by: dict[str, Inner]

    @rec.record(slots=True, eq=False)
    class Fast:
        a: int
        b: int = 0

        def __init__(self, a: int, b: int = 0) -> None:
            self.a, self.b = a, b * 2

    out = Outer(Inner("a"), [Inner("b")], {"k": Inner("c")})
    assert out.inner.text == "A"
    assert rec.asdict(out) == {"inner": {"text": "A"}, "items": [{"text": "B"}],
                               "by": {"k": {"text": "C"}}}
    assert Fast(1, 2).b == 4 and repr(Fast(1, 2)) == "Fast(a=1, b=4)"
    assert not hasattr(Fast(1), "__dict__")
    with pytest.raises(TypeError):
        @rec.record
        class Bad:
            a: int = 0
            b: int
