"""Records: the launch path's data classes, made without generating code.

`@record` is `@dataclass` for the classes `corral run` imports: the same fields (annotations,
defaults, `field(default_factory=...)`), `__init__`, `__repr__` (dataclass's format), `__eq__`,
`__hash__`, `frozen`, `order`, `slots` and `__post_init__`, and mypy checks them as dataclasses
(`typing.dataclass_transform`). Why not dataclasses: it writes each class's methods as source
text and compiles it (up to six `exec` calls per class) and its import pulls in inspect, ast,
dis and tokenize. The ~30 classes of one `corral run` cost ~10 ms to define and ~4 ms to import
that way (bench/README.md, "Launch time"), a sixth of the whole launch; here the methods are
shared functions that read the class's field list, defined in ~10 us per class, for a few
hundred nanoseconds more per instance. A hot class may define its own `__init__` (kept).

`replace` and `asdict` are dataclasses' for records (asdict also takes real dataclasses).
"""

from __future__ import annotations

from collections.abc import Callable

# typing costs `corral run` ~2.5 ms to import (bench/README.md, "Launch time"): the launch path's
# modules import it under a TYPE_CHECKING of their own (mypy honours the name; at run time it is
# False) and use types in annotations only, which `from __future__ import annotations` leaves
# unevaluated. Here the decorators that only inform the type checker are no-ops at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:
    def dataclass_transform(**_):
        return lambda func: func

_MISSING: Any = object()
_FIELDS = "__record_fields__"


class FrozenRecordError(AttributeError):
    """An assignment to a field of a frozen record (dataclasses.FrozenInstanceError's twin)."""


class _Field:
    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Any) -> None:
        self.default, self.default_factory = default, default_factory


def field(*, default: Any = _MISSING, default_factory: Callable[[], Any] = _MISSING) -> Any:
    """A field's default, or the callable that makes one per instance (a list, a dict)."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("cannot specify both default and default_factory")
    return _Field(default, default_factory)


@dataclass_transform(field_specifiers=(field,))
def record(cls: type[T] | None = None, /, *, frozen: bool = False, eq: bool = True,
           order: bool = False, slots: bool = False) -> Any:
    """The class, made a record (see the module's docstring)."""
    def wrap(cls: type[T]) -> type[T]:
        return _make(cls, frozen, eq, order, slots)

    return wrap if cls is None else wrap(cls)


def _make(cls: type[T], frozen: bool, eq: bool, order: bool, slots: bool) -> type[T]:
    own = cls.__dict__
    names: list[str] = []
    defaults: dict[str, Any] = {}
    factories: dict[str, Callable[[], Any]] = {}
    for name, kind in own.get("__annotations__", {}).items():
        if isinstance(kind, str) and kind.startswith(("ClassVar", "typing.ClassVar")):
            continue
        value = own.get(name, _MISSING)
        if isinstance(value, _Field):
            if value.default_factory is not _MISSING:
                factories[name] = value.default_factory
            elif value.default is not _MISSING:
                defaults[name] = value.default
        elif value is not _MISSING:
            defaults[name] = value
        if not (name in defaults or name in factories) and (defaults or factories):
            raise TypeError(f"non-default argument {name!r} follows default argument")
        names.append(name)
    fields = tuple(names)
    if slots:
        body = {k: v for k, v in own.items() if k not in fields
                and k not in ("__dict__", "__weakref__")}
        body["__slots__"] = fields
        meta: Any = type(cls)
        cls = meta(cls.__name__, cls.__bases__, body)
        cls.__qualname__ = own.get("__qualname__", cls.__qualname__)
    else:
        for name in fields:  # dataclass keeps plain defaults as class attributes, not fields
            if isinstance(own.get(name), _Field):
                if name in defaults:
                    setattr(cls, name, defaults[name])
                else:
                    delattr(cls, name)
    methods: dict[str, Any] = {"__repr__": _repr, "__match_args__": fields}
    if "__init__" not in own:
        methods["__init__"] = _init(cls.__qualname__, fields, defaults, factories,
                                    hasattr(cls, "__post_init__"))
    if eq:
        methods["__eq__"] = _eq
        # dataclass's rule: a __hash__ of the class's own is kept (Python sets __hash__ = None
        # in a body that defines __eq__: that one is not the class's own)
        if "__hash__" not in own or (own["__hash__"] is None and "__eq__" in own):
            methods["__hash__"] = _hash if frozen else None
    if order:
        methods.update(__lt__=_lt, __le__=_le, __gt__=_gt, __ge__=_ge)
    if frozen:
        methods.update(__setattr__=_frozen_set, __delattr__=_frozen_del)
    for key, value in methods.items():
        if key not in own or key == "__hash__":  # dataclass never overwrites the class's own
            setattr(cls, key, value)
    setattr(cls, _FIELDS, fields)
    return cls


def _init(qualname: str, fields: tuple[str, ...], defaults: dict[str, Any],
          factories: dict[str, Callable[[], Any]], post_init: bool) -> Callable[..., None]:
    count = len(fields)
    put = object.__setattr__  # also for frozen records, as dataclass's __init__ does

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > count:
            raise TypeError(f"{qualname}.__init__() takes {count} positional arguments but "
                            f"{len(args)} were given")
        for name, value in zip(fields, args, strict=False):
            put(self, name, value)
        for name in fields[len(args):]:
            if name in kwargs:
                value = kwargs.pop(name)
            elif name in defaults:
                value = defaults[name]
            elif name in factories:
                value = factories[name]()
            else:
                raise TypeError(f"{qualname}.__init__() missing required argument: {name!r}")
            put(self, name, value)
        if kwargs:
            name = next(iter(kwargs))
            what = "got multiple values for argument" if name in fields else \
                "got an unexpected keyword argument"
            raise TypeError(f"{qualname}.__init__() {what} {name!r}")
        if post_init:
            self.__post_init__()

    return __init__


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, name) for name in getattr(obj, _FIELDS))


