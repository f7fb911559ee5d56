"""The exclusive rename: a directory moved to a name only if nothing is there, not even an empty directory."""
from __future__ import annotations

import ctypes
import errno
import os


def _load_renameat2():
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()  # None: use the mkdir-claim fallback (tests set it to None to exercise that path)
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
# errors meaning "this kernel / filesystem / sandbox cannot do RENAME_NOREPLACE": use the fallback
_NO_FLAG = {errno.EINVAL, errno.ENOSYS, errno.EPERM, getattr(errno, "ENOTSUP", errno.EINVAL),
            getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def rename_noreplace(src, dst) -> None:
    """Rename directory ``src`` to ``dst``; raise FileExistsError when ``dst`` exists (an empty directory too)
    or appears during the call. Never replaces anything."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _NO_FLAG:
            raise OSError(err, os.strerror(err), src, None, dst)  # EEXIST/ENOTEMPTY -> FileExistsError subclass
    if os.name == "nt":  # Windows' rename never replaces an existing target
        os.rename(src, dst)
        return
    os.mkdir(dst)  # claims the name: FileExistsError when anything is there
    try:
        os.rename(src, dst)  # replaces only our empty placeholder; fails if someone wrote into it
    except OSError as exc:
        try:
            os.rmdir(dst)  # succeeds only while the placeholder is still empty
        except OSError:
            pass
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "appeared during the rename", dst) from exc
        raise
