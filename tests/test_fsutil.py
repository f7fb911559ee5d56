"""Filesystem safety: --force never deletes what the tool did not make, placement is exclusive, killed runs are
cleaned up, and paths read from an engine directory stay inside it."""
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from topi_export import fsutil
from topi_export.errors import TopiError
from topi_export.fsutil import (check_onnx_external_data, check_output_dir, check_writable, clean_stale_staging,
                                confined_path, refuse_overwrite, staged_dir)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["renameat2", "mkdir-claim"])
def rename_mode(request, monkeypatch):
    """Run placement tests with RENAME_NOREPLACE and with the fallback used where it is unavailable."""
    if request.param == "renameat2":
        if fsutil._renameat2 is None:
            pytest.skip("renameat2 is not available here")
    else:
        monkeypatch.setattr(fsutil, "_renameat2", None)
    return request.param


def _tree(path: Path) -> dict:
    """Files and their text, without the ownership marker (its id and HMAC differ on every write)."""
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != fsutil.MARKER_FILE}


def _engine_dir(path: Path, tag="old") -> Path:
    """A directory topi-export made: files, then the marker (written last, as staged_dir does)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"format": "topi-engines/1"}))
    (path / "engine.bin").write_text(tag)
    fsutil.write_marker(path, fsutil.ENGINE_DIR)
    return path


# --- replacing (--force) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("replace", [True, None])  # None: today's callers, which check --force themselves
def test_replace_refuses_a_directory_the_tool_did_not_make(tmp_path, replace):
    user = tmp_path / "my-model"
    (user / "sub").mkdir(parents=True)
    (user / "weights.safetensors").write_text("precious")
    (user / "sub" / "notes.txt").write_text("also precious")
    before = _tree(user)
    with pytest.raises(TopiError, match="not made by topi-export.*remove it yourself"):
        with staged_dir(user, replace=replace) as tmp:
            (tmp / "engine.bin").write_text("new")
    assert _tree(user) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]
    with pytest.raises(TopiError, match="not made by topi-export"):
        check_output_dir(user, replace=True, is_ours=lambda p: (p / "manifest.json").is_file())


def test_replace_refuses_final_that_contains_or_is_inside_a_protected_path(tmp_path):
    work = tmp_path / "work"
    model = _engine_dir(work / "model")  # even a directory that looks tool-made
    inputs = work / "inputs.safetensors"
    inputs.write_text("x")
    before = _tree(work)
    protect = {model: "the model folder", inputs: "the inputs file", tmp_path / "missing": "ignored"}
    for final, needle in [(work, "contains the model folder"), (model, "is the model folder"),
                          (model / "engines", "is inside the model folder"),
                          (work / "." / "model", "is the model folder")]:
        with pytest.raises(TopiError, match=needle):
            check_output_dir(final, replace=True, is_ours=lambda p: True, protect=protect)
        with pytest.raises(TopiError, match=needle):
            with staged_dir(final, replace=True, is_ours=lambda p: True, protect=protect):
                pytest.fail("the block must not run")
    link = tmp_path / "link-to-model"
    link.symlink_to(model)
    with pytest.raises(TopiError, match="is the model folder"):  # compared after resolving links
        check_output_dir(link, replace=True, is_ours=lambda p: True, protect=protect)
    assert _tree(work) == before


def test_refuses_dangerous_output_directories(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "home" / "project"
    cwd.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "link").symlink_to(_engine_dir(tmp_path / "real"))
    anything = dict(replace=True, is_ours=lambda p: True)
    for final, needle in [(".", "is the current directory"), (home, "is your home directory"),
                          (tmp_path, "contains your home directory"), ("/", "the filesystem root"),
                          (afile, "not a directory"), (tmp_path / "link", "symbolic link"),
                          (afile / "sub", "is not a directory")]:
        with pytest.raises(TopiError, match=needle):
            check_output_dir(final, **anything)
    with pytest.raises(TopiError, match="already exists: pass --force"):
        check_output_dir(tmp_path / "real", replace=False)
    assert afile.read_text() == "x" and (cwd).is_dir()


@pytest.mark.parametrize("replace", [True, None])
def test_replace_replaces_a_tool_made_directory(tmp_path, rename_mode, replace):
    final = _engine_dir(tmp_path / "engines")
    with staged_dir(final, replace=replace) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": "topi-engines/1"}))
        (tmp / "engine.bin").write_text("new")
    assert _tree(final) == {"engine.bin": "new", "manifest.json": json.dumps({"format": "topi-engines/1"})}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # old tree and staging gone
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_dir(empty, replace=True, is_ours=fsutil.is_empty_dir) as tmp:
        (tmp / "a").write_text("a")
    assert _tree(empty) == {"a": "a"}


def test_directory_swapped_during_replacement_is_put_back(tmp_path, rename_mode):
    final = _engine_dir(tmp_path / "engines")
    before = _tree(final)
    calls = []

    def ours_until_moved(path):  # vouches on entry and before the move, not for what was actually moved aside
        calls.append(path.name)
        return path.name == "engines"

    with pytest.raises(TopiError, match="changed while it was being replaced"):
        with staged_dir(final, replace=True, is_ours=ours_until_moved) as tmp:
            (tmp / "engine.bin").write_text("new")
    assert calls == ["engines", "engines", "old"]
    assert _tree(final) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_failed_block_leaves_final_and_parent_untouched(tmp_path):
    final = _engine_dir(tmp_path / "engines")
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(final, replace=True) as tmp:
            (tmp / "engine.bin").write_text("half")
            raise KeyboardInterrupt
    assert _tree(final)["engine.bin"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


# --- exclusive placement -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [False, True])
def test_directory_created_during_the_build_is_kept(tmp_path, rename_mode, content):
    final = tmp_path / "engines"
    with pytest.raises(TopiError, match="appeared while this command was running"):
        with staged_dir(final) as tmp:
            (tmp / "engine.bin").write_text("ours")
            final.mkdir()  # an empty directory too: a plain rename would silently replace it
            if content:
                (final / "theirs.txt").write_text("theirs")
    assert _tree(final) == ({"theirs.txt": "theirs"} if content else {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def _race(build):
    """Run build("a") and build("b") at once (they meet at a barrier inside their staging block)."""
    threads = [threading.Thread(target=build, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_two_concurrent_builds_exactly_one_wins(tmp_path, rename_mode):
    final = tmp_path / "engines"
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def build(who):
        try:
            with staged_dir(final, replace=False) as tmp:
                (tmp / "who").write_text(who)
                barrier.wait()  # both staged, neither placed
            results[who] = "won"
        except TopiError as exc:
            results[who] = str(exc)

    _race(build)
    winners = [w for w, r in results.items() if r == "won"]
    assert len(results) == 2 and len(winners) == 1, results
    loser = ({"a", "b"} - set(winners)).pop()
    assert "appeared while this command was running" in results[loser]
    assert _tree(final) == {"who": winners[0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # the loser's staging dir is gone


def test_two_concurrent_forced_builds_leave_one_whole_result(tmp_path, rename_mode):
    """Both replace the same tree; the first to finish places its result, the second finds a tree it never saw
    and says so instead of replacing it (before: both reported success although one result replaced the other)."""
    final = _engine_dir(tmp_path / "engines")
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def build(who):
        try:
            with staged_dir(final, replace=True, is_ours=fsutil.owned_by(fsutil.ENGINE_DIR)) as tmp:
                (tmp / "manifest.json").write_text(json.dumps({"format": "topi-engines/1"}))
                (tmp / "engine.bin").write_text(who)
                barrier.wait()
            results[who] = "won"
        except TopiError as exc:
            results[who] = str(exc)

    _race(build)
    winners = [w for w, r in results.items() if r == "won"]
    assert len(results) == 2 and len(winners) == 1, results
    loser = ({"a", "b"} - set(winners)).pop()
    assert "was replaced by another run while this command was running" in results[loser], results
    assert "this output was discarded" in results[loser]
    assert _tree(final)["engine.bin"] == winners[0]
    assert fsutil.marker_problem(final, fsutil.ENGINE_DIR) is None  # the winner, whole and marked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]



def test_a_finished_replacement_never_restores_the_tree_it_replaced(tmp_path, rename_mode, monkeypatch):
    """The race behind a flaky concurrent --force run: build B placed its tree, build A moved it aside to replace
    it, and B's cleanup then put B's parked *previous* tree back, so A found the name taken and the oldest tree
    won. Once a build has placed its tree, its parked previous tree is garbage."""
    final = _engine_dir(tmp_path / "engines")
    taken = tmp_path / "taken"
    real_commit = fsutil._commit

    def commit_then_taken(new, final_, *args):
        real_commit(new, final_, *args)
        final_.rename(taken)  # another forced build moves our fresh result aside before our cleanup runs

    monkeypatch.setattr(fsutil, "_commit", commit_then_taken)
    with staged_dir(final, replace=True) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"format": "topi-engines/1"}))
        (tmp / "engine.bin").write_text("new")
    assert not os.path.lexists(final)  # not the old tree brought back
    assert _tree(taken)["engine.bin"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # staging (and the old tree) gone

# --- stale staging directories -------------------------------------------------------------------------------------
_KILLED_BUILD = """
import os, signal, sys
from topi_export import fsutil
final, replace = sys.argv[1], sys.argv[2] == "replace"
if replace:  # die after the old tree was moved aside, before the new one is moved in
    real = fsutil.rename_noreplace
    def rename(src, dst):
        real(src, dst)
        if str(dst).endswith("/old"):
            os.kill(os.getpid(), signal.SIGKILL)
    fsutil.rename_noreplace = rename
