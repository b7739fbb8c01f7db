"""TIFF sources: TIFF, OME-TIFF, BigTIFF files and folders of slices, read box by box.

- :mod:`tasks.tiff.files`: file names, versions and the per-thread cache of open files;
- :mod:`tasks.tiff.source`: what a source is (:class:`TiffSource`, picklable, no handles)
  and how one is found (series, axes, voxel sizes), :func:`open_source`;
- :mod:`tasks.tiff.reader`: :func:`read_box`, the pages and rows of one box.
"""

from tasks.tiff.files import (
    FileId,
    is_glob_pattern,
    list_tiff_files,
    natural_key,
    open_binary,
    release_files,
)
from tasks.tiff.metadata import FALLBACK_VOXEL_SIZE
from tasks.tiff.reader import read_box
from tasks.tiff.source import (
    SUPPORTED_DTYPES,
    TiffSource,
    check_one_image,
    open_source,
)

__all__ = [
    "FALLBACK_VOXEL_SIZE",
    "SUPPORTED_DTYPES",
    "FileId",
    "TiffSource",
    "check_one_image",
    "is_glob_pattern",
    "list_tiff_files",
    "natural_key",
    "open_binary",
    "open_source",
    "read_box",
    "release_files",
]
