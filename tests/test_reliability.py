"""Reliability (issue 14): a careless user and an attacker against the CLI, on tiny-kontext.

Every case goes through the command line and expects a one-line ``error:`` (exit code 2, no traceback), or the
documented behaviour, and a file system unchanged outside the tool's own outputs (file names and sha256 before
and after). Engine directories are copies of the session's ONNX Runtime engines (``ort_engine_dir``). Builds
do not export again: ``export_graphs`` is replaced either by a copy of the session's real graphs (same model and
settings: the file-system side and the plumbing of a build, in seconds) or by a trap that fails the test when a
build starts its slow work although it should have refused first.

Cases marked xfail(strict) are bugs in files outside this module's reach; the reason names the fix.
"""
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import run_cli
from topi_export import fsutil
from topi_export.errors import TopiError

CALIBRATION = Path(__file__).resolve().parents[1] / "topi_export" / "calibration" / "tiny-kontext.json"


# --- helpers ----------------------------------------------------------------------------------------------------
def snapshot(*roots) -> dict:
    """Every entry under ``roots``: directories, links (with their target) and files (with their sha256)."""
    out = {}
    for root in map(Path, roots):
        for p in sorted([root, *root.rglob("*")]) if root.exists() else []:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(code, err, *needles) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line, the last one, naming every needle."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def cli(capsys, *args):
    """Run the CLI in-process: (exit code, stderr)."""
    code, _, err = run_cli([str(a) for a in args], capsys)
    return code, err


def copy_engines(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copyfile)  # real copies: the tests edit them
    return dst


def seal(data):
    """Recompute the manifest's digest after an edit: an attacker who edits the manifest recomputes it too, so the
    checks behind the digest must hold on their own."""
    from topi_export.plan.manifest import DIGEST, manifest_digest

    if isinstance(data, dict):
        data[DIGEST] = manifest_digest(data)
    return data


def edit_manifest(eng: Path, edit, reseal: bool = True) -> Path:
    data = json.loads((eng / "manifest.json").read_text())
    result = edit(data)
    result = data if result is None else result
    (eng / "manifest.json").write_text(result if isinstance(result, str) else json.dumps(
        seal(result) if reseal else result))
    return eng


