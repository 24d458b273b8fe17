"""What a preference loss is, as data: every loss's name, parameters and needs, defined once (no torch).

`LossSpec` is the `train.loss` section of the config and what the train stage hands the workers whole; the
loss functions (dpo_ray.objective.losses, one per entry of ENTRIES) read their parameters from it. Batch-level
state that is not configuration (BCO's reward shift δ, AOT's sorted partners) travels beside it
(dpo_ray.objective.losses.BatchState), never inside it. A new loss is one function in dpo_ray.objective.losses
plus one entry here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ENTRIES", "F_DIVERGENCES", "LOSS_NAMES", "SFT", "LossEntry", "LossSpec"]


@dataclass(frozen=True)
class LossEntry:
    """What one loss needs besides β (its function, cited and derived, is dpo_ray.objective.losses.LOSSES[name]).

    reference_free: reads the policy's per-token mean log-probs alone (train needs no reference stage).
    smoothing: takes label_smoothing ε; needs_smoothing: only with ε > 0.
    params: the LossSpec fields this loss alone reads.
    sorts_batch: its loss sorts the global batch (AOT: partners are gathered over every worker first).
    shift: reads BCO's reward shift δ, a running mean the training loop keeps (dpo_ray.objective.losses.LossState).
    unpaired: trains on unpaired rows (one completion and a desirable/undesirable label each), not on pairs; its
        function is in dpo_ray.objective.unpaired, and it is never combined with other losses.
    """

    reference_free: bool = False
    smoothing: bool = False
    needs_smoothing: bool = False
    params: tuple[str, ...] = ()
    sorts_batch: bool = False
    shift: bool = False
    unpaired: bool = False


ENTRIES: dict[str, LossEntry] = {
    "sigmoid": LossEntry(smoothing=True, params=("f_divergence", "f_alpha")),
    "robust": LossEntry(smoothing=True),
    "ipo": LossEntry(),
    "hinge": LossEntry(),
    "sigmoid_norm": LossEntry(),
    "exo_pair": LossEntry(smoothing=True, needs_smoothing=True),
    "nca_pair": LossEntry(),
    "sppo_hard": LossEntry(),
    "apo_zero": LossEntry(),
    "apo_down": LossEntry(),
    "discopop": LossEntry(params=("discopop_tau",)),
    "dpop": LossEntry(params=("dpop_lambda",)),
    "simpo": LossEntry(reference_free=True, smoothing=True, params=("simpo_gamma",)),
    "orpo": LossEntry(reference_free=True, params=("orpo_lambda",)),
    "bco_pair": LossEntry(shift=True),
    "aot": LossEntry(smoothing=True, sorts_batch=True),
    "aot_unpaired": LossEntry(smoothing=True, sorts_batch=True),
    "aot_pair": LossEntry(smoothing=True, sorts_batch=True),  # older TRL's name of aot_unpaired
    "kto": LossEntry(unpaired=True, params=("desirable_weight", "undesirable_weight")),
    "apo_zero_unpaired": LossEntry(unpaired=True, params=("desirable_weight", "undesirable_weight")),
}
LOSS_NAMES = tuple(ENTRIES)
SFT = "sft"  # a member of a combination: the NLL of the chosen completion, −log πθ(y_w|x)/|y_w|
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


class LossSpec(BaseModel):
    """The loss of a train stage (`train.loss`): one loss or a weighted combination, β and every parameter."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)  # β = inf would train into NaN

    name: str | list[str] = Field(
        "sigmoid",
        description='Loss variant (docs/reference/losses.md), or a list of them ("sft": the NLL of the chosen) '
        "combined with `weights` (TRL's MPO form); the rewards logged are the first member's that is not sft.",
    )
    weights: list[float] | None = Field(None, description="Weights of a list of losses, one each (>= 0; default 1).")
    beta: float = Field(0.1, gt=0, description="β: strength of the KL constraint.")
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="ε of cDPO (sigmoid), rDPO (robust), EXO (exo_pair, which needs ε > 0), simpo and the aot losses.",
    )
    sft_weight: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen completion (RPO).")
    average_logps: bool = Field(False, description="Per-token mean log-probs instead of sums.")
    discopop_tau: float = Field(0.05, gt=0, description="τ of the discopop loss.")
    dpop_lambda: float = Field(50.0, ge=0, description="λ of the dpop loss's penalty.")
    simpo_gamma: float = Field(0.5, ge=0, description="γ, the target margin of the simpo loss.")
    orpo_lambda: float = Field(0.1, ge=0, description="λ of the orpo loss's odds-ratio term.")
    f_divergence: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO (Wang et al. 2023): the divergence of the sigmoid loss (reverse_kl: DPO)."
    )
    f_alpha: float = Field(0.5, gt=0, description="α of alpha_divergence, TRL's convention.")
    desirable_weight: float = Field(
        1.0, gt=0, description="λ_D of kto and apo_zero_unpaired: the desirable rows' weight."
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="λ_U of kto and apo_zero_unpaired: the undesirable rows' weight."
    )

    @model_validator(mode="after")
    def _consistent(self) -> LossSpec:
        names = self.names
        unknown = [n for n in names if n not in ENTRIES and not (n == SFT and isinstance(self.name, list))]
        if unknown:
            raise ValueError(
                f"loss.name: unknown loss {unknown[0]!r}; expected one of {', '.join(LOSS_NAMES)}"
                + (f" (or, in a list, {SFT})" if isinstance(self.name, list) else f", or a list of them and {SFT}")
            )
        if isinstance(self.name, list):
            if not names or len(set(names)) != len(names):
                raise ValueError(f"loss.name: a list names each loss once (at least one), found {self.name}")
            if self.weights is not None and len(self.weights) != len(names):
                raise ValueError(f"loss.weights: {len(self.weights)} weights for {len(names)} losses {self.name}")
        elif self.weights is not None:
            raise ValueError(f"loss.weights weighs a list of losses; loss.name is {self.name!r}")
        if any(w < 0 or not math.isfinite(w) for w in self.weights or []):
            raise ValueError(f"loss.weights: must be finite numbers >= 0, found {self.weights}")
        entries = [ENTRIES[n] for n in names if n != SFT]
        if self.unpaired and (len(names) > 1 or self.sft_weight):
            raise ValueError(f"loss.name {self.name}: an unpaired loss (kto, apo_zero_unpaired) is trained alone")
        if self.unpaired and self.average_logps:
            raise ValueError(f"loss.average_logps: {self.name} uses summed log-probs, as the KTO paper and TRL do")
        if self.label_smoothing and not any(e.smoothing for e in entries):
            takes = ", ".join(n for n, e in ENTRIES.items() if e.smoothing)
            raise ValueError(f"loss.label_smoothing applies to {takes}; not to {self.name!r}")
        sorting = [n for n in names if n != SFT and ENTRIES[n].sorts_batch]
        if len(sorting) > 1:
            raise ValueError(f"loss.name: {sorting} each sort the batch; combine at most one of them")
        for n in names:
            if n != SFT and ENTRIES[n].needs_smoothing and not self.label_smoothing:
                raise ValueError(f"loss {n} needs loss.label_smoothing > 0 (EXO's ε, e.g. 1e-3)")
        if self.f_divergence != "reverse_kl" and self.name != "sigmoid":
            raise ValueError(
                f"loss.f_divergence {self.f_divergence} applies to the sigmoid loss alone, "
                f"but loss.name is {self.name!r}"
            )
        # A parameter of a loss that is not trained would change nothing. By value, not by whether it was set:
        # the stage handlers validate the dumped config (every key set) again.
        fields = type(self).model_fields
        owners: dict[str, list[str]] = {}
        for owner, entry in ENTRIES.items():
            for key in entry.params:
                owners.setdefault(key, []).append(owner)
        for key, those in owners.items():
            if getattr(self, key) != fields[key].default and not set(those) & set(names):
                owner = " and ".join(map(repr, those))
                raise ValueError(f"loss.{key} is a parameter of loss {owner}, but loss.name is {self.name!r}")
        if self.f_alpha != fields["f_alpha"].default and self.f_divergence != "alpha_divergence":
            raise ValueError(f"loss.f_alpha is a parameter of f_divergence alpha_divergence, not {self.f_divergence}")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """The losses trained, as a tuple (one for a single loss)."""
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)

    @property
    def reference_free(self) -> bool:
        """No member needs reference log-probs (reference-free losses and sft only)."""
        return all(n == SFT or ENTRIES[n].reference_free for n in self.names)

    @property
    def rewards_from(self) -> str | None:
        """The member whose rewards the metrics report: the first that is not sft (None for ["sft"])."""
        return next((n for n in self.names if n != SFT), None)

    @property
    def sorting(self) -> str | None:
        """The member that sorts the global batch (an AOT loss), if any."""
        return next((n for n in self.names if n != SFT and ENTRIES[n].sorts_batch), None)

    @property
    def shifted(self) -> bool:
        """A member reads BCO's reward shift δ (the loop keeps it: dpo_ray.objective.losses.LossState)."""
        return any(n != SFT and ENTRIES[n].shift for n in self.names)

    @property
    def unpaired(self) -> bool:
        """The loss trains on unpaired rows (kto, apo_zero_unpaired)."""
        return any(n != SFT and ENTRIES[n].unpaired for n in self.names)

    @property
    def label(self) -> str:
        """The loss as a user reads it: "sigmoid", or "0.5·sigmoid + 1·sft"."""
        if isinstance(self.name, str):
            return self.name
        weights = self.weights or [1.0] * len(self.name)
        return " + ".join(f"{w:g}·{n}" for n, w in zip(self.name, weights, strict=True))

    def with_beta(self, beta: float) -> LossSpec:
        """This spec with another β (the β sweep), validated again."""
        return LossSpec.model_validate({**self.model_dump(), "beta": beta})


def spec_of(data: Any) -> LossSpec:
    """A LossSpec from a dumped one (a dict) or itself."""
    return data if isinstance(data, LossSpec) else LossSpec.model_validate(data)
