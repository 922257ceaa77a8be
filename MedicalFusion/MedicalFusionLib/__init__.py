"""MedicalFusion: multimodal medical image fusion, the Qt-free core of the 3D Slicer extension."""

__version__ = "0.1.0"
