"""The built-in trainer: diffusers' FluxTransformer2DModel + peft LoRA, run inside `accelerate launch`.

Launcher side: `engine.py` (NativeEngine: RunConfig -> native_config.json + argv).
Job side: `train.py` reads only that JSON (config.py), with models, lora, data and flow beside it.
Nothing is imported here, so importing the job never imports the schema (or Hydra).
"""
