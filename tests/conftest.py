import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# the verification cache of engine-file hashes (artifacts/hashcache.py) stays out of the user's home
os.environ.setdefault("TOPI_EXPORT_CACHE_DIR", tempfile.mkdtemp(prefix="topi-cache-"))
if not torch.cuda.is_available():
    # Triton reads this when it is first imported, which any test module may trigger: set it first
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the cores this process may use (taskset / a CI limit), not the machine's: more threads than cores stall torch
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
torch.set_num_threads(max(1, min(2, _CORES)))
warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session", autouse=True)
def owner_key_file(tmp_path_factory):
    """Ownership markers (topi_export/fsutil/ownership.py) are signed with a per-user key: tests use their own, never
    the user's ~/.config/topi-export/owner.key. Set first (autouse): session fixtures build marked directories."""
    path = tmp_path_factory.mktemp("owner-key") / "owner.key"
    old = os.environ.get("TOPI_EXPORT_KEY_FILE")
    os.environ["TOPI_EXPORT_KEY_FILE"] = str(path)  # subprocesses of tests inherit it
    yield path
    if old is None:
        os.environ.pop("TOPI_EXPORT_KEY_FILE", None)
    else:
        os.environ["TOPI_EXPORT_KEY_FILE"] = old


@pytest.fixture(scope="session")
def tiny():
    from topi_export.models import load_model

    return load_model("tiny-kontext")


@pytest.fixture(scope="session")
def tiny_settings(tiny):
    from topi_export.artifacts.settings import method_settings

    return method_settings(tiny.identity(), tiny.family.default_settings())


@pytest.fixture(scope="session")
def ort_engine_dir(tmp_path_factory):
    """One ONNX Runtime engine directory for tiny-kontext (8x8 target, 8x8 reference, 8 text tokens), with the
    dense baseline. Shared by the test modules: an export takes tens of seconds here."""
    from topi_export.builder import build_engines
    from topi_export.plan import Layout

    out = tmp_path_factory.mktemp("engines") / "tiny-ort"
    return build_engines(model="tiny-kontext", ratio_buckets="0.3,0.5", layouts=(Layout(8, (8, 8), ((8, 8),)),),
                         engine_dir=str(out), echo=lambda s: None)


def run_cli(args, capsys=None):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from topi_export.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    if capsys is not None:
        out, err = capsys.readouterr()
        return code, out, err
    return code, "", ""
