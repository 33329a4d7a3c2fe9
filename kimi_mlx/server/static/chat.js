// The chat page of `kimi-mlx serve`: conversations kept in localStorage, replies streamed from
// /v1/chat/completions (SSE) and rendered as Markdown. Model output only ever reaches the page as DOM text
// nodes (textContent, createTextNode): no string is parsed as HTML anywhere in this file.
"use strict";

const STORE = { conversations: "kimi-mlx.conversations", current: "kimi-mlx.current", settings: "kimi-mlx.settings" };
const KEY_STORE = "kimi-mlx.api-key"; // sessionStorage: gone when the tab closes

// The settings panel and the request body both come from this list: a new option is one entry here.
// `param` is the request field; an empty field sends nothing (the server's default).
const SETTINGS = [
  { key: "temperature", label: "Temperature", param: "temperature", min: 0, max: 2, step: 0.05, value: 0.7 },
  { key: "max_tokens", label: "Max tokens", param: "max_tokens", min: 1, step: 1, value: 1024 },
];

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = Object.assign(document.createElement(tag), props);
  for (const c of children) node.append(c); // strings become text nodes
  return node;
};

// ---- Markdown ---------------------------------------------------------------------------------------
// Blocks: fenced and indented code, headings, lists, quotes, rules, paragraphs; inline: code, bold, italic,
// links (http, https, mailto only) and bare URLs. Every piece of text becomes a text node.
const markdown = (() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?/;
  const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])\s+/;
  const INDENTED = /^(?: {4}|\t)/;
  const INLINE = new RegExp([
    /(?<tick>`+)(?<code>[^\n]+?)\k<tick>(?!`)/.source,
    /\*\*(?<strong>[^\s*](?:[^*\n]*[^\s*])?)\*\*/.source,
    /(?<!\w)__(?<strong2>[^\s_](?:[^_\n]*[^\s_])?)__(?!\w)/.source,
    /\*(?<em>[^\s*](?:[^*\n]*[^\s*])?)\*/.source,
    /(?<!\w)_(?<em2>[^\s_](?:[^_\n]*[^\s_])?)_(?!\w)/.source,
    /\[(?<label>[^\]\n]+)\]\(\s*(?<href>[^()\s]+)\s*\)/.source,
    /<(?<auto>https?:\/\/[^\s<>]+)>/.source,
    /(?<url>https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"])/.source,
    /(?<br>\n)/.source,
  ].join("|"), "g");
  const MAX_DEPTH = 8; // nested quotes and lists deeper than this stay plain text

  function safeUrl(url) {
    try {
      const u = new URL(url, location.href);
      return ["http:", "https:", "mailto:"].includes(u.protocol) ? u.href : null;
    } catch {
      return null;
    }
  }

  // links = false inside a link's label: no anchor inside an anchor
  function inline(text, parent, depth = 0, links = true) {
    let last = 0;
    for (const m of text.matchAll(INLINE)) {
      const g = m.groups;
      if (m.index > last) parent.append(text.slice(last, m.index));
      last = m.index + m[0].length;
      if (g.code) parent.append(el("code", { textContent: g.code }));
      else if (g.strong || g.strong2) parent.append(nest("strong", g.strong || g.strong2, depth, links));
      else if (g.em || g.em2) parent.append(nest("em", g.em || g.em2, depth, links));
      else if (g.br) parent.append(el("br"));
      else if (!links) parent.append(m[0]);
      else if (g.label) {
        const href = safeUrl(g.href);
        parent.append(href ? link(href, nest("a", g.label, depth, false)) : m[0]);
      } else {
        const href = safeUrl(g.auto || g.url);
        parent.append(href ? link(href, el("a", { textContent: g.auto || g.url })) : m[0]);
      }
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function nest(tag, text, depth, links) {
    const node = el(tag);
    if (depth < MAX_DEPTH) inline(text, node, depth + 1, links);
    else node.textContent = text;
    return node;
  }

  function link(href, a) {
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    return a;
  }

  function codeBlock(code, lang) {
    const pre = el("pre", {}, el("code", { textContent: code }));
    const copy = el("button", { type: "button", className: "copy", textContent: "Copy" });
    copy.dataset.testid = "copy-code";
    copy.addEventListener("click", () => copyText(code, copy));
    return el("div", { className: "code" }, el("div", { className: "code-head" }, el("span", { textContent: lang }), copy), pre);
  }

  function startsBlock(line) {
    return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
  }

  function blocks(lines, parent, depth) {
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (!line.trim()) {
        i++;
      } else if ((m = FENCE.exec(line))) {
        const close = new RegExp("^ {0,3}" + m[1][0] + "{" + m[1].length + ",}\\s*$");
        const body = [];
        for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
        i++; // the closing fence (a reply still streaming may not have it yet)
        parent.append(codeBlock(body.join("\n"), m[2]));
      } else if (INDENTED.test(line)) {
        const body = [];
        for (; i < lines.length && (INDENTED.test(lines[i]) || !lines[i].trim()); i++) body.push(lines[i].replace(INDENTED, ""));
        while (body.length && !body[body.length - 1].trim()) body.pop();
        parent.append(codeBlock(body.join("\n"), ""));
      } else if ((m = HEADING.exec(line))) {
        const h = el("h" + m[1].length);
        inline(m[2], h);
        parent.append(h);
        i++;
      } else if (RULE.test(line)) {
        parent.append(el("hr"));
        i++;
      } else if (QUOTE.test(line) && depth < MAX_DEPTH) {
        const body = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) body.push(lines[i].replace(QUOTE, ""));
        const q = el("blockquote");
        blocks(body, q, depth + 1);
        parent.append(q);
      } else if ((m = ITEM.exec(line)) && depth < MAX_DEPTH) {
        const ordered = /\d/.test(m[2]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered && parseInt(m[2], 10) !== 1) list.start = parseInt(m[2], 10);
        while (i < lines.length && (m = ITEM.exec(lines[i])) && /\d/.test(m[2]) === ordered) {
          const indent = m[0].length;
          const body = [lines[i].slice(indent)];
          for (i++; i < lines.length; i++) {
            const next = lines[i];
            const indented = next.length - next.trimStart().length >= Math.min(indent, 4);
            if (next.trim() && !indented && (ITEM.test(next) || startsBlock(next))) break;
            if (!next.trim() && !(lines[i + 1] || "").match(/^\s{2,}\S/)) break;
            body.push(next.trim() ? next.slice(Math.min(indent, next.length - next.trimStart().length)) : "");
          }
          const li = el("li");
          if (body.length === 1) inline(body[0], li);
          else blocks(body, li, depth + 1);
          list.append(li);
          while (i < lines.length && !lines[i].trim() && ITEM.test(lines[i + 1] || "")) i++;
        }
        parent.append(list);
      } else {
        const body = [line];
        for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) body.push(lines[i]);
        const p = el("p");
        inline(body.join("\n"), p);
        parent.append(p);
      }
    }
  }

  return (text) => {
    const out = document.createDocumentFragment();
    blocks(text.replace(/\r\n?/g, "\n").split("\n"), out, 0);
    return out;
  };
})();

