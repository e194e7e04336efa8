// intgen report: renders the summary up front and each problem's packed trace when it is opened.
// Every text from a model or a dataset goes in through textContent (or KaTeX), never as markup.
"use strict";

const SUMMARY = JSON.parse(document.getElementById("summary").textContent);
const PACKED = JSON.parse(document.getElementById("traces-data").textContent);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

const fmt = (v, digits = 0) => (v === null || v === undefined ? "n/a" : typeof v === "number" ? v.toLocaleString(undefined, {maximumFractionDigits: digits}) : String(v));
const pct = (v) => (v === null || v === undefined ? "n/a" : (100 * v).toFixed(2) + "%");

// --- math: $...$ (pandoc's rule, so "$2 and $3" stays currency), $$...$$, \(...\), \[...\] ---------------
const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$(?=\S)((?:[^$\\\n]|\\.)*?[^\s\\])\$(?!\d)/g;

function typeset(root) {
  if (typeof katex === "undefined") return;  // no KaTeX: the LaTeX stays as readable text
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const nodes = [];
  while (walker.nextNode()) if (walker.currentNode.nodeValue.match(/[$\\]/)) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const text = node.nodeValue;
    const out = document.createDocumentFragment();
    let last = 0;
    for (const m of text.matchAll(MATH)) {
      const display = m[1] !== undefined || m[2] !== undefined;
      const tex = m[1] ?? m[2] ?? m[3] ?? m[4];
      const span = el("span", {class: "math"});
      try {
        katex.render(tex, span, {displayMode: display, throwOnError: true, trust: false, strict: "ignore"});
      } catch (e) {
        continue;  // not valid LaTeX: left as it was written
      }
      out.append(text.slice(last, m.index), span);
      last = m.index + m[0].length;
    }
    if (last === 0) continue;
    out.append(text.slice(last));
    node.replaceWith(out);
  }
}

// --- charts -----------------------------------------------------------------------------------------
function barChart(items, {width = 560, color = "bar", format = fmt} = {}) {
  const row = 22, left = 170, max = Math.max(1, ...items.map(([, v]) => v || 0));
  const box = svg("svg", {viewBox: `0 0 ${width} ${items.length * row + 4}`, role: "img"});
  items.forEach(([label, value], i) => {
    const w = ((value || 0) / max) * (width - left - 70);
    box.append(svg("text", {x: left - 8, y: i * row + 15, "text-anchor": "end"}, label));
    box.append(svg("rect", {x: left, y: i * row + 3, width: Math.max(w, 1), height: row - 7, class: color}));
    box.append(svg("text", {x: left + w + 6, y: i * row + 15}, format(value)));
  });
  return el("div", {class: "chart"}, box);
}

const least = (values) => values.reduce((a, b) => (b < a ? b : a), Infinity);  // no spread: 400k values overflow it
const most = (values) => values.reduce((a, b) => (b > a ? b : a), -Infinity);

function histogram(values, {bins = 20, integer = false, label = ""} = {}) {
  if (!values.length) return el("p", {class: "muted"}, "no values");
  let lo = least(values), hi = most(values);
  if (integer) { lo = Math.floor(lo); hi = Math.ceil(hi); bins = Math.min(bins, hi - lo + 1); }
  if (hi === lo) hi = lo + 1;
  const step = (hi - lo) / bins, counts = new Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / step))]++;
  const width = 560, height = 150, top = 10, bottom = 30, max = most(counts);
  const box = svg("svg", {viewBox: `0 0 ${width} ${height + bottom}`, role: "img"});
  const bw = (width - 40) / bins;
  counts.forEach((c, i) => {
    const h = (c / max) * (height - top);
    const rect = svg("rect", {x: 40 + i * bw + 1, y: height - h, width: Math.max(bw - 2, 1), height: h, class: "bar"});
    rect.append(svg("title", {}, `${fmt(lo + i * step, 2)}–${fmt(lo + (i + 1) * step, 2)}: ${c}`));
    box.append(rect);
  });
  box.append(svg("text", {x: 40, y: height + 14}, fmt(lo, 2)));
  box.append(svg("text", {x: width, y: height + 14, "text-anchor": "end"}, fmt(hi, 2)));
  box.append(svg("text", {x: 36, y: top + 4, "text-anchor": "end"}, String(max)));
  box.append(svg("text", {x: width / 2, y: height + 28, "text-anchor": "middle", class: "muted"}, `${label} (n=${values.length})`));
  return el("div", {class: "chart"}, box);
}

