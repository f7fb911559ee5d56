"""Filesystem safety: artifacts appear whole or not at all, never over something this user's topi-export did not
make, outputs never replace special files, small JSON files are read bounded, and paths read from an engine
directory (manifest entries, ONNX external data) stay inside it. docs/design.md, "Filesystem safety";
docs/reliability.md lists the cases and their tests.

Output directories (engine directories, Triton repositories, ONNX caches) are written with ``staged_dir``:

    check_output_dir(out, replace=force, is_ours=owned_by(ENGINE_DIR), protect={model_dir: "the model folder"})
    with staged_dir(out, replace=force, is_ours=owned_by(ENGINE_DIR), protect=..., echo=echo) as tmp:
        ...write everything into tmp...

Ownership: when the block succeeds, ``staged_dir`` writes ``MARKER_FILE`` last into the tree: the kind of output
and every entry below it with its size, authenticated by an HMAC under a per-user key (``owner_key``: created on
first use, mode 0600). ``--force`` replaces a directory only when it is empty, or its marker verifies under this
user's key, names the kind asked for, and lists everything the directory holds. A git clone, a notes folder, a
copy of another user's output or a hand-written marker never passes; a tool-made tree the user added a file to
is refused with the names of the extra entries.

Staging: ``tmp`` is ``PARENT/.NAME.staging-<random>/new``. The staging directory holds ``lock``, a ``filelock``
lock its run holds for its whole life, and ``final`` (NAME). A staging directory whose lock can be taken belongs
to a dead run and is removed (``clean_stale_staging``); the kernel drops a killed process's lock, so no pid, start
time or boot id is needed.

Placement is atomic and exclusive: when ``NAME`` does not exist it is created by a rename that fails if anything
appeared there meanwhile (Linux ``renameat2(RENAME_NOREPLACE)``; elsewhere, or where the filesystem refuses the
flag, ``mkdir(NAME)`` claims the name and the rename then replaces only that empty placeholder, failing if someone
wrote into it). A plain ``rename`` would silently replace an empty directory, and a check before the work would race
with anything created during it. With ``replace=True`` an existing ``NAME`` is replaced only when ``is_ours`` says
this tool made it and it is still the tree this command saw when it started (another run's result placed meanwhile
is kept and this command fails saying so): it is moved into the staging directory (and checked again there), the
new tree is moved in exclusively, then the old one is deleted. Nothing is deleted that was not verified as ours.

Modules, each importing only those listed before it: ``reading`` (small files read bounded), ``rename`` (the
exclusive rename), ``outputs`` (output paths checked before the work), ``ownership`` (the key, the marker,
``is_ours``), ``writing`` (``atomic_write_bytes``), ``staging`` (output directories: ``check_output_dir``,
``staged_dir``), ``confine`` (paths read from an engine directory). This package re-exports their public names.
"""
from topi_export.fsutil.reading import MAX_JSON_BYTES, file_identity, read_json_file, read_small_file
from topi_export.fsutil.rename import rename_noreplace
from topi_export.fsutil.outputs import (NAME_MAX, PATH_MAX, check_disjoint, check_distinct_outputs,
                                        check_name_lengths, check_writable, refuse_overwrite)
from topi_export.fsutil.ownership import (ENGINE_DIR, KEY_ENV, KINDS, MARKER_FILE, MARKER_FORMAT, MAX_MARKER_BYTES,
                                          MAX_MARKER_ENTRIES, ONNX_CACHE, TRITON_REPOSITORY, NotOurs, Owned,
                                          is_empty_dir, is_engine_directory, is_onnx_cache, is_triton_repository,
                                          made_by_topi_export, marker_problem, owned_by, owner_key, owner_key_path,
                                          write_marker)
from topi_export.fsutil.writing import atomic_write_bytes
from topi_export.fsutil.staging import FINAL_FILE, LOCK_FILE, check_output_dir, clean_stale_staging, staged_dir
from topi_export.fsutil.confine import check_onnx_external_data, confined_path

__all__ = [
    "MAX_JSON_BYTES", "file_identity", "read_json_file", "read_small_file",
    "rename_noreplace",
    "NAME_MAX", "PATH_MAX", "check_disjoint", "check_distinct_outputs", "check_name_lengths", "check_writable",
    "refuse_overwrite",
    "ENGINE_DIR", "KEY_ENV", "KINDS", "MARKER_FILE", "MARKER_FORMAT", "MAX_MARKER_BYTES", "MAX_MARKER_ENTRIES",
    "ONNX_CACHE", "TRITON_REPOSITORY", "NotOurs", "Owned", "is_empty_dir", "is_engine_directory", "is_onnx_cache",
    "is_triton_repository", "made_by_topi_export", "marker_problem", "owned_by", "owner_key", "owner_key_path",
    "write_marker",
    "atomic_write_bytes",
    "FINAL_FILE", "LOCK_FILE", "check_output_dir", "clean_stale_staging", "staged_dir",
    "check_onnx_external_data", "confined_path",
]