// ---- storage ----------------------------------------------------------------------------------------
function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function persist() {
  const kept = {};
  for (const c of Object.values(state.conversations)) if (c.messages.length) kept[c.id] = c;
  try {
    localStorage.setItem(STORE.conversations, JSON.stringify(kept));
    localStorage.setItem(STORE.current, JSON.stringify(state.current?.id ?? null));
  } catch (e) {
    notice(`could not save the conversations in this browser: ${e.message}`);
  }
}

// ---- state ------------------------------------------------------------------------------------------
const state = {
  conversations: {}, // id -> {id, title, system, messages: [{role, content, stats?, error?}], updated}
  current: null,
  settings: {},
  model: null,
  busy: null, // {controller, message} while a reply streams
};

function newConversation() {
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  return { id, title: "New chat", system: "", messages: [], updated: Date.now() };
}

function open(conversation) {
  stop();
  state.current = conversation;
  state.conversations[conversation.id] = conversation;
  $("system").value = conversation.system || "";
  $("system-box").open = Boolean(conversation.system);
  persist();
  renderSidebar();
  renderMessages();
  $("prompt").focus();
}

// ---- rendering --------------------------------------------------------------------------------------
function notice(text) {
  $("notice").textContent = text;
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  const sorted = Object.values(state.conversations).filter((c) => c.messages.length || c === state.current);
  sorted.sort((a, b) => b.updated - a.updated);
  for (const c of sorted) {
    const pick = el("button", { type: "button", className: "pick", textContent: c.title, title: c.title });
    pick.addEventListener("click", () => c !== state.current && open(c));
    const del = el("button", { type: "button", className: "delete", textContent: "×", title: "Delete this conversation" });
    del.dataset.testid = "delete-chat";
    del.addEventListener("click", () => remove(c));
    const item = el("li", { className: c === state.current ? "current" : "" }, pick, del);
    item.dataset.testid = "conversation";
    list.append(item);
  }
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...state.current.messages.map((m, i) => messageView(m, i)));
  box.scrollTop = box.scrollHeight;
}

