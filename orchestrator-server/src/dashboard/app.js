"use strict";
// The orchestrator dashboard. Plain JavaScript, no framework, nothing loaded from elsewhere.
// Every piece of data is put in the page as text (textContent, createTextNode) or as an
// attribute value: never as HTML.
(function () {
  const Q = window.DASHBOARD_QUERIES;
  const TOKEN_KEY = "orchestrator.dashboard.token";
  const MAX_ROWS = 500;
  const CATCH_UP = 200;
  const POLL_MS = 3000;
  const CHART_SECONDS = 60;

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    system: null,
    readOnly: true,
    head: 0,
    filter: [],
    rows: [],
    pending: [],
    paused: false,
    lastPosition: null,
    startFrom: null,
    perSecond: new Map(),
    view: "live",
  };

  // ---- DOM helpers -------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  /** An element with attributes and children; strings become text nodes. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.setAttribute("class", value);
      // Through the CSSOM: the page's CSP allows no inline style attribute.
      else if (key === "style") Object.assign(el.style, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  /** A link inside the page; only ever "#/…" with encoded parts. */
  function route(...parts) {
    return "#/" + parts.map((p) => encodeURIComponent(String(p))).join("/");
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const pad = (n, w) => String(n).padStart(w || 2, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function fmtDateTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
  }

  /** The time of day, with the date in front when it is not today. */
  function fmtWhen(iso) {
    const d = new Date(iso);
    if (!iso || Number.isNaN(d.getTime())) return String(iso || "");
    const time = fmtTime(iso).slice(0, 8);
    if (d.toDateString() === new Date().toDateString()) return time;
    return d.toLocaleDateString(undefined, { month: "short", day: "numeric" }) + " " + time;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "";
    if (ms < 1) return ms.toFixed(2) + " ms";
    if (ms < 1000) return ms.toFixed(1) + " ms";
    return (ms / 1000).toFixed(2) + " s";
  }

  function fmtNumber(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString();
  }

  function short(id) {
    const s = String(id || "");
    return s.length > 13 ? s.slice(0, 8) + "…" + s.slice(-4) : s;
  }

  /** A colour class for an event type, stable per first segment. */
  function typeClass(type) {
    const head = String(type || "").split(".")[0];
    let hash = 0;
    for (let i = 0; i < head.length; i++) hash = (hash * 31 + head.charCodeAt(i)) >>> 0;
    return "hue-" + (hash % 8);
  }

  function toast(message, kind) {
    const el = h("div", { class: "toast " + (kind || "info"), role: "status" }, message);
    $("toasts").append(el);
    setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
  }

  function jsonBlock(value) {
    return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
  }

  // ---- The API -----------------------------------------------------------------------

  class AuthError extends Error {}

  async function gql(query, variables) {
    const headers = { "content-type": "application/json" };
    if (state.token) headers.authorization = "Bearer " + state.token;
    const response = await fetch("/graphql", {
      method: "POST",
      headers,
      body: JSON.stringify({ query, variables: variables || {} }),
    });
    if (response.status === 401) {
      askToken(state.token ? "The token was refused. Enter the server's token." : null);
      throw new AuthError("unauthenticated");
    }
    const body = await response.json();
    if (body.errors && body.errors.length) {
      const error = new Error(body.errors.map((e) => e.message).join("; "));
      error.code = body.errors[0].extensions && body.errors[0].extensions.code;
      throw error;
    }
    return body.data;
  }

  function report(error) {
    if (error instanceof AuthError) return;
    toast(error.message || String(error), "error");
  }

  // ---- graphql-transport-ws ----------------------------------------------------------

  /** One WebSocket carrying every subscription; reconnects, resubscribing each. */
  class Live {
    constructor() {
      this.ws = null;
      this.acked = false;
      this.subs = new Map();
      this.nextId = 1;
      this.retry = 0;
      this.timer = null;
    }

    connect() {
      if (this.ws) return;
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      const ws = new WebSocket(scheme + location.host + "/graphql/ws", "graphql-transport-ws");
      this.ws = ws;
      this.acked = false;
      setConnection("connecting");
      ws.onopen = () => {
        const payload = state.token ? { authorization: "Bearer " + state.token } : {};
        ws.send(JSON.stringify({ type: "connection_init", payload }));
      };
      ws.onmessage = (message) => {
        let parsed;
        try {
          parsed = JSON.parse(message.data);
        } catch (_) {
          return;
        }
        this.receive(parsed);
      };
      ws.onclose = (event) => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.acked = false;
        setConnection("offline");
        if (/token/i.test(event.reason || "")) {
          askToken("The live stream refused the token. Enter the server's token.");
          return;
        }
        const delay = Math.min(15000, 500 * 2 ** this.retry++);
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.connect(), delay);
      };
    }

    /** Drops the connection and opens a new one (after a new token). */
    restart() {
      clearTimeout(this.timer);
      const ws = this.ws;
      this.ws = null;
      if (ws) ws.close();
      this.retry = 0;
      this.connect();
    }

    send(message) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
    }

    receive(message) {
      const sub = this.subs.get(message.id);
      switch (message.type) {
        case "connection_ack":
          this.acked = true;
          this.retry = 0;
          setConnection("live");
          for (const [id, s] of this.subs) this.start(id, s);
          break;
        case "ping":
          this.send({ type: "pong" });
          break;
        case "next":
          if (!sub) break;
          if (message.payload.errors && message.payload.errors.length) {
            this.subs.delete(message.id);
            sub.onError(message.payload.errors);
          } else sub.onData(message.payload.data);
          break;
        case "error":
          if (!sub) break;
          this.subs.delete(message.id);
          sub.onError(message.payload);
          break;
        case "complete":
          if (sub) this.subs.delete(message.id);
          break;
        default:
          break;
      }
    }

    start(id, sub) {
      this.send({ id, type: "subscribe", payload: { query: sub.query, variables: sub.variables() } });
    }

    /** Subscribes; `variables` is called at each (re)subscription, so it can resume. */
    subscribe(query, variables, onData, onError) {
      const id = String(this.nextId++);
      const sub = { query, variables, onData, onError: onError || ((errors) => report(new Error(errors[0].message))) };
      this.subs.set(id, sub);
      if (this.acked) this.start(id, sub);
      return () => {
        if (this.subs.delete(id) && this.acked) this.send({ id, type: "complete" });
      };
    }
  }

  const live = new Live();

  function setConnection(status) {
    const el = $("connection");
    el.className = "connection " + status;
    el.textContent = { live: "Live", connecting: "Connecting…", offline: "Reconnecting…" }[status] || status;
  }

  // ---- The token ---------------------------------------------------------------------

  let tokenAsked = false;
  function askToken(message) {
    const dialog = $("login");
    $("login-message").textContent = message || "This server needs a bearer token to show its data.";
    if (!tokenAsked) {
      tokenAsked = true;
      if (typeof dialog.showModal === "function") dialog.showModal();
      else dialog.setAttribute("open", "");
      $("login-token").focus();
    }
  }

  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("login-token").value.trim();
    if (!token) return;
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("login-token").value = "";
    tokenAsked = false;
    $("login").close();
    $("signout").hidden = false;
    start();
  });

  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = "";
    location.reload();
  });

  // ---- Overview: header and numbers --------------------------------------------------

  async function refreshOverview() {
    const data = await gql(Q.overview);
    const { system, relay, projections } = data;
    state.system = system;
    state.head = system.headPosition;
    state.readOnly = system.readOnly;
    document.body.classList.toggle("read-only", system.readOnly);
    for (const button of document.querySelectorAll("button.mutating")) button.disabled = system.readOnly;

    const badges = clear($("status"));
    badges.append(
      badge("Store", system.store + (system.durable ? "" : " · not durable"), system.durable ? "ok" : "muted"),
      badge("Transport", system.transport, "ok"),
      badge("Relay", relay.state + (relay.leased ? " · leased" : ""), relayTone(relay.state)),
    );
    if (system.readOnly) badges.append(badge("Mode", "read-only", "muted"));

    $("kpi-head").textContent = fmtNumber(system.headPosition);
    $("kpi-relay").textContent = fmtNumber(relay.lag);
    $("kpi-relay-sub").textContent = `relayed to ${fmtNumber(relay.relayedPosition)}` +
      (relay.deadLettered ? ` · ${fmtNumber(relay.deadLettered)} refused by transport` : "");
    $("kpi-dlq").textContent = fmtNumber(system.deadLetters);
    $("kpi-dlq").parentElement.classList.toggle("alert", system.deadLetters > 0);
    const badgeCount = $("dlq-count");
    badgeCount.textContent = system.deadLetters ? String(system.deadLetters) : "";
    badgeCount.hidden = !system.deadLetters;

    const worst = projections.reduce((a, p) => (a && a.lag >= p.lag ? a : p), null);
    $("kpi-lag").textContent = worst ? fmtNumber(worst.lag) : "–";
    $("kpi-lag-sub").textContent = worst
      ? `${worst.name}${projections.length > 1 ? ` (worst of ${projections.length})` : ""}`
      : "no checkpointing projections";
    const list = clear($("projections"));
    for (const p of projections) {
      list.append(h("li", { title: "checkpointed " + fmtDateTime(p.checkpointedAt) },
        h("span", { class: "name" }, p.name),
        h("span", { class: "num" + (p.lag > 0 ? " warn" : "") }, fmtNumber(p.lag))));
    }
    return data;
  }

  let overviewSoon = null;
  /** One refresh of the overview shortly, however many events ask for it meanwhile. */
  function refreshOverviewSoon() {
    if (overviewSoon) return;
    overviewSoon = setTimeout(() => {
      overviewSoon = null;
      refreshOverview().catch(() => {});
    }, 250);
  }

  function badge(label, value, tone) {
    return h("span", { class: "badge " + tone }, h("span", { class: "label" }, label), value);
  }

  function relayTone(relayState) {
    if (relayState === "relaying") return "ok";
    if (relayState === "retrying" || relayState === "stopped") return "bad";
    return "muted";
  }

  // ---- Throughput chart --------------------------------------------------------------

  function countEvent(event) {
    const t = Date.parse(event.time);
    const now = Date.now();
    const second = Math.floor(Math.min(Number.isNaN(t) ? now : t, now) / 1000);
    if (second < Math.floor(now / 1000) - CHART_SECONDS) return;
    state.perSecond.set(second, (state.perSecond.get(second) || 0) + 1);
  }

  function drawChart() {
    const now = Math.floor(Date.now() / 1000);
    for (const second of state.perSecond.keys()) if (second <= now - CHART_SECONDS) state.perSecond.delete(second);
    const counts = [];
    for (let s = now - CHART_SECONDS + 1; s <= now; s++) counts.push(state.perSecond.get(s) || 0);
    const max = Math.max(1, ...counts);
    const width = 240;
    const height = 48;
    const bar = width / CHART_SECONDS;
    const chart = clear($("chart"));
    counts.forEach((count, i) => {
      const barHeight = count ? Math.max(2, (count / max) * (height - 4)) : 0;
      chart.append(svg("rect", {
        x: (i * bar).toFixed(2), y: (height - barHeight).toFixed(2),
        width: Math.max(1, bar - 1).toFixed(2), height: barHeight.toFixed(2), class: "bar",
      }, svg("title", {}, `${CHART_SECONDS - 1 - i} s ago: ${count} events`)));
    });
    chart.append(svg("line", { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: "axis" }));
    const lastTen = counts.slice(-11, -1).reduce((a, b) => a + b, 0) / 10;
    $("kpi-rate").textContent = lastTen >= 10 ? Math.round(lastTen).toLocaleString() : lastTen.toFixed(1);
    $("kpi-rate-sub").textContent = `events/s · peak ${fmtNumber(Math.max(...counts))}/s in the last minute` +
      (state.filter.length ? " (filtered)" : "");
  }

  // ---- Live events -------------------------------------------------------------------

  let stopEvents = null;
  let flushScheduled = false;
  const incoming = [];

  function subscribeEvents() {
    if (stopEvents) stopEvents();
    $("filter-error").textContent = "";
    stopEvents = live.subscribe(
      Q.liveEvents,
      () => ({
        types: state.filter.length ? state.filter : null,
        fromPosition: state.lastPosition !== null ? state.lastPosition + 1 : state.startFrom,
      }),
      (data) => {
        const event = data.events;
        if (event.globalPosition !== null && event.globalPosition !== undefined) {
          state.lastPosition = event.globalPosition;
          // The store moved past the key numbers: refresh them now rather than at the next
          // poll, so the head never lags the table below it.
          if (event.globalPosition > state.head) refreshOverviewSoon();
        }
        countEvent(event);
        incoming.push(event);
        // Frames do not run in a background tab: keep only what the table could show.
        if (incoming.length > MAX_ROWS) incoming.splice(0, incoming.length - MAX_ROWS);
        if (!flushScheduled) {
          flushScheduled = true;
          requestAnimationFrame(flushEvents);
        }
      },
      (errors) => {
        const error = errors[0] || {};
        const extensions = error.extensions || {};
        if (extensions.code === "SLOW_CONSUMER" && extensions.resumeFrom !== undefined) {
          toast("The live stream fell behind; catching up.", "info");
          state.lastPosition = extensions.resumeFrom - 1;
          setTimeout(subscribeEvents, 250);
          return;
        }
        stopEvents = null;
        $("filter-error").textContent = error.message || "the subscription failed";
      },
    );
  }

  function flushEvents() {
    flushScheduled = false;
    const batch = incoming.splice(0, incoming.length);
    if (state.paused) {
      state.pending.push(...batch);
      if (state.pending.length > MAX_ROWS) state.pending.splice(0, state.pending.length - MAX_ROWS);
      $("pending").textContent = state.pending.length ? `${state.pending.length} new` : "";
      return;
    }
    addRows(batch);
  }

  function addRows(batch) {
    if (!batch.length) return;
    const body = $("live-rows");
    const fragment = document.createDocumentFragment();
    const fresh = batch.slice(-MAX_ROWS);
    for (let i = fresh.length - 1; i >= 0; i--) fragment.append(eventRow(fresh[i]));
    body.insertBefore(fragment, body.firstChild);
    state.rows.unshift(...fresh.reverse());
    while (state.rows.length > MAX_ROWS) {
      state.rows.pop();
      body.removeChild(body.lastChild);
    }
    $("live-empty").hidden = state.rows.length > 0;
    $("live-count").textContent = `${state.rows.length} shown (newest first, up to ${MAX_ROWS})`;
  }

  function eventRow(event) {
    return h("tr", { class: "clickable", tabindex: 0, onclick: () => openEvent(event), onkeydown: (e) => { if (e.key === "Enter") openEvent(event); } },
      h("td", { class: "num" }, event.globalPosition ?? ""),
      h("td", { class: "time", title: event.time }, fmtTime(event.time)),
      h("td", {}, h("span", { class: "type " + typeClass(event.type) }, event.type)),
      h("td", { class: "mono" }, event.streamId ? `${event.streamId} v${event.streamVersion}` : ""),
      h("td", { class: "mono" }, event.correlationId
        ? h("a", { href: route("trace", event.correlationId), title: event.correlationId, onclick: (e) => e.stopPropagation() }, short(event.correlationId))
        : ""),
      h("td", { class: "mono dim" }, event.source));
  }

  function applyFilter(event) {
    event.preventDefault();
    state.filter = $("filter").value.split(/[\s,]+/).filter(Boolean);
    resetStream();
  }

  function resetStream() {
    clear($("live-rows"));
    state.rows = [];
    state.pending = [];
    state.perSecond.clear();
    $("pending").textContent = "";
    $("live-empty").hidden = false;
    $("live-count").textContent = "";
    state.lastPosition = null;
    const from = Number.parseInt($("from").value, 10);
    state.startFrom = Number.isFinite(from) && from >= 1 ? from : Math.max(1, state.head - CATCH_UP + 1);
    subscribeEvents();
  }

  $("filter-form").addEventListener("submit", applyFilter);
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    $("pause").setAttribute("aria-pressed", String(state.paused));
    if (!state.paused) {
      const pending = state.pending.splice(0, state.pending.length);
      $("pending").textContent = "";
      addRows(pending);
    }
  });

  // ---- Event detail ------------------------------------------------------------------

  async function openEvent(summary) {
    const drawer = $("drawer");
    const body = clear($("drawer-body"));
    $("drawer-title").textContent = summary.type || "Event";
    drawer.hidden = false;
    body.append(h("p", { class: "dim" }, "Loading…"));
    try {
      const data = summary.globalPosition !== null && summary.globalPosition !== undefined
        ? (await gql(Q.eventAt, { position: summary.globalPosition })).eventAt
        : (await gql(Q.eventById, { id: summary.id })).event;
      clear(body);
      if (!data) {
        body.append(h("p", {}, "This event is no longer in the store."));
        return;
      }
      body.append(eventDetail(data));
    } catch (error) {
      clear(body).append(h("p", { class: "error" }, error.message));
    }
  }

  function eventDetail(event) {
    const traceId = event.correlationId || event.id;
    const rows = [
      ["Id", event.id], ["Type", `${event.type} (schema v${event.schemaVersion})`], ["Time", fmtDateTime(event.time)],
      ["Source", event.source], ["Subject", event.subject], ["Stream", event.streamId ? `${event.streamId} v${event.streamVersion}` : null],
      ["Position", event.globalPosition], ["Correlation", event.correlationId], ["Caused by", event.causationId],
      ["traceparent", event.traceparent], ["Content type", event.contentType],
    ];
    return h("div", {},
      h("div", { class: "actions" },
        h("a", { class: "button", href: route("trace", traceId), onclick: closeDrawer }, "Open its trace"),
        h("button", { type: "button", onclick: () => copy(JSON.stringify(event.cloudEvent, null, 2)) }, "Copy CloudEvent")),
      h("dl", { class: "fields" }, rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
        .map(([k, v]) => [h("dt", {}, k), h("dd", { class: "mono" }, v)])),
      h("h3", {}, "CloudEvents JSON"),
      jsonBlock(event.cloudEvent));
  }

  function copy(text) {
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => toast("Copied", "info"), report);
  }

  function closeDrawer() {
    $("drawer").hidden = true;
  }
  $("drawer-close").addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDrawer(); });

  // ---- Trace -------------------------------------------------------------------------

  async function showTrace(correlationId) {
    $("trace-id").value = correlationId || "";
    const out = clear($("trace-out"));
    if (!correlationId) {
      out.append(h("p", { class: "empty" }, "Enter a correlation id (or an event id), or click one in the live stream."));
      return;
    }
    out.append(h("p", { class: "dim" }, "Loading…"));
    let trace;
    try {
      trace = (await gql(Q.trace, { correlationId })).trace;
    } catch (error) {
      clear(out).append(h("p", { class: "error" }, error.message));
      return;
    }
    clear(out);
    const nodes = trace.nodes;
    if (!nodes.length) {
      out.append(h("p", { class: "empty" }, "No event carries this correlation id."));
      return;
    }
    const total = Math.max(...nodes.map((n) => n.offsetMs), 0);
    const byId = new Map(nodes.map((n) => [n.event.id, n]));
    out.append(h("div", { class: "trace-meta" },
      h("span", {}, h("strong", {}, nodes.length), " events"),
      h("span", {}, h("strong", {}, nodes.filter((n) => n.depth === 0).length), " roots"),
      h("span", {}, h("strong", {}, fmtMs(total)), " from first to last"),
      trace.sagaIds.length ? h("span", {}, "sagas: ", trace.sagaIds.map((id) => h("a", { href: route("sagas", id), class: "mono chip" }, short(id)))) : null));
    const table = h("div", { class: "waterfall", role: "table" },
      h("div", { class: "wf-row wf-head", role: "row" },
        h("div", { class: "wf-label" }, "Event (indented under its cause)"),
        h("div", { class: "wf-track" }, h("span", {}, "0"), h("span", { class: "right" }, fmtMs(total)))));
    for (const node of nodes) {
      const parent = node.parentId ? byId.get(node.parentId) : null;
      const from = parent ? parent.offsetMs : node.offsetMs;
      const pct = (ms) => (total > 0 ? (ms / total) * 100 : 0);
      const track = h("div", { class: "wf-track" });
      if (parent && node.offsetMs > from) {
        track.append(h("div", { class: "wf-bar", style: { left: pct(from).toFixed(3) + "%", width: (pct(node.offsetMs) - pct(from)).toFixed(3) + "%" } }));
      }
      track.append(h("div", { class: "wf-dot " + typeClass(node.event.type), style: { left: pct(node.offsetMs).toFixed(3) + "%" } }));
      track.append(h("span", { class: "wf-time" }, "+" + fmtMs(node.offsetMs) + (parent ? ` (${fmtMs(node.offsetMs - from)} after its cause)` : "")));
      table.append(h("div", { class: "wf-row clickable", role: "row", tabindex: 0, onclick: () => openEvent(node.event), onkeydown: (e) => { if (e.key === "Enter") openEvent(node.event); } },
        h("div", { class: "wf-label", style: { paddingLeft: (0.5 + node.depth * 1.25).toFixed(2) + "rem" } },
          node.depth ? h("span", { class: "elbow" }, "└ ") : null,
          h("span", { class: "type " + typeClass(node.event.type) }, node.event.type),
          h("span", { class: "dim mono" }, " " + fmtTime(node.event.time))),
        track));
    }
    out.append(table);
  }

  $("trace-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("trace-id").value.trim();
    location.hash = route("trace", id);
  });

  // ---- Sagas -------------------------------------------------------------------------

  let sagaRefresh = null;
  function scheduleSagaRefresh(sagaId) {
    if (state.view !== "sagas") return;
    clearTimeout(sagaRefresh);
    sagaRefresh = setTimeout(() => {
      loadSagas().catch(report);
      if (currentSaga && (!sagaId || sagaId === currentSaga)) showSaga(currentSaga);
    }, 400);
  }

  let currentSaga = null;
  async function loadSagas() {
    const unfinished = $("sagas-unfinished").checked || null;
    const sagas = (await gql(Q.sagas, { unfinished })).sagas;
    const body = clear($("saga-rows"));
    $("sagas-empty").hidden = sagas.length > 0;
    for (const saga of sagas.slice().reverse()) {
      body.append(h("tr", { class: "clickable" + (saga.id === currentSaga ? " selected" : ""), onclick: () => { location.hash = route("sagas", saga.id); } },
        h("td", {}, statusBadge(saga.status, saga.statusName)),
        h("td", {}, saga.saga),
        h("td", { class: "mono", title: saga.id }, short(saga.id)),
        h("td", { class: "time" }, fmtDateTime(saga.startedAt))));
    }
  }

  function statusBadge(status, name) {
    return h("span", { class: "status-badge s-" + String(status).toLowerCase() }, String(name || status).replace(/_/g, " "));
  }

  async function showSaga(id) {
    currentSaga = id;
    const out = clear($("saga-detail"));
    if (!id) {
      out.append(h("p", { class: "empty" }, "Pick a saga to see its steps, compensations and timeline."));
      return;
    }
    let saga;
    try {
      saga = (await gql(Q.saga, { id })).saga;
    } catch (error) {
      out.append(h("p", { class: "error" }, error.message));
      return;
    }
    if (!saga) {
      out.append(h("p", { class: "empty" }, "No saga with this id."));
      return;
    }
    const chips = [];
    for (const step of saga.completedSteps) {
      const compensated = saga.compensatedSteps.includes(step);
      chips.push(h("span", { class: "step " + (compensated ? "compensated" : "done"), title: compensated ? "completed, then compensated" : "completed" }, step));
    }
    for (const step of saga.runningSteps) chips.push(h("span", { class: "step running", title: "running" }, step));
    if (saga.failure) chips.push(h("span", { class: "step failed", title: "failed" }, saga.failure.step));
    const total = Math.max(...saga.log.map((r) => r.offsetMs), 0);
    const timeline = h("div", { class: "waterfall" },
      h("div", { class: "wf-row wf-head" }, h("div", { class: "wf-label" }, "Log record"),
        h("div", { class: "wf-track" }, h("span", {}, "0"), h("span", { class: "right" }, fmtMs(total)))));
    for (const record of saga.log) {
      const pct = (ms) => (total > 0 ? (ms / total) * 100 : 0);
      const from = record.offsetMs - record.sincePreviousMs;
      const kind = /compensat/.test(record.type) ? "k-comp" : /fail|timed|retry/.test(record.type) ? "k-fail" : /complet|finish/.test(record.type) ? "k-ok" : "k-info";
      timeline.append(h("div", { class: "wf-row " + kind },
        h("div", { class: "wf-label", title: record.type + (record.step ? " · " + record.step : "") },
          h("span", { class: "mono" }, record.type.replace(/^saga\./, "")), record.step ? h("span", { class: "chip" }, record.step) : null),
        h("div", { class: "wf-track" },
          record.sincePreviousMs > 0 ? h("div", { class: "wf-bar", style: { left: pct(from).toFixed(3) + "%", width: (pct(record.offsetMs) - pct(from)).toFixed(3) + "%" } }) : null,
          h("div", { class: "wf-dot", style: { left: pct(record.offsetMs).toFixed(3) + "%" } }),
          h("span", { class: "wf-time", title: fmtTime(record.time) }, "+" + fmtMs(record.offsetMs)))));
    }
    const failures = [saga.failure, ...saga.compensationFailures].filter(Boolean);
    out.append(
      h("div", { class: "detail-head" }, h("h2", {}, saga.saga), statusBadge(saga.status, saga.statusName),
        h("a", { class: "button", href: route("trace", saga.id) }, "Trace")),
      h("p", { class: "dim mono" }, saga.id, " · started ", fmtDateTime(saga.startedAt), " · updated ", fmtDateTime(saga.updatedAt)),
      h("h3", {}, "Steps"), h("div", { class: "steps" }, chips.length ? chips : h("span", { class: "dim" }, "none yet")),
      failures.length ? h("div", { class: "failures" }, failures.map((f, i) => h("div", { class: "failure" },
        h("strong", {}, (i === 0 && saga.failure ? "Step failed: " : "Compensation failed: ") + f.step),
        ` after ${f.attempts} attempt${f.attempts === 1 ? "" : "s"}${f.timedOut ? " (timed out)" : ""}: `, f.error))) : null,
      h("h3", {}, "Timeline"), timeline,
      h("h3", {}, "Context"), jsonBlock(saga.context));
  }

  $("sagas-unfinished").addEventListener("change", () => loadSagas().catch(report));
  $("sagas-refresh").addEventListener("click", () => loadSagas().catch(report));

  // ---- Dead letters ------------------------------------------------------------------

  let currentLetter = null;
  async function loadDeadLetters() {
    const letters = (await gql(Q.deadLetters, { first: 200 })).deadLetters;
    const body = clear($("dlq-rows"));
    $("dlq-empty").hidden = letters.length > 0;
    for (const letter of letters.slice().reverse()) {
      body.append(h("tr", { class: "clickable" + (letter.id === currentLetter ? " selected" : ""), onclick: () => { location.hash = route("dlq", letter.id); } },
        h("td", { class: "time", title: fmtDateTime(letter.lastFailureAt) }, fmtWhen(letter.lastFailureAt)),
        h("td", {}, h("span", { class: "type " + typeClass(letter.event.type) }, letter.event.type)),
        h("td", { class: "mono" }, letter.subscription),
        h("td", { class: "num" }, letter.attempts),
        h("td", { class: "reason", title: letter.reason }, letter.reason),
        h("td", { class: "row-actions" }, letterButtons(letter.id))));
    }
  }

  function letterButtons(id) {
    const stop = (fn) => (event) => { event.stopPropagation(); fn(); };
    return [
      h("button", { type: "button", class: "mutating primary", disabled: state.readOnly, onclick: stop(() => mutateLetter("reprocessDeadLetter", id)) }, "Reprocess"),
      h("button", { type: "button", class: "mutating danger", disabled: state.readOnly, onclick: stop(() => mutateLetter("discardDeadLetter", id)) }, "Discard"),
    ];
  }

  async function mutateLetter(operation, id) {
    if (state.readOnly) return;
    if (operation === "discardDeadLetter" && !confirm("Discard this dead letter for good? Its event stays in the store.")) return;
    try {
      await gql(Q[operation], { id });
      toast(operation === "reprocessDeadLetter" ? "Sent again to its subscription." : "Discarded.", "ok");
      if (currentLetter === id) location.hash = route("dlq");
      await Promise.all([loadDeadLetters(), refreshOverview()]);
    } catch (error) {
      report(error);
      loadDeadLetters().catch(report);
    }
  }

  async function showLetter(id) {
    currentLetter = id;
    const out = clear($("dlq-detail"));
    if (!id) {
      out.append(h("p", { class: "empty" }, "Pick a dead letter to inspect it."));
      return;
    }
    let letter;
    try {
      letter = (await gql(Q.deadLetter, { id })).deadLetter;
    } catch (error) {
      out.append(h("p", { class: "error" }, error.message));
      return;
    }
    if (!letter) {
      out.append(h("p", { class: "empty" }, "This dead letter is gone (reprocessed or discarded)."));
      return;
    }
    out.append(
      h("div", { class: "detail-head" }, h("h2", {}, letter.event.type), h("div", { class: "actions" }, letterButtons(letter.id))),
      h("dl", { class: "fields" },
        h("dt", {}, "Subscription"), h("dd", { class: "mono" }, letter.subscription),
        h("dt", {}, "Topic"), h("dd", { class: "mono" }, letter.topic),
        h("dt", {}, "Attempts"), h("dd", {}, letter.attempts),
        h("dt", {}, "First failure"), h("dd", {}, fmtDateTime(letter.firstFailureAt)),
        h("dt", {}, "Last failure"), h("dd", {}, fmtDateTime(letter.lastFailureAt)),
        h("dt", {}, "Letter id"), h("dd", { class: "mono" }, letter.id)),
      h("h3", {}, "Why it failed"), h("pre", { class: "reason-block" }, letter.reason),
      h("h3", {}, "Event ", h("a", { href: route("trace", letter.event.correlationId || letter.event.id) }, "(trace)")),
      jsonBlock(letter.event.cloudEvent));
  }

  $("dlq-refresh").addEventListener("click", () => loadDeadLetters().catch(report));

  // ---- Views and routing -------------------------------------------------------------

  function onRoute() {
    const parts = location.hash.replace(/^#\/?/, "").split("/").map((p) => { try { return decodeURIComponent(p); } catch (_) { return p; } });
    const view = ["live", "trace", "sagas", "dlq"].includes(parts[0]) ? parts[0] : "live";
    state.view = view;
    for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== "view-" + view;
    for (const tab of document.querySelectorAll("nav.tabs a")) tab.setAttribute("aria-current", tab.dataset.view === view ? "page" : "false");
    const id = parts.slice(1).join("/");
    if (view === "trace") showTrace(id);
    if (view === "sagas") {
      loadSagas().catch(report);
      showSaga(id || null);
    }
    if (view === "dlq") {
      loadDeadLetters().catch(report);
      showLetter(id || null);
    }
  }

  // ---- Start -------------------------------------------------------------------------

  let started = false;
  async function start() {
    try {
      await refreshOverview();
    } catch (error) {
      if (error instanceof AuthError) return;
      // The server may be starting or briefly unreachable: try again.
      setConnection("offline");
      report(error);
      setTimeout(start, 3000);
      return;
    }
    $("signout").hidden = !state.token;
    if (started) {
      live.restart();
      onRoute();
      return;
    }
    started = true;
    state.startFrom = Math.max(1, state.head - CATCH_UP + 1);
    live.connect();
    subscribeEvents();
    live.subscribe(Q.sagaUpdates, () => ({ fromPosition: null }), (data) => scheduleSagaRefresh(data.sagaUpdates.sagaId));
    // After a reconnection, only letters parked since the last one seen.
    let since = new Date().toISOString();
    live.subscribe(Q.deadLetterArrivals, () => ({ since }), (data) => {
      const letter = data.deadLetterArrivals;
      if (Date.parse(letter.lastFailureAt) > Date.parse(since)) since = letter.lastFailureAt;
      toast(`Dead letter: ${letter.event.type} failed in ${letter.subscription}`, "error");
      refreshOverview().catch(report);
      if (state.view === "dlq") loadDeadLetters().catch(report);
    });
    setInterval(() => refreshOverview().catch(() => {}), POLL_MS);
    setInterval(drawChart, 1000);
    drawChart();
    window.addEventListener("hashchange", onRoute);
    onRoute();
  }

  setConnection("connecting");
  start();
})();
