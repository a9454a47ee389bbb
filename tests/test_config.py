"""params.yaml -> typed config: unknown keys, wrong types, overrides, the resolved config."""

import pytest

from dseh.config import dump_config, epochs_for_round, from_dict, load_config
from dseh.errors import DsehError


def test_unknown_key_names_key_and_valid_keys():
    with pytest.raises(DsehError) as e:
        from_dict({"labnet": {"epochz": [3]}})
    msg = str(e.value)
    assert "labnet.epochz" in msg and "batch_size" in msg and "epochs" in msg


def test_unknown_top_level_key():
    with pytest.raises(DsehError, match="unknown params key 'bitz'"):
        from_dict({"bitz": 3})


@pytest.mark.parametrize(
    "raw, key, expected",
    [
        ({"bits": "32"}, "bits", "int"),
        ({"labnet": {"beta": "high"}}, "labnet.beta", "float"),
        ({"data": {"skip_bad_images": "yes"}}, "data.skip_bad_images", "bool"),
        ({"labnet": {"epochs": 5}}, "labnet.epochs", "list of int"),
        ({"bits": True}, "bits", "int"),
    ],
)
def test_wrong_type_names_key_type_and_value(raw, key, expected):
    with pytest.raises(DsehError) as e:
        from_dict(raw)
    assert key in str(e.value) and expected in str(e.value)


def test_choice_checked():
    with pytest.raises(DsehError, match="imgnet.backbone"):
        from_dict({"imgnet": {"backbone": "vit"}})


def test_negative_thread_counts_are_refused():
    with pytest.raises(DsehError, match="train.loader_workers.*must not be negative"):
        from_dict({"train": {"loader_workers": -1}})
    with pytest.raises(DsehError, match="train.threads.*must not be negative"):
        from_dict({"train": {"threads": -2}})


def test_clip_values_are_per_network_and_not_negative():
    cfg = from_dict({"labnet": {"clip_value": 0.5}, "imgnet": {"clip_value": 0}})
    assert (cfg.labnet.clip_value, cfg.imgnet.clip_value) == (0.5, 0.0)
    for section in ("labnet", "imgnet"):
        with pytest.raises(DsehError, match=f"{section}.clip_value.*must not be negative"):
            from_dict({section: {"clip_value": -1.0}})
    with pytest.raises(DsehError, match="train.clip_value"):
        from_dict({"train": {"clip_value": 1.0}})


def test_overrides_use_dvc_syntax():
    cfg = from_dict({}, ["bits=64", "labnet.epochs=[5,3]", "imgnet.lr_exp=4", "data.source=list-files"])
    assert cfg.bits == 64 and cfg.labnet.epochs == (5, 3) and cfg.imgnet.lr_exp == 4.0
    assert isinstance(cfg.imgnet.lr_exp, float)
    with pytest.raises(DsehError, match="key.sub=value"):
        from_dict({}, ["bits"])
    with pytest.raises(DsehError, match="labnet.nope"):
        from_dict({}, ["labnet.nope=1"])


def test_epochs_per_round_repeat_last():
    assert [epochs_for_round((30, 20, 10), r) for r in range(4)] == [30, 20, 10, 10]


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict({}, ["bits=48"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_missing_named_params_file(tmp_path):
    with pytest.raises(DsehError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["1e-5", "1e-05", "2.5E-3", ".5e1"])
def test_a_float_in_exponent_form_without_a_dot_is_a_float(text):
    # PyYAML (YAML 1.1) reads 1e-5 as a string; dvc, YAML 1.2 and the pipeline's str(float) write it so
    cfg = from_dict({}, [f"dpsh.weight_decay={text}"])
    assert cfg.dpsh.weight_decay == float(text)
    with pytest.raises(DsehError, match="dpsh.weight_decay"):
        from_dict({}, ["dpsh.weight_decay=1e-5x"])
