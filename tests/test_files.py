"""Atomic writers: a target holds the old output or the new one, never half of either."""
import os

import pytest

from plinth.files import atomic_folder, point_link, write_atomic


def test_a_folder_replaces_the_old_one_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    target = tmp_path / "index"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "first"
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # the old folder's files are gone with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary folders left behind


def test_a_file_is_replaced_in_one_rename_and_a_link_is_switched(tmp_path):
    path = tmp_path / "out" / "results.json"  # the folder is made
    write_atomic(path, "{}")
    write_atomic(path, b'{"a": 1}')
    assert path.read_text() == '{"a": 1}' and sorted(os.listdir(path.parent)) == ["results.json"]
    (tmp_path / "step-1").mkdir()
    (tmp_path / "step-2").mkdir()
    point_link(tmp_path / "latest", "step-1")
    point_link(tmp_path / "latest", "step-2")
    assert os.readlink(tmp_path / "latest") == "step-2"
