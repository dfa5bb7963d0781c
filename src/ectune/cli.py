"""The ``ectune`` command line: pretrain, tune, train-ict, sample, eval, plot, convert, export-ema,
export-diffusers.

Every option of the training commands is a flag named by its dotted config key (``--ect.P_mean -0.8``,
``--optim.lr 2e-4``, ``--network.kwargs.model_channels 32``); there ``--config FILE`` reads a JSON config
first and ``--dry-run`` prints the resolved config and exits. Bad input prints one line ``error: ...``
and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ectune import __version__
from ectune import config as C
from ectune.errors import UserError

TRAIN_COMMANDS = {"pretrain": "edm", "tune": "ect", "train-ict": "ict"}
TRAIN_HELP = {
    "pretrain": "pretrain a diffusion model with the EDM loss",
    "tune": "turn a pretrained diffusion model into a consistency model with ECT",
    "train-ict": "train a consistency model from scratch with iCT",
}


class _Parser(argparse.ArgumentParser):
    """argparse with ectune's one-line errors: ``error: ...`` and where to look, exit code 2 (argparse
    prints its usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _add_config_flags(parser: argparse.ArgumentParser, cls: Any, skip: set[str] = frozenset()) -> None:
    """One flag per option of ``cls`` (a config class, or a config whose values are the defaults shown)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, tp, help_, default in C.iter_options(cls):
        if key in skip:
            continue
        section = key.split(".")[0] if "." in key else "run"
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        flags = [f"--{key}"]
        if "_" in key and "." not in key:
            flags.append(f"--{key.replace('_', '-')}")
        default_s = json.dumps(list(default) if isinstance(default, tuple) else default)
        group.add_argument(*flags, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar=_type_name(tp).upper()[:5],
                           help=f"{help_} (default {default_s})".replace("%", "%%"))


def _collect_overrides(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    # --network.kwargs.NAME VALUE: free-form backbone arguments not known to the parser
    it = iter(extra)
    for token in it:
        if token.startswith("--network.kwargs."):
            key, _, value = token[2:].partition("=")
            if not value:
                value = next(it, None)
                if value is None:
                    raise UserError(f"{token} needs a value")
            overrides[key] = value
        else:
            raise UserError(f"unknown option {token}: see `ectune {args.command} --help`")
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ectune", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"ectune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, method in TRAIN_COMMANDS.items():
        what = TRAIN_HELP[name][:1].upper() + TRAIN_HELP[name][1:]
        p = sub.add_parser(name, help=TRAIN_HELP[name], formatter_class=_HelpFormatter,
                           description=f"{what}. The defaults shown are the mnist preset's; "
                                       f"`ectune {name} --preset NAME --dry-run` prints another preset's config.")
        p.add_argument("--preset", default="mnist", help=f"named preset: {', '.join(C.PRESETS)}")
        p.add_argument("--config", help="JSON config file applied on top of the preset")
        p.add_argument("--resume", metavar="RUN_DIR", help="resume the run in RUN_DIR from its latest training state; "
                       "`--resume auto` resumes --run-dir if it holds a state and starts it otherwise")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        _add_config_flags(p, C.preset("mnist", method), skip={"method", "preset"})
        p.set_defaults(method=method, handler=_cmd_train)
    p = sub.add_parser("convert", help="convert an EDM / EDM2 / official ECT network pickle, or a diffusers UNet "
                                       "folder, into a model folder, without executing code from the file",
                       formatter_class=_HelpFormatter)
    p.add_argument("src", help="network pickle (.pkl) of EDM, EDM2 or the official ECT code, or a diffusers folder "
                               "(UNet2DModel with its scheduler)")
    p.add_argument("dest", help="new (or empty) folder for model.safetensors + config.json")
    p.add_argument("--method", choices=["edm", "ect"], default=None,
                   help="what the network is: a diffusion model (edm) or a consistency model (ect); default: "
                        "read from the wrapper class")
    p.add_argument("--scheduler", default=None,
                   help="diffusers folders only: scheduler_config.json (or its folder) to use instead of the one "
                        "found with the UNet")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_convert)
    p = sub.add_parser("export-diffusers", help="export a consistency model as a diffusers ConsistencyModelPipeline "
                                                "folder (1 and 2 steps equal `ectune sample`)",
                       formatter_class=_HelpFormatter)
    p.add_argument("model", help="model folder (or run folder) of a consistency model (ectune tune / train-ict)")
    p.add_argument("dest", help="new (or empty) folder for the diffusers pipeline")
    p.add_argument("--mid-sigma", type=float, default=None, help="2-step intermediate level (default: the model's)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="starting noise level")
    p.add_argument("--renoise", choices=["ect", "ict"], default="ect",
                   help="re-noising before the second step: ect (tau z) or ict (sqrt(tau^2 - sigma_min^2) z)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_export_diffusers)
    p = sub.add_parser("export-ema", help="write one of a run's EMAs (e.g. a power-function EMA of --ema.stds) as a "
                                          "model folder; without --ema, list them")
    p.add_argument("run", metavar="RUN_DIR", help="run folder (ectune pretrain / tune / train-ict)")
    p.add_argument("--ema", default=None, help="EMA name, e.g. ema-std0.100 (default: list the EMAs and exit)")
    p.add_argument("--dest", default=None, help="new (or empty) folder for the model (default: RUN_DIR/model-EMA)")
    p.add_argument("--nimg", type=int, default=None,
                   help="training state to read, by images seen (default: the latest)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_export_ema)
    p = sub.add_parser("sample", help="generate images from a model folder", formatter_class=_HelpFormatter)
    p.add_argument("model", help="model folder (or run folder)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_config_flags(p, C.SampleConfig, skip={"model"})
    p.set_defaults(handler=_cmd_sample)
    p = sub.add_parser("eval", help="FID, KID, precision/recall (or 2-D distances) of a model or a set of images",
                       formatter_class=_HelpFormatter)
    p.add_argument("source", help="model folder (or run folder) to sample, or a folder / .zip / .npz of images")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--search-mid", dest="cfg:search_mid", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="scan 2-step intermediate levels (--mid-grid) at --search-num-images and report the best")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    _add_config_flags(p, C.EvalConfig, skip={"source", "search_mid"})
    p.set_defaults(handler=_cmd_eval)
    p = sub.add_parser("plot", help="PNG plots of runs: loss and metrics against images seen, FID against steps",
                       formatter_class=_HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (their stats.jsonl and eval/*.json)")
    p.add_argument("--out", help="folder for the PNGs (default: plots/ in the first run folder)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_plot)
    return parser


def resolve_train_config(args: argparse.Namespace, overrides: dict[str, Any], *,
                         new_run: bool | None = True) -> C.TrainConfig:
    """The preset, --config and flags as one validated config. ``new_run`` None: a new run unless
    --run-dir holds a training state (--resume auto), so that checks for new runs only spare old runs."""
    cfg = C.preset(args.preset, args.method)
    if args.config:
        path = Path(args.config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise UserError(f"config file {path} is a folder: pass the path of a JSON file") from None
        except UnicodeDecodeError:
            raise UserError(f"config file {path} is not UTF-8 text: pass a JSON file") from None
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON ({e})") from None
        except RecursionError:
            raise UserError(f"config file {path} is nested too deeply to be a config") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise UserError(f"config file {path} holds a value Python cannot read ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a JSON object")
        if "format" in data:
            raise UserError(f"{path} describes a model folder, not a training run: pass a run's config.json")
        data.pop("method", None)
        cfg = C.from_dict(C.TrainConfig, data, base=cfg)
    cfg = C.apply_overrides(cfg, overrides)
    if new_run is None:
        from ectune.checkpoint import list_states

        new_run = not (cfg.run_dir and list_states(cfg.run_dir))
    if new_run and args.method == "ect" and "network.name" in overrides:  # the architecture is the teacher's
        raise UserError("tune takes the network from the teacher: drop --network.name (--network.kwargs may set "
                        "options that keep its weights)")
    C.validate(cfg, new_run=new_run)
    return cfg


def _cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.training import resolve_device, resume_or_start, train

    if args.resume == "auto":
        cfg = resolve_train_config(args, overrides, new_run=None)
        if args.dry_run:
            print(C.to_json(cfg))
            return 0
        result = resume_or_start(cfg, progress=not args.no_progress)
    elif args.resume:
        if overrides or args.config:
            raise UserError("--resume RUN_DIR continues a run with its saved config: drop the other options "
                            "(or use --resume auto with the run's own options)")
        if args.dry_run:
            saved = Path(args.resume) / "config.json"
            if not saved.is_file():
                raise UserError(f"{args.resume} has no config.json: pass the folder of a run to resume")
            print(saved.read_text(encoding="utf-8"))
            return 0
        result = train(C.TrainConfig(), resume=args.resume, progress=not args.no_progress)
    else:
        cfg = resolve_train_config(args, overrides)
        if args.dry_run:
            print(C.to_json(cfg))
            return 0
        result = train(cfg, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {result.run_dir}\nmodel: {result.model_dir}\nimages seen: {result.nimg}")
        saved = json.loads((Path(result.run_dir) / "config.json").read_text(encoding="utf-8"))
        run_cfg = C.from_dict(C.TrainConfig, saved)
        if run_cfg.report_num_images and not result.interrupted:
            from ectune.report import write_tune_report

            print(f"report: sampling the teacher and the tuned model on {run_cfg.report_num_images} seeds ...")
            report = write_tune_report(result.run_dir, run_cfg, train_wall_s=result.wall_s, nimg=result.nimg,
                                       device=resolve_device(run_cfg.device, int(os.environ.get("LOCAL_RANK", "0"))))
            print(report.read_text(encoding="utf-8"))
            print(f"report: {report}\ngrids: {Path(result.run_dir) / 'grid-side-by-side.png'} (and grid-*.png)\n"
                  f"results: {Path(result.run_dir) / 'results.json'}")
    if result.interrupted:
        print(f"stopped by signal {result.interrupted} after saving a training state: resume with "
              f"--resume {result.run_dir}", file=sys.stderr)
        return 128 + int(result.interrupted)
    return 0


def _cmd_sample(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.sample_cmd import run_sample

    cfg = C.apply_overrides(C.SampleConfig(model=args.model), overrides)
    out = run_sample(cfg)
    print(f"wrote {out}")
    return 0


def _cmd_eval(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.evaluate import cli_eval

    cfg = C.apply_overrides(C.EvalConfig(source=args.source), overrides)
    if args.dry_run:
        print(C.to_json(cfg))
        return 0
    return cli_eval(cfg, as_json=args.json, progress=not args.no_progress)


def _cmd_plot(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.plots import cli_plot

    if overrides:
        raise UserError(f"plot takes no config options, got {', '.join(overrides)}")
    return cli_plot(args.runs, args.out)


def _cmd_convert(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.convert import cli_convert

    if overrides:
        raise UserError(f"convert takes no config options, got {', '.join(overrides)}")
    if Path(args.src).is_dir():  # a pickle is a file: a folder can only be a diffusers model
        from ectune.interop.diffusers import cli_convert_diffusers

        if args.method not in (None, "edm"):
            raise UserError("a diffusers UNet2DModel is a diffusion model: drop --method (or pass --method edm)")
        return cli_convert_diffusers(args.src, args.dest, args.scheduler)
    if args.scheduler is not None:
        raise UserError("--scheduler applies to diffusers folders only")
    return cli_convert(args.src, args.dest, args.method)


def _cmd_export_diffusers(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.interop.diffusers import cli_export_diffusers

    if overrides:
        raise UserError(f"export-diffusers takes no config options, got {', '.join(overrides)}")
    return cli_export_diffusers(args.model, args.dest, args.mid_sigma, args.sigma_max, args.renoise)


def _cmd_export_ema(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ectune.checkpoint import export_ema, run_emas

    if overrides:
        raise UserError(f"export-ema takes no config options, got {', '.join(overrides)}")
    if args.ema is None:
        if args.dest is not None:
            raise UserError("--dest needs --ema NAME: which EMA to write")
        nimg, names, exported = run_emas(args.run, args.nimg)
        print(f"EMAs in the training state at {nimg} images (write one with --ema NAME):")
        for name in names:
            print(f"  {name}" + ("  (the EMA the run exports as model/)" if name == exported else ""))
        return 0
    print(f"wrote {export_ema(args.run, args.ema, args.dest, args.nimg)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        overrides = _collect_overrides(args, extra)
        return int(args.handler(args, overrides) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
