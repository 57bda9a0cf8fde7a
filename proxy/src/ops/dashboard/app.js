// portier's dashboard: reads /status and /status/tenants every 2 s (GET only, from the
// admin listener that served this page) and writes what they say into the page.
"use strict";

const PAGE = 100;
const state = { offset: 0, q: "", total: 0 };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function num(v, digits) {
  return el("td", v === null || v === undefined ? "-" : Number(v).toFixed(digits), "n");
}

async function getJson(path) {
  const r = await fetch(path, { method: "GET", cache: "no-store" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

function renderStatus(s) {
  document.getElementById("version").textContent = s.version.slice(0, 12);
  document.getElementById("version").title = s.version;
  document.getElementById("loaded").textContent = s.loaded_at;
  const err = document.getElementById("last-error");
  err.textContent = s.last_error === null ? "none" : s.last_error;
  err.className = s.last_error === null ? "" : "failed";

  const pools = document.getElementById("pools");
  pools.replaceChildren();
  for (const [name, p] of Object.entries(s.pools)) {
    const box = el("div", null, "pool");
    const h = el("h3", name + " ");
    const q = p.queue;
    h.appendChild(el("span", "queue: " + q.interactive + " interactive, " + q.static + " static, " + q.integration + " integration", "queue"));
    box.appendChild(h);
    const t = el("table");
    t.appendChild(row(["backend", "role", "state", "breaker", "in flight", "slots busy"].map((x) => el("th", x))));
    for (const b of p.backends) {
      t.appendChild(row([
        el("td", b.address, "backend"),
        b.role,
        el("td", b.up ? "up" : "down", b.up ? "up" : "down"),
        el("td", b.breaker, b.breaker),
        num(b.inflight, 0),
        b.slots === undefined ? "-" : b.busy + " of " + b.slots,
      ]));
    }
    box.appendChild(t);
    pools.appendChild(box);
  }

  const acme = new Map();
  if (s.acme) for (const h of s.acme.hosts) acme.set(h.host, h.state);
  const certs = document.querySelector("#certs tbody");
  certs.replaceChildren();
  for (const c of s.certificate_list || []) {
    certs.appendChild(row([
      c.name,
      c.not_after,
      el("td", c.days_left, c.days_left < 14 ? "failed" : "n"),
      el("td", acme.get(c.name) || "-", acme.get(c.name) || ""),
    ]));
  }
  for (const [host, st] of acme) {
    if (!(s.certificate_list || []).some((c) => c.name === host)) {
      certs.appendChild(row([host, "-", "-", el("td", st, st)]));
    }
  }

  const cluster = document.getElementById("cluster-section");
  cluster.hidden = !s.cluster;
  if (s.cluster) {
    document.getElementById("cluster").textContent = "Redis " + s.cluster.redis + ", " + s.cluster.replicas + " replica(s)";
  }
}

function renderTenants(t) {
  state.total = t.total;
  document.getElementById("tenants-total").textContent = "(" + t.total + ")";
  const body = document.querySelector("#tenants tbody");
  body.replaceChildren();
  for (const x of t.tenants) {
    body.appendChild(row([
      el("td", x.name, "tenant"),
      x.hosts.join(", "),
      x.pool,
      num(x.rps, 2),
      num(x.errors_per_s, 2),
      num(x.refused_per_s, 2),
      num(x.p99_ms, 1),
      el("td", x.maintenance ? "yes" : "no", x.maintenance ? "yes" : ""),
    ]));
  }
  pager();
}

// The page label and the buttons, from the state: updated at once on a click, not only
// when the refresh it starts comes back (a quick second click must see the new page).
function pager() {
  const last = Math.min(state.offset + PAGE, state.total);
  document.getElementById("page").textContent = state.total === 0 ? "none" : (state.offset + 1) + "-" + last + " of " + state.total;
  document.getElementById("prev").disabled = state.offset === 0;
  document.getElementById("next").disabled = last >= state.total;
}

// Refreshes may overlap (a click during the timer's): only the latest one's answers
// are shown, so an older page never replaces a newer one.
let latest = 0;

async function refresh() {
  const conn = document.getElementById("conn");
  const mine = ++latest;
  try {
    const query = "?limit=" + PAGE + "&offset=" + state.offset + (state.q ? "&q=" + encodeURIComponent(state.q) : "");
    const [s, t] = await Promise.all([getJson("/status"), getJson("/status/tenants" + query)]);
    if (mine !== latest) return;
    renderStatus(s);
    renderTenants(t);
    conn.textContent = "live";
    conn.className = "badge up";
  } catch (e) {
    if (mine !== latest) return;
    conn.textContent = "admin listener unreachable";
    conn.className = "badge down";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const q = document.getElementById("q");
  document.getElementById("search").addEventListener("submit", (e) => e.preventDefault());
  let timer = null;
  q.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.q = q.value.trim(); state.offset = 0; refresh(); }, 200);
  });
  document.getElementById("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); pager(); refresh(); });
  document.getElementById("next").addEventListener("click", () => { state.offset += PAGE; pager(); refresh(); });
  refresh();
  setInterval(refresh, 2000);
});