with fsutil.staged_dir(final, replace=replace) as tmp:
    (tmp / "engine.bin").write_text("new")
    if not replace:
        os.kill(os.getpid(), signal.SIGKILL)
"""

_HOLD_STAGING = """
import sys, time
from pathlib import Path
from topi_export import fsutil
with fsutil.staged_dir(sys.argv[1]) as tmp:
    (tmp / "engine.bin").write_text("running")
    print(next(Path(sys.argv[1]).parent.glob("." + Path(sys.argv[1]).name + ".staging-*")), flush=True)
    time.sleep(120)
"""


def _killed_build(final: Path, mode: str):
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(final), mode], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def _staging_dirs(parent: Path, name: str):
    return sorted(p for p in parent.iterdir() if p.name.startswith(f".{name}.staging-"))


def test_stale_staging_of_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    final = tmp_path / "engines"
    _killed_build(final, "stage")
    stale = _staging_dirs(tmp_path, "engines")
    assert len(stale) == 1 and (stale[0] / fsutil.LOCK_FILE).is_file() and (stale[0] / "new" / "engine.bin").is_file()
    legacy = tmp_path / ".engines.tmp-abcd1234"  # older versions: left alone
    legacy.mkdir()
    with staged_dir(tmp_path / "other") as live_tmp:  # a live staging dir of this process, under another name
        pass
    lines = []
    with staged_dir(final, echo=lines.append) as tmp:  # staged_dir cleans up on entry
        assert not stale[0].exists() and legacy.exists()
        assert len(lines) == 1 and str(stale[0]) in lines[0]
        assert clean_stale_staging(tmp_path, "engines") == []  # our own (live) staging dir is kept: its lock is held
        assert tmp.is_dir()
    assert not live_tmp.exists()


def test_staging_dir_whose_lock_is_held_by_another_process_is_kept(tmp_path):
    """The guarantee the old pid / start-time / boot-id record gave, now from the lock: a staging directory is
    removed exactly when no live process holds its lock (a killed holder's lock is dropped by the kernel)."""
    final = tmp_path / "engines"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_STAGING, str(final)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        live = Path(proc.stdout.readline().strip())
        assert live.is_dir(), proc.poll()
        assert clean_stale_staging(tmp_path, "engines") == [] and (live / "new" / "engine.bin").is_file()
        proc.kill()
        proc.wait(30)
        assert clean_stale_staging(tmp_path, "engines") == [live] and not live.exists()
    finally:
        proc.kill()
        proc.wait(30)


def test_staging_dirs_that_are_not_this_outputs_are_kept(tmp_path):
    unlocked = tmp_path / ".engines.staging-abcd1234"  # killed before it locked: no lock file, nothing parked
    unlocked.mkdir()
    long_a, long_b = "a" * 230 + "-one", "a" * 230 + "-two"  # staging names are cut at 200 bytes: same prefix
    other = tmp_path / f".{'a' * 200}.staging-efgh5678"
    (other / "old").mkdir(parents=True)
    (other / fsutil.FINAL_FILE).write_text(long_b)
    assert clean_stale_staging(tmp_path, long_a) == []  # long_b's leftover: not this output's to remove or restore
    assert other.is_dir() and not (tmp_path / long_a).exists()
    assert clean_stale_staging(tmp_path, long_b) == [other] and (tmp_path / long_b).is_dir()  # restored
    assert clean_stale_staging(tmp_path, "engines") == [unlocked]


def test_killed_during_replacement_restores_the_previous_directory(tmp_path):
    final = _engine_dir(tmp_path / "engines")
    before = _tree(final)
    _killed_build(final, "replace")
    assert not final.exists() and len(_staging_dirs(tmp_path, "engines")) == 1
    assert len(clean_stale_staging(tmp_path, "engines")) == 1
    assert _tree(final) == before and fsutil.marker_problem(final, fsutil.ENGINE_DIR) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


# --- confinement -------------------------------------------------------------------------------------------------
@pytest.fixture
def engine_root(tmp_path):
    root = tmp_path / "engine"
    (root / "onnx").mkdir(parents=True)
    (root / "onnx" / "anchor.onnx").write_text("graph")
    (tmp_path / "outside.txt").write_text("secret")
    return root


def test_confined_path_accepts_files_inside(engine_root):
    assert confined_path(engine_root, "onnx/anchor.onnx") == engine_root.resolve() / "onnx" / "anchor.onnx"
    assert confined_path(engine_root, "./onnx//missing.bin") == engine_root.resolve() / "onnx" / "missing.bin"


@pytest.mark.parametrize("rel, needle", [
    ("/etc/passwd", "absolute path"), ("../outside.txt", r"leaves the directory \(\.\.\)"),
    ("onnx/../../outside.txt", "leaves the directory"), ("onnx/../anchor.onnx", "leaves the directory"),
    ("a\x00b", "NUL byte"), ("", "names no file"), (".", "names no file"), (3, "is not a path"),
])
def test_confined_path_refuses_escapes(engine_root, rel, needle):
    with pytest.raises(TopiError, match=needle):
        confined_path(engine_root, rel, what="manifest file")


def test_confined_path_refuses_symlinks_without_revealing_the_target(engine_root, tmp_path):
    messages = []
    for target in [tmp_path / "outside.txt", tmp_path / "no-such-file", engine_root / "onnx" / "anchor.onnx"]:
        link = engine_root / "weights.bin"
        link.symlink_to(target)
        with pytest.raises(TopiError, match="symbolic link") as exc:
            confined_path(engine_root, "weights.bin")
        messages.append(str(exc.value))
        link.unlink()
    assert len(set(messages)) == 1  # the same text whether the outside file exists or not (or is inside)
    (engine_root / "sub").symlink_to(tmp_path)  # a directory link: refused at that component
    with pytest.raises(TopiError, match=r"symbolic link \(sub\)"):
        confined_path(engine_root, "sub/outside.txt")
    texts = []
    for rel in ["../outside.txt", "../no-such-fil"]:  # same length: the texts differ only in the name
        with pytest.raises(TopiError) as exc:
            confined_path(engine_root, rel)
        texts.append(str(exc.value).replace(rel, "X"))
    assert texts[0] == texts[1]


def test_confined_path_refuses_special_files(engine_root):
    os.mkfifo(engine_root / "pipe")
    with pytest.raises(TopiError, match="not a regular file"):
        confined_path(engine_root, "pipe")


def _onnx_with_external(path: Path, location: str, where: str = "initializer"):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def external(name):
        t = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
        t.ClearField("float_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in [("location", location), ("offset", "0"), ("length", "8")]:
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return t

    if where == "initializer":
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [external("w")])
    else:  # a Constant inside an If branch: a subgraph's attribute tensor
        branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=external("c"))], "b", [],
                                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
        node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())  # no external data written: the check must not read it
    assert onnx.load(str(path), load_external_data=False).graph is not None
    return path


