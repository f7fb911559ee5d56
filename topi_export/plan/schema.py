"""Small validators for the versioned JSON of the plan objects: every field's type and range is checked and a
failure is one TopiError line naming the file, the field and the fix."""
from __future__ import annotations

import math

from topi_export.errors import TopiError


class Reader:
    """Typed access to one JSON object; `where` names the file for messages, `fix` says what to do."""

    def __init__(self, data, where: str, fix: str, path: str = ""):
        if not isinstance(data, dict):
            raise TopiError(f"{where}: {path or 'the top level'} must be a JSON object, not "
                            f"{type(data).__name__}: {fix}")
        self.data, self.where, self.fix, self.path = data, where, fix, path

    def _name(self, key):
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key, what) -> TopiError:
        return TopiError(f"{self.where}: '{self._name(key)}' {what}: {self.fix}")

    def has(self, key) -> bool:
        return key in self.data and self.data[key] is not None

    def get(self, key, default=None):
        return self.data.get(key, default)

    def raw(self, key):
        if key not in self.data:
            raise self.fail(key, "is missing")
        return self.data[key]

    def obj(self, key) -> "Reader":
        return Reader(self.raw(key), self.where, self.fix, self._name(key))

    def str(self, key, choices=None, optional=False):
        if optional and not self.has(key):
            return None
        v = self.raw(key)
        if not isinstance(v, str):
            raise self.fail(key, f"must be a string, not {type(v).__name__}")
        if choices is not None and v not in choices:
            raise self.fail(key, f"is {v!r}, expected one of {', '.join(map(repr, choices))}")
        return v

    def int(self, key, lo=None, hi=None, optional=False):
        if optional and not self.has(key):
            return None
        return check_int(self.raw(key), lo, hi, lambda what: self.fail(key, what))

    def float(self, key, lo=None, hi=None, optional=False, lo_open=False, hi_open=False):
        if optional and not self.has(key):
            return None
        v = self.raw(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(key, f"must be a finite number, not {v!r}")
        v = float(v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.fail(key, f"is {v}, outside the allowed range")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise self.fail(key, f"is {v}, outside the allowed range")
        return v

    def bool(self, key, optional=False, default=None):
        if optional and not self.has(key):
            return default
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, not {v!r}")
        return v

    def list(self, key, optional=False, nonempty=False):
        if optional and not self.has(key):
            return []
        v = self.raw(key)
        if not isinstance(v, list):
            raise self.fail(key, f"must be a list, not {type(v).__name__}")
        if nonempty and not v:
            raise self.fail(key, "is empty")
        return v

    def ints(self, key, lo=None, hi=None, nonempty=False, optional=False):
        out = []
        for i, v in enumerate(self.list(key, optional=optional, nonempty=nonempty)):
            out.append(check_int(v, lo, hi, lambda what, i=i: self.fail(f"{key}[{i}]", what)))
        return tuple(out)

    def dict(self, key, optional=False):
        if optional and not self.has(key):
            return {}
        v = self.raw(key)
        if not isinstance(v, dict):
            raise self.fail(key, f"must be a JSON object, not {type(v).__name__}")
        return v


def check_int(v, lo, hi, fail):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise fail(f"must be an integer, not {v!r}")
    if lo is not None and v < lo:
        raise fail(f"is {v}, below the minimum {lo}")
    if hi is not None and v > hi:
        raise fail(f"is {v}, above the maximum {hi}")
    return v
