"""What a new user of ``pyro-nf`` meets: help with defaults, one-line errors, readable figures and outputs.

Each test names the papercut it keeps away: a sample that replaced the training's figure, figures only
their owner could read, a traceback for a missing optional package, options without defaults in
``--help``, a long run that started without a word, a progress bar written into a log file, datasets
listed without what they need, a CSV called a corrupted checkpoint, figures that ignored a CSV's
header, curves that left out the training loss, and a packaging deprecation.
"""

from __future__ import annotations

import argparse
import csv
import os
import stat
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import pyro_nf.plotting as plotting
from pyro_nf.cli import EXIT_USAGE, _build_parser, main
from pyro_nf.training.config import describe_default
from tests.test_cli import _one_thread, run  # noqa: F401 (_one_thread: an autouse fixture)

ROOT = Path(__file__).resolve().parent.parent
TOY = "--n-train 256 --n-val 64 --n-test 64 --batch-size 64 --num-samples 64 --hidden 8 --num-transforms 2".split()


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Figure]]:
    """Every figure a run saves, with its path (the figures are still written)."""
    saved: list[tuple[Path, Figure]] = []
    original = plotting.save_figure

    def keep(fig: Figure, path: str | os.PathLike[str]) -> Path:
        saved.append((Path(path), fig))
        return original(fig, path)

    monkeypatch.setattr(plotting, "save_figure", keep)
    return saved


def train_toy(out: Path, capsys: pytest.CaptureFixture[str], *extra: object) -> str:
    code, stdout, err = run(["train", "--data", "moons", "--steps", 4, "--out", out, *TOY, *extra], capsys)
    assert code == 0, err
    return stdout + err


# -- sample beside --output, never over the training's figure --------------------------------------------------


def test_sample_leaves_the_training_figure_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_toy(tmp_path, capsys, "--no-progress")
    figure = (tmp_path / "samples.png").read_bytes()
    code, out, err = run(["sample", tmp_path, "--num", 30], capsys)
    assert code == 0, err
    assert (tmp_path / "sampled.npy").is_file() and (tmp_path / "sampled.png").is_file()
    assert f"a picture to {tmp_path / 'sampled.png'}" in out
    # even when --output names the run's own samples.npy, the picture takes its own name
    code, out, err = run(["sample", tmp_path, "--num", 30, "--output", tmp_path / "samples.npy"], capsys)
    assert code == 0, err
    assert (tmp_path / "samples-sampled.png").is_file()
    assert (tmp_path / "samples.png").read_bytes() == figure


# -- figures get the umask's mode ----------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_figures_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        path = plotting.save_figure(Figure(figsize=(1, 1)), tmp_path / "f.png")
        text = tmp_path / "t.txt"
        text.write_text("x")  # what open() gives, for comparison
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(text.stat().st_mode)
    assert not list(tmp_path.glob(".*.tmp"))


# -- one line and exit 2 for what a dataset needs -------------------------------------------------------------------


def test_digits_without_scikit_learn_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    code, out, err = run(["train", "--data", "digits", "--out", tmp_path, "--steps", 1], capsys)
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("pyro-nf: error: --data digits: ") and "pip install scikit-learn" in err
    assert '"pyro-nf[digits]"' in err
    code, out, _ = run(["list"], capsys)
    assert code == 0 and "needs scikit-learn" in out


def test_list_says_what_each_image_dataset_needs(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["list"], capsys)
    assert code == 0
    lines = out.splitlines()
    for name, needs in (("mnist", ['pip install "pyro-nf[mnist]"', "--data-dir"]), ("fashion-mnist", ["--data-dir"])):
        status = lines[lines.index(next(line for line in lines if line.startswith(f"  {name} "))) + 1]
        assert "ready here" in status or all(text in status for text in needs), status
    assert "dataset-fashion-mnist" in out or "ready here" in out


def test_missing_mnist_and_fashion_mnist_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyro_nf.data.images as images

    monkeypatch.setattr(images, "pureml_mnist_path", lambda: None)
    code, _, err = run(["train", "--flow", "glow", "--data", "mnist", "--out", tmp_path], capsys)
    assert code == EXIT_USAGE and "--data-dir" in err and "data_dir=" not in err.split("(data_dir=")[0], err
    code, _, err = run(
        ["train", "--flow", "glow", "--data", "fashion-mnist", "--data-dir", tmp_path / "no", "--out", tmp_path], capsys
    )
    assert code == EXIT_USAGE and "no such folder" in err and "--data-dir" in err, err


def test_evaluate_a_data_file_or_an_empty_folder_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "helix.csv").write_text("a,b\n1,2\n3,4\n")
    code, _, err = run(["evaluate", tmp_path / "helix.csv"], capsys)
    assert code == EXIT_USAGE and "not a run folder but a data file" in err and "--data" in err, err
    assert "corrupt" not in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(["sample", tmp_path / "empty"], capsys)
    assert code == EXIT_USAGE and "not a run folder (no checkpoint.pt in it)" in err, err


# -- --help shows every default -------------------------------------------------------------------------------------


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "evaluate", "sample"):
        for action in commands.choices[name]._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
                continue
            assert action.help and "default" in action.help, (name, action.option_strings, action.help)
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    for key in ("steps", "batch_size", "lr", "seed", "hidden"):
        assert " ".join(describe_default(key).split()) in text, key
    assert "2000 (2D toys)" in text and "20000 (image flows on mnist / fashion-mnist)" in text
    for command, words in (("evaluate", ["(default: test)", "samples per forward pass (default: 1024)"]),
                           ("sample", ["samples to draw (default: 1000)"])):  # fmt: skip
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        for word in words:
            assert word in text, (command, word)


