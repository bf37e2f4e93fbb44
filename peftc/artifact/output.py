"""Writing an output directory other than an artifact (``peftc combine``, ``peftc extract``, ``analyze --plot``)
as a compile writes its artifact (``peftc.artifact.writer``): checked before any work, built in a marked
temporary directory beside the destination, and moved into place only when complete.

What may be at the destination:

* nothing, or an empty directory: the new directory takes its place;
* a directory this command wrote earlier (``ours`` says so, e.g. it holds only the files ``peftc extract``
  writes, with its record), with ``force``: old and new trade places in one step
  (``peftc.artifact.rename.exchange``), so the destination always holds one of them;
* anything else (a file, a symbolic link, a user's directory, the command's own input): refused with one
  line, and left untouched.

The destination is checked when the command starts and again when the result is moved into place.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from peftc import arguments
from peftc.artifact import rename
from peftc.artifact.temp import staging
from peftc.artifact.writer import check_inputs, check_place
from peftc.errors import InputError


class OutputDir:
    """A temporary directory (``tmp``) that becomes ``out`` on :meth:`commit`.

    Args:
        out: the destination directory.
        flag: the flag that named it, for error messages (``-o``, ``--plot``).
        command: the command writing it, for error messages.
        force: replace a directory ``ours`` accepts (without it, only a new or empty destination).
        ours: whether a directory holds only what this command writes; None: nothing is replaced.
        inputs: files and directories the command reads, which ``out`` must not be, hold or lie inside.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        flag: str = "-o",
        command: str,
        force: bool = False,
        ours: Callable[[Path], bool] | None = None,
        inputs: Sequence[Path] = (),
    ) -> None:
        self.out, self.flag, self.command = arguments.path(out, "out"), flag, command
        self.force, self.ours = force, ours
        self._target = Path(os.path.abspath(self.out))
        check_place(self.out, flag)
        check_inputs(self.out, [Path(p) for p in inputs], flag, command)
        self._check_replaceable()
        self._dir, self.tmp = staging(self._target, "output", f"{flag} {self.out}")

    def commit(self) -> Path:
        """Move the finished directory into place (see the module docstring).

        Raises:
            InputError: what is at ``out`` now may not be replaced; it is left untouched.
        """
        if rename.place_if_absent(self.tmp, self._target):
            self._dir.remove()
            return self.out
        self._check_replaceable()
        rename.exchange(self.tmp, self._target, self._dir.path / "old")
        self._dir.remove()
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory (after :meth:`commit`: the replaced directory it holds)."""
        self._dir.remove()

    def _check_replaceable(self) -> None:
        try:
            mode = self._target.lstat().st_mode
        except FileNotFoundError:
            return
        except NotADirectoryError as e:
            raise InputError(f"{self.flag} {self.out}: lies under a file, not a directory") from e
        except OSError as e:
            raise InputError(f"{self.flag} {self.out}: cannot read it ({e.strerror or e})") from e
        where = f"{self.flag} {self.out}"
        if stat.S_ISLNK(mode):
            raise InputError(f"{where}: is a symbolic link; give the directory itself")
        if not stat.S_ISDIR(mode):
            raise InputError(f"{where}: exists and is not a directory; give a new directory")
        try:
            empty = not any(self._target.iterdir())
        except OSError as e:
            raise InputError(f"{where}: cannot read it ({e.strerror or e})") from e
        if empty:
            return
        if self.ours is None:
            raise InputError(f"{where}: already exists and is not empty; give a new or empty directory")
        if not self.ours(self._target):
            raise InputError(
                f"{where}: exists and holds files {self.command} did not write; give a new or empty directory"
            )
        if not self.force:
            raise InputError(f"{where}: already exists; pass --force to replace it")
