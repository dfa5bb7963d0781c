"""Convert a network pickle into an ectune model folder, all or nothing."""

from __future__ import annotations

import os
from pathlib import Path

from ectune.checkpoint import check_new_folder, save_model, write_folder_atomic
from ectune.convert.mapping import ConvertedNetwork, convert_network
from ectune.convert.safe_pickle import load_pickle

__all__ = ["cli_convert", "convert_checkpoint"]


def _convert(src: str | os.PathLike, dest: str | os.PathLike, method: str | None) -> tuple[Path, ConvertedNetwork]:
    src, dest = Path(src), Path(dest)
    check_new_folder(dest, "converted model")
    converted = convert_network(load_pickle(src), name=str(src), method=method)
    # Everything that can fail on bad input has failed by now: write a temporary sibling folder and
    # rename it into place, so DEST is either absent/empty or complete.
    write_folder_atomic(dest, "converted model", lambda tmp: save_model(tmp, converted.net, converted.info))
    return dest, converted


def convert_checkpoint(src: str | os.PathLike, dest: str | os.PathLike, *, method: str | None = None) -> Path:
    """Convert the EDM / EDM2 / ECT network pickle ``src`` into the ectune model folder ``dest``.

    The pickle is read without executing anything it contains (see :mod:`ectune.convert.safe_pickle`).
    ``dest`` must not exist or be empty; on any failure nothing is left there.

    Args:
        src: a network snapshot (``network-snapshot-*.pkl``, ``edm-*.pkl``, ``edm2-*.pkl``, an ECT model).
        dest: the model folder to write (``model.safetensors`` + ``config.json``).
        method: "edm" or "ect" for the folder's method; ``None`` infers it (see :mod:`ectune.convert.mapping`).

    Returns:
        ``dest`` as a Path; :func:`ectune.checkpoint.load_model` reads it.

    Raises:
        CheckpointError: a missing, truncated or unsafe file, an unsupported network, tensors that
            do not match the ectune network, or a non-empty ``dest``.
    """
    return _convert(src, dest, method)[0]


def cli_convert(src: str, dest: str, method: str | None = None) -> int:
    """``ectune convert SRC DEST``: convert and print where the model folder went. Returns the exit code 0;
    bad input raises :class:`~ectune.errors.CheckpointError` (the CLI prints it and exits with 2)."""
    path, converted = _convert(src, dest, method)
    info = converted.info
    params = sum(p.numel() for p in converted.net.parameters())
    print(f"wrote {path}: {converted.source} -> ectune {info.network} ({params / 1e6:.2f}M parameters, "
          f"method {info.method}, {info.scalings} scalings, sigma_data {info.sigma_data:g}, "
          f"data {'x'.join(str(s) for s in info.data_shape)}, {info.label_dim} classes)")
    return 0