def rehash(eng: Path) -> None:
    """Make the file table match the files again (an attacker who edits files edits their hashes too)."""
    from topi_export.artifacts.manifest import sha256_file

    data = json.loads((eng / "manifest.json").read_text())
    data["files"] = {p.relative_to(eng).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                     for p in sorted(eng.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (eng / "manifest.json").write_text(json.dumps(seal(data)))


def write_inputs(path: Path, grid=(8, 8), **tensors) -> Path:
    """A tiny-kontext inputs file (8 text tokens); keyword tensors replace or (None) drop the defaults."""
    g = torch.Generator().manual_seed(0)
    n = grid[0] * grid[1]
    data = {"reference_latents": torch.randn(1, n, 16, generator=g),
            "prompt_embeds": torch.randn(1, 8, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 16, generator=g), "noise": torch.randn(1, n, 16, generator=g)}
    data.update(tensors)
    grids = {"target_grid": f"{grid[0]}x{grid[1]}", "reference_grids": f"{grid[0]}x{grid[1]}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in data.items() if v is not None}, str(path), metadata=grids)
    return path


class SlowWorkStarted(Exception):
    """Raised by the trap in place of the ONNX export: the command did not refuse before the slow work."""


@pytest.fixture
def no_export(monkeypatch):
    import topi_export.export as export

    def trap(*args, **kwargs):
        raise SlowWorkStarted("the build started exporting")

    monkeypatch.setattr(export, "export_graphs", trap)


def _copy_graphs(source: Path, calls: list):
    """An export_graphs that copies the real graphs of engine directory ``source`` (same model and settings)."""
    from topi_export.artifacts.manifest import read_manifest

    m = read_manifest(source)

    def export_graphs(family, settings, inputs, layout, out_dir, *, dense=True, progress=None, ref_kv=None):
        assert ref_kv is None
        assert (settings.pivotal_layers, settings.prune_start) == (m.settings.pivotal_layers, m.settings.prune_start)
        calls.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        kinds = ["topi", "dense"] if dense else ["topi"]
        for name in [f"{k}.onnx" for k in kinds] + ["weights.data"]:
            shutil.copyfile(source / "onnx" / name, Path(out_dir) / name)
        graphs = {k: dataclasses.replace(m.graphs[k], file=f"{k}.onnx", onnx=f"{k}.onnx") for k in kinds}
        return graphs, {"file": "weights.data", "bytes": (Path(out_dir) / "weights.data").stat().st_size}

    return export_graphs


@pytest.fixture
def copied_export(monkeypatch, ort_engine_dir):
    import topi_export.export as export

    calls = []
    monkeypatch.setattr(export, "export_graphs", _copy_graphs(ort_engine_dir, calls))
    return calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny-kontext folder with one weight changed: another model than the built-in one."""
    from topi_export.models import build_builtin

    model = build_builtin("tiny-kontext")
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    path = tmp_path_factory.mktemp("models") / "my-model"
    model.save_pretrained(path, safe_serialization=True)
    return path


def _staging(parent: Path, final: str, tag: str, *, held: bool = False):
    """A staging directory as a run leaves it: its lock file, its final name, a half-written tree. ``held``: its
    lock is taken (a run still going); otherwise the lock is free, as after kill -9. Returns (dir, lock)."""
    from filelock import FileLock

    wrapper = parent / f".{final}.staging-{tag}"
    (wrapper / "new").mkdir(parents=True)
    (wrapper / "new" / "half-written.onnx").write_bytes(b"killed")
    (wrapper / fsutil.FINAL_FILE).write_text(final)
    lock = FileLock(str(wrapper / fsutil.LOCK_FILE), thread_local=False)
    lock.acquire(timeout=0)
    if not held:
        lock.release()
    return wrapper, lock


@pytest.fixture(scope="module")
def forced_build(ort_engine_dir, tmp_path_factory):
    """``build --force --tau 0.7 --onnx-dir CACHE`` over an existing engine directory, next to a user's folder,
    a staging directory of a killed build (kill -9) and one of a build still running. Export: the real graphs."""
    import contextlib
    import io

    import topi_export.export as export

    root = tmp_path_factory.mktemp("forced")
    eng = copy_engines(ort_engine_dir, root / "eng")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes")
    dead, _ = _staging(root, "eng", "killed00")
    live, lock = _staging(root, "eng", "running0", held=True)
    before = snapshot(root / "notes", live)
    calls = []
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        mp.setattr(export, "export_graphs", _copy_graphs(ort_engine_dir, calls))
        code = run_cli(["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--ratio-buckets", "0.3,0.5",
                        "--tau", "0.7", "--no-dense-baseline", "--engine-dir", str(eng), "--onnx-dir",
                        str(root / "cache"), "--force"])[0]
    lock.release()
    return {"root": root, "eng": eng, "cache": root / "cache", "code": code, "err": err.getvalue(), "calls": calls,
            "dead": dead, "live": live, "before": before}


# --- 1. --force deletes only what topi-export made ---------------------------------------------------------------
@pytest.mark.parametrize("where, needle", [
    ("model", "is the model folder"),
    ("model/sub", "is inside the model folder"),
    ("parent", "contains the model folder"),
    ("link-to-model", "is the model folder"),
])
def test_force_never_replaces_the_model_folder(model_dir, tmp_path, capsys, no_export, where, needle):
    link = tmp_path / "link-to-model"
    link.symlink_to(model_dir)
    out = {"model": model_dir, "model/sub": model_dir / "sub", "parent": model_dir.parent, "link-to-model": link}[where]
    before = snapshot(model_dir.parent, tmp_path)
    code, err = cli(capsys, "build", "--model", model_dir, "--target-grid", "4x4", "--engine-dir", out, "--force")
    refused(code, err, needle)
    assert snapshot(model_dir.parent, tmp_path) == before


@pytest.mark.parametrize("what", ["inputs", "calibration"])
def test_force_never_replaces_a_folder_holding_an_input(tmp_path, capsys, no_export, what):
    folder = tmp_path / "data"
    inputs = write_inputs(folder / "request.safetensors")
    cal = folder / "profile.json"
    shutil.copyfile(CALIBRATION, cal)
    args = ["--inputs", inputs] if what == "inputs" else ["--calibration", cal, "--target-grid", "8x8"]
    before = snapshot(tmp_path)
    code, err = cli(capsys, "build", "--model", "tiny-kontext", *args, "--engine-dir", folder, "--force")
    refused(code, err, f"contains the {what}")
    assert snapshot(tmp_path) == before


def test_force_never_replaces_user_files_cwd_or_home(tmp_path, capsys, no_export, monkeypatch):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.png").write_bytes(b"\x89PNG precious")
    home = tmp_path / "home"
    home.mkdir()
    before = snapshot(tmp_path)
    build = ["build", "--model", "tiny-kontext", "--target-grid", "4x4", "--force", "--engine-dir"]
    refused(*cli(capsys, *build, user), "not made by topi-export")
    monkeypatch.setenv("HOME", str(home))
    refused(*cli(capsys, *build, home), "your home directory")
    monkeypatch.chdir(user)
    refused(*cli(capsys, *build, "."), "the current directory")
    refused(*cli(capsys, *build, ".."), "contains")
    assert snapshot(tmp_path) == before


def test_triton_force_never_replaces_the_engine_directory_or_its_parent(ort_engine_dir, tmp_path, capsys):
    eng = copy_engines(ort_engine_dir, tmp_path / "engines" / "eng")
    before = snapshot(tmp_path)
    for out, needle in ((eng, "is the engine directory"), (eng.parent, "contains the engine directory"),
                        (eng / "onnx", "is inside the engine directory")):
        refused(*cli(capsys, "triton", "--engine-dir", eng, "--out", out, "--force"), needle)
    assert snapshot(tmp_path) == before


def test_triton_force_never_replaces_another_engine_directory(ort_engine_dir, tmp_path, capsys):
    other = copy_engines(ort_engine_dir, tmp_path / "other-build")
    before = snapshot(other)
    code, err = cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", other, "--force", "--kind", "cpu")
    assert snapshot(other) == before
    refused(code, err, "not made by topi-export")


@pytest.mark.parametrize("layout", ["same", "cache-inside", "engines-inside"])
def test_onnx_dir_and_engine_dir_must_not_overlap(tmp_path, capsys, no_export, layout):
    eng, cache = {"same": ("out", "out"), "cache-inside": ("out", "out/cache"),
                  "engines-inside": ("out/eng", "out")}[layout]
    code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "4x4", "--engine-dir",
                    tmp_path / eng, "--onnx-dir", tmp_path / cache)
    refused(code, err, "--onnx-dir", "--engine-dir")
    assert list(tmp_path.iterdir()) == []


def test_onnx_dir_never_replaces_the_model_folder(model_dir, tmp_path, capsys, no_export):
    before = snapshot(model_dir)
    code, err = cli(capsys, "build", "--model", model_dir, "--target-grid", "4x4", "--engine-dir", tmp_path / "e",
                    "--onnx-dir", model_dir)
    refused(code, err, "is the model folder")
    assert snapshot(model_dir) == before and list(tmp_path.iterdir()) == []


def test_timing_cache_never_overwrites_an_input(model_dir, tmp_path, capsys, no_export):
    pytest.importorskip("tensorrt_rtx", reason="--timing-cache is a TensorRT option; needs tensorrt-rtx")
    code, err = cli(capsys, "build", "--model", model_dir, "--target-grid", "4x4", "--engine-dir", tmp_path / "e",
                    "--backend", "tensorrt-rtx", "--timing-cache", model_dir / "config.json")
    refused(code, err, "--timing-cache", "model folder")


def test_backend_flags_of_another_backend_are_refused(model_dir, tmp_path, capsys, no_export):
    before = snapshot(tmp_path)
    for flag in (["--timing-cache", str(tmp_path / "t.cache")], ["--compute-capability", "SM89"],
                 ["--strip-weights"], ["--workspace", "4G"]):
        code, err = cli(capsys, "build", "--model", model_dir, "--target-grid", "4x4", "--engine-dir",
                        tmp_path / "e", *flag)
        refused(code, err, flag[0], "not onnxruntime")
    code, err = cli(capsys, "build", "--model", model_dir, "--target-grid", "4x4", "--engine-dir", tmp_path / "e",
                    "--backend", "tensorrt", "--compute-capability", "SM89")
    refused(code, err, "--compute-capability", "tensorrt-rtx")
    assert snapshot(tmp_path) == before


def test_force_replaces_a_tool_made_engine_directory_and_nothing_else(forced_build):
    b = forced_build
    assert b["code"] == 0, b["err"]
    assert len(b["calls"]) == 1  # one export (the real graphs, copied)
    from topi_export.artifacts.manifest import read_manifest

    m = read_manifest(b["eng"])
    assert m.tau == 0.7 and not m.has_graph("dense")
    assert snapshot(b["root"] / "notes", b["live"]) == b["before"]
    assert sorted(p.name for p in b["root"].iterdir()) == sorted(["eng", "cache", "notes", b["live"].name])


# --- 2. no check-then-act: what appears during the work is never replaced ----------------------------------------
def test_directory_created_during_a_build_is_kept(tmp_path, capsys, monkeypatch, ort_engine_dir):
    import topi_export.export as export

    out = tmp_path / "eng"
    copy = _copy_graphs(ort_engine_dir, [])

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("written by someone else during the build")
        return copy(*args, **kwargs)

    monkeypatch.setattr(export, "export_graphs", meanwhile)
    code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                    "--engine-dir", out)
    refused(code, err, "appeared while this command was running")
    assert snapshot(tmp_path) == {str(tmp_path): "dir", str(out): "dir", str(out / "theirs.txt"):
                                  hashlib.sha256(b"written by someone else during the build").hexdigest()}


def test_two_concurrent_builds_into_one_path_exactly_one_wins(tmp_path, capsys, monkeypatch, ort_engine_dir):
    """The second build runs to completion while the first is exporting: the second places its directory,
    the first finds the name taken and fails, and leaves the winner whole."""
    import topi_export.export as export

    out = tmp_path / "eng"
    copy = _copy_graphs(ort_engine_dir, [])
    inner = []

    def racing(*args, **kwargs):
        if not inner:
            inner.append("running")
            inner[0] = run_cli(["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                                "--engine-dir", str(out)])[0]
        return copy(*args, **kwargs)

    monkeypatch.setattr(export, "export_graphs", racing)
    code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                    "--engine-dir", out)
    assert inner == [0]
    refused(code, err, "appeared while this command was running")
    from topi_export.artifacts.manifest import read_manifest

    read_manifest(out)  # the winner, whole: every file matches its hash
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]


def test_repository_created_during_triton_is_kept(ort_engine_dir, tmp_path, capsys, monkeypatch):
    from topi_export.serving import triton_repo

    out = tmp_path / "repo"
    place = triton_repo._place_verified

    def meanwhile(*args):
        if not out.exists():
            out.mkdir()
            (out / "theirs.txt").write_text("someone else's")
        return place(*args)

    monkeypatch.setattr(triton_repo, "_place_verified", meanwhile)
    code, err = cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", out, "--kind", "cpu")
    refused(code, err, "appeared while this command was running")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


# --- 3. paths never leave the engine directory -------------------------------------------------------------------
@pytest.mark.parametrize("rel, needle", [
    ("/etc/shadow", "is an absolute path"),
    ("../outside.bin", "leaves the directory"),
    ("onnx/../../outside.bin", "leaves the directory"),
])
def test_manifest_naming_files_outside_is_refused(ort_engine_dir, tmp_path, capsys, rel, needle):
    (tmp_path / "outside.bin").write_bytes(b"secret")
    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    edit_manifest(eng, lambda d: d["files"].update({rel: d["files"]["onnx/topi.onnx"]}))
    before = snapshot(tmp_path)
    for cmd in (["run", "--steps", "1", "-q"], ["check"]):
        refused(*cli(capsys, *cmd, "--engine-dir", eng), needle)
    assert snapshot(tmp_path) == before


def test_errors_never_reveal_whether_an_outside_file_exists(ort_engine_dir, tmp_path, capsys):
    """An absolute name, a ../ name and a symbolic link, to a file that exists and to one that does not: the
    messages are the same, so an engine directory cannot be used to probe the machine."""
    (tmp_path / "exists.bin").write_bytes(b"secret")
    messages = {}
    for target in ("exists.bin", "missing.bin"):
        for form in ("absolute", "dotdot", "link"):
            eng = copy_engines(ort_engine_dir, tmp_path / f"eng-{target}-{form}")
            rel = {"absolute": str(tmp_path / target), "dotdot": f"../{target}", "link": "onnx/extra.bin"}[form]
            if form == "link":
                (eng / rel).symlink_to(tmp_path / target)
            edit_manifest(eng, lambda d: d["files"].update({rel: d["files"]["onnx/topi.onnx"]}))
            line = refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--steps", "1"))
            messages.setdefault(form, set()).add(line.replace(target, "X").replace(eng.name, "E"))
    assert all(len(lines) == 1 for lines in messages.values()), messages
    assert "symbolic link" in messages["link"].pop()


@pytest.mark.parametrize("location", ["../../outside.bin", "/etc/passwd"])
def test_external_data_outside_is_refused_by_run(ort_engine_dir, tmp_path, capsys, location):
    import onnx

    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    graph = onnx.load(str(eng / "onnx" / "topi.onnx"), load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(graph, str(eng / "onnx" / "topi.onnx"))
    rehash(eng)
    code, err = cli(capsys, "run", "--engine-dir", eng, "-q", "--steps", "1")
    refused(code, err, "external-data location", "absolute" if location.startswith("/") else "leaves the directory")


@pytest.mark.parametrize("what", ["onnx/weights.data", "onnx", "manifest.json"])
def test_symbolic_links_in_an_engine_directory_are_refused(ort_engine_dir, tmp_path, capsys, what):
    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    moved = tmp_path / "elsewhere"
    shutil.move(eng / what, moved)
    (eng / what).symlink_to(moved)
    before = snapshot(tmp_path)
    refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--steps", "1"), "symbolic link")
    refused(*cli(capsys, "triton", "--engine-dir", eng, "--out", tmp_path / "repo"), "symbolic link")
    assert snapshot(tmp_path) == before
    assert all(p.stat().st_nlink == 1 for p in moved.rglob("*") if p.is_file())  # nothing hard-linked


# --- 4. the --onnx-dir cache is reused only for the same model, settings and bytes --------------------------------
def test_onnx_cache_is_keyed_and_hashed(forced_build, model_dir, tmp_path, capsys, no_export):
    cache = forced_build["cache"]
    meta = json.loads((cache / "cache.json").read_text())
    assert sorted(meta["files"]) == ["topi.onnx", "weights.data"]
    work = shutil.copytree(cache, tmp_path / "cache", copy_function=shutil.copyfile)
    build = ["build", "--target-grid", "8x8", "--no-dense-baseline", "--onnx-dir", work]
    # another model (one weight differs): the cached graphs are not its graphs
    with pytest.raises(SlowWorkStarted):
        cli(capsys, *build, "--model", model_dir, "--engine-dir", tmp_path / "a")
    # other method settings (the pivotal layers are baked into the graph)
    profile = json.loads(CALIBRATION.read_text())
    profile["pivotal_layers"] = [3, 4]
    (tmp_path / "p.json").write_text(json.dumps(profile))
    with pytest.raises(SlowWorkStarted):
        cli(capsys, *build, "--model", "tiny-kontext", "--calibration", tmp_path / "p.json", "--engine-dir",
            tmp_path / "b")
    # the same model, but a cached file changed after it was written
    with open(work / "weights.data", "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 1]))
    before = snapshot(work)
    with pytest.raises(SlowWorkStarted):
        cli(capsys, *build, "--model", "tiny-kontext", "--engine-dir", tmp_path / "c")
    assert snapshot(work) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "p.json"]


def test_onnx_cache_file_names_stay_inside_the_cache(forced_build, tmp_path, capsys, no_export):
    work = shutil.copytree(forced_build["cache"], tmp_path / "cache", copy_function=shutil.copyfile)
    shutil.move(work / "topi.onnx", tmp_path / "outside.onnx")
    meta = json.loads((work / "cache.json").read_text())
    meta["files"]["../outside.onnx"] = meta["files"].pop("topi.onnx")
    (work / "cache.json").write_text(json.dumps(meta))
    build = ["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline", "--onnx-dir", work,
             "--engine-dir", tmp_path / "e"]
    refused(*cli(capsys, *build), "changed after topi-export wrote it (cache.json)")  # edited: never rewritten
    (work / fsutil.MARKER_FILE).unlink()
    fsutil.write_marker(work, fsutil.ONNX_CACHE)  # as if the tool had written it: the names are checked all the same
    try:
        code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                        "--onnx-dir", work, "--engine-dir", tmp_path / "e")
    except SlowWorkStarted:
        return  # the cache was judged invalid and the graphs exported again: fine
    refused(code, err, "leaves the directory")


# --- 5. edited manifests: one line, never a traceback, never a wrong run ------------------------------------------
def _swap_graph_files(d):
    g = d["graphs"]
    for key in ("file", "onnx"):
        g["topi"][key], g["dense"][key] = g["dense"][key], g["topi"][key]


def _no_buckets(d):
    d["buckets"] = []
    d["profiles"] = d["profiles"][:1]


def _layout(d, grid):
    d["layouts"][0]["target_grid"] = list(grid)
    d["layouts"][0]["reference_grids"] = [list(grid)]


MANIFEST_EDITS = {
    "json list": (lambda d: [d], "top level must be a JSON object"),
    "buckets string": (lambda d: d.update(buckets="x"), "'buckets' must be a list"),
    "buckets empty": (_no_buckets, "'buckets' is empty"),
    "negative text tokens": (lambda d: d["layouts"][0].update(text_tokens=-5), "'layouts[0].text_tokens' is -5"),
    "graph entries swapped": (lambda d: d["graphs"].update(topi=d["graphs"]["dense"], dense=d["graphs"]["topi"]),
                              "lacks 'keep_idx'"),
    "graph files swapped": (_swap_graph_files, "the graph's inputs are"),
    "input renamed": (lambda d: d["graphs"]["topi"]["inputs"][5].update(name="text"), "the graph's inputs are"),
    "input dtype": (lambda d: d["graphs"]["topi"]["inputs"][0].update(dtype="int32"), "float32 in the graph"),
    "input channels": (lambda d: d["graphs"]["topi"]["inputs"][0].update(dims=["B", "Nx", 32]), "has dims"),
    "in_channels": (lambda d: d["model"]["config"].update(in_channels=32), "'model.config' does not match"),
    "batch 2, distilled": (lambda d: d.update(batch=2), "'batch' is 2"),
    "guidance": (lambda d: d.update(guidance="none"), "guidance mode 'none'"),
    "weights file list": (lambda d: d["weights"].update(file=["onnx/weights.data"]), "'weights.file' must be a str"),
    "tau 5": (lambda d: d.update(tau=5), "'tau' is 5.0"),
    "num_layers -1": (lambda d: d["model"].update(num_layers=-1), "'model.num_layers' is -1"),
    "fractional grid": (lambda d: d["layouts"][0].update(reference_grids=[[8, 8.5]]), "must be an integer"),
    "deep nesting": (lambda d: '{"format": "topi-engines/2", "x": ' + "[" * 100000 + "]" * 100000 + "}",
                     "not valid JSON"),
    "old format": (lambda d: d.update(format="topi-engines/1"), "rebuild"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_edited_manifest_is_one_line_error(ort_engine_dir, tmp_path, capsys, case):
    """Edits whose digest was recomputed: the checks behind the digest refuse them on their own."""
    edit, needle = MANIFEST_EDITS[case]
    eng = edit_manifest(copy_engines(ort_engine_dir, tmp_path / "eng"), edit)
    before = snapshot(tmp_path)
    refused(*cli(capsys, "run", "--engine-dir", eng, "--steps", "1", "-q"), needle)
    assert snapshot(tmp_path) == before


def _files_of_another_build(d):
    d["files"]["onnx/topi.onnx"] = {"sha256": "0" * 64, "bytes": d["files"]["onnx/topi.onnx"]["bytes"]}


# Edits that keep every type valid; the digest binds every field, so each is refused as an edit.
BOUND_EDITS = {
    "layout 8x8 -> 4x16": lambda d: _layout(d, (4, 16)),
    "pivotal layers": lambda d: d["calibration"].update(pivotal_layers=[3, 4]),
    "guidance": lambda d: d.update(guidance="none"),
    "scheduler": lambda d: d.update(scheduler={"num_train_timesteps": 1000, "shift": 9.0}),
    "policy": lambda d: d.update(policy="random"),
    "tau": lambda d: d.update(tau=0.9),
    "backend": lambda d: d.update(backend="torch"),
    "precision": lambda d: d.update(precision="bf16"),
    "model source": lambda d: d["model"].update(source="/somewhere/else"),
    "file table of another build": _files_of_another_build,
    "digest deleted": lambda d: d.pop("manifest_sha256") and None,
    "unknown field": lambda d: d.update(extra_field=1),
}


@pytest.mark.parametrize("case", list(BOUND_EDITS))
def test_manifest_is_bound_whole(ort_engine_dir, tmp_path, capsys, case):
    eng = edit_manifest(copy_engines(ort_engine_dir, tmp_path / "eng"), BOUND_EDITS[case], reseal=False)
    before = snapshot(tmp_path)
    needle = "is missing" if case == "digest deleted" else "manifest_sha256"
    refused(*cli(capsys, "run", "--engine-dir", eng, "--steps", "1", "-q"), needle)
    assert snapshot(tmp_path) == before


def test_edited_layout_is_refused_by_every_reader(ort_engine_dir, tmp_path, capsys):
    eng = edit_manifest(copy_engines(ort_engine_dir, tmp_path / "eng"), lambda d: _layout(d, (4, 16)), reseal=False)
    before = snapshot(tmp_path)
    refused(*cli(capsys, "check", "--engine-dir", eng), "manifest_sha256")
    refused(*cli(capsys, "triton", "--engine-dir", eng, "--out", tmp_path / "repo"), "manifest_sha256")
    assert snapshot(tmp_path) == before


def test_manifest_round_trip_keeps_the_digest(ort_engine_dir):
    from topi_export.plan import Manifest
    from topi_export.plan.manifest import manifest_digest

    raw = json.loads((ort_engine_dir / "manifest.json").read_text())
    m = Manifest.from_json(raw, "manifest.json", ort_engine_dir)
    assert m.to_json()["manifest_sha256"] == raw["manifest_sha256"] == manifest_digest(raw)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json())), "manifest.json", ort_engine_dir) == m


# --- 6. calibration profiles -------------------------------------------------------------------------------------
def _profile(**changes):
    data = json.loads(CALIBRATION.read_text())
    data.update(changes)
    return data


PROFILES = {
    "no pivotal layers": (_profile(pivotal_layers=[]), "'pivotal_layers' is empty"),
    "string layer": (_profile(pivotal_layers=["2"]), "'pivotal_layers[0]' must be an integer"),
    "fractional layers": (_profile(pivotal_layers=[0.5, 1.7]), "'pivotal_layers[0]' must be an integer, not 0.5"),
    "layer out of range": (_profile(pivotal_layers=[0, 6]), "'pivotal_layers[1]' is 6"),
    "interval 'ten'": (_profile(update_interval="ten"), "'update_interval' must be an integer"),
    "null model": (_profile(model=None), "model must be a JSON object"),
    "list": ([_profile()], "top level must be a JSON object"),
    "other depth": (_profile(model={**_profile()["model"], "num_layers": 7}), "7-layer model"),
}


@pytest.mark.parametrize("case", list(PROFILES))
def test_bad_calibration_profile_is_refused_before_any_work(tmp_path, capsys, no_export, case):
    data, needle = PROFILES[case]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    before = snapshot(tmp_path)
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "4x4", "--calibration", path,
                 "--engine-dir", tmp_path / "e"), needle)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--steps", "1", "-q", "--calibration", path), needle)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["deep nesting", "huge file", "device"])
def test_calibration_profile_that_is_not_a_profile_file(tmp_path, capsys, case):
    path = tmp_path / "profile.json"
    if case == "deep nesting":
        path.write_text("[" * 100000 + "]" * 100000)
    elif case == "huge file":
        with open(path, "wb") as f:
            f.truncate(64 << 20)  # sparse: no disk used
    else:
        path = Path(os.devnull)
    needle = "not valid JSON" if case == "deep nesting" else "not a regular JSON file"
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--steps", "1", "-q", "--calibration", path), needle)


# --- 7. bad values and unwritable outputs: refused before the work -----------------------------------------------
@pytest.fixture
def no_generation(monkeypatch):
    """Fails the test if the denoising loop starts."""
    import topi_export.runtime.loop as loop

    def trap(*args, **kwargs):
        raise SlowWorkStarted("the generation started")

    monkeypatch.setattr(loop, "denoise", trap)


@pytest.mark.parametrize("args, needle", [
    (["--steps", "0"], "'--steps'"),
    (["--steps", "-1"], "'--steps'"),
    (["--steps", "1001"], "'--steps'"),
    (["--seed", str(2 ** 70)], "'--seed'"),
    (["--seed", "-1"], "'--seed'"),
    (["--update-interval", "0"], "'--update-interval'"),
    (["--tau", "nan"], "--tau is nan"),
    (["--tau", "0"], "--tau is 0"),
    (["--ratio", "nan"], "ratio nan"),
    (["--tau", "0.5", "--ratio-buckets", "0.3,0.301"], "both keep 45 of 64"),
])
def test_bad_run_values(capsys, no_generation, args, needle):
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", *args), needle)


@pytest.mark.parametrize("tau", ["0", "-0.1", "nan", "inf"])
def test_bad_build_tau(tmp_path, capsys, no_export, tau):
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--tau", tau, "--engine-dir", tmp_path / "e"),
            "--tau")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_run_output_under_a_file_is_refused_before_generating(tmp_path, capsys, no_generation, flag):
    (tmp_path / "file").write_text("x")
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", flag, tmp_path / "file" / "out"),
            "is not a directory")


def test_build_and_triton_output_under_a_file_are_refused(ort_engine_dir, tmp_path, capsys, no_export):
    (tmp_path / "file").write_text("x")
    before = snapshot(tmp_path)
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--engine-dir", tmp_path / "file" / "e"),
            "is not a directory")
    refused(*cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", tmp_path / "file" / "r"),
            "is not a directory")
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_generating(tmp_path, capsys, no_generation):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", "--json", ro / "r.json"),
                "no write permission")
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("case, tensors, needle", [
    ("zero reference tokens", {"reference_latents": torch.zeros(1, 0, 16)}, "has no tokens"),
    ("int32 latents", {"reference_latents": torch.zeros(1, 64, 16, dtype=torch.int32)}, "expected a float tensor"),
    ("bool noise", {"noise": torch.zeros(1, 64, 16, dtype=torch.bool)}, "expected a float tensor"),
    ("too many text tokens", {"prompt_embeds": torch.zeros(1, 140000, 32)}, "above the limit"),
])
def test_bad_inputs_file_with_compare(tmp_path, capsys, no_generation, case, tensors, needle):
    path = write_inputs(tmp_path / "in.safetensors", **tensors)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", "--compare", "--inputs", path), needle)


# --- 8. silently accepted settings ------------------------------------------------------------------------------
def test_build_tau_is_the_default_of_run(forced_build, tmp_path, capsys):
    eng = forced_build["eng"]
    code, err = cli(capsys, "run", "--engine-dir", eng, "--steps", "3", "-q", "--json", tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["selection"]["tau"] == 0.7 and report["selection"]["buckets"] == [0.3, 0.5]
    assert {s["keep"] for s in report["schedule"]} <= {32, 45, 64}
    code, err = cli(capsys, "run", "--engine-dir", eng, "--steps", "2", "-q", "--ratio", "0.5", "--json",
                    tmp_path / "r.json")
    assert code == 0, err
    selection = json.loads((tmp_path / "r.json").read_text())["selection"]
    assert selection["tau"] is None and selection["ratio"] == 0.5


def test_triton_loop_request_steps_are_bounded():
    from topi_export.serving.triton_engine import request_options

    with pytest.raises(TopiError, match="outside 1..1000"):
        request_options({"steps": np.array([2 ** 31 - 1], dtype=np.int32)})
    with pytest.raises(TopiError, match="send an integer"):
        request_options({"steps": np.array([2.5], dtype=np.float32)})
    assert request_options({"steps": np.array([1000], dtype=np.int32)}).steps == 1000


def test_config_with_negative_layers_is_refused(model_dir, tmp_path, capsys):
    folder = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = -1
    (folder / "config.json").write_text(json.dumps(config))
    refused(*cli(capsys, "run", "--model", folder, "--steps", "1", "-q"), "'num_layers' is -1")


def test_outputs_never_overwrite_what_the_run_reads(ort_engine_dir, tmp_path, capsys, no_generation):
    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    inputs = write_inputs(tmp_path / "in.safetensors")
    before = snapshot(tmp_path)
    refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--json", eng / "manifest.json"), "would overwrite")
    refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--out", eng / "onnx" / "weights.data"), "would overwrite")
    refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--inputs", inputs, "--out", inputs),
            "would overwrite")
    os.link(inputs, tmp_path / "alias.safetensors")  # the same file by another name
    before[str(tmp_path / "alias.safetensors")] = before[str(inputs)]
    refused(*cli(capsys, "run", "--engine-dir", eng, "-q", "--inputs", inputs, "--json",
                 tmp_path / "alias.safetensors"), "would overwrite")
    assert snapshot(tmp_path) == before


def test_bench_outputs_never_overwrite_the_engine_directory(ort_engine_dir, tmp_path, capsys):
    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    before = snapshot(eng)
    code, err = cli(capsys, "bench", "--model", "tiny-kontext", "--backend", "onnxruntime", "--engine-dir", eng,
                    "--json", eng / "manifest.json", "--steps", "2", "--policies", "topi", "--no-default-policy",
                    "--ratio-buckets", "0.5", "--target-grid", "8x8", "-q")
    assert snapshot(eng) == before
    refused(code, err, "is inside")


def test_bench_refuses_engines_of_another_model(ort_engine_dir, tmp_path, capsys):
    code, err = cli(capsys, "bench", "--model", "kontext-digits", "--backend", "onnxruntime", "--engine-dir",
                    ort_engine_dir, "--json", tmp_path / "b.json", "--steps", "2", "--policies", "topi",
                    "--no-default-policy", "--ratio-buckets", "0.5", "--samples", "1", "-q")
    refused(code, err, "another model")


# --- 9. staging directories of killed runs ------------------------------------------------------------------------
def test_stale_staging_of_a_killed_build_is_removed_and_a_running_one_kept(forced_build):
    b = forced_build
    assert b["code"] == 0, b["err"]
    assert not b["dead"].exists() and b["live"].is_dir()
    assert f"removed stale staging directory {b['dead']}" in b["err"]


def test_stale_staging_next_to_a_repository_is_removed_by_triton(ort_engine_dir, tmp_path, capsys):
    _staging(tmp_path, "repo", "killed00")
    other, _ = _staging(tmp_path, "other", "killed00")  # another output's: not this command's business
    code, err = cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", tmp_path / "repo", "--kind", "cpu")
    assert code == 0, err
    assert "removed stale staging directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["repo", other.name])


# --- helpers of the fixes ------------------------------------------------------------------------------------------
def test_check_disjoint_and_is_triton_repository(ort_engine_dir, tmp_path):
    with pytest.raises(TopiError, match="are the same directory"):
        fsutil.check_disjoint({tmp_path / "a": "--engine-dir", tmp_path / "x" / ".." / "a": "--onnx-dir"})
    with pytest.raises(TopiError, match="--onnx-dir .* is inside --engine-dir"):
        fsutil.check_disjoint({tmp_path / "a": "--engine-dir", tmp_path / "a" / "c": "--onnx-dir"})
    fsutil.check_disjoint({tmp_path / "a": "--engine-dir", tmp_path / "ab": "--onnx-dir", None: "--timing-cache"})
    repo = tmp_path / "repo"
    repo.mkdir()
    assert fsutil.is_triton_repository(repo)  # empty
    (repo / "README.md").write_text("# Triton model repository (generated by topi-export triton)\n")
    assert not fsutil.is_triton_repository(repo)  # a README anyone can write proves nothing (issue: git clones)
    fsutil.write_marker(repo, fsutil.TRITON_REPOSITORY)
    assert fsutil.is_triton_repository(repo)  # what `topi-export triton` leaves: the marker, written last
    assert not fsutil.is_triton_repository(ort_engine_dir) and fsutil.is_engine_directory(ort_engine_dir)
    (repo / "README.md").write_text("# my models\n")
    assert not fsutil.is_triton_repository(repo)  # changed after the tool wrote it


# --- 10. hardening, second pass (docs/reliability.md) ------------------------------------------------------------
def snap(*roots) -> dict:
    """Every entry under ``roots`` by lstat: type, link target, and the sha256 of regular files (their size when
    large, e.g. a sparse 6 GiB file): a FIFO, a device node or a socket counts too."""
    import stat

    out = {}
    for root in map(Path, roots):
        for p in sorted([root, *root.rglob("*")]) if os.path.lexists(root) else []:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < (64 << 20) else st.st_size
            else:
                out[str(p)] = stat.S_IFMT(st.st_mode)
    return out


@pytest.fixture
def alarm():
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer comes."""
    import signal

    def hung(*_):
        raise TimeoutError("hung: a FIFO was opened or a device read without bound")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _char_device(path: Path) -> Path:
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null's node
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a small tmpfs, to run out of space for real (skips where mounting is not allowed)."""
    import subprocess

    mounted = []

    def mount(size):
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _git_clone(tmp_path: Path, dst: Path) -> Path:
    """``git clone`` of a repository whose README's first line names topi-export (as this project's does)."""
    import subprocess

    src = tmp_path / "upstream"
    (src / "topi_export").mkdir(parents=True)
    (src / "README.md").write_text("# topi-export\n\nA deployment compiler.\n")
    (src / "topi_export" / "fsutil.py").write_text("# the source\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        if subprocess.run(cmd, cwd=src, env=env, capture_output=True).returncode:
            pytest.skip("git is not usable here")
    subprocess.run(["git", "clone", "-q", str(src), str(dst)], check=True, capture_output=True)
    shutil.rmtree(src)
    return dst


def _restamp(directory: Path, kind: str, key_file: Path, monkeypatch) -> None:
    """Mark ``directory`` as made under another key (another user's output, copied here)."""
    (directory / fsutil.MARKER_FILE).unlink()
    with monkeypatch.context() as mp:
        mp.setenv(fsutil.KEY_ENV, str(key_file))
        fsutil.write_marker(directory, kind)


# 10.1 triton --force deletes only what it made
@pytest.mark.parametrize("case", ["git clone", "notes folder", "README and data"])
def test_triton_force_never_replaces_a_lookalike(ort_engine_dir, tmp_path, capsys, case):
    out = tmp_path / "v"
    if case == "git clone":
        _git_clone(tmp_path, out)
    else:
        out.mkdir()
        first = "# My topi-export experiments\n" if case == "notes folder" else (
            "# Triton model repository (generated by topi-export triton)\n")
        (out / "README.md").write_text(first)
        (out / "results.csv").write_text("precious")
    before = snap(tmp_path)
    refused(*cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", out, "--force"),
            "was not made by topi-export (it has no ownership marker", "--force does not replace it")
    assert snap(tmp_path) == before


def test_triton_force_refuses_a_repository_the_user_added_a_model_to(ort_engine_dir, tmp_path, capsys):
    pytest.importorskip("tritonclient.grpc.model_config_pb2")
    out = tmp_path / "repo"
    assert cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", out, "--kind", "cpu")[0] == 0
    assert fsutil.marker_problem(out, fsutil.TRITON_REPOSITORY) is None
    (out / "my_model" / "1").mkdir(parents=True)
    (out / "my_model" / "1" / "model.onnx").write_bytes(b"the user's own model")
    (out / "my_model" / "config.pbtxt").write_text('name: "my_model"\n')
    before = snap(tmp_path)
    refused(*cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", out, "--force", "--kind", "cpu"),
            "holds entries topi-export did not write (my_model)", "move them out of it")
    assert snap(tmp_path) == before
    shutil.move(out / "my_model", tmp_path / "my_model")
    code, err = cli(capsys, "triton", "--engine-dir", ort_engine_dir, "--out", out, "--force", "--kind", "cpu")
    assert code == 0, err
    assert fsutil.marker_problem(out, fsutil.TRITON_REPOSITORY) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my_model", "repo"]


# 10.2 build --force and --onnx-dir trust the marker, never a manifest.json / cache.json
@pytest.mark.parametrize("case, needle", [
    ("manifest link", "no ownership marker"), ("manifest fifo", "no ownership marker"),
    ("manifest -> /dev/zero", "no ownership marker"), ("6 GiB sparse manifest", "no ownership marker"),
    ("copied from another user", "does not verify with your key"),
    ("user file added", "holds entries topi-export did not write (notes.txt)"),
    ("triton repository", "as an engine directory (it is a Triton model repository)"),
])
def test_build_force_trusts_only_the_ownership_marker(ort_engine_dir, tmp_path, capsys, no_export, alarm,
                                                      monkeypatch, case, needle):
    out = tmp_path / "out"
    if case in ("copied from another user", "user file added"):
        copy_engines(ort_engine_dir, out)
        if case == "user file added":
            (out / "notes.txt").write_text("my notes")
        else:
            _restamp(out, fsutil.ENGINE_DIR, tmp_path / "other-user.key", monkeypatch)
    elif case == "triton repository":
        out.mkdir()
        (out / "README.md").write_text("# generated\n")
        fsutil.write_marker(out, fsutil.TRITON_REPOSITORY)
    else:
        out.mkdir()
        (out / "photo.png").write_bytes(b"precious")
        manifest = out / "manifest.json"
        if case == "manifest link":
            shutil.copyfile(ort_engine_dir / "manifest.json", tmp_path / "real-manifest.json")
            manifest.symlink_to(tmp_path / "real-manifest.json")
        elif case == "manifest fifo":
            os.mkfifo(manifest)
        elif case == "manifest -> /dev/zero":
            manifest.symlink_to("/dev/zero")
        else:
            with open(manifest, "wb") as f:
                f.truncate(6 << 30)
    before, peak = snap(tmp_path), _peak_rss_mb()
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--engine-dir", out, "--force"),
            needle, "--force does not replace it")
    assert snap(tmp_path) == before
    assert _peak_rss_mb() - peak < 512  # the manifest was never read (a 6 GiB file or /dev/zero would show)


@pytest.mark.parametrize("case", ["cache.json -> /dev/zero", "cache.json fifo", "hand-made cache"])
def test_onnx_dir_is_rewritten_only_when_marked(tmp_path, capsys, no_export, alarm, case):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "topi.onnx").write_bytes(b"the user's graph")
    if case == "cache.json -> /dev/zero":
        (cache / "cache.json").symlink_to("/dev/zero")
    elif case == "cache.json fifo":
        os.mkfifo(cache / "cache.json")
    else:
        (cache / "cache.json").write_text(json.dumps({"format": "topi-onnx-cache/1", "key": "x", "files": {}}))
    before, peak = snap(tmp_path), _peak_rss_mb()
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--engine-dir", tmp_path / "e",
                 "--onnx-dir", cache), "was not made by topi-export", "this build does not rewrite it as its cache")
    assert snap(tmp_path) == before and _peak_rss_mb() - peak < 512


