"""Users' own files as spreadsheets export them: other delimiters, decimal commas and legacy
encodings read with one setting, and a file that can't be read says which setting to change,
naming the user's own file and line."""

import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dlpipe.collect import collect
from dlpipe.data import MIRROR_ENV, DataError, load_meta, load_split
from dlpipe.preprocess import preprocess


def _table(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    size = rng.uniform(20, 200, n).round(1)
    return pd.DataFrame(
        {"size": size, "city": rng.choice(["Köln", "Zürich"], n), "price": size * 1000.5}
    )


def _preprocess(data: dict, root: Path) -> dict:
    collect(data, root / "raw")
    return preprocess(data, root / "raw", root / "processed", seed=0)


def test_european_table_reads_with_delimiter_decimal_and_encoding(data_config, tmp_path):
    table = _table()
    path = tmp_path / "export.csv"
    # What a German spreadsheet writes: ";" between fields, "," in numbers, Windows-1252 bytes.
    path.write_bytes(table.to_csv(sep=";", decimal=",", index=False).encode("cp1252"))
    data = data_config(
        "table_csv", path=str(path), target="price", delimiter=";", decimal=",", encoding="cp1252"
    )
    meta = _preprocess(data, tmp_path)
    assert meta["columns"] == {"numeric": ["size"], "categorical": ["city"]}
    assert meta["target_kind"] == "regression"
    _, y = load_split(tmp_path / "processed", "train")
    # "3,5" was read as 3.5: every target is one of the table's prices, not 35 or NaN.
    assert (np.abs(y[:, None] - table["price"].to_numpy()[None]).min(axis=1) < 0.1).all()


def test_table_read_as_one_column_names_the_delimiter(data_config, tmp_path):
    path = tmp_path / "export.csv"
    path.write_text(_table().to_csv(sep=";", decimal=",", index=False))
    data = data_config("table_csv", path=str(path), target="price")
    with pytest.raises(DataError, match=r"one column .*separated by ';'.*data.delimiter=';'"):
        _preprocess(data, tmp_path)


@pytest.mark.parametrize("kind", ["table_csv", "text_csv"])
def test_latin1_byte_names_encoding_line_and_own_file(data_config, tmp_path, kind):
    path = tmp_path / "own.csv"
    rows = ["text,label"] + [f"row {i},{'a' if i % 2 else 'b'}" for i in range(40)]
    rows[7] = "café crème,a"
    path.write_bytes("\n".join(rows).encode("latin-1"))
    extra = {"target": "label"} if kind == "table_csv" else {}
    data = data_config(kind, path=str(path), **extra)
    with pytest.raises(DataError) as info:
        _preprocess(data, tmp_path)
    message = str(info.value)
    assert str(path) in message and "data/raw" not in message.replace(str(path), "")
    assert "line 8" in message and "utf-8" in message and "data.encoding=latin-1" in message
    # ...and the setting it names is the fix.
    meta = _preprocess({**data, "encoding": "latin-1"}, tmp_path / "fixed")
    assert sum(meta["sizes"].values()) == 40
    assert load_meta(tmp_path / "fixed" / "processed")["name"] == kind


def test_unknown_encoding_is_a_config_error(data_config, tmp_path):
    path = tmp_path / "own.csv"
    path.write_text("text,label\n" + "x,a\ny,b\n" * 20)
    with pytest.raises(ValueError, match=r"data.encoding='klingon' is not an encoding"):
        _preprocess(data_config("text_csv", path=str(path), encoding="klingon"), tmp_path)


def _images(root: Path, counts: dict[str, int], size=(12, 12)) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full(size, 40 * c + i, np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def test_image_link_out_of_the_folder_is_refused(data_config, tmp_path):
    root = _images(tmp_path / "images", {"cat": 6, "dog": 6})
    outside = _images(tmp_path / "elsewhere", {"x": 1}) / "x" / "000.png"
    (root / "cat" / "inside.png").symlink_to(root / "dog" / "000.png")  # a link inside: fine
    collect(data_config("image_folder", path=str(root)), tmp_path / "raw")
    (root / "dog" / "outside.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"outside.png links to .*elsewhere.*outside data.path"):
        collect(data_config("image_folder", path=str(root)), tmp_path / "raw2")


def test_image_beyond_the_pixel_cap_is_refused_before_decoding(data_config, tmp_path):
    root = _images(tmp_path / "images", {"cat": 6, "dog": 6})
    Image.new("1", (12000, 12000)).save(root / "dog" / "huge.png")  # 144 Mpx, a few kB on disk
    data = data_config("image_folder", path=str(root))
    with pytest.raises(DataError, match=r"huge.png is 12000x12000 = 144,000,000 pixels.*max_pix"):
        _preprocess(data, tmp_path)


def test_small_classes_warn_and_a_class_missing_from_training_is_an_error(
    data_config, tmp_path, caplog
):
    root = _images(tmp_path / "images", {"cat": 20, "dog": 20, "rare": 1})
    data = data_config("image_folder", path=str(root), test_fraction=0.2, val_fraction=0.2)
    with caplog.at_level("WARNING"):
        collect(data, tmp_path / "raw")
    assert "class 'rare' has 1 image(s)" in caplog.text
    # The one "rare" image lands in the training split: test and validation warn, by name.
    caplog.clear()
    with caplog.at_level("WARNING"):
        preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=0)
    assert "['rare'] have no samples in the val split" in caplog.text
    assert "['rare'] have no samples in the test split" in caplog.text
    # A limit that leaves a class out of training is refused, naming the class and the fix.
    with pytest.raises(DataError, match=r"\['rare'\] have no samples in the training split"):
        preprocess({**data, "limit": 10}, tmp_path / "raw", tmp_path / "limited", seed=0)


def test_archive_with_two_members_of_one_name_says_so(data_config, tmp_path):
    archive = tmp_path / "table.zip"
    with zipfile.ZipFile(archive, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name, as it should
        z.writestr("t.csv", "a,b\n1,2\n")
        z.writestr("t.csv", "a,b\n3,4\n")
    data = data_config("table_csv", path=str(archive), target="b")
    with pytest.raises(DataError, match=r"more than one member named \['t.csv'\]"):
        _preprocess(data, tmp_path)


def test_collect_from_an_archive_with_a_repeated_member_says_so(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "dup").mkdir(parents=True)
    with zipfile.ZipFile(mirror / "dup" / "arch.zip", "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z.writestr("t.csv", "a,b\n1,2\n")
        z.writestr("t.csv", "a,b\n3,4\n")
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    entry = {"sha256": "0" * 64, "mirror": "arch.zip", "mirror_member": "t.csv"}
    data = {"name": "dup", "format": "table", "url": "http://127.0.0.1:9/", "mirror_dir": "dup"}
    with pytest.raises(DataError, match=r"arch.zip holds more than one member named \['t.csv'\]"):
        collect({**data, "files": {"t.csv": entry}}, tmp_path / "raw")


def test_char_text_limit_too_small_for_a_split_names_the_smallest_that_works(data_config, tmp_path):
    # `dvc exp run -S experiment=shakespeare_gpt -S data.limit=500` failed with a 25-character
    # validation split and no fix; the message now gives the smallest limit, which works.
    path = tmp_path / "play.txt"
    path.write_text("".join(f"LINE {i}: to be or not to be.\n" for i in range(4000)))
    data = data_config("tinyshakespeare", path=str(path), limit=500)
    data.pop("files")
    collect(data, tmp_path / "raw")
    with pytest.raises(ValueError, match=r"data.limit \(at least (\d+) characters") as info:
        preprocess(data, tmp_path / "raw", tmp_path / "processed", seed=0)
    smallest = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    meta = preprocess({**data, "limit": smallest}, tmp_path / "raw", tmp_path / "ok", seed=0)
    assert min(meta["sizes"].values()) >= data["block_size"] + 1


def test_numbers_with_a_decimal_comma_name_the_setting(data_config, tmp_path):
    # Delimiter right, decimal left at ".": "979989,8" would be read as a class name.
    path = tmp_path / "export.csv"
    path.write_text(_table().to_csv(sep=";", decimal=",", index=False))
    data = data_config("table_csv", path=str(path), target="price", delimiter=";")
    with pytest.raises(DataError, match=r"\['size', 'price'\] hold numbers written with a decim"):
        _preprocess(data, tmp_path)
