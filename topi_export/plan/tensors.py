"""A family's request tensors, declared once (docs/design.md, "Model families"): from each ``TensorSpec`` derive the
fields of an inputs file and of a Triton request, the graph inputs they feed, synthetic export inputs, the text
length and the batching of guidance branches. Nothing outside a family's module names one of its tensors."""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("text", "mask", "pooled", "scalar")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a request.

    role: ``text`` [1, T, features] (dim 1 is the text length), ``mask`` [1, T] (1 = token, 0 = padding; files may
    hold bool, integer or float), ``pooled`` [1, features], ``scalar`` one number (an inputs-file tensor [1] or
    string metadata).
    graph: the graph input it feeds (None: used on the host only, e.g. a guidance scale that combines branches).
    branch: the guidance branch it belongs to (0 = positive / the only one, 1 = negative): branch tensors of one
    graph input are stacked along the batch, branch 0 first.
    mask_of: for a mask, the text tensor it masks (a missing mask means all ones).
    default / bounds: for a scalar, the value when the request has none, and the allowed range."""

    name: str
    role: str
    features: int | None = None
    graph: str | None = None
    branch: int = 0
    required: bool = True
    mask_of: str | None = None
    default: float | None = None
    bounds: tuple[float, float] = (0.0, 100.0)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"tensor {self.name!r}: role {self.role!r} is not one of {ROLES}")
        if self.role in ("text", "pooled") and not (isinstance(self.features, int) and self.features > 0):
            raise ValueError(f"tensor {self.name!r}: a {self.role} tensor needs its feature size")
        if self.role == "mask" and not self.mask_of:
            raise ValueError(f"mask {self.name!r} must name the text tensor it masks (mask_of)")

    @property
    def rank(self) -> int:
        """Rank in a request (batch 1 included)."""
        return {"text": 3, "mask": 2, "pooled": 2, "scalar": 1}[self.role]

    @property
    def request_dims(self) -> tuple:
        """Dims in a request: 1 for the batch, "T" for the text length, numbers for fixed sizes."""
        return {"text": (1, "T", self.features), "mask": (1, "T"), "pooled": (1, self.features),
                "scalar": (1,)}[self.role]

    @property
    def graph_dims(self) -> tuple:
        """Dims of the graph input it feeds: the batch is "B" (one row per guidance branch)."""
        return ("B", *self.request_dims[1:])
