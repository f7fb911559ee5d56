"""Typed plan objects with versioned JSON: layouts, method settings, manifests (docs/design.md, "Plan objects").
The lowest layer of the package: it imports nothing of topi-export but errors."""
from topi_export.plan.layout import Layout, grid_text, parse_grid, parse_grids  # noqa: F401
from topi_export.plan.manifest import (  # noqa: F401
    FORMAT, NAME, FileEntry, GraphEntry, GraphTensor, Manifest, ModelIdentity, Profile, keep_count, profile_table)
from topi_export.plan.settings import MethodSettings  # noqa: F401
