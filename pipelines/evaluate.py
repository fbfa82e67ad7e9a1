"""Stage 5: test-split metrics and plots (see dlpipe.evaluate)."""

import hydra
from omegaconf import DictConfig

from dlpipe.evaluate import evaluate


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
