"""The samples page (`GET /ui`): recent rollouts with their prompts, completions and scores, each
run's reward curve, and two versions' completions of the same prompts side by side, for a person
watching a run. One self-contained HTML response (no CDN, no external asset).

The page carries the first window of data (`render_page`: the newest rollouts and every run's
curve, as JSON in a non-executed script element with `<`, `>` and `&` escaped), drawn at once; its
script then polls `GET /v1/samples` and `GET /v1/samples/curves`, with the API key taken from the
page's own URL (`/ui?key=...`, the one way a browser can give it when it navigates) sent on as the
Bearer header. Model text is untrusted, so the script builds every node with `textContent` and
never parses data as HTML; the Content-Security-Policy lets the page load nothing but its own
inline code and fetch only from this server.
"""

from __future__ import annotations

import json
from typing import Any

SAMPLES_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",  # the URL holds the key
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

SAMPLES_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Rollout samples</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2330; background: #f5f6f8; }
  header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #d7dbe2; padding: 8px 16px;
           display: flex; gap: 16px; align-items: center; flex-wrap: wrap; z-index: 1; }
  h1 { font-size: 17px; margin: 0 8px 0 0; }
  h2 { font-size: 14px; margin: 0 0 6px; }
  #status { color: #5b6475; font-size: 12px; }
  #status.error { color: #b3261e; }
  main, #samples { display: grid; gap: 12px; }
  main { padding: 12px 16px; }
  section, article { background: #fff; border: 1px solid #d7dbe2; border-radius: 6px; padding: 10px 12px; }
  .meta { display: flex; gap: 12px; flex-wrap: wrap; color: #5b6475; font-size: 12px; margin-bottom: 6px; }
  .meta b { color: #1d2330; }
  .prompt { background: #eef1f6; border-radius: 4px; padding: 6px 8px; margin: 8px 0 4px; }
  .answer { background: #eaf5ec; border-radius: 4px; padding: 4px 8px; margin: 0 0 4px; }
  .label { font-size: 11px; text-transform: uppercase; color: #5b6475; margin-right: 6px; }
  .text { white-space: pre-wrap; word-break: break-word; font: 13px/1.35 ui-monospace, monospace; }
  .none { color: #8a93a3; font-style: italic; }
  table { border-collapse: collapse; width: 100%; }
  th, td { border-top: 1px solid #e6e9ee; padding: 4px 6px; text-align: left; vertical-align: top; }
  th { font-size: 11px; color: #5b6475; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  td.pos { color: #1a7f37; } td.neg { color: #b3261e; }
  td.side { width: 50%; }
  .empty { color: #5b6475; }
  .legend { display: flex; gap: 12px; flex-wrap: wrap; font-size: 12px; }
  .swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 4px; }
  svg text { font: 11px system-ui, sans-serif; fill: #5b6475; }
</style>
</head>
<body>
<header>
  <h1>Rollout samples</h1>
  <label>run <select id="run"><option value="">all</option></select></label>
  <label>kind <select id="kind"><option value="">all</option><option>training</option>
    <option>evaluation</option><option>canary</option><option>openai</option><option>api</option></select></label>
  <label>adapter <select id="adapter"><option value="">all</option></select></label>
  <label>version <select id="version"><option value="">all</option></select></label>
  <label>rollouts <select id="limit">
    <option>10</option><option selected>25</option><option>100</option><option>250</option>
  </select></label>
  <span id="status">loading...</span>
</header>
<main>
  <section>
    <h2>Mean reward per step, per run (every score posted to this server)</h2>
    <svg id="plot" width="640" height="180" viewBox="0 0 640 180" role="img" aria-label="mean reward per step"></svg>
    <div id="legend" class="legend"></div>
  </section>
  <section>
    <h2>Two versions, the same prompts
      <select id="versionA" aria-label="first version"></select> vs
      <select id="versionB" aria-label="second version"></select></h2>
    <div id="compare"></div>
  </section>
  <div id="samples"></div>
</main>
<script type="application/json" id="initial">/*INITIAL*/</script>
<script>
"use strict";
// Everything from the server is shown with textContent: model text is untrusted.
const KEY = new URLSearchParams(location.search).get("key");
const POLL_MS = 3000;
const BASE = "(base)";  // no adapter name can be this: names match [A-Za-z0-9._-]+
const NO_RUN = "(no run)";  // a run name the filter cannot send: the records and curves of no run
const COLORS = ["#2f6fde", "#d9480f", "#2b8a3e", "#9c36b5", "#e67700", "#0b7285", "#c2255c", "#5c940d"];
const SVG = document.getElementById("plot").namespaceURI;  // SVG's: the page names no URL
let records = [];
let curves = [];
let drawn = null;  // what the page shows now, to redraw only on a change

function node(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function svgNode(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function setStatus(text, isError) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function value(id) { return document.getElementById(id).value; }
function adapterOf(r) { return r.adapter === null ? BASE : r.adapter; }
function runOf(r) { return r.run === null || r.run === undefined ? NO_RUN : r.run; }
function num(x) { return typeof x === "number" ? x.toFixed(3) : "n/a"; }

async function get(path) {
  const answer = await fetch(path, { headers: KEY ? { Authorization: "Bearer " + KEY } : {}, cache: "no-store" });
  if (!answer.ok) {
    const why = answer.status === 401 ? "wrong or missing API key: open this page as /ui?key=..." : await answer.text();
    throw new Error("GET " + path.split("?")[0] + " answered " + answer.status + ": " + why);
  }
  return answer.json();
}

async function poll() {
  const query = new URLSearchParams({ tokens: "false", limit: value("limit") });
  if (value("run") !== "" && value("run") !== NO_RUN) query.set("run", value("run"));
  if (value("kind") !== "") query.set("kind", value("kind"));
  try {
    const [samples, curveList] = await Promise.all([get("/v1/samples?" + query), get("/v1/samples/curves")]);
    records = samples.samples;
    curves = curveList.curves;
    setStatus(records.length + " rollouts, updated " + new Date().toLocaleTimeString(), false);
    render();
  } catch (e) {
    setStatus(e instanceof TypeError ? "cannot reach the server: " + e : String(e.message), true);
  }
}

function setOptions(select, values, label, all) {
  const keep = select.value;
  const want = all ? ["", ...values] : values;
  const have = Array.from(select.options, (o) => o.value);
  if (JSON.stringify(want) !== JSON.stringify(have)) {
    select.replaceChildren(...want.map((v) => {
      const o = node("option", null, v === "" ? "all" : label(v));
      o.value = v;
      return o;
    }));
  }
  if (want.includes(keep)) select.value = keep;
  return select.value;
}

function render() {
  const runs = [...new Set([...curves.map(runOf), ...records.map(runOf)])].sort();
  const run = setOptions(document.getElementById("run"), runs, (v) => v, true);
  const kind = value("kind");
  const ofRun = records.filter((r) => (run === "" || runOf(r) === run) && (kind === "" || r.kind === kind));
  const adapter = setOptions(document.getElementById("adapter"), [...new Set(ofRun.map(adapterOf))].sort(),
                             (v) => v, true);
  const ofAdapter = ofRun.filter((r) => adapter === "" || adapterOf(r) === adapter);
  const versions = [...new Set(ofAdapter.map((r) => r.policy_version))].sort((a, b) => b - a).map(String);
  const version = setOptions(document.getElementById("version"), versions, (v) => "v" + v, true);
  const shown = ofAdapter.filter((r) => version === "" || String(r.policy_version) === version);
  // First pick: the newest version against the oldest in the window.
  const [aSelect, bSelect] = [document.getElementById("versionA"), document.getElementById("versionB")];
  const keepB = bSelect.value;
  setOptions(aSelect, versions, (v) => "v" + v, false);
  setOptions(bSelect, versions, (v) => "v" + v, false);
  if (!versions.includes(keepB) && versions.length > 1) bSelect.value = versions[versions.length - 1];
  const shownCurves = curves.filter((c) => (run === "" || runOf(c) === run) && (kind === "" || c.kind === kind));
  const signature = JSON.stringify([ofAdapter, version, shownCurves, aSelect.value, bSelect.value]);
  if (signature === drawn) return;
  drawn = signature;
  drawPlot(shownCurves);
  drawCompare(ofAdapter, aSelect.value, bSelect.value);
  const list = document.getElementById("samples");
  if (shown.length === 0) {
    list.replaceChildren(node("p", "empty", "No rollout yet" + (records.length ? " matches the filters." : ".")));
  } else {
    list.replaceChildren(...shown.map(rolloutView));
  }
}

function rolloutView(r) {
  const article = node("article", "rollout");
  const meta = node("div", "meta");
  const field = (name, text) => {
    const span = node("span", null, name + " ");
    span.appendChild(node("b", null, text));
    meta.appendChild(span);
  };
  field("run", runOf(r));
  field("kind", r.kind);
  field("adapter", r.adapter === null ? "base model" : r.adapter);
  field("version", "v" + r.policy_version);
  if (r.scores && r.scores.step !== null && r.scores.step !== undefined) field("step", r.scores.step);
  field("at", new Date(r.created_at).toLocaleString());
  field("rollout", r.rollout_id);
  if (r.truncated) field("note", "truncated (over the server's samples_max_bytes)");
  article.appendChild(meta);
  r.results.forEach((result, i) => article.append(...promptView(r, result, i)));
  return article;
}

function promptText(r, result, i) {
  if (result.prompt !== null && result.prompt !== undefined) {
    if (typeof result.prompt === "string") return result.prompt;
    return result.prompt.map((m) => m.role + ": " + m.content).join("\\n");
  }
  const decoded = (r.prompt_texts || [])[i];
  return decoded === undefined ? null : decoded;
}

function textCell(className, text) {
  if (text === "") return node("div", "text none " + className, "(empty)");
  return node("div", "text " + className, text);
}

function promptView(r, result, i) {
  const scores = r.scores;
  const parts = [];
  const prompt = node("div", "prompt");
  prompt.appendChild(node("span", "label", "prompt " + i));
  const text = promptText(r, result, i);
  prompt.appendChild(text === null ? node("div", "text none prompt-text", "(dropped from a truncated record)")
                                   : node("div", "text prompt-text", text));
  parts.push(prompt);
  const answer = scores && scores.answers ? scores.answers[i] : null;
  if (answer !== null && answer !== undefined) {
    const box = node("div", "answer");
    box.appendChild(node("span", "label", "expected answer"));
    box.appendChild(node("div", "text answer-text", answer));
    parts.push(box);
  }
  const components = scores ? Object.keys(scores.components || {}).sort() : [];
  const table = node("table", "completions");
  const head = node("tr");
  for (const h of ["#", "completion", "finish", "reward", "advantage", ...components]) {
    head.appendChild(node("th", null, h));
  }
  table.appendChild(head);
  result.completions.forEach((c, j) => {
    const row = node("tr", "completion");
    row.appendChild(node("td", "num", j));
    const cell = node("td");
    cell.appendChild(textCell("completion-text", c.text));
    row.appendChild(cell);
    row.appendChild(node("td", null, c.finish_reason === null ? "" : c.finish_reason));
    const reward = scores ? scores.rewards[i][j] : null;
    const advantage = scores ? scores.advantages[i][j] : null;
    row.appendChild(node("td", "num reward", num(reward)));
    const adv = node("td", "num advantage", num(advantage));
    if (typeof advantage === "number") adv.classList.add(advantage > 0 ? "pos" : advantage < 0 ? "neg" : "zero");
    row.appendChild(adv);
    for (const name of components) row.appendChild(node("td", "num component", num(scores.components[name][i][j])));
    table.appendChild(row);
  });
  parts.push(table);
  return parts;
}

// Prompts sampled at both versions (evaluation repeats its prompts at every eval step), by text.
function drawCompare(ofAdapter, a, b) {
  const box = document.getElementById("compare");
  if (a === "" || b === "" || a === b) {
    box.replaceChildren(node("p", "empty", "Pick two versions (the window holds " +
                                           new Set(ofAdapter.map((r) => r.policy_version)).size + ")."));
    return;
  }
  const byPrompt = new Map();
  for (const r of ofAdapter) {
    const side = String(r.policy_version) === a ? 0 : String(r.policy_version) === b ? 1 : -1;
    if (side < 0) continue;
    r.results.forEach((result, i) => {
      const text = promptText(r, result, i);
      if (text === null) return;
      const entry = byPrompt.get(text) || [[], []];
      for (const [j, c] of result.completions.entries()) {
        entry[side].push([c.text, r.scores ? r.scores.rewards[i][j] : null]);
      }
      byPrompt.set(text, entry);
    });
  }
  const both = [...byPrompt].filter(([, [x, y]]) => x.length && y.length);
  if (both.length === 0) {
    box.replaceChildren(node("p", "empty", "No prompt of the window was sampled at both v" + a + " and v" + b +
                                           " (evaluation rollouts repeat theirs: set eval_steps)."));
    return;
  }
  const table = node("table", "compare");
  const head = node("tr");
  for (const h of ["prompt", "v" + a, "v" + b]) head.appendChild(node("th", null, h));
  table.appendChild(head);
  for (const [text, sides] of both) {
    const row = node("tr", "compared");
    const cell = node("td");
    cell.appendChild(node("div", "text compare-prompt", text));
    row.appendChild(cell);
    sides.forEach((completions, side) => {
      const td = node("td", "side");
      for (const [completion, reward] of completions) {
        td.appendChild(textCell("compare-" + (side === 0 ? "a" : "b"), completion));
        if (reward !== null) td.appendChild(node("div", "meta", "reward " + num(reward)));
      }
      row.appendChild(td);
    });
    table.appendChild(row);
  }
  box.replaceChildren(table);
}

function drawPlot(shownCurves) {
  const svg = document.getElementById("plot");
  const legend = document.getElementById("legend");
  const lines = shownCurves.filter((c) => c.points.length > 0);
  const W = 640, H = 180, L = 48, R = 12, T = 10, B = 24;
  const parts = [svgNode("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#b8bfcc" }),
                 svgNode("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#b8bfcc" })];
  if (lines.length === 0) {
    parts.push(svgNode("text", { x: L + 10, y: H / 2 }, "no scores with a step posted yet"));
    svg.replaceChildren(...parts);
    legend.replaceChildren();
    return;
  }
  const all = lines.flatMap((c) => c.points);
  const steps = all.map((p) => p.step), means = all.map((p) => p.reward_mean);
  let [s0, s1] = [Math.min(...steps), Math.max(...steps)];
  let [m0, m1] = [Math.min(...means), Math.max(...means)];
  if (s0 === s1) { s0 -= 1; s1 += 1; }
  if (m0 === m1) { m0 -= 0.5; m1 += 0.5; }
  const x = (s) => L + (s - s0) / (s1 - s0) * (W - L - R);
  const y = (m) => H - B - (m - m0) / (m1 - m0) * (H - T - B);
  parts.push(svgNode("text", { x: 4, y: T + 10 }, m1.toFixed(2)));
  parts.push(svgNode("text", { x: 4, y: H - B }, m0.toFixed(2)));
  parts.push(svgNode("text", { x: L, y: H - 6 }, "step " + Math.min(...steps)));
  parts.push(svgNode("text", { x: W - R - 60, y: H - 6 }, "step " + Math.max(...steps)));
  const keys = [];
  lines.forEach((c, k) => {
    const color = COLORS[k % COLORS.length];
    const name = runOf(c) + " · " + c.kind + (c.adapter === null ? "" : " · " + c.adapter);
    keys.push([name, color]);
    parts.push(svgNode("polyline", {
      points: c.points.map((p) => x(p.step).toFixed(1) + "," + y(p.reward_mean).toFixed(1)).join(" "),
      fill: "none", stroke: color, "stroke-width": 2,
    }));
    const every = Math.max(1, Math.ceil(c.points.length / 200));  // dots for at most ~200 steps a curve
    c.points.forEach((p, i) => {
      if (i % every !== 0 && i !== c.points.length - 1) return;
      const dot = svgNode("circle", { cx: x(p.step).toFixed(1), cy: y(p.reward_mean).toFixed(1), r: 3, fill: color });
      dot.appendChild(svgNode("title", {}, name + ", step " + p.step + " (v" + p.policy_version + "): mean reward " +
                                         p.reward_mean.toFixed(4) + " over " + p.completions + " completions"));
      parts.push(dot);
    });
  });
  svg.replaceChildren(...parts);
  legend.replaceChildren(...keys.map(([name, color]) => {
    const item = node("span", "legend-item");
    const swatch = node("span", "swatch");
    swatch.style.background = color;
    item.append(swatch, node("span", "legend-name", name));
    return item;
  }));
}

for (const id of ["adapter", "version", "versionA", "versionB"]) {
  document.getElementById(id).addEventListener("change", render);
}
for (const id of ["run", "kind", "limit"]) document.getElementById(id).addEventListener("change", poll);
// /ui?run=NAME&kind=KIND opens the page filtered (a link to one run's samples).
for (const id of ["run", "kind"]) {
  const wanted = new URLSearchParams(location.search).get(id);
  const select = document.getElementById(id);
  if (!wanted) continue;
  if (!Array.from(select.options, (o) => o.value).includes(wanted)) {
    const o = node("option", null, wanted);
    o.value = wanted;
    select.appendChild(o);
  }
  select.value = wanted;
}
const initial = JSON.parse(document.getElementById("initial").textContent);
if (initial !== null) {  // drawn before the first poll answers
  records = initial.samples;
  curves = initial.curves;
  setStatus(records.length + " rollouts, as the page was served", false);
  render();
}
poll();
setInterval(poll, POLL_MS);
</script>
</body>
</html>
"""

INITIAL_LIMIT = 25
"""Rollouts the page is served with: its `limit` select's default."""


def render_page(initial: dict[str, Any] | None) -> str:
    """The page, carrying `initial` ({"samples": [...], "curves": [...]}, as GET /v1/samples and
    /v1/samples/curves answer them) to draw before its first poll; None: it waits for the poll.
    `<`, `>` and `&` are escaped as JSON's \\u escapes, so no text can close the script element."""
    data = json.dumps(initial).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return SAMPLES_PAGE.replace("/*INITIAL*/", data, 1)
