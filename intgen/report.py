"""`intgen report`: one self-contained HTML file to look at a run — offline, no server, no CDN.

A dataset run's report has an overview (settings, the funnel, rejections, tokens, cost and time per stage),
Table 1, distributions, and a trace viewer: each proposal with the attempt's numbered steps, the located error
step highlighted, the proposer's verification, the intervention in place of that step, and the graded
continuations (and the baselines'). An eval run's report has pass@k curves and per-problem accuracy; several
eval runs are compared.

What stays small at scale: the page renders a compact index of every proposal up front; the long texts of each
problem (attempts, continuations) are stored gzip-compressed and base64-encoded, and decoded in the browser only
when a trace is opened. Math is typeset by KaTeX, shipped with the package (`intgen/assets/katex`) and inlined;
without it the LaTeX stays readable as text. Every text from a model or a dataset is put into the page as data
(JSON with `<` escaped, shown through `textContent`), never as markup.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl

from intgen.errors import UserError
from intgen.plan import MODEL_STAGES, STAGE_NAMES
from intgen.rundir import RunDir, atomic_write_text
from intgen.steps import split_steps, steps_at

ASSETS = Path(__file__).parent / "assets"
KATEX = ASSETS / "katex"
# The proposal index's columns: each row is a list in this order (compact at 10,000 proposals); the page reads the
# rows by these names (`summary["proposal_columns"]`), never by position.
PROPOSAL_COLUMNS = ("proposal_id", "problem_id", "status", "error_step", "num_steps", "success_rate", "intervention")
INDEX_TEXT_CHARS = 400  # of each intervention and problem, kept in the index for search and the list
# A real run has 32 continuations of ~7k tokens per prefix: far too much for one file. The report keeps every
# continuation's verdict, and the text of two of the intervention's (a correct and a wrong one where there are
# both) and one of each baseline's, cut to their start and their end (where the answer is). Attempts are kept
# whole (the steps view needs them).
TEXTS_KEPT = {"intervention": 2}
TEXTS_KEPT_BASELINE = 1
CONTINUATION_HEAD_CHARS, CONTINUATION_TAIL_CHARS = 500, 1500


class ReportError(UserError):
    """The run directory cannot be reported on; the message names it."""


# --- assembling the page --------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """The value with NaN and infinities as None (JSON has no NaN: `JSON.parse` would reject the page's data)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_for_html(value: Any) -> str:
    """JSON that is safe inside a <script> element: no `</script>`, no `<!--`, no NaN."""
    text = json.dumps(_finite(value), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c")


def _packed(value: Any) -> str:
    """gzip + base64 of the value's JSON: decoded in the browser with DecompressionStream when needed."""
    return base64.b64encode(gzip.compress(json.dumps(value, separators=(",", ":")).encode(), 9, mtime=0)).decode()


def katex_css() -> str:
    """KaTeX's stylesheet with its woff2 fonts inlined (the woff/ttf fallbacks dropped)."""
    css = (KATEX / "katex.min.css").read_text()

    def font(match: re.Match[str]) -> str:
        data = base64.b64encode((KATEX / "fonts" / match.group(1)).read_bytes()).decode()
        return f'src:url(data:font/woff2;base64,{data}) format("woff2")'

    return re.sub(r'src:url\(fonts/([\w-]+\.woff2)\) format\("woff2"\)(?:,url\([^)]*\) format\("[\w]+"\))*', font, css)


def render_page(summary: dict[str, Any], traces: dict[str, str]) -> str:
    """The HTML: the template with KaTeX, the summary and the packed traces put in (each once, by position)."""
    template = (ASSETS / "report.html").read_text()
    fills = {
        "KATEX_CSS": katex_css(),
        "KATEX_JS": (KATEX / "katex.min.js").read_text(),
        "APP_JS": (ASSETS / "report.js").read_text(),
        "TITLE": summary["title"].replace("&", "&amp;").replace("<", "&lt;"),
        "SUMMARY": _json_for_html(summary),
        "TRACES": _json_for_html(traces),
    }
    pieces = re.split(r"@@([A-Z_]+)@@", template)
    return "".join(fills[piece] if i % 2 else piece for i, piece in enumerate(pieces))


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the report of one dataset run, or of one or more eval runs; returns its path (default
    RUN_DIR/report.html)."""
    for path in run_dirs:
        if not (path / "manifest.json").is_file():
            raise ReportError(f"{path}: not a run directory (no manifest.json)")
    evals = [path for path in run_dirs if (path / "eval.json").is_file()]
    if evals and len(evals) != len(run_dirs):
        raise ReportError(f"{', '.join(str(p) for p in run_dirs if p not in evals)}: not an eval run (no eval.json); "
                          "give eval runs only, or one dataset run")
    if evals:
        summary, traces = eval_summary(run_dirs), {}
    elif len(run_dirs) != 1:
        raise ReportError("a report covers one dataset run (or several eval runs)")
    else:
        summary, traces = dataset_summary(RunDir(run_dirs[0]))
    out = out or run_dirs[0] / "report.html"
    atomic_write_text(out, render_page(summary, traces))
    return out


# --- a dataset run --------------------------------------------------------------------------------

def _table(run: RunDir, name: str) -> pl.DataFrame | None:
    from intgen.plan import STAGES

    schema = next((stage.writes[name] for stage in STAGES if name in stage.writes), None)
    return run.table(name, schema) if run.part_count(name) else None


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def settings_rows(manifest: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model stage: backend, model, sampling, prompt files and hashes, as fingerprinted in the manifest."""
    rows = []
    for stage in MODEL_STAGES:
        entry = manifest.get("stages", {}).get(stage) or {}
        fp = entry.get("fingerprint") or {}
        hashes = fp.get("prompts_sha256") or ([fp["prompt_sha256"]] if fp.get("prompt_sha256") else [])
        files = entry.get("prompt_files") or ([config.get("solve_prompt") or "solve.md"] if stage == "sample" else [])
        rows.append({"stage": stage, "backend": fp.get("backend"), "model": fp.get("model"),
                     "sampling": fp.get("sampling"), "prompts": [[str(f), h] for f, h in zip(files, hashes)]
                     or [["", h] for h in hashes], "other": {k: v for k, v in fp.items() if k not in (
                         "backend", "model", "sampling", "prompts_sha256", "prompt_sha256")}})
    return rows


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage in STAGE_NAMES:
        entry = manifest.get("stages", {}).get(stage) or {}
        calls = entry.get("calls") or {}
        rows.append({"stage": stage, "rows": entry.get("rows"), "requests": calls.get("requests_sent"),
                     "cache_hits": calls.get("cache_hits"), "prompt_tokens": calls.get("prompt_tokens"),
                     "cached_prompt_tokens": calls.get("cached_prompt_tokens"),
                     "completion_tokens": calls.get("completion_tokens"), "cost_usd": calls.get("cost_usd"),
                     "seconds": calls.get("seconds", entry.get("seconds")),
                     "failed": entry.get("failed_rows") or {}})
    return rows


def funnel_steps(funnel: dict[str, Any], proposals: pl.DataFrame | None) -> list[list[Any]]:
    parsed = 0 if proposals is None else proposals.filter(
        pl.col("error_step").is_not_null() & pl.col("intervention").is_not_null()).height
    return [["problems", funnel.get("problems")], ["attempts", funnel.get("attempts")],
            ["incorrect", funnel.get("incorrect")], ["proposals", funnel.get("proposals")], ["parsed", parsed],
            ["verified", funnel.get("verified")], ["kept", funnel.get("kept")]]


def dataset_summary(run: RunDir) -> tuple[dict[str, Any], dict[str, str]]:
    """(summary, traces): the summary is rendered up front; traces[problem_id] is that problem's packed texts."""
    from intgen.dataset.export import require_current_export

    analysis = run.read_json("analysis.json")
    if analysis is None:
        raise ReportError(f"{run.path}: no analysis.json (the run has not finished: run `intgen build-dataset` "
                          "or `intgen export` first)")
    require_current_export(run, "writing its report")  # what it shows follows the stages as they are now
    manifest, config = run.manifest(), run.read_json("config.json") or {}
    problems = _table(run, "problems")
    graded = _table(run, "graded")
    proposals = _table(run, "proposals")
    verify = _table(run, "verify")
    continuations = _table(run, "continuations")
    if problems is None or graded is None:
        raise ReportError(f"{run.path}: no problems or graded attempts to report on")
    funnel = analysis.get("funnel", {})
    summary: dict[str, Any] = {
        "kind": "dataset", "title": run.path.resolve().name, "intgen_version": manifest.get("intgen_version"),
        "settings": settings_rows(manifest, config), "stages": stage_rows(manifest),
        "funnel": funnel_steps(funnel, proposals), "rejected": funnel.get("rejected") or {},
        "failed": funnel.get("failed") or {}, "cost_usd": funnel.get("cost_usd"),
        "table1": analysis.get("table1") or {"conditions": {}}, "keep_rule": funnel.get("keep_rule"),
        "attempt_tokens": _numbers(graded["completion_tokens"].to_list()),
    }
    sources = dict(zip(problems["problem_id"], problems["source"].fill_null("")))
    summary["problems"] = {pid: {"source": sources[pid], "text": text[:INDEX_TEXT_CHARS]}
                           for pid, text in zip(problems["problem_id"], problems["problem"])}
    index, dists = proposal_index(proposals, verify)
    summary["proposals"], summary["distributions"] = index, dists
    summary["proposal_columns"] = list(PROPOSAL_COLUMNS)
    summary["distributions"]["attempt_tokens"] = summary.pop("attempt_tokens")
    summary["configs"] = dataset_configs(run)
    return summary, pack_traces(problems, graded, proposals, verify, continuations)


def dataset_configs(run: RunDir) -> list[list[Any]]:
    """[config, rows, what its rows are] for each config of RUN/dataset (a run written by other means may
    have none)."""
    from intgen.dataset.export import CONFIG_DEFINITIONS, config_rows

    return [[name, rows, CONFIG_DEFINITIONS[name]] for name, rows in config_rows(run.path / "dataset").items()]


def proposal_index(proposals: pl.DataFrame | None,
                   verify: pl.DataFrame | None) -> tuple[list[list[Any]], dict[str, list[float]]]:
    """One compact row per proposal (id, problem, kept, reason, error step, steps, success rate, intervention),
    and the distributions: error step (absolute and relative), success rate per kept intervention,
    intervention length in tokens (≈ characters / 4: the run keeps no tokenizer)."""
    dists: dict[str, list[float]] = {"error_step": [], "error_position": [], "kept_success_rate": [],
                                     "intervention_tokens": [], "lift": [], "lift_p": []}
    if proposals is None:
        return [], dists
    verdicts = {}
    if verify is not None:
        own = verify.filter(pl.col("condition") == "intervention")
        verdicts = {pid: (rate, kept) for pid, rate, kept in zip(own["proposal_id"], own["success_rate"], own["kept"])}
        if "lift_p" in own.columns:  # each verified intervention against its own original-step baseline
            measured = own.filter(pl.col("error").is_null() & pl.col("lift_p").is_not_null())
            dists["lift"], dists["lift_p"] = measured["lift"].to_list(), measured["lift_p"].to_list()
    rows = []
    for p in proposals.iter_rows(named=True):
        rate, kept = verdicts.get(p["proposal_id"], (None, None))
        status = "kept" if kept else (p["reject_reason"] or ("not kept" if kept is not None else "not verified"))
        row = p | {"status": status, "success_rate": rate, "intervention": (p["intervention"] or "")[:INDEX_TEXT_CHARS]}
        rows.append([row[name] for name in PROPOSAL_COLUMNS])
        if p["error_step"] is not None and p["num_steps"]:
            dists["error_step"].append(p["error_step"])
            dists["error_position"].append(p["error_step"] / p["num_steps"])
        if p["intervention"]:
            dists["intervention_tokens"].append(round(len(p["intervention"]) / 4))
        if kept and rate is not None:
            dists["kept_success_rate"].append(rate)
    return rows, dists


def utf16_ends(text: str, ends: list[int] | None) -> list[int]:
    """The proposal's step ends (as the proposer saw the steps) in the browser's string offsets (UTF-16 code
    units): the page slices the attempt's text instead of storing it again per proposal."""
    steps = steps_at(text, ends) if ends else split_steps(text)
    out, total = [], 0
    for step in steps:
        total += len(step.encode("utf-16-le")) // 2
        out.append(total)
    return out


def keep_some_texts(continuations: list[dict[str, Any]], keep: int) -> None:
    """Keep the (cut) text of `keep` continuations — the first correct and the first wrong one, then the next
    ones in order — and drop the others' texts (their verdicts stay)."""
    chosen = [next((i for i, c in enumerate(continuations) if c["correct"] is want), None) for want in (True, False)]
    chosen = [i for i in chosen if i is not None]
    chosen += [i for i in range(len(continuations)) if i not in chosen]
    for rank, i in enumerate(chosen):
        text = continuations[i]["text"]
        continuations[i]["text"] = cut(text) if rank < keep else None


def cut(text: str, head: int = CONTINUATION_HEAD_CHARS, tail: int = CONTINUATION_TAIL_CHARS) -> str:
    """The text, or its start and end with how much was left out between them."""
    if len(text) <= head + tail + 200:
        return text
    return f"{text[:head]}\n[… {len(text) - head - tail:,} characters not shown: the run's continuations table has " \
           f"the whole text …]\n{text[-tail:]}"


def pack_traces(problems: pl.DataFrame, graded: pl.DataFrame, proposals: pl.DataFrame | None,
                verify: pl.DataFrame | None, continuations: pl.DataFrame | None) -> dict[str, str]:
    """Per problem, packed: its text, answer and reference; its attempts (pass/fail and text); each proposal's
    steps, verification and intervention; the continuations of every prefix (the intervention's and the
    baselines'), with their graded answers."""
    traces: dict[str, dict[str, Any]] = {}
    for row in problems.iter_rows(named=True):
        traces[row["problem_id"]] = {"problem": row["problem"], "answer": row["answer"], "solution": row["solution"],
                                     "source": row["source"], "attempts": [], "proposals": {}, "prefixes": {}}
    attempt_text = {}
    for a in graded.sort("problem_id", "sample_index").iter_rows(named=True):
        attempt_text[a["attempt_id"]] = a["text"] or ""
        if a["problem_id"] not in traces:  # tables out of step (a problem file changed): shown where it can be
            continue
        traces[a["problem_id"]]["attempts"].append({
            "id": a["attempt_id"], "correct": a["correct"], "predicted": a["predicted"], "reason": a["grade_reason"],
            "truncated": a["truncated"], "tokens": a["completion_tokens"], "text": a["text"] or ""})
    prefixes: dict[tuple[str, str, int | None], list[list[Any]]] = {}
    if verify is not None:
        for v in verify.iter_rows(named=True):
            trace = traces.get(v["problem_id"])
            if trace is None:
                continue
            trace["prefixes"][v["prefix_id"]] = {"condition": v["condition"], "successes": v["successes"],
                                                 "continuations": v["continuations"], "rate": v["success_rate"],
                                                 "texts": []}
            if v["condition"] != "intervention":
                key = (v["attempt_id"] if v["condition"] != "problem-only" else "", v["condition"],
                       v["error_step"] if v["condition"] != "problem-only" else None)
                prefixes.setdefault((v["problem_id"],) + key, []).append(v["prefix_id"])
    if continuations is not None:
        order = pl.col("continuation_id").str.extract(r"/c(\d+)$").cast(pl.Int64)  # c2 before c10
        for c in continuations.sort("prefix_id", order).iter_rows(named=True):
            prefix = traces.get(c["problem_id"], {}).get("prefixes", {}).get(c["prefix_id"])
            if prefix is not None:
                prefix["texts"].append({"text": c["text"] or "", "predicted": c["predicted"], "correct": c["correct"],
                                        "finish": c["finish_reason"], "error": c["error"],
                                        "top_up": bool(c["top_up"])})  # --top-up's: not in the first M's count
        for trace in traces.values():
            for prefix in trace["prefixes"].values():
                keep_some_texts(prefix["texts"], TEXTS_KEPT.get(prefix["condition"], TEXTS_KEPT_BASELINE))
    if proposals is not None:
        own = {} if verify is None else dict(zip(*verify.filter(pl.col("condition") == "intervention")
                                                 .select("proposal_id", "prefix_id").get_columns()))
        for p in proposals.iter_rows(named=True):
            if p["problem_id"] not in traces:
                continue
            step = p["error_step"]
            baselines = [pid for condition in ("original-step", "resample-step")
                         for pid in prefixes.get((p["problem_id"], p["attempt_id"], condition, step), [])]
            baselines += prefixes.get((p["problem_id"], "", "problem-only", None), [])
            traces[p["problem_id"]]["proposals"][p["proposal_id"]] = {
                "attempt": p["attempt_id"], "ends": utf16_ends(attempt_text.get(p["attempt_id"], ""), p["step_ends"]),
                "error_step": step, "verification": p["verification"], "intervention": p["intervention"],
                "accepted": p["accepted"], "reject_reason": p["reject_reason"], "raw": p["raw"],
                "error": p["error"], "prefix": own.get(p["proposal_id"]), "baselines": baselines}
    return {pid: _packed(trace) for pid, trace in traces.items()}


# --- eval runs ------------------------------------------------------------------------------------

def eval_summary(run_dirs: list[Path]) -> dict[str, Any]:
    """Each run's protocol and metrics (pass@k curve, avg, maj), its per-problem accuracy, and for two or
    more runs the comparison on the problems they share."""
    from intgen.evals.metrics import compare

    runs, tables = [], {}
    for index, path in enumerate(run_dirs):
        report = RunDir(path).read_json("eval.json")
        graded = RunDir(path).table("graded")
        name = path.resolve().name
        name = name if name not in tables else f"{name}#{index + 1}"
        tables[name] = graded
        per_problem = graded.group_by("problem_id", maintain_order=True).agg(
            pl.len().alias("attempts"), (pl.col("correct") == True).sum().alias("correct"))  # noqa: E712
        pass_at = {int(k.split("@")[1]): v for k, v in report.items() if k.startswith("pass@")}
        runs.append({"name": name, "protocol": report.get("protocol", {}), "problems": report.get("problems"),
                     "metrics": {k: v for k, v in report.items() if "@" in k or k in ("ungradable", "truncated")},
                     "ci95": report.get("ci95", {}), "pass_at": sorted(pass_at.items()),
                     "per_problem": [list(r) for r in per_problem.iter_rows()]})
    comparison = compare(tables) if len(tables) > 1 else None
    title = " vs ".join(tables) if len(tables) > 1 else next(iter(tables))
    return {"kind": "eval", "title": title, "runs": runs, "comparison": comparison}
