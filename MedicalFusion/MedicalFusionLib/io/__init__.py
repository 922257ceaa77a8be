"""Everything that touches files, folders and servers: paths and file checks (files.py), reading
the inputs (read.py), DICOM headers, units and series (dicom.py), DICOM export (dicom_export.py),
PACS over DICOMweb (pacs.py), and writing every output all or nothing (outputs.py).

Nothing is imported here: ``from MedicalFusionLib.io import read`` loads only what it needs. (Inside
the package every import is relative, so this package never hides the standard library's ``io``.)
"""
