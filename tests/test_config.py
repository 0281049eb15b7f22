"""Strict typed configs: unknown keys, wrong types and bad values name the key."""

import pytest

from crackscale.config.loader import ConfigError, dump, load
from crackscale.config.score import ScoreConfig
from crackscale.config.train import TrainConfig


def test_defaults_follow_the_original_script():
    cfg = TrainConfig()
    assert (cfg.head_lr, cfg.fine_tune_lr, cfg.fine_tune_at) == (1e-4, 1e-5, 100)
    assert (cfg.head_epochs, cfg.fine_tune_epochs, cfg.patience, cfg.dropout) == (10, 10, 3, 0.3)
    assert cfg.weights == "imagenet" and cfg.image_size == 160 and cfg.target_recall == 0.99


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("image_size: 128\nweights: none\nstorage:\n  s3_endpoint: http://127.0.0.1:9\n")
    cfg = load(
        TrainConfig,
        str(f),
        [
            "head_epochs=3",
            "alpha=0.35",
            "use_gpu=true",
            "class_names=No,Yes",
            "crack_class=Yes",
            "storage.s3_region=eu-west-1",
        ],
    )
    assert cfg.image_size == 128 and cfg.head_epochs == 3 and cfg.alpha == 0.35 and cfg.use_gpu is True
    assert cfg.class_names == ("No", "Yes") and cfg.storage.s3_endpoint == "http://127.0.0.1:9"
    assert cfg.storage.s3_region == "eu-west-1" and cfg.weights == "none"
    # the dump round-trips
    g = tmp_path / "d.yaml"
    g.write_text(dump(cfg))
    assert load(TrainConfig, str(g)) == cfg


@pytest.mark.parametrize(
    "override, needle",
    [
        ("epochz=3", "unknown config key 'epochz'"),
        ("head_epochs=three", "'head_epochs' must be an integer"),
        ("head_lr=fast", "'head_lr' must be a number"),
        ("use_gpu=maybe", "'use_gpu' must be true/false"),
        ("crack_class=Crack", "'crack_class'"),
        ("alpha=0.6", "'alpha' must be one of"),
        ("storage.endpoint=x", "unknown config key 'storage.endpoint'"),
        ("val_fraction=1.5", "'val_fraction'"),
        ("lr_schedule=linear", "'lr_schedule' must be constant or cosine"),
        ("brightness=1.5", "'brightness' and 'contrast' must be in"),
        ("label_smoothing=0.5", "'label_smoothing' must be in"),
        ("warmup_epochs=10", "'warmup_epochs' must be >= 0 and below head_epochs"),
        ("swa_epochs=-1", "'swa_epochs' must be >= 0"),
        ("noequals", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load(TrainConfig, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(TrainConfig, str(tmp_path / "missing.yaml"))
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(TrainConfig, str(f))
    f.write_text("head_epochs: [1, 2]\n")
    with pytest.raises(ConfigError, match="'head_epochs' must be an integer"):
        load(TrainConfig, str(f))


def test_configs_are_data_not_code(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(TrainConfig, str(f))
    assert load(ScoreConfig, None, []).block_size > 0


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "jobs" / "configs"
    for f in sorted(root.glob("*.yaml")):
        if f.name.startswith(("train", "demo", "real")):
            load(TrainConfig, str(f))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("max_attempts=0", "'max_attempts' must be >= 1"),
        ("max_attempts=often", "'max_attempts' must be an integer"),
        ("num_actors=-1", "'num_actors' must be >= 0"),
    ],
)
def test_bad_score_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load(ScoreConfig, None, [override])


def test_configuration_page_is_current():
    from conftest import ROOT

    from crackscale import config_docs

    page = ROOT / "docs" / "configuration.md"
    assert page.is_file() and page.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/configuration.md is stale: run make docs"
    )


def test_every_config_key_has_a_help_text():
    import dataclasses

    from crackscale.config.storage import StorageConfig
    from crackscale.config.tune import TuneConfig

    for cls in (TrainConfig, ScoreConfig, TuneConfig, StorageConfig):
        for f in dataclasses.fields(cls):
            text = f.metadata.get("help", "")
            assert isinstance(text, str) and text.strip(), f"{cls.__name__}.{f.name} has no help text"
            assert "\n" not in text, f"{cls.__name__}.{f.name}: help must be one line"


def test_page_lists_every_key_with_a_yaml_default():
    import dataclasses
    import typing

    import yaml

    from crackscale import config_docs
    from crackscale.config.loader import to_dict
    from crackscale.config.storage import StorageConfig
    from crackscale.config.tune import SEARCH_SPECS, TUNABLE_KEYS, TuneConfig

    page = config_docs.render()
    assert {TrainConfig, ScoreConfig, TuneConfig, StorageConfig} <= set(config_docs.CONFIGS)
    for cls in config_docs.CONFIGS:
        section = config_docs.render_config(cls)
        assert section in page
        defaults = to_dict(cls())
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            assert f"| `{f.name}` |" in section, f"{cls.__name__}.{f.name} is not in docs/configuration.md"
            if tp is StorageConfig:  # listed key by key, dotted as in --set
                for s in dataclasses.fields(StorageConfig):
                    assert f"| `storage.{s.name}` |" in section, f"{cls.__name__}.storage.{s.name} is not listed"
            elif tp is TrainConfig:  # a TuneConfig's train section points at the TrainConfig table
                assert "`train.<key>`" in section
            else:  # the default cell reads back as the default, in YAML
                row = next(line for line in section.splitlines() if line.startswith(f"| `{f.name}` |"))
                cell = row.split(" | ")[2].replace("\\|", "|")
                assert yaml.safe_load(cell.strip("`")) == defaults[f.name], (cls.__name__, f.name, cell)
    assert all(f"`{{{kind}: [" in page for kind in SEARCH_SPECS)
    assert all(f"`{key}`" in page for key in TUNABLE_KEYS)
    assert "`--config FILE`" in page and "`--set storage.s3_endpoint=" in page


def test_config_docs_check(tmp_path, capsys):
    from crackscale import config_docs

    out = tmp_path / "configuration.md"
    assert config_docs.main(["--check", "--out", str(out)]) == 1
    assert config_docs.main(["--out", str(out)]) == 0 and out.read_text(encoding="utf-8") == config_docs.render()
    assert config_docs.main(["--check", "--out", str(out)]) == 0
    out.write_text(out.read_text(encoding="utf-8") + "edited by hand\n", encoding="utf-8")
    capsys.readouterr()
    assert config_docs.main(["--check", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith("is stale: run make docs") and len(err.splitlines()) == 1
