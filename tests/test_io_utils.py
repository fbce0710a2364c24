"""io_utils.py: atomic writes of files and folders (a hidden temporary, then a rename)."""

import json
import os
import stat

import pytest

from data_pipeline import io_utils


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_text_and_json_replace_the_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    io_utils.write_json_atomic(path, {"b": 1, "a": [2]}, indent=1)
    assert path.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}'  # sorted keys
    assert json.loads(path.read_text()) == {"a": [2], "b": 1}
    io_utils.write_text_atomic(str(tmp_path / "b.txt"), "text")
    assert (tmp_path / "b.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]  # no temporary
    assert _mode(path) == _mode(tmp_path / "b.txt") == 0o666 & ~io_utils.umask()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "case.nii.gz"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="half way"):
        with io_utils.atomic_path(path, suffix=".nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".case.nii.gz.")
            assert tmp.name.endswith(".tmp.nii.gz") and tmp.is_file()
            tmp.write_text("new, half")
            raise RuntimeError("half way")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_umask_is_read_without_being_changed():
    before = os.umask(0o027)
    try:
        assert io_utils.umask() == 0o027 and io_utils.umask() == 0o027
    finally:
        os.umask(before)


def test_folder_is_renamed_into_place_and_replaces_an_old_one(tmp_path):
    out = tmp_path / "out"
    with io_utils.atomic_path(out, directory=True) as staging:
        assert staging.is_dir() and staging.name.startswith(".out.tmp-")
        assert not out.exists()  # nothing visible before the end
        (staging / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    assert _mode(out) == 0o777 & ~io_utils.umask()  # not mkdtemp's 0700
    with io_utils.atomic_path(out, directory=True) as staging:
        (staging / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # the old folder is gone
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_folder_keeps_the_old_one(tmp_path):
    out = tmp_path / "1"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyError):
        with io_utils.atomic_path(out, directory=True) as staging:
            (staging / "new.txt").write_text("new")
            raise KeyError("stop")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["1"]


def test_the_old_folder_is_put_back_when_the_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(dst) == str(out) and ".tmp-" in str(src):
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(io_utils.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        with io_utils.atomic_path(out, directory=True) as staging:
            (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_expand_pattern(tmp_path):
    for name in ("member_1", "member_0", "member_10", "other"):
        (tmp_path / name).mkdir()
    assert io_utils.expand_pattern(tmp_path / "member_*") == [
        str(tmp_path / n) for n in ("member_0", "member_1", "member_10")
    ]
    assert io_utils.expand_pattern(f"{tmp_path}/member_[01]") == [
        str(tmp_path / n) for n in ("member_0", "member_1")
    ]
    assert io_utils.expand_pattern(tmp_path / "nothing_*") == []
    # no wildcard: the path as given, whether or not it exists
    assert io_utils.expand_pattern(tmp_path / "missing") == [str(tmp_path / "missing")]


def test_stale_temporaries_are_exactly_the_names_atomic_path_makes(tmp_path):
    """What a write killed before its rename leaves is found by its name; names
    of another pattern (a user's) are not."""
    model = tmp_path / "model.keras"
    for mine in (".model.keras.notes.tmp.keras", ".model.keras.abcd1234.tmp.keras.bak"):
        (tmp_path / mine).write_text("mine")
    with io_utils.atomic_path(model, suffix=".keras") as tmp:
        assert io_utils.stale_temporaries(model, ".keras") == [tmp]
        assert io_utils.stale_temporaries(model, ".keras", directory=True) == []
    for mine in (".1.tmp-notes", ".1.tmp-abcd1234.old", ".2.tmp-abcd1234"):
        (tmp_path / mine).mkdir()
    with io_utils.atomic_path(tmp_path / "1", directory=True) as tmp:
        assert io_utils.stale_temporaries(tmp_path / "1", directory=True) == [tmp]
    assert io_utils.stale_temporaries(tmp_path / "1", directory=True) == []
    assert io_utils.stale_temporaries(model, ".keras") == []


def test_update_text_leaves_a_file_of_the_same_text_alone(tmp_path):
    path = tmp_path / "flags.txt"
    assert io_utils.update_text(path, "--a=1\n") and path.read_text() == "--a=1\n"
    mtime = path.stat().st_mtime_ns
    assert not io_utils.update_text(path, "--a=1\n") and path.stat().st_mtime_ns == mtime
    assert io_utils.update_text(path, "--a=2\n") and path.read_text() == "--a=2\n"
