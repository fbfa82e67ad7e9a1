"""Batch prediction (`python -m dlpipe.predict`) with smoke-size champions: a folder of images, a
folder of wav files, a CSV of rows and a text file of lines each give one named row per input;
unreadable files and refused inputs fail in their own row while the rest run, and the exit code
says whether any failed."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dlpipe.data import load_split
from dlpipe.predict import main, read_inputs


def predict(cfg, source: Path, out: Path, *extra: str) -> tuple[int, pd.DataFrame]:
    model = f"models:/{cfg.register.model_name}@challenger"  # the smoke run's own version
    code = main(
        [model, str(source), "-o", str(out), "--tracking-uri", cfg.mlflow.tracking_uri,
         "--batch-size", "3", "--no-progress", *extra]
    )  # fmt: skip
    return code, read_rows(out)


def read_rows(path: Path) -> pd.DataFrame:
    """The predictions CSV: failed rows have an `error` and empty outputs, the others no error."""
    rows = pd.read_csv(path)
    rows["error"] = rows["error"].fillna("")
    return rows


def test_image_folder_with_a_broken_file_and_a_wrong_shape(smoke_run, tmp_path):
    cfg, _, _ = smoke_run("fmnist_ae")
    images, _ = load_split(cfg.paths.processed, "test")
    folder = tmp_path / "images"
    (folder / "shoes").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(images[i]).save(folder / "shoes" / f"{i}.png")
    # The autoencoder takes its training size only (a classifier's adapter would resize it).
    Image.fromarray(np.full((40, 33, 3), 200, np.uint8)).save(folder / "big.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("hello")
    code, rows = predict(cfg, folder, tmp_path / "out.csv")
    assert code == 1
    assert rows["input"].tolist() == [
        "big.jpg", "broken.png", "notes.txt", *(f"shoes/{i}.png" for i in range(5))
    ]  # fmt: skip
    failed = rows.set_index("input")["error"]
    assert "cannot identify image file" in failed["broken.png"]
    assert "not an image or audio file" in failed["notes.txt"]
    assert "expects images of shape (N, 28, 28)" in failed["big.jpg"]
    ok = rows[rows["error"] == ""]
    assert len(ok) == 5 and {"output_0", "output_1"} <= set(rows.columns)
    # The same latents as the registered model gives the whole batch at once.
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@challenger")
    finally:
        mlflow.set_tracking_uri(None)
    expected = model.predict(images[:5])
    got = ok[ok["input"].str.startswith("shoes/")].filter(like="output_").to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_wav_folder_and_the_command_line(smoke_run, tmp_path):
    cfg, _, _ = smoke_run("fsdd_cnn")
    waves = sorted(Path(cfg.paths.raw).rglob("*.wav"))[:4]
    assert waves, f"no wav files under {cfg.paths.raw}"
    folder = tmp_path / "waves"
    folder.mkdir()
    for wave in waves:
        shutil.copy(wave, folder / wave.name)
    (folder / "cut.wav").write_bytes(waves[0].read_bytes()[:30])  # a truncated header
    out = tmp_path / "digits.csv"
    done = subprocess.run(
        [sys.executable, "-m", "dlpipe.predict", f"models:/{cfg.register.model_name}@challenger",
         str(folder), "-o", str(out), "--tracking-uri", cfg.mlflow.tracking_uri],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "5 inputs, 1 failed" in done.stdout and "input/s" in done.stderr  # the progress bar
    rows = read_rows(out).set_index("input")
    assert rows.loc["cut.wav", "error"]
    ok = rows[rows["error"] == ""]
    assert sorted(ok.index) == sorted(w.name for w in waves)
    assert set(ok["label"]) <= {str(d) for d in range(10)} | set(range(10))


def test_csv_rows_a_bad_cell_fails_its_row_and_a_missing_column_every_row(smoke_run, tmp_path):
    cfg, _, champion = smoke_run("housing_mlp")
    import mlflow

    model = mlflow.pyfunc.load_model(str(champion))
    table = model.metadata.load_input_example(str(champion))
    table = pd.concat([table] * 3, ignore_index=True)
    table.to_csv(tmp_path / "good.csv", index=False)
    code, rows = predict(cfg, tmp_path / "good.csv", tmp_path / "good_out.csv")
    assert code == 0 and rows["input"].tolist() == [f"row {i + 1}" for i in range(len(table))]
    assert (rows["error"] == "").all() and "prediction" in rows.columns

    bad = table.astype(object)
    bad.iloc[1, 0] = "abc"  # one cell that is not a number
    bad.to_csv(tmp_path / "bad.csv", index=False)
    code, rows = predict(cfg, tmp_path / "bad.csv", tmp_path / "bad_out.csv")
    assert code == 1
    assert rows.loc[1, "error"] and (rows.drop(index=1)["error"] == "").all()

    table.drop(columns=[table.columns[0]]).to_csv(tmp_path / "short.csv", index=False)
    code, rows = predict(cfg, tmp_path / "short.csv", tmp_path / "short_out.csv")
    assert code == 1 and (rows["error"].str.contains(table.columns[0])).all()


def test_text_file_one_input_per_line(smoke_run, tmp_path):
    cfg, _, _ = smoke_run("sst2_transformer")
    lines = tmp_path / "reviews.txt"
    lines.write_text("a gripping, funny film\n\ndull and far too long\nfine\n")
    code, rows = predict(cfg, lines, tmp_path / "out.csv")
    assert code == 0
    assert rows["input"].tolist() == ["line 1", "line 3", "line 4"]  # the empty line is skipped
    assert set(rows["label"]) <= {"negative", "positive"} | {"0", "1"}


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="give a folder, a .csv or a text file"):
        read_inputs(tmp_path / "nowhere")
