"""Filesystem safety: --force never deletes what the tool did not make, placement is exclusive, killed runs are
cleaned up, and paths read from an engine directory stay inside it."""
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from topi_export import fsutil
from topi_export.errors import TopiError
from topi_export.fsutil import (ENGINE_DIR, MARKER_FILE, ONNX_CACHE, TRITON_REPOSITORY, atomic_write_bytes,
                                check_distinct_outputs, check_onnx_external_data, check_output_dir, check_writable,
                                clean_stale_staging, confined_path, marker_problem, owned_by, read_json_file,
                                refuse_overwrite, staged_dir)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["renameat2", "mkdir-claim"])
def rename_mode(request, monkeypatch):
    """Run placement tests with RENAME_NOREPLACE and with the fallback used where it is unavailable."""
    if request.param == "renameat2":
        if fsutil.rename._renameat2 is None:
            pytest.skip("renameat2 is not available here")
    else:
        monkeypatch.setattr(fsutil.rename, "_renameat2", None)
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



@pytest.mark.parametrize("existed", [True, False])
def test_a_result_placed_after_the_first_check_is_never_replaced(tmp_path, rename_mode, existed):
    """A build checks its output, then loads its model for minutes; another run places its result meanwhile. The
    first build must not replace a result it never saw (the cache, concurrent="replace", may: any whole one serves)."""
    own = owned_by(ENGINE_DIR)
    final = _engine_dir(tmp_path / "engines") if existed else tmp_path / "engines"
    check_output_dir(final, replace=True, is_ours=own)  # this command starts

    def other_run():  # another process, start to finish (a thread: the first look is kept per thread)
        check_output_dir(final, replace=True, is_ours=own)
        with staged_dir(final, replace=True, is_ours=own) as tmp:
            (tmp / "engine.bin").write_text("other")

    t = threading.Thread(target=other_run)
    t.start()
    t.join()
    needle = "was replaced by another run while this command was running" if existed else "appeared while"
    with pytest.raises(TopiError, match=needle):
        with staged_dir(final, replace=True, is_ours=own):
            pytest.fail("the block must not run")
    assert _tree(final) == {"engine.bin": "other"} and sorted(os.listdir(tmp_path)) == ["engines"]
    check_output_dir(final, replace=True, is_ours=own)
    t = threading.Thread(target=other_run)
    t.start()
    t.join()
    with staged_dir(final, replace=True, is_ours=own, concurrent="replace") as tmp:
        (tmp / "engine.bin").write_text("cache")
    assert _tree(final) == {"engine.bin": "cache"} and marker_problem(final, ENGINE_DIR) is None


def test_a_finished_replacement_never_restores_the_tree_it_replaced(tmp_path, rename_mode, monkeypatch):
    """The race behind a flaky concurrent --force run: build B placed its tree, build A moved it aside to replace
    it, and B's cleanup then put B's parked *previous* tree back, so A found the name taken and the oldest tree
    won. Once a build has placed its tree, its parked previous tree is garbage."""
    final = _engine_dir(tmp_path / "engines")
    taken = tmp_path / "taken"
    real_commit = fsutil.staging._commit

    def commit_then_taken(new, final_, *args):
        real_commit(new, final_, *args)
        final_.rename(taken)  # another forced build moves our fresh result aside before our cleanup runs

    monkeypatch.setattr(fsutil.staging, "_commit", commit_then_taken)
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
    real = fsutil.staging.rename_noreplace
    def rename(src, dst):
        real(src, dst)
        if str(dst).endswith("/old"):
            os.kill(os.getpid(), signal.SIGKILL)
    fsutil.staging.rename_noreplace = rename
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


# === hardening, second pass (docs/reliability.md) ================================================================
KINDS = [ENGINE_DIR, TRITON_REPOSITORY, ONNX_CACHE]


def _snapshot(root: Path) -> dict:
    """Every entry under root without following anything: type, and bytes of regular files."""
    out = {}
    for p in sorted([root, *root.rglob("*")]):
        mode = os.lstat(p).st_mode
        out[str(p)] = (p.read_bytes() if stat.S_ISREG(mode) and os.lstat(p).st_size < (1 << 20)
                       else os.lstat(p).st_size if stat.S_ISREG(mode) else stat.S_IFMT(mode))
        if stat.S_ISLNK(mode):
            out[str(p)] = "link:" + os.readlink(p)
    return out


