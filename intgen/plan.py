"""The pipeline's definition, in one place: its stages in order, the model each one calls, and the settings each
takes from a run's. `build-dataset`, the stage commands, export, the card and the report all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from intgen.backends import BackendConfig
from intgen.config import RunConfig
from intgen.lift import KeepRule
from intgen.stages import Stage, grade, propose, sample, verify
from intgen.stages.verify import Baselines, Condition


def sample_settings(config: RunConfig) -> sample.SampleSettings:
    return sample.SampleSettings(config.samples, config.sampling(), config.prompt("solve"), config.system_prompt,
                                 given=config.attempts)


def grade_settings(config: RunConfig) -> grade.GradeSettings:
    return grade.GradeSettings(config.grade_timeout, config.lenient_answers, config.hard_only, config.hard_threshold)


def propose_settings(config: RunConfig) -> propose.ProposeSettings:
    prompts = config.propose_prompts()
    return propose.ProposeSettings(
        config.proposals, config.sampling(config.propose_max_tokens, config.propose_temperature),
        critique_prompt=prompts[-1], reference_prompt=prompts[0] if len(prompts) == 2 else None,
        structured=config.structured, propose_for=config.propose_for, allow_no_reference=config.allow_no_reference,
    )


def verify_settings(config: RunConfig) -> verify.VerifySettings:
    return verify.VerifySettings(
        config.continuations, config.sampling(config.verify_max_tokens, config.verify_temperature),
        config.prompt("solve"), config.system_prompt, config.min_success,
        tuple(Condition(c) for c in config.conditions), config.lenient_answers, config.verify_all_proposals,
        Baselines(config.baselines), KeepRule(config.keep_rule), config.alpha, config.top_up, config.top_up_below,
    )


@dataclass(frozen=True)
class Step:
    """One stage of the pipeline: the stage, the model it calls ("policy", "proposer" or None: no model) and its
    settings from a run's."""

    stage: Stage
    model: str | None
    settings: Callable[[RunConfig], Any]

    @property
    def name(self) -> str:
        return self.stage.name


PIPELINE: tuple[Step, ...] = (
    Step(sample.STAGE, "policy", sample_settings),
    Step(grade.STAGE, None, grade_settings),
    Step(propose.STAGE, "proposer", propose_settings),
    Step(verify.STAGE, "policy", verify_settings),
)
STAGES: list[Stage] = [step.stage for step in PIPELINE]
STAGE_NAMES: tuple[str, ...] = tuple(step.name for step in PIPELINE)
MODEL_STAGES: tuple[str, ...] = tuple(step.name for step in PIPELINE if step.model is not None)


def step(name: str) -> Step:
    return next(s for s in PIPELINE if s.name == name)


def model_config(config: RunConfig, model: str) -> BackendConfig:
    """The backend settings of the run's "policy" or "proposer" model (the proposer is the policy unless set)."""
    if model == "proposer":
        return config.proposer_config() or config.policy_backend()
    return config.policy_backend()
