"""The ToPi method, model-agnostic: selection of kept context tokens, the temporal schedule, defaults."""
from topi_export.method.schedule import StepPlan, make_plan  # noqa: F401
from topi_export.method.selection import (  # noqa: F401
    DEFAULT_POLICY,
    POLICIES,
    Policy,
    Selector,
    check_bucket_keeps,
    check_policy,
    keep_count,
    keep_per_reference,
    kept_mass,
    normalize_grids,
    parse_buckets,
    policy_help,
    select_tokens,
    tau_keep_count,
    validate_ratio,
)
