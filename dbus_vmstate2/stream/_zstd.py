"""The one place that imports zstd (docs/stream-format.md §4).

``compression.zstd`` is in the standard library from Python 3.14; before that
the ``backports.zstd`` package provides the same module.
"""

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # Python < 3.14
    from backports import zstd  # type: ignore[import-not-found,no-redef]

__all__ = ["zstd"]
