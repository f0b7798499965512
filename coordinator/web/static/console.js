// /ui: the console. Speaks only the public HTTP API, with the token typed into the page
// (kept in sessionStorage: gone when the tab closes). Everything shown is set with
// textContent (common.js `el`); the page's CSP forbids inline script besides.
"use strict";

const TOKEN_KEY = "gpumesh.token";
const REFRESH_MS = 2000;
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const $ = (id) => document.getElementById(id);

const state = {selected: null, logCtl: null, timer: null, active: {}, completed: {}, nodes: {}};

class ApiError extends Error {
  constructor(status, error, reason) {
    super(status ? `${status} ${error}: ${reason}` : `${error}: ${reason}`);
    this.status = status; this.error = error; this.reason = reason;
  }
}

function headers(json) {
  const h = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = "Bearer " + token;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, method, body) {
  let r;
  try {
    r = await fetch(path, {method: method || "GET", headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (e) {
    throw new ApiError(0, "unreachable", e.message);
  }
  const text = await r.text();
  let doc = null;
  try { doc = text ? JSON.parse(text) : null; } catch (e) { doc = null; }
  if (!r.ok) {
    throw new ApiError(r.status, (doc && doc.error) || r.statusText, (doc && doc.reason) || text);
  }
  return doc;
}

function say(text, bad) {
  const m = $("message");
  m.textContent = text || "";
  m.className = bad ? "bad" : "";
}

function shortId(id) { return id.length > 12 ? id.slice(0, 8) + "…" + id.slice(-4) : id; }
function when(iso) { return iso ? new Date(iso).toLocaleTimeString() : ""; }
function gib(mb) { return (mb / 1024).toFixed(1); }
function q(s) { return encodeURIComponent(s); }

// --- nodes --------------------------------------------------------------------------------

function isDrained(n) {
  return Boolean(n.drain) || n.status === "draining" || n.status === "drained";
}

function gpuCells(node, g) {
  const util = Math.max(0, Math.min(100, Number(g.utilization_pct || 0)));
  const fill = el("div", {class: "fill"});
  fill.style.width = util + "%";
  const temp = g.temperature_c === undefined || g.temperature_c === null ? "–" : Math.round(g.temperature_c) + " °C";
  return [
    el("td", {class: "gpu", text: `${g.index}: ${g.name || g.vendor || "GPU"}` + (g.fault ? ` (fault: ${g.fault})` : "") + (g.busy ? " ●" : "")}),
    el("td", {class: "util"}, el("div", {class: "bar"}, fill), el("span", {text: util.toFixed(0) + "%"})),
    el("td", {class: "vram", text: `${gib(g.memory_used_mb || 0)} / ${gib(g.memory_total_mb || 0)} GiB`}),
    el("td", {class: "temp", text: temp}),
  ];
}

function drainButton(n) {
  const drained = isDrained(n);
  return el("button", {type: "button", class: drained ? "undrain" : "drain", text: drained ? "undrain" : "drain",
    dataset: {node: n.name}, onclick: () => drain(n.name, !drained)});
}

function renderNodes(nodes) {
  const body = clear($("nodes-table").tBodies[0]);
  const names = Object.keys(nodes).sort();
  $("nodes-empty").hidden = names.length > 0;
  clear($("node-names")).append(...names.map((n) => el("option", {value: n})));
  for (const name of names) {
    const n = nodes[name];
    const gpus = n.gpus && n.gpus.length ? n.gpus : [null];
    const span = gpus.length;
    gpus.forEach((g, i) => {
      const row = el("tr", {class: i === 0 ? "node-row" : "gpu-row", dataset: {node: name, gpu: g ? g.index : ""}});
      if (i === 0) {
        row.append(el("td", {class: "name", rowspan: span}, el("strong", {text: name}),
            el("div", {class: "muted", text: `${n.hostname || ""} ${n.cpu_count || 0} CPU`})),
          el("td", {class: "status s-" + n.status, rowspan: span, text: n.status + (n.quarantined ? " (quarantined)" : "") + (n.health ? ` (${n.health})` : "")}));
      }
      if (g) row.append(...gpuCells(n, g));
      else row.append(el("td", {class: "gpu muted", colspan: 4, text: "no GPU"}));
      if (i === 0) {
        row.append(el("td", {class: "tasks", rowspan: span, text: `${n.active_tasks} running · ${n.completed_tasks} done`}),
          el("td", {class: "actions", rowspan: span}, drainButton(n)));
      }
      body.append(row);
    });
  }
}

async function drain(name, on) {
  try {
    await api(`/mesh/nodes/${q(name)}/${on ? "drain" : "undrain"}`, "POST", {});
    say(`node ${name} ${on ? "draining" : "undrained"}`);
  } catch (e) {
    say(`${on ? "drain" : "undrain"} ${name}: ${e.message}`, true);
  }
  refresh();
}

// --- summary and queue ----------------------------------------------------------------------

function renderSummary(s) {
  const item = (label, value) => el("div", {class: "stat"}, el("div", {class: "value", text: value}), el("div", {class: "label", text: label}));
  clear($("summary")).append(
    item("nodes online", `${s.online_nodes} / ${s.total_nodes}`),
    item("GPUs free", `${s.free_gpus} / ${s.total_gpus}`),
    item("VRAM used", `${s.used_vram} / ${s.total_vram} GiB`),
    item("queued", s.queued_tasks), item("running", s.active_tasks),
    item("completed", s.completed_tasks), item("failed", s.failed_tasks), item("cancelled", s.cancelled_tasks));
}

function renderQueue(s, active) {
  const bands = s.queue_by_priority || {};
  clear($("queue-bands")).append(...["critical", "high", "normal", "low"].map((b) =>
    el("div", {class: "band b-" + b, dataset: {band: b}}, el("span", {class: "value", text: bands[b] || 0}), el("span", {class: "label", text: " " + b}))));
  const queued = Object.values(active).filter((t) => t.status === "queued")
    .sort((a, b) => b.priority - a.priority || (a.submitted_at || "").localeCompare(b.submitted_at || ""));
  clear($("queue-list")).append(...queued.slice(0, 50).map((t) => el("li", {dataset: {task: t.task_id}, onclick: () => openTask(t.task_id)},
    el("span", {class: "prio", text: "p" + t.priority}), " ", el("code", {text: shortId(t.task_id)}), " ",
    el("span", {text: t.name || t.task_type}), " ", el("span", {class: "muted", text: t.reason || ""}))));
}

// --- tenants: GET /admin/tenants (admin only) and /mesh/status fairness ----------------------

function pct(x) { return (100 * Number(x || 0)).toFixed(0) + "%"; }
function ofMax(used, max) { return `${used} / ${max === undefined || max === null ? "∞" : max}`; }

function rateText(quota) {
  if (quota.rate === undefined || quota.rate === null) return "unlimited";
  return `${quota.rate}/s` + (quota.burst ? ` (burst ${quota.burst})` : "");
}

function shareCell(t) {
  const fill = el("div", {class: "fill"});
  fill.style.width = Math.max(0, Math.min(100, 100 * t.share)) + "%";
  const mark = el("div", {class: "target"});
  mark.style.left = Math.max(0, Math.min(100, 100 * t.target_share)) + "%";
  return el("td", {class: "share"}, el("div", {class: "bar"}, fill, mark),
    el("span", {text: `${pct(t.share)} / ${pct(t.target_share)}`}));
}

function renderTenants(doc, fairness) {
  const jain = fairness ? fairness.weighted_jain_index : null;
  $("tenants-jain").textContent = "· weighted Jain index " + (jain === null || jain === undefined ? "–" : jain.toFixed(2));
  const note = $("tenants-note");
  const body = clear($("tenants-table").tBodies[0]);
  if (doc instanceof ApiError) {  // a non-admin token: say why in one line, show nothing else
    $("tenants-table").hidden = true;
    note.hidden = false;
    note.className = "bad";
    note.textContent = `tenants: ${doc.message}`;
    return;
  }
  $("tenants-table").hidden = false;
  note.hidden = doc.tenants.length > 0;
  note.className = "muted";
  note.textContent = "no tenants yet";
  for (const t of doc.tenants) {
    const quota = t.quota || {};
    body.append(el("tr", {class: "tenant-row", dataset: {tenant: t.name}},
      el("td", {class: "name"}, el("strong", {text: t.name}), t.configured ? null : el("span", {class: "muted", text: " (defaults)"})),
      el("td", {class: "weight", text: t.weight}), shareCell(t),
      el("td", {class: "gpus", text: ofMax(t.gpus, quota.max_gpus)}),
      el("td", {class: "running", text: ofMax(t.running, quota.max_running)}),
      el("td", {class: "queued", text: ofMax(t.queued, quota.max_queued)}),
      el("td", {class: "rate", text: rateText(quota)})));
  }
}

// --- model services: GET /services (the token's tenant; an admin's: all) --------------------

function ms(seconds) { return seconds === null || seconds === undefined ? "–" : `${(1000 * seconds).toFixed(0)} ms`; }

function renderServices(doc) {
  const body = clear($("services-table").tBodies[0]);
  const now = Date.now();
  const prev = state.services || {};
  state.services = {};
  $("services-empty").hidden = doc.services.length > 0;
  for (const s of doc.services) {
    const key = `${s.tenant}/${s.name}`;
    const total = Number(s.requests.total || 0);
    const was = prev[key];
    const rate = was && now > was.at ? Math.max(0, total - was.total) / ((now - was.at) / 1000) : null;
    state.services[key] = {total, at: now};
    const ready = s.replicas.filter((r) => r.state === "ready").length;
    const nodes = [...new Set(s.replicas.map((r) => r.node).filter(Boolean))].sort();
    body.append(el("tr", {class: "service-row", dataset: {service: s.name, tenant: s.tenant}},
      el("td", {class: "name"}, el("strong", {text: s.name})),
      el("td", {class: "model", text: s.model}),
      el("td", {class: "tenant", text: s.tenant || "–"}),
      el("td", {class: "replicas", text: `${ready} / ${s.scale.desired} (${s.scale.min}..${s.scale.max})`}),
      el("td", {class: "nodes", text: nodes.join(", ") || "–"}),
      el("td", {class: "rps", text: rate === null ? "–" : rate.toFixed(1)}),
      el("td", {class: "latency", text: ms(s.requests.mean_s)}),
      el("td", {class: "ttft", text: ms(s.requests.ttft_mean_s)})));
  }
}

// --- tasks ----------------------------------------------------------------------------------

function filters() {
  return {state: $("f-state").value, node: $("f-node").value.trim(), tenant: $("f-tenant").value.trim()};
}

function renderTasks() {
  const f = filters();
  const all = {...state.completed, ...state.active};
  const rows = Object.values(all).filter((t) =>
    (!f.state || t.status === f.state) && (!f.node || t.node === f.node) && (!f.tenant || (t.tenant || "") === f.tenant))
    .sort((a, b) => (b.submitted_at || "").localeCompare(a.submitted_at || ""));
  const body = clear($("tasks-table").tBodies[0]);
  for (const t of rows.slice(0, 200)) {
    body.append(el("tr", {class: "task-row" + (t.task_id === state.selected ? " selected" : ""), dataset: {task: t.task_id, status: t.status},
      onclick: () => openTask(t.task_id)},
      el("td", {}, el("code", {text: shortId(t.task_id)})), el("td", {class: "name", text: t.name || ""}),
      el("td", {text: t.task_type}), el("td", {class: "status s-" + t.status, text: t.status}),
      el("td", {text: t.priority}), el("td", {class: "node", text: t.node || ""}), el("td", {class: "tenant", text: t.tenant || ""}),
      el("td", {text: when(t.submitted_at)})));
  }
  $("tasks-count").textContent = `${rows.length} shown`;
}

// --- one task -------------------------------------------------------------------------------

function renderDetail(t) {
  $("detail").hidden = false;
  $("detail-id").textContent = t.task_id;
  $("detail-status").textContent = t.status;
  $("detail-status").className = "badge s-" + t.status;
  $("cancel").disabled = FINISHED.has(t.status);
  const fields = [["name", t.name], ["type", t.task_type], ["priority", t.priority], ["tenant", t.tenant],
    ["node", t.node], ["GPUs", (t.gpu_indices || []).join(", ")], ["attempt", `${t.attempt} / ${t.max_attempts}`],
    ["executor", t.executor], ["image", t.image], ["submitted", t.submitted_at], ["started", t.started_at],
    ["finished", t.finished_at], ["exit code", t.result ? t.result.exit_code : null], ["error", t.error],
    ["waiting for", t.status === "queued" ? t.reason : null]];
  clear($("detail-fields")).append(...fields.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .flatMap(([k, v]) => [el("dt", {text: k}), el("dd", {dataset: {field: k}, text: v})]));
}

function stopLogs() {
  if (state.logCtl) state.logCtl.abort();
  state.logCtl = null;
}

async function followLogs(id) {
  stopLogs();
  const ctl = new AbortController();
  state.logCtl = ctl;
  const pre = $("log");
  pre.textContent = "";
  const show = (text) => {
    const end = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = text;
    if (end) pre.scrollTop = pre.scrollHeight;
  };
  while (!ctl.signal.aborted) {
    let r;
    try {
      $("log-state").textContent = "following";
      r = await fetch(`/tasks/${q(id)}/logs?follow=true`, {headers: headers(false), signal: ctl.signal});
      if (r.status === 429) { $("log-state").textContent = "too many followers; retrying"; await sleep(5000, ctl); continue; }
      if (!r.ok) { $("log-state").textContent = `logs: HTTP ${r.status}`; return; }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let text = "";  // each stream starts again from what the coordinator still holds
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        text += dec.decode(value, {stream: true});
        show(text);
      }
      const t = await api(`/tasks/${q(id)}`);
      if (FINISHED.has(t.status)) {
        $("log-state").textContent = "ended";
        return;
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
      $("log-state").textContent = "interrupted: " + e.message;
      await sleep(2000, ctl);
    }
  }
}

function sleep(ms, ctl) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    ctl.signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}

async function openTask(id) {
  state.selected = id;
  try {
    renderDetail(await api(`/tasks/${q(id)}`));
  } catch (e) {
    say(`task ${id}: ${e.message}`, true);
    return;
  }
  renderTasks();
  followLogs(id);
}

function closeTask() {
  stopLogs();
  state.selected = null;
  $("detail").hidden = true;
  renderTasks();
}

async function cancelSelected() {
  const id = state.selected;
  if (!id) return;
  try {
    const t = await api(`/tasks/${q(id)}/cancel`, "POST");
    renderDetail(t);
    say(`task ${id} cancelled`);
  } catch (e) {
    say(`cancel ${id}: ${e.message}`, true);
  }
  refresh();
}

// --- the loop -------------------------------------------------------------------------------

async function refreshDetail() {
  const id = state.selected;
  try {
    renderDetail(await api(`/tasks/${q(id)}`));
  } catch (e) {
    if (e.status !== 404) throw e;
    closeTask();  // gone, or not this token's to see (another tenant's): the rest goes on
    say(`task ${id}: ${e.message}`, true);
  }
}

async function refresh() {
  clearTimeout(state.timer);
  const tenant = filters().tenant;
  const tq = tenant ? `tenant=${q(tenant)}` : "";
  try {
    const [status, nodes, active, completed, tenants, services] = await Promise.all([
      api("/mesh/status"), api("/mesh/nodes"), api("/tasks/active" + (tq ? "?" + tq : "")),
      api("/tasks/completed?limit=100" + (tq ? "&" + tq : "")),
      api("/admin/tenants").catch((e) => e),  // a 403 here leaves the rest of the page be
      api("/services").catch(() => ({services: []}))]);
    state.active = active.tasks; state.completed = completed.tasks;
    renderSummary(status); renderNodes(nodes.nodes); renderQueue(status, active.tasks); renderTasks();
    renderTenants(tenants, status.fairness);
    renderServices(services);
    if (state.selected) await refreshDetail();
    $("conn").textContent = `connected · ${new Date().toLocaleTimeString()}`;
    $("conn").className = "ok";
  } catch (e) {
    $("conn").textContent = e.status === 401 ? "a token is needed" : e.message;
    $("conn").className = "bad";
    if (e.status === 401 || e.status === 403) say(e.message, true);
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function init() {
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token); else sessionStorage.removeItem(TOKEN_KEY);
    say("");
    refresh();
    if (state.selected) followLogs(state.selected);
  });
  $("token-clear").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); $("token").value = ""; refresh(); });
  for (const id of ["f-state", "f-node"]) $(id).addEventListener("input", renderTasks);
  $("f-tenant").addEventListener("change", refresh);
  $("cancel").addEventListener("click", cancelSelected);
  $("detail-close").addEventListener("click", closeTask);
  refresh();
}

init();
