"""Data formats beyond images: each module turns one kind of raw data into processed arrays
(`preprocess(data, raw_dir, out_dir, seed) -> meta`) and, for models that ship, converts what a
served model is given (a waveform, strings, table rows) into the network's input (`Adapter`).

The dispatch table is `dlpipe.preprocess.FORMAT_MODULES`.
"""