def test_two_overlapping_forced_builds_never_both_report_success(ort_engine_dir, tmp_path, capsys, monkeypatch):
    """Issue: "concurrent --force builds both report success although one result replaced the other". A second
    build --force of the same path runs to completion while the first loads its model: the second places its
    result; the first then finds a tree it never saw and refuses, keeping the second's result whole."""
    import topi_export.models as models

    out = copy_engines(ort_engine_dir, tmp_path / "eng")
    real_load = models.load_model
    inner = []

    def load_model(*args, **kwargs):
        if not inner:
            inner.append("running")
            inner[0] = run_cli(["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                                "--tau", "0.6", "--engine-dir", str(out), "--force"])[0]
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(__import__("topi_export.export", fromlist=["x"]), "export_graphs",
                        _copy_graphs(ort_engine_dir, []))
    code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                    "--engine-dir", out, "--force")
    assert inner == [0]
    refused(code, err, "was replaced by another run while this command was running", "this output was discarded")
    from topi_export.artifacts.manifest import read_manifest

    assert read_manifest(out).tau == 0.6  # the second build's result, whole (every file re-hashed)
    assert fsutil.marker_problem(out, fsutil.ENGINE_DIR) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


# 10.3 outputs never replace special files; two outputs never share a file
@pytest.mark.parametrize("flag", ["--json", "--out", "--png"])
@pytest.mark.parametrize("case", ["device copy", "/dev/null", "fifo", "link to a file", "socket"])
def test_run_outputs_never_replace_special_files(tmp_path, capsys, no_generation, alarm, flag, case):
    import socket
    import stat

    target = tmp_path / "out.bin"
    if case == "device copy":
        _char_device(target)
    elif case == "/dev/null":
        target = Path(os.devnull)
    elif case == "fifo":
        os.mkfifo(target)
    elif case == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    else:
        (tmp_path / "mine.txt").write_text("keep")
        target.symlink_to(tmp_path / "mine.txt")
    before, null = snap(tmp_path), os.lstat(os.devnull)
    args = ["run", "--model", "tiny-kontext", "-q", flag, target] + (["--compare"] if flag == "--png" else [])
    refused(*cli(capsys, *args), "outputs are written as regular files and never replace or follow")
    assert snap(tmp_path) == before
    assert stat.S_ISCHR(os.lstat(os.devnull).st_mode) and os.lstat(os.devnull).st_ino == null.st_ino


@pytest.mark.parametrize("a, b", [("--json", "--out"), ("--out", "--png"), ("--json", "--png")])
@pytest.mark.parametrize("spelling", ["same", "dot-dot", "hard link"])
def test_two_outputs_of_run_on_one_file_are_refused(tmp_path, capsys, no_generation, monkeypatch, a, b, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    first, second = "r.bin", {"same": "r.bin", "dot-dot": "sub/../r.bin", "hard link": "alias.bin"}[spelling]
    if spelling == "hard link":
        (tmp_path / "r.bin").write_bytes(b"old report")
        os.link(tmp_path / "r.bin", tmp_path / "alias.bin")
    before = snap(tmp_path)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", "--compare", a, first, b, second),
            "are the same file: give each output its own path")
    assert snap(tmp_path) == before


def test_two_outputs_of_bench_and_calibrate_are_checked(tmp_path, capsys, no_generation):
    before = snap(tmp_path)
    refused(*cli(capsys, "bench", "--model", "tiny-kontext", "--json", tmp_path / "b.json", "--png",
                 tmp_path / "b.json", "-q"), "are the same file")
    os.mkfifo(tmp_path / "profile.json")
    before = snap(tmp_path)
    refused(*cli(capsys, "calibrate", "--model", "tiny-kontext", "--out", tmp_path / "profile.json"), "is a FIFO")
    assert snap(tmp_path) == before


# 10.4 names, special file systems, no space: one line, before the work where it can be known
CJK86 = "\u6f22" * 86  # 258 bytes: a valid-looking name the file system refuses


@pytest.mark.parametrize("cmd", ["run --json", "build --engine-dir", "triton --out", "calibrate --out",
                                 "bench --json"])
@pytest.mark.parametrize("where", ["long name", "under /proc"])
def test_unwritable_output_paths_are_refused_before_any_work(ort_engine_dir, tmp_path, capsys, no_export,
                                                             no_generation, cmd, where):
    name = {"long name": str(tmp_path / (CJK86 + ".json")), "under /proc": "/proc/topi-out.json"}[where]
    args = {"run --json": ["run", "--model", "tiny-kontext", "-q", "--json", name],
            "build --engine-dir": ["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--engine-dir", name],
            "triton --out": ["triton", "--engine-dir", ort_engine_dir, "--out", name],
            "calibrate --out": ["calibrate", "--model", "tiny-kontext", "--out", name],
            "bench --json": ["bench", "--model", "tiny-kontext", "--json", name, "-q"]}[cmd]
    needle = "more than the 255 bytes a file name may have" if where == "long name" else (
        "does not accept new files" if os.access("/proc", os.W_OK) else "no write permission")  # root: the probe
    refused(*cli(capsys, *args), needle)
    assert list(tmp_path.iterdir()) == []


def test_a_long_cjk_engine_directory_name_builds_and_runs(tmp_path, capsys, copied_export):
    eng = tmp_path / ("\u6f22" * 80)  # 240 bytes: valid; its staging name is cut in bytes to fit
    code, err = cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                    "--engine-dir", eng)
    assert code == 0, err
    assert fsutil.marker_problem(eng, fsutil.ENGINE_DIR) is None
    code, err = cli(capsys, "run", "--engine-dir", eng, "--steps", "1", "-q", "--json", tmp_path / (eng.name + ".json"))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([eng.name, eng.name + ".json"])


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, copied_export, tmpfs):
    small = tmpfs("1m")  # the graphs and weights need about 2 MB
    refused(*cli(capsys, "build", "--model", "tiny-kontext", "--target-grid", "8x8", "--no-dense-baseline",
                 "--engine-dir", small / "eng"), "no space left on the device", "the partial output was removed")
    assert list(small.iterdir()) == []
    with open(small / "filler", "wb") as f:  # fill it to the last byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    before = snap(small)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--steps", "1", "-q", "--json", small / "r.json"),
            "cannot write", "no space left on the device", "nothing was written there")
    assert snap(small) == before