function button(label, testid, action) {
  const b = el("button", { type: "button", textContent: label });
  b.dataset.testid = testid;
  b.addEventListener("click", action);
  return b;
}

function messageView(m, index) {
  const conv = state.current;
  const body = el("div", { className: "body" });
  const view = el("article", { className: "msg " + m.role }, body);
  view.dataset.testid = "message";
  view.dataset.role = m.role;
  if (m.role === "assistant") {
    fillReply(body, m);
    const stats = el("div", { className: "stats", textContent: statsText(m) });
    stats.dataset.testid = "stats";
    for (const k of ["completion_tokens", "prompt_tokens", "cached_tokens"]) {
      if (m.stats && m.stats[k] !== undefined) stats.dataset[k.replace(/_(\w)/g, (_, c) => c.toUpperCase())] = m.stats[k];
    }
    const tools = el("div", { className: "tools" }, stats);
    if (m !== state.busy?.message) {
      if (m.content) tools.append(button("Copy", "copy-reply", (e) => copyText(m.content, e.currentTarget)));
      if (index === conv.messages.length - 1) tools.append(button("Regenerate", "regenerate", regenerate));
    }
    view.append(tools);
  } else {
    body.textContent = m.content;
    if (!state.busy) view.append(el("div", { className: "tools" }, button("Edit", "edit", () => edit(view, index))));
  }
  return view;
}

function fillReply(body, m) {
  body.replaceChildren(markdown(m.content));
  if (m.error) {
    const err = el("div", { className: "error", role: "alert", textContent: m.error });
    err.dataset.testid = "error";
    body.append(err);
  } else if (!m.content && m.stats) {
    const note = m.stats.stopped ? "(stopped before any text)" : "(the model returned an empty reply)";
    body.append(el("div", { className: "note", textContent: note }));
  } else if (!m.content && m.progress) {
    body.append(el("div", { className: "note", textContent: `reading the prompt: ${m.progress}` }));
  }
}

function statsText(m) {
  const s = m.stats;
  if (!s) return m === state.busy?.message ? "…" : "";
  if (s.stopped) return `stopped after ${s.chunks} chunk${s.chunks === 1 ? "" : "s"}`;
  if (s.completion_tokens === undefined) return "";
  const parts = [`${s.completion_tokens} tokens`];
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  parts.push(`${s.cached_tokens} of ${s.prompt_tokens} prompt tokens cached`);
  if (s.finish === "length") parts.push("hit max tokens");
  return parts.join(" · ");
}

async function copyText(text, btn) {
  const label = btn.textContent;
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    // the Clipboard API needs focus and permission; the older copy command works without them
    const area = el("textarea", { value: text });
    document.body.append(area);
    area.select();
    ok = document.execCommand("copy");
    area.remove();
  }
  btn.textContent = ok ? "Copied" : "Copy failed";
  setTimeout(() => (btn.textContent = label), 1200);
}

