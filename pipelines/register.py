"""Stage 6: MLflow pyfunc, registry version and champion gate (see dlpipe.register)."""

import hydra
from omegaconf import DictConfig

from dlpipe.register import register


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    register(cfg)


if __name__ == "__main__":
    main()
