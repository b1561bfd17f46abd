import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sepnet.attacks import AttackSpec, attack_guard
from sepnet.measures import separable_layers
from sepnet.layers import SeparableLinear
from sepnet.module import ImageClassifier

PGD_FAST = [{"name": "pgd", "eps": 8 / 255, "step_size": 4 / 255, "steps": 2}]


class TinyData(L.LightningDataModule):
    def __init__(self, shape=(3, 32, 32), n=16, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=8)

    test_dataloader = val_dataloader


def _fit(model, shape=(3, 32, 32), **trainer_kwargs):
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", inference_mode=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(model, TinyData(shape))
    return trainer


MLP = {"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 4, 8]]}}
CASES = {
    "mlp-separable": dict(backbone="mlp", head="separable", backbone_kwargs={"hidden_shapes": [[4, 4, 8]]}),
    "mlp-dense": dict(backbone="mlp", head="dense", backbone_kwargs={"hidden_shapes": [[4, 4, 8]]}),
    "vgg-separable": dict(backbone="vgg16", head="separable", backbone_kwargs={"width": 1 / 16},
                          head_kwargs={"hidden_shapes": [[4, 4, 4]]}),
    "vgg-dense": dict(backbone="vgg16", head="dense", backbone_kwargs={"width": 1 / 16}),
    "vit-separable": dict(backbone="vit", head="separable",
                          backbone_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2, "patch_size": 8,
                                           "separable_blocks": ["mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj"]}),
    "vit-dense": dict(backbone="vit", head="dense",
                      backbone_kwargs={"depth": 1, "embed_dim": 48, "num_heads": 2, "patch_size": 8}),
    "resnet34-dense": dict(backbone="resnet34", head="dense"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_dev_run_every_backbone_and_head(case):
    torch.manual_seed(0)
    model = ImageClassifier(network=CASES[case], constraint={"condition_weight": 1e-3, "sparsity_weight": 1e-5},
                            validation={"attacks": PGD_FAST, "batches": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _fit(model)
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    if case.endswith("separable") or case.startswith("mlp"):
        assert any(True for _ in separable_layers(model))


def test_vgg_imagenet_head_shapes():
    model = ImageClassifier(network={"backbone": "vgg16", "backbone_kwargs": {"variant": "imagenet", "width": 1 / 16},
                                     "head": "separable"}, image_shape=(3, 64, 64), num_classes=1000)
    layers = dict(separable_layers(model.net))
    first = layers["head.layers.0"]
    assert first.in_shape == (32, 7, 7) and first.out_shape == (16, 16, 16)
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


def test_vgg_width_scales_convolutions_not_heads():
    dense = ImageClassifier(network={"backbone": "vgg16", "backbone_kwargs": {"width": 0.25}, "head": "dense"})
    separable = ImageClassifier(network={"backbone": "vgg16", "backbone_kwargs": {"width": 0.25}, "head": "separable"})
    widths = [m.out_features for m in dense.net.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [layer.out_shape for _, layer in separable_layers(separable.net)]
    assert widths[:-1] == [math.prod(s) for s in shapes] == [512, 512]
    convs = [m.out_channels for m in dense.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0] == 16 and convs[-1] == 128


def test_adversarial_training_and_proximal_zeros():
    torch.manual_seed(0)
    model = ImageClassifier(network=MLP, adversarial={"loss": "at", "attack": {"steps": 2, "step_size": 4 / 255}},
                            constraint={"sparsity_weight": 1.0, "proximal": True}, optimization={"lr": 0.05},
                            validation={"attacks": PGD_FAST})
    calls = []
    original = model.attacker.generate
    model.attacker.generate = lambda x, y, spec: calls.append(spec) or original(x, y, spec)
    _fit(model)
    assert calls[0].name == "pgd" and calls[0].steps == 2
    zeros = sum(int((f == 0).sum()) for _, l in separable_layers(model) for t in l.factors for f in t)
    assert zeros > 0


def test_attack_guard_restores_mode_grads_and_batchnorm():
    torch.manual_seed(0)
    model = ImageClassifier(network=CASES["vgg-dense"])
    model.train()
    model.net(torch.rand(4, 3, 32, 32)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    stats = [b.clone() for b in model.buffers()]
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    spec = AttackSpec("pgd", "linf", 8 / 255, 2 / 255, 3, True)
    adv = model.attacker.generate(x, y, spec)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(s, b) for s, b in zip(stats, model.buffers()))
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad(), attack_guard(model):
        assert torch.is_grad_enabled() and not model.training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(constraint={"sparsity_weight": -1.0}), "sparsity_weight must be >= 0, got -1.0"),
        (dict(constraint={"sparsity_target": 1.5}), r"sparsity_target must be in \(0, 1\), got 1.5"),
        (dict(network={"backbone": "alexnet"}), "unknown backbone 'alexnet'"),
        (dict(network={"head": "tiny"}), "unknown head 'tiny'"),
        (dict(validation={"attacks": [{"eps": -0.1}]}), "eps must be a finite number >= 0, got -0.1"),
        (dict(validation={"attacks": [{"steps": 0}]}), "steps must be >= 1, got 0"),
        (dict(validation={"attacks": [{"norm": "l7"}]}), "unknown attack norm 'l7'"),
        (dict(network={"backbone": "mlp", "head": "separable", "head_kwargs": {"hidden_shapes": [[4, 4]]}}),
         r"hidden shape \[4, 4\] must have 3 modes"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**kwargs)


def test_load_from_checkpoint_without_arguments(tmp_path):
    model = ImageClassifier(network=MLP, validation={"attacks": PGD_FAST})
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
                        inference_mode=False, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, TinyData())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    x = torch.rand(2, 3, 32, 32)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(x), loaded(x))
    assert isinstance(loaded.net.backbone[0], SeparableLinear)


def test_bf16_autocast_training_with_adversarial_examples():
    torch.manual_seed(0)
    model = ImageClassifier(network=CASES["vgg-separable"], adversarial={"loss": "at", "attack": {"steps": 2}},
                            constraint={"condition_weight": 1e-3}, validation={"attacks": PGD_FAST, "batches": 1})
    _fit(model, precision="bf16-mixed", accumulate_grad_batches=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_interrupted_checkpoint_write_leaves_the_old_file(tmp_path, monkeypatch):
    model = ImageClassifier(network=MLP)
    trainer = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    original = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == original


def test_checkpoint_monitor_is_the_worst_case_whatever_the_attacks(tmp_path):
    """The CLI's checkpoint monitors val/robust_acc/worst, which every validation logs, also
    when the first attack is not PGD-Linf (before: a hard-coded pgd_linf name that such a run
    never logged)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sepnet.cli import SepnetCLI
    from sepnet.data import VisionDataModule

    cli = SepnetCLI(ImageClassifier, VisionDataModule, subclass_mode_data=True, run=False,
                    save_config_callback=None,
                    args=["--trainer.logger", "false", "--data", "sepnet.data.DigitsDataModule"])
    assert cli.trainer.checkpoint_callback.monitor == "val/robust_acc/worst"
    torch.manual_seed(0)
    model = ImageClassifier(network=MLP, validation={"attacks": [{"name": "apgd_ce", "steps": 2}], "batches": 1})
    best = ModelCheckpoint(dirpath=tmp_path, monitor=cli.trainer.checkpoint_callback.monitor, mode="max")
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, accelerator="cpu",
                        inference_mode=False, logger=False, enable_progress_bar=False, callbacks=[best])
    trainer.fit(model, TinyData())
    metrics = trainer.callback_metrics
    assert best.best_model_score == metrics["val/robust_acc/worst"] == metrics["val/robust_acc/apgd_ce_linf"]
    assert best.best_model_path


def test_network_is_built_without_lightning():
    from sepnet.network import build_network

    kwargs = dict(backbone="mlp", backbone_kwargs={"hidden_shapes": [[4, 4, 8]]}, head="separable")
    torch.manual_seed(0)
    net = build_network(10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, **kwargs)
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, network=kwargs)
    assert not isinstance(net, L.LightningModule)
    assert net.state_dict().keys() == model.net.state_dict().keys()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(net.eval()(x), model.net.eval()(x))
    with pytest.raises(ValueError, match="unknown head 'tiny'"):
        build_network(head="tiny")


def test_sections_as_dataclasses_or_dicts_and_plain_hyperparameters(tmp_path):
    from sepnet.objectives import AdversarialTraining
    from sepnet.constraints import ConstraintConfig
    from sepnet.network import NetworkConfig

    as_dicts = ImageClassifier(network=MLP, constraint={"condition_weight": 1e-3},
                               adversarial={"loss": "at", "attack": {"name": "fgsm", "step_size": 0.04}})
    as_classes = ImageClassifier(network=NetworkConfig(**MLP), constraint=ConstraintConfig(condition_weight=1e-3),
                                 adversarial=AdversarialTraining(loss="at", attack=AttackSpec(name="fgsm", step_size=0.04)))
    assert dict(as_dicts.hparams) == dict(as_classes.hparams)
    assert as_dicts.adversarial == as_classes.adversarial and as_dicts.adversarial.attack.step_size == 0.04
    # plain types only: a checkpoint's hyperparameters load with weights_only=True
    torch.save(dict(as_dicts.hparams), tmp_path / "h.pt")
    loaded = torch.load(tmp_path / "h.pt", weights_only=True)
    assert ImageClassifier(**loaded).adversarial == as_dicts.adversarial
    with pytest.raises(TypeError, match="NetworkConfig: expected the dataclass or a dict"):
        ImageClassifier(network="mlp")
    with pytest.raises(ValueError, match="adversarial.mix must be in"):
        ImageClassifier(adversarial={"mix": 1.5})


def test_binary_tasks_skip_apgd_dlr_and_refuse_it_when_asked():
    model = ImageClassifier(num_classes=2, network=MLP)
    assert "apgd_dlr" not in [a.name for a in model.test_attacks] and "square" in [a.name for a in model.test_attacks]
    assert "apgd_dlr" in [a.name for a in ImageClassifier(network=MLP).test_attacks]
    with pytest.raises(ValueError, match="report.attacks: apgd_dlr needs at least 3 classes .* the model has 2"):
        model.configure_test_suite([AttackSpec(name="apgd_dlr")])
    with pytest.raises(ValueError, match="validation.attacks: autoattack needs at least 3 classes"):
        ImageClassifier(num_classes=2, network=MLP, validation={"attacks": [{"name": "autoattack"}]})


def test_the_progress_bar_shows_loss_accuracy_and_the_worst_case():
    """A person at a terminal sees more than v_num: the training loss and accuracy, the
    validation accuracy and worst case."""
    torch.manual_seed(0)
    model = ImageClassifier(network=MLP, validation={"attacks": PGD_FAST, "batches": 1})
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", inference_mode=False, logger=False,
                        enable_progress_bar=True, enable_model_summary=False)
    trainer.fit(model, TinyData((3, 32, 32)))
    shown = set(trainer.progress_bar_metrics)
    assert {"train/loss", "train/acc", "val/acc", "val/robust_acc/worst"} <= shown, shown


def test_an_epoch_resumed_in_its_middle_is_timed_from_the_resume_not_from_the_process_start():
    """EpochLine's seconds of an epoch whose start hook did not run (a mid-epoch resume) were
    time.perf_counter() - 0: the machine's uptime (the audit saw 5611 s)."""
    import logging

    from sepnet.callbacks import EpochLine

    line = EpochLine()

    class Trainer:
        is_global_zero, sanity_checking, current_epoch, max_epochs, callback_metrics = True, False, 0, 1, {}

    class Module:
        validation = type("V", (), {"every_n_epochs": 1})()
        certificate = type("C", (), {"radii": (0.1,)})()
        certifier = type("K", (), {"certifiable": False})()

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("sepnet.callbacks").addHandler(handler)
    logging.getLogger("sepnet.callbacks").setLevel(logging.INFO)
    try:
        line.on_train_batch_start(Trainer(), Module(), None, 0)  # no on_train_epoch_start: resumed mid-epoch
        line.on_train_batch_end(Trainer(), Module(), torch.tensor(1.0), None, 0)
        line.on_train_epoch_end(Trainer(), Module())
    finally:
        logging.getLogger("sepnet.callbacks").removeHandler(handler)
    message = records[-1].getMessage()
    assert message.startswith("epoch 1/1, train loss 1.0000") and message.endswith(" 0 s"), message