# 10.5 every small JSON the tool reads is read bounded, and fails in one line
JSON_CASES = {
    "5000-digit number": (lambda p: p.write_text('{"schema": ' + "7" * 5000 + "}"),
                          "not valid JSON (a number with too many digits)"),
    "latin-1": (lambda p: p.write_bytes('{"model": "café"}'.encode("latin-1")), "not valid JSON (not UTF-8 text"),
    "fifo": (lambda p: os.mkfifo(p), "not a regular JSON file of at most 16 MB (a FIFO)"),
    "-> /dev/zero": (lambda p: p.symlink_to("/dev/zero"), "(a character device)"),
    "deep nesting": (lambda p: p.write_text("[" * 100000 + "]" * 100000), "not valid JSON (nested too deeply)"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_calibration_profile_read_bounded(tmp_path, capsys, no_generation, alarm, case):
    make, needle = JSON_CASES[case]
    make(tmp_path / "profile.json")
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "-q", "--calibration", tmp_path / "profile.json"),
            "calibration profile", needle)


@pytest.mark.parametrize("which", ["config.json", "scheduler/scheduler_config.json"])
@pytest.mark.parametrize("case", list(JSON_CASES))
def test_model_and_scheduler_configs_read_bounded(model_dir, tmp_path, capsys, no_generation, alarm, which, case):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(model_dir, pipeline / "transformer")
    (pipeline / "scheduler").mkdir()
    (pipeline / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "X", "shift": 1.0}))
    target = pipeline / ("transformer/config.json" if which == "config.json" else which)
    target.unlink()
    make, needle = JSON_CASES[case]
    make(target)
    before = snap(tmp_path)
    what = "model config" if which == "config.json" else "scheduler config"
    refused(*cli(capsys, "run", "--model", pipeline, "--steps", "1", "-q"), what, needle)
    assert snap(tmp_path) == before


