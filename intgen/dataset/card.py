"""The dataset card (README.md of RUN/dataset) and the run's figures as they read: the funnel, Table 1 and what
decontamination dropped. The CLI's summary prints the same rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from intgen import __version__
from intgen.dataset.analysis import SELECTION_RULE
from intgen.dataset.export import CONFIGS, PREFERENCE_RULE, PRM_RULE, config_rows, export_file
from intgen.plan import MODEL_STAGES
from intgen.resources import fill, resource_path
from intgen.rundir import RunDir, atomic_write_text

if TYPE_CHECKING:
    from intgen.config import RunConfig

def decontamination_text(checked: dict[str, Any]) -> str:
    sets = ", ".join(f"{c['set']} ({c['problems']})" for c in checked["sets"])
    return f"{checked['dropped']} (sharing {checked['ngram']} consecutive words with {sets})"


def card_decontamination(checked: dict[str, Any] | None) -> str:
    if not checked:
        return "; not checked against any eval set (`--decontaminate`)"
    sets = ", ".join(f"`{c['set']}` ({c['problems']} problems)" for c in checked["sets"])
    return (f"; {checked['dropped']} more dropped before sampling for sharing {checked['ngram']} consecutive words "
            f"with a problem of {sets}")


def funnel_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rejected = ", ".join(f"{k}: {v}" for k, v in sorted(summary["rejected"].items())) or "none"
    cost = "n/a (no --prices)" if summary["cost_usd"] is None else f"${summary['cost_usd']:.4f}"
    arrived = summary["intervention_continuations"]
    checked = summary.get("decontamination")
    rows = [("dropped before sampling: in an eval set", decontamination_text(checked))] if checked else []
    rows += [
        ("problems", str(summary["problems"])),
        ("  without a reference solution", str(summary["problems_without_reference"])),
        ("attempts", str(summary["attempts"])),
        ("correct / incorrect / ungradable",
         f"{summary['correct']} / {summary['incorrect']} / {summary['ungradable']}"),
        ("problems selected for proposals", str(summary["problems_selected"])),
        ("proposals", str(summary["proposals"])),
        ("rejected, by reason", rejected),
        ("accepted", str(summary["accepted"])),
        ("  not verified (one per attempt; --verify-all-proposals)", str(summary["not_verified"])),
        ("verified (all continuations arrived)", str(summary["verified"])),
        ("correct continuations / all", f"{summary['intervention_correct']} / {arrived}"
         + (f" ({100 * summary['intervention_correct'] / arrived:.2f}%)" if arrived else "")),
        *([("  --top-up: more continuations, both arms", str(summary["top_up_continuations"]))]
          if summary.get("top_up_continuations") else []),
        ("kept", str(summary["kept"])),
        ("problems with a kept intervention", str(summary["problems_with_kept"])),
        ("tokens (prompt + completion)", f"{summary['prompt_tokens']} + {summary['completion_tokens']}"),
        ("cost", cost),
    ]
    if "seconds" in summary:
        rows.append(("time", f"{summary['seconds']} s"))
    return rows


def table1_rows(table1: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """Table 1 as text rows: condition, solved / problems, mean accuracy, and the two ratios to original-step."""
    def interval(pair: list[float | None] | None) -> str:
        if not pair:
            return ""
        return " [" + ", ".join("n/a" if v is None else f"{v:.2f}" for v in pair) + "]"

    def ratio(vs: dict[str, Any], name: str) -> str:  # "1.35x [1.27, 1.44]"
        return ("n/a" if vs[name] is None else f"{vs[name]:.2f}x") + interval(vs[f"{name}_ci95"])

    rows = []
    for condition, row in table1["conditions"].items():
        vs = row.get("vs_original_step")
        solved, acc = (ratio(vs, "solved_ratio"), ratio(vs, "accuracy_ratio")) if vs else ("", "")
        rows.append((condition, f"{row['solved']}/{row['problems']}", f"{100 * row['mean_accuracy']:.2f}%", solved,
                     acc))
    return rows


def table1_selection(table1: dict[str, Any]) -> str:
    """What Table 1 is counted on, in words (the rule, M, and what was left out)."""
    left = {k: v for k, v in (table1.get("left_out") or {}).items() if v}
    out = (f"{table1.get('selection', SELECTION_RULE)} (M = {table1.get('continuations_per_condition')}; "
           f"{table1['problems']} problems")
    if left:
        out += "; left out: " + ", ".join(f"{v} for {k.replace('_', ' ')}" for k, v in left.items())
    return out + ")"


def table1_markdown(table1: dict[str, Any]) -> str:
    if not table1["conditions"]:
        left = {k: v for k, v in (table1.get("left_out") or {}).items() if v}
        return "(no problem has all its matched continuations" + "".join(
            f"; left out: {v} for {k.replace('_', ' ')}" for k, v in left.items()) + ")"
    head = ("| continue from | solved / problems | mean accuracy | solved vs original-step "
            "| accuracy vs original-step |\n|---|---|---|---|---|\n")
    return head + "\n".join("| " + " | ".join(row) + " |" for row in table1_rows(table1))


def card_text(run: RunDir, config: RunConfig, summary: dict[str, Any], load_path: str) -> str:
    """The card of RUN/dataset; `load_path` is what its examples load (a folder or a Hub repo id)."""
    out = run.path / "dataset"
    files = {name: export_file(out, name) for name in CONFIGS}
    rows = config_rows(out)
    return dataset_card(run, config, rows, files, summary, load_path)


def write_card(run: RunDir, config: RunConfig, summary: dict[str, Any], load_path: str) -> None:
    """RUN/dataset/README.md (see `card_text`)."""
    atomic_write_text(run.path / "dataset" / "README.md", card_text(run, config, summary, load_path))


def card_front_matter(config: RunConfig, rows: dict[str, int], files: dict[str, Path]) -> str:
    """The card's YAML: configs with their data files, licence, language, task, size, tags."""
    size = max(rows.values())
    category = ("n<1K" if size < 1_000 else "1K<n<10K" if size < 10_000 else "10K<n<100K" if size < 100_000
                else "100K<n<1M")
    # `datasets` cannot load an empty parquet config ("corresponds to no data"): an empty one is left out of
    # the list (its file stays in the folder) and the card says so.
    front = {
        "configs": [
            {"config_name": name, "data_files": [{"split": "train", "path": f"{name}/{files[name].name}"}],
             **({"default": True} if name == "sft" else {})}
            for name in CONFIGS if rows[name]
        ],
        "license": config.license,
        "language": ["en"],
        "task_categories": ["text-generation"],
        "size_categories": [category],
        "tags": ["math", "reasoning", "intervention-training", "intgen", "synthetic"],
        "pretty_name": "intgen intervention dataset",
    }
    return yaml.safe_dump(front, sort_keys=False).strip()


