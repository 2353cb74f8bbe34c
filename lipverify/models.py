"""The paper's models (arXiv 2506.18588, Table 1) with the initialisations of Section 8.2.

* :class:`MLP`: 784 -> 512 -> 256 -> 10 with ReLU (layers ``fc1, fc2, fc3``); input (b, 784) or
  (b, 1, 28, 28) (flattened).
* :class:`ConvNet`: input (b, 3, 32, 32); ``conv1`` 3->32 (3x3, pad 1), ReLU, maxpool 2 ->
  ``conv2`` 32->64 (3x3, pad 1), ReLU, maxpool 2 -> ``conv3`` 64->128 (3x3, stride 2, pad 1),
  ReLU, [``bn`` BatchNorm2d(128, track_running_stats=False)] -> flatten (128*4*4 = 2048) ->
  ``fc1`` 2048->256, ReLU, [``dropout``] -> ``fc2`` 256->classes.

Initialisation (:func:`initialise`): ``"default"`` keeps PyTorch's (uniform, variance
``1/(3 fan_in)``), ``"kaiming_normal"`` draws ``N(0, 2/fan_in)``; both weights are then multiplied
by the init scale s (biases are zeroed for kaiming_normal, kept for default). ReLU, max-pooling
over non-overlapping windows and flattening are 1-Lipschitz in l2, so for the MLP
``K = prod_l sigma_1(W_l)`` bounds the network's Lipschitz constant (Proposition 8). For the
ConvNet it does not: sigma_1 of a conv's reshaped (c_out, c_in kh kw) kernel is not the operator
norm of the conv as applied to an image (at initialisation conv1-conv3's norms are about 2.2x,
1.7x and 1.3x it); :mod:`lipverify.lipschitz` gives the certified bound and an empirical lower
bound beside K. Batch norm here keeps no running statistics and is not covered.
"""

from __future__ import annotations

import torch
from torch import nn

from lipverify._validation import LipverifyError

INITS = ("default", "kaiming_normal")


class MLP(nn.Module):
    """784 -> 512 -> 256 -> classes with ReLU; optional dropout after each hidden layer."""

    def __init__(self, in_features: int = 784, classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 512)
        self.fc2 = nn.Linear(512, 256)
        self.fc3 = nn.Linear(256, classes)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        return self.fc3(x)


class ConvNet(nn.Module):
    """The paper's ConvNet (Table 1) for (b, 3, 32, 32) inputs; see the module docstring."""

    def __init__(self, classes: int = 10, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(128, track_running_stats=False) if batch_norm else nn.Identity()
        self.fc1 = nn.Linear(128 * 4 * 4, 256)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(256, classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.bn(torch.relu(self.conv3(x)))
        x = self.dropout(torch.relu(self.fc1(x.flatten(1))))
        return self.fc2(x)


def initialise(model: nn.Module, init: str = "default", scale: float = 1.0) -> nn.Module:
    """Re-initialise every Linear/Conv2d weight in place (uses torch's global RNG); returns model."""
    if init not in INITS:
        raise LipverifyError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
    if not (scale > 0):
        raise LipverifyError(f"init_scale must be positive, got {scale}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                if init == "kaiming_normal":
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    if module.bias is not None:
                        module.bias.zero_()
                module.weight.mul_(scale)
    return model


def build_model(
    name: str,
    classes: int = 10,
    in_features: int = 784,
    dropout: float = 0.0,
    batch_norm: bool = False,
    init: str = "default",
    init_scale: float = 1.0,
    seed: int | None = None,
) -> nn.Module:
    """``"mlp"`` or ``"convnet"`` initialised under ``torch.manual_seed(seed)`` (fork of the RNG:
    the global stream is left untouched)."""
    if name not in ("mlp", "convnet"):
        raise LipverifyError(f"unknown model {name!r}; expected 'mlp' or 'convnet'")
    if not 0.0 <= dropout < 1.0:
        raise LipverifyError(f"dropout must be in [0, 1), got {dropout}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if name == "mlp":
            if batch_norm:
                raise LipverifyError("batch_norm is only available for the convnet")
            model = MLP(in_features, classes, dropout)
        else:
            model = ConvNet(classes, dropout, batch_norm)
        initialise(model, init, init_scale)
    return model