@pytest.fixture
def alarm():
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def hung(*_):
        raise TimeoutError("hung: something opened a FIFO or read without bound")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def key_file(tmp_path, monkeypatch):
    path = tmp_path / "key-dir" / "owner.key"
    monkeypatch.setenv(fsutil.KEY_ENV, str(path))
    return path


def _char_device(path: Path) -> Path:
    """A copy of /dev/null's device node (needs root, CAP_MKNOD)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (OSError, AttributeError) as exc:
        pytest.skip(f"cannot create a device node here ({exc})")
    return path


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, options: str = ""):
    """A small tmpfs at path, to run out of space for real (skips where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- ownership markers ---------------------------------------------------------------------------------------------
def test_a_placed_tree_carries_a_marker_listing_everything(tmp_path, rename_mode):
    final = tmp_path / "repo"
    with staged_dir(final, replace=False, is_ours=owned_by(TRITON_REPOSITORY)) as tmp:
        (tmp / "m" / "1").mkdir(parents=True)
        (tmp / "m" / "1" / "model.onnx").write_bytes(b"x" * 10)
        (tmp / "README.md").write_text("# readme\n")
    doc = json.loads((final / MARKER_FILE).read_text())
    assert doc["kind"] == TRITON_REPOSITORY and doc["entries"] == {"m": "dir", "m/1": "dir", "m/1/model.onnx": 10,
                                                                   "README.md": 9}
    assert marker_problem(final, TRITON_REPOSITORY) is None and fsutil.made_by_topi_export(final)
    assert "as an engine directory (it is a Triton model repository)" in str(marker_problem(final, ENGINE_DIR))
    with pytest.raises(TopiError, match="not made by topi-export as an engine directory.*--force does not replace"):
        check_output_dir(final, replace=True, is_ours=owned_by(ENGINE_DIR))
    with staged_dir(final, replace=True, is_ours=owned_by(TRITON_REPOSITORY)) as tmp:  # its own kind: replaced
        (tmp / "README.md").write_text("second\n")
    assert json.loads((final / MARKER_FILE).read_text())["entries"] == {"README.md": 7}


def _git_clone(tmp_path: Path) -> Path:
    """A clone of a repository whose README's first line names topi-export (as this project's does)."""
    src = tmp_path / "src"
    (src / "topi_export").mkdir(parents=True)
    (src / "README.md").write_text("# topi-export\n\nA deployment compiler.\n")
    (src / "topi_export" / "fsutil.py").write_text("# source\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"]):
        if subprocess.run(cmd, cwd=src, env=env, capture_output=True).returncode:
            pytest.skip("git is not usable here")
    subprocess.run(["git", "clone", "-q", str(src), str(tmp_path / "v")], check=True, capture_output=True)
    shutil.rmtree(src)
    return tmp_path / "v"


def _lookalike(tmp_path: Path, case: str) -> Path:
    """Directories that look like a topi-export output by everything but the marker."""
    d = tmp_path / case.replace("/", "_")
    if case == "git clone":
        return _git_clone(tmp_path).rename(d)
    d.mkdir()
    (d / "data.bin").write_bytes(b"precious")
    if case == "notes":
        (d / "README.md").write_text("# My topi-export experiments\n")
    elif case == "manifest":
        (d / "manifest.json").write_text(json.dumps({"format": "topi-engines/2"}))
    elif case == "manifest link":
        (tmp_path / "real.json").write_text(json.dumps({"format": "topi-engines/2"}))
        (d / "manifest.json").symlink_to(tmp_path / "real.json")
    elif case == "manifest fifo":
        os.mkfifo(d / "manifest.json")
    elif case == "manifest -> /dev/zero":
        (d / "manifest.json").symlink_to("/dev/zero")
    elif case == "6 GiB sparse manifest":
        with open(d / "manifest.json", "wb") as f:
            f.truncate(6 << 30)
    elif case == "cache.json -> /dev/zero":
        (d / "cache.json").symlink_to("/dev/zero")
    elif case == "marker fifo":
        os.mkfifo(d / MARKER_FILE)
    elif case == "marker -> /dev/zero":
        (d / MARKER_FILE).symlink_to("/dev/zero")
    elif case == "6 GiB sparse marker":
        with open(d / MARKER_FILE, "wb") as f:
            f.truncate(6 << 30)
    elif case == "hand-written marker":
        entries = {"data.bin": 8}
        (d / MARKER_FILE).write_text(json.dumps({"format": fsutil.MARKER_FORMAT, "kind": ENGINE_DIR, "id": "x",
                                                 "entries": entries, "hmac": "0" * 64}))
    return d


