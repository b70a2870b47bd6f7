// The chat page: a conversation with the server's /v1/chat/completions, streamed (Server-Sent
// Events read from fetch's body), stoppable (the aborted request closes the connection and the
// server cancels the generation). Plain browser JavaScript: no build step, no library, nothing
// loaded from anywhere but this server. Text from the model or the user is only ever set as
// text (textContent / text nodes), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const SETTINGS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"];
const STORE = "rosenblatt.chat.settings";
const KEY_STORE = "rosenblatt.chat.key";

const state = {
  history: [],          // [{role, content}] of the conversation (the system prompt is added per request)
  controller: null,     // the AbortController of the answer being streamed
  defaults: {},         // the fields' initial values (the "Defaults" button)
  modelId: null,
};

// -- settings -------------------------------------------------------------------------------

function saveSettings() {
  const values = { system: $("system-prompt").value };
  for (const name of SETTINGS) values[name] = $(name).value;
  try { localStorage.setItem(STORE, JSON.stringify(values)); } catch (e) { /* storage off: fine */ }
}

function loadSettings() {
  for (const name of SETTINGS) state.defaults[name] = $(name).value;
  let values = null;
  try { values = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (e) { values = null; }
  if (values && typeof values === "object") {
    if (typeof values.system === "string") $("system-prompt").value = values.system;
    for (const name of SETTINGS) if (typeof values[name] === "string") $(name).value = values[name];
  }
  try { $("api-key").value = sessionStorage.getItem(KEY_STORE) || ""; } catch (e) { /* ignore */ }
}

function resetSettings() {
  for (const name of SETTINGS) $(name).value = state.defaults[name];
  $("system-prompt").value = "";
  saveSettings();
}

/** The sampling fields as request fields: empty ones are left to the server's defaults. */
function samplingFields() {
  const out = {};
  for (const name of SETTINGS) {
    const raw = $(name).value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    // the server validates (ranges, integers) and its message names the field
    out[name] = Number.isFinite(value) ? value : raw;
  }
  return out;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// -- the model's info -----------------------------------------------------------------------

function formatCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + " B";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

async function loadInfo() {
  const idEl = $("model-id"), detailsEl = $("model-details");
  try {
    const res = await fetch("/health", { cache: "no-store" });        // no key needed
    const health = await res.json();
    state.modelId = health.model;
    idEl.textContent = health.model;
    idEl.title = "status: " + health.status;
  } catch (e) {
    idEl.textContent = "server unreachable";
    detailsEl.textContent = "";
    return;
  }
  try {
    const res = await fetch("/props", { headers: headers(), cache: "no-store" });
    if (res.status === 401) {
      detailsEl.textContent = "API key needed: enter it under Settings";
      detailsEl.dataset.needsKey = "true";
      openSettings(true);
      return;
    }
    if (!res.ok) { detailsEl.textContent = ""; return; }
    const p = await res.json();
    delete detailsEl.dataset.needsKey;
    const parts = [p.architecture];
    if (p.parameters) parts.push(formatCount(p.parameters) + " params");
    if (p.quantization) parts.push(p.quantization);
    parts.push("ctx " + p.n_ctx + (p.n_ctx_train ? " (trained " + p.n_ctx_train + ")" : ""));
    parts.push(p.device);
    parts.push(p.slots + (p.slots === 1 ? " slot" : " slots"));
    detailsEl.textContent = parts.join(" · ");
    detailsEl.title = p.name || "";
  } catch (e) {
    detailsEl.textContent = "";
  }
}

// -- the conversation -----------------------------------------------------------------------

function addMessage(role, text) {
  $("empty-hint").hidden = true;
  const node = $("message-template").content.firstElementChild.cloneNode(true);
  node.classList.add(role);
  node.dataset.testid = "message-" + role;
  node.dataset.role = role;
  node.querySelector(".role").textContent = role === "user" ? "You" : role === "assistant" ? "Model" : "Error";
  node.querySelector(".content").textContent = text;
  const list = $("messages");
  const stick = nearBottom(list);
  list.append(node);
  if (stick) list.scrollTop = list.scrollHeight;
  return node;
}

function nearBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 80;
}

function showError(message, status) {
  const node = addMessage("error", (status ? "Error " + status + ": " : "Error: ") + message);
  node.dataset.testid = "error";
  return node;
}

/** Why a request failed, from the server's OpenAI-style body (or the status line). */
async function errorMessage(res) {
  let message = res.statusText || "request failed";
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON */ }
  const retry = res.headers.get("Retry-After");
  if (retry) message += " (retry after " + retry + " s)";
  return message;
}