def test_external_data_inside_is_accepted(engine_root):
    model = _onnx_with_external(engine_root / "onnx" / "anchor.onnx", "anchor.onnx.data")
    assert check_onnx_external_data(model, engine_root) == {"onnx/anchor.onnx.data"}


@pytest.mark.parametrize("where", ["initializer", "subgraph"])
@pytest.mark.parametrize("location, needle", [("../../etc/passwd", "leaves the directory"),
                                              ("/etc/passwd", "absolute path")])
def test_external_data_outside_is_refused(engine_root, location, needle, where):
    model = _onnx_with_external(engine_root / "onnx" / "anchor.onnx", location, where)
    with pytest.raises(TopiError, match=f"external-data location.*{needle}"):
        check_onnx_external_data(model, engine_root)


def test_external_data_through_a_symlink_is_refused(engine_root, tmp_path):
    model = _onnx_with_external(engine_root / "onnx" / "anchor.onnx", "anchor.onnx.data")
    (engine_root / "onnx" / "anchor.onnx.data").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(TopiError, match="symbolic link"):
        check_onnx_external_data(model, engine_root)


# --- output files ------------------------------------------------------------------------------------------------
def test_check_writable(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert check_writable(tmp_path / "new" / "deeper" / "report.json") == tmp_path / "new" / "deeper" / "report.json"
    with pytest.raises(TopiError, match="afile is not a directory"):
        check_writable(afile / "report.json")
    with pytest.raises(TopiError, match="is a directory"):
        check_writable(tmp_path)


def test_check_writable_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running with privileges that can write a 0o500 directory (root)")
        with pytest.raises(TopiError, match="no write permission"):
            check_writable(locked / "sub" / "out.png")
    finally:
        locked.chmod(0o700)


def test_refuse_overwrite(tmp_path, monkeypatch):
    inputs = tmp_path / "inputs.safetensors"
    inputs.write_text("x")
    engine = _engine_dir(tmp_path / "engine")
    os.link(inputs, tmp_path / "hardlink")
    monkeypatch.chdir(tmp_path)
    protected = {inputs: "the inputs file", engine: "the engine directory"}
    for out, needle in [("inputs.safetensors", "would overwrite the inputs file"),
                        ("engine/../inputs.safetensors", "would overwrite the inputs file"),
                        ("hardlink", "would overwrite the inputs file"),
                        ("engine/latents.safetensors", "inside the engine directory"),
                        ("engine/engine.bin", "inside the engine directory")]:
        with pytest.raises(TopiError, match=needle):
            refuse_overwrite(out, protected, what="--save-latents")
    refuse_overwrite("latents.safetensors", protected)
    refuse_overwrite("out.json", [None, tmp_path / "missing"])
