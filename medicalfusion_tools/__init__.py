"""The tools around MedicalFusion that the Slicer extension does not ship: ``evaluate`` (the
published tables on the aanlib pairs), ``training`` (the networks' trainers), ``hotspot`` (the
hot-spot and anatomy measures of the real-case study) and ``cohort`` (``medicalfusion batch`` on
Dask).

They are part of the pip package (``pip install -e .``, ``make setup``) and run through the
``medicalfusion`` command (``evaluate``, ``train``, ``batch``); every one of them fuses through the
same pipeline (:mod:`MedicalFusionLib.pipeline`) and scores with the same metrics engine
(:mod:`MedicalFusionLib.metrics`) as the CLI and the panel. They import the core absolutely
(``MedicalFusionLib...``); the core never imports them except lazily from the CLI.
"""
