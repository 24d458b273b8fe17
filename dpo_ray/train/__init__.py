"""One optimizer step and the Ray Train worker loop around it: step, checkpoints, export, LoRA, tracking."""
