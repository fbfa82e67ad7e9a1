"""Shared fixtures: the real data configs, the local dataset mirror, a small real Fashion-MNIST
slice collected and preprocessed once per session, and the real conf/ composed around it."""

import functools
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
import services  # tests/services.py
import synthetic  # tests/synthetic.py
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV
from dlpipe.preprocess import preprocess
from dlpipe.smoke import sized

CONF = Path(__file__).resolve().parents[1] / "conf"
# $DLPIPE_DATA_MIRROR if set (point it at a missing folder to see what runs without the
# mirror), else shared/datasets next to the repo.
NO_MIRROR = "no dataset mirror"
REQUIRE_MIRROR = "DLPIPE_REQUIRE_MIRROR"  # =1: a missing mirror fails the real-data tests
MIRROR = Path(
    os.environ.get(MIRROR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "datasets"
)


def _data_config(name: str, **overrides) -> dict:
    data = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"))
    return {**data, **overrides}


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    # Session fixtures can't use the function-scoped monkeypatch.
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


@pytest.fixture
def data_config() -> Callable[..., dict]:
    """data_config("fashion_mnist", limit=2000): conf/data/<name>.yaml as a fresh dict."""
    return _data_config


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "fashion-mnist").is_dir():
        message = f"{NO_MIRROR} at {MIRROR} (expected shared/datasets next to the repo)"
        if os.environ.get(REQUIRE_MIRROR) == "1":  # CI has the mirror: a skip there is a failure
            pytest.fail(f"{message}, and {REQUIRE_MIRROR}=1 says every real-data test must run")
        pytest.skip(message)
    return MIRROR


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line each saying how many real-data and service tests did not run, and why, so
    "N passed" is not read as the whole suite."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_MIRROR in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} real-data tests skipped: {NO_MIRROR} at {MIRROR}; set "
            f"{MIRROR_ENV} to a copy of shared/datasets to run them",
            yellow=True,
            bold=True,
        )
    skips = terminalreporter.stats.get("skipped", [])
    services_skipped = [r for r in skips if services.NOT_INSTALLED in str(r.longrepr)]
    if services_skipped:
        terminalreporter.write_line(
            f"{len(services_skipped)} service tests skipped: a server they start is not installed "
            '(apt-get install postgresql; pip install -e ".[postgres]")',
            yellow=True,
            bold=True,
        )


@pytest.fixture(scope="session")
def postgres() -> Iterator[Callable[[str], str]]:
    """postgres("study"): a fresh database on one real PostgreSQL server per session (tests/
    services.py, 127.0.0.1 only, stopped by PID); returns its SQLAlchemy URL."""
    with services.postgres_server() as url:
        yield functools.partial(services.new_database, url)