def test_manifest_with_a_5000_digit_number_is_one_line(ort_engine_dir, tmp_path, capsys):
    eng = edit_manifest(copy_engines(ort_engine_dir, tmp_path / "eng"),
                        lambda d: json.dumps(d).replace('"batch": 1', '"batch": 1' + "0" * 5000))
    refused(*cli(capsys, "run", "--engine-dir", eng, "--steps", "1", "-q"), "manifest",
            "not valid JSON (a number with too many digits)")


def test_the_main_job_can_run_twice(tmp_path, capsys, copied_export):
    """README's main job: build --force, then run --png INTO the engine directory; run again, the second build
    --force must replace the directory (the PNG was written by topi-export), and a user's file still blocks it."""
    eng = tmp_path / "engines" / "default"
    build = ["build", "--model", "tiny-kontext", "--target-grid", "8x8", "--ratio-buckets", "0.3,0.5",
             "--engine-dir", eng, "--force"]
    for _ in range(2):
        code, err = cli(capsys, *build)
        assert code == 0, err
        code, err = cli(capsys, "run", "--engine-dir", eng, "--steps", "2", "--repeats", "1", "-q", "--compare",
                        "--png", eng / "demo.png")
        assert code == 0, err
        assert (eng / "demo.png").is_file() and fsutil.marker_problem(eng, fsutil.ENGINE_DIR) is None
    (eng / "my-notes.txt").write_text("mine")
    before = snap(tmp_path)
    refused(*cli(capsys, *build), "holds entries topi-export did not write (my-notes.txt)")
    assert snap(tmp_path) == before


