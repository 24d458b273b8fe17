"""The whole config (PipelineConfig) and how it is read: YAML plus dotted `key=value` overrides, defaults filled
in, paths made absolute, unknown and moved keys refused with the key to use."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from dpo_ray.objective.spec import ENTRIES, SFT, LossSpec
from pipeline.config.base import ConfigError, StrictModel, _absolute, _absolute_ref, model_of
from pipeline.config.stages import DemoConfig, EvaluateConfig, GenerateConfig, PrepareConfig, ReferenceConfig
from pipeline.config.train import BatchingConfig, OptimConfig, TrainConfig


def reference_free(loss: Any) -> bool:
    """Whether a raw `train.loss` section (a dict, before validation) needs no reference log-probs."""
    raw = loss.get("name", "sigmoid") if isinstance(loss, dict) else None
    names = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    known = all(isinstance(n, str) and (n == SFT or n in ENTRIES) for n in names)
    return bool(known and names) and all(n == SFT or ENTRIES[n].reference_free for n in names)


# (section, key, artifact name under run_dir) filled in when a config leaves the path empty.
_DEFAULT_PATHS = [
    ("demo", "assets", "assets"),
    ("prepare", "output", "pairs"),
    ("reference", "pairs", "pairs"),
    ("reference", "output", "scored"),
    ("train", "scored", "scored"),
    ("train", "output", "train"),
    ("train", "export", "export"),
    ("train", "checkpoint.storage_path", "checkpoints"),
    ("generate", "prompts", "pairs"),
    ("generate", "generations", "generations"),
    ("generate", "output", "generated_pairs"),
    ("evaluate", "policy", "export"),
    ("evaluate", "prompts", "pairs"),
    ("evaluate", "scored", "scored"),
    ("evaluate", "train_metrics", "train"),
    ("evaluate", "output", "eval"),
    ("train", "tracking.dir", "tracking"),
    ("evaluate", "tracking.dir", "tracking"),
]


# Per section: keys that are always local paths or URIs, and model/data references (maybe hub ids).
_PATH_KEYS = {
    "demo": {"paths": {"assets"}, "refs": set()},
    "prepare": {"paths": {"output"}, "refs": {"tokenizer"}},
    "reference": {"paths": {"pairs", "output"}, "refs": {"model"}},
    "train": {"paths": {"scored", "output", "export", "checkpoint.storage_path", "tracking.dir"}, "refs": {"model"}},
    "generate": {"paths": {"prompts", "generations", "output"}, "refs": {"policy"}},
    "evaluate": {
        "paths": {"prompts", "scored", "train_metrics", "output", "tracking.dir"},
        "refs": {"policy", "reference"},
    },
}


class GateConfig(StrictModel):
    """`run`'s evaluation gate: after each round's evaluate, its policy must beat its reference
    (pipeline.core.gate). A failed gate is shown in status, the summary and the report."""

    reward_se: float | None = Field(
        2.0,
        ge=0,
        description="The policy's mean reward gain over its reference (paired per prompt) must exceed this many "
        "standard errors; null: no reward test.",
    )
    max_kl: float | None = Field(
        None, gt=0, description="KL(π‖πref) budget in nats per sample; a policy above it fails. null: no budget."
    )
    on_fail: Literal["stop", "continue"] = Field(
        "stop",
        description="stop: no later round is built on a failed policy, and `run` exits with status 4 after the "
        "summary; continue: go on (the failure is still shown).",
    )


class PipelineConfig(StrictModel):
    run_dir: str = Field("runs/default", description="Root directory (or URI) of this run's artifacts.")
    demo: DemoConfig | None = Field(None, description="Generate demo data and a tiny model before the stages.")
    prepare: PrepareConfig | None = Field(None, description="Prepare stage settings.")
    reference: ReferenceConfig | None = Field(None, description="Reference stage settings.")
    train: TrainConfig | None = Field(None, description="Train stage settings.")
    generate: GenerateConfig | None = Field(None, description="Generate (on-policy) stage settings.")
    evaluate: EvaluateConfig | None = Field(None, description="Evaluate stage settings.")
    rounds: int = Field(1, ge=1, description="`run`: rounds of [prepare|generate] -> reference -> train -> evaluate.")
    round_reference: Literal["initial", "previous"] = Field(
        "initial", description="Reference model of rounds >= 1: the initial one, or the previous round's policy."
    )
    on_policy_first_round: bool = Field(
        False, description="Round 0 trains on pairs sampled by generate.policy (else on prepare's pairs)."
    )
    beta_sweep: list[float] = Field(
        default_factory=list,
        description="`run`: also train round 0's pairs with each of these β (under <run_dir>/beta-<β>/) and "
        "evaluate it: the points of the reward-vs-KL plot beside the main run's.",
    )
    gate: GateConfig = Field(default_factory=GateConfig, description="`run`: the evaluation gate of each round.")

    @model_validator(mode="after")
    def _loop_needs(self) -> PipelineConfig:
        if (self.rounds > 1 or self.on_policy_first_round) and self.generate is None:
            raise ValueError("rounds > 1 and on_policy_first_round need a 'generate:' section")
        if self.rounds > 1 and self.train is None:
            raise ValueError("rounds > 1 needs a 'train:' section")
        if self.rounds > 1 and self.reference is None and self.train is not None:
            if not self.train.reference_free:
                label = self.train.loss.label
                raise ValueError(f"rounds > 1 needs a 'reference:' section (train.loss {label} uses one)")
        if self.beta_sweep and (self.train is None or self.evaluate is None):
            raise ValueError("beta_sweep needs 'train:' and 'evaluate:' sections")
        if any(b <= 0 for b in self.beta_sweep):
            raise ValueError(f"beta_sweep: every β must be > 0, found {self.beta_sweep}")
        self._unpaired_data()
        return self

    def _unpaired_data(self) -> None:
        """The stages that write train's data write the rows its loss reads: unpaired rows for an unpaired loss
        (kto), pairs for the others."""
        if self.train is None:
            return
        unpaired = self.train.loss.unpaired
        writers: list[tuple[str, str | None]] = []
        if self.generate is not None and (self.rounds > 1 or self.on_policy_first_round):
            writers.append(("generate", self.generate.unpaired))
        if self.prepare is not None and not self.on_policy_first_round:
            writers.append(("prepare", self.prepare.unpaired))
        for section, setting in writers:
            if (setting is not None) != unpaired:
                want = f"{section}.unpaired (records or pairs)" if section == "prepare" else "generate.unpaired"
                raise ValueError(
                    f"train.loss {self.train.loss.label} trains on unpaired rows: set {want}"
                    if unpaired
                    else f"{section}.unpaired {setting}: train.loss {self.train.loss.label} trains on pairs; "
                    "remove it or use an unpaired loss (kto, apo_zero_unpaired)"
                )

    @model_validator(mode="before")
    @classmethod
    def _default_outputs(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        run_dir = _absolute(str(data.get("run_dir", "runs/default")).rstrip("/"))
        data = {**data, "run_dir": run_dir}
        train = data.get("train")
        free = isinstance(train, dict) and reference_free(train.get("loss"))
        for section, key, name in _DEFAULT_PATHS:
            stage = data.get(section)
            if isinstance(stage, dict) and not _get(stage, key):
                if free and key == "scored":  # a reference-free loss trains (and is evaluated) on the pairs
                    name = "pairs"
                data = {**data, section: _set(stage, key, f"{run_dir}/{name}")}
        # Ray workers run in other directories: relative local paths are made absolute here, at the edge.
        for section, keys in _PATH_KEYS.items():
            stage = data.get(section)
            if not isinstance(stage, dict):
                continue
            for key in keys["paths"] | keys["refs"]:
                value = _get(stage, key)
                if isinstance(value, str):
                    stage = _set(stage, key, _absolute(value) if key in keys["paths"] else _absolute_ref(value))
            if isinstance(stage.get("inputs"), list):
                stage = {**stage, "inputs": [_absolute_ref(v) if isinstance(v, str) else v for v in stage["inputs"]]}
            data = {**data, section: stage}
        return data


def _get(section: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a raw section ("checkpoint.storage_path"), None where absent."""
    node: Any = section
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(section: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of a raw section with `value` at a dotted key (sub-sections created as needed, none mutated)."""
    head, _, rest = key.partition(".")
    if not rest:
        return {**section, head: value}
    child = section.get(head)
    return {**section, head: _set(child if isinstance(child, dict) else {}, rest, value)}


_TRACKING_MOVES = {"report_to": "report_to", "tracking_dir": "dir", "experiment": "experiment", "tracking_name": "name"}
# Keys of the flat train config that moved into its sections: refused with the new key, never read as aliases.
MOVED_KEYS: dict[str, str] = {
    **{f"train.{k}": f"train.loss.{k}" for k in LossSpec.model_fields if k not in ("name", "weights")},
    "train.loss_weights": "train.loss.weights",
    "train.optimizer": "train.optim.name",
    **{f"train.{k}": f"train.optim.{k}" for k in OptimConfig.model_fields if k != "name"},
    **{f"train.{k}": f"train.batching.{k}" for k in BatchingConfig.model_fields if k != "mode"},
    "train.num_workers": "train.workers.count",
    "train.resources_per_worker": "train.workers.resources",
    **{f"train.{k}": f"train.workers.{k}" for k in ("use_gpu", "accelerator_type", "parallelism", "max_failures")},
    "train.storage_path": "train.checkpoint.storage_path",
    "train.checkpoint_every": "train.checkpoint.every",
    "train.keep_checkpoints": "train.checkpoint.keep",
    **{f"{s}.{old}": f"{s}.tracking.{new}" for s in ("train", "evaluate") for old, new in _TRACKING_MOVES.items()},
}
# Keys that left the config, and where their job went.
REMOVED_KEYS = {
    "train.fault_injection": "fault injection is a test hook now, not a config key: set DPO_RAY_STEP_HOOK="
    "dpo_ray.testing.faults:fail:STEP:RANK[:node] in the driver's environment",
}
# Sections that once were a single value: the key the value now goes to.
_SECTION_VALUE = {"train.loss": "name", "train.batching": "mode"}


def _check_keys(data: Any, model: type[BaseModel], prefix: str = "") -> None:
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    for key, value in data.items():
        if f"{prefix}{key}" in REMOVED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' was removed: {REMOVED_KEYS[f'{prefix}{key}']}")
        if f"{prefix}{key}" in MOVED_KEYS:
            raise ConfigError(f"config key '{prefix}{key}' is now '{MOVED_KEYS[f'{prefix}{key}']}'")
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        sub = model_of(fields[key].annotation)
        if sub is not None and f"{prefix}{key}" in _SECTION_VALUE and not isinstance(value, dict | None):
            moved = f"{prefix}{key}.{_SECTION_VALUE[f'{prefix}{key}']}"
            raise ConfigError(f"'{prefix}{key}' is a section: its value {value!r} is now '{moved}'")
        if sub is not None:
            _check_keys(value, sub, f"{prefix}{key}.")


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value, e.g. prepare.max_length=512")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """PipelineConfig from a YAML file (or nothing) plus dotted key=value overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: expected a mapping at the top level, found {type(loaded).__name__}")
        data = loaded or {}
    for assignment in overrides:
        _apply_override(data, assignment)
    _check_keys(data, PipelineConfig)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            found = f" (found {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{loc or '<root>'}: {err['msg']}{found}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


# Keys only one stage's config has, by which current_identity knows whose identity it reads (reference and
# evaluate have gained no key since artifacts recorded their configs).
_STAGE_KEYS: tuple[tuple[type[StrictModel], frozenset[str]], ...] = (
    (PrepareConfig, frozenset({"inputs", "tokenizer", "max_prompt_length"})),
    (GenerateConfig, frozenset({"policy", "prompts", "generations"})),
)


def current_identity(stored: dict[str, Any]) -> dict[str, Any]:
    """A stage config as an artifact or checkpoint directory recorded it, in the current form, so that the work of
    an older dpo-ray version still counts as this config's (skipped, resumed):

    - a train config written when its keys were flat (before the sections) is nested as MOVED_KEYS says, with the
      old unset loss parameters (null) at their defaults and without fault_injection;
    - a train, prepare or generate config written before a key was added gets that key at its default
      (e.g. train.loss.desirable_weight, prepare.unpaired, generate.unpaired);

    each then validated and dumped again. A config that does not validate is returned unchanged."""
    flat = [k for k in stored if f"train.{k}" in MOVED_KEYS or k in ("fault_injection",)]
    train = {"model", "scored", "export"} <= set(stored)  # a train stage's identity, not another stage's
    if not train:
        for model, keys in _STAGE_KEYS:
            if keys <= set(stored):
                try:
                    return model.model_validate(stored).model_dump(mode="json")
                except ValidationError:
                    return stored
        return stored
    if not (flat or isinstance(stored.get("loss"), str | list)):
        try:
            return TrainConfig.model_validate(stored).model_dump(mode="json")
        except ValidationError:
            return stored
    raw: dict[str, Any] = {}
    for key, value in stored.items():
        moved = MOVED_KEYS.get(f"train.{key}")
        if key == "fault_injection" or (moved is not None and moved.startswith("train.loss.") and value is None):
            continue  # a test key that left the config; an old optional loss parameter left unset
        if f"train.{key}" in _SECTION_VALUE and not isinstance(value, dict):  # loss: sigmoid, batching: auto
            raw = _set(raw, f"{key}.{_SECTION_VALUE[f'train.{key}']}", value)
        elif moved is not None:
            raw = _set(raw, moved.removeprefix("train."), value)
        else:
            raw[key] = value
    try:
        return TrainConfig.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return stored
