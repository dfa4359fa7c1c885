"""The summary record: one typed dataclass whose JSON keys are its field names."""

from __future__ import annotations

import dataclasses
import json

from distswitch.summary import DRIVER_FIELDS, Summary


def _record(**changes) -> Summary:
    values = {f.name: None for f in dataclasses.fields(Summary) if f.name not in ("extra", "format")}
    values.update(model="mlp", method="switch", history=[], config={}, dense={"params": 2}, compact={"params": 1})
    values.update(changes)
    return Summary(**values)


def test_a_summary_without_the_drivers_fields_has_no_such_keys_and_gains_them_once_set(tmp_path):
    record = _record()
    assert not set(DRIVER_FIELDS) & set(record.to_dict())
    record.checkpoint_path = "/ray/run/final"
    record.mlflow = {"tracking_uri": "sqlite:///x.db", "run_id": "abc", "experiment": "distswitch"}
    record.write(tmp_path / "summary.json")
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["checkpoint_path"] == "/ray/run/final" and written["mlflow"]["run_id"] == "abc"


def test_a_summary_read_back_writes_the_same_json_and_keeps_keys_it_does_not_know(tmp_path):
    data = {**_record(test_acc=0.9).to_dict(), "from_a_newer_writer": [1, 2]}
    (tmp_path / "summary.json").write_text(json.dumps(data))
    record = Summary.read(tmp_path / "summary.json")
    assert record.test_acc == 0.9 and record.extra == {"from_a_newer_writer": [1, 2]}
    assert record.to_dict() == data


def test_a_summary_of_another_format_is_refused_in_one_line(tmp_path):
    import pytest

    from distswitch.config import ConfigError
    from distswitch.summary import SUMMARY_FORMAT

    assert _record().to_dict()["format"] == SUMMARY_FORMAT
    for other in ({"format": "distswitch.summary/0"}, {}):
        data = {**{k: v for k, v in _record().to_dict().items() if k != "format"}, **other}
        (tmp_path / "summary.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=r"^a summary of format .*written by another version of distswitch"):
            Summary.read(tmp_path / "summary.json")


def test_the_console_shows_every_group_of_a_small_net_and_the_most_cut_of_a_large_one():
    from distswitch.summary import widths_line

    small = {"conv1": {"units": 20, "kept": 14}, "fc1": {"units": 500, "kept": 500}}
    assert widths_line(small) == "conv1 20→14, fc1 500→500"
    large = {f"layer{i}": {"units": 64, "kept": 64 - i} for i in range(37)}  # layer0 whole, layer36 most cut
    line = widths_line(large, limit=3)
    assert line == "layer36 64→28, layer35 64→29, layer34 64→30, 33 more cut, 1 of 37 groups whole"
