// optc report viewer: module tree + dagre layout of what is expanded + SVG. No network, no build step.
"use strict";
(function () {
  const T0 = performance.now();
  const errors = [];
  const origError = console.error.bind(console);
  console.error = function (...a) { errors.push(a.map(String).join(" ")); origError(...a); };
  window.addEventListener("error", e => errors.push(String(e.message || e)));
  window.addEventListener("unhandledrejection", e => errors.push("unhandled rejection: " + String(e.reason)));

  const D = JSON.parse(document.getElementById("optc-data").textContent);
  const N = D.nodes, G = D.groups;
  const SVGNS = "http://www.w3.org/2000/svg";
  const $ = id => document.getElementById(id);
  const esc = s => String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const byName = new Map(N.map((n, i) => [n.n, i]));

  // ---- the module tree ---------------------------------------------------------------------------
  G.forEach(g => { g.kids = []; g.members = []; g.expanded = false; g.size = 0; });
  G.forEach((g, i) => { if (g.parent >= 0) G[g.parent].kids.push(i); });
  N.forEach((n, i) => G[n.g].members.push(i));
  const order = [];            // groups, parents before children
  (function walk() {
    const stack = [0];
    while (stack.length) { const g = stack.pop(); order.push(g); for (const k of G[g].kids) stack.push(k); }
  })();
  for (let k = order.length - 1; k >= 0; k--) {
    const g = G[order[k]];
    g.size = g.members.length + g.kids.reduce((s, c) => s + G[c].size, 0);
  }
  const ancestors = g => { const out = []; for (let x = g; x >= 0; x = G[x].parent) out.push(x); return out; };
  G[0].expanded = true;
  // open a chain of single modules (a model wrapped in one module) so the first view has content
  for (let g = 0; G[g].kids.length === 1 && G[g].members.filter(i => N[i].op !== "weight").length <= 2;) {
    g = G[g].kids[0]; G[g].expanded = true;
  }

  let overlay = null, selected = null, showWeights = false, hits = new Set();

  // ---- overlays ----------------------------------------------------------------------------------
  for (const o of D.overlays) {
    const opt = document.createElement("option");
    opt.value = o.key; opt.textContent = `${o.label} (${o.count})`; $("overlay").appendChild(opt);
  }
  function groupValue(o, g) {
    let acc = null;
    const visit = x => {
      for (const i of G[x].members) {
        const v = o.values[i];
        if (v === null || v === undefined) continue;
        if (acc === null) acc = v;
        else if (o.agg === "sum") acc += v;
        else if (o.agg === "max") acc = Math.max(acc, v);
        else acc = Math.min(acc, v);
      }
      for (const k of G[x].kids) visit(k);
    };
    visit(g);
    return acc;
  }
  const PALETTE = ["#2c7bb6", "#abd9e9", "#ffffbf", "#fdae61", "#d7191c"];
  function colour(o, v, lo, hi) {
    if (v === null || v === undefined) return null;
    const useLog = lo > 0 && hi / lo > 100;
    let t = hi > lo ? (useLog ? (Math.log(v) - Math.log(lo)) / (Math.log(hi) - Math.log(lo)) : (v - lo) / (hi - lo)) : 1;
    t = Math.max(0, Math.min(1, t));
    if (o.better === "high") t = 1 - t;
    return PALETTE[Math.min(PALETTE.length - 1, Math.floor(t * PALETTE.length))];
  }
  function fmt(v, unit) {
    if (v === null || v === undefined) return "–";
    if (unit === "s") return v >= 1e-3 ? (v * 1e3).toFixed(3) + " ms" : (v * 1e6).toFixed(1) + " µs";
    if (unit === "dB") return v.toFixed(2) + " dB";
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2) + (unit ? " " + unit : "");
    return (Number.isInteger(v) ? String(v) : v.toPrecision(4)) + (unit ? " " + unit : "");
  }

  // ---- what is shown -----------------------------------------------------------------------------
  function representatives() {
    const rep = new Array(G.length).fill(null);   // the collapsed group standing for g, or null
    for (const g of order) {
      const p = G[g].parent;
      if (p >= 0 && rep[p] !== null) rep[g] = rep[p];
      else rep[g] = G[g].expanded ? null : g;
    }
    return rep;
  }
  function keyOf(i, rep) {
    const n = N[i];
    const r = rep[n.g];
    if (r !== null) return "g" + r;
    if (n.op === "weight" && !showWeights) return null;
    return "n" + i;
  }

  let shown = [], visibleKeys = new Map(), layoutMs = 0;
  function render() {
    const t = performance.now();
    const rep = representatives();
    const keys = N.map((_, i) => keyOf(i, rep));
    const g = new dagre.graphlib.Graph({ compound: true, multigraph: false });
    g.setGraph({ rankdir: "TB", nodesep: 18, ranksep: 28, marginx: 20, marginy: 20 });
    g.setDefaultEdgeLabel(() => ({}));
    visibleKeys = new Map();
    const clusterOf = gi => {   // the innermost expanded non-root group holding gi, as a cluster id
      for (let x = gi; x > 0; x = G[x].parent) if (G[x].expanded && rep[x] === null) return "c" + x;
      return null;
    };
    const addCluster = gi => {  // ensure cluster c<gi> and its parents exist
      const id = "c" + gi;
      if (g.hasNode(id)) return id;
      g.setNode(id, { kind: "cluster", gi, label: G[gi].label });
      const parent = clusterOf(G[gi].parent);
      if (parent) g.setParent(id, addCluster(G[gi].parent));
      return id;
    };
    keys.forEach((k, i) => {
      if (k === null || visibleKeys.has(k)) return;
      let label, sub, gi;
      if (k[0] === "g") {
        gi = +k.slice(1); const grp = G[gi];
        label = grp.label; sub = `${grp.cls ? grp.cls + " · " : ""}${grp.size} nodes`;
      } else {
        const n = N[i]; label = n.op.replace(/^aten\./, ""); sub = n.n; gi = n.g;
      }
      const width = Math.min(280, Math.max(90, Math.max(7.2 * label.length + 22, 6.4 * sub.length + 14)));
      visibleKeys.set(k, i);
      g.setNode(k, { kind: k[0], idx: k[0] === "g" ? +k.slice(1) : i, label, sub, width, height: 34 });
      const parentGroup = k[0] === "g" ? G[gi].parent : gi;
      const c = clusterOf(parentGroup);
      if (c) g.setParent(k, addCluster(+c.slice(1)));
    });
    const seen = new Set();
    N.forEach((n, i) => {
      const v = keys[i];
      if (v === null) return;
      for (const j of n.in) {
        const u = keys[j];
        if (u === null || u === v) continue;
        const e = u + ">" + v;
        if (seen.has(e)) continue;
        seen.add(e); g.setEdge(u, v);
      }
    });
    dagre.layout(g);
    layoutMs = performance.now() - t;
    draw(g);
    shown = [...visibleKeys.keys()];
    $("visible-count").textContent = String(shown.length);
    paint();
  }

  function draw(g) {
    const vp = $("viewport");
    vp.textContent = "";
    const frag = document.createDocumentFragment();
    const el = (name, attrs, parent) => {
      const e = document.createElementNS(SVGNS, name);
      for (const k in attrs) e.setAttribute(k, attrs[k]);
      (parent || frag).appendChild(e); return e;
    };
    // clusters, outermost first
    const clusters = g.nodes().filter(id => g.node(id).kind === "cluster")
      .sort((a, b) => ancestors(g.node(a).gi).length - ancestors(g.node(b).gi).length);
    for (const id of clusters) {
      const c = g.node(id);
      const gr = el("g", { class: "cluster", "data-group": c.gi });
      el("rect", { x: c.x - c.width / 2, y: c.y - c.height / 2, width: c.width, height: c.height }, gr);
      const tt = el("text", { x: c.x - c.width / 2 + 6, y: c.y - c.height / 2 + 12 }, gr);
      tt.textContent = "▾ " + G[c.gi].label;
      tt.addEventListener("click", ev => { ev.stopPropagation(); toggle(c.gi); });
    }
    for (const e of g.edges()) {
      const pts = g.edge(e).points || [];
      if (!pts.length) continue;
      el("path", { class: "edge", d: "M" + pts.map(p => p.x.toFixed(1) + "," + p.y.toFixed(1)).join("L"), "marker-end": "url(#arrow)" });
    }
    for (const id of g.nodes()) {
      const nd = g.node(id);
      if (nd.kind === "cluster") continue;
      let cls = "node";
      if (nd.kind === "g") cls += " group";
      else if (N[nd.idx].op === "weight") cls += " weight";
      else if (N[nd.idx].op === "placeholder" || N[nd.idx].op === "output") cls += " io";
      const gr = el("g", { class: cls, "data-key": id, transform: `translate(${nd.x - nd.width / 2},${nd.y - nd.height / 2})` });
      el("rect", { width: nd.width, height: nd.height }, gr);
      const a = el("text", { x: 6, y: 14 }, gr); a.textContent = (nd.kind === "g" ? "▸ " : "") + clip(nd.label, nd.width);
      const b = el("text", { x: 6, y: 27, class: "sub" }, gr); b.textContent = clip(nd.sub, nd.width);
      gr.addEventListener("click", ev => { ev.stopPropagation(); if (nd.kind === "g") { toggle(nd.idx); } else { select(nd.idx); } });
    }
    const defs = el("defs", {});
    const m = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" }, defs);
    el("path", { d: "M0,0L10,5L0,10z", fill: "#9aa3b2" }, m);
    vp.appendChild(frag);
    graphSize = { w: g.graph().width || 1, h: g.graph().height || 1 };
  }
  const clip = (s, w) => { const max = Math.floor((w - 10) / 6.6); return s.length > max ? s.slice(0, max - 1) + "…" : s; };

  function paint() {   // overlay colours, selection, search hits
    const o = overlay;
    let lo = Infinity, hi = -Infinity;
    const vals = new Map();
    for (const [k, i] of visibleKeys) {
      const v = o ? (k[0] === "g" ? groupValue(o, +k.slice(1)) : o.values[i]) : null;
      vals.set(k, v);
      if (v !== null && v !== undefined && isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
    document.querySelectorAll("#viewport .node").forEach(gr => {
      const k = gr.getAttribute("data-key");
      const rect = gr.firstChild;
      const c = o ? colour(o, vals.get(k), lo, hi) : null;
      if (c) { rect.style.fill = c; gr.setAttribute("data-coloured", "1"); }
      else { rect.style.fill = ""; gr.removeAttribute("data-coloured"); }
      const idx = visibleKeys.get(k);
      gr.classList.toggle("sel", k[0] === "n" && idx === selected);
      gr.classList.toggle("hit", k[0] === "n" && hits.has(idx));
    });
    $("legend").innerHTML = o ? `<div>${esc(o.label)} <span class="hint">(${o.agg} over a module)</span></div>` +
      `<div class="bar"></div><div style="display:flex;justify-content:space-between"><span>${o.better === "high" ? "worse" : ""} ${fmt(isFinite(lo) ? lo : null, o.unit)}</span><span>${fmt(isFinite(hi) ? hi : null, o.unit)} ${o.better === "high" ? "" : "worse"}</span></div>` +
      (o.note ? `<div class="hint" style="max-width:320px">${esc(o.note)}</div>` : "") : "";
  }

  // ---- pan and zoom ------------------------------------------------------------------------------
  let view = { x: 0, y: 0, k: 1 }, graphSize = { w: 1, h: 1 };
  const applyView = () => $("viewport").setAttribute("transform", `translate(${view.x},${view.y}) scale(${view.k})`);
  function fit() {
    const box = $("canvas").getBoundingClientRect();
    const k = Math.min(1.2, Math.min((box.width || 800) / graphSize.w, (box.height || 600) / graphSize.h));
    view = { k, x: ((box.width || 800) - graphSize.w * k) / 2, y: 10 };
    applyView();
  }
  function centerOn(key) {
    const gr = document.querySelector(`#viewport .node[data-key="${key}"]`);
    if (!gr) return;
    const m = /translate\(([-\d.]+),([-\d.]+)\)/.exec(gr.getAttribute("transform"));
    const box = $("canvas").getBoundingClientRect();
    view.k = Math.max(view.k, 0.8);
    view.x = (box.width || 800) / 2 - (+m[1] + 60) * view.k; view.y = (box.height || 600) / 2 - (+m[2] + 17) * view.k;
    applyView();
  }
  const svg = $("canvas");
  svg.addEventListener("wheel", ev => {
    ev.preventDefault();
    const r = svg.getBoundingClientRect(), px = ev.clientX - r.left, py = ev.clientY - r.top;
    const f = Math.exp(-ev.deltaY * 0.0015), k = Math.max(0.02, Math.min(4, view.k * f));
    view.x = px - (px - view.x) * (k / view.k); view.y = py - (py - view.y) * (k / view.k); view.k = k; applyView();
  }, { passive: false });
  let drag = null;
  svg.addEventListener("mousedown", ev => { drag = { x: ev.clientX - view.x, y: ev.clientY - view.y }; });
  window.addEventListener("mousemove", ev => { if (drag) { view.x = ev.clientX - drag.x; view.y = ev.clientY - drag.y; applyView(); } });
  window.addEventListener("mouseup", () => { drag = null; });

  // ---- interaction -------------------------------------------------------------------------------
  function toggle(gi) {
    if (gi === 0) return;
    G[gi].expanded = !G[gi].expanded;
    if (!G[gi].expanded) for (const k of G[gi].kids) collapseAll(k);
    render(); showGroup(gi);
  }
  function collapseAll(gi) { G[gi].expanded = false; for (const k of G[gi].kids) collapseAll(k); }
  function reveal(i) {
    for (const a of ancestors(N[i].g)) G[a].expanded = true;
    if (N[i].op === "weight" && !showWeights) { showWeights = true; $("weights").checked = true; }
    render(); select(i); centerOn("n" + i);
  }
  function link(name) {
    return byName.has(name) ? `<a class="ref" data-node="${byName.get(name)}">${esc(name)}</a>` : esc(name);
  }
  function modulePath(gi) {
    return ancestors(gi).reverse().slice(1).filter(x => !G[x].chunk).map(x => G[x].id).pop() || "(root)";
  }
  function select(i) {
    selected = i; paint();
    const n = N[i];
    const rows = [["node", esc(n.n)], ["op", esc(n.op)]];
    if (n.t) rows.push(["type", esc(n.t)]);
    if (n.target) rows.push(["weight", esc(n.target)]);
    rows.push(["module", esc(modulePath(n.g))]);
    const chain = [`<div>source <b>${esc(n.src || "(unknown)")}</b></div>`];
    if (n.origin) chain.push(`<div>captured node(s) ${n.origin.map(link).join(", ")}</div>`);
    chain.push(`<div>${n.pass ? `created by pass <b>${esc(n.pass)}</b>${n.rule ? `, rule <b>${esc(n.rule)}</b>` : ""}` : "not changed by any pass"}</div>`);
    if (n.value_of) chain.push(`<div>computes the value of captured ${link(n.value_of)}</div>`);
    chain.push(`<div>${n.be ? `${esc(D.backend)} op(s) <b>${n.be.map(esc).join(", ")}</b>` : (D.backend ? `no ${esc(D.backend)} op recorded` : "no backend lowered")}</div>`);
    for (const o of D.overlays) rows.push([esc(o.label), fmt(o.values[i], o.unit)]);
    const ins = n.in.map(j => link(N[j].n)).join(", ") || "–";
    const users = N.map((m, j) => m.in.includes(i) ? link(m.n) : null).filter(Boolean).join(", ") || "–";
    rows.push(["inputs", ins], ["users", users]);
    $("details").innerHTML = `<h3>${esc(n.n)}</h3><div class="chain">${chain.join("")}</div><dl>${rows.map(([a, b]) => `<dt>${a}</dt><dd>${b}</dd>`).join("")}</dl>`;
    tab("details");
  }
  function showGroup(gi) {
    const grp = G[gi];
    const rows = [["module", esc(grp.id.replace(/#\d+$/, "") || "(root)")], ["class", esc(grp.cls || "–")], ["nodes", grp.size]];
    for (const o of D.overlays) rows.push([`${esc(o.label)} (${o.agg})`, fmt(groupValue(o, gi), o.unit)]);
    $("details").innerHTML = `<h3>${esc(grp.label)}</h3><p><button id="grp-toggle">${grp.expanded ? "collapse" : "expand"}</button></p>` +
      `<dl>${rows.map(([a, b]) => `<dt>${a}</dt><dd>${b}</dd>`).join("")}</dl>`;
    $("grp-toggle").onclick = () => toggle(gi);
    tab("details");
  }
  $("details").addEventListener("click", ev => { const a = ev.target.closest("a.ref"); if (a) reveal(+a.dataset.node); });
  $("history").addEventListener("click", ev => { const a = ev.target.closest("a.ref"); if (a) reveal(+a.dataset.node); });
  svg.addEventListener("click", () => { });

  function search(q) {
    q = q.trim().toLowerCase();
    hits = new Set();
    const box = $("results");
    if (!q) { box.textContent = ""; paint(); return []; }
    const found = [];
    N.forEach((n, i) => {
      const hay = `${n.n} ${n.op} ${n.src || ""} ${G[n.g].id} ${n.target || ""}`.toLowerCase();
      if (hay.includes(q)) found.push(i);
    });
    found.forEach(i => hits.add(i));
    box.innerHTML = `<div class="hint">${found.length} match${found.length === 1 ? "" : "es"}</div>` +
      found.slice(0, 200).map(i => `<div data-node="${i}">${esc(N[i].n)} <span class="hint">${esc(N[i].op)} ${esc(N[i].src || "")}</span></div>`).join("");
    paint();
    return found;
  }
  $("search").addEventListener("input", ev => search(ev.target.value));
  $("results").addEventListener("click", ev => { const d = ev.target.closest("div[data-node]"); if (d) reveal(+d.dataset.node); });
  $("overlay").addEventListener("change", ev => { overlay = D.overlays.find(o => o.key === ev.target.value) || null; paint(); });
  $("weights").addEventListener("change", ev => { showWeights = ev.target.checked; render(); });
  $("fit").addEventListener("click", fit);
  $("collapse-all").addEventListener("click", () => { for (const k of G[0].kids) collapseAll(k); render(); fit(); });
  $("expand-level").addEventListener("click", () => {
    const rep = representatives();
    const open = [...new Set(N.map((n, i) => rep[n.g]).filter(x => x !== null))];
    const count = open.reduce((s, gi) => s + G[gi].kids.length + G[gi].members.length, shown.length);
    if (count > 2500 && !confirm(`This shows about ${count} boxes; layout may take a while. Go on?`)) return;
    open.forEach(gi => { G[gi].expanded = true; });
    render(); fit();
  });
  function tab(name) {
    document.querySelectorAll("#side nav button").forEach(b => b.classList.toggle("on", b.dataset.tab === name));
    for (const t of ["details", "history", "about"]) $("tab-" + t).hidden = t !== name;
  }
  document.querySelectorAll("#side nav button").forEach(b => b.addEventListener("click", () => tab(b.dataset.tab)));

  // ---- static panels -----------------------------------------------------------------------------
  $("title").textContent = `${D.title} · pipeline ${D.pipeline}${D.backend ? " · backend " + D.backend : ""} · ${D.target}`;
  $("node-count").textContent = String(N.length);
  $("group-count").textContent = String(G.filter(g => !g.chunk).length - 1);
  $("history").innerHTML = `<table class="hist"><tr><th>#</th><th>pass</th><th>nodes</th><th>ms</th></tr>` +
    D.history.map(h => {
      const stats = Object.entries(h.stats).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ");
      const rej = h.rejections.length ? `<details><summary>${h.rejections.length} refusal(s)</summary>` +
        h.rejections.map(([rule, node, why]) => `<div>${esc(rule)} at ${link(node)}: ${esc(why)}</div>`).join("") + `</details>` : "";
      const diff = h.diff ? `<details><summary>diff</summary><pre class="diff">${h.diff.split("\n").map(l =>
        l[0] === "+" ? `<span class="add">${esc(l)}</span>` : l[0] === "-" ? `<span class="del">${esc(l)}</span>` : esc(l)).join("\n")}` +
        (h.diff_more ? `\n… ${h.diff_more} more lines` : "") + `</pre></details>` : "";
      return `<tr><td>${h.index}</td><td><b>${esc(h.pass)}</b>${h.status !== "ran" ? ` <i>${esc(h.status)}</i>` : ""}${h.modified ? "" : " <span class=hint>(unchanged)</span>"}` +
        `${h.error ? `<div class="warn">${esc(h.error)}</div>` : ""}<div class="hint">${stats}</div>${rej}${diff}</td>` +
        `<td>${h.nodes[0]}→${h.nodes[1]}</td><td>${h.time_ms}</td></tr>`;
    }).join("") + `</table>`;
  $("about").innerHTML = `<dl><dt>model</dt><dd>${esc(D.title)}</dd><dt>pipeline</dt><dd>${esc(D.pipeline)}</dd>` +
    `<dt>backend</dt><dd>${esc(D.backend || "–")}</dd><dt>generated</dt><dd>${esc(D.generated)} by optc ${esc(D.optc_version)} in ${D.build_s} s</dd>` +
    `<dt>overlays</dt><dd>${D.overlays.map(o => `${esc(o.label)}: ${esc(o.note)}`).join("<br>") || "–"}</dd></dl>` +
    (D.notes.length ? `<p class="warn">${D.notes.map(esc).join("<br>")}</p>` : "") +
    `<p class="hint">Layout by dagre ${esc(dagre.version)} (MIT), bundled in this file.</p>`;

  // a link can open modules, pick an overlay and select a node: report.html#open=a.b,c&overlay=error&select=name
  const params = new URLSearchParams(location.hash.slice(1));
  for (const id of (params.get("open") || "").split(",").filter(Boolean)) {
    const gi = G.findIndex(g => g.id === id);
    if (gi >= 0) for (const a of ancestors(gi)) G[a].expanded = true;
  }
  if (params.get("overlay")) { $("overlay").value = params.get("overlay"); overlay = D.overlays.find(o => o.key === params.get("overlay")) || null; }
  render(); fit();
  if (params.get("select") && byName.has(params.get("select"))) select(byName.get(params.get("select")));
  const firstRenderMs = performance.now() - T0;
  document.body.setAttribute("data-first-render-ms", firstRenderMs.toFixed(1));

  // ---- self-test (report.html#selftest): what the browser test checks ------------------------------
  if (location.hash === "#selftest") {
    const r = { nodes: N.length, shownCount: +$("node-count").textContent, firstRenderMs, firstLayoutMs: layoutMs,
                visibleBefore: shown.length };
    const candidate = shown.filter(k => k[0] === "g").map(k => +k.slice(1)).sort((a, b) => G[b].size - G[a].size)[0];
    if (candidate !== undefined) {
      const t = performance.now();
      toggle(candidate);
      r.expandMs = performance.now() - t;
      r.expanded = G[candidate].label;
      r.visibleAfter = shown.length;
      r.expandShowsMembers = G[candidate].members.filter(i => N[i].op !== "weight").every(i => visibleKeys.has("n" + i)) &&
        G[candidate].kids.every(k => visibleKeys.has("g" + k) || G[k].size === 0);
    }
    r.overlays = {};
    for (const o of D.overlays) {
      const sel = $("overlay"); sel.value = o.key; sel.dispatchEvent(new Event("change"));
      let expected = 0;
      for (const [k, i] of visibleKeys) {
        const v = k[0] === "g" ? groupValue(o, +k.slice(1)) : o.values[i];
        if (v !== null && v !== undefined) expected++;
      }
      r.overlays[o.key] = { coloured: document.querySelectorAll("#viewport .node[data-coloured]").length, expected };
    }
    const probe = N.findIndex(n => n.op !== "weight" && n.op !== "placeholder" && n.op !== "output");
    if (probe >= 0) {
      r.searchHits = search(N[probe].n).includes(probe);
      reveal(probe);
      r.revealed = visibleKeys.has("n" + probe) && document.querySelector(".node.sel") !== null;
      r.details = $("details").textContent.includes(N[probe].n);
    }
    r.errors = errors;
    const pre = $("selftest"); pre.textContent = JSON.stringify(r); pre.hidden = false;
  }
})();
