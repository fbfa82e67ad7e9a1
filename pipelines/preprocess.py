"""Stage 2: split and decode the raw dataset into train/val/test arrays (see dlpipe.preprocess)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dlpipe.entry import finish
from dlpipe.errors import reported
from dlpipe.preprocess import preprocess
from dlpipe.smoke import sized


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("preprocess"):  # a UserError: its one-line message, exit 1
        cfg = sized(cfg)  # smoke=true: the tiny sizes (conf/config.yaml)
        preprocess(
            OmegaConf.to_container(cfg.data, resolve=True),
            Path(cfg.paths.raw),
            Path(cfg.paths.processed),
            cfg.seed,
        )


if __name__ == "__main__":
    main()
    finish()  # no interpreter teardown: 1-3 s per stage (dlpipe.entry)
