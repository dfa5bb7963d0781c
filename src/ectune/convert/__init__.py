"""``ectune convert``: published EDM / EDM2 / official-ECT network pickles -> ectune model folders.

The pickles are read by a restricted unpickler that never executes code from the file
(:mod:`ectune.convert.safe_pickle`); the weights are mapped onto ectune's SongUNet or EDM2 UNet and
checked key by key (:mod:`ectune.convert.mapping`); the model folder is written through a temporary
folder and renamed into place (:mod:`ectune.convert.command`).

Usage::

    from ectune.convert import convert_checkpoint
    folder = convert_checkpoint("edm-cifar10-32x32-uncond-vp.pkl", "models/edm-cifar10-uncond")
    denoiser, info = ectune.checkpoint.load_model(folder)
"""

from ectune.convert.command import cli_convert, convert_checkpoint
from ectune.convert.mapping import ConvertedNetwork, convert_network, module_tensors, snapshot_network
from ectune.convert.safe_pickle import (
    ALLOWED_GLOBALS,
    AttributeRef,
    ModuleRecord,
    PersistentObject,
    load_pickle,
    loads_pickle,
)

__all__ = [
    "ALLOWED_GLOBALS",
    "AttributeRef",
    "ConvertedNetwork",
    "ModuleRecord",
    "PersistentObject",
    "cli_convert",
    "convert_checkpoint",
    "convert_network",
    "load_pickle",
    "loads_pickle",
    "module_tensors",
    "snapshot_network",
]
