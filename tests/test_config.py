"""Configuration: YAML + dotted overrides -> typed, validated Config; user errors name the key."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEFAULT_CONFIG, REPO_ROOT, make_config
from distswitch.build import validate_names
from distswitch.cli import main
from distswitch.config import Config, ConfigError, load_config, parse_override
from distswitch.registry import UnknownNameError

# -- loading and overrides -------------------------------------------------------------------------


def test_overrides_are_parsed_to_the_field_types(config_file):
    cfg = load_config(
        config_file,
        [
            "train.epochs=3",
            "switcher.width=32",
            "optim.tnn.lr=0.1",
            "train.progress=false",
            "data.root=null",
            "optim.tnn.milestones=[2, 4]",
        ],
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.switcher.width == 32 and type(cfg.switcher.width) is int
    assert cfg.optim.tnn.lr == 0.1 and type(cfg.optim.tnn.lr) is float
    assert cfg.train.progress is False
    assert cfg.data.root is None
    assert cfg.optim.tnn.milestones == (2, 4)


def test_yaml_values_are_kept_where_not_overridden(config_file):
    cfg = load_config(config_file, ["train.epochs=3"])
    assert cfg.model.name == "lenet5" and cfg.switcher.width == 16
    assert cfg.schedule.update_ratio == 4
    assert cfg.schedule.warmup_epochs == 1
    assert cfg.optim.snn.name == "adam" and cfg.optim.snn.lr == pytest.approx(1e-3)


def test_integer_given_for_a_float_field_becomes_a_float():
    cfg = load_config(None, ["optim.tnn.lr=1"])
    assert cfg.optim.tnn.lr == 1.0 and type(cfg.optim.tnn.lr) is float


def test_update_ratio_accepts_the_word_epoch():
    assert load_config(None, ["schedule.update_ratio=epoch"]).schedule.update_ratio == "epoch"


def test_no_file_means_all_defaults():
    assert load_config(None) == Config()


@pytest.mark.parametrize(
    "cfg",
    [
        Config(),
        load_config(
            None,
            [
                "optim.tnn.scheduler=multistep",
                "optim.tnn.milestones=[3, 6]",
                "method=magnitude",
                "schedule.update_ratio=epoch",
                "data.train_limit=100",
                "data.root=/x",
                "switcher.l1=0.5",
            ],
        ),
    ],
    ids=["defaults", "non-defaults"],
)
def test_dict_round_trip_gives_an_equal_config(cfg):
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_yaml_dump_round_trips_through_a_file(tmp_path, config_file):
    cfg = load_config(config_file, ["optim.snn.milestones=[1]", "switcher.l1=0.5"])
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


# -- rejected values: ConfigError naming the key -----------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("bogus=1", "bogus"),
        ("switcher.widht=32", "switcher.widht"),
        ("train.epochs=x", "train.epochs"),
        ("train.epochs=3.5", "train.epochs"),
        ("train.progress=3", "train.progress"),
        ("switcher.width=0", "switcher.width"),
        ("switcher.width=-4", "switcher.width"),
        ("schedule.update_ratio=0", "schedule.update_ratio"),
        ("schedule.update_ratio=sometimes", "schedule.update_ratio"),
        ("optim.tnn.lr=0", "optim.tnn.lr"),
        ("optim.snn.lr=-1", "optim.snn.lr"),
        ("optim.tnn.lr=.nan", "optim.tnn.lr"),
        ("optim.tnn.lr=.inf", "optim.tnn.lr"),
        ("switcher.l1=.nan", "switcher.l1"),
        ("model.gated=bogus", "model.gated"),
        ("switcher.granularity=layer", "switcher.granularity"),
        ("prune.kept_fraction=0", "prune.kept_fraction"),
        ("schedule.warmup_epochs=8", "schedule.warmup_epochs"),
        ("schedule.finetune_epochs=-1", "schedule.finetune_epochs"),
        ("switcher.target_kept=1.0", "switcher.target_kept"),
        ("switcher.target_kept=0.5", "switcher.target_kept"),  # without switcher.l1 > 0 it would do nothing
        ("tracking.system_metrics_interval=0", "tracking.system_metrics_interval"),
    ],
)
def test_bad_value_raises_config_error_naming_the_key(override, key, config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [override])
    assert str(info.value).startswith(f"{key}:"), str(info.value)


def test_warmup_and_finetune_epochs_must_leave_switcher_epochs(config_file):
    assert load_config(config_file, ["schedule.finetune_epochs=6"]).schedule.finetune_epochs == 6
    with pytest.raises(ConfigError, match="finetune_epochs"):
        load_config(config_file, ["schedule.finetune_epochs=7"])  # 1 warm-up + 7 of 8 epochs


@pytest.mark.parametrize(("epochs", "warmup", "finetune"), [(12, 1, 2), (8, 1, 2), (3, 0, 1), (2, 0, 1), (20, 2, 4)])
def test_epoch_shares_resolve_to_whole_epochs_of_train_epochs(epochs, warmup, finetune):
    cfg = load_config(
        None,
        [
            f"train.epochs={epochs}",
            "schedule.warmup_epochs=0.1",
            "schedule.finetune_epochs=0.2",
            "budget.kind=macs",
            "budget.fraction=0.5",
        ],
    )
    assert (cfg.schedule.warmup_epochs, cfg.schedule.finetune_epochs) == (warmup, finetune)
    assert type(cfg.schedule.warmup_epochs) is int and type(cfg.schedule.finetune_epochs) is int


def test_a_share_keeps_the_fine_tuning_epoch_a_cut_needs():
    # 0.2 of 2 epochs rounds to 0; the budget's cut and the baselines' prune need one epoch after them
    assert (
        load_config(
            None, ["train.epochs=2", "schedule.finetune_epochs=0.2", "budget.kind=macs", "budget.fraction=0.5"]
        ).schedule.finetune_epochs
        == 1
    )
    assert (
        load_config(None, ["train.epochs=2", "method=magnitude", "prune.finetune_epochs=0.2"]).prune.finetune_epochs
        == 1
    )
    assert load_config(None, ["train.epochs=2", "schedule.finetune_epochs=0.2"]).schedule.finetune_epochs == 0


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1.0"])
def test_an_epoch_share_outside_zero_to_one_is_refused_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^schedule\.warmup_epochs: got .*share of train\.epochs in \[0, 1\)"):
        load_config(None, [f"schedule.warmup_epochs={value}"])


def test_shipped_configs_keep_their_epochs_and_leave_switcher_epochs_when_shortened():
    cfg = load_config(REPO_ROOT / "configs/fashion_lenet5.yaml")
    assert (cfg.schedule.warmup_epochs, cfg.schedule.finetune_epochs, cfg.prune.finetune_epochs) == (1, 2, 2)
    short = load_config(REPO_ROOT / "configs/fashion_lenet5.yaml", ["train.epochs=3"])
    assert short.train.epochs - short.schedule.warmup_epochs - short.schedule.finetune_epochs == 2


def test_nan_learning_rate_is_rejected_even_from_a_dict():
    with pytest.raises(ConfigError, match=r"^optim\.tnn\.lr:"):
        Config.from_dict({"optim": {"tnn": {"lr": math.nan}}})


def test_unknown_key_error_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["switcher.widht=32"])
    for allowed in ("arch", "width", "granularity"):
        assert allowed in str(info.value)


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.epochs"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# -- registry names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, choice",
    [
        ({"model": {"name": "resnet9000"}}, "model.name", "lenet5"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset", "fashion-mnist"),
        ({"method": "lottery"}, "method", "magnitude"),
        ({"switcher": {"arch": "transformer"}}, "switcher.arch", "rowwise"),
        ({"optim": {"snn": {"name": "lion"}}}, "optim.snn.name", "adamw"),
        ({"optim": {"tnn": {"scheduler": "onecycle"}}}, "optim.tnn.scheduler", "multistep"),
    ],
)
def test_unknown_registry_name_lists_the_choices(override, key, choice):
    cfg = make_config(**override)
    with pytest.raises(UnknownNameError) as info:
        validate_names(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}:") and choice in message


def test_shipped_config_is_valid_and_its_names_are_registered():
    validate_names(load_config(DEFAULT_CONFIG))


# -- command line -------------------------------------------------------------------------------------


def _single_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("distswitch: error:"), err
    return lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["switcher.widht=32"], "switcher.widht"),
        (["switcher.width=0"], "switcher.width"),
        (["model.name=resnet9000"], "model.name"),
    ],
)
def test_cli_reports_a_bad_config_in_one_line_with_status_2(args, needle, capsys, out_dir, config_file):
    status = main(["train", str(config_file), *args, f"out_dir={out_dir}", "train.progress=false"])
    assert status == 2
    assert needle in _single_error_line(capsys)


def test_cli_reports_a_missing_config_file(capsys, tmp_path):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in _single_error_line(capsys)


def test_cli_reports_an_empty_data_root(capsys, tmp_path, out_dir, config_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    status = main(
        [
            "train",
            str(config_file),
            f"data.root={empty}",
            "data.loader=torch",
            f"out_dir={out_dir}",
            "train.progress=false",
        ]
    )
    assert status == 2
    assert "data.root" in _single_error_line(capsys)


@pytest.mark.parametrize(
    "args, key",
    [
        (["model.name=resnet18", "model.gated=fc"], "model.gated"),  # resnet18's only Linear is its classifier
        (["data.train_limit=10"], "train.batch_size"),  # 10 examples cannot fill one batch of 128
    ],
)
def test_cli_reports_settings_that_fail_once_data_is_loaded_in_one_line(
    args, key, capsys, out_dir, config_file, fashion_mnist_root
):
    status = main(["train", str(config_file), *args, f"out_dir={out_dir}", "train.progress=false"])
    assert status == 2
    assert key in _single_error_line(capsys)


def test_cli_debug_flag_raises_instead(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "train", str(tmp_path / "missing.yaml")])


@pytest.mark.slow  # a fresh interpreter importing torch + torchvision: 4-8 s on 2 cores
def test_console_script_exits_2_without_traceback():
    script = Path(sys.executable).parent / "distswitch"
    assert script.is_file(), f"console script not installed at {script}"
    proc = subprocess.run(
        [str(script), "train", "configs/fashion_lenet5.yaml", "switcher.width=0"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distswitch: error: switcher.width:"), proc.stderr


@pytest.mark.parametrize("text, value", [("3e-3", 0.003), ("1E5", 100000.0), ("-2e-4", -0.0002), ("3", 3)])
def test_exponent_numbers_without_a_dot_are_numbers_not_strings(text, value, tmp_path):
    # YAML 1.1 would read 3e-3 as the string '3e-3'; in files and overrides it is a number.
    assert parse_override(f"optim.snn.lr={text}")[1] == value
    path = tmp_path / "c.yaml"
    path.write_text(f"optim:\n  snn:\n    lr: {text}\n")
    if value > 0:
        assert load_config(path).optim.snn.lr == value


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_with_registered_names(path):
    cfg = load_config(path)
    validate_names(cfg)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_sync_batchnorm_with_a_compiled_tnn_is_refused_naming_both_settings(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["distributed.use_gpu=true", "distributed.sync_batchnorm=true", "train.compile=all"])
    assert str(info.value).startswith("distributed.sync_batchnorm:") and "train.compile" in str(info.value)
    load_config(config_file, ["distributed.use_gpu=true", "distributed.sync_batchnorm=true", "train.compile=switcher"])


# -- any input: one line naming what is wrong, never a traceback (generative) ---------------------------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SECTIONS = {name: list(section) if isinstance(section, dict) else [] for name, section in Config().to_dict().items()}
_KEYS = st.sampled_from(
    [
        *_SECTIONS,
        *(f"{s}.{k}" for s, ks in _SECTIONS.items() for k in ks),
        "train.epochs.x",
        "budget.widths.3",
        "tune.space.x",
        "model.name.y.z",
        "nope",
        "data..x",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["mlp", "switch", "macs", "epoch", "fashion-mnist", "1e-3"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(
                st.sampled_from(sorted({k for ks in _SECTIONS.values() for k in ks})),
                st.text(max_size=5),
                st.integers(0, 3),
            ),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=8,
)
_DOCUMENTS = st.one_of(_VALUES, st.dictionaries(st.sampled_from(list(_SECTIONS)), _VALUES, max_size=4))
_OVERRIDES = st.lists(
    st.builds(
        lambda k, v: f"{k}={v}",
        _KEYS,
        st.one_of(
            st.sampled_from(["3", "0.5", "null", "[1, 2]", "{a: 1}", "true", "x", "", "nan", "-1", "{choice: [1]}"]),
            st.text(max_size=6),
        ),
    ),
    max_size=3,
)


@settings(
    max_examples=int(os.environ.get("CONFIG_EXAMPLES", 300)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(document=_DOCUMENTS, overrides=_OVERRIDES)
@example(document={"\n": None}, overrides=[])  # found by a CI-sized run: a key that is a line break
def test_any_yaml_document_and_overrides_give_a_config_or_one_line_config_error(tmp_path, document, overrides):
    import yaml

    path = tmp_path / "any.yaml"
    path.write_text(yaml.safe_dump(document))
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), repr(str(exc))


@pytest.mark.parametrize("workers", ["[3,1]", "[0,2]", "[1,2,3]"])
def test_an_elastic_worker_range_that_cannot_be_is_one_line_and_exit_2(workers, tmp_path, capsys):
    from distswitch.cli import main

    assert (
        main(
            [
                "train",
                str(REPO_ROOT / "configs/fashion_lenet5.yaml"),
                f"out_dir={tmp_path}",
                f"distributed.num_workers={workers}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distributed.num_workers" in err[0] and "[min, max]" in err[0]


@pytest.mark.parametrize("setting", ["distributed.start_timeout=0", "distributed.resize_interval=-1"])
def test_a_start_timeout_or_resize_interval_that_is_not_positive_is_one_line_and_exit_2(setting, tmp_path, capsys):
    from distswitch.cli import main

    assert main(["train", str(REPO_ROOT / "configs/fashion_lenet5.yaml"), f"out_dir={tmp_path}", setting]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and setting.split("=")[0] in err[0] and "> 0 (seconds)" in err[0], err


def test_an_elastic_range_maps_to_ray_train_s_elastic_scaling_and_fits_by_its_minimum():
    from distswitch.driver.cluster import check_fits
    from distswitch.driver.train import make_trainer

    cfg = load_config(REPO_ROOT / "configs/fashion_lenet5.yaml", ["distributed.num_workers=[1,4]"])
    check_fits(cfg, {"CPU": 2.0}, remote=False)  # starts with 1; grows to 4 when the nodes are there
    trainer = make_trainer(cfg, lambda config: None, "/tmp/storage", {}, 0.0, None)
    assert trainer.scaling_config.num_workers == (1, 4)
