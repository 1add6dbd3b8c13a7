from pathlib import Path

import pytest

from lowshot.config import Config, ConfigError, help_text, load_yaml, parse_args, to_yaml


def test_defaults_are_typed_dataclasses() -> None:
    cfg, overrides = parse_args([])
    assert isinstance(cfg, Config)
    assert cfg.train.probe is False and cfg.ssl.method == "simclr"
    assert overrides == []


def test_both_sweep_argument_styles_and_probe_flag() -> None:
    # W&B sweeps pass ${args} as --key=value and ${args_no_hyphens} as key=value.
    cfg, overrides = parse_args(
        ["--train.lr=0.01", "ssl.epochs=3", "--probe", "track.tags=[a,b]", "model.kwargs.img_size=64"]
    )
    assert cfg.train.lr == 0.01 and cfg.ssl.epochs == 3 and cfg.train.probe is True
    assert cfg.track.tags == ["a", "b"] and cfg.model.kwargs == {"img_size": 64}
    assert "train.probe=true" in overrides


def test_precedence_defaults_yaml_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.1\n  epochs: 7\ndata:\n  root: /from/yaml\n  size: 48\n")
    monkeypatch.setenv("LOWSHOT_DATA_ROOT", "/from/env")
    cfg, _ = parse_args(["--config", str(f), "train.lr=0.2"])
    assert cfg.train.lr == 0.2  # command line beats YAML
    assert cfg.train.epochs == 7 and cfg.data.size == 48  # YAML beats defaults
    assert cfg.data.root == "/from/env"  # the env variable overrides the file
    cfg, _ = parse_args([f"--config={f}", "data.root=/cli"])
    assert cfg.data.root == "/cli"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["--trian.lr=1"], "did you mean 'train.lr'"),
        (["epochs=3"], "unknown config key 'epochs'"),
        (["train.lr=fast"], "config key 'train.lr'"),
        (["ssl.epochs=2.5"], "config key 'ssl.epochs'"),
        (["data.channels=rgb"], "'data.channels'"),
        (["--train.lr"], "needs a value"),
        (["stray"], "cannot read argument 'stray'"),
        (["--config", "/no/such.yaml"], "/no/such.yaml does not exist"),
    ],
)
def test_bad_input_names_the_key(argv: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        parse_args(argv)
    assert needle in str(err.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(f)])
    assert "train.learning_rate" in str(err.value) and str(f) in str(err.value)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg, _ = parse_args(["train.lr=0.003", "model.name=test_resnet", "track.tags=[x]"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_yaml(tmp_path / "config.yaml") == cfg


def test_every_shipped_yaml_is_valid() -> None:
    configs = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    lowshot_configs = [c for c in configs if "accelerate" not in c.parts and "sweeps" not in c.parts]
    assert lowshot_configs, "configs/ holds no YAML"
    for c in lowshot_configs:
        parse_args(["--config", str(c)])


def test_help_lists_keys_with_their_meaning() -> None:
    """--help says what each setting means (issue 41: 143 defaults with no meaning), from the schema's comments."""
    text = help_text()
    assert "train.lr=" in text and "data.source=" in text
    lines = text.splitlines()
    lr = lines.index(next(line for line in lines if line.strip().startswith("train.lr=")))
    assert "peak lr" in lines[lr + 1]
    assert sum(line.startswith("      ") for line in lines) >= 100  # nearly every setting has its meaning


def test_recommended_recipe_is_the_setting_measured_in_the_results_table() -> None:
    """bench/results/recipes reports lowshot-recommended through the runs of the forum's transfer recipe
    on EfficientNet-Lite0 weights: the two must resolve to the same setting."""
    from lowshot.config import setting_key, to_dict

    recipes = Path(__file__).parents[1] / "configs" / "recipes"
    rec, _ = parse_args(["--config", str(recipes / "lowshot-recommended.yaml")])
    files = ["densenet121-transfer.yaml", "offline-imagenet.yaml"]
    forum, _ = parse_args([a for f in files for a in ("--config", str(recipes / f))])
    assert setting_key(to_dict(rec)) == setting_key(to_dict(forum))
    assert setting_key(to_dict(rec)) != setting_key(
        to_dict(parse_args(["--config", str(recipes / "gradual-llrd.yaml")])[0])
    )


def test_on_off_values_stay_strings_on_the_command_line() -> None:
    """YAML 1.1 reads `on`/`off` as booleans; OmegaConf's files do not, and neither does the command line."""
    cfg, _ = parse_args(["channels_last=on", "data.augment_compile=off", "eval.test=false", "data.limit=3"])
    assert cfg.channels_last == "on" and cfg.data.augment_compile == "off"
    assert cfg.eval.test is False and cfg.data.limit == 3


def test_renamed_keys_read_from_old_run_files_and_named_for_users(tmp_path: Path) -> None:
    """A config.yaml an older lowshot wrote beside a checkpoint (check.copy_ncc, now data.duplicate_ncc)
    still loads, with the value moved; typing the old key gets the new name."""
    from lowshot.config import RENAMED, all_keys

    text = to_yaml(Config()).replace("  duplicate_ncc: 0.88\n", "")
    text = text.replace("check:\n", "check:\n  copy_ncc: 0.91\n", 1)
    (tmp_path / "config.yaml").write_text(text)
    assert load_yaml(tmp_path / "config.yaml").data.duplicate_ncc == 0.91
    with pytest.raises(ConfigError, match=r"it is now 'data\.duplicate_ncc'"):
        parse_args(["check.copy_ncc=0.9"])
    assert all(k not in all_keys() for k in RENAMED) and all(v in all_keys() for v in RENAMED.values())


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the dataclasses; a new or changed setting must show there."""
    from lowshot.configdoc import reference_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert page == reference_markdown() + "\n", (
        "stale: run `python -m lowshot.configdoc > docs/configuration.md`"
    )
    for key in ("data.duplicate_ncc", "eval.operating_point", "ssl.unlabelled", "train.strategy"):
        assert f"| `{key}` |" in page
    assert "|  |" not in page  # every setting is explained
