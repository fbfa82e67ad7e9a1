"""Tables on real California housing and on small CSVs written here: the column transform is
fitted on the training rows only, own CSVs become classification or regression datasets, and
housing_mlp and an own-CSV classifier run all six stages to a served model taking raw rows."""

import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from dlpipe.collect import collect
from dlpipe.data import load_array, load_meta, load_split
from dlpipe.formats.tabular import (
    TRANSFORM,
    Adapter,
    load_transform,
    table_features,
    target_kind,
)
from dlpipe.models import load_checkpoint
from dlpipe.preprocess import preprocess
from dlpipe.tasks.regressor import predict_values

NUMERIC = [
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
]


@pytest.fixture(scope="module")
def housing(dataset) -> Path:
    return dataset("california_housing")


def _housing_rows(raw: Path) -> pd.DataFrame:
    with tarfile.open(raw / "housing.tgz") as t:
        return pd.read_csv(t.extractfile("housing.csv"))


def _write_table(path: Path, n: int = 240, seed: int = 0) -> pd.DataFrame:
    """A small table: numbers with gaps, an int column, text with gaps; `label` (yes/no) and
    `price` both depend on the features."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(20, 200, n)
    rooms = rng.integers(1, 6, n)
    color = rng.choice(["red", "green", "blue"], n)
    price = 1000 * size + 5000 * rooms + np.where(color == "red", 20000, 0) + rng.normal(0, 5e3, n)
    table = pd.DataFrame(
        {
            "id": np.arange(n),
            "size": np.where(rng.random(n) < 0.1, np.nan, size),
            "rooms": rooms,
            "color": np.where(rng.random(n) < 0.1, None, color),
            "label": np.where(price > np.median(price), "yes", "no"),
            "price": price,
        }
    )
    table.to_csv(path, index=False)
    return table


def _own_table(data_config, root: Path, csv: Path, **overrides) -> Path:
    """Collect `csv` as data=table_csv (with `overrides`) and preprocess it; the processed dir."""
    data = data_config("table_csv", path=str(csv), **overrides)
    collect(data, root / "raw")
    preprocess(data, root / "raw", root / "processed", seed=0)
    return root / "processed"


def test_housing_transform_is_fitted_on_the_training_rows_only(housing):
    meta = load_meta(housing)
    assert meta["sizes"] == {"train": 14448, "val": 2064, "test": 4128}
    assert meta["input_shape"] == [8 + 5] and meta["mean"] is None  # 8 numbers + 5 categories
    assert meta["columns"] == {"numeric": NUMERIC, "categorical": ["ocean_proximity"]}
    rows = _housing_rows(housing.parent / "raw")
    train = rows.iloc[load_array(housing, "train_row")]
    x, y = load_split(housing, "train")
    assert np.array_equal(y, train["median_house_value"].to_numpy(np.float32))
    assert meta["target"]["mean"] == pytest.approx(train["median_house_value"].mean())

    imputer, scaler = load_transform(housing / TRANSFORM).named_transformers_["numeric"]
    assert np.allclose(imputer.statistics_, train[NUMERIC].median())
    assert not np.allclose(imputer.statistics_, rows[NUMERIC].median())  # all rows differ
    filled = train[NUMERIC].fillna(train[NUMERIC].median())
    assert np.allclose(scaler.mean_, filled.mean()) and np.allclose(
        scaler.scale_, filled.std(ddof=0)
    )
    assert not np.isnan(x).any() and np.allclose(x[:, :8].mean(0), 0, atol=1e-5)


def test_a_value_only_in_the_test_rows_moves_nothing(data_config, tmp_path):
    csv = tmp_path / "table.csv"
    table = _write_table(csv)
    before = _own_table(data_config, tmp_path / "a", csv, target="price", drop=["id", "label"])
    row = int(load_array(before, "test_row")[0])
    table.loc[row, ["size", "color"]] = [1e9, "only_in_test"]
    table.to_csv(csv, index=False)
    after = _own_table(data_config, tmp_path / "b", csv, target="price", drop=["id", "label"])

    old, new = load_meta(before), load_meta(after)
    for name in ("train_x.npy", "train_y.npy", "val_x.npy", "val_y.npy"):
        assert old["sha256"][name] == new["sha256"][name]
    assert old["target"] == new["target"]
    a, b = load_transform(before / TRANSFORM), load_transform(after / TRANSFORM)
    assert np.array_equal(table_features(a, table.iloc[:9]), table_features(b, table.iloc[:9]))
    # The changed test row: its size is scaled with the training stats, its unseen color is
    # no category at all (handle_unknown="ignore").
    x = load_array(after, "test_x")[0]
    size = a.named_transformers_["numeric"][1]
    assert x[0] == pytest.approx((1e9 - size.mean_[0]) / size.scale_[0], rel=1e-6)
    colors = ("blue", "green", "missing", "red")  # "missing": what the imputer fills in
    assert new["features"][-4:] == [f"categorical__color_{c}" for c in colors]
    assert (x[-4:] == 0).all()


def test_quantile_scaling_maps_training_columns_to_a_normal(data_config, tmp_path):
    """data.scaling=quantile: a skewed numeric training column comes out standard normal (by
    rank, from the training rows), in the same order; an unknown scaling is an error naming
    the choices."""
    csv = tmp_path / "table.csv"
    table = _write_table(csv)
    table["size"] = np.exp(table["size"] / 20)  # heavy right tail
    table.to_csv(csv, index=False)
    root = tmp_path / "q"
    processed = _own_table(
        data_config, root, csv, target="price", drop=["id", "label"], scaling="quantile"
    )
    x = load_array(processed, "train_x")
    assert abs(np.median(x[:, 0])) < 0.1 and 0.8 < x[:, 0].std() < 1.2
    train = table.iloc[load_array(processed, "train_row")]
    ranks = train["size"].rank().to_numpy()
    known = train["size"].notna().to_numpy()
    assert (np.diff(x[known, 0][np.argsort(ranks[known])]) >= 0).all()  # order kept
    with pytest.raises(ValueError, match=r"data.scaling='minmax'.*'quantile'"):
        _own_table(data_config, tmp_path / "bad", csv, target="price", scaling="minmax")


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (["a", "b", "a"], "classification"),
        ([True, False, True], "classification"),
        ([0, 1, 2, 1], "classification"),
        ([1.0, 2.0, 1.0], "classification"),  # whole numbers, few values
        ([0.5, 1.5, 2.0], "regression"),
        (list(range(50)), "regression"),  # whole numbers, more values than max_classes
    ],
)
def test_target_kind_is_inferred(values, kind):
    assert target_kind(pd.Series(values), "auto", max_classes=20) == kind
    assert target_kind(pd.Series(values), "regression", max_classes=20) == "regression"


def test_own_csv_regression_and_its_adapter(data_config, tmp_path):
    csv = tmp_path / "flats.csv"
    table = _write_table(csv)
    processed = _own_table(data_config, tmp_path, csv, target="price", drop=["id", "label"])
    meta = load_meta(processed)
    assert meta["target_kind"] == "regression" and "classes" not in meta
    assert meta["columns"] == {"numeric": ["size", "rooms"], "categorical": ["color"]}
    assert sum(meta["sizes"].values()) == 240 and meta["sizes"]["test"] == 48
    test_x, test_y = load_split(processed, "test")
    rows = load_array(processed, "test_row")
    assert np.allclose(test_y, table["price"].to_numpy(np.float32)[rows])

    # Served rows: the original columns in any order, missing values and extra columns too.
    adapter = Adapter({}, {"transform": str(processed / TRANSFORM)})
    raw = table.iloc[rows][["color", "rooms", "size", "id"]]
    assert torch.equal(adapter(raw), torch.from_numpy(test_x))
    assert adapter([{"size": None, "rooms": 2, "color": None}]).isfinite().all()
    with pytest.raises(ValueError, match=r"lack columns \['rooms'\]"):
        adapter(raw.drop(columns=["rooms"]))


def test_own_csv_classifier_runs_all_stages_and_serves_raw_rows(make_cfg, run_stages, tmp_path):
    csv = tmp_path / "flats.csv"
    table = _write_table(csv)
    cfg = make_cfg(
        "data=table_csv",
        f"data.path={csv}",
        "data.target=label",
        "data.drop=[id,price]",
        "model=mlp",
        "smoke=true",
        processed=tmp_path / "data" / "processed",
    )
    results = run_stages(cfg)
    meta = load_meta(cfg.paths.processed)
    assert meta["classes"] == ["no", "yes"] and meta["target_kind"] == "classification"
    assert 0 <= results["evaluate"]["test/acc"] <= 1

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@challenger")
    rows = load_array(Path(cfg.paths.processed), "test_row")
    out = model.predict(table.iloc[rows].drop(columns=["label", "price"]))
    assert list(out.columns) == ["label", "no", "yes"] and len(out) == len(rows)
    net, _ = load_checkpoint(Path(cfg.paths.train) / "checkpoints" / "best.ckpt")
    with torch.inference_mode():
        expected = net(torch.from_numpy(load_split(Path(cfg.paths.processed), "test")[0]))
    assert np.allclose(out[["no", "yes"]], expected.softmax(-1).numpy(), atol=1e-6)


def test_housing_mlp_reports_and_serves_raw_rows(smoke_run):
    # All six stages at smoke size, run once per session: see tests/test_smoke.py.
    cfg, results, champion = smoke_run("housing_mlp")
    metrics = results["evaluate"]
    prefixes = ("test/", "test/linear/", "baseline/", "chance/")
    assert set(metrics) == {f"{p}{m}" for p in prefixes for m in ("rmse", "mae", "r2")}
    assert abs(metrics["chance/r2"]) < 0.05  # the training mean explains nothing
    assert 30_000 < metrics["test/linear/rmse"] < 120_000  # dollars, not standardized units
    files = Path(cfg.paths.reports) / "evaluate" / "files"
    comparison = pd.read_csv(files / "comparison.csv", index_col="predictor")
    assert comparison.loc["linear", "r2"] == pytest.approx(metrics["test/linear/r2"])
    processed = Path(cfg.paths.processed)
    assert len(pd.read_csv(files / "predictions.csv")) == load_meta(processed)["sizes"]["test"]
    assert (files / "predicted_vs_actual.png").read_bytes()[:4] == b"\x89PNG"

    model = mlflow.pyfunc.load_model(str(champion))
    table = _housing_rows(Path(cfg.paths.raw)).drop(columns=["median_house_value"])
    served = model.predict(table.iloc[load_array(processed, "test_row")])
    net, hparams = load_checkpoint(Path(cfg.paths.train) / "checkpoints" / "best.ckpt")
    expected = predict_values(net, load_split(processed, "test")[0], hparams["target"])
    assert np.allclose(served["prediction"], expected, rtol=1e-5)
    # Missing values go in as they are: filled with the training median, as in preprocessing.
    gaps = table[table["total_bedrooms"].isna()].head(5)
    imputer = load_transform(processed / TRANSFORM).named_transformers_["numeric"][0]
    median = imputer.statistics_[NUMERIC.index("total_bedrooms")]
    filled = model.predict(gaps.fillna({"total_bedrooms": median}))
    assert np.allclose(model.predict(gaps)["prediction"], filled["prediction"], rtol=1e-6)
