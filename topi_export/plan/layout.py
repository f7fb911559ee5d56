"""The token layout of one request: text tokens, a target grid and a list of reference grids (packed-token grids,
H x W, raster order). The context C is the concatenation of every reference's tokens, in order."""
from __future__ import annotations

import math
from dataclasses import dataclass

from topi_export.errors import TopiError
from topi_export.plan.schema import check_int

# Refused above this many tokens in one sequence (a 2048x2048 target with 4 references of that size is 81920):
# larger requests are typos, and they would allocate far more than any GPU holds.
MAX_TOKENS = 131072
MAX_SIDE = 1024  # tokens along one grid side


def keep_count(ratio: float, num_ctx: int) -> int:
    """Context tokens kept at prune ratio r: ceil((1 - r) * Nc), at least 1."""
    # round() guards float noise such as (1-0.3)*10 = 6.999999999999999 -> 7
    return max(1, math.ceil(round((1.0 - ratio) * num_ctx, 9)))


def parse_grid(text, what: str = "grid") -> tuple[int, int]:
    """'32x32' -> (32, 32); HxW in tokens."""
    try:
        h, w = (int(v) for v in str(text).strip().lower().split("x"))
    except ValueError:
        raise TopiError(f"bad {what} {text!r}: write it as HxW in tokens, e.g. 32x32") from None
    if not (0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE):
        raise TopiError(f"bad {what} {text!r}: each side must be in 1..{MAX_SIDE} tokens")
    return h, w


def parse_grids(text, what: str = "reference grids") -> tuple[tuple[int, int], ...]:
    """'16x16,8x12' -> ((16, 16), (8, 12))."""
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise TopiError(f"bad {what} {text!r}: write HxW[,HxW...] in tokens, e.g. 16x16,16x16")
    return tuple(parse_grid(p, what) for p in parts)


def grid_text(grid) -> str:
    return f"{grid[0]}x{grid[1]}"


@dataclass(frozen=True)
class Layout:
    text_tokens: int
    target_grid: tuple[int, int]
    ref_grids: tuple[tuple[int, int], ...]

    def __post_init__(self):
        object.__setattr__(self, "target_grid", tuple(int(v) for v in self.target_grid))
        object.__setattr__(self, "ref_grids", tuple(tuple(int(v) for v in g) for g in self.ref_grids))
        if not isinstance(self.text_tokens, int) or isinstance(self.text_tokens, bool) or self.text_tokens < 1:
            raise TopiError(f"text tokens {self.text_tokens!r} must be an integer >= 1")
        for g in (self.target_grid, *self.ref_grids):
            if len(g) != 2 or not all(0 < v <= MAX_SIDE for v in g):
                raise TopiError(f"grid {g} must be H x W tokens with sides in 1..{MAX_SIDE}")
        if not self.ref_grids:
            raise TopiError("a layout needs at least one reference grid")
        if self.num_tokens > MAX_TOKENS:
            raise TopiError(f"layout {self.describe()} has {self.num_tokens} tokens, above the limit of {MAX_TOKENS}: "
                            f"use smaller grids or fewer references")

    @classmethod
    def single(cls, text_tokens: int, target_grid, ref_grid=None) -> "Layout":
        return cls(text_tokens, tuple(target_grid), (tuple(ref_grid or target_grid),))

    @property
    def num_target(self) -> int:
        return self.target_grid[0] * self.target_grid[1]

    @property
    def ref_sizes(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.ref_grids)

    @property
    def num_ctx(self) -> int:
        return sum(self.ref_sizes)

    @property
    def num_refs(self) -> int:
        return len(self.ref_grids)

    @property
    def num_tokens(self) -> int:
        return self.text_tokens + self.num_target + self.num_ctx

    def ref_offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.ref_sizes:
            out.append(acc)
            acc += n
        return tuple(out)

    def with_text_tokens(self, text_tokens: int) -> "Layout":
        return Layout(text_tokens, self.target_grid, self.ref_grids)

    def sizes(self, keep: int | None = None, queries: int | None = None, batch: int = 1) -> dict:
        """Values of the symbolic graph dimensions (models/base.py GraphInput.dims) for this layout."""
        return {"B": batch, "T": self.text_tokens, "Nx": self.num_target, "Nc": self.num_ctx,
                "K": self.num_ctx if keep is None else keep, "Q": self.num_target if queries is None else queries}

    def describe(self) -> str:
        refs = "+".join(grid_text(g) for g in self.ref_grids)
        return f"t{self.text_tokens}-x{grid_text(self.target_grid)}-c{refs}"

    def to_json(self) -> dict:
        return {"text_tokens": self.text_tokens, "target_grid": list(self.target_grid),
                "reference_grids": [list(g) for g in self.ref_grids]}

    @classmethod
    def from_reader(cls, r) -> "Layout":
        grids = []
        for i, g in enumerate(r.list("reference_grids", nonempty=True)):
            if not (isinstance(g, list) and len(g) == 2):
                raise r.fail(f"reference_grids[{i}]", "must be [H, W]")
            grids.append(tuple(check_int(v, 1, MAX_SIDE, lambda what, i=i: r.fail(f"reference_grids[{i}]", what))
                               for v in g))
        tg = r.ints("target_grid", lo=1, hi=MAX_SIDE)
        if len(tg) != 2:
            raise r.fail("target_grid", "must be [H, W]")
        text_tokens = r.int("text_tokens", lo=1, hi=MAX_TOKENS)
        try:
            return cls(text_tokens, tg, tuple(grids))
        except TopiError as exc:  # the cross-field limits (total tokens)
            raise TopiError(f"{r.where}: bad layout ({exc}): {r.fix}") from None