// ---- conversation actions ---------------------------------------------------------------------------
function send(text) {
  if (state.busy || !text.trim()) return false;
  const conv = state.current;
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.trim().split("\n")[0].slice(0, 48);
  reply(conv);
  return true;
}

function sendPrompt() {
  if (send($("prompt").value)) $("prompt").value = "";
}

function regenerate() {
  const msgs = state.current.messages;
  if (state.busy || msgs[msgs.length - 1]?.role !== "assistant") return;
  msgs.pop();
  reply(state.current);
}

function edit(view, index) {
  if (state.busy) return;
  const conv = state.current;
  const area = el("textarea", { value: conv.messages[index].content, rows: 3 });
  area.dataset.testid = "edit-box";
  const resend = () => {
    if (state.busy || !area.value.trim()) return;
    conv.messages.splice(index);
    if (index === 0) conv.title = "New chat"; // send() titles it after the new first message
    send(area.value);
  };
  area.addEventListener("keydown", (e) => enterSends(e, resend));
  const body = view.querySelector(".body");
  body.replaceChildren(area);
  view.querySelector(".tools").replaceChildren(button("Send", "edit-send", resend), button("Cancel", "edit-cancel", renderMessages));
  area.focus();
}

function remove(conv) {
  if (conv === state.current) stop();
  delete state.conversations[conv.id];
  if (conv === state.current) open(newConversation());
  else {
    persist();
    renderSidebar();
  }
}

function stop() {
  if (state.busy) state.busy.controller.abort();
}

function setBusy(busy) {
  state.busy = busy;
  $("send").hidden = Boolean(busy);
  $("stop").hidden = !busy;
}

