"""What each stage reads, by identity: the half of a stage's identity that is not its config.

An output is complete for a stage (`pipeline.core.stage.begin` skips it) only when its manifest's `upstream` equals
what the stage reads now:
- each upstream artifact by its manifest hash (`artifacts.manifest_sha256`): key "prompts", "pairs", "scored";
- each model by its fingerprint (`models.model_fingerprint`: config.json, the weights' headers and sampled
  bytes): key "model:<config field>", e.g. generate's "model:policy";
- each model's tokenizer by its fingerprint (`models.tokenizer_fingerprint`): key "tokenizer:<config field>";
- prepare's input files by URI, size and modification key (`sources.inputs_fingerprint`): key "inputs";
- generate's and evaluate's reward: a reward model (`model:<dir>`) and its tokenizer by fingerprint, keys
  "model:reward" and "tokenizer:reward"; a `<module>:<function>` by its module's source file, key "code:reward"
  (the built-in rewards are named by the config);
- prepare's and generate's split rule (`tokenization.SPLIT_RULE`): key "split".

A path string is not an identity: round 0's export retrained in place, a model directory edited in place,
`round_reference: previous` after the previous round changed, a tokenizer re-templated in place: each gives
another fingerprint, so the stages that read it are redone. `status` reads the same function to say why an
output is stale (`changes`).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["changes", "known_inputs", "matching_tokenizer", "reads", "stage_inputs"]

# The config fields naming what each stage reads: (upstream artifacts, models with their tokenizers). Evaluate
# reads its scored pairs only with max_eval_pairs (the preference accuracy).
_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": ((), ()),
    "generate": (("prompts",), ("policy",)),
    "reference": (("pairs",), ("model",)),
    "train": (("scored",), ("model",)),
    "evaluate": (("prompts", "scored"), ("policy", "reference")),
}


def reads(stage: str, cfg: Any) -> dict[str, str]:
    """Each input key of `stage` (see the module docstring) → the path, URI or id it reads ("inputs": prepare's
    configured inputs, joined)."""
    out: dict[str, str] = {}
    if stage == "prepare":
        out |= {"inputs": ", ".join(map(str, cfg.inputs)), "tokenizer:tokenizer": cfg.tokenizer}
    artifact_fields, model_fields = _FIELDS[stage]
    if stage == "evaluate" and not cfg.max_eval_pairs:
        artifact_fields = ("prompts",)
    out |= {field: getattr(cfg, field) for field in artifact_fields}
    for field in model_fields:
        out |= {f"model:{field}": getattr(cfg, field), f"tokenizer:{field}": getattr(cfg, field)}
    reward = getattr(cfg, "reward", "") if stage in ("generate", "evaluate") else ""
    if reward.startswith("model:"):
        out["model:reward"] = out["tokenizer:reward"] = reward.removeprefix("model:")
    elif ":" in reward:
        out["code:reward"] = reward
    return out


def stage_inputs(stage: str, cfg: Any) -> dict[str, str]:
    """The identity of everything `stage` (prepare, generate, reference, train, evaluate) reads with `cfg`;
    models at URIs or hub ids are fetched into the cache to be fingerprinted (the stage loads them next)."""
    return {k: v for k, v in _inputs(stage, cfg, local_only=False).items() if v is not None}


def known_inputs(stage: str, cfg: Any) -> dict[str, str | None]:
    """stage_inputs without fetching anything (status): a model or tokenizer that is not a local directory, or
    an upstream artifact that is not complete, is None (unknown)."""
    return _inputs(stage, cfg, local_only=True)


def _inputs(stage: str, cfg: Any, local_only: bool) -> dict[str, str | None]:
    from pathlib import Path

    from dpo_ray.data import artifacts
    from dpo_ray.models.loading import (
        load_tokenizer,
        model_fingerprint,
        ref_kind,
        resolve_model_dir,
        tokenizer_fingerprint,
    )

    def known(ref: str) -> bool:
        return not local_only or (ref_kind(ref) == "local" and Path(ref.removeprefix("file://")).expanduser().is_dir())

    out: dict[str, str | None] = {}
    for key, ref in reads(stage, cfg).items():
        kind = key.partition(":")[0]
        if key == "inputs":
            from pipeline.core.sources import inputs_fingerprint, resolve_inputs

            out[key] = inputs_fingerprint(resolve_inputs(cfg.inputs, cfg.input_type))
        elif kind == "model":
            out[key] = model_fingerprint(resolve_model_dir(ref)) if known(ref) else None
        elif kind == "tokenizer":
            out[key] = tokenizer_fingerprint(load_tokenizer(ref, cfg.trust_remote_code)) if known(ref) else None
        elif kind == "code":
            out[key] = _source_fingerprint(ref.partition(":")[0])
        else:  # an upstream artifact
            complete = not local_only or artifacts.read_manifest(ref) is not None
            out[key] = artifacts.manifest_sha256(ref) if complete else None
    if stage in ("prepare", "generate"):  # the rule that assigns the splits they write
        from dpo_ray.data.tokenization import SPLIT_RULE

        out["split"] = SPLIT_RULE
    return out


def _source_fingerprint(module: str) -> str | None:
    """sha256 of a reward module's source file (a `<module>:<function>` reward edited in place scores anew); None
    when it has no source file of its own (only that file is read: helper modules and data files are not)."""
    import hashlib
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None  # not a plain source file (a zip, a namespace): loading the reward says what is wrong
    with open(spec.origin, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _what(key: str) -> str:
    """ "model:policy" → "policy model", "tokenizer:model" → "tokenizer", "scored" → "scored"."""
    kind, _, field = key.partition(":")
    if not field:
        return key
    return kind if field in ("model", "tokenizer") else f"{field} {kind}"


def changes(recorded: dict[str, str], now: dict[str, str | None], sources: dict[str, str]) -> list[str]:
    """Why an output whose manifest recorded `recorded` inputs is stale against `now` (unknown values are not
    compared), e.g. "policy model of round-0/train changed since this artifact was written". `sources` maps an
    input key to the label of the stage of this run that writes what it reads."""
    why = []
    for key in sorted(set(recorded) | set(now)):
        if key in now and now[key] is None:
            continue
        if recorded.get(key) == now.get(key):
            continue
        source = f" of {sources[key]}" if key in sources else ""
        if key in recorded and key in now:
            why.append(f"{_what(key)}{source} changed since this artifact was written")
        elif key in now:
            why.append(f"{_what(key)}{source} was not recorded when this artifact was written (an older dpo-ray)")
        else:
            why.append(f"{_what(key)}{source} is no longer read")
    return why


def matching_tokenizer(found: str, model: str, manifest: Any, artifact: str) -> str:
    """`found`, the fingerprint of `model`'s tokenizer, which must be the one `artifact` (its manifest) was made
    with."""
    from dpo_ray.data.artifacts import ArtifactError

    expected = manifest.fingerprints.get("tokenizer")
    if found != expected:
        raise ArtifactError(
            f"{artifact} was tokenized with tokenizer {expected}, but model {model} has tokenizer {found}: "
            "use the same tokenizer in every stage (rerun prepare with prepare.tokenizer set to this model's)"
        )
    return found
