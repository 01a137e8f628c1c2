// LLM Gateway dashboard: renders each page from its /monitor/ JSON and refreshes it every 2 s.
// Every value from the server goes through textContent or an attribute, never innerHTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const body = document.body;
  const page = body.dataset.page;
  const endpoint = body.dataset.endpoint;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";
  const SVG = "http://www.w3.org/2000/svg";

  // --- small DOM helpers
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }
  function setText(id, value) {
    const node = document.getElementById(id);
    if (node) node.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
  }
  function fill(id, ...children) {
    const node = document.getElementById(id);
    if (node) node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
  }
  function badge(status) {
    return el("span", { class: "badge s-" + (status || "unknown") }, status || "unknown");
  }
  function table(headers, rows, emptyText) {
    if (!rows.length) return el("p", { class: "empty" }, emptyText);
    return el("table", {},
      el("thead", {}, el("tr", {}, headers.map((h) => el("th", { class: h.num ? "num" : null }, h.label || h)))),
      el("tbody", {}, rows));
  }

  // --- formatting
  function num(value, digits) {
    if (value === null || value === undefined) return "–";
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 0 : digits });
  }
  function ms(value) {
    if (value === null || value === undefined) return "–";
    return value >= 1000 ? num(value / 1000, 2) + " s" : num(value, 1) + " ms";
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.max(0, Math.round(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor((seconds % 86400) / 3600);
    const m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + s + " s";
    return s + " s";
  }
  function ago(ts) {
    if (!ts) return "–";
    return duration(Date.now() / 1000 - ts) + " ago";
  }
  function when(ts) {
    if (!ts) return "–";
    return new Date(ts * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function timeCell(ts) {
    return el("td", { title: when(ts) }, ago(ts));
  }

  // --- charts (inline SVG)
  function lineChart(values, ref) {
    // ref: an optional reference value (an SLO), drawn as a dashed line and kept inside the scale.
    const width = 300, height = 48, pad = 2;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img" });
    const points = values.map((v) => (v === null || v === undefined ? 0 : v));
    if (points.length < 2) return el("span", { class: "muted" }, "collecting data…");
    const max = Math.max(...points, ref || 0, 1e-9);
    if (ref) {
      const y = (height - pad - (ref / max) * (height - 2 * pad)).toFixed(1);
      chart.append(svg("path", { class: "ref", d: `M${pad} ${y} L${width - pad} ${y}` }));
    }
    const step = (width - 2 * pad) / (points.length - 1);
    const coords = points.map((v, i) => [pad + i * step, height - pad - (v / max) * (height - 2 * pad)]);
    const line = coords.map(([x, y], i) => (i ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1)).join(" ");
    chart.append(svg("path", { class: "area", d: `${line} L${coords[coords.length - 1][0].toFixed(1)} ${height} L${pad} ${height} Z` }));
    chart.append(svg("path", { class: "line", d: line }));
    const title = svg("title", {});
    title.textContent = "max " + num(max, 2);
    chart.append(title);
    return chart;
  }
  function barChart(values, labels) {
    const width = 150, height = 28, gap = 1;
    const chart = svg("svg", { class: "spark", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
    const max = Math.max(...values, 1);
    const w = width / values.length;
    values.forEach((v, i) => {
      const h = v ? Math.max(2, (v / max) * height) : 1;
      const rect = svg("rect", { x: (i * w).toFixed(2), y: (height - h).toFixed(2), width: Math.max(0.5, w - gap).toFixed(2),
        height: h.toFixed(2), class: v ? "" : "zero" });
      const title = svg("title", {});
      title.textContent = (labels ? labels[i] + ": " : "") + num(v);
      rect.append(title);
      chart.append(rect);
    });
    return chart;
  }
  function hbar(value, max) {
    const bar = el("span", { class: "bar" });
    bar.style.width = Math.max(2, Math.round((value / Math.max(max, 1)) * 60)) + "px";
    return bar;
  }

  function cancelForm(jobId) {
    if (!csrf) return null; // bearer-authenticated views have no session to protect
    return el("form", { method: "post", action: "/dashboard/jobs/" + encodeURIComponent(jobId) + "/cancel", class: "inline" },
      el("input", { type: "hidden", name: "csrf_token", value: csrf }),
      el("input", { type: "hidden", name: "next", value: location.pathname + location.search }),
      el("button", { type: "submit", class: "danger", "data-cancel": jobId }, "Cancel"));
  }

  // --- pages
  function renderRuntimeFacts(rt) {
    const state = document.getElementById("rt-state");
    if (state) state.replaceWith(Object.assign(badge(rt.state), { id: "rt-state" }));
    setText("rt-model", rt.model);
    setText("rt-realtime-model", rt.realtime_model);
    setText("rt-uptime", duration(rt.uptime_seconds));
    setText("rt-restarts", rt.restarts);
    setText("rt-last-error", rt.last_error);
  }

  function renderCoserve(c) {
    const card = document.getElementById("coserve");
    if (!card) return;
    card.hidden = !c;
    if (!c) return;
    setText("cs-limit", num(c.limit) + " / " + num(c.max_limit));
    setText("cs-ttft", ms(c.ttft_p95_ms));
    setText("cs-ttft-slo", ms(c.ttft_slo_ms));
    setText("cs-itl", ms(c.itl_p95_ms));
    setText("cs-itl-slo", ms(c.itl_slo_ms));
    const last = c.last_change;
    setText("cs-reason", (c.adaptive ? "Adaptive" : "Fixed limit") + "; now: " + c.reason
      + (last ? "; last change " + ago(last.at) + " to " + last.limit + " (" + last.reason + ")" : "; no change yet"));
    const series = c.series || [];
    fill("chart-cs-ttft", lineChart(series.map((p) => p.ttft_p95_ms), c.ttft_slo_ms));
    fill("chart-cs-limit", lineChart(series.map((p) => p.limit), c.max_limit));
  }

  const renderers = {
    overview(d) {
      renderRuntimeFacts(d.runtime);
      setText("rt-last-swap", d.last_swap ? ago(d.last_swap.at) + " → " + (d.last_swap.model || "none") : "never");
      const rt = d.realtime || {};
      setText("rt-requests-total", num(rt.requests_total));
      setText("rt-rps", rt.requests_per_second === null ? "–" : num(rt.requests_per_second, 2));
      setText("rt-latency", ms(rt.latency_mean_ms));
      setText("rt-p95", ms(rt.latency_p95_ms));
      setText("rt-errors", num(rt.errors_total));
      const series = rt.series || [];
      fill("chart-rps", lineChart(series.map((p) => p.rps)));
      fill("chart-latency", lineChart(series.map((p) => p.latency_ms)));
      const q = d.queue;
      setText("q-total", q ? num(q.total) : "Redis down");
      const b = d.batch;
      setText("b-running", b ? num(b.running) : "–");
      setText("b-here", b ? num(b.in_flight_here) + " / " + num(b.slots) : "–");
      setText("b-group", b ? (b.dispatcher_enabled ? (b.group ? "Batch group: " + b.group : "No batch group loaded")
        : "Dispatcher disabled in this gateway") : "");
      renderCoserve(d.coserve);
      const rows = q ? q.by_model : [];
      const max = Math.max(1, ...rows.map((r) => r.queued));
      fill("queue-table", table(["Model", { label: "Queued", num: true }, "", "By priority"], rows.map((r) =>
        el("tr", {}, el("td", {}, el("code", {}, r.model)), el("td", { class: "num" }, num(r.queued)),
          el("td", {}, hbar(r.queued, max)),
          el("td", { class: "muted" }, Object.entries(r.by_priority).map(([p, n]) => "p" + p + ": " + n).join("  ")))),
        "Nothing queued."));
      fill("errors-table", table(["When", "Source", "Model", "Message"], (d.recent_errors || []).map((e) =>
        el("tr", {}, timeCell(e.at), el("td", {}, e.source,
          e.job_id ? el("div", {}, el("a", { href: "/dashboard/jobs/" + encodeURIComponent(e.job_id) }, e.job_id)) : null),
          el("td", {}, e.model || "–"), el("td", { class: "wrap" }, e.message))), "No recent errors."));
    },

    jobs(d) {
      setText("jobs-queued", num(d.counts.queued));
      setText("jobs-running", num(d.counts.running));
      fill("jobs-table", table(["Job", "Status", "Model", "Key", { label: "Priority", num: true }, "Created",
        { label: "Attempts", num: true }, "Error", ""], d.data.map((j) =>
        el("tr", { "data-job": j.id },
          el("td", {}, el("a", { href: "/dashboard/jobs/" + encodeURIComponent(j.id) }, el("code", {}, j.id))),
          el("td", {}, badge(j.status)), el("td", {}, j.model), el("td", {}, j.key_id),
          el("td", { class: "num" }, j.priority), timeCell(j.created_at),
          el("td", { class: "num" }, j.attempts + " / " + j.max_attempts),
          el("td", { class: "wrap error" }, j.error ? j.error.message : ""),
          el("td", {}, j.status === "queued" || j.status === "running" ? cancelForm(j.id) : null))),
        "No jobs match."));
      const more = document.getElementById("jobs-more");
      if (more) {
        more.replaceChildren();
        if (d.next_cursor) {
          const params = new URLSearchParams(location.search);
          params.set("after", d.next_cursor);
          more.append(el("a", { href: "/dashboard/jobs?" + params.toString() }, "Older jobs →"));
        }
      }
    },

    job(d) {
      const rows = [["Status", badge(d.status)], ["Model", d.model], ["Key", d.key_id], ["Endpoint", d.endpoint],
        ["Priority", d.priority], ["Created", when(d.created_at)], ["Started", when(d.started_at)],
        ["Finished", when(d.finished_at)], ["Attempts", d.attempts + " / " + d.max_attempts],
        ["Flags", (d.flags || []).join(", ") || "–"], ["Metadata", JSON.stringify(d.metadata || {})],
        ["Usage", d.usage ? JSON.stringify(d.usage) : "–"], ["Error", d.error ? d.error.message : "–"]];
      const action = d.status === "queued" || d.status === "running" ? cancelForm(d.id) : null;
      fill("job-detail", el("dl", { class: "facts" }, rows.map(([k, v]) => [el("dt", {}, k), el("dd", { class: "wrap" }, v)])),
        action ? el("p", {}, action) : null);
      fill("job-events", table(["When", "Event", "Status", "Attempt", "Owner", "Error"], (d.events || []).map((e) =>
        el("tr", {}, timeCell(Number(e.at)), el("td", {}, e.event), el("td", {}, e.status || ""),
          el("td", {}, e.attempt || ""), el("td", { class: "mono" }, e.owner || ""), el("td", { class: "wrap" }, e.error || ""))),
        "No events in the recent stream."));
      setText("job-response", d.response ? JSON.stringify(d.response, null, 2) : "–");
    },

    evals(d) {
      fill("evals-table", table(["Run", "Eval", "Model", "Status", "Progress", "Results"], d.data.map((r) => {
        const p = r.progress || {};
        const bar = el("progress", { max: p.total || 1, value: p.scored || p.answered || 0 });
        const metrics = Object.entries(r.metrics || {}).map(([k, v]) =>
          el("div", {}, el("span", { class: "muted" }, k + " "), typeof v === "number" ? num(v, 4) : JSON.stringify(v)));
        return el("tr", {}, el("td", {}, el("code", {}, r.id)),
          el("td", {}, r.eval || "–", r.harness ? el("span", { class: "muted" }, " (" + r.harness + ")") : null),
          el("td", {}, r.model || "–"), el("td", {}, badge(r.status)),
          el("td", { class: "progress-cell" }, bar, el("span", { class: "muted" },
            `prepared ${p.prepared} · sent ${p.sent} · answered ${p.answered} · scored ${p.scored} / ${p.total}`)),
          el("td", {}, metrics, r.error ? el("div", { class: "error" }, r.error) : null));
      }), "No eval runs."));
    },

    keys(d) {
      setText("keys-today", d.today);
      fill("keys-table", table(["Key id", { label: "Requests today", num: true }, { label: "Tokens today", num: true },
        { label: "Requests 30 d", num: true }, { label: "Tokens 30 d", num: true }, { label: "Errors 30 d", num: true },
        "Last used", "Requests per day (30 d)"], d.data.map((k) =>
        el("tr", { "data-key": k.key_id }, el("td", {}, el("code", {}, k.key_id)),
          el("td", { class: "num" }, num(k.today.requests)), el("td", { class: "num" }, num(k.today.total_tokens)),
          el("td", { class: "num" }, num(k.last_days.requests)), el("td", { class: "num" }, num(k.last_days.total_tokens)),
          el("td", { class: "num" }, num(k.last_days.errors)), timeCell(k.last_used_at),
          el("td", {}, barChart(k.daily.map((x) => x.requests), k.daily.map((x) => x.day))))),
        "No usage recorded yet."));
    },

    fleet(d) {
      const nodes = d.data || [];
      const slots = d.swap_slots || {};
      setText("fleet-count", nodes.length);
      setText("fleet-swapped", Object.keys(slots).length);
      fill("fleet-table", table(["Node", "Address", "Runtime", "Loaded", "Sleeping",
        { label: "Realtime in flight", num: true }, { label: "Batch in flight", num: true }, "Swap slot", "Version",
        "Heartbeat"], nodes.map((n) => {
        const rt = n.runtime || {}, models = n.models || {}, batch = n.batch || {}, realtime = n.realtime || {};
        return el("tr", { "data-node": n.node_id, class: n.this_node ? "this-node" : null },
          el("td", {}, el("code", {}, n.node_id), n.this_node ? el("span", { class: "muted" }, " (this node)") : null),
          el("td", {}, n.address || "–"), el("td", {}, badge(rt.state), rt.model ? " " + rt.model : ""),
          el("td", {}, (models.loaded || []).join(", ") || "–"), el("td", {}, (models.sleeping || []).join(", ") || "–"),
          el("td", { class: "num" }, num(realtime.in_flight)), el("td", { class: "num" }, num(batch.in_flight)),
          el("td", {}, slots[n.node_id] || "–"), el("td", {}, n.version || "–"),
          el("td", {}, num(n.heartbeat_age_seconds, 1) + " s ago"));
      }), "No node has registered on this Redis."));
    },

    runtime(d) {
      renderRuntimeFacts(d);
      fill("rt-history", table(["When", "State", "Model", "Error"], (d.history || []).map((h) =>
        el("tr", {}, timeCell(h.at), el("td", {}, badge(h.state)), el("td", {}, h.model || "–"),
          el("td", { class: "wrap error" }, h.error || ""))), "No state changes yet."));
      fill("crash-logs", table(["File", { label: "Size", num: true }, "Written"], (d.crash_logs || []).map((c) =>
        el("tr", {}, el("td", {}, el("a", { href: "/dashboard/runtime/crash_logs/" + encodeURIComponent(c.name) },
          el("code", {}, c.name))), el("td", { class: "num" }, num(c.size)), timeCell(c.modified))),
        "No crash logs."));
    },
  };

  // --- live updates
  const render = renderers[page];
  let last = null;
  function apply(data) {
    const text = JSON.stringify(data);
    if (text === last) return; // unchanged: leave the DOM (and any focus in it) alone
    last = text;
    render(data);
  }
  async function poll() {
    const live = document.getElementById("live");
    try {
      const resp = await fetch(endpoint, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (resp.status === 401) {
        location.assign("/dashboard/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      apply(await resp.json());
      if (live) { live.classList.remove("stale"); live.textContent = "live"; live.title = "Updated " + new Date().toLocaleTimeString(); }
    } catch (err) {
      if (live) { live.classList.add("stale"); live.textContent = "offline"; live.title = String(err); }
    }
    setTimeout(poll, POLL_MS);
  }

  if (render) {
    const initial = document.getElementById("initial-data");
    const data = initial ? JSON.parse(initial.textContent) : null;
    if (data) apply(data);
    if (endpoint) setTimeout(poll, POLL_MS);
  }
})();