function requestBody(conv) {
  const messages = [];
  if (conv.system.trim()) messages.push({ role: "system", content: conv.system });
  for (const m of conv.messages) {
    if (m.role === "assistant" && !m.content) continue; // a failed or empty reply is not part of the conversation
    messages.push({ role: m.role, content: m.content });
  }
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  for (const s of SETTINGS) {
    const v = state.settings[s.key];
    if (v !== "" && v !== undefined && v !== null) body[s.param] = Number(v);
  }
  return body;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorText(resp) {
  const text = await resp.text();
  try {
    return JSON.parse(text).error.message || text;
  } catch {
    return `${resp.status} ${resp.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
  }
}

// Streams one assistant reply for `conv` into a new message; the message's view is redrawn at most once a
// frame. Stop aborts the fetch, which closes the connection: the server cancels the turn when it sees that.
async function reply(conv) {
  const m = { role: "assistant", content: "" };
  conv.messages.push(m);
  conv.updated = Date.now();
  const controller = new AbortController();
  setBusy({ controller, message: m });
  persist();
  renderSidebar();
  renderMessages();
  const view = $("messages").lastElementChild;
  let frame = 0;
  const redraw = () => {
    frame = 0;
    fillReply(view.querySelector(".body"), m);
    view.querySelector(".stats").textContent = statsText(m);
    const box = $("messages");
    if (box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  };
  let saved = performance.now();
  const schedule = () => {
    frame = frame || requestAnimationFrame(redraw);
    if (performance.now() - saved > 1000) { // a reload mid-reply keeps what has come so far
      saved = performance.now();
      persist();
    }
  };
  let first = 0, end = 0, chunks = 0, usage = null, finish = null, done = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(conv)), signal: controller.signal,
    });
    if (!resp.ok) {
      m.error = await errorText(resp);
      if (resp.status === 401) askKey("the server refused the API key; enter it again");
      return;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    while (!done) {
      const { value, done: closed } = await reader.read();
      if (closed) break;
      buffer += value;
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = events.pop();
      for (const event of events) {
        for (const line of event.split(/\r?\n/)) {
          const progress = /^: prefill (\d+)\/(\d+)/.exec(line);
          if (progress) m.progress = `${progress[1]} / ${progress[2]} tokens`;
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") {
            done = true;
            break;
          }
          const obj = JSON.parse(data);
          if (obj.error) {
            m.error = obj.error.message || JSON.stringify(obj.error);
            continue;
          }
          if (obj.usage) usage = obj.usage;
          const choice = obj.choices?.[0];
          if (choice?.delta?.content) {
            m.content += choice.delta.content;
            chunks++;
            first = first || performance.now();
          }
          if (choice?.finish_reason) {
            finish = choice.finish_reason;
            end = performance.now();
          }
        }
      }
      schedule();
    }
    if (!done && !m.error) m.error = "the connection closed before the reply ended";
  } catch (e) {
    if (e.name === "AbortError") m.stats = { stopped: true, chunks };
    else if (e instanceof TypeError) m.error = `no reply from the server: ${e.message}`; // fetch's network failure
    else m.error = `the reply could not be read: ${e.message}`;
  } finally {
    if (frame) cancelAnimationFrame(frame);
    delete m.progress;
    if (usage) {
      const n = usage.completion_tokens;
      m.stats = {
        completion_tokens: n, prompt_tokens: usage.prompt_tokens, finish,
        cached_tokens: usage.prompt_tokens_details?.cached_tokens ?? 0,
        // tokens after the first over the time since the first: decode speed, without the prompt's prefill
        tps: n > 1 && end > first && first ? ((n - 1) * 1000) / (end - first) : null,
      };
    }
    conv.updated = Date.now();
    setBusy(null);
    persist();
    if (state.current === conv) renderMessages();
    renderSidebar();
  }
}

// ---- settings and API key ---------------------------------------------------------------------------
function renderSettings() {
  const form = $("settings");
  for (const s of SETTINGS) {
    const input = el("input", { type: "number", name: s.key, step: s.step, value: state.settings[s.key] ?? s.value });
    if (s.min !== undefined) input.min = s.min;
    if (s.max !== undefined) input.max = s.max;
    input.dataset.testid = "setting-" + s.key;
    input.addEventListener("input", () => {
      state.settings[s.key] = input.value;
      localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
    });
    state.settings[s.key] = input.value;
    form.append(el("label", {}, el("span", { textContent: s.label }), input));
  }
}

function askKey(message) {
  sessionStorage.removeItem(KEY_STORE);
  $("key-error").textContent = message || "";
  $("key-dialog").hidden = false;
  $("api-key").focus();
}

async function submitKey(e) {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  const resp = await fetch("/v1/models", { headers: { Authorization: "Bearer " + key } }).catch(() => null);
  if (!resp || !resp.ok) {
    $("key-error").textContent = resp ? "the server refused this key" : "the server cannot be reached";
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("api-key").value = "";
  $("key-dialog").hidden = true;
  $("prompt").focus();
}

function enterSends(e, action) {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    action();
  }
}

async function start() {
  state.conversations = load(STORE.conversations, {});
  for (const c of Object.values(state.conversations)) {
    for (const m of c.messages) {
      if (m.role === "assistant" && !m.stats && !m.error) m.error = "the page was closed before this reply ended";
    }
  }
  state.settings = load(STORE.settings, {});
  renderSettings();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    sendPrompt();
  });
  $("prompt").addEventListener("keydown", (e) => enterSends(e, sendPrompt));
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => open(newConversation()));
  $("system").addEventListener("input", () => {
    state.current.system = $("system").value;
    persist();
  });
  $("key-form").addEventListener("submit", submitKey);
  open(state.conversations[load(STORE.current, null)] || newConversation());
  try {
    const info = await (await fetch("/web/server.json")).json();
    state.model = info.model;
    $("model").textContent = info.model;
    document.title = `${info.model} · kimi-mlx`;
    if (info.api_key_required && !sessionStorage.getItem(KEY_STORE)) askKey();
  } catch (e) {
    notice(`cannot reach the server: ${e.message}`);
  }
}

start();
