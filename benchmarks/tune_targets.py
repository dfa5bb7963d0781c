"""Issue 4's quality targets for the default `ectune tune` run, measured with `ectune eval` at N images:
ECM 2-step FID <= 1.3x the teacher's 35-NFE FID, ECM 1-step FID <= 2.5x.

    python benchmarks/tune_targets.py RUN_DIR [--num_images 5000] [--teacher-eval TEACHER.json]

RUN_DIR is the folder a finished `ectune tune` printed (its config names the teacher). Prints one
JSON line per sampler and a verdict line; the teacher and the tuned model use the same seeds and the
same N reference images (cached after the first run). The teacher's 35-NFE evaluation is the slow
part (about 27 minutes at N = 5,000 on 2 cores): `--teacher-eval` reuses the output of an earlier
`ectune eval TEACHER --method heun --steps 18 --num_images N --out TEACHER.json`, after checking that
it scored the same teacher, sampler, seeds, N and reference data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ectune import config as C
from ectune.checkpoint import resolve_model_folder
from ectune.evaluate import evaluate


def reuse_teacher_eval(path: Path, teacher: str, num_images: int, data: str) -> dict:
    """The Heun-18 row of an earlier `ectune eval` of ``teacher``; SystemExit if it scored anything else."""
    prev = json.loads(path.read_text(encoding="utf-8"))
    checks = {"teacher": (resolve_model_folder(prev["source"]).resolve(), resolve_model_folder(teacher).resolve()),
              "num_images": (prev["num_images"], num_images), "seed": (prev["seed"], 0),
              "reference data": (prev["data"]["name"], data), "reference size": (prev["data"]["num_images"], num_images)}
    for what, (got, want) in checks.items():
        if got != want:
            raise SystemExit(f"error: {path} has {what} {got}, this run needs {want}; drop --teacher-eval to recompute")
    rows = [r for r in prev["results"] if r["method"] == "heun" and r["steps"] == 18]
    if not rows:
        raise SystemExit(f"error: {path} has no Heun 18-step row; drop --teacher-eval to recompute")
    return rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--num_images", type=int, default=5000)
    ap.add_argument("--teacher-eval", help="JSON written by `ectune eval TEACHER --method heun --steps 18 --out ...`")
    args = ap.parse_args()
    saved = json.loads((Path(args.run_dir) / "config.json").read_text(encoding="utf-8"))
    teacher = saved["teacher"]
    base = dict(num_images=args.num_images, data=saved["data"]["name"], metrics="fid,kid")
    if args.teacher_eval:
        teacher_res = reuse_teacher_eval(Path(args.teacher_eval), teacher, args.num_images, saved["data"]["name"])
    else:
        teacher_res = evaluate(C.EvalConfig(source=teacher, method="heun", steps=18, **base))["results"][0]
    ecm = evaluate(C.EvalConfig(source=str(Path(args.run_dir) / "model"), steps_sweep=(1, 2), **base))["results"]
    rows = {"teacher 35 NFE": teacher_res, **{f"ECM {r['steps']}-step": r for r in ecm}}
    for name, r in rows.items():
        print(json.dumps({"sampler": name, "nfe": r["nfe"], "fid": r["fid"], "kid": r["kid"],
                          "ratio_to_teacher": r["fid"] / teacher_res["fid"], "num_images": args.num_images}))
    one, two = rows["ECM 1-step"]["fid"] / teacher_res["fid"], rows["ECM 2-step"]["fid"] / teacher_res["fid"]
    print(f"targets: 2-step {two:.2f}x (<= 1.3x: {'met' if two <= 1.3 else 'missed'}), "
          f"1-step {one:.2f}x (<= 2.5x: {'met' if one <= 2.5 else 'missed'})")


if __name__ == "__main__":
    main()
