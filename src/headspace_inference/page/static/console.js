// The operator page: reads the inference API (with the bearer token when one is required),
// draws cost per day as inline SVG, shows the spend guard's budgets from /status, and keeps
// the call table live from the SSE feed, read with fetch() so that the token travels in a
// header (EventSource cannot send one); a budget event on the feed refreshes the budgets
// and shows a notice.
"use strict";

(function () {
  const body = document.body;
  const API = body.dataset.api;
  const TOKEN_KEY = "headspace-inference-token";
  const tokenRequired = body.dataset.tokenRequired === "true";
  const PALETTE = ["#2e6fdb", "#e07a1f", "#12805c", "#9b51e0", "#c0392b", "#7f8c8d",
    "#d4ac0d", "#16a085", "#8e44ad", "#2c3e50"];
  const $ = (selector) => document.querySelector(selector);

  let filters = {};
  let olderCursor = null;
  let lastEventId = null;
  let feedAbort = null;
  let refreshTimer = null;

  // ------------------------------------------------------------------ the token

  function token() { return sessionStorage.getItem(TOKEN_KEY); }

  function askForToken() {
    $("#token-form").hidden = false;
    $("#token-input").focus();
  }

  $("#token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token-input").value);
    $("#token-input").value = "";
    $("#token-form").hidden = true;
    start();
  });

  class Unauthorised extends Error {}

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (token()) headers.Authorization = "Bearer " + token();
    const response = await fetch(API + path, Object.assign({}, options, { headers }));
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken();
      throw new Unauthorised("token required");
    }
    return response;
  }

  async function json(path) {
    const response = await api(path);
    const data = await response.json();
    if (!response.ok) throw new Error(data.error || response.statusText);
    return data;
  }

  function showError(error) {
    if (error instanceof Unauthorised) return;
    const box = $("#error");
    box.textContent = String(error.message || error);
    box.hidden = false;
  }

  // ------------------------------------------------------------------ small helpers

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  const money = (value) => (value === null || value === undefined ? "–" : "$" + value.toFixed(4));
  const tokens = (value) => (value === null || value === undefined ? "–" : value.toLocaleString());
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const colourOf = (models, model) => PALETTE[models.indexOf(model) % PALETTE.length];

  // ------------------------------------------------------------------ state and usage

  async function loadStatus() {
    const status = await json("/status");
    const box = $("#state");
    box.dataset.state = status.state;
    $("#state-name").textContent = status.state;
    $("#state-reason").textContent = status.reason || "";
    drawSpend(status);
  }

  // ------------------------------------------------------------------ spend

  function scopeText(scope) {
    const parts = Object.entries(scope || {}).map(([name, value]) =>
      name === "project_id" ? (value === "each" ? "each project" : "project " + value)
        : name + " " + value);
    return parts.length ? parts.join(", ") : "every call";
  }

  // One budget's use against one cap, as a bar with the warning mark; text alone without a cap.
  function meter(used, cap, warnAt, show) {
    const cell = el("td", { class: "use" });
    if (cap === null || cap === undefined) {
      cell.append(show(used) + " (no cap)");
      return cell;
    }
    const share = cap > 0 ? used / cap : 1;
    const bar = el("span", { class: "meter", role: "img",
      "data-state": share >= 1 ? "over" : share >= warnAt ? "warning" : "ok",
      "aria-label": `${(share * 100).toFixed(0)} % of the cap` });
    const fill = el("span", { class: "fill" });
    const mark = el("i", { class: "warn-mark", title: `warning at ${Math.round(warnAt * 100)} %` });
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    fill.style.width = Math.min(share, 1) * 100 + "%";
    mark.style.left = warnAt * 100 + "%";
    bar.append(fill, mark);
    cell.append(bar, `${show(used)} / ${show(cap)}`);
    return cell;
  }

  function drawSpend(status) {
    const budgets = status.budgets || [];
    $("#budgets tbody").replaceChildren(...budgets.map((b) => {
      const project = b.project_id === null || b.project_id === undefined ? "" : String(b.project_id);
      return el("tr", { "data-rule": b.rule, "data-project": project,
        "data-used-usd": String(b.used_usd), "data-used-tokens": String(b.used_tokens) }, [
        el("td", { text: b.rule }),
        el("td", { text: scopeText(b.scope) }),
        el("td", { text: project }),
        el("td", { text: b.window }),
        meter(b.used_usd || 0, b.cap_usd, b.warn_at, money),
        meter(b.used_tokens || 0, b.cap_tokens, b.warn_at, tokens),
        el("td", { text: when(b.resets_at), title: b.resets_at || "" }),
      ]);
    }));
    $("#budgets").hidden = !budgets.length;
    $("#no-budgets").hidden = budgets.length > 0;

    const guard = status.spend_guard;
    const box = $("#guard");
    if (guard) {
      box.dataset.shared = String(guard.shared);
      box.textContent = guard.shared
        ? `counted in ${guard.store}, shared by every process`
        : `counted per process (${guard.store})` + (guard.reason ? ": " + guard.reason : "");
      const storm = guard.storm_breaker;
      $("#storm-breaker").textContent = storm && storm.enabled
        ? `a purpose making over ${storm.calls} calls in ${storm.seconds} s is refused for ` +
          `${storm.cooldown_seconds} s`
        : "off";
    }
    const credit = status.openrouter && status.openrouter.credit;
    $("#key-credit").textContent = !credit ? "unknown"
      : credit.limit === null ? `no limit; ${money(credit.usage)} used`
        : `${money(credit.limit_remaining)} left of ${money(credit.limit)}`;
  }

  function budgetNotice(event) {
    const until = when(event.resets_at);
    const project = event.project_id === null || event.project_id === undefined ? ""
      : ` (project ${event.project_id})`;
    let text;
    if (event.kind === "storm") {
      text = `Storm breaker: "${event.purpose}"${project} made over ${event.calls} calls in ` +
        `${event.seconds} s; refused until ${until}.`;
    } else {
      const used = event.cap_usd !== null && event.cap_usd !== undefined
        ? `${money(event.used_usd)} of ${money(event.cap_usd)}`
        : `${tokens(event.used_tokens)} of ${tokens(event.cap_tokens)} tokens`;
      text = event.kind === "cap"
        ? `Budget "${event.rule}"${project} reached its cap (${used}); its calls are refused ` +
          `until ${until}.`
        : `Budget "${event.rule}"${project} passed its warning mark ` +
          `(${Math.round(event.warn_at * 100)} %): ${used}; resets ${until}.`;
    }
    const list = $("#budget-notices");
    list.prepend(el("li", { "data-kind": event.kind, "data-rule": event.rule,
      title: event.at || "", text }));
    while (list.children.length > 5) list.lastElementChild.remove();
    loadStatus().catch(showError);
  }

  async function loadUsage() {
    const days = Number($("#window").value);
    const since = new Date(Date.now() - days * 86400000).toISOString();
    const [usage, daily] = await Promise.all([
      json("/usage?since=" + encodeURIComponent(since)),
      json("/usage/daily?days=" + days),
    ]);
    drawChart(daily);
    const levels = $("#calls-by-level tbody");
    levels.replaceChildren(...Object.entries(usage.calls_by_level).map(([level, n]) =>
      el("tr", { "data-level": level }, [el("td", { text: level }),
        el("td", { class: "num", text: String(n) })])));
    const latency = $("#latency tbody");
    latency.replaceChildren(...Object.entries(usage.latency_ms).map(([level, l]) =>
      el("tr", { "data-level": level }, [el("td", { text: level }),
        ...[l.p50, l.p90, l.p99].map((v) =>
          el("td", { class: "num", text: v === null ? "–" : String(v) }))])));
    const rate = usage.total_calls ? usage.cache_hits / usage.total_calls : null;
    $("#cache-hit-rate").textContent = rate === null ? "–" : (rate * 100).toFixed(1) + " %";
    $("#cache-saved").textContent = money(usage.saved_cost);
    $("#total-cost").textContent = money(usage.total_cost);
    $("#total-calls").textContent = String(usage.total_calls);
  }

  function drawChart(daily) {
    const box = $("#cost-chart");
    const W = 760, H = 220, left = 56, bottom = 24, top = 8;
    const days = daily.days, models = daily.models;
    const totals = days.map((d) => Object.values(d.cost_by_model).reduce((a, b) => a + b, 0));
    const max = Math.max(...totals, 0) || 1;
    const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "cost per day by model" });
    const step = (W - left) / days.length;
    const scale = (H - top - bottom) / max;
    for (const fraction of [0, 0.5, 1]) {
      const y = H - bottom - fraction * max * scale;
      plot.append(svg("line", { x1: left, x2: W, y1: y, y2: y, stroke: "#e4e7ec" }));
      const label = svg("text", { x: left - 4, y: y + 3, "text-anchor": "end", class: "axis" });
      label.textContent = "$" + (fraction * max).toPrecision(2);
      plot.append(label);
    }
    days.forEach((d, i) => {
      let y = H - bottom;
      for (const model of models) {
        const cost = d.cost_by_model[model] || 0;
        if (!cost) continue;
        const h = Math.max(cost * scale, 1);
        y -= h;
        const bar = svg("rect", { x: left + i * step + 2, y, width: Math.max(step - 4, 1),
          height: h, fill: colourOf(models, model), class: "bar", "data-day": d.day,
          "data-model": model, "data-cost": String(cost) });
        const tip = svg("title");
        tip.textContent = `${d.day} ${model}: $${cost.toFixed(6)}`;
        bar.append(tip);
        plot.append(bar);
      }
      if (days.length <= 31 || i % Math.ceil(days.length / 15) === 0) {
        const label = svg("text", { x: left + i * step + step / 2, y: H - 8,
          "text-anchor": "middle", class: "axis" });
        label.textContent = d.day.slice(5);
        plot.append(label);
      }
    });
    const legend = el("div", { class: "legend" }, models.map((model) => {
      const swatch = el("i");
      // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
      swatch.style.background = colourOf(models, model);
      return el("span", { "data-model": model }, [swatch, model]);
    }));
    if (!models.length) legend.append(el("span", { text: "no cost in this window" }));
    box.replaceChildren(plot, legend);
  }

  // ------------------------------------------------------------------ the call table

  function query(extra) {
    const params = new URLSearchParams();
    for (const [name, value] of Object.entries(filters)) if (value) params.set(name, value);
    for (const [name, value] of Object.entries(extra || {})) params.set(name, value);
    return params.toString();
  }

  function matches(call) {
    return Object.entries(filters).every(([name, value]) =>
      !value || String(call[name]) === String(value));
  }

  function row(call, fresh) {
    const time = new Date(call.timestamp);
    const tr = el("tr", { "data-id": String(call.id), "data-call-id": call.call_id,
      class: fresh ? "fresh" : "" }, [
      el("td", { text: time.toLocaleString(), title: call.timestamp }),
      el("td", { text: call.level }),
      el("td", { text: call.purpose }),
      el("td", { text: call.model }),
      el("td", { class: "status-" + call.status, text: call.status,
        title: call.error_message || "" }),
      el("td", { class: "num", text: `${call.input_tokens}/${call.output_tokens}` }),
      el("td", { class: "num", text: call.cost_usd === null ? "–" : call.cost_usd.toFixed(6) }),
      el("td", { class: "num", text: String(call.latency_ms) }),
      el("td", { text: call.project_id === null ? "" : String(call.project_id) }),
    ]);
    tr.addEventListener("click", () => openDetail(call.id).catch(showError));
    return tr;
  }

  async function loadCalls(more) {
    const page = await json("/calls?" + query(more && olderCursor ? { cursor: olderCursor } : {}));
    const tbody = $("#call-table tbody");
    if (more) {
      // A live row may already show a call of the older page's range.
      const rows = page.calls.filter((c) => !tbody.querySelector(`tr[data-id="${c.id}"]`));
      tbody.append(...rows.map((c) => row(c, false)));
    } else {
      tbody.replaceChildren(...page.calls.map((c) => row(c, false)));
    }
    olderCursor = page.next_cursor;
    $("#more").hidden = olderCursor === null;
    $("#error").hidden = true;
  }

  function addLive(call) {
    lastEventId = String(call.id);
    if (!matches(call)) return;
    const tbody = $("#call-table tbody");
    if (tbody.querySelector(`tr[data-id="${call.id}"]`)) return;
    tbody.prepend(row(call, true));
    while (tbody.children.length > 500) tbody.lastElementChild.remove();
    scheduleRefresh(3000);
  }

  async function openDetail(id) {
    const call = await json("/calls/" + id);
    $("#detail-id").textContent = `#${call.id} (${call.call_id})`;
    const fields = $("#detail-fields");
    fields.replaceChildren();
    for (const [name, value] of Object.entries(call)) {
      if (name === "result_text") continue;
      fields.append(el("dt", { text: name }),
        el("dd", { "data-field": name, text: value === null ? "–" : String(value) }));
    }
    $("#detail-result").textContent = call.result_text === null ? "(none)" : call.result_text;
    $("#detail").hidden = false;
  }

  $("#detail-close").addEventListener("click", () => { $("#detail").hidden = true; });
  $("#more").addEventListener("click", () => loadCalls(true).catch(showError));
  $("#window").addEventListener("change", () => loadUsage().catch(showError));
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    filters = {};
    for (const [name, value] of form.entries()) filters[name] = String(value).trim();
    loadCalls(false).catch(showError);
  });

  // ------------------------------------------------------------------ the live feed

  async function follow() {
    if (feedAbort) feedAbort.abort();
    const abort = (feedAbort = new AbortController());
    while (!abort.signal.aborted) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastEventId) headers["Last-Event-ID"] = lastEventId;
        const response = await api("/events", { headers, signal: abort.signal });
        if (!response.ok) throw new Error("feed: " + response.status);
        $("#live").dataset.live = "true";
        await readEvents(response.body.getReader());
      } catch (error) {
        if (abort.signal.aborted || error instanceof Unauthorised) return;
      }
      $("#live").dataset.live = "false";
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }

  async function readEvents(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (name === "inference_call" && data) addLive(JSON.parse(data));
        else if (name === "inference_budget" && data) budgetNotice(JSON.parse(data));
      }
    }
  }

  // ------------------------------------------------------------------ start

  function scheduleRefresh(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(() => {
      Promise.all([loadStatus(), loadUsage()]).catch(showError);
      scheduleRefresh(30000);
    }, delay);
  }

  async function start() {
    if (tokenRequired && !token()) { askForToken(); return; }
    try {
      await Promise.all([loadStatus(), loadUsage(), loadCalls(false)]);
      // Resume after the newest row shown, so a call committed meanwhile is replayed.
      const ids = [...document.querySelectorAll("#call-table tbody tr")].map((tr) =>
        Number(tr.dataset.id));
      lastEventId = String(Math.max(0, ...ids));
      follow();
      scheduleRefresh(30000);
    } catch (error) {
      showError(error);
    }
  }

  start();
})();
