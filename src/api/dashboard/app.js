// The activekg dashboard: a view of the admin JSON API. Every string from the server is put into the page as
// text (never as HTML): job arguments carry object keys that anyone with bucket access can choose.
"use strict";

const REFRESH_MS = 3000;
const TOKEN_KEY = "activekg.admin_token";
const STATES = ["", "pending", "scheduled", "running", "completed", "dead", "cancelled"];

let timer = null;
let generation = 0;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

class HttpError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new HttpError(response.status, body);
  return body;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { hour12: false });
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.round(s / 60)}m ago`;
  return `${Math.round(s / 3600)}h ago`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  if (seconds < 3600) return `${(seconds / 60).toFixed(1)}m`;
  return `${(seconds / 3600).toFixed(1)}h`;
}

function stateBadge(state) {
  return h("span", { class: `badge state-${state}`, "data-state": state }, state);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "Nothing here.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows));
}

function countsCells(c) {
  const per = (n) => (n / 5).toFixed(1);
  const errorRate = c.completed_last_5m + c.dead_last_5m
    ? `${((100 * c.dead_last_5m) / (c.completed_last_5m + c.dead_last_5m)).toFixed(1)}%`
    : "";
  return [
    h("td", { class: "num", "data-col": "pending" }, c.pending),
    h("td", { class: "num" }, c.scheduled),
    h("td", { class: "num" }, c.running),
    h("td", { class: c.dead ? "num error" : "num", "data-col": "dead" }, c.dead),
    h("td", { class: "num" }, age(c.oldest_pending_age_seconds)),
    h("td", { class: "num" }, per(c.completed_last_5m)),
    h("td", { class: "num" }, errorRate),
  ];
}

const COUNT_HEADERS = ["pending", "scheduled", "running", "dead", "oldest pending", "done/min (5m)", "errors (5m)"];

function jobsLink(filter, text) {
  const q = new URLSearchParams(Object.entries(filter).filter(([, v]) => v)).toString();
  return h("a", { href: `#/jobs${q ? `?${q}` : ""}` }, text);
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const child of children.flat()) {
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SERIES_COLOURS = ["#2563eb", "#dc2626", "#7c3aed", "#059669", "#d97706", "#db2777", "#0891b2"];

// A line chart of per-minute values over the last `span` minutes; `series` is [{name, values: Map(ms -> n)}].
function lineChart(id, title, series, span) {
  const [w, hgt, pad] = [640, 160, 30];
  const end = Math.floor(Date.now() / 60000) * 60000 - 60000;
  const start = end - (span - 1) * 60000;
  const max = Math.max(1, ...series.flatMap((s) => [...s.values.values()]));
  const x = (t) => pad + ((t - start) / ((span - 1) * 60000)) * (w - 2 * pad);
  const y = (v) => hgt - pad + 10 - (v / max) * (hgt - pad - 10);
  const lines = series.map((s, i) => {
    const points = [];
    for (let t = start; t <= end; t += 60000) points.push(`${x(t).toFixed(1)},${y(s.values.get(t) || 0).toFixed(1)}`);
    return svg("polyline", { points: points.join(" "), fill: "none", stroke: SERIES_COLOURS[i % SERIES_COLOURS.length],
      "stroke-width": 2, "data-series": s.name });
  });
  const axis = [
    svg("line", { x1: pad, y1: y(0), x2: w - pad, y2: y(0), stroke: "#9ca3af" }),
    svg("text", { x: 2, y: y(max) + 4, "font-size": 10, fill: "#6b7280" }, String(max)),
    svg("text", { x: 2, y: y(0) + 4, "font-size": 10, fill: "#6b7280" }, "0"),
    svg("text", { x: pad, y: hgt - 2, "font-size": 10, fill: "#6b7280" }, `${span} min ago`),
    svg("text", { x: w - pad - 20, y: hgt - 2, "font-size": 10, fill: "#6b7280" }, "now"),
  ];
  // Colours as SVG presentation attributes: the page's CSP allows no inline styles.
  const legend = series.map((s, i) => svg("text", { x: pad + i * 110, y: 10, "font-size": 11,
    fill: SERIES_COLOURS[i % SERIES_COLOURS.length], class: "legend" }, `■ ${s.name}`));
  return h("figure", { class: "chart", id },
    h("figcaption", {}, title),
    svg("svg", { viewBox: `0 0 ${w} ${hgt}`, width: w, height: hgt, role: "img", "aria-label": title },
      axis, lines, legend));
}

function historyCharts(history) {
  const minute = (iso) => new Date(iso).getTime();
  const totals = { completed: new Map(), failed: new Map(), dead: new Map() };
  const depth = new Map();
  for (const m of history.minutes) {
    const t = minute(m.minute);
    for (const k of Object.keys(totals)) totals[k].set(t, (totals[k].get(t) || 0) + m[k]);
    if (!depth.has(m.queue)) depth.set(m.queue, new Map());
    depth.get(m.queue).set(t, m.pending + m.scheduled + m.running);
  }
  return [
    lineChart("chart-throughput", "Completed, failed and dead per minute (last hour, all queues)",
      Object.entries(totals).map(([name, values]) => ({ name, values })), 60),
    lineChart("chart-depth", "Queue depth (pending + scheduled + running) per queue (last hour)",
      [...depth.entries()].map(([name, values]) => ({ name, values })), 60),
  ];
}

async function overview() {
  const [data, schedules, history] = await Promise.all([
    api("/_admin/queues"), api("/_admin/schedules"), api("/_admin/queues/history?minutes=60")]);
  const scheduleRows = schedules.schedules.map((s) => h("tr", { class: "schedule", "data-schedule": s.name },
    h("td", {}, s.name), h("td", {}, s.cron), h("td", {}, when(s.last_tick)), h("td", {}, s.fired_by || "not yet"),
    h("td", {}, s.last_job_id ? h("a", { href: `#/job/${s.last_job_id}` }, `${s.last_job_id} `, stateBadge(s.last_job_state || "gone")) : ""),
    h("td", {}, when(s.next_tick))));
  const queueRows = [];
  for (const q of data.queues) {
    queueRows.push(h("tr", { class: "queue", "data-queue": q.queue },
      h("td", {}, jobsLink({ queue: q.queue }, q.queue)), h("td", {}, ""), countsCells(q)));
    for (const k of q.kinds) {
      queueRows.push(h("tr", { class: "kind", "data-kind": k.kind },
        h("td", {}, ""), h("td", {}, jobsLink({ queue: q.queue, kind: k.kind }, k.kind)), countsCells(k)));
    }
  }
  const tenantRows = data.tenants
    .filter((t) => t.queue === "connector" || t.queue === "embedding")
    .map((t) => h("tr", {},
      h("td", {}, t.queue), h("td", {}, jobsLink({ queue: t.queue, tenant_id: t.tenant_id }, t.tenant_id)),
      h("td", {}, t.provider || ""), countsCells(t)));
  const workerRows = data.workers.map((w) => h("tr", { class: w.alive ? "" : "dead-worker" },
    h("td", {}, w.id), h("td", {}, w.host), h("td", {}, w.kinds.join(", ")), h("td", {}, w.version),
    h("td", {}, ago(w.last_seen)), h("td", {}, w.alive ? "alive" : "silent")));
  const totals = data.queues.reduce((t, q) => ({
    pending: t.pending + q.pending, running: t.running + q.running, dead: t.dead + q.dead,
    scheduled: t.scheduled + q.scheduled,
  }), { pending: 0, running: 0, dead: 0, scheduled: 0 });
  return [
    h("h1", {}, "Overview"),
    h("div", { class: "cards" },
      card("Pending", totals.pending), card("Scheduled", totals.scheduled), card("Running", totals.running),
      card("Dead", totals.dead, totals.dead ? "error" : "", "#/jobs?state=dead"),
      card("Workers alive", data.workers.filter((w) => w.alive).length)),
    h("div", { class: "charts" }, historyCharts(history)),
    h("h2", {}, "Queues"),
    table(["queue", "kind", ...COUNT_HEADERS], queueRows, "No jobs yet."),
    h("h2", {}, "Tenants (connector and embedding queues)"),
    table(["queue", "tenant", "provider", ...COUNT_HEADERS], tenantRows, "No tenant has queued work."),
    h("h2", {}, "Schedules"),
    table(["schedule", "cron (UTC)", "last tick", "fired by", "last job", "next tick"], scheduleRows,
      "No schedule is registered (no process runs with RUN_SCHEDULER=true)."),
    h("h2", {}, "Workers"),
    table(["id", "host", "kinds", "version", "last heartbeat", ""], workerRows, "No worker has registered."),
  ];
}

function card(label, value, cls, href) {
  const inner = [h("div", { class: "label" }, label), h("div", { class: `value ${cls || ""}` }, value)];
  return href ? h("a", { class: "card", href }, inner) : h("div", { class: "card" }, inner);
}

function filterFrom(params) {
  const f = {};
  for (const k of ["queue", "kind", "state", "tenant_id", "since", "until"]) {
    if (params.get(k)) f[k] = params.get(k);
  }
  return f;
}

async function jobs(params) {
  const filter = filterFrom(params);
  const query = new URLSearchParams({ ...filter, limit: "50" });
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  const page = await api(`/_admin/jobs?${query}`);
  const form = h("form", { class: "filters", id: "filters" },
    field("queue", filter.queue), field("kind", filter.kind),
    h("label", {}, "state ", h("select", { name: "state" },
      STATES.map((s) => h("option", { value: s, selected: s === (filter.state || "") }, s || "any")))),
    field("tenant_id", filter.tenant_id, "tenant"),
    field("since", filter.since, "since (RFC 3339)"), field("until", filter.until, "until"),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const f = Object.fromEntries(new FormData(form).entries());
    location.hash = `#/jobs?${new URLSearchParams(Object.entries(f).filter(([, v]) => v))}`;
  });
  const rows = page.jobs.map((j) => {
    const last = j.errors.length ? j.errors[j.errors.length - 1] : null;
    return h("tr", { class: "job", "data-job": j.id, "data-kind": j.kind },
      h("td", {}, h("a", { href: `#/job/${j.id}` }, j.id)), h("td", {}, j.kind), h("td", {}, j.queue),
      h("td", {}, stateBadge(j.state)), h("td", {}, j.tenant_id || ""), h("td", { class: "object" }, objectOf(j)),
      h("td", { class: "num" }, `${j.attempt}/${j.max_attempts}`),
      h("td", {}, when(j.enqueued_at)), h("td", {}, j.state === "scheduled" || j.state === "pending" ? when(j.run_at) : ""),
      h("td", { class: "error-text" }, last ? `${last.class}: ${last.error}` : ""));
  });
  const out = [h("h1", {}, filter.state === "dead" ? "Dead letters" : "Jobs"), form];
  if (filter.state === "dead") {
    const dead = { ...filter };
    delete dead.state;
    const all = Object.keys(dead).length === 0;
    const describe = all ? "every dead job" : `dead jobs matching ${JSON.stringify(dead)}`;
    out.push(h("div", { class: "actions" },
      h("button", { id: "bulk-replay", type: "button", onclick: () => bulk("replay", { ...dead, all }, describe) },
        "Replay all matching"),
      h("button", { id: "bulk-purge", class: "danger", type: "button", onclick: () => bulk("purge", { ...dead, all }, describe) },
        "Purge all matching")));
  }
  if (!filter.state || filter.state === "pending" || filter.state === "scheduled") {
    out.push(h("div", { class: "actions" },
      h("button", { id: "bulk-cancel", class: "danger", type: "button", onclick: () => cancelWaiting(filter) },
        "Cancel waiting jobs matching…")));
  }
  out.push(table(["id", "kind", "queue", "state", "tenant", "object", "attempts", "enqueued", "next run", "last error"], rows,
    "No job matches."));
  if (page.next_cursor) {
    const next = new URLSearchParams(params);
    next.set("cursor", page.next_cursor);
    out.push(h("p", {}, h("a", { href: `#/jobs?${next}` }, "Next page →")));
  }
  return out;
}

