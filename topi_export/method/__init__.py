"""The ToPi method, model-agnostic: selection of kept context tokens, the temporal schedule, defaults."""
from topi_export.method.schedule import StepPlan, make_plan  # noqa: F401
from topi_export.method.selection import (  # noqa: F401
    DEFAULT_POLICY,
    POLICIES,
    Selector,
    keep_count,
    parse_buckets,
    select_tokens,
    tau_keep_count,
    validate_ratio,
)