LOOKALIKES = ["git clone", "notes", "manifest", "manifest link", "manifest fifo", "manifest -> /dev/zero",
              "6 GiB sparse manifest", "cache.json -> /dev/zero", "marker fifo", "marker -> /dev/zero",
              "6 GiB sparse marker", "hand-written marker"]


@pytest.mark.parametrize("case", LOOKALIKES)
@pytest.mark.parametrize("kind", KINDS)
def test_force_never_replaces_a_lookalike(tmp_path, alarm, case, kind):
    d = _lookalike(tmp_path, case)
    before = _snapshot(tmp_path)
    with pytest.raises(TopiError, match="was not made by (your )?topi-export.*so (--force|this build) does not"):
        check_output_dir(d, replace=True, is_ours=owned_by(kind))
    with pytest.raises(TopiError, match="was not made by"):
        with staged_dir(d, replace=True, is_ours=owned_by(kind)) as tmp:
            (tmp / "engine.bin").write_text("new")
    assert not owned_by(kind)(d) and not fsutil.made_by_topi_export(d)
    assert _snapshot(tmp_path) == before


def test_a_marker_under_another_key_or_edited_never_verifies(tmp_path, key_file, monkeypatch):
    mine = _engine_dir(tmp_path / "mine")
    monkeypatch.setenv(fsutil.KEY_ENV, str(tmp_path / "someone-else.key"))
    theirs = _engine_dir(tmp_path / "theirs")  # another user's build, copied here
    monkeypatch.setenv(fsutil.KEY_ENV, str(key_file))
    assert marker_problem(mine, ENGINE_DIR) is None
    assert "does not verify with your key" in str(marker_problem(theirs, ENGINE_DIR))
    with pytest.raises(TopiError, match="was not made by your topi-export .*copied from another user"):
        check_output_dir(theirs, replace=True, is_ours=owned_by(ENGINE_DIR))
    doc = json.loads((mine / MARKER_FILE).read_text())
    for edit in (lambda d: d["entries"].update({"notes.txt": 5}), lambda d: d.update(kind=TRITON_REPOSITORY),
                 lambda d: d.update(id="other")):
        edited = json.loads(json.dumps(doc))
        edit(edited)
        (mine / MARKER_FILE).write_text(json.dumps(edited))
        assert "does not verify" in str(marker_problem(mine, None))
    (mine / MARKER_FILE).write_text(json.dumps(doc))
    copied = tmp_path / "user"  # our own valid marker copied into a user's folder: its entries are not listed
    copied.mkdir()
    (copied / "photo.png").write_bytes(b"png")
    shutil.copyfile(mine / MARKER_FILE, copied / MARKER_FILE)
    assert "did not write (photo.png)" in str(marker_problem(copied, ENGINE_DIR))


