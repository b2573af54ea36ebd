"""Fine-tuning on Ray Train: what every worker runs, the same on 1 or N workers.

- `config.py`: `TrainConfig`, the one schema of a fine-tune (the `finetune` CLI's flags, the workers' config)
- `loop.py`: `train_loop`, the Ray Train worker function, read top to bottom like nanoGPT's train.py
- `model.py`: what trains for each method (full, LoRA, DreamBooth, VAE, Textual Inversion), FSDP2 sharding
- `data.py`: seeded batches (a function of the step, so a resumed run continues exactly), crops, latent cache
- `losses.py`: diffusion targets (epsilon or v), Min-SNR and prior-preservation weights, the VAE loss, LR schedule
- `checkpoints.py`: checkpoints in safetensors + JSON, and the result written where `generate` finds it
- `stored.py`: which checkpoints --out holds, read without torch (the driver asks it too)
- `validation.py`: validation images through the actors' own `draw`, the fixed-batch eval loss
"""

import sys


def say(line: str) -> None:
    """A worker's line for the fine-tune's log file, as `[finetune] line` on its standard output. Not print():
    Ray Train replaces a worker's print with one that tees the line to stdout and logs it to stderr as well,
    and Ray streams both, so the log had every line twice."""
    sys.stdout.write(f"[finetune] {line}\n")
    sys.stdout.flush()
