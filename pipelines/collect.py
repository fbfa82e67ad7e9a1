"""Stage 1: download and verify the raw dataset (see dlpipe.collect)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dlpipe.collect import collect
from dlpipe.entry import finish
from dlpipe.errors import reported
from dlpipe.smoke import sized


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("collect"):  # a UserError: its one-line message, exit 1
        cfg = sized(cfg)  # smoke=true: the tiny sizes (conf/config.yaml)
        collect(OmegaConf.to_container(cfg.data, resolve=True), Path(cfg.paths.raw))


if __name__ == "__main__":
    main()
    finish()  # no interpreter teardown: 1-3 s per stage (dlpipe.entry)
