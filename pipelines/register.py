"""Stage 6: MLflow pyfunc, registry version and champion gate (see dlpipe.register)."""

import hydra
from omegaconf import DictConfig

from dlpipe.entry import finish
from dlpipe.errors import reported
from dlpipe.register import register
from dlpipe.smoke import sized


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with reported("register"):  # a UserError: its one-line message, exit 1
        cfg = sized(cfg)  # smoke=true: the tiny sizes (conf/config.yaml)
        register(cfg)


if __name__ == "__main__":
    main()
    finish()  # no interpreter teardown: 1-3 s per stage (dlpipe.entry)