def test_entries_the_user_added_make_a_tool_made_directory_not_ours(tmp_path):
    repo = tmp_path / "repo"
    with staged_dir(repo, replace=False, is_ours=owned_by(TRITON_REPOSITORY)) as tmp:
        (tmp / "topi_topi" / "1").mkdir(parents=True)
        (tmp / "topi_topi" / "1" / "model.onnx").write_bytes(b"graph")
        (tmp / "README.md").write_text("# generated\n")
    (repo / "my_model" / "1").mkdir(parents=True)  # the user's own model, added to the repository
    (repo / "my_model" / "1" / "model.plan").write_bytes(b"mine")
    (repo / "topi_topi" / "notes.txt").write_text("mine too")
    before = _snapshot(tmp_path)
    msg = r"holds entries topi-export did not write \(my_model, topi_topi/notes.txt\).*move them out of it"
    with pytest.raises(TopiError, match=msg):
        check_output_dir(repo, replace=True, is_ours=fsutil.is_triton_repository)
    with pytest.raises(TopiError, match=msg):
        with staged_dir(repo, replace=True, is_ours=fsutil.is_triton_repository):
            pytest.fail("the block must not run")
    assert _snapshot(tmp_path) == before
    for i in range(6):
        (repo / f"extra{i}").write_text("x")
    assert "and 3 more" in str(marker_problem(repo, TRITON_REPOSITORY))
    for p in [repo / "my_model", repo / "topi_topi" / "notes.txt", *repo.glob("extra*")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert marker_problem(repo, TRITON_REPOSITORY) is None  # moved out: ours again
    (repo / "topi_topi" / "1" / "model.onnx").unlink()  # a listed file gone: deleting less loses nothing
    assert marker_problem(repo, TRITON_REPOSITORY) is None
    (repo / "README.md").write_text("# generated, then edited by the user\n")
    assert "was changed after topi-export wrote it (README.md)" in str(marker_problem(repo, TRITON_REPOSITORY))
    (repo / "README.md").write_text("# generated\n")  # same size again
    (repo / "link").symlink_to(tmp_path)
    assert "did not write (link)" in str(marker_problem(repo, TRITON_REPOSITORY))


def test_owner_key_is_private_created_once_and_refused_when_unsafe(tmp_path, monkeypatch):
    monkeypatch.delenv(fsutil.KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    key = fsutil.owner_key()
    path = tmp_path / "xdg" / "topi-export" / "owner.key"
    assert fsutil.owner_key_path() == path and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fsutil.owner_key_path() == tmp_path / "home" / ".config" / "topi-export" / "owner.key"
    monkeypatch.setenv(fsutil.KEY_ENV, str(tmp_path / "race" / "owner.key"))
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(fsutil.owner_key())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and sorted(os.listdir(tmp_path / "race")) == ["owner.key"]  # one key, no temp files
    shared = tmp_path / "race" / "owner.key"
    shared.chmod(0o644)
    d = tmp_path / "out"
    with pytest.raises(TopiError, match="can be read by other users.*chmod 600"):
        check_output_dir(d, is_ours=owned_by(ENGINE_DIR))  # before the work, not after it
    shared.unlink()
    shared.symlink_to(path)
    with pytest.raises(TopiError, match="is a symbolic link"):
        fsutil.owner_key()
    shared.unlink()
    shared.write_text("not hex\n")
    shared.chmod(0o600)
    with pytest.raises(TopiError, match="is not a topi-export key"):
        fsutil.owner_key()
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv(fsutil.KEY_ENV, str(tmp_path / "afile" / "owner.key"))
    with pytest.raises(TopiError, match="cannot create topi-export's key file.*set TOPI_EXPORT_KEY_FILE"):
        fsutil.owner_key()
    assert fsutil.owner_key(create=False) is None


# --- bounded JSON reads --------------------------------------------------------------------------------------------
def _json_case(tmp_path: Path, case: str) -> Path:
    p = tmp_path / "f.json"
    if case == "fifo":
        os.mkfifo(p)
    elif case == "link to /dev/zero":
        p.symlink_to("/dev/zero")
    elif case == "/dev/zero":
        return Path("/dev/zero")
    elif case == "directory":
        p.mkdir()
    elif case == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif case == "6 GiB sparse":
        with open(p, "wb") as f:
            f.truncate(6 << 30)
    elif case == "deep nesting":
        p.write_text("[" * 100000 + "]" * 100000)
    elif case == "5000 digits":
        p.write_text('{"num_layers": ' + "9" * 5000 + "}")
    elif case == "latin-1":
        p.write_bytes('{"name": "café"}'.encode("latin-1"))
    elif case == "truncated":
        p.write_text('{"format": "topi-engines/2", "lay')
    elif case == "bom":
        p.write_bytes(b"\xef\xbb\xbf{}")
    elif case == "missing":
        pass
    return p


@pytest.mark.parametrize("case, needle", [
    ("fifo", "not a regular JSON file of at most 16 MB (a FIFO)"),
    ("link to /dev/zero", "(a symbolic link)"),
    ("/dev/zero", "(a character device)"),
    ("directory", "(a directory)"),
    ("socket", "(a socket)"),
    ("6 GiB sparse", "(6442450944 bytes)"),
    ("deep nesting", "not valid JSON (nested too deeply)"),
    ("5000 digits", "not valid JSON (a number with too many digits)"),
    ("latin-1", "not valid JSON (not UTF-8 text: byte 13)"),
    ("truncated", "not valid JSON (Unterminated string"),
    ("bom", "not valid JSON (Unexpected UTF-8 BOM"),
    ("missing", "not found: rebuild it"),
])
def test_read_json_file_refuses_in_one_line(tmp_path, alarm, case, needle):
    p = _json_case(tmp_path, case)
    with pytest.raises(TopiError) as exc:
        read_json_file(p, "manifest", "rebuild it")
    text = str(exc.value)
    assert needle in text and "\n" not in text and text.startswith(f"manifest {p} ") and text.endswith("rebuild it")


def test_read_json_file_follows_links_only_when_asked(tmp_path, alarm):
    (tmp_path / "real.json").write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")  # a Hugging Face snapshot links to its blobs
    assert read_json_file(tmp_path / "link.json", "config", "fix", follow_symlinks=True) == {"a": 1}
    with pytest.raises(TopiError, match="a symbolic link"):
        read_json_file(tmp_path / "link.json", "manifest", "fix")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(TopiError, match="a character device"):
        read_json_file(tmp_path / "zero.json", "config", "fix", follow_symlinks=True)
    with pytest.raises(TopiError, match=r"at most 8 bytes \(9 bytes\)"):
        (tmp_path / "big.json").write_text('"1234567"')
        read_json_file(tmp_path / "big.json", "x", "fix", max_bytes=8)
    with pytest.raises(TopiError, match="custom message"):
        read_json_file(tmp_path / "nope.json", "x", "fix", missing="custom message")


# --- outputs: special files, two outputs on one path, names, special file systems, no space --------------------
def _special(tmp_path: Path, case: str) -> Path:
    p = tmp_path / "out.json"
    if case == "device copy":
        return _char_device(p)
    if case == "/dev/null":
        return Path(os.devnull)
    if case == "fifo":
        os.mkfifo(p)
    elif case == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(p))
        s.close()
    elif case == "link to a file":
        (tmp_path / "target.json").write_text("keep")
        p.symlink_to(tmp_path / "target.json")
    elif case == "dangling link":
        p.symlink_to(tmp_path / "nowhere.json")
    elif case == "link to /dev/null":
        p.symlink_to(os.devnull)
    return p


@pytest.mark.parametrize("case, needle", [
    ("device copy", "is a character device"), ("/dev/null", "is a character device"), ("fifo", "is a FIFO"),
    ("socket", "is a socket"), ("link to a file", "is a symbolic link"), ("dangling link", "is a symbolic link"),
    ("link to /dev/null", "is a symbolic link"),
])
def test_outputs_never_replace_or_follow_special_files(tmp_path, alarm, case, needle):
    p = _special(tmp_path, case)
    before = _snapshot(tmp_path)
    null_before = os.lstat(os.devnull)
    with pytest.raises(TopiError, match=f"{needle}: outputs are written as regular files"):
        check_writable(p)
    with pytest.raises(TopiError, match=needle):
        atomic_write_bytes(p, b"{}")
    assert _snapshot(tmp_path) == before
    after = os.lstat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == null_before.st_ino


def test_a_special_file_put_there_after_the_check_is_refused_at_write_time(tmp_path, alarm):
    p = tmp_path / "report.json"
    check_writable(p)  # nothing there yet
    os.mkfifo(p)  # a FIFO (or a device, or a link) appears during the run
    with pytest.raises(TopiError, match="is a FIFO"):
        atomic_write_bytes(p, b"{}")
    assert stat.S_ISFIFO(os.lstat(p).st_mode) and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_two_outputs_on_one_path_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "linkdir").symlink_to(tmp_path / "sub")
    (tmp_path / "sub" / "a.json").write_text("{}")
    os.link(tmp_path / "sub" / "a.json", tmp_path / "hard.json")
    for a, b in [("r.json", "r.json"), ("r.json", "./sub/../r.json"), (tmp_path / "r.json", "r.json"),
                 ("sub/x.json", "linkdir/x.json"), ("sub/a.json", "hard.json")]:
        with pytest.raises(TopiError, match="are the same file: give each output its own path"):
            check_distinct_outputs([a, None, b])
    with pytest.raises(TopiError, match="outputs --json r.json and --out r.json are the same file"):
        check_distinct_outputs([("r.json", "--json"), ("x.png", "--png"), ("r.json", "--out")])
    with pytest.raises(TopiError, match="outputs --json r.json and --out ./r.json are the same file"):
        check_distinct_outputs({"r.json": "--json", "./r.json": "--out"})
    check_distinct_outputs(["r.json", "r.png", "", None, "sub/r.json"])