// Which object a job is about (ingests and backfill pages name one), as provider:key.
function objectOf(j) {
  const key = j.args && (j.args.key ?? j.args.prefix);
  if (typeof key !== "string") return "";
  return `${j.provider || j.args.provider || ""}:${key}`;
}

// Counts first (a dry run), so the operator confirms a number, not a filter.
async function cancelWaiting(filter) {
  const body = { ...filter, all: Object.keys(filter).length === 0 };
  try {
    const dry = await api("/_admin/jobs/cancel", { method: "POST", body: { ...body, dry_run: true } });
    const what = body.all ? "every waiting job" : `waiting jobs matching ${JSON.stringify(filter)}`;
    if (!confirm(`Cancel ${dry.count} job(s): ${what}? Running jobs are left to finish.`)) return;
    const result = await api("/_admin/jobs/cancel", { method: "POST", body });
    flash(`Cancelled ${result.count} job(s).`);
  } catch (e) {
    flash(e.message, true);
  }
  render();
}

function field(name, value, label) {
  return h("label", {}, `${label || name} `, h("input", { name, value: value || "", size: 14 }));
}

async function bulk(action, filter, describe) {
  if (!confirm(`${action === "replay" ? "Replay" : "Permanently delete"} ${describe}?`)) return;
  try {
    const result = await api(`/_admin/jobs/dlq/${action}`, { method: "POST", body: filter });
    flash(`${action === "replay" ? "Replayed" : "Purged"} ${result.count} job(s).`);
  } catch (e) {
    flash(e.message, true);
  }
  render();
}

