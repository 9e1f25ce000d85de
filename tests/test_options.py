import pytest

from segserve.options import OptionError, PipelineOptions, parse_options


def test_defaults_when_no_parameters():
    assert parse_options(None) == parse_options("") == parse_options({}) == PipelineOptions()
    assert PipelineOptions().overlap == 0.25 and PipelineOptions().blend == "gaussian"


def test_parses_the_json_string_triton_passes():
    options = parse_options('{"overlap": 0.5, "blend": "constant", "sw_batch_size": 4, "probabilities": true}')
    assert (options.overlap, options.blend, options.sw_batch_size, options.probabilities) == (0.5, "constant", 4, True)


def test_accepts_strings_from_http_clients():
    options = parse_options({"overlap": "0.1", "sw_batch_size": "2", "keep_largest": "true", "intensity_min": "0", "intensity_max": 100})
    assert (options.overlap, options.sw_batch_size, options.keep_largest, options.intensity_max) == (0.1, 2, True, 100.0)


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\), got 1.0"),
        ({"overlap": -0.5}, "overlap"),
        ({"overlap": "nan"}, "finite"),
        ({"overlap": True}, "number"),
        ({"blend": "linear"}, "'linear'"),
        ({"sw_batch_size": 2.5}, "integer"),
        ({"sw_batch_size": 0}, ">= 1"),
        ({"intensity_max": 3}, "together"),
        ({"intensity_min": 5, "intensity_max": 5}, "below"),
        ({"keep_largest": "perhaps"}, "true or false"),
        ({"network": " "}, "non-empty"),
        ({"network": 3}, "string"),
        ({"roi": 3, "zzz": 1}, "unknown request parameter.*roi, zzz"),
        ("{not json", "JSON"),
    ],
)
def test_rejects_bad_values_naming_them(parameters, message):
    with pytest.raises(OptionError, match=message):
        parse_options(parameters)
