"""Published schemas (configs/schemas/*.json): a hand-written run record or scores index gets every violated
field in one message, not one per round trip; what the tool writes itself validates."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_leaderboard_integrity import cli_error, copy_run, official  # noqa: F401

from pipeline.common import check_schema
from pipeline.errors import InputError
from pipeline.layout import project_file

REQUIRED = ["method", "protocol", "dataset", "split", "config_hash", "seed", "code_version", "supervision"]


@pytest.mark.parametrize("name", ["run_record", "scores_index"])
def test_the_schemas_are_valid_json_schema(name):
    schema = json.loads(project_file(f"configs/schemas/{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["description"]


def test_a_run_record_with_every_field_missing_is_one_line_naming_them_all(official, tmp_path, capsys):  # noqa: F811
    run = copy_run(official, tmp_path)
    (run / "run.json").write_text(json.dumps({"note": "maps made elsewhere"}))
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", str(tmp_path / "lb.csv"),
                              "--protocol", str(official["path"])])
    assert "8 problem(s) against run_record.schema.json" in line
    for field in REQUIRED:
        assert f"'{field}' is a required property" in line
    assert not (tmp_path / "lb.csv").exists()


def test_wrong_types_are_named_by_their_path(official, tmp_path):  # noqa: F811
    record = json.loads((official["run"] / "run.json").read_text())
    check_schema(record, "run_record", "run.json")  # what the tool wrote validates
    record.update(seed="zero", supervision="fully supervised", protocol={"id": "x", "hash": "abc"})
    with pytest.raises(InputError) as err:
        check_schema(record, "run_record", "run.json")
    text = str(err.value)
    assert "3 problem(s)" in text and "protocol.hash:" in text and "seed: 'zero' is not of type 'integer'" in text
    assert "supervision:" in text


def test_a_scores_index_reports_every_bad_entry(official, tmp_path):  # noqa: F811
    index = json.loads((official["run"] / "scores" / "index.json").read_text())
    check_schema(index, "scores_index", "index.json")
    names = sorted(index["subjects"])
    index["subjects"][names[0]]["section"] = "train"
    index["subjects"][names[1]]["files"] = {"score": "maps/a.png"}
    with pytest.raises(InputError) as err:
        check_schema(index, "scores_index", "index.json")
    assert "2 problem(s)" in str(err.value) and f"subjects.{names[0]}.section" in str(err.value)
    assert f"subjects.{names[1]}.files.score" in str(err.value)


def test_a_hand_written_run_folder_with_five_wrong_fields_gets_all_five_in_one_line(official, tmp_path, capsys):  # noqa: F811
    run = copy_run(official, tmp_path)
    record = json.loads((run / "run.json").read_text())
    record.update(method="../escape", seed="zero", supervision="fully supervised", code_url="ftp://x",
                  protocol={"id": record["protocol"]["id"], "hash": "abc"})
    (run / "run.json").write_text(json.dumps(record))
    line = cli_error(capsys, ["leaderboard", "submit", str(run), "--leaderboard", str(tmp_path / "lb.csv"),
                              "--protocol", str(official["path"])])
    assert "5 problem(s) against run_record.schema.json" in line
    for where in ("method:", "seed:", "supervision:", "code_url:", "protocol.hash:"):
        assert where in line
    assert not (tmp_path / "lb.csv").exists()
