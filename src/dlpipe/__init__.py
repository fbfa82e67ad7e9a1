"""dlpipe: collect -> preprocess -> tune -> train -> evaluate -> register, one reproducible
pipeline."""

__version__ = "0.1.0"