# -- a word about the time, plain progress lines off a terminal ----------------------------------------------------


def test_training_says_how_long_it_will_take(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the estimate comes after 3 timed steps and 10 s, or after 50 steps: 60 tiny steps get it
    code, out, err = run(["train", "--data", "moons", "--steps", 60, "--out", tmp_path, *TOY, "--no-progress"], capsys)
    assert code == 0, err
    assert "per step on cpu: the remaining" in out
    assert "per step on cpu" in (tmp_path / "train.log").read_text()


def test_a_long_run_is_told_what_makes_it_shorter() -> None:
    from pyro_nf.training import resolve_config
    from pyro_nf.training.progress import TimeEstimate

    config = resolve_config({"flow": "glow", "data": "mnist", "device": "cpu"})
    text = TimeEstimate(config, 0, "cpu").message(6.0, 20000)  # about what MNIST's defaults take on a CPU
    assert "33 h" in text
    for option in ("--steps", "--batch-size", "--depth", "--hidden-channels", "--device cuda"):
        assert option in text
    assert "Shorter" not in TimeEstimate(config, 0, "cpu").message(0.01, 2000)


def test_progress_off_a_terminal_is_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # stderr is captured here, so it is not a terminal: plain lines, no carriage returns
    output = train_toy(tmp_path, capsys)
    assert "\r" not in output
    progress = [line for line in output.splitlines() if line.startswith("maf: step ")]
    assert progress and progress[-1].startswith("maf: step 4/4 (100%)")


# -- figures of tabular data: the CSV's names, every pair ------------------------------------------------------------


def write_csv(path: Path, columns: list[str], n: int = 300) -> None:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(n, len(columns))) + np.arange(len(columns))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows.round(5).tolist())


def labels(fig: Figure) -> set[str]:
    return {text for ax in fig.axes for text in (ax.get_xlabel(), ax.get_ylabel()) if text}


def test_figures_of_a_csv_use_its_header_and_show_every_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: list[tuple[Path, Figure]]
) -> None:
    columns = ["height", "weight", "age"]
    write_csv(tmp_path / "people.csv", columns)
    argv = ["train", "--data", tmp_path / "people.csv", "--steps", 4, "--batch-size", 50, "--hidden", 8]
    code, _, err = run(
        [*argv, "--num-transforms", 2, "--num-samples", 500, "--no-progress", "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    pairs = [fig for path, fig in figures if path.name == "samples.png" or path.parent.name == "figures"]
    assert pairs
    fig = pairs[-1]
    assert labels(fig) == set(columns)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 6  # 3 histograms and 3 pairs below the diagonal
    scatter = [ax for ax in visible if ax.collections]
    counts = {len(c.get_offsets()) for ax in scatter for c in ax.collections}
    assert counts == {30}  # the validation split of 300 rows, and as many samples
    code, _, err = run(["sample", tmp_path / "r", "--num", 40], capsys)
    assert code == 0, err
    assert labels(figures[-1][1]) == set(columns)


def test_two_named_columns_label_the_density_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: list[tuple[Path, Figure]]
) -> None:
    write_csv(tmp_path / "xy.csv", ["speed", "load"])
    argv = ["train", "--data", tmp_path / "xy.csv", "--steps", 2, "--batch-size", 50, "--hidden", 8]
    code, _, err = run([*argv, "--num-transforms", 2, "--no-progress", "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    density = next(fig for path, fig in figures if path.parent.name == "figures")  # samples.png is its copy
    assert labels(density) == {"speed", "load"}


def test_more_than_eight_features_show_the_first_eight(tmp_path: Path) -> None:
    out = plotting.plot_pairs({"data": np.random.randn(40, 10)}, tmp_path / "p.png")
    assert out.is_file()
    with pytest.raises(ValueError, match="same number of features"):
        plotting.plot_pairs({"a": np.zeros((3, 2)), "b": np.zeros((3, 3))}, tmp_path / "q.png")
    with pytest.raises(ValueError, match="columns: expected 2 names"):
        plotting.plot_pairs({"a": np.zeros((3, 2))}, tmp_path / "q.png", columns=["x"])


# -- curves: the training loss as logged ---------------------------------------------------------------------------


def test_curves_plot_the_logged_training_loss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], figures: list[tuple[Path, Figure]]
) -> None:
    extra = ["--log-every", 2, "--val-every", 10, "--no-progress"]
    code, _, err = run(["train", "--data", "moons", "--steps", 20, "--out", tmp_path, *TOY, *extra], capsys)
    assert code == 0, err
    curves = [fig for path, fig in figures if path.name == "curves.png"]
    assert curves
    ax = curves[-1].axes[0]
    assert ax.get_title() == "step 20"
    lines = {line.get_label(): line for line in ax.get_lines()}
    train = next(line for name, line in lines.items() if name.startswith("train (every 2 steps"))
    assert list(train.get_xdata()) == [float(s) for s in range(2, 21, 2)]
    assert list(lines["validation"].get_xdata()) == [10.0, 20.0]


# -- packaging ------------------------------------------------------------------------------------------------------


def test_the_package_metadata_raises_no_setuptools_deprecation(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # project.license as a table was a SetuptoolsDeprecationWarning
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
