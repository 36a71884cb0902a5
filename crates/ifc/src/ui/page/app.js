// The live board of `ifc ui`: a snapshot, then one message per change, from /events (server-sent
// events; the browser reconnects by itself and is sent a fresh snapshot). Read-only. Every text
// from the store goes in through textContent, never as HTML.
"use strict";

const WORDS = { available: "AVAILABLE", blocked: "BLOCKED", claimed: "IN PROGRESS", complete: "DONE" };
const state = { tasks: new Map(), rows: new Map(), bodies: new Map(), dependents: new Map(), sessions: [], transitions: [], points: [], offset: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

// Board order: ids compared part by part, numbers by value (P0.1.9 before P0.1.10).
function parts(id) { return id.match(/\d+|\D+/g) || []; }
function boardOrder(a, b) {
  const pa = parts(a), pb = parts(b);
  for (let i = 0; i < Math.min(pa.length, pb.length); i++) {
    const na = /^\d/.test(pa[i]), nb = /^\d/.test(pb[i]);
    if (na && nb) { const d = Number(pa[i]) - Number(pb[i]); if (d) return d; }
    else if (na !== nb) return na ? -1 : 1;
    else if (pa[i] !== pb[i]) return pa[i] < pb[i] ? -1 : 1;
  }
  return pa.length - pb.length || (a < b ? -1 : a > b ? 1 : 0);
}

const now = () => Date.now() + state.offset;
function ago(ms) {
  const s = Math.max(0, Math.round((now() - ms) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });

function pending(t) {
  return t.blocked_by.filter((b) => (state.tasks.get(b) || {}).status !== "complete");
}

function statusCell(t) {
  const waits = pending(t);
  const open = t.status === "available" || t.status === "blocked";
  const pill = el("span", { class: "status " + t.status + (open && waits.length ? " waiting" : "") }, WORDS[t.status] || t.status);
  const td = el("td", {}, pill);
  if (t.status === "available" && waits.length) td.append(" ", el("span", { class: "hint" }, "waiting"));
  if (t.status === "blocked" && !waits.length) td.append(" ", el("span", { class: "hint" }, "claimable"));
  if (t.copied) td.append(" ", el("span", { class: "hint", title: "claimed in the other store, copied here" }, "copied"));
  return td;
}

function heldCell(t) {
  const td = el("td", { class: "held" });
  if (t.status === "claimed" && t.claimed_at) { td.dataset.since = t.claimed_at; td.textContent = ago(t.claimed_at); }
  return td;
}

function blockersCell(t) {
  const td = el("td", {});
  t.blocked_by.forEach((b, i) => {
    const s = (state.tasks.get(b) || {}).status;
    const cls = s === "complete" ? "blocker done" : s ? "blocker" : "blocker missing";
    if (i) td.append(", ");
    td.append(el("span", { class: cls, title: s ? s : "no such task" }, b));
  });
  return td;
}

function row(t) {
  const tr = el("tr", { "data-task": t.id, "data-status": t.status, "data-holder": t.holder || "" },
    el("td", { class: "id" }, t.id), el("td", {}, t.title || ""), statusCell(t),
    el("td", {}, t.holder || ""), heldCell(t), blockersCell(t));
  tr.dataset.text = [t.id, t.title, t.holder, t.status, WORDS[t.status], tr.querySelector(".hint") ? tr.querySelector(".hint").textContent : ""].join(" ").toLowerCase();
  return tr;
}

function index() {
  state.dependents = new Map();
  for (const t of state.tasks.values())
    for (const b of t.blocked_by) {
      if (!state.dependents.has(b)) state.dependents.set(b, new Set());
      state.dependents.get(b).add(t.id);
    }
}

function renderBoard() {
  const board = $("board");
  const groups = new Map();
  state.rows = new Map();
  state.bodies = new Map();
  for (const id of [...state.tasks.keys()].sort(boardOrder)) {
    const t = state.tasks.get(id);
    if (!groups.has(t.group)) groups.set(t.group, []);
    groups.get(t.group).push(t);
  }
  const out = [];
  for (const [group, tasks] of groups) {
    const trs = tasks.map(row);
    trs.forEach((tr, k) => state.rows.set(tasks[k].id, tr));
    const body = el("tbody", {}, ...trs);
    state.bodies.set(group, body);
    out.push(el("section", { class: "group", "data-group": group }, el("h3", {}, group),
      el("table", {}, el("thead", {}, el("tr", {}, ...["ID", "Task", "Status", "Owner", "Held", "Blocked by"].map((h) => el("th", {}, h)))), body)));
  }
  if (!out.length) out.push(el("p", { class: "muted" }, "No tasks in this store yet: `ifc migrate --board FILE` or `ifc put` adds some."));
  board.replaceChildren(...out);
  applyFilter();
  renderCounts();
}

// A new task's row, put in its place in its workstream's table; false if the table is not there.
function insertRow(id) {
  const t = state.tasks.get(id);
  const body = t && state.bodies.get(t.group);
  if (!body) return false;
  const tr = row(t);
  tr.classList.add("flash");
  let before = null;
  for (const r of body.rows) if (boardOrder(id, r.dataset.task) < 0) { before = r; break; }
  body.insertBefore(tr, before);
  state.rows.set(id, tr);
  for (const b of t.blocked_by) {
    if (!state.dependents.has(b)) state.dependents.set(b, new Set());
    state.dependents.get(b).add(id);
  }
  return true;
}

function renderRow(id, flash) {
  const old = state.rows.get(id);
  const t = state.tasks.get(id);
  if (!old || !t) return false;
  const fresh = row(t);
  if (flash) fresh.classList.add("flash");
  fresh.hidden = old.hidden;
  old.replaceWith(fresh);
  state.rows.set(id, fresh);
  return true;
}

function renderCounts() {
  const by = { available: 0, blocked: 0, claimed: 0, complete: 0 };
  for (const t of state.tasks.values()) by[t.status] = (by[t.status] || 0) + 1;
  $("counts").replaceChildren(...Object.entries(by).map(([s, n]) => el("span", {}, el("span", { class: "status " + s }, WORDS[s] + " " + n))));
}

function applyFilter() {
  const q = $("filter").value.trim().toLowerCase();
  for (const tr of document.querySelectorAll("tr[data-task]")) tr.hidden = q !== "" && !tr.dataset.text.includes(q);
  for (const g of document.querySelectorAll("section.group")) g.hidden = !g.querySelector("tr[data-task]:not([hidden])");
}

function renderSessions() {
  const rows = state.sessions.map((s) => el("tr", { "data-session": s.session },
    el("td", {}, s.session), el("td", {}, s.state), el("td", {}, s.task || ""), el("td", {}, s.store),
    el("td", { class: "alive", "data-heartbeat": s.heartbeat || "" }, s.heartbeat ? ago(s.heartbeat) + " ago" : "lease held"),
    el("td", {}, s.claim_p95_ms == null ? "" : s.claim_p95_ms.toFixed(1) + " ms")));
  $("sessions").tBodies[0].replaceChildren(...rows);
  $("session-count").textContent = "(" + state.sessions.length + ")";
}

function transitionItem(x) {
  const what = x.to == null ? "deleted" : (x.from || "new") + " → " + x.to + (x.holder ? " (" + x.holder + ")" : "");
  return el("li", {}, el("time", {}, clock(x.time)), el("b", {}, x.task), " " + what);
}
function renderTransitions() { $("transitions").replaceChildren(...state.transitions.map(transitionItem)); }

function renderChart() {
  const svg = $("chart"), W = 320, H = 120, pts = state.points.slice(-60);
  const ns = "http://www.w3.org/2000/svg";
  const maxRate = Math.max(1, ...pts.map((p) => p.claims_per_s));
  const lat = pts.map((p) => p.claim_p95_ms).filter((v) => v != null);
  const maxLat = Math.max(1, ...lat);
  const step = W / 60;
  const nodes = [];
  pts.forEach((p, i) => {
    const h = (p.claims_per_s / maxRate) * (H - 18);
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", (i * step).toFixed(1)); r.setAttribute("y", (H - h).toFixed(1));
    r.setAttribute("width", (step - 1).toFixed(1)); r.setAttribute("height", h.toFixed(1));
    nodes.push(r);
  });
  const line = pts.map((p, i) => p.claim_p95_ms == null ? null : ((i + 0.5) * step).toFixed(1) + "," + (H - (p.claim_p95_ms / maxLat) * (H - 18)).toFixed(1)).filter(Boolean);
  if (line.length) { const pl = document.createElementNS(ns, "polyline"); pl.setAttribute("points", line.join(" ")); nodes.push(pl); }
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "4"); label.setAttribute("y", "10");
  label.textContent = "max " + maxRate.toFixed(1) + " claims/s · " + (lat.length ? maxLat.toFixed(1) + " ms p95" : "no p95 published") + " · 5 s per bar";
  nodes.push(label);
  svg.replaceChildren(...nodes);
}

// Messages are applied in batches, at most one render per batch: a burst of thousands of changes
// (a migration) costs a few renders, not one per change.
let inbox = [];
let scheduled = false;
function onMessage(m) {
  inbox.push(m);
  // A snapshot is drawn at once (the first paint); changes wait for their batch.
  if (m.kind === "snapshot") flush();
  else if (!scheduled) { scheduled = true; setTimeout(() => { scheduled = false; flush(); }, 50); }
}

function flush() {
  const batch = inbox;
  inbox = [];
  if (!batch.length) return;
  let full = false, sessions = false, chart = false, transitions = false, changes = 0;
  const touched = new Set(), added = new Set();
  for (const m of batch) {
    if (m.kind === "snapshot") {
      state.offset = m.now - Date.now();
      state.tasks = new Map(m.tasks.map((t) => [t.id, t]));
      state.sessions = m.sessions; state.transitions = m.transitions; state.points = m.points;
      $("store").textContent = "· " + m.store;
      showCorrupt(m.corrupt);
      showStore(m.unreachable);
      full = sessions = chart = transitions = true;
      window.ifcSnapshots = (window.ifcSnapshots || 0) + 1;
    } else if (m.kind === "task") {
      const had = state.tasks.get(m.id);
      if (m.task) state.tasks.set(m.id, m.task); else state.tasks.delete(m.id);
      if (!had && m.task) added.add(m.id);
      else if (!m.task || had.blocked_by.join() !== m.task.blocked_by.join()) full = true;
      else touched.add(m.id);
      state.transitions.unshift(m.transition);
      transitions = true; changes++;
    } else if (m.kind === "corrupt") {
      showCorrupt(m.corrupt);
    } else if (m.kind === "store") {
      showStore(m.unreachable);
    } else if (m.kind === "sessions") {
      state.sessions = m.sessions; sessions = true;
    } else if (m.kind === "point") {
      state.points.push(m.point); if (state.points.length > 120) state.points.shift();
      chart = true;
    }
  }
  state.transitions.length = Math.min(state.transitions.length, 60);
  // New tasks go into their tables; a new workstream, a deletion or changed blockers redraw all.
  for (const id of added) {
    if (full) break;
    if (state.tasks.has(id) && !state.rows.has(id) && !insertRow(id)) full = true;
    touched.add(id);
  }
  if (full) { index(); renderBoard(); }
  else if (touched.size) {
    const again = new Set();
    for (const id of touched) for (const d of state.dependents.get(id) || []) if (!touched.has(d)) again.add(d);
    for (const id of touched) renderRow(id, true);
    for (const id of again) renderRow(id, false);
    if ($("filter").value.trim()) applyFilter();
    renderCounts();
  }
  if (transitions) renderTransitions();
  if (sessions) renderSessions();
  if (chart) renderChart();
  window.ifcChanges = (window.ifcChanges || 0) + changes;
}

function showCorrupt(list) {
  const c = $("corrupt");
  c.hidden = !list.length;
  c.textContent = list.length ? "Unreadable records: " + list.join("; ") : "";
}

function showStore(unreachable) {
  const s = $("unreachable");
  s.hidden = !unreachable;
  s.textContent = unreachable ? "store not answering: " + unreachable + " (showing what was last heard)" : "";
}

function connect() {
  const source = new EventSource("/events");
  source.onopen = () => { $("link").textContent = "live"; $("link").className = "link up"; };
  source.onerror = () => {
    $("link").textContent = "reconnecting…"; $("link").className = "link down";
    // The browser retries by itself unless it gave up on the stream: then this page does.
    if (source.readyState === EventSource.CLOSED) { source.close(); setTimeout(connect, 2000); }
  };
  source.onmessage = (e) => onMessage(JSON.parse(e.data));
}

document.addEventListener("DOMContentLoaded", () => {
  $("filter").addEventListener("input", applyFilter);
  setInterval(() => {
    for (const td of document.querySelectorAll("td.held[data-since]")) td.textContent = ago(Number(td.dataset.since));
    for (const td of document.querySelectorAll("td.alive[data-heartbeat]:not([data-heartbeat=''])")) td.textContent = ago(Number(td.dataset.heartbeat)) + " ago";
  }, 1000);
  connect();
});
