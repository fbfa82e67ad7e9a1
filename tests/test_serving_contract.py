"""The served model owns its input contract: no input schema that MLflow would convert lossily
before the model sees the data (floats cut to integers, int columns refused where the examples
held floats, missing values refused in an int column); the model's adapter checks what it gets
and names the expected form."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc.scoring_server import infer_and_parse_data
from omegaconf import OmegaConf

from dlpipe.collect import collect
from dlpipe.evaluate import evaluate
from dlpipe.preprocess import preprocess
from dlpipe.register import register
from dlpipe.train import train
from dlpipe.tune import tune


@pytest.fixture(scope="module")
def table_model(cfg_factory, tmp_path_factory):
    """A regressor registered from an own CSV whose `age` column is whole numbers, no gaps."""
    root = tmp_path_factory.mktemp("table_contract")
    rng = np.random.default_rng(0)
    n = 300
    table = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n),  # int64 in the CSV: MLflow would infer `long`
            "city": rng.choice(["Lyon", "Oslo", "Porto"], n),
        }
    )
    table["price"] = 1000 * table["age"] + rng.normal(0, 100, n)
    table.to_csv(root / "flats.csv", index=False)
    cfg = cfg_factory(
        root,
        "data=table_csv",
        f"data.path={root / 'flats.csv'}",
        "data.target=price",
        "task=regressor",
        "model=mlp",
        "smoke=true",
        processed=root / "data" / "processed",
    )
    data = OmegaConf.to_container(cfg.data, resolve=True)
    collect(data, Path(cfg.paths.raw))  # an own file: no download, no mirror
    preprocess(data, Path(cfg.paths.raw), Path(cfg.paths.processed), cfg.seed)
    for stage in (tune, train, evaluate, register):
        stage(cfg)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    # The version just registered: a smoke-size model is @champion only if it beat chance.
    return mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@challenger")


def test_table_model_declares_no_lossy_input_schema(table_model):
    assert table_model.metadata.get_input_schema() is None
    assert "raw rows" in table_model.metadata.metadata["input"]
    assert table_model.metadata.get_output_schema() is not None


def test_table_model_takes_missing_values_in_an_int_column(table_model):
    rows = pd.DataFrame({"age": [30, None], "city": ["Oslo", None]})
    out = table_model.predict(rows)
    assert len(out) == 2 and np.isfinite(out.iloc[:, 0]).all()


def test_table_model_over_http_keeps_fractions(table_model):
    # What `mlflow models serve` does with a request body: parse it against the input schema.
    payload = {"dataframe_records": [{"age": 30.5, "city": "Oslo"}, {"age": 30, "city": "Oslo"}]}
    rows = infer_and_parse_data(payload, table_model.metadata.get_input_schema())
    assert rows["age"].tolist() == [30.5, 30]  # not cut to 30
    out = table_model.predict(rows).iloc[:, 0].to_numpy()
    assert out[0] != out[1]


def test_table_model_names_the_columns_it_needs(table_model):
    with pytest.raises(MlflowException, match=r"lack columns \['city'\]"):
        table_model.predict(pd.DataFrame({"age": [30]}))
    with pytest.raises(MlflowException, match=r"column 'age' must hold numbers"):
        table_model.predict(pd.DataFrame({"age": ["thirty"], "city": ["Oslo"]}))


def test_gan_request_over_http_is_not_cut_to_an_integer():
    # The kind of the table case for any integer input: with no input schema the parser keeps
    # 2.5, and the generator refuses it ("n must be an integer"), rather than making 2 images.
    payload = json.loads('{"dataframe_records": [{"n": 2.5, "seed": 1}]}')
    rows = infer_and_parse_data(payload, None)
    assert rows["n"].tolist() == [2.5]
