// The console's script: copy buttons, confirmations, live refresh, charts
// (uPlot) and the playground's streaming. Pages work without it.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content ?? "";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#64748b"];

// Copy a secret to the clipboard.
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", async () => {
    const input = document.getElementById(button.dataset.copy);
    const status = document.getElementById("copy-status");
    try {
      await navigator.clipboard.writeText(input.value);
    } catch {
      input.select();
      document.execCommand("copy");
    }
    if (status) status.textContent = "Copied";
  });
}

// Ask before a change that cannot be undone.
for (const form of document.querySelectorAll("form[data-confirm]")) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
}

// Re-read a part of the page every few seconds.
for (const region of document.querySelectorAll("[data-refresh][id]")) {
  const seconds = Number(region.dataset.refresh) || 5;
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (!response.ok) return;
      const page = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = page.getElementById(region.id);
      if (fresh) region.innerHTML = fresh.innerHTML;
    } catch { /* the next tick tries again */ }
  }, seconds * 1000);
}

function chart(element, labels, data, options) {
  const percent = options.percent;
  const scales = { x: { time: true } };
  if (options.lastHour) scales.x.range = () => { const now = Date.now() / 1000; return [now - 3600, now]; };
  if (percent) scales.y = { range: (u, min, max) => [0, Math.max(1, max ?? 0)] };
  const opts = {
    width: Math.max(element.clientWidth, 240),
    height: 160,
    legend: { show: labels.length > 1 },
    scales,
    axes: [{}, { size: 50, values: (u, ticks) => ticks.map((v) => percent ? Math.round(v * 100) + "%" : v) }],
    series: [{}].concat(labels.map((label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: true, size: 4 } }))),
  };
  const plot = new uPlot(opts, data, element);
  window.addEventListener("resize", () => plot.setSize({ width: Math.max(element.clientWidth, 240), height: 160 }));
  return plot;
}

// The overview: one chart per figure, fed by the samples, polled.
const overview = document.getElementById("overview-charts");
if (overview && window.uPlot) {
  const columns = (samples, names) => [samples.map((s) => s.t)].concat(names.map((n) => samples.map((s) => s[n] ?? null)));
  let samples = JSON.parse(overview.dataset.samples || "[]");
  const plots = [...overview.querySelectorAll(".chart")].map((element) => {
    const names = element.dataset.series.split(",");
    const labels = (element.dataset.labels || element.dataset.series).split(",");
    return { names, plot: chart(element, labels, columns(samples, names), { percent: element.dataset.percent === "1", lastHour: true }) };
  });
  const format = { requests_per_s: (v) => v.toFixed(1), tokens_per_s: (v) => v.toFixed(1), ttft_p50_ms: (v) => v.toFixed(1) + " ms", ttft_p99_ms: (v) => v.toFixed(1) + " ms", error_rate: (v) => (v * 100).toFixed(1) + " %", cache_hit_ratio: (v) => (v * 100).toFixed(1) + " %" };
  setInterval(async () => {
    if (document.hidden) return;
    try {
      const response = await fetch(overview.dataset.source, { credentials: "same-origin" });
      if (!response.ok) return;
      samples = await response.json();
      for (const { names, plot } of plots) plot.setData(columns(samples, names));
      const latest = samples[samples.length - 1];
      if (!latest) return;
      for (const dd of document.querySelectorAll("[data-figure]")) {
        const value = latest[dd.dataset.figure];
        dd.textContent = value == null ? "–" : format[dd.dataset.figure](value);
      }
    } catch { /* the next tick tries again */ }
  }, 5000);
}

// Usage: requests and tokens per bucket, one line per group.
const usage = document.getElementById("usage-charts");
if (usage && window.uPlot) {
  const data = JSON.parse(usage.dataset.usage);
  for (const element of usage.querySelectorAll(".chart")) {
    const metric = element.dataset.metric;
    chart(element, data.series.map((s) => s.name), [data.buckets].concat(data.series.map((s) => s[metric])), {});
  }
}

// The playground: a conversation, streamed over the public API.
const playground = document.getElementById("playground");
if (playground) {
  const conversation = document.getElementById("conversation");
  const messages = [];
  const error = document.getElementById("playground-error");
  const show = (role, text) => {
    const turn = document.createElement("div");
    turn.className = "turn " + role;
    const who = document.createElement("strong");
    who.textContent = role === "user" ? "You" : "Model";
    const body = document.createElement("p");
    body.textContent = text;
    turn.append(who, body);
    conversation.append(turn);
    return body;
  };
  document.getElementById("clear").addEventListener("click", () => {
    messages.length = 0;
    conversation.replaceChildren();
  });
  playground.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    const input = document.getElementById("message");
    const text = input.value.trim();
    if (!text) return;
    const system = document.getElementById("system").value.trim();
    if (messages.length === 0 && system) messages.push({ role: "system", content: system });
    messages.push({ role: "user", content: text });
    show("user", text);
    input.value = "";
    const own = playground.querySelector('input[name="key-choice"]:checked').value === "own";
    const ask = { model: document.getElementById("model").value, messages };
    const maxTokens = parseInt(document.getElementById("max-tokens").value, 10);
    if (maxTokens > 0) ask.max_tokens = maxTokens;
    if (own) ask.key = document.getElementById("own-key").value;
    const send = document.getElementById("send");
    send.disabled = true;
    const answer = show("assistant", "");
    const started = performance.now();
    let first = null;
    let usage = null;
    let reply = "";
    try {
      const response = await fetch(playground.dataset.endpoint, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
        body: JSON.stringify(ask),
      });
      document.getElementById("request-id").textContent = response.headers.get("x-request-id") ?? "–";
      if (!response.ok) {
        const body = await response.text();
        let message = body;
        try { message = JSON.parse(body).error.message; } catch { /* not JSON */ }
        throw new Error(response.status + ": " + message);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
            const chunk = JSON.parse(line.slice(6));
            if (chunk.error) throw new Error(chunk.error.message);
            const delta = chunk.choices?.[0]?.delta?.content;
            if (delta) {
              if (first === null) {
                first = performance.now();
                document.getElementById("ttft").textContent = (first - started).toFixed(0) + " ms";
              }
              reply += delta;
              answer.textContent = reply;
            }
            if (chunk.usage) usage = chunk.usage;
          }
        }
      }
      messages.push({ role: "assistant", content: reply });
      if (usage && first !== null) {
        const seconds = (performance.now() - first) / 1000;
        const rate = usage.completion_tokens > 1 && seconds > 0 ? (usage.completion_tokens - 1) / seconds : null;
        document.getElementById("tps").textContent = rate === null ? "–" : rate.toFixed(1);
      }
    } catch (err) {
      messages.pop();
      answer.parentElement.remove();
      error.textContent = String(err.message || err);
      error.hidden = false;
    } finally {
      send.disabled = false;
    }
  });
}
