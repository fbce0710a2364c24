"""Which fold and which shard file each case goes to (the converter's plan).

Cases are split into folds by case, shuffled with a seed and dealt
round-robin grade by grade (HGG/LGG stay balanced across folds); each shard
holds cases of one fold only, in an order shuffled within the fold, and is
named ``brats-fold<k>-<i>-of-<n>.tfrecord``. The same cases, folds, shard
size and seed give the same plan, in any process.
"""

import math
import os
import re

import numpy as np

from data_pipeline import record_format

SHARD_PREFIX = "brats-fold"
# A shard file's name (plan_shards' names); without the "^...$" it is a part of other names.
SHARD_NAME = rf"{SHARD_PREFIX}\d+-\d+-of-\d+{re.escape(record_format.SHARD_SUFFIX)}"
_SHARD_RE = re.compile(rf"^{SHARD_NAME}$")


def assign_folds(cases, folds, seed):
    """{case_id: fold}: cases shuffled with `seed` and dealt round-robin, grade by grade
    (HGG/LGG stay balanced across folds)."""
    rng = np.random.default_rng(seed)
    assignment = {}
    k = 0
    for grade in sorted({str(c.grade) for c in cases}):
        ids = sorted(c.case_id for c in cases if str(c.grade) == grade)
        for i in rng.permutation(len(ids)):
            assignment[ids[i]] = k % folds
            k += 1
    return assignment


def plan_shards(cases, fold_of, cases_per_shard, seed):
    """[(shard file name, fold, [cases])], case order shuffled within each fold."""
    rng = np.random.default_rng([seed, 1])
    folds = sorted(set(fold_of.values()))
    plan = []
    for fold in folds:
        members = [c for c in cases if fold_of[c.case_id] == fold]
        members = [members[i] for i in rng.permutation(len(members))]
        n = max(1, math.ceil(len(members) / cases_per_shard))
        for i in range(n):
            name = f"{SHARD_PREFIX}{fold}-{i:03d}-of-{n:03d}{record_format.SHARD_SUFFIX}"
            plan.append((name, fold, members[i * cases_per_shard : (i + 1) * cases_per_shard]))
    return plan


def shard_files(folder):
    """Names of the shard files (``plan_shards``' names) in ``folder``, sorted."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if _SHARD_RE.match(n))
