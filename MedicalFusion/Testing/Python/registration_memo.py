"""A test-only cache of ``MedicalFusionLib.registration.register`` for the tests of the front doors
that register (the scene's fuse_nodes / register_nodes, the panel's "Register first"): several of
them register the very same pair with the very same settings, and what they check is what the front
door does with the answer (transform nodes, parents, attributes, status text), not the optimiser.

With the ``shared_registrations`` fixture (conftest.py) a call whose inputs were registered before in
this process (same voxels, geometry, kind, start and settings) returns a copy of that answer without
running the optimiser again; the first call runs the real registration, with its progress and cancel.
The registration gives the same answer bit for bit on the same inputs
(test_registration.py::test_the_same_inputs_give_the_same_answer_bit_for_bit), so the answer is
the one the call would have computed. A call that fails is not kept (the next one runs again).

Not for the tests of the registration's own behaviour while it runs (progress, cancel, errors):
those run it for real (they do not take the fixture).
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import SimpleITK as sitk

from MedicalFusionLib import registration as reg

_ANSWERS: dict = {}
#: how many calls ran the registration / were answered from the cache (for the tests of this helper)
stats = {"ran": 0, "reused": 0}


def _image_key(image: sitk.Image) -> tuple:
    voxels = np.ascontiguousarray(sitk.GetArrayViewFromImage(image))
    return (image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetPixelIDValue(),
            image.GetNumberOfComponentsPerPixel(), hashlib.sha256(voxels.tobytes()).hexdigest())


def _transform_key(transform: sitk.Transform | None):
    if transform is None:
        return None
    return (transform.GetName(), transform.GetParameters(), transform.GetFixedParameters())


def _copy(outcome: reg.Registration) -> reg.Registration:
    transform = sitk.AffineTransform(3)
    transform.SetFixedParameters(outcome.transform.GetFixedParameters())
    transform.SetParameters(outcome.transform.GetParameters())
    return dataclasses.replace(outcome, transform=transform, level_iterations=list(outcome.level_iterations))


def install(monkeypatch) -> None:
    """Replace ``registration.register`` (where the scene and the panel look it up) for one test."""
    real = reg.register

    def register(anatomical, functional, kind="rigid", initial=None, progress=None, cancel=None, settings=None):
        key = (_image_key(anatomical), _image_key(functional), kind, _transform_key(initial),
               repr(settings or reg.RegistrationSettings()))        # every field, whatever its type
        if key not in _ANSWERS:
            stats["ran"] += 1
            _ANSWERS[key] = _copy(real(anatomical, functional, kind, initial=initial, progress=progress,
                                       cancel=cancel, settings=settings))
        else:
            stats["reused"] += 1
        return _copy(_ANSWERS[key])

    monkeypatch.setattr(reg, "register", register)
