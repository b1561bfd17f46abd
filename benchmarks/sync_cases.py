"""The training configurations whose steps must make no host sync outside logging steps: the
test (tests/test_sync_free.py) counts the syncs on the CPU, benchmarks.gpu runs them on a card
under CUDA's sync debug mode."""

from __future__ import annotations

import torch

from sepnet.module import ImageClassifier

LOG_EVERY = 4  # the logging interval the cases train with: syncs are allowed on its steps

CASES = ("fgsm", "pgd", "trades", "nfgsm", "proximal", "rank2", "hydra", "deadwood")


def case_model(case: str) -> ImageClassifier:
    """One training configuration of CASES (benchmarks.gpu runs them on the card too)."""
    attack = {"name": {"pgd": "pgd", "trades": "pgd", "nfgsm": "nfgsm"}.get(case, "fgsm"), "eps": 0.1,
              "step_size": 0.1, "steps": 3}
    network = {"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]], "rank": 2 if case == "rank2" else 1}}
    constraint = {"condition_weight": 1e-3, "condition_form": "implied", "sparsity_target": 0.5}
    if case == "proximal":
        constraint = {"condition_weight": 1e-3, "sparsity_weight": 1e-4, "proximal": True}
    if case in ("hydra", "deadwood"):
        options = {"hydra": {"score_epochs": 1}, "deadwood": {"kick_in": 0, "penalty_epochs": 1}}[case]
        network = {"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]], "dense": True},
                   "head": "dense", "compression": [{"method": case, "targets": ["*"], "budget": 4, "options": options}]}
        constraint = {}
    torch.manual_seed(0)
    return ImageClassifier(num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,), network=network,
                           constraint=constraint, validation={"batches": 0},
                           adversarial={"loss": "trades" if case == "trades" else "at", "attack": attack})
