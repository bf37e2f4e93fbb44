"""Writing an artifact directory atomically.

Files are written into a temporary directory beside the destination and the directory is renamed
into place only when :meth:`ArtifactWriter.commit` runs, after verification. A failed or interrupted
compile leaves nothing at the destination, and an existing destination is replaced only with
``force`` (and only at commit).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from peftc.artifact.manifest import MANIFEST_FILE, Manifest
from peftc.errors import InputError


class ArtifactWriter:
    """A temporary directory that becomes ``out`` on commit."""

    def __init__(self, out: str | Path, *, force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not force:
            raise InputError(f"{self.out}: already exists; pass --force to replace it")
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out}: exists and is not a directory")
        parent = self.out.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.peftc-", dir=parent))
        except OSError as e:
            raise InputError(f"{self.out}: cannot write to {parent} ({e.strerror or e})") from e
        self.committed = False

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest and move the directory into place."""
        (self.tmp / MANIFEST_FILE).write_text(manifest.to_json())
        self.tmp.chmod(0o755)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.tmp.parent))
            os.replace(self.out, trash / "old")
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        self.committed = True
        return self.out

    def abort(self) -> None:
        """Remove the temporary directory (no-op after commit)."""
        if not self.committed:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.tmp)
