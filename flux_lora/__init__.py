"""flux-lora: compose -> check -> freeze -> launch -> report, for FLUX.1-dev identity LoRAs."""