function intervalChart(rows) {  // [label, value, [low, high] | null] with values in [0, max]
  const row = 26, left = 150, width = 560, max = Math.max(1e-9, ...rows.flatMap(([, v, ci]) => [v || 0, ...(ci || []).filter((x) => x !== null)]));
  const box = svg("svg", {viewBox: `0 0 ${width} ${rows.length * row + 4}`, role: "img"});
  const x = (v) => left + (v / max) * (width - left - 80);
  rows.forEach(([label, value, ci], i) => {
    box.append(svg("text", {x: left - 8, y: i * row + 16, "text-anchor": "end"}, label));
    box.append(svg("rect", {x: left, y: i * row + 5, width: Math.max(x(value || 0) - left, 1), height: row - 12, class: "bar"}));
    if (ci && ci[0] !== null && ci[1] !== null) {
      box.append(svg("line", {x1: x(ci[0]), x2: x(ci[1]), y1: i * row + 11, y2: i * row + 11, stroke: "#1d2330", "stroke-width": 1.5}));
    }
    box.append(svg("text", {x: x(Math.max(value || 0, ci && ci[1] !== null ? ci[1] : 0)) + 6, y: i * row + 16}, pct(value)));
  });
  return el("div", {class: "chart"}, box);
}

function lineChart(series) {  // [{name, points: [[k, value]]}]
  const width = 560, height = 220, left = 44, bottom = 30;
  const ks = [...new Set(series.flatMap((s) => s.points.map(([k]) => k)))].sort((a, b) => a - b);
  const box = svg("svg", {viewBox: `0 0 ${width} ${height + bottom}`, role: "img"});
  const x = (k) => left + (ks.length < 2 ? 0 : (Math.log2(k) - Math.log2(ks[0])) / (Math.log2(ks[ks.length - 1]) - Math.log2(ks[0]))) * (width - left - 20);
  const y = (v) => height - v * (height - 10);
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    box.append(svg("line", {x1: left, x2: width - 20, y1: y(t), y2: y(t), class: "tick"}));
    box.append(svg("text", {x: left - 6, y: y(t) + 4, "text-anchor": "end"}, `${t * 100}%`));
  }
  for (const k of ks) box.append(svg("text", {x: x(k), y: height + 16, "text-anchor": "middle"}, `k=${k}`));
  const colors = ["#3454d1", "#c4320a", "#1a7f37", "#b54708", "#6941c6"];
  series.forEach((s, i) => {
    const d = s.points.map(([k, v], j) => `${j ? "L" : "M"}${x(k)},${y(v)}`).join(" ");
    box.append(svg("path", {d, fill: "none", stroke: colors[i % colors.length], "stroke-width": 2}));
    for (const [k, v] of s.points) box.append(svg("circle", {cx: x(k), cy: y(v), r: 3, fill: colors[i % colors.length]}));
    box.append(svg("text", {x: left + 8, y: 16 + 14 * i, fill: colors[i % colors.length]}, s.name));
  });
  return el("div", {class: "chart"}, box);
}

function table(head, rows, numeric = []) {
  return el("table", {},
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", {class: numeric.includes(i) ? "num" : null}, h)))),
    el("tbody", {}, rows.map((r) => el("tr", {}, r.map((c, i) => el("td", {class: numeric.includes(i) ? "num" : null}, c))))));
}