def keep_rule_text(config: RunConfig) -> str:
    if config.keep_rule != "lift":
        return (f"Interventions with at least {config.min_success} correct continuation(s) out of "
                f"{config.continuations} were kept (the paper's rule, which a lucky pass also meets; see the lift "
                "below where it was measured).")
    lifted = (f"An intervention was kept when at least {config.min_success} of its {config.continuations} "
              "continuations were correct and the one-sided Fisher exact p-value of its successes against its own "
              "original-step baseline was at most ")
    if not config.top_up:
        return lifted + f"{config.alpha} (`--keep-rule lift`; see the lift below)."
    return lifted + (
        f"{config.alpha / 2}, either on the first {config.continuations} per arm or, where that p was borderline "
        f"(above {config.alpha / 2}, at most {config.top_up_below}), on all {config.continuations + config.top_up} "
        f"per arm after {config.top_up} more for both arms (`--top-up`: a two-stage test declared before any "
        f"continuation was seen, alpha {config.alpha} split in two, so retesting the near misses does not raise the "
        "error rate above it).")


def attempts_text(config: RunConfig, summary: dict[str, Any]) -> str:
    """Where the attempts came from: sampled here (K and the sampling), or made elsewhere (--attempts)."""
    if config.attempts:
        return (f"made elsewhere: {summary['attempts']} attempts at {summary['problems']} problems, from "
                f"`{config.attempts}` (graded here, or taken as incorrect where its `correct` column says so; none "
                "sampled by intgen)")
    return (f"K = {config.samples} per problem, sampled from the policy (temperature {config.temperature}, top_p "
            f"{config.top_p}, top_k {config.top_k}, max tokens {config.max_tokens}, seed {config.seed})")


def lift_text(lift: dict[str, Any] | None) -> str:
    if not lift:
        return ("\n\nNot measured in this run: no verified intervention has its original-step baseline (run verify "
                "with `--condition original-step`, and `--baselines every` for every intervention, not only each "
                "problem's matched one).")
    quartiles = " / ".join(f"{q:+.3f}" for q in lift["lift_quartiles"])
    bins = " | ".join(f"{k}: {v}" for k, v in lift["p_bins"].items())
    return (f"\n\nMeasured for {lift['interventions']} verified intervention(s): {lift['pass_paper_rule']} meet the "
            f"success threshold, {lift['p_at_most_threshold']} have p ≤ {lift['threshold']}"
            + (f" ({lift['topped_up']} topped up: their lift and p are of all their continuations)"
               if lift.get("topped_up") else "")
            + f"; lift quartiles (25% / median / 75%) {quartiles}; p-values by bin: {bins}.")


