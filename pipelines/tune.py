"""Stage 3: Optuna study over the model's search space (see dlpipe.tune)."""

import hydra
from omegaconf import DictConfig

from dlpipe.entry import finish
from dlpipe.errors import reported
from dlpipe.smoke import sized
from dlpipe.tune import tune


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("tune"):  # a UserError: its one-line message, exit 1
        cfg = sized(cfg)  # smoke=true: the tiny sizes (conf/config.yaml)
        tune(cfg)


if __name__ == "__main__":
    main()
    finish()  # no interpreter teardown: 1-3 s per stage (dlpipe.entry)
