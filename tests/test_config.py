"""Every config group option composes with Hydra's compose API, and what can be built on a CPU is built."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from omegaconf import OmegaConf, open_dict

from conftest import CONF, QUICK, compose_cfg
from mlplab.callbacks import (
    DecisionBoundary,
    GradientNorms,
    MisclassifiedImages,
    ProgressBar,
    SampleInputs,
    TestReport,
    WeightHistograms,
)
from mlplab.config import validate_optimizer, validate_train_config, validate_trainer
from mlplab.data import DigitsDataModule, FashionMNISTDataModule, MNISTDataModule
from mlplab.engines.build import (
    _instantiate_group,
    build_datamodule,
    build_loss,
    build_net,
    build_trainer,
    check_targets,
)
from mlplab.errors import ConfigError
from mlplab.groups import group_options
from mlplab.models import MLP, SigmoidNet, SimpleNet

#: The groups every train config is composed with, each option in turn (test_every_train_config_resolves).
GROUPS = (
    "data",
    "augment",
    "model",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
)


def _files(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def test_group_options_are_the_files_of_the_running_apps_conf(tmp_path):
    for group in GROUPS:
        assert group_options(group) == sorted(_files(group)), group
    assert "lesson_d_fashion" in group_options("experiment") and "relu_net" in group_options("model")
    # The lesson presets' shared base (conf/_lesson.yaml) is in no group: no experiment=_lesson.
    assert (CONF / "_lesson.yaml").is_file() and "_lesson" not in group_options("experiment")
    # Inside a Hydra app: what its config repository holds, e.g. a --config-dir's extra options.
    extra = tmp_path / "extra"
    (extra / "data").mkdir(parents=True)
    (extra / "data" / "my_data.yaml").write_text("_target_: mlplab.data.DigitsDataModule\n")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert GlobalHydra.instance().is_initialized() and group_options("data") == sorted(_files("data"))
    with initialize_config_dir(config_dir=str(extra), version_base="1.3"):
        assert group_options("data") == ["my_data"]
    assert "my_data" not in group_options("data")


def _allowed(message: str, group: str) -> set[str]:
    [listed] = re.findall(rf"\b{group}=([\w|]+)", message.split("allowed: ", 1)[1])
    return set(listed.split("|"))


def test_allowed_lists_in_messages_are_the_files_of_each_group(tmp_path):
    """A missing group's message lists exactly the group's options (conf/<group>/*.yaml)."""
    cfg = compose_cfg(QUICK, tmp_path)
    with open_dict(cfg):
        del cfg["data"]
    with pytest.raises(ConfigError, match=r"^data and model must be chosen; allowed: data=") as info:
        validate_train_config(cfg)
    assert _allowed(str(info.value), "data") == _files("data")
    assert _allowed(str(info.value), "model") == _files("model")  # relu_net too
    for group, check in [("optimizer", validate_optimizer), ("trainer", validate_trainer)]:
        cfg = compose_cfg(QUICK, tmp_path)
        with open_dict(cfg):
            del cfg[group]
        with pytest.raises(ConfigError, match=rf"^{group} is missing; allowed: {group}=") as info:
            check(cfg)
        assert _allowed(str(info.value), group) == _files(group), group
    cfg = compose_cfg(QUICK + ["loss._target_=torch.nn.CrossEntropyLoss"], tmp_path)
    with pytest.raises(ConfigError, match=r"^loss\._target_=torch\.nn\.CrossEntropyLoss is not an mlplab loss") as info:
        build_loss(cfg)
    assert _allowed(str(info.value), "loss") == _files("loss")


def test_parametrised_tests_cover_every_option():
    # If someone adds an option, the parametrised tests below must learn about it (every group's
    # options are also composed and validated by test_every_train_config_resolves).
    assert {case[0] for case in LOGGER_CASES} == _files("logger")
    assert {case[0] for case in CALLBACK_CASES} == _files("callbacks")
    assert {case[0] for case in CPU_TRAINER_CASES + GPU_TRAINER_CASES} == _files("trainer")


def test_default_train_config(tmp_path):
    cfg = compose_cfg([], tmp_path)
    assert cfg.data._target_ == "mlplab.data.DigitsDataModule"
    assert cfg.model._target_ == "mlplab.models.MLP"
    assert list(cfg.model.hidden_sizes) == [256, 128]
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    # The groups' defaults, with data=digits' recipe (conf/recipe/digits.yaml) on top.
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 0.0
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.CosineAnnealingLR" and cfg.scheduler.T_max == 40
    assert cfg.trainer.accelerator == "auto" and cfg.trainer.devices == 1 and cfg.trainer.max_epochs == 40
    assert (cfg.data.mean, cfg.data.std, cfg.loss.label_smoothing) == (0.305, 0.376, 0.1)
    assert set(cfg.logger) == {"tensorboard"}
    assert set(cfg.callbacks) == {
        "model_checkpoint",
        "progress_bar",
        "gradient_norms",
        "weight_histograms",
        "sample_inputs",
        "test_report",
        "misclassified",
        "decision_boundary",
    }
    assert cfg.engine == "lightning"
    assert cfg.seed == 42 and cfg.ckpt_path is None and cfg.test is True
    assert cfg.optimized_metric == "val/acc_best"
    assert cfg.paths.output_dir == str(tmp_path)
    validate_train_config(cfg)


# -- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "cls", "batch", "val_size", "mean", "std", "input_dim"),
    [
        ("digits", DigitsDataModule, 32, 0.1, 0.0, 1.0, 64),
        ("mnist", MNISTDataModule, 128, 5000, 0.0, 1.0, 784),
        ("fashion_mnist", FashionMNISTDataModule, 128, 5000, 0.5, 0.5, 784),
    ],
)
def test_data_options_build_datamodules(tmp_path, monkeypatch, option, cls, batch, val_size, mean, std, input_dim):
    monkeypatch.setenv("MLPLAB_DATA_DIR", str(tmp_path / "datasets"))
    cfg = compose_cfg([f"data={option}", "recipe=none"], tmp_path / "out")  # the data option's own values
    dm = build_datamodule(cfg.data)
    assert type(dm) is cls
    assert dm.batch_size == batch
    assert dm.eval_batch_size == max(batch, 1000)
    assert dm.val_size == val_size and dm.train_size is None and dm.split_seed == 42
    assert (dm.mean, dm.std) == (mean, std)
    assert dm.input_dim == input_dim and dm.num_classes == 10
    assert dm.data_train is None  # constructing does not load data
    if option != "digits":
        assert dm.data_dir == str(tmp_path / "datasets")  # ${paths.data_dir} <- MLPLAB_DATA_DIR
        assert dm.download is True
        assert not (tmp_path / "datasets").exists()


def test_fashion_class_names_and_normalisation(tmp_path):
    cfg = compose_cfg(["data=fashion_mnist"], tmp_path)
    assert cfg.data.mean == 0.5 and cfg.data.std == 0.5
    dm = build_datamodule(cfg.data)
    assert dm.class_names[0] == "T-shirt/top" and dm.class_names[-1] == "Ankle boot"


# -- model + optimizer + scheduler ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "data", "cls", "n_linear", "hidden"),
    [
        ("simple_net", "digits", SimpleNet, 2, [120]),
        ("simple_net", "mnist", SimpleNet, 2, [120]),
        ("sigmoid_net", "digits", SigmoidNet, 2, [120]),
        ("sigmoid_net", "fashion_mnist", SigmoidNet, 2, [120]),
        ("relu_mlp", "digits", MLP, 3, [256, 128]),
        ("relu_mlp", "mnist", MLP, 3, [256, 128]),
    ],
)
def test_model_options_build_nets_sized_from_the_data(tmp_path, model, data, cls, n_linear, hidden):
    cfg = compose_cfg([f"model={model}", f"data={data}"], tmp_path)
    dm = build_datamodule(cfg.data)
    net = build_net(cfg.model, dm)
    assert type(net) is cls
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == n_linear
    assert linears[0].in_features == dm.input_dim
    assert [lin.out_features for lin in linears[:-1]] == hidden
    assert linears[-1].out_features == 10
    out = net(torch.zeros(3, *dm.input_shape))
    assert out.shape == (3, 10)


@pytest.mark.parametrize(
    "overrides", [[], ["optimizer.lr=0.2", "optimizer.momentum=0.0", "optimizer.weight_decay=0.001"]]
)
def test_sgd_partial_applies_to_a_nets_parameters(tmp_path, overrides):
    cfg = compose_cfg(["optimizer=sgd", *overrides], tmp_path)
    dm = build_datamodule(cfg.data)
    net = build_net(cfg.model, dm)
    factory = instantiate(cfg.optimizer)
    opt = factory(params=net.parameters())
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert group["lr"] == cfg.optimizer.lr
    assert group["momentum"] == cfg.optimizer.momentum
    assert group["weight_decay"] == cfg.optimizer.weight_decay
    assert group["nesterov"] is False
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in net.parameters())


def test_scheduler_none_is_empty(tmp_path):
    cfg = compose_cfg(["scheduler=none"], tmp_path)
    assert OmegaConf.to_container(cfg.scheduler) == {}  # train() passes scheduler=None for a falsy group


@pytest.mark.parametrize("epochs", [10, 7])
def test_scheduler_cosine_anneals_over_max_epochs(tmp_path, epochs):
    cfg = compose_cfg(["scheduler=cosine", f"trainer.max_epochs={epochs}"], tmp_path)
    assert cfg.scheduler.T_max == epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = instantiate(cfg.scheduler)(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.T_max == epochs
    for _ in range(epochs):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# -- trainer ---------------------------------------------------------------------------------


CPU_TRAINER_CASES = [
    ("default", "SingleDeviceStrategy", 1),
    ("cpu", "SingleDeviceStrategy", 1),
    ("ddp_cpu", "HydraDDPStrategy", 2),
]


@pytest.mark.parametrize(("option", "strategy_cls", "num_devices"), CPU_TRAINER_CASES)
def test_cpu_trainers_instantiate(tmp_path, option, strategy_cls, num_devices):
    cfg = compose_cfg([f"trainer={option}", "logger=none", "callbacks=none", "recipe=none"], tmp_path)
    validate_trainer(cfg)
    assert cfg.trainer.max_epochs == 10 and cfg.trainer.min_epochs == 1
    if option == "ddp_cpu":
        assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
        assert cfg.trainer.strategy._target_ == "mlplab.distributed.HydraDDPStrategy"
        assert cfg.trainer.num_nodes == 1
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer, L.Trainer)
    assert type(trainer.strategy).__name__ == strategy_cls
    assert trainer.num_devices == num_devices
    assert trainer.max_epochs == 10
    assert trainer.default_root_dir == str(tmp_path)
    if option != "default":  # default is 'auto': the CPU here, a GPU elsewhere
        assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"


GPU_TRAINER_CASES = [
    ("gpu", {"accelerator": "gpu", "devices": 1}),
    ("ddp", {"accelerator": "gpu", "devices": -1, "num_nodes": 1, "sync_batchnorm": False}),
    ("mps", {"accelerator": "mps", "devices": 1}),
]


@pytest.mark.parametrize(("option", "expected"), GPU_TRAINER_CASES)
def test_gpu_trainers_compose(tmp_path, option, expected):
    cfg = compose_cfg([f"trainer={option}", "recipe=none"], tmp_path)
    for key, value in expected.items():
        assert cfg.trainer[key] == value, key
    if option == "ddp":
        assert cfg.trainer.strategy._target_ == "mlplab.distributed.HydraDDPStrategy"
    # inherited from trainer/default
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.trainer.use_distributed_sampler is False
    assert cfg.trainer.max_epochs == 10
    assert cfg.trainer.default_root_dir == str(tmp_path)
    validate_trainer(cfg)  # devices -1 ("all") is valid


# -- logger / callbacks ------------------------------------------------------------------------


LOGGER_CASES = [
    ("tensorboard", [TensorBoardLogger]),
    ("csv", [CSVLogger]),
    ("many_loggers", [TensorBoardLogger, CSVLogger]),
    ("none", []),
    ("mlflow", [MLFlowLogger]),
]


@pytest.mark.parametrize(("option", "types"), LOGGER_CASES)
def test_logger_options(tmp_path, option, types):
    cfg = compose_cfg([f"logger={option}"], tmp_path)
    loggers = _instantiate_group(cfg.get("logger"))
    assert sorted(type(lg).__name__ for lg in loggers) == sorted(t.__name__ for t in types)
    for lg in loggers:
        if isinstance(lg, MLFlowLogger):  # a SQLite store: no save dir; the database sits in logs/
            assert lg._tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and lg._run_name == tmp_path.name
        else:
            assert lg.save_dir == str(tmp_path)
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger):  # event files in the run dir: TensorBoard names the run by it
            assert (lg.name, lg.version, Path(lg.log_dir)) == ("", "", tmp_path)
            assert cfg.logger.tensorboard.default_hp_metric is False
        if isinstance(lg, CSVLogger):
            assert lg.name == "csv"


DIAGNOSTICS = [GradientNorms, WeightHistograms, SampleInputs, TestReport, MisclassifiedImages, DecisionBoundary]


CALLBACK_CASES = [
    ("default", [ModelCheckpoint, ProgressBar, *DIAGNOSTICS]),
    ("early_stopping", [ModelCheckpoint, ProgressBar, EarlyStopping, *DIAGNOSTICS]),
    ("diagnostics", [ModelCheckpoint, ProgressBar, *DIAGNOSTICS]),
    ("none", []),
]


@pytest.mark.parametrize(("option", "types"), CALLBACK_CASES)
def test_callback_options(tmp_path, option, types):
    cfg = compose_cfg([f"callbacks={option}"], tmp_path)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    assert sorted(type(c).__name__ for c in callbacks) == sorted(t.__name__ for t in types)
    by_type = {type(c): c for c in callbacks}
    if GradientNorms in by_type:
        full = option == "diagnostics"  # everything at full rate; the default is cheap
        grads, hist = by_type[GradientNorms], by_type[WeightHistograms]
        assert grads.every_n_steps == (1 if full else None)  # None: trainer.log_every_n_steps
        assert grads.figure_every_n_epochs == (1 if full else None)
        assert hist.every_n_epochs == (1 if full else None) and hist.gradients is full
        assert by_type[DecisionBoundary].every_n_epochs == (1 if full else 10)
        assert by_type[MisclassifiedImages].max_images == (48 if full else 24)
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint):
            assert cb.dirpath == str(tmp_path / "checkpoints")
            assert cb.monitor == "val/acc" and cb.mode == "max" and cb.save_last is True and cb.save_top_k == 1
        if isinstance(cb, EarlyStopping):
            assert cb.monitor == "val/acc" and cb.mode == "max" and cb.patience == 3
        if isinstance(cb, TQDMProgressBar):
            assert cb.refresh_rate == 20


# -- debug / experiment ------------------------------------------------------------------------


def test_debug_fdr(tmp_path):
    cfg = compose_cfg(["debug=fdr", "trainer=cpu"], tmp_path)
    assert cfg.trainer.fast_dev_run is True
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.fast_dev_run is True
    assert trainer.limit_train_batches == 1 and trainer.limit_val_batches == 1 and trainer.limit_test_batches == 1


def test_debug_overfit(tmp_path):
    cfg = compose_cfg(["debug=overfit", "trainer=cpu"], tmp_path)
    assert cfg.trainer.overfit_batches == 3 and cfg.trainer.max_epochs == 30
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.overfit_batches == 3 and trainer.max_epochs == 30


def test_experiment_lesson_d_fashion(tmp_path):
    cfg = compose_cfg(["experiment=lesson_d_fashion"], tmp_path)
    assert cfg.data._target_ == "mlplab.data.FashionMNISTDataModule"
    assert cfg.model._target_ == "mlplab.models.SimpleNet"
    assert cfg.data.train_size == 10000 and cfg.data.val_size == 1000 and cfg.data.batch_size == 512
    assert cfg.data.mean == 0.5 and cfg.data.std == 0.5
    assert cfg.optimizer.lr == 0.001 and cfg.optimizer.momentum == 0.9
    assert cfg.trainer.max_epochs == 5
    assert not cfg.scheduler  # the lesson uses a constant lr
    validate_train_config(cfg)
    dm = build_datamodule(cfg.data)
    assert dm.split_sizes(60_000) == (10_000, 1_000)
    net = build_net(cfg.model, dm)
    assert isinstance(net, SimpleNet)
    opt = instantiate(cfg.optimizer)(params=net.parameters())
    assert opt.param_groups[0]["lr"] == 0.001


@pytest.mark.parametrize(
    ("preset", "dropout", "augment", "epochs"),
    [("mnist_fast", 0.0, "RandomAffine", 10), ("fashion_fast", 0.1, None, 15)],
)
def test_experiment_fast_presets(tmp_path, preset, dropout, augment, epochs):
    cfg = compose_cfg([f"experiment={preset}"], tmp_path)
    validate_train_config(cfg)
    dm = build_datamodule(cfg.data)
    net = build_net(cfg.model, dm)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 512), (512, 10)]
    assert [m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)] == ([dropout] * 2 if dropout else [])
    assert type(dm.augment).__name__ == augment if augment else dm.augment is None
    assert cfg.trainer.max_epochs == epochs
    assert cfg.optimizer.nesterov is True and cfg.scheduler._target_.endswith("OneCycleLR")


def test_onecycle_gets_total_steps_and_steps_per_batch(tmp_path):
    from mlplab.models.classifier import Classifier

    cfg = compose_cfg(QUICK + ["scheduler=onecycle", "trainer.max_epochs=2", "optimizer.lr=0.2"], tmp_path)
    dm = build_datamodule(cfg.data)
    model = Classifier(build_net(cfg.model, dm), dm.num_classes, instantiate(cfg.optimizer), instantiate(cfg.scheduler))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    sched = trainer.lr_scheduler_configs[0]
    assert sched.interval == "step"
    steps = trainer.global_step
    assert steps == 2 * len(dm.train_dataloader()) and sched.scheduler.total_steps == steps
    # one full cycle over the run: it ends below 0.1 % of max_lr (= optimizer.lr)
    assert sched.scheduler.optimizer.param_groups[0]["lr"] < 0.2 * 1e-3


def test_experiment_model_can_be_overridden_on_the_command_line(tmp_path):
    cfg = compose_cfg(["experiment=lesson_d_fashion", "model=relu_mlp"], tmp_path)
    assert cfg.model._target_ == "mlplab.models.MLP"
    assert cfg.data.train_size == 10000


# -- eval ------------------------------------------------------------------------------------


def test_eval_config_composes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLPLAB_DATA_DIR", str(tmp_path / "datasets"))
    ckpt = tmp_path / "some.ckpt"
    cfg = compose_cfg([f"ckpt_path={ckpt}"], tmp_path / "out", config_name="eval")
    assert cfg.task_name == "eval"
    assert cfg.ckpt_path == str(ckpt)
    assert cfg.data.data_dir == str(tmp_path / "datasets")
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and cfg.trainer.devices == 1
    assert set(cfg.logger) == {"tensorboard"}
    assert {"test_report", "misclassified"} <= set(cfg.callbacks)  # the test-time diagnostics
    assert "model" not in cfg and "optimizer" not in cfg  # those come from the checkpoint
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate_trainer(cfg)


def test_eval_config_requires_ckpt_path(tmp_path):
    cfg = compose_cfg([], tmp_path, config_name="eval")
    assert OmegaConf.is_missing(cfg, "ckpt_path")


def test_every_train_config_resolves(tmp_path):
    # The full cross product is large; one config per option of every group, all resolved.
    for group in GROUPS:
        for option in group_options(group):
            cfg = compose_cfg([f"{group}={option}"], tmp_path)
            container = OmegaConf.to_container(cfg, resolve=True)
            assert container["paths"]["output_dir"] == str(tmp_path), (group, option)
            validate_train_config(cfg)


# -- mlplab.engines.build: what a _target_ takes, checked before anything is built ----------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["logger=csv", "+logger.csv.flush_logs_every_n_step=5"],
            [
                "logger.csv.flush_logs_every_n_step=5 is invalid: lightning.pytorch.loggers.CSVLogger has no such option",
                "(did you mean flush_logs_every_n_steps?)",
            ],
        ),
        (
            ["+model.input_dim=5"],
            ["model.input_dim=5 is invalid: mlplab sets it (from the data)", "allowed keys: hidden_sizes"],
        ),
        (
            ["augment=affine", "+data.augment.bogus=1"],
            ["data.augment.bogus=1", "kornia.augmentation.RandomAffine has no such option"],
        ),
        (
            ["model._target_=torch.nn.Nope"],
            ["model._target_='torch.nn.Nope' cannot be imported", "allowed: an importable"],
        ),
    ],
    ids=["logger key", "key the run sets", "nested target", "no such target"],
)
def test_check_targets_refuses_what_no_signature_takes(tmp_path, overrides, expected):
    cfg = compose_cfg(QUICK + overrides, tmp_path)
    with pytest.raises(ConfigError) as info:
        check_targets(cfg)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))


def test_check_targets_lets_kwargs_targets_and_every_preset_through(tmp_path):
    # TensorBoardLogger passes **kwargs on to its SummaryWriter: any key is its to judge.
    check_targets(compose_cfg(["logger=tensorboard", "+logger.tensorboard.flush_secs=5"], tmp_path))
    # Presets that set keys of other groups (experiment=..., # @package _global_) add no unknown keys.
    for preset in group_options("experiment"):
        check_targets(compose_cfg([f"experiment={preset}"], tmp_path))


def test_unknown_top_level_key_of_eval_names_eval_yaml(tmp_path):
    cfg = compose_cfg(["ckpt_path=x.ckpt", "+sead=1"], tmp_path, config_name="eval")
    with pytest.raises(
        ConfigError, match=r"sead=1 is invalid: eval\.yaml .* allowed keys: callbacks, ckpt_path, data, "
    ):
        check_targets(cfg)


def test_nested_target_refusal_names_the_nested_node(tmp_path):
    cfg = compose_cfg(QUICK + ["augment=affine", "data.augment.degrees=abc"], tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^data\.augment: kornia\.augmentation\.RandomAffine rejected the config \(data\.augment\.degrees='abc'\)",
    ):
        build_datamodule(cfg.data)


def test_trainer_value_of_the_wrong_type_is_a_config_error(tmp_path):
    cfg = compose_cfg(QUICK + ["+trainer.max_time=5"], tmp_path)
    with pytest.raises(ConfigError) as info:
        build_trainer(cfg.trainer, logger=False)
    # The message does not say which key: the values this command line set are all shown.
    msg = str(info.value)
    assert msg.startswith("trainer=cpu: lightning.pytorch.Trainer rejected the config (trainer.max_epochs=1, "), msg
    assert "trainer.max_time=5): AttributeError: 'int' object has no attribute 'total_seconds'" in msg


def test_net_the_allocator_refuses_says_what_it_asked_for(tmp_path, monkeypatch):
    """Past the pre-check against physical memory (off here), the allocation error itself is
    caught. 2.6 PB is more than a 47-bit address space: refused whatever the overcommit policy."""
    import mlplab.engines.build

    monkeypatch.setattr(mlplab.engines.build, "_physical_memory", lambda: None)
    cfg = compose_cfg(QUICK + ["model.hidden_sizes=[10000000000000]"], tmp_path)
    dm = build_datamodule(cfg.data)
    with pytest.raises(ConfigError) as info:
        build_net(cfg.model, dm)
    msg = str(info.value)
    assert msg.startswith(
        "model.hidden_sizes=[10000000000000] is too large: mlplab.models.MLP would have "
        "750,000,000,000,010 parameters (3.0 PB), which this machine cannot allocate"
    ), msg
    assert "\n" not in msg and "allowed: a net that fits in memory" in msg


# -- the config tree at the start of a run ----------------------------------------------------------


def test_the_run_prints_its_config_tree_and_saves_it_whole(tmp_path, capsys):
    """After the first line, one line per group: the option, its main keys and the keys set on
    the command line or by the recipe; the whole resolved config in <run dir>/config_tree.log. print_config=false:
    neither."""
    from conftest import QUICK
    from mlplab.engines import fit

    overrides = [*QUICK, "logger=none", "test=false", "optimizer=adam", "+optimizer.amsgrad=true", "model.dropout=0.1"]
    fit(compose_cfg(overrides, tmp_path / "run"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train: MLP (") and lines[1].startswith("config (all of it: config_tree.log")
    callbacks = "model_checkpoint, progress_bar, gradient_norms, weight_histograms, sample_inputs, test_report"
    # The recipe's keys too (data.mean, data.std, loss.label_smoothing).
    assert lines[2:11] == [
        "├── data: digits  batch_size=32 mean=0.305 std=0.376",
        "├── model: relu_mlp  hidden_sizes=[256, 128] activation=relu dropout=0.1 batch_norm=False",
        "├── loss: cross_entropy  label_smoothing=0.1",
        "├── optimizer: adam  lr=0.001 weight_decay=0.0 amsgrad=True",
        "├── scheduler: cosine",
        "├── trainer: cpu  max_epochs=1 accelerator=cpu devices=1 enable_model_summary=False",
        f"├── callbacks: default  ({callbacks}, misclassified, decision_boundary)"[:119] + "…",
        "├── logger: none",
        "└── engine=lightning  seed=42  steps_per_call=16  recipe=digits",
    ], lines[2:11]
    saved = (tmp_path / "run" / "config_tree.log").read_text()
    assert "├── optimizer" in saved and "amsgrad: true" in saved and "seed: 42" in saved
    assert "data_dir: " + str(compose_cfg([], tmp_path).paths.data_dir) in saved  # resolved

    fit(compose_cfg([*overrides, "print_config=false"], tmp_path / "quiet"))
    lines = capsys.readouterr().out.splitlines()
    assert (
        not any(line.startswith(("config (", "├──", "└──")) for line in lines)
        and not (tmp_path / "quiet" / "config_tree.log").exists()
    )