def _repr(self: Any) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in getattr(self, _FIELDS))
    return f"{type(self).__qualname__}({inner})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        return _values(self) == _values(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(_values(self))


def _lt(self: Any, other: Any) -> Any:
    return _values(self) < _values(other) if other.__class__ is self.__class__ \
        else NotImplemented


def _le(self: Any, other: Any) -> Any:
    return _values(self) <= _values(other) if other.__class__ is self.__class__ \
        else NotImplemented


def _gt(self: Any, other: Any) -> Any:
    return _values(self) > _values(other) if other.__class__ is self.__class__ \
        else NotImplemented


def _ge(self: Any, other: Any) -> Any:
    return _values(self) >= _values(other) if other.__class__ is self.__class__ \
        else NotImplemented


def _frozen_set(self: Any, name: str, value: Any) -> None:
    raise FrozenRecordError(f"cannot assign to field {name!r}")


def _frozen_del(self: Any, name: str) -> None:
    raise FrozenRecordError(f"cannot delete field {name!r}")


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of the record `obj` with `changes` (dataclasses.replace)."""
    for name in getattr(obj, _FIELDS):
        changes.setdefault(name, getattr(obj, name))
    return type(obj)(**changes)


def asdict(obj: Any) -> dict[str, Any]:
    """The record `obj` as a dict, records, lists, tuples and dicts in it converted, values
    copied (dataclasses.asdict; a real dataclass is handed to it)."""
    if not hasattr(obj, _FIELDS):
        import dataclasses

        return dataclasses.asdict(obj)
    return {name: _plain(getattr(obj, name)) for name in getattr(obj, _FIELDS)}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bytes)):  # immutable: no copy
        return value
    if hasattr(type(value), _FIELDS):
        return asdict(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*[_plain(v) for v in value])
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return type(value)((_plain(k), _plain(v)) for k, v in value.items())
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, type):
        import dataclasses

        return dataclasses.asdict(value)
    import copy

    return copy.deepcopy(value)