@pytest.fixture(scope="session")
def dataset(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """dataset("fsdd", limit=300): conf/data/<name>.yaml with `overrides`, collected from the
    mirror and preprocessed (seed 0) once per session; returns the processed dir. Its raw dir
    is the sibling `raw`."""
    cache: dict[str, Path] = {}

    def build(name: str, **overrides) -> Path:
        key = f"{name}:{sorted(overrides.items())}"
        if key not in cache:
            root = tmp_path_factory.mktemp(f"data_{name}")
            data = _data_config(name, **overrides)
            with _env(MIRROR_ENV, str(mirror)):
                collect(data, root / "raw")
            preprocess(data, root / "raw", root / "processed", seed=0)
            cache[key] = root / "processed"
        return cache[key]

    return build


@pytest.fixture(scope="session")
def fmnist_raw(mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Fashion-MNIST raw files, collected from the mirror."""
    raw = tmp_path_factory.mktemp("fmnist_raw")
    with _env(MIRROR_ENV, str(mirror)):
        collect(_data_config("fashion_mnist"), raw)
    return raw


@pytest.fixture(scope="session")
def fmnist_processed(fmnist_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Processed dir of real Fashion-MNIST: 2000 training samples (1600 train / 400 val,
    stratified, seed 0) and the full official 10000-sample test split."""
    out = tmp_path_factory.mktemp("fmnist_processed")
    data = _data_config("fashion_mnist", limit=2000, val_fraction=0.2)
    preprocess(data, fmnist_raw, out, seed=0)
    return out


@pytest.fixture(scope="session")
def synthetic_mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(a mirror folder holding synthetic Fashion-MNIST-shaped idx files, their data config):
    2400 train and 1000 test images of 10 learnable classes, seeded (see synthetic.py)."""
    root = tmp_path_factory.mktemp("synthetic_mirror")
    files = synthetic.write_idx_mirror(root)
    return root, synthetic.idx_data_config(_data_config("fashion_mnist"), files)


@pytest.fixture(scope="session")
def synthetic_raw(synthetic_mirror, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic idx files, collected from their mirror by the real collect."""
    mirror, data = synthetic_mirror
    raw = tmp_path_factory.mktemp("synthetic_raw")
    with _env(MIRROR_ENV, str(mirror)):
        collect(data, raw)
    return raw


@pytest.fixture(scope="session")
def synthetic_processed(
    synthetic_mirror, synthetic_raw: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Processed synthetic images, sized like fmnist_processed: 2000 training samples (1600
    train / 400 val, stratified, seed 0) and the 1000-image test split."""
    out = tmp_path_factory.mktemp("synthetic_processed")
    preprocess({**synthetic_mirror[1], "limit": 2000, "val_fraction": 0.2}, synthetic_raw, out, 0)
    return out


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A tiny real image_folder: 3 classes x 10 images, mixed modes (L, RGB, RGBA),
    odd sizes, PNG and JPEG, with class-dependent brightness so classes differ."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    kinds = [(23, 17, 1, "png"), (9, 31, 3, "png"), (12, 12, 4, "png"), (16, 20, 3, "jpg")]
    for c, name in enumerate(["cat", "dog", "frog"]):
        (root / name).mkdir(parents=True)
        for i in range(10):
            height, width, channels, suffix = kinds[i % len(kinds)]
            pixels = rng.integers(60 * c, 60 * c + 100, (height, width, channels), dtype=np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(
                root / name / f"{i:03d}.{suffix}"
            )
    return root


def _compose(*overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose_conf() -> Callable[..., DictConfig]:
    """compose_conf("model=mlp"): conf/ composed by Hydra as it is, no data or outputs needed."""
    return _compose


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with its schema migrated: creating one costs seconds, a copy
    costs milliseconds, and every test gets its own copy."""
    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def cfg_factory(
    synthetic_raw: Path, synthetic_processed: Path, mlflow_db_template: Path
) -> Callable[..., DictConfig]:
    """cfg_factory(root, *overrides, processed=None): make_cfg with its outputs under `root`,
    for fixtures wider than one test (build a module-scoped root with tmp_path_factory).
    `processed` points the config at another processed dataset (see the `dataset` fixture);
    the default is the synthetic image slice (synthetic_processed), with the CNN shrunk to
    width 8."""

    def compose_cfg(root: Path, *overrides: str, processed: Path | None = None) -> DictConfig:
        db = root / "mlflow.db"
        data_paths = (
            (f"paths.raw={synthetic_raw}", f"paths.processed={synthetic_processed}")
            if processed is None
            else (f"paths.raw={processed.parent / 'raw'}", f"paths.processed={processed}")
        )
        cfg = _compose(
            f"paths.tune={root / 'tune'}",
            f"paths.train={root / 'train'}",
            f"paths.reports={root / 'reports'}",
            f"paths.study_db={root / 'optuna.db'}",
            f"mlflow.tracking_uri=sqlite:///{db}",
            "trainer.enable_progress_bar=false",
            "trainer.deterministic=true",
            "trainer.max_epochs=1",
            *(["model.width=8"] if processed is None else []),
            *overrides,
            *data_paths,
        )
        cfg = sized(cfg)  # as every stage script does: smoke=true applies the tiny sizes
        # Pre-create the experiment so run artifacts land under root, not in ./mlruns of the cwd.
        # (A tracking server given as an override keeps its own artifact store.)
        if cfg.mlflow.tracking_uri != f"sqlite:///{db}":
            return cfg
        if not db.exists():
            shutil.copy(mlflow_db_template, db)
        client = MlflowClient(cfg.mlflow.tracking_uri)
        if client.get_experiment_by_name(cfg.mlflow.experiment) is None:
            client.create_experiment(
                cfg.mlflow.experiment, artifact_location=(root / "mlartifacts").as_uri()
            )
        return cfg

    return compose_cfg


@pytest.fixture
def make_cfg(
    cfg_factory: Callable[..., DictConfig], tmp_path: Path
) -> Iterator[Callable[..., DictConfig]]:
    """make_cfg("model=mlp", "optim.lr=0.01"): the real conf/ composed by Hydra, shrunk to the
    synthetic image slice (width 8, 1 epoch, no progress bar), with every output and the MLflow
    store (artifacts too) in this test's tmp_path."""
    # The stages point the global MLflow client (and $MLFLOW_TRACKING_URI) at the tmp store;
    # restore it so no later test talks to a deleted database.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield functools.partial(cfg_factory, tmp_path)
    mlflow.set_tracking_uri(before)


STAGES = ("collect", "preprocess", "tune", "train", "evaluate", "register")


def _run_stages(cfg: DictConfig, stages: tuple[str, ...] = STAGES) -> dict:
    from dlpipe.evaluate import evaluate
    from dlpipe.register import register
    from dlpipe.train import train
    from dlpipe.tune import tune

    data = OmegaConf.to_container(cfg.data, resolve=True)
    raw, processed = Path(cfg.paths.raw), Path(cfg.paths.processed)
    steps = {
        "collect": lambda: collect(data, raw),
        "preprocess": lambda: preprocess(data, raw, processed, cfg.seed),
        "tune": lambda: tune(cfg),
        "train": lambda: train(cfg),
        "evaluate": lambda: evaluate(cfg),
        "register": lambda: register(cfg),
    }
    return {stage: steps[stage]() for stage in stages}


@pytest.fixture
def run_stages(mirror: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict]:
    """run_stages(cfg): the six stages in process, as `dvc repro` runs them (collecting from the
    mirror); returns {stage: result}. Point `cfg` at fresh data dirs with
    make_cfg(..., processed=tmp_path / "data" / "processed") to run collect and preprocess too."""
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    return _run_stages


class SmokeRun(NamedTuple):
    cfg: DictConfig  # as the stages ran it, outputs and MLflow store under the run's own root
    results: dict  # {stage: result}
    # The version this run registered (its @challenger), downloaded: mlflow.pyfunc.load_model
    # it. Whether it also became @champion is the gate's call: at smoke size a model often does
    # not beat the classical baseline or even chance (results["register"]["decision"]).
    model: Path


# Stand-ins for the user's own file, by data config, for an experiment on data.path=???.
OWN_DATA = {"text_csv": synthetic.write_text_csv, "table_csv": synthetic.write_table_csv}


def _own_data(experiment: str, root: Path) -> list[str]:
    """`data.path=<a synthetic file of that kind>` when the experiment runs on the user's own
    data (its data.path is required), else nothing."""
    node = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    data = next(
        (
            d["override /data"]
            for d in node.get("defaults", [])
            if isinstance(d, DictConfig) and "override /data" in d
        ),
        None,
    )
    if data not in OWN_DATA:
        return []
    return [f"data.path={OWN_DATA[data](root / f'{data}.csv', n=600)}"]


@pytest.fixture(scope="session")
def smoke_run(
    mirror: Path, cfg_factory: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], SmokeRun]:
    """smoke_run("sp500_gru"): conf/experiment/<name>.yaml at `smoke=true` through all six stages
    (collected from the mirror), once per session however many tests ask: tests/test_smoke.py
    checks that every experiment runs, each task's tests check what its model serves."""
    runs: dict[str, SmokeRun] = {}
    raw_dirs: dict[str, str] = {}  # by data config: a later run's collect only verifies it

    def run(experiment: str) -> SmokeRun:
        if experiment not in runs:
            root = tmp_path_factory.mktemp(experiment)
            processed = root / "data" / "processed"
            cfg = cfg_factory(
                root,
                f"experiment={experiment}",
                "smoke=true",
                *_own_data(experiment, root),
                processed=processed,
            )
            data = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
            cfg.paths.raw = raw_dirs.setdefault(data, cfg.paths.raw)
            if cfg.task.name == "gan":  # its feature-net cache, out of the repo's models/
                cfg.task.feature_net_dir = str(root / "fid")
            before = os.environ.get("MLFLOW_TRACKING_URI")
            try:
                with _env(MIRROR_ENV, str(mirror)):
                    results = _run_stages(cfg)
                mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
                model = mlflow.artifacts.download_artifacts(
                    results["register"]["model_uri"], dst_path=str(root / "model")
                )
            finally:  # the stages point the global MLflow client at the run's store
                mlflow.set_tracking_uri(before)
            runs[experiment] = SmokeRun(cfg, results, Path(model))
        return runs[experiment]

    return run