def empty_note(rows: dict[str, int]) -> str:
    empty = [name for name in CONFIGS if not rows[name]]
    return "" if not empty else (
        f"\n**Empty:** {', '.join(f'`{n}`' for n in empty)} (0 rows"
        + ("; no intervention was kept" if "sft" in empty else "")
        + "). An empty config cannot be loaded with `datasets.load_dataset`, so it is not listed above.\n")


def release_note(run: RunDir, sft_rows: int) -> str:
    """The files `--release-layout` wrote (intgen.dataset.release), when RUN/dataset/release/ holds them."""
    from intgen.dataset.release import DATA_FILE, DATASET_NAME, RELEASE

    if not (run.path / "dataset" / RELEASE / "dataset_info.json").is_file():
        return ""
    return (f"\n**The InT release's LLaMA-Factory layout** (`--release-layout`): `{RELEASE}/{DATA_FILE}` (the "
            f"{sft_rows} `sft` rows with `instruction` = the prompt's user message, `intervention_guided_attempt` = "
            "the completion, `problem`, `answer`, ...), "
            f"`{RELEASE}/dataset_info.json` (`dataset={DATASET_NAME}`, alpaca) and `{RELEASE}/README.md` (train "
            "without an end-of-turn token). They are in the exported folder only: `intgen push` uploads the "
            "configs' parquet files, this card and the report.\n")


def dataset_card(
    run: RunDir, config: RunConfig, rows: dict[str, int], files: dict[str, Path], summary: dict[str, Any],
    load_path: str,
) -> str:
    from intgen.grading import grader_version

    stages = run.manifest()["stages"]
    proposer = config.proposer_config()
    prompts = [config.prompt("solve"), *config.propose_prompts()]
    funnel_table = "| stage | count |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in funnel_rows(summary))
    usage = ("| stage | prompt tokens | completion tokens | prompt tokens from the server's prefix cache |\n"
             "|---|---|---|---|\n") + "\n".join(
        f"| {stage} | {p} | {c} | {cached} |" for stage, (p, c, cached) in summary["tokens_by_stage"].items()
    )
    return fill(
        resource_path("data_cards", config.card_template).read_text(encoding="utf-8"),
        empty_note=empty_note(rows), release_note=release_note(run, rows["sft"]),
        decontamination=card_decontamination(summary.get("decontamination")),
        engine_args=", ".join(f"`{k}={v}`" for k, v in sorted(config.vllm_args.items())) or "none",
        token_counts=", ".join(f"{name}: {stages[name].get('token_counts', 'n/a')}"
                               for name in MODEL_STAGES)
        + " (engine: counted by the engine per sample; tokenizer: counted with the model's tokenizer; estimated: the "
          "request's usage shared by text length)",
        table1=table1_markdown(summary["table1"]),
        keep_rule=keep_rule_text(config),
        lift=lift_text(summary.get("lift")),
        table1_selection=table1_selection(summary["table1"]),
        propose_for={"not-correct": "every attempt not graded correct (wrong, truncated or without a readable "
                     "answer), as the release", "incorrect": "the attempts graded wrong"}[config.propose_for],
        verified_per_attempt="every accepted proposal" if config.verify_all_proposals
        else "the first accepted proposal of each attempt (as the release)",
        yaml=card_front_matter(config, rows, files),
        title="intgen intervention dataset",
        intgen_version=__version__,
        min_success=str(config.min_success),
        continuations=str(config.continuations),
        rows_sft=str(rows["sft"]), rows_rl=str(rows["rl"]), rows_interventions=str(rows["interventions"]),
        rows_samples=str(rows["samples"]), rows_preference=str(rows["preference"]), rows_prm=str(rows["prm"]),
        preference_rule=PREFERENCE_RULE, prm_rule=PRM_RULE,
        load_path=load_path,
        problems=config.attempts or config.problems or "intgen's bundled example problems",
        attempts_from="given in the attempts file" if config.attempts else "the policy model's own",
        n_problems=str(summary["problems"]),
        policy=f"{stages['sample']['fingerprint']['backend']}: {stages['sample']['fingerprint']['model']} "
               + ("(verify stage; the attempts were made elsewhere)" if config.attempts
                  else "(sample and verify stages)"),
        proposer="the policy model (self-proposed)" if proposer is None
        else f"{stages['propose']['fingerprint']['backend']}: {stages['propose']['fingerprint']['model']}",
        attempts=attempts_text(config, summary),
        samples=str(config.samples), temperature=str(config.temperature), top_p=str(config.top_p),
        top_k=str(config.top_k), max_tokens=str(config.max_tokens), seed=str(config.seed),
        proposals=str(config.proposals), propose_style=config.propose_style, structured=str(config.structured).lower(),
        grader=f"{grader_version()} (per-item time limit {config.grade_timeout} s)",
        prompts=", ".join(p.label() for p in prompts),
        funnel=funnel_table,
        usage=usage,
    )