# --- limits checked before the memory is spent; flags that would be accepted and ignored ---------------------------
def test_oversized_inputs_are_refused_from_the_header(tmp_path, capsys):
    path = tmp_path / "big.safetensors"
    write_inputs(path, reference_latents=torch.zeros(1, 200_000, 1))  # more tokens than a request holds
    before = snapshot(tmp_path)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--inputs", path, "--steps", "1", "-q"),
            "'reference_latents'", "[1, 200000, 1]", "more than a request can hold")
    assert snapshot(tmp_path) == before


def test_inputs_that_are_not_regular_files_are_named_so(tmp_path, capsys):
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--inputs", fifo, "--steps", "1", "-q"),
            "is not a regular file")
    refused(*cli(capsys, "run", "--model", "tiny-kontext", "--inputs", tmp_path, "--steps", "1", "-q"),
            "is a directory")


@pytest.mark.parametrize("args, needle", [
    (["--samples", "100000000"], "--samples"),
    (["--text-tokens", "5000"], "--text-tokens"),
])
def test_calibrate_bounds_what_it_allocates(tmp_path, capsys, args, needle):
    refused(*cli(capsys, "calibrate", "--model", "tiny-kontext", "--out", tmp_path / "p.json", *args), needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (["--ratio-buckets", "0.001,0.5"], "prunes nothing"),
    (["--references", "3"], "--references"),
    (["--engine-dir", ""], "--engine-dir is empty"),
])
def test_build_flags_that_would_be_ignored_are_refused(tmp_path, capsys, no_export, args, needle):
    base = ["build", "--model", "tiny-kontext", "--target-grid", "8x8"]
    if "--engine-dir" not in args:
        base += ["--engine-dir", str(tmp_path / "e")]
    before = snapshot(tmp_path)
    refused(*cli(capsys, *base, *args), needle)
    assert snapshot(tmp_path) == before


