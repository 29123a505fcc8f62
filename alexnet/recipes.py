"""Every named preset, in one place: each is a set of overrides on the defaults of
``alexnet.config``, which are the paper's (section 5, PAPER D1-D5), with the reason for every
value that differs. ``alexnet train --preset NAME`` starts from one; ``--print-config``
prints it resolved. The shell recipes in recipes/ name these presets."""

from __future__ import annotations

from typing import Any


def schedule_for(epochs: int) -> tuple[int, ...]:
    """Rate cuts by 10 (PAPER D4) after two thirds and after five sixths of the epochs: where
    no validation split may steer the cuts, they come at fixed epochs, as in the authors'
    log (H1: drops at epochs 25, 51, 79 of 91)."""
    cuts = {max(1, round(epochs * 2 / 3)), max(1, round(epochs * 5 / 6))}
    return tuple(sorted(c for c in cuts if c < epochs))


# ImageNet, the paper's recipe as written: D1-D5, plateau cuts, at most 90 epochs.
PAPER: dict[str, Any] = {}

# The authors' log (PAPER H1): drops after epochs 25, 51 and 79, stop after 91.
PAPER_STEPS: dict[str, Any] = {"schedule.kind": "steps", "schedule.epochs": 91}

# 28-32 px data (Fashion-MNIST, CIFAR-10) on a CPU.
SMALL: dict[str, Any] = {
    "model.arch": "small",  # the paper's 5 conv + 3 FC pattern for 28-32 px (alexnet.model)
    # Deviation: He init. With the small net's fan-ins N(0, 0.01^2) (PAPER D2) stalls at the
    # label marginal (see AlexNet.reset_parameters).
    "model.init": "kaiming",
    "data.crop_size": 0,  # crops of the stored size after 2 px of padding (B3's shifts)
    "data.pad": 2,
    # Deviation: inputs divided by the training pixels' std (the data's own: ~90 for
    # Fashion-MNIST, ~64 for CIFAR-10): the paper trains on raw 0-255 values (B2), which with
    # He init gives activations so large that SGD at this rate diverges within 5 steps.
    "data.unit_variance": True,
    "data.image_size": 32,  # a folder of images is stored at 32x32 for the small network
    "data.num_workers": 0,  # small records in memory-mapped files: workers only cost
    "schedule.epochs": 30,
    "schedule.patience": 2,  # a plateau of 2 epochs, for the 30-epoch budget
    "schedule.threshold": 0.002,
    "run.log_every": 10,
    "run.progress_interval_s": 10.0,
}

# A smoke run that fits in a minute or two: the small recipe, 3 epochs, one drop.
QUICK: dict[str, Any] = {
    **SMALL,
    "schedule.kind": "steps",
    "schedule.epochs": 3,
    "schedule.milestones": (2,),
    "run.log_every": 5,
    "run.progress_interval_s": 5.0,
}

# `alexnet demo`: the paper's recipe with what changes for 60,000 28x28 greyscale images
# (Fashion-MNIST) and a 10-minute budget on two CPU cores. Measured in docs/RESULTS.md.
DEMO_EPOCHS = 12
DEMO: dict[str, Any] = {
    **SMALL,
    # Deviation: narrower convolutions than the small net's (conv1 at two thirds of 48,
    # conv2-5 at half of 128-192-192-128; FC at its 1024), for the budget: about twice the
    # training images/s, so twice the epochs.
    "model.widths": (32, 64, 96, 96, 64),
    "model.fc_width": 1024,
    "model.dropout": 0.5,  # PAPER C1
    # PAPER B3 crops 224 of 256 px at random; here 26 of 28 (two-thirds of the positions of
    # 24 of 28 for the same cost, one pixel of border lost at test): the ten views of B5 are
    # then distinct crops, the four corners 2 px apart.
    "data.crop_size": 26,
    "data.pad": 0,
    "data.flip": True,  # PAPER B3: clothes are close to left-right symmetric
    "data.pca_std": 0.0,  # B4 is a colour noise; one grey channel has no colours to perturb
    # Deviation: inputs divided by the training pixels' std (the dataset's own, ~90 for
    # Fashion-MNIST): the paper trains on raw 0-255 values (B2), which with He init gives
    # very large activations.
    "data.unit_variance": True,
    "optim.batch_size": 128,  # PAPER D1
    # Deviation: 0.04, not 0.01 (PAPER D4): He init and unit-scale inputs take a larger rate.
    "optim.lr": 0.04,
    "optim.warmup_epochs": 0.3,  # Deviation: a short linear warm-up, for the larger rate
    # PAPER D4 divides the rate by 10 when validation error stops improving; the demo's cuts
    # come at fixed epochs (``schedule_for``), chosen before training.
    "schedule.kind": "steps",
    "schedule.epochs": DEMO_EPOCHS,
    "schedule.milestones": schedule_for(DEMO_EPOCHS),
    "run.precision": "auto",
    "run.progress_interval_s": 15.0,
    "run.log_every": 20,
}

# `alexnet experiment ablations`: the baseline every variant changes one thing of. The demo's
# recipe as it was when the ablations of docs/RESULTS.md ran (FC 512, rate 0.02), with the
# paper's crops (B3: 224 of 256, here 24 of 28, 0.875 of the image, so the ten views of B5
# differ) and colour noise (B4) on; validated after every epoch (curves only: the schedule
# is fixed) on a fixed 1,000 of the held-out validation images.
ABLATIONS: dict[str, Any] = {
    **DEMO,
    "data.crop_size": 24,
    "data.pad": 0,
    "data.pca_std": 0.1,
    "model.fc_width": 512,
    "optim.lr": 0.02,
    "run.export": False,
}

# `alexnet train --init SOURCE`: published (or earlier) weights fine-tuned on a user's images,
# a few hundred to a few thousand of them. The source fixes the layout and preprocessing
# (alexnet/finetune.py); these values are the recipe.
FINETUNE_EPOCHS = 30
FINETUNE: dict[str, Any] = {
    "optim.lr": 0.01,  # PAPER D4's starting rate, for fc8 made anew
    # The pretrained layers at a tenth of it: they hold what ImageNet taught them and need
    # adjusting, not relearning (Caffe's fine-tuning example trains them at 0.001 and its new
    # fc8 at ten times that, as here)
    "finetune.pretrained_lr_mult": 0.1,
    "optim.batch_size": 32,  # a few hundred images still give ten or more steps an epoch
    "optim.warmup_epochs": 1.0,  # Deviation: a gentle first epoch while fc8 is random
    # a small set gives a noisy validation error for plateaus to steer by: fixed cuts (D4's
    # ten-fold drops) after two thirds and five sixths of the epochs instead
    "schedule.kind": "steps",
    "schedule.epochs": FINETUNE_EPOCHS,
    "schedule.milestones": schedule_for(FINETUNE_EPOCHS),
    "data.num_workers": 2,
    "run.log_every": 5,
    "run.progress_interval_s": 15.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    "paper-steps": PAPER_STEPS,
    "small": SMALL,
    "quick": QUICK,
    "demo": DEMO,
    "ablations": ABLATIONS,
    "finetune": FINETUNE,
}
