"""The preconditioned denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM section 5, Table 1).

Two scalings (DESIGN.md section 2), chosen explicitly by the caller, never by ``module.training``:

- ``"edm"``: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2);
- ``"cm"``: consistency-model boundary condition D(x, sigma_min) = x (iCT / CM Eq. 7):
  c_skip = sd^2/((sigma-sigma_min)^2+sd^2), c_out = (sigma-sigma_min) sd/sqrt(sigma^2+sd^2).

Both use c_in = 1/sqrt(sigma^2+sd^2) and c_noise = ln(sigma)/4. The network is never evaluated at
sigma = 0 (ln 0 makes the embedding NaN): callers handle sigma = 0 themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ectune.errors import ConfigError

SCALINGS = ("edm", "cm")


@dataclass(frozen=True)
class Coefficients:
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def coefficients(sigma: torch.Tensor, sigma_data: float = 0.5, scalings: str = "edm",
                 sigma_min: float = 0.002) -> Coefficients:
    """Preconditioning coefficients for noise levels ``sigma`` (any shape), float32 or float64 like sigma."""
    sd2 = sigma_data ** 2
    if scalings == "edm":
        shifted = sigma
    elif scalings == "cm":
        shifted = sigma - sigma_min
    else:
        raise ConfigError(f"unknown scalings {scalings!r}: use one of {', '.join(SCALINGS)}")
    c_skip = sd2 / (shifted ** 2 + sd2)
    c_out = shifted * sigma_data / (sigma ** 2 + sd2).sqrt()
    c_in = 1 / (sigma ** 2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return Coefficients(c_skip, c_out, c_in, c_noise)


class Denoiser(nn.Module):
    """Wraps a raw network F(x, c_noise, class_labels) into the denoiser D(x, sigma, class_labels).

    Args:
        net: the backbone (SongUNet, MLP, ...), called as ``net(c_in * x, c_noise, class_labels)``.
        sigma_data: data standard deviation (0.5 for images in [-1, 1]).
        scalings: default scalings, "edm" or "cm"; every call may override it.
        sigma_min: the level where the "cm" scalings make D the identity.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, scalings: str = "edm", sigma_min: float = 0.002) -> None:
        super().__init__()
        if scalings not in SCALINGS:
            raise ConfigError(f"unknown scalings {scalings!r}: use one of {', '.join(SCALINGS)}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.scalings = scalings
        self.sigma_min = float(sigma_min)

    @property
    def label_dim(self) -> int:
        return int(getattr(self.net, "label_dim", 0))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                scalings: str | None = None) -> torch.Tensor:
        """D(x, sigma): x (B, ...) float32, sigma (B,) or scalar > 0, class_labels (B, label_dim) one-hot or None.
        Returns float32 with x's shape."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c = coefficients(sigma, self.sigma_data, scalings or self.scalings, self.sigma_min)
        if self.label_dim == 0:
            class_labels = None
        F_x = self.net(c.c_in * x, c.c_noise.flatten(), class_labels)
        return c.c_skip * x + c.c_out * F_x.to(torch.float32)