async function job(id) {
  const j = await api(`/_admin/jobs/${encodeURIComponent(id)}`);
  const canRetry = ["pending", "scheduled", "dead", "cancelled"].includes(j.state);
  const canCancel = ["pending", "scheduled", "running"].includes(j.state);
  const label = j.state === "dead" || j.state === "cancelled" ? "Replay" : "Run now";
  const act = async (what) => {
    const verb = what === "retry" ? label.toLowerCase() : "cancel";
    if (!confirm(`${verb} job ${j.id} (${j.kind})?`)) return;
    try {
      await api(`/_admin/jobs/${j.id}/${what}`, { method: "POST" });
      flash(`Job ${j.id}: ${verb} requested.`);
    } catch (e) {
      flash(e.message, true);
    }
    render();
  };
  const attempts = j.errors.map((e) => h("tr", {},
    h("td", { class: "num" }, e.attempt), h("td", {}, when(e.at)), h("td", {}, e.class), h("td", {}, e.code || ""),
    h("td", { class: e.class === "replayed" ? "" : "error-text" }, e.error), h("td", {}, e.worker || "")));
  return [
    h("h1", {}, `Job ${j.id} `, stateBadge(j.state)),
    h("div", { class: "actions" },
      canRetry && h("button", { id: "retry", type: "button", onclick: () => act("retry") }, label),
      canCancel && h("button", { id: "cancel", class: "danger", type: "button", onclick: () => act("cancel") }, "Cancel")),
    h("dl", { class: "facts" },
      fact("kind", j.kind), fact("queue", j.queue), fact("tenant", j.tenant_id), fact("provider", j.provider), fact("object", objectOf(j)),
      fact("attempts", `${j.attempt} of ${j.max_attempts}`), fact("priority", j.priority),
      fact("enqueued", when(j.enqueued_at)), fact("started", when(j.attempted_at)),
      fact("finished", when(j.finished_at)), fact("next run", ["pending", "scheduled"].includes(j.state) ? when(j.run_at) : ""),
      fact("worker", j.worker), fact("idempotency key", j.unique_key)),
    h("h2", {}, "Arguments"),
    h("pre", {}, JSON.stringify(j.args, null, 2)),
    j.progress ? [h("h2", {}, "Progress / result"), h("pre", {}, JSON.stringify(j.progress, null, 2))] : [],
    h("h2", {}, "Attempt history (failures and replays)"),
    table(["#", "at", "class", "code", "error", "worker"], attempts, "No failed attempt."),
  ];
}

