"""Write a small DICOM-WSI slide (VL Whole Slide Microscopy Image, one file per pyramid level) for the tests.

Frames are uncompressed RGB in TILED_FULL order, one of the encodings OpenSlide 4 reads; the pixels and µm/px
are copied from any slide OpenSlide opens, so a test can compare the DICOM slide with its source pixel by pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _frames(rgb: np.ndarray, tile: int) -> list[bytes]:
    h, w, _ = rgb.shape
    frames = []
    for ty in range(-(-h // tile)):
        for tx in range(-(-w // tile)):
            frame = np.full((tile, tile, 3), 255, np.uint8)  # the right/bottom edge tiles are padded
            part = rgb[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]
            frame[: part.shape[0], : part.shape[1]] = part
            frames.append(frame.tobytes())
    return frames


def write_level(
    path: Path,
    rgb: np.ndarray,
    *,
    mpp: float,
    series: str,
    study: str,
    base_level: bool,
    tile: int = 256,
    sop_class: str = WSI_SOP_CLASS,
) -> Path:
    """One DICOM file holding one pyramid level (``rgb``: uint8 (H, W, 3)) at ``mpp`` µm/px."""
    frames = _frames(rgb, tile)
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "SM"
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if base_level
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rgb.shape[:2]
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.DimensionOrganizationType = "TILED_FULL"
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000.0, mpp / 1000.0]  # mm: rows, then columns
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PixelData = b"".join(frames)
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_copy(source: Path, folder: Path, mpp: float) -> Path:
    """A DICOM-WSI folder with the levels and pixels of the slide ``source`` (level-0 µm/px ``mpp``)."""
    folder.mkdir(parents=True, exist_ok=True)
    slide = openslide.OpenSlide(str(source))
    series, study = generate_uid(), generate_uid()
    try:
        for level, (w, h) in enumerate(slide.level_dimensions):
            rgb = np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))
            write_level(
                folder / f"level-{level}.dcm",
                rgb,
                mpp=mpp * slide.level_downsamples[level],
                series=series,
                study=study,
                base_level=level == 0,
            )
    finally:
        slide.close()
    return folder
