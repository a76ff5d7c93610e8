"""The samples page (`GET /ui`): recent rollouts with their completions and scores, for a person
watching a run. One self-contained HTML response (no CDN, no external asset) whose script polls
`GET /v1/samples` and draws the page.

The page carries no data: the script fetches it, with the API key taken from the page's own URL
(`/ui?key=...`, the one way a browser can give it when it navigates) sent on as the Bearer header.
Model text is untrusted, so the script builds every node with `textContent` and never parses data
as HTML; the Content-Security-Policy lets the page load nothing but its own inline code and fetch
only from this server.
"""

from __future__ import annotations

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
  .label { font-size: 11px; text-transform: uppercase; color: #5b6475; margin-right: 6px; }
  .text { white-space: pre-wrap; word-break: break-word; font: 13px/1.35 ui-monospace, monospace; }
  table { border-collapse: collapse; width: 100%; }
  th, td { border-top: 1px solid #e6e9ee; padding: 4px 6px; text-align: left; vertical-align: top; }
  th { font-size: 11px; color: #5b6475; font-weight: 600; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  td.pos { color: #1a7f37; } td.neg { color: #b3261e; }
  .empty { color: #5b6475; }
  svg text { font: 11px system-ui, sans-serif; fill: #5b6475; }
</style>
</head>
<body>
<header>
  <h1>Rollout samples</h1>
  <label>adapter <select id="adapter"><option value="">all</option></select></label>
  <label>version <select id="version"><option value="">all</option></select></label>
  <label>rollouts <select id="limit">
    <option>10</option><option selected>25</option><option>100</option><option>250</option>
  </select></label>
  <span id="status">loading...</span>
</header>
<main>
  <section>
    <h2>Mean reward per step (posted scores of the rollouts below)</h2>
    <svg id="plot" width="640" height="180" viewBox="0 0 640 180" role="img" aria-label="mean reward per step"></svg>
  </section>
  <div id="samples"></div>
</main>
<script>
"use strict";
// Everything from the server is shown with textContent: model text is untrusted.
const KEY = new URLSearchParams(location.search).get("key");
const POLL_MS = 3000;
const BASE = "(base)";  // no adapter name can be this: names match [A-Za-z0-9._-]+
const SVG = document.getElementById("plot").namespaceURI;  // SVG's: the page names no URL
let records = [];
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

function adapterOf(r) { return r.adapter === null ? BASE : r.adapter; }

function num(x) { return typeof x === "number" ? x.toFixed(3) : "n/a"; }

async function poll() {
  const limit = document.getElementById("limit").value;
  try {
    const answer = await fetch("/v1/samples?tokens=false&limit=" + encodeURIComponent(limit), {
      headers: KEY ? { Authorization: "Bearer " + KEY } : {},
      cache: "no-store",
    });
    if (!answer.ok) {
      const why = answer.status === 401 ? "wrong or missing API key: open this page as /ui?key=..."
                                         : await answer.text();
      setStatus("GET /v1/samples answered " + answer.status + ": " + why, true);
      return;
    }
    records = (await answer.json()).samples;
    setStatus(records.length + " rollouts, updated " + new Date().toLocaleTimeString(), false);
    render();
  } catch (e) {
    setStatus("cannot reach the server: " + e, true);
  }
}

function setOptions(select, values, label) {
  const keep = select.value;
  const want = ["", ...values];
  const have = Array.from(select.options, (o) => o.value);
  if (JSON.stringify(want) !== JSON.stringify(have)) {
    select.replaceChildren(...want.map((v) => {
      const o = node("option", null, v === "" ? "all" : label(v));
      o.value = v;
      return o;
    }));
  }
  select.value = want.includes(keep) ? keep : "";
}

function render() {
  const adapterSelect = document.getElementById("adapter");
  const versionSelect = document.getElementById("version");
  const adapters = [...new Set(records.map(adapterOf))].sort();
  setOptions(adapterSelect, adapters, (v) => v);
  const adapter = adapterSelect.value;
  const ofAdapter = records.filter((r) => adapter === "" || adapterOf(r) === adapter);
  const versions = [...new Set(ofAdapter.map((r) => r.policy_version))].sort((a, b) => b - a).map(String);
  setOptions(versionSelect, versions, (v) => "v" + v);
  const version = versionSelect.value;
  const shown = ofAdapter.filter((r) => version === "" || String(r.policy_version) === version);
  const signature = JSON.stringify(shown);
  if (signature === drawn) return;
  drawn = signature;
  drawPlot(shown);
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
  const field = (name, value) => {
    const span = node("span", null, name + " ");
    span.appendChild(node("b", null, value));
    meta.appendChild(span);
  };
  field("adapter", r.adapter === null ? "base model" : r.adapter);
  field("version", "v" + r.policy_version);
  if (r.scores && r.scores.step !== null && r.scores.step !== undefined) field("step", r.scores.step);
  field("at", new Date(r.created_at).toLocaleString());
  field("rollout", r.rollout_id);
  if (r.truncated) field("note", "truncated (over the server's samples_max_bytes)");
  article.appendChild(meta);
  r.results.forEach((result, i) => article.append(...promptView(result, i, r.scores)));
  return article;
}

function promptText(prompt) {
  if (prompt === null) return "(sent as token ids, or dropped from a truncated record)";
  if (typeof prompt === "string") return prompt;
  return prompt.map((m) => m.role + ": " + m.content).join("\\n");
}

function promptView(result, i, scores) {
  const prompt = node("div", "prompt");
  prompt.appendChild(node("span", "label", "prompt " + i));
  prompt.appendChild(node("div", "text prompt-text", promptText(result.prompt)));
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
    const text = node("td");
    text.appendChild(node("div", "text completion-text", c.text));
    row.appendChild(text);
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
  return [prompt, table];
}

function drawPlot(shown) {
  const svg = document.getElementById("plot");
  const byStep = new Map();
  for (const r of shown) {
    if (!r.scores || r.scores.step === null || r.scores.step === undefined) continue;
    const rewards = r.scores.rewards.flat().filter((x) => x !== null);  // null: unscorable
    const [sum, count] = byStep.get(r.scores.step) || [0, 0];
    byStep.set(r.scores.step, [sum + rewards.reduce((a, b) => a + b, 0), count + rewards.length]);
  }
  const points = [...byStep].filter(([, [, n]]) => n > 0).map(([s, [sum, n]]) => [s, sum / n]);
  points.sort((a, b) => a[0] - b[0]);
  const W = 640, H = 180, L = 48, R = 12, T = 10, B = 24;
  const parts = [svgNode("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#b8bfcc" }),
                 svgNode("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#b8bfcc" })];
  if (points.length === 0) {
    parts.push(svgNode("text", { x: L + 10, y: H / 2 }, "no scores with a step posted yet"));
    svg.replaceChildren(...parts);
    return;
  }
  const steps = points.map((p) => p[0]), means = points.map((p) => p[1]);
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
  parts.push(svgNode("polyline", {
    points: points.map(([s, m]) => x(s).toFixed(1) + "," + y(m).toFixed(1)).join(" "),
    fill: "none", stroke: "#2f6fde", "stroke-width": 2,
  }));
  for (const [s, m] of points) {
    const dot = svgNode("circle", { cx: x(s).toFixed(1), cy: y(m).toFixed(1), r: 3, fill: "#2f6fde" });
    dot.appendChild(svgNode("title", {}, "step " + s + ": mean reward " + m.toFixed(4)));
    parts.push(dot);
  }
  svg.replaceChildren(...parts);
}

for (const id of ["adapter", "version"]) document.getElementById(id).addEventListener("change", render);
document.getElementById("limit").addEventListener("change", poll);
poll();
setInterval(poll, POLL_MS);
</script>
</body>
</html>
"""
