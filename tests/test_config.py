"""Experiment configs: shipped files, validation errors, ``--set`` overrides, YAML round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kagglecmr.cfg.config import SHIPPED_CONFIGS, Config, load_config, parse_override, resolve_config_path
from kagglecmr.utils.errors import ConfigError, KaggleCMRError

SHIPPED = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def nested(key: str, value) -> dict:
    """``"a.b.c", v`` -> ``{"a": {"b": {"c": v}}}``."""
    out: dict = value
    for k in reversed(key.split(".")):
        out = {k: out}
    return out


def assert_subset(raw, loaded, where: str = "") -> None:
    """Every value written in the YAML file is the loaded value (lists and tuples compare alike)."""
    if isinstance(raw, dict):
        assert isinstance(loaded, dict), where
        for k, v in raw.items():
            assert k in loaded, f"{where}.{k} missing"
            assert_subset(v, loaded[k], f"{where}.{k}")
    elif isinstance(raw, (list, tuple)):
        assert list(loaded) == list(raw), where
    else:
        assert loaded == raw, where


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(*args, **kwargs)
    msg = str(ei.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------------ shipped configs


def test_the_three_documented_configs_are_shipped():
    assert {"default", "demo", "offline"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_by_name_and_path_from_any_cwd(name, monkeypatch, tmp_path):
    path = SHIPPED_CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    monkeypatch.chdir(tmp_path)  # no ./configs here: the repo's configs must still be found
    by_name = load_config(name)
    assert by_name.name == raw.get("name", name)
    assert load_config(path) == by_name
    assert load_config(str(path)) == by_name
    assert resolve_config_path(name).resolve() == path.resolve()
    assert_subset(raw, by_name.to_dict())


def test_shipped_configs_differ_from_defaults_where_they_say_so():
    demo = load_config("demo")
    raw = yaml.safe_load((SHIPPED_CONFIGS / "demo.yaml").read_text())
    assert demo.model.weights == raw["model"]["weights"] != Config().model.weights


def test_local_configs_folder_takes_precedence(monkeypatch, tmp_path):
    (tmp_path / "configs").mkdir()
    epochs = load_config("demo").train.epochs + 1
    write(tmp_path / "configs", f"train: {{epochs: {epochs}}}\n", "demo.yaml")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("demo")
    assert cfg.train.epochs == epochs
    assert cfg.model == Config().model  # the local file, not the shipped demo


def test_no_config_gives_defaults():
    assert load_config(None) == Config()
    assert load_config().name is None


def test_empty_file_gives_defaults_named_after_file(tmp_path):
    cfg = load_config(write(tmp_path, "", "empty.yaml"))
    assert cfg.name == "empty"
    assert cfg.model_copy(update={"name": None}) == Config()


def test_missing_config_name_lists_shipped(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    msg = config_error("no_such_config_xyz")
    assert "no_such_config_xyz" in msg
    for name in SHIPPED:
        assert name in msg


def test_missing_config_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = config_error(missing)
    assert str(missing) in msg and "not found" in msg


def test_config_error_is_a_user_facing_error():
    assert issubclass(ConfigError, KaggleCMRError)


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("key", ["train.epocs", "model.encoderr", "augment.hfilp", "bogus"])
def test_unknown_key_in_file_named(tmp_path, key):
    path = write(tmp_path, yaml.safe_dump(nested(key, 3)))
    msg = config_error(path)
    assert str(path) in msg
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.lr", -1e-3),
        ("train.lr", 0),
        ("train.batch_size", 1),
        ("train.epochs", 0),
        ("loss.name", "foo"),
        ("augment.scale", [2.0, 1.0]),
        ("augment.scale", [0.0, 1.0]),
        ("augment.gamma_range", [1.5, 0.5]),
        ("augment.hflip", 1.5),
        ("augment.backend", "gpu"),
        ("data.in_channels", 0),
        ("data.num_classes", 1),
        ("model.normalize", "batch"),
        ("train.amp", "fp8"),
        ("infer.tta", ["rot45"]),
    ],
)
def test_bad_value_is_one_line_error_naming_file_and_key(tmp_path, key, value):
    path = write(tmp_path, yaml.safe_dump(nested(key, value)))
    msg = config_error(path)
    assert msg.startswith(f"{path}: {key}")
    # the same value given on the command line is refused the same way
    msg2 = config_error("demo", [f"{key}={json.dumps(value)}"])  # JSON is valid YAML
    assert "demo.yaml" in msg2 and f": {key}" in msg2


def test_several_bad_values_are_counted_on_one_line(tmp_path):
    path = write(tmp_path, "train: {lr: -1, batch_size: 1, epochs: 0}\n")
    msg = config_error(path)
    assert "(+2 more)" in msg


@pytest.mark.parametrize(
    "text",
    [
        "seed: 1\ntrain:\n  epochs: 3\n\tlr: 0.1\n",  # tab indentation
        "seed: 1\nmodel: {arch: Unet\ntrain: {epochs: 3}\n",  # unclosed flow mapping
        "seed: 1\ndata:\n  size: 96\n    in_channels: 1\n",  # bad indentation
    ],
)
def test_invalid_yaml_names_file_and_line(tmp_path, text):
    path = write(tmp_path, text)
    try:
        yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:  # the line yaml itself blames, 1-based
        line = exc.problem_mark.line + 1
    else:  # pragma: no cover - the inputs above are all invalid
        pytest.fail("test input is valid YAML")
    msg = config_error(path)
    assert str(path) in msg
    assert f"line {line}" in msg
    assert "not valid YAML" in msg


@pytest.mark.parametrize("text", ["- train\n- model\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    msg = config_error(path)
    assert str(path) in msg and "mapping" in msg


def test_section_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "train: 5\n")
    msg = config_error(path)
    assert msg.startswith(f"{path}: train")


def test_class_weights_length_must_match_num_classes(tmp_path):
    num_classes = 4
    bad = [1.0] * (num_classes - 1)
    path = write(tmp_path, yaml.safe_dump({"data": {"num_classes": num_classes}, "loss": {"class_weights": bad}}))
    msg = config_error(path)
    assert str(path) in msg
    assert "loss.class_weights" in msg
    assert f"{len(bad)} values" in msg and f"num_classes is {num_classes}" in msg
    # via --set, and fixed by also changing num_classes
    assert "loss.class_weights" in config_error("demo", [f"loss.class_weights={bad}", "data.num_classes=4"])
    cfg = load_config("demo", [f"loss.class_weights={bad}", f"data.num_classes={len(bad)}"])
    assert cfg.loss.class_weights == bad
    good = [0.5] * num_classes
    assert load_config(None, [f"loss.class_weights={good}"]).loss.class_weights == good


def test_shipped_configs_carry_no_data_keys():
    """Classes, channels and size come from the dataset, so any shipped recipe trains any dataset."""
    for name in ("default", "demo", "offline", "resnet34", "warwick"):
        d = load_config(name).data
        assert (d.size, d.in_channels, d.num_classes) == (None, None, None), name
    assert load_config("default").model.input_scale == 2.0  # 96 -> 192 on CMR, as input_size: 192 was


# ------------------------------------------------------------------------------------ overrides


def test_set_overrides_scalar_values():
    base = load_config("demo")
    cfg = load_config("demo", ["train.lr=3e-4", "train.epochs=5", "model.encoder=resnet34", "augment.hflip=0"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.epochs == 5
    assert cfg.model.encoder == "resnet34"
    assert cfg.augment.hflip == 0
    # everything else untouched
    assert cfg.model.params == base.model.params
    assert cfg.loss == base.loss


def test_set_overrides_lists_and_tuples():
    cfg = load_config(None, ["infer.tta=[none, hflip]", "augment.scale=[0.9, 1.1]"])
    assert cfg.infer.tta == ["none", "hflip"]
    assert cfg.augment.scale == (0.9, 1.1)


def test_set_later_override_wins():
    assert load_config(None, ["train.epochs=3", "train.epochs=7"]).train.epochs == 7


def test_set_free_params_dict_accepts_new_nested_keys():
    assert Config().model.params == {}
    cfg = load_config(None, ["model.params.encoder_depth=4", "model.params.decoder_channels=[64, 32, 16, 8]"])
    assert cfg.model.params == {"encoder_depth": 4, "decoder_channels": [64, 32, 16, 8]}
    demo = load_config("demo", ["model.params.encoder_depth=3"])
    assert demo.model.params["encoder_depth"] == 3
    assert "decoder_channels" in demo.model.params  # merged into the file's params, not replaced


@pytest.mark.parametrize(("override", "key"), [
    ("train.new.sub=1", "train.new"),
    ("train.epocs=3", "train.epocs"),
    ("newsection.x=1", "newsection"),
    ("model.encoder_name=resnet18", "model.encoder_name"),
])
def test_set_unknown_keys_rejected(override, key):
    msg = config_error("demo", [override])
    assert f"{key}: unknown key" in msg


@pytest.mark.parametrize("override", ["foo", "train.lr", "=3"])
def test_set_malformed(override):
    msg = config_error("demo", [override])
    assert f"--set {override}" in msg


def test_set_into_a_scalar_is_refused():
    msg = config_error("demo", ["train.lr.x=1"])
    assert "--set train.lr.x=1" in msg and "not a section" in msg


def test_parse_override():
    assert parse_override("a.b.c=1") == (["a", "b", "c"], 1)
    assert parse_override("a=x=y") == (["a"], "x=y")
    assert parse_override("a.b=") == (["a", "b"], "")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("source", [None, *SHIPPED])
def test_to_yaml_round_trip(tmp_path, source):
    cfg = load_config(source, ["train.lr=3e-4", "loss.class_weights=[0.5, 1, 1, 2]", "model.params.encoder_depth=4"])
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    path = write(tmp_path, cfg.to_yaml(), "dumped.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()


def test_inference_batch_size_depends_on_the_device():
    infer = load_config(None, ["infer.batch_size=48", "infer.cpu_batch_size=4"]).infer
    assert infer.batch_size_for("cuda") == 48
    assert infer.batch_size_for("cpu") == 4
