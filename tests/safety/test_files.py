"""The safety tools' JSON files: round trips and the error that names the file and the command."""

import pytest

from mmfusion.errors import ConfigError
from mmfusion.safety.files import read_json, write_json
from mmfusion.safety.filters import Concept, ConceptFilters
from mmfusion.safety.scd import SCDCalibration


def test_write_then_read_round_trips(tmp_path):
    path = write_json({"a": [1, 2], "b": "x"}, tmp_path / "sub" / "f.json")
    assert read_json(path, dict, "a test file", "make it") == {"a": [1, 2], "b": "x"}


@pytest.mark.parametrize(
    "content, why",
    [
        (None, "No such file"),
        ("{not json", "Expecting property name"),
        ('{"other": 1}', "unexpected keyword"),
    ],
)
def test_scd_calibration_load_errors_name_the_file_and_the_command(tmp_path, content, why):
    path = tmp_path / "scd.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(
        ConfigError, match=rf"scd.json: not an SCD calibration file \(.*{why}.*`mmfusion scd calibrate`"
    ):
        SCDCalibration.load(path)


def test_concept_filters_round_trip_and_a_file_without_concepts(tmp_path):
    red = Concept("red", ["a red thing"], [1.0, 0.0], {"text": {"normal": 0.5, "strict": 0.25}})
    f = ConceptFilters([red], model_id="m", precision={"normal": 0.9})
    loaded = ConceptFilters.load(f.save(tmp_path / "filters.json"))
    assert loaded == f
    (tmp_path / "bad.json").write_text('{"recall": {}}')
    with pytest.raises(
        ConfigError, match=r"bad.json: not a concept-filter file \('concepts'\).*filter calibrate"
    ):
        ConceptFilters.load(tmp_path / "bad.json")
