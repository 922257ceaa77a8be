"""PET units from DICOM headers made for the purpose (pydicom, into tmp_path): GML is SUVbw as it is;
BQML becomes SUVbw from weight, dose, half-life and times (START / ADMIN / NONE decay correction,
series vs acquisition time, start date-time vs start time, per-slice rescale slope); CNTS and
missing fields stay raw with a one-line notice; a CT is HU. The expected SUV factors are worked
out here from the QIBA formula with the header's numbers, independently of the code under test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("pydicom")

from dicom_series import BQML_FIELDS, RADIOPHARMACEUTICAL, write_series  # noqa: E402

from MedicalFusionLib import cli  # noqa: E402
from MedicalFusionLib.io import dicom  # noqa: E402
from MedicalFusionLib.io.read import read_source  # noqa: E402

WEIGHT_G = 70_000.0
DOSE_BQ = 3.7e8
HALF_LIFE_S = 6588.0
SLOPES = [0.5, 0.25, 2.0, 1.0]


@pytest.fixture
def stored():
    rng = np.random.default_rng(7)
    return rng.integers(0, 3000, size=(4, 6, 5)).astype(np.int16)


def _read(folder):
    src = read_source(folder, "functional")
    return src, sitk.GetArrayFromImage(src.image).astype(np.float64)


def _bq_ml(stored):
    return stored * np.asarray(SLOPES)[:, None, None]


def test_gml_is_suvbw_as_it_is_with_per_slice_slopes(tmp_path, stored):
    write_series(tmp_path / "pet", stored, slopes=SLOPES, fields={**BQML_FIELDS, "Units": "GML"},
                 radiopharmaceutical=RADIOPHARMACEUTICAL)
    src, values = _read(tmp_path / "pet")
    assert src.facts.units == "SUVbw" and src.facts.raw_units == "GML" and not src.facts.notice
    assert src.facts.suv_factor == 1.0
    # every slice rescaled by its own slope (GE writes one per slice)
    np.testing.assert_allclose(values, _bq_ml(stored), rtol=1e-6)


def test_gml_with_another_suv_type_is_named(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "Units": "GML", "SUVType": "LBM"})
    assert read_source(tmp_path / "pet", "functional").facts.units == "SUVlbm"


def test_bqml_start_decays_the_dose_to_the_series_time(tmp_path, stored):
    write_series(tmp_path / "pet", stored, slopes=SLOPES, fields=BQML_FIELDS, radiopharmaceutical=RADIOPHARMACEUTICAL)
    src, values = _read(tmp_path / "pet")
    # injection 10:00:00, series (= scan start) 11:00:00: one hour of decay
    factor = WEIGHT_G / (DOSE_BQ * 2.0 ** (-3600.0 / HALF_LIFE_S))
    assert src.facts.units == "SUVbw" and src.facts.raw_units == "BQML" and not src.facts.notice
    assert src.facts.suv_factor == pytest.approx(factor, rel=1e-9)
    np.testing.assert_allclose(values, _bq_ml(stored) * factor, rtol=1e-5)


def test_bqml_admin_uses_the_injected_dose(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "DecayCorrection": "ADMIN"},
                 radiopharmaceutical=RADIOPHARMACEUTICAL)
    src, values = _read(tmp_path / "pet")
    assert src.facts.suv_factor == pytest.approx(WEIGHT_G / DOSE_BQ, rel=1e-9)
    np.testing.assert_allclose(values, stored * WEIGHT_G / DOSE_BQ, rtol=1e-5)


def test_bqml_none_decays_each_slice_to_its_own_acquisition(tmp_path, stored):
    times = ["110000", "110200", "110400", "110600"]
    write_series(tmp_path / "pet", stored, slopes=SLOPES, fields={**BQML_FIELDS, "DecayCorrection": "NONE"},
                 radiopharmaceutical=RADIOPHARMACEUTICAL,
                 per_slice={"AcquisitionTime": times, "ActualFrameDuration": [120000] * 4})
    src, values = _read(tmp_path / "pet")
    lam = math.log(2) / HALF_LIFE_S
    in_frame = (1 - math.exp(-lam * 120.0)) / (lam * 120.0)
    factors = [WEIGHT_G / (DOSE_BQ * math.exp(-lam * (3600.0 + 120.0 * k)) * in_frame) for k in range(4)]
    assert src.facts.suv_factor is None              # not one factor: one per slice
    np.testing.assert_allclose(src.facts.suv_factors, factors, rtol=1e-9)
    np.testing.assert_allclose(values, _bq_ml(stored) * np.asarray(factors)[:, None, None], rtol=1e-5)


def test_series_time_after_acquisition_uses_the_earliest_acquisition(tmp_path, stored):
    # a post-processed series: Series Time 13:00 is after the acquisition (11:00-11:06)
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "SeriesTime": "130000"},
                 radiopharmaceutical=RADIOPHARMACEUTICAL,
                 per_slice={"AcquisitionTime": ["110600", "110000", "110200", "110400"]})
    src, _ = _read(tmp_path / "pet")
    assert src.facts.suv_factor == pytest.approx(WEIGHT_G / (DOSE_BQ * 2.0 ** (-3600.0 / HALF_LIFE_S)), rel=1e-9)


def test_start_datetime_wins_over_start_time(tmp_path, stored):
    pharma = {**RADIOPHARMACEUTICAL, "RadiopharmaceuticalStartTime": "093000",
              "RadiopharmaceuticalStartDateTime": "20200102101500"}
    write_series(tmp_path / "pet", stored, fields=BQML_FIELDS, radiopharmaceutical=pharma)
    src, _ = _read(tmp_path / "pet")
    assert src.facts.suv_factor == pytest.approx(WEIGHT_G / (DOSE_BQ * 2.0 ** (-2700.0 / HALF_LIFE_S)), rel=1e-9)


def test_start_time_before_midnight_for_a_scan_after_it(tmp_path, stored):
    fields = {**BQML_FIELDS, "SeriesDate": "20200103", "AcquisitionDate": "20200103",
              "SeriesTime": "003000", "AcquisitionTime": "003000"}
    write_series(tmp_path / "pet", stored, fields=fields,
                 radiopharmaceutical={**RADIOPHARMACEUTICAL, "RadiopharmaceuticalStartTime": "233000"})
    src, _ = _read(tmp_path / "pet")
    assert src.facts.suv_factor == pytest.approx(WEIGHT_G / (DOSE_BQ * 2.0 ** (-3600.0 / HALF_LIFE_S)), rel=1e-9)


@pytest.mark.parametrize("fields, pharma, named", [
    ({"PatientWeight": None}, {}, "Patient's Weight"),
    ({"PatientWeight": "0"}, {}, "Patient's Weight"),
    ({}, {"RadionuclideTotalDose": None}, "Radionuclide Total Dose"),
    ({}, {"RadionuclideHalfLife": None}, "Radionuclide Half Life"),
    ({}, {"RadiopharmaceuticalStartTime": None}, "Radiopharmaceutical Start"),
    ({"DecayCorrection": None}, {}, "Decay Correction"),
    ({"SeriesTime": None, "AcquisitionTime": None}, {}, "Date/Time"),
], ids=["no-weight", "zero-weight", "no-dose", "no-half-life", "no-start-time", "no-decay-correction", "no-times"])
def test_bqml_with_a_field_missing_stays_raw_with_one_line(tmp_path, stored, fields, pharma, named):
    write_series(tmp_path / "pet", stored, slopes=SLOPES, fields={**BQML_FIELDS, **fields},
                 radiopharmaceutical={**RADIOPHARMACEUTICAL, **pharma})
    src, values = _read(tmp_path / "pet")
    assert src.facts.units == "BQML" and src.facts.suv_factors is None
    assert named in src.facts.notice and "\n" not in src.facts.notice and "not SUV" in src.facts.notice
    np.testing.assert_allclose(values, _bq_ml(stored), rtol=1e-6)     # raw Bq/ml, untouched


def test_bqml_without_the_radiopharmaceutical_sequence_stays_raw(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields=BQML_FIELDS, radiopharmaceutical=None)
    facts = read_source(tmp_path / "pet", "functional").facts
    assert facts.units == "BQML" and "Radionuclide Total Dose" in facts.notice


def test_not_attenuation_corrected_stays_raw(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "CorrectedImage": ["DECY"]},
                 radiopharmaceutical=RADIOPHARMACEUTICAL)
    facts = read_source(tmp_path / "pet", "functional").facts
    assert facts.units == "BQML" and "ATTN" in facts.notice


def test_scan_before_injection_stays_raw(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields=BQML_FIELDS,
                 radiopharmaceutical={**RADIOPHARMACEUTICAL, "RadiopharmaceuticalStartDateTime": "20200102120000"})
    facts = read_source(tmp_path / "pet", "functional").facts
    assert facts.units == "BQML" and "before the injection" in facts.notice


def test_cnts_stays_raw_counts_with_one_line(tmp_path, stored):
    write_series(tmp_path / "pet", stored, slopes=SLOPES, fields={**BQML_FIELDS, "Units": "CNTS"},
                 radiopharmaceutical=RADIOPHARMACEUTICAL)
    src, values = _read(tmp_path / "pet")
    assert src.facts.units == "CNTS" and "CNTS" in src.facts.notice and "\n" not in src.facts.notice
    np.testing.assert_allclose(values, _bq_ml(stored), rtol=1e-6)


def test_cnts_with_philips_suv_scale_factor_is_suv(tmp_path, stored):
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "Units": "CNTS"},
                 private=(0x7053, "Philips PET Private Group", 0x00, "DS", "0.000123"))
    src, values = _read(tmp_path / "pet")
    assert src.facts.units == "SUVbw" and not src.facts.notice
    np.testing.assert_allclose(values, stored * 0.000123, rtol=1e-5)


def test_ct_is_hounsfield_and_the_facts_api_gives_the_frame_of_reference(tmp_path, stored):
    write_series(tmp_path / "ct", stored - 1000, modality="CT", frame_of_reference="1.2.3.4")
    write_series(tmp_path / "us", stored, modality="CT", fields={"RescaleType": "US"})
    facts = dicom.series_facts(tmp_path / "ct")
    assert (facts.modality, facts.units, facts.frame_of_reference_uid) == ("CT", "HU", "1.2.3.4")
    assert facts.is_ct_hu and len(facts.files) == 4
    assert dicom.series_facts(tmp_path / "us").units == "US"       # rescaled to something other than HU


def test_cli_prints_one_notice_and_writes_units_into_outputs(tmp_path, stored, capsys):
    ct = np.full((4, 12, 10), 40, np.int16)
    ct[:, :2] = -1000                                               # air: a CT in HU by its header anyway
    write_series(tmp_path / "ct", ct, modality="CT", spacing=(1.0, 1.0, 3.0))
    write_series(tmp_path / "pet", stored, fields={**BQML_FIELDS, "PatientWeight": None},
                 radiopharmaceutical=RADIOPHARMACEUTICAL)
    out, metrics = tmp_path / "fused.nrrd", tmp_path / "metrics.csv"
    rc = cli.main(["fuse", "-a", str(tmp_path / "ct"), "-f", str(tmp_path / "pet"), "-m", "average",
                   "-o", str(out), "--metrics", str(metrics), "-q"])
    err = capsys.readouterr().err
    assert rc == 0
    notices = [line for line in err.splitlines() if "medicalfusion: note:" in line]
    units = [line for line in notices if "Units are" in line]
    assert len(units) == 1 and "Patient's Weight" in units[0] and "BQML" in units[0]
    # both made-up series share one FrameOfReferenceUID: registration's note says so, once
    assert len(notices) == 2 and sum("FrameOfReferenceUID" in line for line in notices) == 1
    fused = sitk.ReadImage(str(out))
    assert fused.GetMetaData("MedicalFusion.functional_units") == "BQML"
    assert fused.GetMetaData("MedicalFusion.anatomical_units") == "HU"
    assert fused.GetMetaData("MedicalFusion.anatomical_window") == "-135..215"
    rows = {line.split(",")[0]: line.split(",")[1] for line in metrics.read_text().splitlines()[1:]}
    assert rows["functional_units"] == "BQML" and rows["anatomical_units"] == "HU"
    assert rows["anatomical_frame_of_reference_uid"] == rows["functional_frame_of_reference_uid"]
