"""The protocol of a prediction: how it was made (region, padding, TTA,
ensemble size, threshold, post-processing; §4), as evaluation.json,
summary.json, the SavedModel's metadata and the client's output record it."""

from __future__ import annotations

from data_pipeline import constants, volume


def region_name(crop_to_brain: bool) -> str:
    """The protocol's name of what the network ran on: 'brain_box' or 'whole_volume'."""
    return "brain_box" if crop_to_brain else "whole_volume"


def protocol(
    region: str,
    tta: bool,
    ensemble_size: int = 1,
    threshold: float = 0.5,
    et_min_voxels: int = 0,
    multiple: int = constants.SPATIAL_DIVISOR,
) -> dict:
    """How a prediction was made, as evaluation.json, summary.json, the
    SavedModel's metadata and the client's output record it. ``region``:
    ``region_name(crop_to_brain)``, or what an evaluation of several models ran on.

    The paper's protocol (§4): the whole volume zero-padded to a multiple of 8
    (240 x 240 x 155 -> 240 x 240 x 160), one model or an ensemble of 10 with
    or without the 8 mirror flips, p > 0.5, no post-processing.
    """
    et_min_voxels = volume.check_et_min_voxels(et_min_voxels)
    return {
        "region": region,
        "padding": f"zeros to a multiple of {int(multiple)}, split evenly (odd voxel after)",
        "tta": "8 mirror flips" if tta else "none",
        "ensemble_size": int(ensemble_size),
        "threshold": float(threshold),
        "post_processing": volume.describe_et_to_necrosis(et_min_voxels),
        "et_min_voxels": et_min_voxels,
    }


def describe_protocol(p: dict) -> str:
    """``protocol``'s dict as one line, e.g. 'whole volume, TTA, 1 model, p > 0.5'."""
    parts = [
        "brain box"
        if p["region"] == "brain_box"
        else "whole volume"
        if p["region"] == "whole_volume"
        else str(p["region"]),
        "TTA (8 flips)" if p["tta"] != "none" else "no TTA",
        f"{p['ensemble_size']} model{'s' if p['ensemble_size'] != 1 else ''}",
        f"p > {p['threshold']:g}",
    ]
    if p["et_min_voxels"]:
        parts.append(f"ET < {p['et_min_voxels']} voxels -> NCR")
    if "et_label" in p:  # an evaluation's: the label its predictions give ET
        parts.append(f"ET as {p['et_label']}")
    return ", ".join(parts)
