"""Config composition: groups, overrides, struct mode and its error messages."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from framework.config import CONFIG_DIR, ConfigError, compose


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "logger").mkdir()
    (tmp_path / "base.yaml").write_text(
        "groups: {logger: plain}\nexperiment: null\nseed: 0\nrun_dir: runs/${experiment}\n"
        "model: {}\ntrainer: {max_epochs: 10, devices: 1}\nitems: [1, 2]\n"
    )
    (tmp_path / "experiment" / "toy.yaml").write_text("model: {_target_: x.Y, lr: 0.001, depth: 2}\ntrainer: {max_epochs: 3}\n")
    (tmp_path / "logger" / "plain.yaml").write_text("name: plain\n")
    (tmp_path / "logger" / "fancy.yaml").write_text("name: fancy\nmode: offline\n")
    return tmp_path


def test_experiment_merges_over_base_and_names_the_run(config_dir):
    cfg = compose(["experiment=toy"], config_dir)
    assert cfg.experiment == "toy"
    assert cfg.run_dir == "runs/toy"
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.devices == 1
    assert cfg.model.lr == 0.001
    assert "groups" not in cfg


def test_dotlist_overrides_are_typed_and_applied_in_order(config_dir):
    cfg = compose(["experiment=toy", "model.lr=3e-4", "trainer.devices=2", "model.depth=null", "model.lr=1e-2"], config_dir)
    assert cfg.model.lr == pytest.approx(1e-2)
    assert cfg.trainer.devices == 2
    assert cfg.model.depth is None


def test_group_selection_replaces_the_node(config_dir):
    assert compose(["experiment=toy"], config_dir).logger == {"name": "plain"}
    assert compose(["experiment=toy", "logger=fancy", "logger.mode=online"], config_dir).logger.mode == "online"


def test_misspelt_key_names_the_valid_keys_at_its_level(config_dir):
    with pytest.raises(ConfigError) as err:
        compose(["experiment=toy", "trainer.max_epoch=3"], config_dir)
    message = str(err.value)
    assert "'max_epoch'" in message and "max_epochs" in message and "devices" in message


def test_misspelt_top_level_key_lists_top_level_keys(config_dir):
    with pytest.raises(ConfigError, match="Valid keys at the top level: .*seed"):
        compose(["experiment=toy", "sed=1"], config_dir)


def test_unknown_group_choice_lists_the_choices(config_dir):
    with pytest.raises(ConfigError, match="choose one of: fancy, plain"):
        compose(["experiment=toy", "logger=csv"], config_dir)
    with pytest.raises(ConfigError, match="experiment=NAME"):
        compose([], config_dir)


def test_plus_prefix_adds_a_key_deliberately(config_dir):
    cfg = compose(["experiment=toy", "+model.width=64"], config_dir)
    assert cfg.model.width == 64


def test_malformed_arguments_fail_clearly(config_dir):
    with pytest.raises(ConfigError, match="key=value"):
        compose(["experiment=toy", "trainer.devices"], config_dir)
    with pytest.raises(ConfigError, match="out of range"):
        compose(["experiment=toy", "items.5=3"], config_dir)


def test_result_is_resolved_and_read_only(config_dir):
    cfg = compose(["experiment=toy"], config_dir)
    with pytest.raises(Exception):
        cfg.seed = 3
    assert OmegaConf.is_readonly(cfg)


def test_real_base_config_run_dir_is_stamped_once():
    cfg = compose([f"experiment={sorted(p.stem for p in (CONFIG_DIR / 'experiment').glob('*.yaml'))[0]}"])
    assert cfg.run_dir.startswith(f"runs/{cfg.experiment}/")
    # W&B's own modes; it rewrites WANDB_MODE=offline to "dryrun" in the environment once a run starts
    assert cfg.logger.name == "wandb" and cfg.logger.mode in ("offline", "dryrun", "online", "disabled")


def test_defaults_compose_group_files_and_inherit_experiments(config_dir):
    (config_dir / "datamodule").mkdir()
    (config_dir / "datamodule" / "shared.yaml").write_text("_target_: a.B\nbatch_size: 8\nseed: 0\n")
    (config_dir / "experiment" / "child.yaml").write_text(
        "defaults: {experiment: toy, datamodule: shared}\ndatamodule: {batch_size: 32}\nmodel: {depth: 5}\n")
    cfg = compose(["experiment=child"], config_dir)
    assert cfg.datamodule == {"_target_": "a.B", "batch_size": 32, "seed": 0}
    assert cfg.model == {"_target_": "x.Y", "lr": 0.001, "depth": 5}
    assert cfg.trainer.max_epochs == 3 and cfg.experiment == "child"


def test_cyclic_defaults_fail_clearly(config_dir):
    (config_dir / "experiment" / "a.yaml").write_text("defaults: {experiment: b}\n")
    (config_dir / "experiment" / "b.yaml").write_text("defaults: {experiment: a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        compose(["experiment=a"], config_dir)