def test_names_too_long_in_bytes_are_refused_up_front(tmp_path):
    cjk80, cjk86 = "\u6f22" * 80, "\u6f22" * 86  # 240 and 258 bytes (3 bytes a character in UTF-8)
    for bad in ["a" * 256, cjk86, f"{'b' * 300}/x.json"]:
        with pytest.raises(TopiError, match="more than the 255 bytes a file name may have"):
            check_writable(tmp_path / bad)
        with pytest.raises(TopiError, match="more than the 255 bytes"):
            check_output_dir(tmp_path / bad)
    with pytest.raises(TopiError, match="more than the 4095 a path may have"):
        check_writable(tmp_path / "/".join(["d" * 200] * 21))
    atomic_write_bytes(check_writable(tmp_path / (cjk80 + ".json")), b"{}")  # fits, and so does its temp name
    atomic_write_bytes(check_writable(tmp_path / ("c" * 255)), b"{}")
    assert sorted(os.listdir(tmp_path)) == sorted([cjk80 + ".json", "c" * 255])


@pytest.mark.parametrize("name", ["\u6f22" * 80, "e" * 255, "\u6f22" * 66 + "ab"])
def test_staging_names_are_cut_in_bytes(tmp_path, rename_mode, name):
    final = tmp_path / name
    for replace in (False, True):
        with staged_dir(final, replace=replace, is_ours=owned_by(ENGINE_DIR)) as tmp:
            assert len(os.fsencode(tmp.parent.name)) <= 255
            assert (tmp.parent / fsutil.FINAL_FILE).read_bytes() == os.fsencode(name)
            (tmp / "engine.bin").write_text(str(replace))
    assert _tree(final) == {"engine.bin": "True"} and sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("where", ["/proc/self/topi-out", "/proc/topi-out", "/sys/topi-out"])