function fact(name, value) {
  if (value === null || value === undefined || value === "") return [];
  return [h("dt", {}, name), h("dd", {}, value)];
}

async function connectors() {
  const [list, polls, gcs, queues, embedding] = await Promise.all([
    api("/_admin/connectors"), api("/_admin/connectors/polls"), api("/_webhooks/gcs/health"),
    api("/_admin/queues"), api("/admin/embedding/status"),
  ]);
  const tenantCounts = new Map(queues.tenants.map((t) => [`${t.queue}/${t.tenant_id}`, t]));
  const lastIngest = await Promise.all(list.connectors.map((c) =>
    api(`/_admin/jobs?kind=ingest_object&state=completed&limit=1&tenant_id=${encodeURIComponent(c.tenant_id)}`)
      .then((p) => (p.jobs[0] ? p.jobs[0].finished_at : null)).catch(() => null)));
  const rows = list.connectors.map((c, i) => {
    const counts = tenantCounts.get(`connector/${c.tenant_id}`);
    const config = Object.entries(c.config).map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join("  ");
    return h("tr", { "data-connector": `${c.tenant_id}/${c.provider}` },
      h("td", {}, c.tenant_id), h("td", {}, c.provider), h("td", {}, c.enabled ? "enabled" : "disabled"),
      h("td", { class: "num" }, `v${c.key_version}`), h("td", {}, lastIngest[i] ? ago(lastIngest[i]) : "never"),
      h("td", { class: "num" }, counts ? counts.pending + counts.scheduled : 0),
      h("td", { class: counts && counts.dead ? "num error" : "num" },
        counts && counts.dead ? jobsLink({ state: "dead", queue: "connector", tenant_id: c.tenant_id }, counts.dead) : 0),
      h("td", { class: "config" }, config));
  });
  const pollRows = polls.map((p) => h("tr", {},
    h("td", {}, p.tenant_id), h("td", {}, p.provider), h("td", {}, when(p.watermark)), h("td", {}, p.current_run || ""),
    h("td", {}, when(p.next_poll_at)), h("td", { class: "num" }, p.passes), h("td", { class: "error-text" }, p.last_error || "")));
  const subRows = gcs.subscribers.map((s) => h("tr", {},
    h("td", {}, s.subscription), h("td", {}, s.topic || ""), h("td", {}, s.connected ? "connected" : "disconnected"),
    h("td", { class: "num" }, s.reconnects), h("td", { class: "num" }, s.messages),
    h("td", { class: s.rejected ? "num error" : "num" }, s.rejected), h("td", {}, ago(s.last_message_at)),
    h("td", { class: "error-text" }, s.last_error || s.last_rejection || "")));
  const embeddingTenants = queues.tenants.filter((t) => t.queue === "embedding").map((t) => t.tenant_id);
  const perTenant = await Promise.all(embeddingTenants.map((t) =>
    api(`/admin/embedding/status?tenant_id=${encodeURIComponent(t)}`).catch(() => null)));
  const statusRow = (name, scope) => h("tr", {},
    h("td", {}, name),
    ["queued", "processing", "ready", "failed", "skipped"].map((s) => h("td", { class: "num" }, scope.nodes[s] || 0)),
    h("td", { class: "num" }, scope.queue.queued), h("td", { class: "num" }, scope.queue.retry_scheduled),
    h("td", { class: scope.queue.dead ? "num error" : "num" }, scope.queue.dead));
  const embeddingRows = [statusRow("all tenants", embedding.overall)]
    .concat(perTenant.filter(Boolean).map((s) => statusRow(s.tenant_id, s.tenant)));
  return [
    h("h1", {}, "Connectors"),
    table(["tenant", "provider", "state", "key", "last ingest", "backlog", "dead", "config (secrets redacted)"], rows,
      "No connector is registered."),
    h("h2", {}, "Polling"),
    table(["tenant", "provider", "watermark", "pass in flight", "next pass", "passes", "last error"], pollRows,
      "No connector polls."),
    h("h2", {}, "Pub/Sub subscribers (this process)"),
    table(["subscription", "topic", "state", "reconnects", "messages", "refused by allowlist", "last message", "last error"], subRows,
      "No connector pulls a subscription."),
    h("h2", {}, `Embeddings (${embedding.backend}, ${embedding.model}, ${embedding.index})`),
    table(["tenant", "queued", "processing", "ready", "failed", "skipped", "jobs due", "retrying", "dead"], embeddingRows),
  ];
}

