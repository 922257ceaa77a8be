#!/usr/bin/env python
"""Run a peer registration tool on one pair of image files, for scripts/bench_registration.py.

    python scripts/registration_peers.py --tool elastix|ants FIXED MOVING OUT.tfm

Runs in the benchmark peers' own venv (``make bench-deps``: itk-elastix and antspyx, whose numpy and
scipy pins differ from the project's), with nothing of MedicalFusion imported. Writes the transform
it found as an ITK transform file in ITK's convention (a physical point of FIXED -> the point of
MOVING that lands there, LPS mm: what MedicalFusion's registration returns) and prints one JSON line
{"seconds": s, "cpu": s} for the registration alone (reading, imports and writing excluded).

- elastix: itk-elastix's default "rigid" parameter map, unchanged (EulerTransform, advanced Mattes
  mutual information, adaptive stochastic gradient descent, 4 levels). In itk-elastix 0.25 that map
  has no automatic transform initialisation: it starts from the images' placement, as ours does.
- ants: ``ants.registration(fixed, moving, type_of_transform="Rigid", random_seed=1)``, ANTsPy's
  defaults otherwise (it first matches the centres of mass, as users running it get).

Threads: as the environment says (the benchmark sets ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import SimpleITK as sitk


def elastix(fixed_path: str, moving_path: str) -> sitk.Transform:
    import itk  # noqa: PLC0415

    fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("rigid"))
    _, found = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    params = found.GetParameterMap(0)
    values = [float(v) for v in params["TransformParameters"]]
    centre = [float(v) for v in params["CenterOfRotationPoint"]]
    euler = sitk.Euler3DTransform()
    euler.SetCenter(centre)
    euler.SetComputeZYX(params.get("ComputeZYX", ("false",))[0] == "true")
    euler.SetRotation(*values[:3])
    euler.SetTranslation(values[3:6])
    return euler


def ants_rigid(fixed_path: str, moving_path: str) -> sitk.Transform:
    import ants  # noqa: PLC0415

    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    found = ants.registration(fixed, moving, type_of_transform="Rigid", random_seed=1)
    return sitk.ReadTransform(found["fwdtransforms"][0])       # fixed point -> moving point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, choices=("elastix", "ants"))
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    run = {"elastix": elastix, "ants": ants_rigid}[args.tool]
    t0, c0 = time.perf_counter(), time.process_time()
    transform = run(args.fixed, args.moving)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    m = np.eye(4)                       # as a plain affine (the composite ANTs writes reads as one)
    origin = np.array(transform.TransformPoint((0.0, 0.0, 0.0)))
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.array(transform.TransformPoint(tuple(e))) - origin
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(m[:3, :3].ravel().tolist())
    affine.SetTranslation(origin.tolist())
    sitk.WriteTransform(affine, args.out)
    print(json.dumps({"seconds": seconds, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
