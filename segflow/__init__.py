"""segflow: exact overlap-tile U-Net segmentation of very large microscopy volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("segflow")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"
