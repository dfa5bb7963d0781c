"""The diffusers model class of an exported ectune consistency model.

An exported folder (:func:`ectune.interop.diffusers.export_diffusers`) is a stock diffusers
``ConsistencyModelPipeline`` with a ``CMStochasticIterativeScheduler``; its ``unet`` component is
:class:`ECTConsistencyUNet`, which wraps any ectune backbone. diffusers imports a component's
module only if the caller has imported it, so load the folder with::

    import ectune.interop.diffusers_model  # noqa: F401  (registers the class with diffusers)
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)

or with :func:`ectune.interop.diffusers.load_pipeline`.

**Conventions.** The pipeline calls ``unet(c_in x, timestep)`` with c_in = 1/sqrt(sigma^2+sd^2) and
timestep = 1000 * 0.25 * ln(sigma + 1e-44), and the scheduler forms
x0 = c_skip^P(sigma) x + c_out^P(sigma) * output with the consistency-model scalings of its own
``sigma_min`` s_P (CM Appendix C; s_P = 0 gives EDM's scalings). The model recovers
sigma = exp(timestep / 250), evaluates the ectune denoiser D = c_skip^M x + c_out^M F(c_in x, ln(sigma)/4)
with the model's own scalings M ("edm", or "cm" with its sigma_min), and returns

    output = ((c_skip^M - c_skip^P) x + c_out^M F) / c_out^P,

so that the scheduler's x0 equals ectune's D exactly (output = F when the two scalings agree).
At sigma ~ 0 (the scheduler's last grid level, reached only when every training timestep is
sampled) c_out^P = 0 and the output is 0, i.e. x0 = x.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput

from ectune.networks import build_network
from ectune.precond import coefficients

TIMESTEP_SCALE = 1000 * 0.25  # CMStochasticIterativeScheduler.sigma_to_t: t = 250 ln(sigma + 1e-44)

# diffusers finds a component's loading method by looking up ModelMixin in the component's module:
# keep the import above at module level.
__all__ = ["ECTConsistencyUNet", "TIMESTEP_SCALE"]


class ECTConsistencyUNet(ModelMixin, ConfigMixin):
    """An ectune backbone with its preconditioning, in the interface of diffusers' consistency pipeline.

    Args:
        network: ectune network name (:data:`ectune.networks.NETWORKS`).
        network_kwargs: its constructor arguments (the model folder's ``network.kwargs``).
        sigma_data: the model's sigma_data.
        scalings: the model's sampling scalings, "edm" or "cm".
        sigma_min: sigma_min of the model's "cm" scalings.
        scheduler_sigma_min: the ``sigma_min`` of the pipeline's CMStochasticIterativeScheduler.
        sample_size, in_channels: image size and channels (read by ConsistencyModelPipeline).
        num_class_embeds: number of classes, or None for an unconditional model.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, network: str = "songunet", network_kwargs: dict | None = None, sigma_data: float = 0.5,
                 scalings: str = "edm", sigma_min: float = 0.002, scheduler_sigma_min: float = 0.0,
                 sample_size: int = 32, in_channels: int = 3, num_class_embeds: int | None = None) -> None:
        super().__init__()
        self.net = build_network(network, **dict(network_kwargs or {}))
        model_min = 0.0 if scalings == "edm" else float(sigma_min)
        self._same_scalings = model_min == float(scheduler_sigma_min)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_dict: bool = True) -> UNet2DOutput | tuple:
        """sample = c_in x (B, C, H, W); timestep = 250 ln(sigma), scalar or (B,); class_labels int (B,) or None."""
        cfg = self.config
        t = torch.as_tensor(timestep, dtype=torch.float64, device=sample.device).reshape(-1)
        t = t.expand(sample.shape[0]) if t.numel() == 1 else t
        sigma = torch.exp(t / TIMESTEP_SCALE).to(torch.float32)
        labels = None
        if cfg.num_class_embeds:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels")
            labels = torch.nn.functional.one_hot(class_labels.reshape(-1).long(), cfg.num_class_embeds).float()
        x_in = sample.to(torch.float32)
        F = self.net(x_in, sigma.log() / 4, labels).to(torch.float32)
        if self._same_scalings:
            out = F
        else:
            s = sigma.reshape(-1, *([1] * (sample.ndim - 1)))
            x = x_in * (s * s + cfg.sigma_data ** 2).sqrt()
            m = coefficients(s, cfg.sigma_data, cfg.scalings, cfg.sigma_min)
            p = coefficients(s, cfg.sigma_data, "cm", cfg.scheduler_sigma_min)
            live = (s - cfg.scheduler_sigma_min) > 1e-6 * cfg.scheduler_sigma_min + 1e-20
            out = torch.where(live, ((m.c_skip - p.c_skip) * x + m.c_out * F) / torch.where(live, p.c_out, 1.0),
                              torch.zeros_like(F))
        out = out.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)
