"""Interoperability with other libraries' model formats.

- :mod:`ectune.interop.diffusers`: use a diffusers ``UNet2DModel`` (DDPM-style discrete VP schedule)
  as an ECT teacher (``convert_diffusers``) and export an ectune consistency model as a diffusers
  ``ConsistencyModelPipeline`` folder (``export_diffusers``).
- :mod:`ectune.interop.diffusers_unet`: the backbone that makes a ``UNet2DModel`` act as an EDM
  denoiser (registered as network ``"diffusers_unet"``).
- :mod:`ectune.interop.diffusers_model`: the diffusers model class that an exported pipeline loads.

diffusers is an optional dependency (``pip install 'ectune[diffusers]'``); this package imports
without it, and raises a clear error when a function that needs it is called. Nothing here imports
other ectune modules at package level, so :mod:`ectune.networks` can register the backbone.
"""