/** The events of a Server-Sent Events body, as the strings of their data fields. */
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "generating" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function statsLine(node, s) {
  const el = node.querySelector(".stats");
  const parts = [];
  const n = s.completionTokens;
  parts.push((s.exact ? "" : "~") + n + (n === 1 ? " token" : " tokens"));
  if (s.tokensPerSecond !== null) parts.push(s.tokensPerSecond.toFixed(1) + " tokens/s");
  if (s.promptTokens !== null) parts.push("prompt " + s.promptTokens);
  if (s.firstToken !== null) parts.push("first token " + s.firstToken.toFixed(2) + " s");
  if (s.finish) parts.push(s.finish === "length" ? "stopped at max_tokens" : s.finish);
  el.textContent = parts.join(" · ");
  el.dataset.testid = "stats";
  el.dataset.completionTokens = String(n);
  if (s.tokensPerSecond !== null) el.dataset.tokensPerSecond = s.tokensPerSecond.toFixed(3);
  if (s.promptTokens !== null) el.dataset.promptTokens = String(s.promptTokens);
}

async function send() {
  if (state.controller) return;
  const input = $("prompt");
  const text = input.value;
  if (!text.trim()) return;
  input.value = "";
  saveSettings();

  const messages = [];
  const system = $("system-prompt").value;
  if (system.trim()) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: text });
  const body = { messages, stream: true, stream_options: { include_usage: true }, ...samplingFields() };

  addMessage("user", text);
  const node = addMessage("assistant", "");
  node.dataset.state = "waiting";
  const content = node.querySelector(".content");
  const list = $("messages");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);

  const t0 = performance.now();
  let answer = "", pieces = 0, tFirst = null, tLast = null, usage = null, finish = null, outcome = "done";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const err = new Error(await errorMessage(res));
      err.status = res.status;
      throw err;
    }
    node.dataset.state = "streaming";
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the generation failed");
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        const now = performance.now();
        if (tFirst === null) tFirst = now;
        tLast = now;
        pieces += 1;
        answer += piece;
        const stick = nearBottom(list);
        content.append(piece);                          // a text node: never parsed as HTML
        if (stick) list.scrollTop = list.scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
  } catch (e) {
    if (e.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      showError(e instanceof TypeError ? "cannot reach the server (" + e.message + ")" : e.message, e.status);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }

  content.textContent = answer;                         // one text node again
  node.dataset.state = outcome;
  if (outcome === "error" && !answer) {
    node.remove();                                      // nothing to keep: the question can be sent again
    if (!input.value) input.value = text;
    const users = list.querySelectorAll(".message.user");
    users[users.length - 1].classList.add("failed");
    input.focus();
    return;
  }
  state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  const n = usage ? usage.completion_tokens : pieces;
  const dt = tFirst !== null && tLast !== null ? (tLast - tFirst) / 1000 : 0;
  statsLine(node, {
    completionTokens: n,
    exact: usage !== null,
    tokensPerSecond: n > 1 && dt > 0 ? (n - 1) / dt : null,
    promptTokens: usage ? usage.prompt_tokens : null,
    firstToken: tFirst !== null ? (tFirst - t0) / 1000 : null,
    finish: outcome === "stopped" ? "stopped" : finish === "stop" ? null : finish,
  });
  input.focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  for (const node of $("messages").querySelectorAll(".message")) node.remove();
  $("empty-hint").hidden = false;
  $("prompt").focus();
}

function openSettings(open) {
  document.body.dataset.settings = open ? "open" : "closed";
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

// -- wiring ---------------------------------------------------------------------------------

function init() {
  loadSettings();
  setBusy(false);
  openSettings(window.matchMedia("(min-width: 900px)").matches);
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("toggle-settings").addEventListener("click", () => openSettings(document.body.dataset.settings !== "open"));
  $("reset-settings").addEventListener("click", resetSettings);
  for (const name of [...SETTINGS, "system-prompt"]) $(name).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => {
    try { sessionStorage.setItem(KEY_STORE, $("api-key").value.trim()); } catch (e) { /* ignore */ }
    loadInfo();
  });
  loadInfo();
  $("prompt").focus();
}

init();
