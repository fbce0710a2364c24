"""The tools that measure a recipe on real cases: benchmarks/seed_check.py's
verdicts and benchmarks/real_cv.py's gathering of fold records (hand-made
records, hand-computed means)."""

import json

import pytest

from benchmarks import real_cv, seed_check
from brats_tf import training


def test_seed_check_threshold_is_train_py_s():
    assert seed_check.UNLEARNED_DICE == training.UNLEARNED_DICE


@pytest.mark.parametrize(
    "text,seeds", [("0-4", [0, 1, 2, 3, 4]), ("3", [3]), ("0,3,4", [0, 3, 4]), ("7-7", [7])]
)
def test_seed_check_parses_seeds(text, seeds):
    assert seed_check.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["4-0", "a", "1-2-3", ""])
def test_seed_check_rejects_bad_seeds(text):
    with pytest.raises(ValueError, match="--seeds"):
        seed_check.parse_seeds(text)


def test_seed_check_verdict_reads_the_last_epoch():
    history = [
        {"dice_WT": 0.05, "dice_TC": 0.0, "dice_ET": 0.0},
        {"dice_WT": 0.6, "dice_TC": 0.3, "dice_ET": 0.09},
    ]
    assert seed_check.verdict(history) == {
        "learned": False,
        "unlearned": ["ET"],
        "last": {"WT": 0.6, "TC": 0.3, "ET": 0.09},
    }
    history[-1]["dice_ET"] = 0.1
    assert seed_check.verdict(history)["learned"]
    assert seed_check.verdict([]) == {"learned": False, "unlearned": ["WT", "TC", "ET"], "last": {}}


def _fold(fold, cases, minutes):
    """A fold record with the given {case: (WT, TC, ET) Dice}; HD95 = 10 x Dice."""

    def row(scale):
        per_case = {
            c: {
                r: {"dice": d * scale, "hd95": 10 * d * scale}
                for r, d in zip(("WT", "TC", "ET"), v)
            }
            for c, v in cases.items()
        }
        mean = {
            r: {
                m: sum(p[r][m] for p in per_case.values()) / len(per_case) for m in ("dice", "hd95")
            }
            for r in ("WT", "TC", "ET")
        }
        return {"title": "", "protocol": {}, "mean": mean, "per_case": per_case}

    def titled(row_, name):
        return dict(row_, title=real_cv.ROW_TITLES[name])

    return {
        "fold": fold,
        "train": {"training_minutes": minutes, "curve": []},
        "rows": {"single": titled(row(1.0), "single"), "tta": titled(row(1.1), "tta")},
    }


def test_real_cv_gathers_folds_by_fold_and_by_case(tmp_path):
    (tmp_path / "fold_0.json").write_text(
        json.dumps(_fold(0, {"a": (0.8, 0.6, 0.4), "b": (0.6, 0.4, 0.2)}, 55.0))
    )
    (tmp_path / "fold_1.json").write_text(json.dumps(_fold(1, {"c": (0.9, 0.8, 0.7)}, 58.5)))
    cv = real_cv.gather(str(tmp_path))
    assert cv["folds"] == [0, 1] and set(cv["rows"]) == {"single", "tta"}
    single = cv["rows"]["single"]
    # fold means: WT 0.7 and 0.9 -> 0.8; cases: (0.8 + 0.6 + 0.9) / 3
    assert single["mean_of_folds"]["WT"]["dice"] == pytest.approx(0.8)
    assert single["mean_of_cases"]["WT"]["dice"] == pytest.approx(2.3 / 3)
    assert single["mean_of_cases"]["ET"]["hd95"] == pytest.approx(10 * 1.3 / 3)
    assert single["per_fold"]["1"]["TC"]["dice"] == pytest.approx(0.8)
    assert cv["rows"]["tta"]["mean_of_folds"]["TC"]["dice"] == pytest.approx(1.1 * 0.65)
    assert single["num_cases"] == 3
    assert cv["training_minutes"] == {"0": 55.0, "1": 58.5}
    table = real_cv.markdown(cv).splitlines()
    assert (
        "| single model | mean of 2 fold(s), 3 cases | 0.800 / 0.650 / 0.500 | 8.0 / 6.5 / 5.0 |"
        in table
    )
    assert "| single model + TTA | fold 1 | 0.990 / 0.880 / 0.770 | 9.9 / 8.8 / 7.7 |" in table


def test_make_real_without_a_folder_says_what_it_needs():
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        ["make", "-s", "real", "REAL_DIR="], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "make real needs REAL_DIR=" in proc.stdout + proc.stderr
