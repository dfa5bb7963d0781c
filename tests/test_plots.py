"""``ectune plot``: figures from synthetic run folders (stats.jsonl, eval results, previews)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ectune.cli import main
from ectune.plots import plot_runs, read_results, read_stats, step_series, teacher_run


def _results(source: str, mode: str, rows: list[dict], n: int = 1000, best: dict | None = None) -> dict:
    out = {"format": "ectune-eval", "schema_version": 1, "source": source, "source_kind": "model", "mode": mode,
           "num_images": n, "encoder": {"name": "inception_v3", "file_hash": "0" * 64},
           "data": {"id": "mnist-train", "name": "mnist", "split": "train", "num_images": n},
           "metrics": ["fid", "kid"], "results": rows}
    if best:
        out["best"] = best
    return out


def _row(method: str, steps: int, nfe: int, fid: float, sigmas=()) -> dict:
    return {"method": method, "steps": steps, "nfe": nfe, "sigmas": list(sigmas), "fid": fid, "kid": fid / 1000}


def _run(root: Path, name: str, *, teacher: str | None = None, fid_every: int = 2) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "ect" if teacher else "edm", "teacher": teacher}))
    lines = []
    for i in range(1, 11):
        lines.append(json.dumps({"nimg": 12800 * i, "kimg": 12.8 * i, "loss": 1.0 / i, "lr": 1e-4}))
        if i % fid_every == 0:
            lines.append(json.dumps({"nimg": 12800 * i, "kimg": 12.8 * i, "fid": 100.0 / i, "kid": 0.1 / i,
                                     "kid_std": 0.001, "eval_s": 3.0}))
    (run / "stats.jsonl").write_text("\n".join(lines) + '\n{"nimg": 140800, "lo')  # a half-written last line
    (run / "samples").mkdir()
    for k in (0, 128):
        img = np.full((40, 60, 3), 40 * (k // 128 + 1), np.uint8)
        Image.fromarray(img).save(run / "samples" / f"preview-{k:06d}kimg.png")
    return run


@pytest.fixture()
def runs(tmp_path) -> tuple[Path, Path]:
    teacher = _run(tmp_path, "edm-mnist")
    (teacher / "model").mkdir()
    student = _run(tmp_path, "ect-mnist", teacher=str(teacher / "model"))
    (teacher / "eval" / "heun.json").write_text(json.dumps(_results(
        str(teacher), "steps_sweep", [_row("heun", 5, 9, 30.0), _row("heun", 10, 19, 12.0), _row("heun", 18, 35, 8.0)])))
    (student / "eval" / "sweep.json").write_text(json.dumps(_results(
        str(student), "steps_sweep", [_row("consistency", 1, 1, 20.0), _row("consistency", 2, 2, 10.0, [0.821])])))
    (student / "eval" / "sweep-small-n.json").write_text(json.dumps(_results(
        str(student), "single", [_row("consistency", 2, 2, 25.0, [0.821])], n=100)))
    grid = [0.2, 0.4, 0.821, 1.5]
    (student / "eval" / "mid.json").write_text(json.dumps(_results(
        str(student), "search_mid", [_row("consistency", 2, 2, f, [s]) for s, f in zip(grid, [14, 11, 10, 13])], n=200,
        best={"by": "fid", "mid_sigma": 0.821, "fid": 10})))
    (student / "eval" / "junk.json").write_text("{not json")
    return teacher, student


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 100 and im.height > 100


def test_stats_reader_skips_a_half_written_line(runs):
    records = read_stats(runs[1])
    assert len(records) == 15 and sum("fid" in r for r in records) == 5


def test_teacher_is_found_from_the_run_config(runs):
    assert teacher_run(runs[1]) == runs[0]
    assert teacher_run(runs[0]) is None


def test_a_teacher_recorded_relative_to_the_start_folder_is_found_from_anywhere(runs, tmp_path, monkeypatch):
    """config.json records the teacher as given, relative to where `ectune tune` ran; the run's own
    recorded run_dir tells where that was (a review found the teacher lost from any other folder)."""
    teacher, student = runs
    (student / "config.json").write_text(json.dumps({"method": "ect", "teacher": "edm-mnist/model",
                                                      "run_dir": "ect-mnist"}))
    monkeypatch.chdir(tmp_path)
    assert teacher_run(Path("ect-mnist")).resolve() == teacher.resolve()
    monkeypatch.chdir(teacher / "samples")
    assert teacher_run(student) == teacher
    (student / "config.json").write_text(json.dumps({"method": "ect", "teacher": "edm-mnist/model",
                                                      "run_dir": "elsewhere/ect-mnist"}))  # not this run's path
    assert teacher_run(student) is None


def test_steps_plot_keeps_every_result(runs):
    """Results at one NFE but other levels are points of their own, not replacements of each other: a
    sweep at the model's level, then single 2-step results at 0.2 and 5 (the case a review found drawn
    as the sweep alone)."""
    teacher, student = runs
    for name, level, fid in [("a.json", 0.2, 12.0), ("b.json", 5.0, 9.0)]:
        (student / "eval" / name).write_text(json.dumps(_results(
            str(student), "single", [_row("consistency", 2, 2, fid, [level])])))
    (student / "eval" / "c.json").write_text(json.dumps(_results(
        str(student), "single", [_row("consistency", 1, 1, 21.0)])))
    series = step_series({"ect": read_results(student), "edm": read_results(teacher)}, "fid")
    assert series == {
        "ect: consistency, N=1000, sweep": {1: 20.0, 2: 10.0},
        "ect: consistency, N=100": {2: 25.0},
        "ect: consistency, N=1000": {1: 21.0},
        "ect: consistency, N=1000, 2 NFE at 0.2": {2: 12.0},
        "ect: consistency, N=1000, 2 NFE at 5": {2: 9.0},
        "edm: heun, N=1000, sweep": {9: 30.0, 19: 12.0, 35: 8.0},
    }
    (student / "eval" / "sweep2.json").write_text(json.dumps(_results(  # a second sweep, at another level
        str(student), "steps_sweep", [_row("consistency", 1, 1, 20.0), _row("consistency", 2, 2, 14.0, [0.2])])))
    lines = step_series({"ect": read_results(student)}, "fid")
    assert lines["ect: consistency, N=1000, sweep (2-step level 0.821)"] == {1: 20.0, 2: 10.0}
    assert lines["ect: consistency, N=1000, sweep (2-step level 0.2)"] == {1: 20.0, 2: 14.0}
    (student / "eval" / "sweep2.json").unlink()
    (student / "eval" / "b.json").unlink()  # one 2-step single result left: it joins the 1-step one
    assert step_series({"ect": read_results(student)}, "fid")["ect: consistency, N=1000"] == {1: 21.0, 2: 12.0}
    # results that eval now files apart (another reference size, seed or re-noising) are lines apart too
    for name, change, fid in [("ref.json", {"data": {"id": "mnist-train", "num_images": 60000}}, 7.0),
                              ("seed.json", {"seed": 5}, 22.0), ("ict.json", {"renoise": "ict"}, 23.0)]:
        res = _results(str(student), "single", [_row("consistency", 1, 1, fid)])
        (student / "eval" / name).write_text(json.dumps({**res, **change}))
    lines = step_series({"ect": read_results(student)}, "fid")
    assert lines["ect: consistency, N=1000"] == {1: 21.0, 2: 12.0}
    assert lines["ect: consistency, N=1000, ref=60000"] == {1: 7.0}
    assert lines["ect: consistency, N=1000, seed=5"] == {1: 22.0}
    assert lines["ect: consistency, N=1000, renoise=ict"] == {1: 23.0}


def test_plot_writes_all_figures_atomically(runs, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(runs[1]), str(runs[0]), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    names = {"training.png", "steps.png", "mid.png", "samples.png"}
    assert {p.name for p in out.iterdir()} == names  # no temporary files left behind
    assert all(_is_png(out / n) for n in names)
    assert printed.out.count("wrote ") == 4
    assert "junk.json" in printed.err  # the unreadable results file is skipped with a warning


def test_plot_defaults_to_the_run_folder_and_adds_the_teacher(runs, monkeypatch):
    captured = {}
    import ectune.plots as P

    real = P.plot_steps

    def spy(results, path):
        captured.update(results)
        return real(results, path)

    monkeypatch.setattr(P, "plot_steps", spy)
    written = plot_runs([runs[1]])
    assert {p.name for p in written} == {"training.png", "steps.png", "mid.png"}  # one run: no composed samples
    assert all(p.parent == runs[1] / "plots" for p in written)
    assert set(captured) == {"ect-mnist", "edm-mnist (teacher)"}


def test_plot_of_stats_only(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "stats.jsonl").write_text(json.dumps({"nimg": 512, "loss": 0.3, "sw": 0.1}) + "\n")
    assert [p.name for p in plot_runs([run])] == ["training.png"]
    bare = tmp_path / "bare"  # records with nothing to draw: no figure, and no empty plots/ folder left
    bare.mkdir()
    (bare / "stats.jsonl").write_text(json.dumps({"nimg": 5}) + "\n")
    assert plot_runs([bare]) == [] and sorted(p.name for p in bare.iterdir()) == ["stats.jsonl"]


def test_plot_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to plot" in err
    assert list((tmp_path / "empty").iterdir()) == []


def test_plot_out_below_a_file_and_damaged_results(runs, tmp_path, capsys):
    """Found by a review: --out below a file was a NotADirectoryError traceback; a results file with
    the ectune-eval format but fields missing was a KeyError, not skipped with a warning."""
    teacher, student = runs
    (tmp_path / "afile").write_text("keep")
    assert main(["plot", str(student), "--out", str(tmp_path / "afile" / "x")]) == 2
    err = capsys.readouterr().err.splitlines()  # the fixture's junk.json warns first
    assert err[-1].startswith("error: cannot create --out") and "Traceback" not in "".join(err)
    assert (tmp_path / "afile").read_text() == "keep"
    damaged = [{k: v for k, v in _results(str(student), "single", [_row("consistency", 1, 1, 5.0)]).items()
                if k != "num_images"},
               _results(str(student), "search_mid", [_row("consistency", 2, 2, 5.0, [0.3])], best={"by": "fid"}),
               _results(str(student), "search_mid", [_row("consistency", 2, 2, 5.0, [0.3])],
                        best={"by": ["fid"], "mid_sigma": 0.3, "fid": 5.0}),
               _results(str(student), "single", [{"nfe": 1, "fid": 5.0}])]  # a row without its method
    for i, d in enumerate(damaged):
        (student / "eval" / f"damaged{i}.json").write_text(json.dumps(d))
    assert main(["plot", str(student), "--out", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert err.count("fields missing or damaged") == 4
    assert len(read_results(student)) == 3  # the fixture's three valid results, and nothing else
    folder_eval = _results("samples/", "single",
                           [{"method": None, "steps": None, "nfe": None, "sigmas": [], "fid": 3.0}])
    (student / "eval" / "folder.json").write_text(json.dumps({**folder_eval, "source_kind": "images"}))
    assert len(read_results(student)) == 4  # `ectune eval` of an image folder (method None) is read, not warned of
    assert "folder.json" not in capsys.readouterr().err

