"""What a checkpoint holds and how it is written and read back: model and optimizer (torch.distributed.checkpoint,
sharded under FSDP2), scheduler, every rank's RNG state and the loop's position (step, epoch, batch in epoch),
its metric history and the loss state (BCO's δ). A restart from it continues the same run."""

from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch

from dpo_ray.objective.losses import LossState

__all__ = [
    "LoopState",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "save_json",
    "seed_everything",
    "set_rng_state",
    "temp_dir",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def temp_dir() -> str:
    return tempfile.mkdtemp(prefix="dpo-ray-")


class LoopState:
    """Mutable loop state that goes into checkpoints."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.loss = LossState()  # what the loss carries between steps (BCO's δ)
        self.grad_norms: list[float] = []  # every step's, for the health signal grad_norm_ratio


def save_checkpoint(model: Any, optimizer: Any, scheduler: Any, state: LoopState, rank: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = temp_dir()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=os.path.join(path, "state"))
    torch.save(rng_state(), os.path.join(path, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save(scheduler.state_dict(), os.path.join(path, "scheduler.pt"))
        trainer = {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch}
        loss_state = {"bco": [state.loss.bco_delta, state.loss.bco_steps], "grad_norms": state.grad_norms}
        save_json(os.path.join(path, "trainer.json"), {**trainer, **loss_state, "history": state.history})
    return path


def load_checkpoint(path: str, model: Any, optimizer: Any, scheduler: Any, state: LoopState, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    loaded: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(loaded, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
    rng = os.path.join(path, f"rng-rank{rank}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    with open(os.path.join(path, "trainer.json")) as f:
        saved = json.load(f)
    state.step, state.epoch, state.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
    state.history = saved["history"]
    state.loss = LossState(float(saved["bco"][0]), int(saved["bco"][1])) if "bco" in saved else LossState()
    state.grad_norms = [float(g) for g in saved.get("grad_norms", [])]
