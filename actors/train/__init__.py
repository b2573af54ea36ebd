"""Fine-tuning on Ray Train: what every worker runs, the same on 1 or N workers.

- `config.py`: `TrainConfig`, the one schema of a fine-tune (the `finetune` CLI's flags, the workers' config)
- `loop.py`: `train_loop`, the Ray Train worker function, read top to bottom like nanoGPT's train.py
- `model.py`: what trains for each method (full, LoRA, DreamBooth, VAE, Textual Inversion), FSDP2 sharding
- `data.py`: seeded batches (a function of the step, so a resumed run continues exactly), crops, latent cache
- `losses.py`: diffusion targets (epsilon or v), Min-SNR and prior-preservation weights, the VAE loss, LR schedule
- `checkpoints.py`: checkpoints in safetensors + JSON, and the result written where `generate` finds it
- `validation.py`: validation images through the actors' own `draw`, the fixed-batch eval loss
"""
