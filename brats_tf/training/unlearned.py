"""Regions a training run has not learned, told from its training Dice."""

from __future__ import annotations

from data_pipeline import constants

# A region whose training Dice (``metrics.RegionDice``, the mean over the last
# epoch's crops) ends below this has not been learned: its sigmoid channel
# saturated early in training and gets no gradient since (all-on in the brain,
# or nothing), as the demo's seeds 1 and 2 did (docs/demo_runs.md). A
# trained demo model ends at 0.6-0.95 per region, such runs at 0.00-0.01.
UNLEARNED_DICE = 0.1


def unlearned_regions(summary: dict, threshold: float = UNLEARNED_DICE) -> dict:
    """{region: training Dice} of the regions an epoch's ``summary`` (a
    history.json entry, ``dice_<region>``) shows unlearned; {} when none is."""
    return {
        region: float(summary[f"dice_{region}"])
        for region in constants.REGIONS
        if isinstance(summary.get(f"dice_{region}"), (int, float))
        and summary[f"dice_{region}"] < threshold
    }
