"""Small DICOM series made for the tests with pydicom (PET with the SUV fields, CT in HU), written
into a test's tmp_path: no shared DICOM is ever copied into the repository."""
from __future__ import annotations

import pathlib

import numpy as np

PET_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"
SOP_CLASS = {"PT": PET_SOP_CLASS, "CT": CT_SOP_CLASS, "MR": MR_SOP_CLASS}

#: A complete BQML header (the SUV fields of the QIBA pseudo-code), as a GE PET/CT writes them.
BQML_FIELDS = {
    "Units": "BQML",
    "DecayCorrection": "START",
    "CorrectedImage": ["DECY", "ATTN", "SCAT"],
    "PatientWeight": "70.0",
    "SeriesDate": "20200102",
    "SeriesTime": "110000",
    "AcquisitionDate": "20200102",
    "AcquisitionTime": "110000",
}
RADIOPHARMACEUTICAL = {
    "RadiopharmaceuticalStartTime": "100000.00",
    "RadionuclideTotalDose": "370000000",     # Bq
    "RadionuclideHalfLife": "6588.0",         # s (18F)
}


def write_series(folder: pathlib.Path, stored: np.ndarray, modality: str = "PT", slopes=None, fields=None,
                 radiopharmaceutical=None, per_slice=None, spacing=(2.0, 2.0, 3.0), origin=(-10.0, -12.0, 40.0),
                 frame_of_reference="1.2.826.0.1.3680043.8.498.1", private=None) -> list[pathlib.Path]:
    """Write ``stored`` (int16 [Z, Y, X]) as one DICOM series of single-frame files in ``folder``.

    ``slopes``: the rescale slope of every slice; ``fields``: header keywords -> values (None
    removes one); ``radiopharmaceutical``: the one item of the Radiopharmaceutical Information
    Sequence (None: no sequence); ``per_slice``: keyword -> list of values, one per slice;
    ``private``: (group, creator, element offset, VR, value) of one private element.
    """
    import pydicom  # noqa: PLC0415
    from pydicom.dataset import Dataset, FileMetaDataset  # noqa: PLC0415
    from pydicom.sequence import Sequence  # noqa: PLC0415
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    stored = np.asarray(stored, dtype=np.int16)
    nz, ny, nx = stored.shape
    slopes = list(slopes) if slopes is not None else [1.0] * nz
    series_uid, study_uid = generate_uid(), generate_uid()
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = "TEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.SeriesDescription = f"test {modality}"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = f"{slopes[k]:.10g}"
        for key, value in (fields or {}).items():
            if value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        for key, values in (per_slice or {}).items():
            setattr(ds, key, values[k])
        if radiopharmaceutical is not None:
            item = Dataset()
            for key, value in radiopharmaceutical.items():
                if value is not None:
                    setattr(item, key, value)
            ds.RadiopharmaceuticalInformationSequence = Sequence([item])
        if private is not None:
            group, creator, offset, vr, value = private
            ds.private_block(group, creator, create=True).add_new(offset, vr, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"slice{k:03d}.dcm"
        try:
            pydicom.dcmwrite(path, ds, enforce_file_format=True)      # pydicom 3
        except TypeError:
            ds.is_little_endian, ds.is_implicit_VR = True, False          # pydicom 2
            pydicom.dcmwrite(path, ds, write_like_original=False)
        paths.append(path)
    return paths
