"""flux-lora entry point: compose -> check -> freeze -> launch. Everything else lives in flux_lora/."""

import hydra
from omegaconf import DictConfig

from flux_lora.compose import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf
    print(OmegaConf.to_yaml(cfg, resolve=True))


if __name__ == "__main__":
    main()
