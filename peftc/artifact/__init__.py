"""The artifact directory: manifest schema, atomic writer, validation on load."""

from peftc.artifact.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Artifact,
    Manifest,
    check_files,
    file_record,
    read_manifest,
)
from peftc.artifact.writer import ArtifactWriter

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Artifact",
    "ArtifactWriter",
    "Manifest",
    "check_files",
    "file_record",
    "read_manifest",
]