def test_outputs_under_proc_and_sys_are_refused_up_front(where):
    if not os.path.isdir(os.path.dirname(where)):
        pytest.skip(f"no {os.path.dirname(where)} here")
    with pytest.raises(TopiError, match="does not accept new files|no write permission"):
        check_writable(where + ".json")
    with pytest.raises(TopiError, match="does not accept new files|no write permission"):
        check_output_dir(where)


def test_running_out_of_space_is_one_line_and_leaves_nothing(tmp_path):
    with _tmpfs(tmp_path / "small", "256k") as small:
        final = _engine_dir(small / "engines")
        before = _snapshot(small)
        with pytest.raises(TopiError, match=r"cannot write .*engines \(no space left on the device.*\): the partial "
                                            r"output was removed and .*engines is as it was; free some space"):
            with staged_dir(final, replace=True, is_ours=owned_by(ENGINE_DIR)) as tmp:
                (tmp / "big.bin").write_bytes(b"\0" * (1 << 20))
        assert _snapshot(small) == before
        with pytest.raises(TopiError, match=r"cannot write .*report.json \(no space left on the device\): nothing "
                                            r"was written there; free some space"):
            atomic_write_bytes(small / "report.json", b"x" * (1 << 20))
        assert _snapshot(small) == before


def test_a_read_only_file_system_is_refused_up_front(tmp_path):
    with _tmpfs(tmp_path / "ro", "64k", ",ro") as ro:
        with pytest.raises(TopiError, match="read-only file system|no write permission"):
            check_writable(ro / "report.json")
        with pytest.raises(TopiError, match="read-only file system|no write permission"):
            check_output_dir(ro / "engines")


def test_files_the_tool_writes_into_its_own_directory_stay_its_own(tmp_path):
    """README's main job writes `run --png engines/default/demo.png` into the engine directory and then rebuilds
    it with --force: a file topi-export wrote there is recorded in the marker; a file the user put there is not."""
    eng = _engine_dir(tmp_path / "eng")
    marker_id = json.loads((eng / MARKER_FILE).read_text())["id"]
    atomic_write_bytes(eng / "demo.png", b"png")
    atomic_write_bytes(eng / "reports" / "r.json", b"{}")
    atomic_write_bytes(eng / "demo.png", b"a larger png")  # rewritten: its new size is recorded
    assert marker_problem(eng, ENGINE_DIR) is None
    doc = json.loads((eng / MARKER_FILE).read_text())
    assert doc["id"] == marker_id and doc["entries"]["reports"] == "dir" and doc["entries"]["demo.png"] == 12
    assert sorted(os.listdir(eng)) == sorted([MARKER_FILE, "demo.png", "engine.bin", "manifest.json", "reports"])
    (eng / "notes.txt").write_text("the user's")
    atomic_write_bytes(eng / "later.json", b"{}")  # not ours any more: nothing is adopted
    assert "did not write (later.json, notes.txt)" in str(marker_problem(eng, ENGINE_DIR))
    other = tmp_path / "plain"
    atomic_write_bytes(other / "r.json", b"{}")  # no marker anywhere above: nothing to record
    assert sorted(os.listdir(other)) == ["r.json"]
