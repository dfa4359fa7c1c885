"""Every file the package writes is whole or absent (distswitch.io)."""

from __future__ import annotations

import pytest

from distswitch.io import atomic_path, copy_tree, write_json


def test_a_write_that_fails_leaves_the_previous_file_and_no_temporary_behind(tmp_path):
    target = tmp_path / "summary.json"
    write_json(target, {"epoch": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"epo')
        raise RuntimeError("killed mid-write")
    assert target.read_text() == '{\n  "epoch": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_is_replaced_whole_and_its_temporary_keeps_the_suffix(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, name in ((old, "a.pt"), (new, "b.pt")):
        folder.mkdir()
        (folder / name).write_text(name)
    copy_tree(new, old)
    assert sorted(p.name for p in old.iterdir()) == ["b.pt"]
    with atomic_path(tmp_path / "figure.png") as tmp:
        assert tmp.suffix == ".png" and tmp.name.startswith(".")  # savefig reads the format from it
        tmp.write_bytes(b"png")
