"""Finding BraTS cases in a folder of NIfTI files.

A case is a folder named after the case id that holds one file per modality,
`<case_id>_<suffix>.nii.gz` (or `-<suffix>`, `.nii`), and a label map
`<case_id>_seg.nii.gz` when the set is labelled. Supported layouts:

- BraTS 2018/2019: `HGG/Brats18_<id>/Brats18_<id>_{t1,t1ce,t2,flair,seg}.nii.gz`
  (and `LGG/`); the grade is taken from the parent folder.
- BraTS 2020/2021: flat, `BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz`,
  `BraTS2021_00000/BraTS2021_00000_t1.nii.gz`.
- BraTS 2023: `BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz`,
  whose enhancing tumour label 3 the converter maps to 4.

Case folders are found at any depth under the input folder. Only names are
looked at here; data checks are the converter's job.
"""

import dataclasses
import logging
import os
import re

from data_pipeline.constants import MODALITIES, MODALITIES_2023

LABEL_SUFFIX = "seg"
NAMING_2018 = "brats2018"  # t1, t1ce, t2, flair; labels {0, 1, 2, 4} (2018-2021)
NAMING_2023 = "brats2023"  # t1n, t1c, t2w, t2f; enhancing tumour written as 3
GRADES = ("HGG", "LGG")

log = logging.getLogger("data_pipeline.layouts")

_NIFTI_RE = re.compile(r"^(?P<stem>.+)[_-](?P<suffix>[A-Za-z0-9]+)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class Case:
    """One case's files. `images` maps each name of MODALITIES (the project's
    channel order, whatever the naming on disk) to its path, or None when
    missing; `label` is the label map's path or None."""

    case_id: str
    folder: str
    naming: str
    images: dict
    label: str | None
    grade: str | None = None

    @property
    def missing(self):
        """Modalities (project names) whose file was not found."""
        return tuple(m for m in MODALITIES if self.images.get(m) is None)

    def expected_path(self, modality):
        """The path a modality's file should have, for error messages."""
        suffixes = MODALITIES if self.naming == NAMING_2018 else MODALITIES_2023
        sep = "-" if self.naming == NAMING_2023 else "_"
        suffix = suffixes[MODALITIES.index(modality)] if modality in MODALITIES else modality
        return os.path.join(self.folder, f"{self.case_id}{sep}{suffix}.nii.gz")


def _case_from_folder(folder, names):
    """Builds a Case from the NIfTI file names in `folder`, or None if it is not a case."""
    case_id = os.path.basename(folder)
    found = {}
    for name in names:
        match = _NIFTI_RE.match(name)
        if match and match.group("stem") == case_id:
            found[match.group("suffix").lower()] = os.path.join(folder, name)
    n_2018 = sum(s in found for s in MODALITIES)
    n_2023 = sum(s in found for s in MODALITIES_2023)
    if n_2018 == 0 and n_2023 == 0:
        return None
    naming = NAMING_2023 if n_2023 > n_2018 else NAMING_2018
    suffixes = MODALITIES_2023 if naming == NAMING_2023 else MODALITIES
    images = {m: found.get(s) for m, s in zip(MODALITIES, suffixes)}
    parent = os.path.basename(os.path.dirname(folder))
    grade = parent if parent in GRADES else None
    return Case(
        case_id=case_id,
        folder=folder,
        naming=naming,
        images=images,
        label=found.get(LABEL_SUFFIX),
        grade=grade,
    )


def find_cases(input_dir):
    """All cases under `input_dir`, sorted by case id.

    Raises:
      FileNotFoundError: `input_dir` is not a folder.
      ValueError: no case was found, or two folders share a case id.
    """
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input_dir {input_dir!r} is not a folder")
    cases = []
    unmatched = []  # folders with NIfTI files none of which is named after the folder
    for folder, dirs, files in os.walk(input_dir, followlinks=True):
        dirs.sort()
        case = _case_from_folder(folder, files)
        if case is not None:
            cases.append(case)
        elif any(_NIFTI_RE.match(name) for name in files):
            unmatched.append(folder)
    if unmatched:
        example = unmatched[0]
        log.warning(
            "%d folder(s) under %s hold NIfTI files not named after their folder and are "
            "skipped, e.g. %s (expected %s_<modality>.nii.gz there)",
            len(unmatched),
            input_dir,
            example,
            os.path.basename(example),
        )
    if not cases:
        raise ValueError(
            f"no BraTS case found under {input_dir!r}: expected folders <case_id>/ holding "
            f"<case_id>_{{{','.join(MODALITIES)}}}.nii.gz (2018-2021) or "
            f"<case_id>-{{{','.join(MODALITIES_2023)}}}.nii.gz (2023)"
        )
    cases.sort(key=lambda c: c.case_id)
    for a, b in zip(cases, cases[1:]):
        if a.case_id == b.case_id:
            raise ValueError(f"case {a.case_id}: found twice, in {a.folder!r} and {b.folder!r}")
    return cases