// A message stays up for a while (errors until the next navigation) before refreshes show the time again.
function flash(message, isError) {
  const el = document.getElementById("status");
  el.textContent = message;
  el.className = isError ? "error" : "ok";
  el.dataset.until = String(Date.now() + 8000);
}

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  if (path.startsWith("/job/")) return { name: "job", load: () => job(path.slice(5)) };
  if (path === "/jobs") return { name: params.get("state") === "dead" ? "dead" : "jobs", load: () => jobs(params) };
  if (path === "/connectors") return { name: "connectors", load: connectors };
  return { name: "overview", load: overview };
}

async function render() {
  clearTimeout(timer);
  const mine = ++generation;
  const current = route();
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === current.name);
  }
  const view = document.getElementById("view");
  const login = document.getElementById("login");
  try {
    const content = await current.load();
    if (mine !== generation) return;
    login.hidden = true;
    document.getElementById("logout").hidden = !sessionStorage.getItem(TOKEN_KEY);
    // Keep the filter form's focus and typing intact across refreshes.
    const editing = view.contains(document.activeElement) && document.activeElement.form;
    if (!editing) view.replaceChildren(...[content].flat(Infinity));
    document.getElementById("status").dataset.updated = new Date().toISOString();
    const status = document.getElementById("status");
    if (!status.classList.contains("error") && Date.now() > Number(status.dataset.until || 0)) {
      document.getElementById("status").textContent = `updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
    }
  } catch (e) {
    if (mine !== generation) return;
    if (e.status === 401 || e.status === 403) {
      const refused = sessionStorage.getItem(TOKEN_KEY) !== null;
      sessionStorage.removeItem(TOKEN_KEY);
      view.replaceChildren();
      login.hidden = false;
      document.getElementById("login-error").textContent = refused ? `Refused: ${e.message}` : "";
      document.getElementById("token").focus();
      return;
    }
    flash(e.message, true);
  }
  timer = setTimeout(render, REFRESH_MS);
}

// A link with `?token=` in its fragment (the one `serve` prints for its development token) signs in; the
// token then leaves the address bar. The fragment never reaches the server or its logs.
function takeTokenFromLink() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const token = params.get("token");
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", `${location.pathname}#${path || "/"}${rest ? `?${rest}` : ""}`);
}

document.addEventListener("DOMContentLoaded", () => {
  takeTokenFromLink();
  document.getElementById("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    render();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    render();
  });
  window.addEventListener("hashchange", () => {
    document.getElementById("status").className = "muted";
    render();
  });
  render();
});