// --- a dataset run ------------------------------------------------------------------------------------
function overview() {
  const s = SUMMARY;
  const settings = table(["stage", "backend", "model", "sampling", "prompts (sha256)", "other"], s.settings.map((r) => [
    r.stage, r.backend || "", r.model || "",
    r.sampling ? Object.entries(r.sampling).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") : "",
    el("span", {class: "mono"}, r.prompts.map(([f, h]) => `${f} ${h.slice(0, 12)}`).join("; ")),
    el("span", {class: "mono"}, Object.entries(r.other).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ")),
  ]));
  const stages = table(["stage", "rows", "requests", "cache hits", "prompt tokens", "of them from the server's prefix cache", "completion tokens", "cost", "seconds", "failed"],
    s.stages.map((r) => [r.stage, fmt(r.rows), fmt(r.requests), fmt(r.cache_hits), fmt(r.prompt_tokens), fmt(r.cached_prompt_tokens), fmt(r.completion_tokens),
      r.cost_usd === null || r.cost_usd === undefined ? "n/a" : "$" + r.cost_usd.toFixed(4), fmt(r.seconds, 1),
      Object.entries(r.failed).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"]), [1, 2, 3, 4, 5, 6, 7, 8]);
  const rejected = Object.entries(s.rejected).sort((a, b) => b[1] - a[1]);
  return el("section", {id: "overview"}, el("h2", {}, "Overview"),
    el("h3", {}, "Settings"), settings,
    el("div", {class: "grid"},
      el("div", {}, el("h3", {}, "Funnel"), barChart(s.funnel, {})),
      el("div", {}, el("h3", {}, "Rejections by reason"), rejected.length ? barChart(rejected, {}) : el("p", {class: "muted"}, "none"))),
    el("h3", {}, "Tokens, cost and time per stage"), stages,
    s.configs ? el("h3", {}, "Dataset configs") : null,
    s.configs ? el("div", {id: "configs"}, table(["config", "rows", "what a row is"], s.configs.map(([name, rows, rule]) => [
      el("span", {class: "mono"}, name), fmt(rows), rule]), [1])) : null);
}

function table1() {
  const t = SUMMARY.table1, conditions = Object.entries(t.conditions || {});
  const ratio = (vs, key) => (!vs ? "" : (vs[key] === null ? "n/a" : vs[key].toFixed(2) + "x") +
    (vs[key + "_ci95"] ? ` [${vs[key + "_ci95"].map((v) => (v === null ? "n/a" : v.toFixed(2))).join(", ")}]` : ""));
  const rows = conditions.map(([name, r]) => [name, `${r.solved}/${r.problems}`, pct(r.solved / Math.max(r.problems, 1)), pct(r.mean_accuracy),
    `${r.correct}/${r.continuations}`, ratio(r.vs_original_step, "solved_ratio"), ratio(r.vs_original_step, "accuracy_ratio")]);
  const left = Object.entries(t.left_out || {}).filter(([, v]) => v).map(([k, v]) => `${v} for ${k.replace(/_/g, " ")}`);
  const units = t.units || [];
  const unitList = units.length ? el("details", {id: "table1-units"},
    el("summary", {}, `Which proposal stood for each problem (${units.length})`),
    el("ul", {}, units.map((u) => el("li", {}, el("a", {href: "#p=" + encodeURIComponent(u.proposal_id)}, u.proposal_id),
      ` · error step ${u.error_step}`)))) : null;
  return el("section", {id: "table1"}, el("h2", {}, "Table 1 (per problem, as the paper counts it)"),
    t.selection ? el("p", {class: "muted", id: "table1-rule"}, `Counted on a matched set at equal budgets: ${t.selection}. ` +
      `M = ${fmt(t.continuations_per_condition)} continuations per condition and problem; ${fmt(t.problems)} problems` +
      (left.length ? `; left out: ${left.join(", ")}.` : ".")) : null,
    conditions.length ? el("div", {class: "grid"},
      el("div", {}, el("h3", {}, "Problems solved (≥ 1 correct continuation)"), intervalChart(conditions.map(([n, r]) => [n, r.solved / Math.max(r.problems, 1), null]))),
      el("div", {}, el("h3", {}, "Mean accuracy (mean over problems)"), intervalChart(conditions.map(([n, r]) => [n, r.mean_accuracy, null])))) : null,
    table(["condition", "solved / problems", "solved", "mean accuracy", "correct / continuations", "solved vs original-step [95% CI]", "accuracy vs original-step [95% CI]"], rows, [1, 2, 3, 4]),
    el("p", {class: "muted"}, `Intervals: bootstrap over problems (${fmt(t.bootstrap_resamples)} resamples, seed ${fmt(t.seed)}).`),
    unitList);
}

function distributions() {
  const d = SUMMARY.distributions;
  return el("section", {id: "distributions"}, el("h2", {}, "Distributions"), el("div", {class: "grid"},
    el("div", {}, el("h3", {}, "First error: step"), histogram(d.error_step, {integer: true, label: "error step"})),
    el("div", {}, el("h3", {}, "First error: position in the attempt"), histogram(d.error_position, {bins: 10, label: "error step / steps"})),
    el("div", {}, el("h3", {}, "Success rate per kept intervention"), histogram(d.kept_success_rate, {bins: 10, label: "correct continuations / continuations"})),
    el("div", {}, el("h3", {}, "Intervention length"), histogram(d.intervention_tokens, {label: "tokens (≈ characters / 4)"})),
    el("div", {}, el("h3", {}, "Attempt length"), histogram(d.attempt_tokens, {label: "completion tokens"})),
    ...(d.lift && d.lift.length ? [
      el("div", {}, el("h3", {}, "Lift over the intervention's own original-step baseline"), histogram(d.lift, {bins: 10, label: "success rate − the original step's"})),
      el("div", {}, el("h3", {}, "Lift: one-sided Fisher exact p"), histogram(d.lift_p, {bins: 10, label: "p (intervention no better than its original step)"}))] : [])),
    el("p", {class: "muted"}, keepRule(SUMMARY.keep_rule)));
}

function keepRule(rule) {
  if (!rule || !rule.rule) return "Kept: at least --min-success correct continuations (the paper's rule).";
  const paper = `at least ${fmt(rule.min_success)} correct continuation(s)`;
  if (rule.rule === "lift" && rule.top_up)
    return `Kept: ${paper} and a one-sided Fisher exact p against the intervention's own original-step baseline of at most ${fmt(rule.alpha / 2, 4)}, ` +
      `on the first M per arm or, where that p was borderline (above ${fmt(rule.alpha / 2, 4)}, at most ${fmt(rule.top_up_below, 4)}), on all of them after ${fmt(rule.top_up)} more per arm (--top-up: alpha ${fmt(rule.alpha, 4)} split over two looks).`;
  return rule.rule === "lift" ? `Kept: ${paper} and a one-sided Fisher exact p against the intervention's own original-step baseline of at most ${fmt(rule.alpha, 4)} (--keep-rule lift).`
    : `Kept: ${paper} (the paper's rule; --keep-rule paper).`;
}

// the proposal index's rows are lists; their columns are named by SUMMARY.proposal_columns (report.py)
const column = (name) => SUMMARY.proposal_columns.indexOf(name);
const field = (p, name) => p[column(name)];
const statusOf = (p) => field(p, "status");
function tracesSection() {
  const proposals = SUMMARY.proposals, problems = SUMMARY.problems;
  const reasons = [...new Set(proposals.map(statusOf))].sort();
  const sources = [...new Set(Object.values(problems).map((p) => p.source))].sort();
  const status = el("select", {id: "f-status"}, el("option", {value: ""}, "all proposals"), reasons.map((r) => el("option", {value: r}, r)));
  const problem = el("select", {id: "f-problem"}, el("option", {value: ""}, "all problems"), Object.keys(problems).map((p) => el("option", {value: p}, p)));
  const source = el("select", {id: "f-source"}, el("option", {value: ""}, "all sources"), sources.map((s) => el("option", {value: "source:" + s}, s || "(none)")));
  const search = el("input", {id: "f-search", type: "search", placeholder: "search problems and interventions"});
  const count = el("span", {id: "f-count", class: "muted"});
  const list = el("div", {id: "trace-list"});
  const rows = proposals.map((p) => {
    const [id, pid, st, step, steps, rate, interv] = ["proposal_id", "problem_id", "status", "error_step", "num_steps",
      "success_rate", "intervention"].map((name) => field(p, name));
    const row = el("a", {class: "trace-row", href: "#p=" + encodeURIComponent(id), dataset: {id, status: st}},
      el("span", {class: "id"}, id), " ", el("span", {class: "badge " + (st === "kept" ? "kept" : "rejected")}, st),
      el("div", {class: "snippet"}, `${pid} · step ${step ?? "–"}/${steps ?? "–"} · ${rate === null ? "" : pct(rate) + " · "}${interv}`));
    row._haystack = (id + " " + pid + " " + interv + " " + (problems[pid] ? problems[pid].text : "")).toLowerCase();
    row._problem = pid;
    row._source = problems[pid] ? problems[pid].source : "";
    return row;
  });
  list.append(...rows);
  function apply() {
    const q = search.value.trim().toLowerCase();
    let shown = 0;
    for (const row of rows) {
      const visible = (!status.value || row.dataset.status === status.value) && (!problem.value || row._problem === problem.value)
        && (!source.value || "source:" + row._source === source.value) && (!q || row._haystack.includes(q));
      row.hidden = !visible;
      shown += visible;
    }
    count.textContent = `${shown} of ${rows.length} proposals shown`;
  }
  for (const control of [status, problem, source]) control.addEventListener("change", apply);
  search.addEventListener("input", apply);
  apply();
  return el("section", {id: "trace-viewer"}, el("h2", {}, "Traces"),
    el("div", {id: "filters"}, status, problem, source, search, count),
    el("div", {id: "traces"}, list, el("div", {id: "detail"})));
}

const loaded = new Map();
async function traceOf(problemId) {
  if (!loaded.has(problemId)) {
    const bytes = Uint8Array.from(atob(PACKED[problemId]), (c) => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    loaded.set(problemId, JSON.parse(await new Response(stream).text()));
  }
  return loaded.get(problemId);
}

function continuationsView(prefix) {
  if (!prefix) return el("p", {class: "muted"}, "not verified");
  const more = prefix.texts.filter((c) => c.top_up);
  const moreCorrect = more.filter((c) => c.correct === true).length;
  return el("div", {}, el("p", {}, `${prefix.condition}: ${prefix.successes}/${prefix.continuations} correct (${pct(prefix.rate)})` +
      (more.length ? `; --top-up: ${moreCorrect}/${more.length} more` : "")),
    prefix.texts.map((c, i) => el("details", {class: "cont " + (c.correct === true ? "ok" : c.correct === false ? "bad" : "")},
      el("summary", {}, `${c.top_up ? "top-up " : ""}continuation ${i + 1}: ${c.correct === true ? "correct" : c.correct === false ? "wrong" : "ungradable"}` +
        ` · answer ${c.predicted ?? "none"} · ${c.finish ?? ""}${c.error ? " · " + c.error : ""}`),
      el("div", {class: "text" + (c.text === null ? " muted" : "")}, c.text ?? "(text not in the report: the run's continuations table has it)"))));
}

let shown = 0;  // the latest proposal asked for: a slower, earlier load must not overwrite it
async function showProposal(id) {
  const ticket = ++shown;
  const detail = document.getElementById("detail");
  const entry = SUMMARY.proposals.find((p) => field(p, "proposal_id") === id);
  for (const row of document.querySelectorAll(".trace-row.selected")) row.classList.remove("selected");
  if (!entry) { detail.replaceChildren(el("p", {class: "muted"}, `no proposal ${id} in this run`)); return; }
  const selected = document.querySelector(`.trace-row[data-id="${CSS.escape(id)}"]`);
  if (selected) { selected.classList.add("selected"); selected.scrollIntoView({block: "nearest"}); }
  const trace = await traceOf(field(entry, "problem_id"));
  if (ticket !== shown) return;
  const p = trace.proposals[id];
  const attempt = trace.attempts.find((a) => a.id === p.attempt);
  const strip = el("div", {class: "strip", title: "attempts: green correct, red wrong, grey ungradable"},
    trace.attempts.map((a) => el("span", {class: a.correct === true ? "pass" : a.correct === false ? "fail" : "none",
      title: `${a.id}: ${a.correct === true ? "correct" : a.correct === false ? "wrong" : "ungradable (" + a.reason + ")"}, answer ${a.predicted ?? "none"}`,
      style: a.id === p.attempt ? "outline: 2px solid #1d2330" : null})));
  const attemptText = attempt ? attempt.text : "";
  const stepTexts = p.ends.map((end, i) => attemptText.slice(i ? p.ends[i - 1] : 0, end));
  const steps = stepTexts.map((text, i) => {
    const n = i + 1, kind = n === p.error_step ? "error" : p.error_step && n > p.error_step ? "after" : "";
    const node = el("div", {class: "step " + kind, dataset: {step: n, text}}, el("span", {class: "n"}, `step ${n}` + (kind === "error" ? " · first error" : "")), el("span", {class: "body"}, text.trimEnd()));
    if (kind === "error" && p.intervention) {
      return [node, el("div", {class: "step fix", id: "intervention"}, el("span", {class: "n"}, `intervention · replaces step ${n}`), el("span", {class: "body"}, p.intervention))];
    }
    return node;
  });
  const baselines = p.baselines.map((pid) => trace.prefixes[pid]).filter(Boolean);
  detail.replaceChildren(el("div", {},
    el("h3", {}, `Proposal ${id} `, el("span", {class: "badge " + (statusOf(entry) === "kept" ? "kept" : "rejected")}, statusOf(entry))),
    el("p", {}, el("a", {href: "#p=" + encodeURIComponent(id)}, "link to this proposal"), ` · problem ${field(entry, "problem_id")} · ${trace.source || ""}`),
    el("h3", {}, "Problem"), el("div", {class: "text"}, trace.problem),
    el("p", {}, "Answer: ", el("span", {class: "text"}, trace.answer ?? "")),
    el("details", {}, el("summary", {}, "Reference solution"), el("div", {class: "text"}, trace.solution || "(none)")),
    el("h3", {}, `Attempts (${trace.attempts.length})`), strip,
    attempt ? el("p", {class: "muted"}, `this attempt: answer ${attempt.predicted ?? "none"}, ${attempt.tokens ?? "?"} tokens${attempt.truncated ? ", truncated" : ""}`) : null,
    el("h3", {}, "Verification (the proposer's)"), el("div", {class: "text"}, p.verification || "(none)"),
    p.error ? el("p", {class: "muted"}, "call error: " + p.error) : null,
    p.reject_reason ? el("p", {}, "rejected: " + p.reject_reason) : null,
    el("h3", {}, `Attempt, in steps (${stepTexts.length})`), el("div", {id: "steps"}, steps),
    el("h3", {}, "Continuations from the intervention"), continuationsView(trace.prefixes[p.prefix]),
    baselines.length ? el("details", {}, el("summary", {}, `Baselines (${baselines.length})`), baselines.map(continuationsView)) : null,
    el("details", {}, el("summary", {}, "Proposer's raw reply"), el("div", {class: "text mono"}, p.raw || ""))));
  typeset(detail);
}

// --- eval runs ----------------------------------------------------------------------------------------
function evalView() {
  const s = SUMMARY;
  const runs = s.runs;
  const metrics = [...new Set(runs.flatMap((r) => Object.keys(r.metrics)))];
  const metricTable = table(["run", "problems", ...metrics], runs.map((r) => [r.name, fmt(r.problems), ...metrics.map((m) =>
    r.metrics[m] === undefined ? "" : pct(r.metrics[m]) + (r.ci95[m] ? ` [${pct(r.ci95[m][0])}, ${pct(r.ci95[m][1])}]` : ""))]), [1]);
  const protocol = table(["run", "protocol"], runs.map((r) => [r.name, el("span", {class: "mono"},
    Object.entries(r.protocol).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", "))]));
  const problems = [...new Set(runs.flatMap((r) => r.per_problem.map((p) => p[0])))];
  const byRun = runs.map((r) => new Map(r.per_problem.map(([pid, n, c]) => [pid, [c, n]])));
  const perProblem = table(["problem", ...runs.map((r) => r.name)], problems.map((pid) => [pid, ...byRun.map((m) => {
    const v = m.get(pid);
    return v ? `${v[0]}/${v[1]} (${pct(v[0] / v[1])})` : "";
  })]), runs.map((_, i) => i + 1));
  const parts = [el("section", {id: "overview"}, el("h2", {}, "Evaluation"), metricTable, el("h3", {}, "Protocol"), protocol),
    el("section", {id: "passk"}, el("h2", {}, "pass@k"), lineChart(runs.map((r) => ({name: r.name, points: r.pass_at}))))];
  if (s.comparison) {
    const c = s.comparison, base = runs[0].name;
    parts.push(el("section", {id: "comparison"}, el("h2", {}, `Comparison on ${c.problems} shared problems (differences to ${base}, 95% paired bootstrap)`),
      table(["run", "avg accuracy", "difference", "solved only here", `solved only by ${base}`], Object.entries(c.runs).map(([name, e]) => [
        name, pct(e.avg), e.difference_ci95 ? `${(100 * e.difference).toFixed(2)} pts [${(100 * e.difference_ci95[0]).toFixed(2)}, ${(100 * e.difference_ci95[1]).toFixed(2)}]` : "",
        (e.solved_only_here || []).join(", "), (e[`solved_only_by_${base}`] || []).join(", ")]))));
  }
  parts.push(el("section", {id: "problems"}, el("h2", {}, "Per problem (correct / attempts)"), perProblem));
  return parts;
}

// --- page ---------------------------------------------------------------------------------------------
function start() {
  const main = document.getElementById("main"), nav = document.getElementById("nav");
  document.getElementById("made").textContent = SUMMARY.intgen_version ? `intgen ${SUMMARY.intgen_version}` : "";
  const sections = SUMMARY.kind === "eval" ? evalView() : [overview(), table1(), distributions(), tracesSection()];
  main.append(...sections);
  for (const section of sections) nav.append(el("a", {href: "#" + section.id}, section.querySelector("h2").textContent.split(" (")[0]));
  typeset(document.getElementById("overview"));
  const route = () => {
    const m = location.hash.match(/^#p=(.+)$/);
    if (!m) return;
    let id;
    try { id = decodeURIComponent(m[1]); } catch (e) { id = m[1]; }  // a hand-typed `%` is not an error
    showProposal(id).catch((e) => console.error(e));
  };
  window.addEventListener("hashchange", route);
  route();
}
start();