def test_bench_never_suggests_a_flag_it_does_not_have(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    code, err = cli(capsys, "bench", "--model", "tiny-kontext", "--backend", "onnxruntime", "--engine-dir",
                    tmp_path / "notes", "--steps", "2", "--json", tmp_path / "b.json", "-q")
    line = refused(code, err, "is not an engine directory")
    assert "--force" not in line


def test_dropin_calls_that_are_not_the_pipelines_are_one_line_errors():
    from topi_export import TopiTransformer
    from topi_export.errors import BadInput

    tr = TopiTransformer(model="tiny-kontext", ratio=0.5)
    data = tr.family.synthetic_inputs(__import__("topi_export").Layout(8, (4, 4), ((4, 4),)), 0)
    from topi_export.models.flux_kontext import kontext_ids

    txt, img = kontext_ids(data.layout)
    call = dict(hidden_states=torch.cat([torch.randn(1, 16, 16), data.reference_latents], 1), timestep=0.7,
                encoder_hidden_states=data.tensors["prompt_embeds"],
                pooled_projections=data.tensors["pooled_prompt_embeds"], txt_ids=txt, img_ids=img,
                guidance=torch.tensor([2.5]), return_dict=False)
    assert tr(**call)[0].shape == (1, 16, 16)  # a float timestep is a timestep
    for broken, needle in ((dict(call, img_ids=None), "no 'img_ids'"),
                           (dict(call, encoder_hidden_states=None), "no 'encoder_hidden_states'"),
                           (dict(call, img_ids=img[:20]), "do not match"),
                           (dict(call, timestep=float("nan")), "not finite")):
        with pytest.raises(BadInput, match=needle):
            tr(**broken)


def test_weights_rewritten_while_onnx_runtime_loads_them_are_refused(ort_engine_dir, tmp_path, capsys, monkeypatch):
    """Hashed, then reopened by path: a writer that replaces the verified weights (same size) while ONNX Runtime
    opens them is caught after the load, before any step runs (what was loaded is what was verified)."""
    import os

    from topi_export.backends import onnxruntime as ort_backend

    eng = copy_engines(ort_engine_dir, tmp_path / "eng")
    weights = next(p for p in eng.rglob("weights.data"))
    load = ort_backend.load_session

    def load_then_rewrite(*args, **kwargs):
        session = load(*args, **kwargs)
        data = weights.read_bytes()
        tmp = weights.with_name("weights.tmp")
        tmp.write_bytes(data[::-1])  # other bytes, same size, a new inode: what a concurrent writer leaves
        os.replace(tmp, weights)
        return session

    monkeypatch.setattr(ort_backend, "load_session", load_then_rewrite)
    refused(*cli(capsys, "run", "--engine-dir", eng, "--steps", "1", "-q"), "changed while it was being loaded")


def test_uncompiled_settings_fail_where_they_are_given(ort_engine_dir, capsys):
    """A drop-in ratio the engines were not compiled for fails at construction, not on the pipeline's first call;
    `check --tolerance nan` is refused."""
    pytest.importorskip("diffusers")
    from topi_export.errors import TopiError
    from topi_export.runtime.diffusers_transformer import TopiTransformer

    with pytest.raises(TopiError, match="0.7"):
        TopiTransformer(ort_engine_dir, ratio=0.7)
    refused(*cli(capsys, "check", "--engine-dir", ort_engine_dir, "--tolerance", "nan"), "--tolerance")
