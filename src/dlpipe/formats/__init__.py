"""Data formats: each module turns one kind of raw data into processed arrays
(`preprocess(data, raw_dir, out_dir, seed) -> meta`, written through `dlpipe.data`) and, for
models that ship, converts what a served model is given (images, a waveform, strings, table
rows) into the network's input (`Adapter`, `INPUT_DOC`, `serving_files`, `example_input`).

Adding a format is one module here plus one line in `FORMAT_MODULES`.
"""

import importlib
from types import ModuleType

# data.format -> the module that handles it
FORMAT_MODULES = {
    "idx": "dlpipe.formats.images",
    "image_folder": "dlpipe.formats.images",
    "fsdd": "dlpipe.formats.audio",
    "fsdd_digits": "dlpipe.formats.digit_strings",
    "text_table": "dlpipe.formats.text",
    "char_text": "dlpipe.formats.chars",
    "stock_prices": "dlpipe.formats.stocks",
    "table": "dlpipe.formats.tabular",
    "transactions": "dlpipe.formats.transactions",
    "parallel_text": "dlpipe.formats.parallel",
}
FORMATS = tuple(FORMAT_MODULES)


def format_module(fmt: str) -> ModuleType:
    """The module that handles data.format=`fmt` (preprocessing and, for serving, its inputs);
    ValueError listing the formats for an unknown one."""
    if fmt not in FORMAT_MODULES:
        raise ValueError(f"data.format={fmt!r} is not supported; use one of {list(FORMATS)}")
    return importlib.import_module(FORMAT_MODULES[fmt])
