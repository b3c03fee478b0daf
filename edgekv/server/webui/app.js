// The chat page of `edgekv serve`. Plain JS, no build step, nothing loaded from elsewhere.
// It uses the server's public API only: POST /v1/chat/completions (streamed, SSE) and GET /v1/edgekv/info,
// with `Authorization: Bearer KEY` when a key is typed. Conversations live in this browser's localStorage.
// URLs are relative to the page, so it also works behind a proxy that serves it under a path prefix.
"use strict";
(() => {
  const STORE = "edgekv.webui.conversations";
  const CURRENT = "edgekv.webui.current";
  const KEY = "edgekv.webui.apikey";       // sessionStorage: the key is forgotten with the tab
  const $ = (id) => document.getElementById(id);
  const el = {
    key: $("api-key"), model: $("model-name"), newConv: $("new-conv"), list: $("conv-list"),
    method: $("method"), budget: $("budget"), maxTokens: $("max-tokens"), error: $("error"), log: $("log"),
    status: $("status"), composer: $("composer"), attachments: $("attachments"), prompt: $("prompt"),
    attach: $("attach"), files: $("files"), send: $("send"), stop: $("stop"), drop: $("drop-hint"),
  };

  let info = null;          // GET /v1/edgekv/info: model, methods, defaults, cell_bytes
  let convs = load();       // [{id, title, method, budget, maxTokens, messages, updated}]
  let currentId = localStorage.getItem(CURRENT) || null;
  let pending = [];         // images in the composer: {url, name}
  let active = null;        // the answer being streamed: {controller, conv, msg}

  // ---------------------------------------------------------------- storage
  function load() {
    try {
      const v = JSON.parse(localStorage.getItem(STORE) || "[]");
      return Array.isArray(v) ? v : [];
    } catch (e) {
      return [];
    }
  }

  function save() {
    // Images are data URLs and localStorage holds a few MB: when it is full, the stored copy of the
    // oldest conversations loses their images first (this tab keeps them, so its follow-ups still send
    // them; after a reload those conversations have their text only).
    const order = convs.filter((c) => c.id !== currentId).sort((a, b) => a.updated - b.updated)
      .concat(convs.filter((c) => c.id === currentId));
    const stripped = new Set();
    for (let i = 0; i <= order.length; i += 1) {
      try {
        const kept = convs.map((c) => JSON.stringify(stripped.has(c.id) ? withoutImages(c) : c));
        localStorage.setItem(STORE, `[${kept.join(",")}]`);
        localStorage.setItem(CURRENT, currentId || "");
        if (stripped.size) {
          setStatus("The browser's storage is full: older conversations are kept without their images.");
        }
        return;
      } catch (e) {
        if (i < order.length) stripped.add(order[i].id);
      }
    }
    showError("The browser's storage is full: this conversation is not saved.");
  }

  function withoutImages(c) {
    return {
      ...c, messages: c.messages.map((m) => (m.images && m.images.length
        ? { ...m, images: [], droppedImages: (m.droppedImages || 0) + m.images.length } : m)),
    };
  }

  // ---------------------------------------------------------------- conversations
  const current = () => convs.find((c) => c.id === currentId) || null;

  function newConversation() {
    const c = {
      id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`, title: "",
      method: info ? info.method : "", budget: info ? String(info.budget) : "",
      maxTokens: info ? Math.min(info.max_tokens, 512) : 512, messages: [], updated: Date.now(),
    };
    convs.unshift(c);
    currentId = c.id;
    save();
    return c;
  }

  function select(id) {
    if (active) return;
    currentId = id;
    save();
    renderAll();
    el.prompt.focus();
  }

  function remove(id) {
    if (active && active.conv.id === id) return;
    convs = convs.filter((c) => c.id !== id);
    if (currentId === id) currentId = convs.length ? convs[0].id : null;
    save();
    renderAll();
    el.newConv.focus();
  }

  // ---------------------------------------------------------------- API
  function authHeaders() {
    const k = el.key.value.trim();
    return k ? { Authorization: `Bearer ${k}` } : {};
  }

  async function errorText(resp) {
    let msg = resp.statusText || "request failed";
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) msg = body.error.message;
    } catch (e) { /* not JSON: keep the status text */ }
    if (resp.status === 401) return `Wrong or missing API key (401): ${msg}`;
    return `Error ${resp.status}: ${msg}`;
  }

  async function loadInfo() {
    try {
      const r = await fetch("v1/edgekv/info", { headers: authHeaders(), cache: "no-store" });
      if (!r.ok) {   // what an earlier key read stays: the model and its methods do not change
        showError(await errorText(r));
        if (r.status === 401) el.key.focus();
        renderHeader();
        return false;
      }
      info = await r.json();
      clearError();
      renderHeader();
      renderSettings();
      return true;
    } catch (e) {
      showError(`The server cannot be reached: ${e.message}`);
      return false;
    }
  }

  function apiMessages(messages) {
    return messages.map((m) => {
      if (m.role !== "user") return { role: m.role, content: m.text };
      const parts = [{ type: "text", text: m.text }];
      for (const im of m.images || []) {
        parts.push(im.kind === "video" ? { type: "video_url", video_url: { url: im.url } }
                                       : { type: "image_url", image_url: { url: im.url } });
      }
      return { role: "user", content: parts };
    });
  }

  // Reads the SSE stream of /v1/chat/completions; calls onChunk(obj) for each JSON data line.
  async function readStream(resp, onChunk) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onChunk(JSON.parse(data));
        }
      }
    }
  }

  async function send() {
    if (active) return;
    const text = el.prompt.value;
    if (!text.trim() && !pending.length) return;
    if (!info && !(await loadInfo())) return;
    const conv = current() || newConversation();
    readSettings(conv);
    const user = { role: "user", text, images: pending };
    const answer = { role: "assistant", text: "", streaming: true };
    const history = apiMessages(conv.messages.concat([user]));
    conv.messages.push(user, answer);
    if (!conv.title) conv.title = (text.trim() || `${pending.length} image(s)`).slice(0, 60);
    conv.updated = Date.now();
    el.prompt.value = "";
    pending = [];
    clearError();
    const body = {
      model: info.model, messages: history, stream: true, stream_options: { include_usage: true },
      max_tokens: Number(conv.maxTokens) || undefined,
      edgekv: { method: conv.method || null, budget: conv.budget.trim() || null },
    };
    const controller = new AbortController();
    active = { controller, conv, msg: answer };
    save();
    renderAll();
    setStatus("Answering… (Esc stops)");

    const t0 = performance.now();
    let tFirst = null;
    let final = null;
    let usage = null;
    let failure = null;
    let stopped = false;
    try {
      const resp = await fetch("v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body), signal: controller.signal, cache: "no-store",
      });
      if (!resp.ok) {
        failure = await errorText(resp);
      } else {
        await readStream(resp, (obj) => {
          if (obj.error) {
            failure = `Error: ${obj.error.message}`;
            return;
          }
          if (obj.usage) usage = obj.usage;
          const choice = obj.choices && obj.choices[0];
          if (!choice) return;
          // The server answers its headers and the first chunk once the first token exists.
          if (tFirst === null) tFirst = performance.now();
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            answer.text += piece;
            updateStreaming(answer);
          }
          if (choice.finish_reason) final = { finish: choice.finish_reason, edgekv: obj.edgekv || null };
        });
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else failure = `The request failed: ${e.message}`;
    }
    const elapsed = performance.now() - t0;
    delete answer.streaming;
    active = null;
    if ((failure || stopped) && !answer.text) {
      // Nothing was answered (a wrong key, a bad budget, a full queue, Stop before the first token): take
      // the message back into the composer so it can be sent again.
      conv.messages.splice(conv.messages.length - 2, 2);
      el.prompt.value = user.text;
      pending = user.images;
      if (!conv.messages.length) conv.title = "";
      if (failure) showError(failure);
      setStatus(failure ? "" : "Stopped before the answer started: your message is back in the box.");
    } else {
      answer.stats = {
        ttft_ms: tFirst === null ? null : tFirst - t0, total_ms: elapsed, usage,
        edgekv: final ? final.edgekv : null, finish: final ? final.finish : null,
      };
      if (stopped || !final) answer.stopped = true;
      if (failure) {
        answer.error = failure;
        showError(failure);
      }
      setStatus(stopped ? "Stopped: the partial answer is kept and sent as history next turn." : "Answer done.");
    }
    conv.updated = Date.now();
    save();
    renderAll();
    el.prompt.focus();
  }

  function stop() {
    if (active) active.controller.abort();
  }

  // ---------------------------------------------------------------- attachments
  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(r.error);
      r.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    const refused = [];
    for (const f of files) {
      const video = f.type.startsWith("video/");
      if (video && info && !info.video) {
        refused.push(`${f.name}: this server does not take videos`);
        continue;
      }
      if (!video && !f.type.startsWith("image/")) {
        refused.push(`${f.name}: not an image or a video`);
        continue;
      }
      // The file's own bytes, unchanged: the server's conversation cache compares media by their sha256.
      pending.push({ url: await readAsDataURL(f), name: f.name || "pasted image", kind: video ? "video" : "image" });
    }
    if (refused.length) showError(refused.join("\n"));
    else clearError();
    renderAttachments();
  }

  // ---------------------------------------------------------------- rendering
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== false) node.append(c);
    return node;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined || !isFinite(n)) return "?";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i && n < 10 ? 2 : i ? 1 : 0)} ${units[i]}`;
  }

  const fmtS = (s) => (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);
  const fmtRate = (tokens, s) => (s > 0 && tokens > 0 ? `${(tokens / s).toFixed(1)} tok/s` : "–");
  const pct = (part, whole) => (whole > 0 ? Math.max(0, Math.min(100, (100 * part) / whole)) : 0);

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  function setStatus(text) {
    el.status.textContent = text;
  }

  function renderHeader() {
    el.model.textContent = info ? `· ${info.model}` : "";
    el.attach.disabled = Boolean(info && !info.images);
    if (info && !info.images) el.attach.title = "This model was loaded without a projector: text only";
  }

  function renderSettings() {
    const conv = current();
    const methods = info ? info.methods : [];
    const want = conv ? conv.method : info ? info.method : "";
    el.method.replaceChildren(...(methods.length ? methods : [want]).filter(Boolean).map((m) =>
      h("option", { value: m, text: info && m === info.method ? `${m} (server default)` : m })));
    el.method.value = want || (info ? info.method : "");
    el.budget.value = conv ? conv.budget : info ? String(info.budget) : "";
    el.maxTokens.value = conv ? conv.maxTokens : info ? Math.min(info.max_tokens, 512) : 512;
  }

  function readSettings(conv) {
    conv.method = el.method.value;
    conv.budget = el.budget.value;
    conv.maxTokens = Number(el.maxTokens.value) || conv.maxTokens;
  }

  function renderList() {
    el.list.replaceChildren(...convs.map((c) => {
      const title = c.title || "New conversation";
      const turns = c.messages.filter((m) => m.role === "user").length;
      return h("li", { class: c.id === currentId ? "current" : "" },
        h("button", { type: "button", class: "conv", "aria-current": c.id === currentId ? "true" : null,
                      onclick: () => select(c.id) },
          h("span", { class: "title", text: title }),
          h("span", { class: "meta", text: `${turns} turn${turns === 1 ? "" : "s"}` })),
        h("button", { type: "button", class: "delete", "aria-label": `Delete conversation: ${title}`,
                      title: "Delete", onclick: () => remove(c.id), text: "×" }));
    }));
  }

  function mediaNode(im, label) {
    // a video shows as its first frame (no autoplay); an image as itself
    return im.kind === "video"
      ? h("video", { src: im.url, "aria-label": label, title: label, muted: true, preload: "metadata" })
      : h("img", { src: im.url, alt: label });
  }

  function renderAttachments() {
    el.attachments.replaceChildren(...pending.map((im, i) => h("li", {},
      mediaNode(im, `attached: ${im.name}`),
      h("button", { type: "button", class: "remove", "aria-label": `Remove ${im.name}`, text: "×",
                    onclick: () => { pending.splice(i, 1); renderAttachments(); el.prompt.focus(); } }))));
    el.attachments.hidden = !pending.length;
  }

  function messageNode(m, i) {
    const who = m.role === "user" ? "You" : "edgekv";
    const node = h("li", { class: `msg ${m.role}`, "data-index": i },
      h("div", { class: "who", text: who }));
    if (m.images && m.images.length) {
      node.append(h("div", { class: "images" }, m.images.map((im, k) =>
        mediaNode(im, `${im.kind === "video" ? "video" : "image"} ${k + 1}: ${im.name}`))));
    }
    if (m.droppedImages) {
      node.append(h("p", { class: "note",
                            text: `${m.droppedImages} image(s) dropped from the browser's full storage` }));
    }
    node.append(h("div", { class: "text", text: m.text }));
    if (m.streaming) node.classList.add("streaming");
    if (m.role === "assistant") {
      if (m.stopped) {
        node.dataset.stopped = "true";
        node.append(h("p", { class: "note",
                              text: "Stopped: the partial answer is kept and sent as history next turn." }));
      }
      if (m.error) node.append(h("p", { class: "note error-note", text: m.error }));
      if (m.stats) node.append(statsNode(m.stats));
    }
    return node;
  }

  function updateStreaming(m) {
    const node = el.log.querySelector("li.msg.streaming .text");
    if (node) node.textContent = m.text;
    node && node.scrollIntoView({ block: "nearest" });
  }

  // One horizontal bar: `value` against `full` (the track).
  function bar(label, value, full, cls, text) {
    const fill = h("span", { class: `fill ${cls}` });
    fill.style.width = `${pct(value, full).toFixed(2)}%`;
    return h("div", { class: "bar-row", "data-bar": cls, "data-value": value, "data-full": full },
      h("span", { class: "bar-label", text: label }),
      h("span", { class: "track", role: "img", "aria-label": `${label}: ${text}` }, fill),
      h("span", { class: "bar-text", text }));
  }

  // The per-turn picture: the KV cache before and after this turn's compaction, drawn against the full
  // cache (every token of the conversation in its own cell, as without compaction), then the numbers.
  function statsNode(st) {
    const x = st.edgekv;
    const u = st.usage;
    const box = h("div", { class: "stats" });
    if (x) {
      const hit = x.cache === "hit";
      box.append(h("p", { class: `badge ${hit ? "hit" : "miss"}`, "data-cache": x.cache },
        hit ? `Conversation cache hit: ${x.reused_messages} message(s), ${x.cached_tokens} tokens restored, ` +
              `${x.images_encoded} image(s) encoded`
            : `Conversation cache miss: ${x.images_encoded} image(s) encoded, prefilled from the start`));
      const fullCells = Math.max(u ? u.total_tokens : 0, x.cells_before, x.kv_cells);
      const perCell = info && info.cell_bytes ? info.cell_bytes
        : x.cells_before > 0 ? x.bytes_before / x.cells_before : 0;
      const fullBytes = Math.max(fullCells * perCell, x.bytes_before);
      const compacted = x.cells_after < x.cells_before;
      const saved = compacted ? ` (−${(100 - pct(x.cells_after, x.cells_before)).toFixed(0)} %)` : "";
      const fig = h("figure", {
        class: "mem", "data-cells-full": fullCells, "data-cells-before": x.cells_before,
        "data-cells-after": x.cells_after, "data-bytes-before": x.bytes_before, "data-bytes-after": x.bytes_after,
        "data-bytes-full": Math.round(fullBytes), "data-kv-cells": x.kv_cells, "data-method": x.method,
        "data-budget": x.budget,
      },
      h("figcaption", {},
        h("strong", { text: `${x.method}, budget ${x.budget}` }),
        compacted ? ` · compacted ${x.cells_before} → ${x.cells_after} cells${saved} in ${fmtS(x.compaction_s)}`
                  : " · no compaction this turn"),
      h("div", { class: "bars" },
        h("span", { class: "group", text: "KV cells" }),
        bar("full", fullCells, fullCells, "full", `${fullCells} cells: the conversation without compaction`),
        bar("before", x.cells_before, fullCells, "before", `${x.cells_before} cells before compaction`),
        bar("after", x.cells_after, fullCells, "after", `${x.cells_after} cells after compaction`),
        bar("now", x.kv_cells, fullCells, "now", `${x.kv_cells} cells in the cache after this turn`),
        h("span", { class: "group", text: "KV bytes" }),
        bar("full", Math.round(fullBytes), Math.round(fullBytes), "full-bytes",
            `≈ ${fmtBytes(fullBytes)} without compaction`),
        bar("before", x.bytes_before, fullBytes, "bytes-before", `${fmtBytes(x.bytes_before)} before compaction`),
        bar("after", x.bytes_after, fullBytes, "bytes-after", `${fmtBytes(x.bytes_after)} after compaction`),
        bar("kept", x.kept ? x.kept_bytes : 0, fullBytes, "kept",
            x.kept ? `${fmtBytes(x.kept_bytes)} kept in host RAM for the next turn` : "not kept (--cache-ram)")));
      box.append(fig);
      if (x.recall && typeof x.recall === "object") {   // shown once the server reports recall
        box.append(h("dl", { class: "numbers recall" }, Object.entries(x.recall).map(([k, v]) =>
          [h("dt", { text: `recall ${k.replace(/_/g, " ")}` }), h("dd", { text: String(v) })])));
      }
    }
    const rows = [];
    if (st.ttft_ms !== null && st.ttft_ms !== undefined) {
      rows.push(["time to first token", `${fmtS(st.ttft_ms / 1000)} (measured in the browser)`]);
    }
    if (x && x.timings) {
      const t = x.timings;
      const prefilled = u ? u.prompt_tokens - (u.prompt_tokens_details ? u.prompt_tokens_details.cached_tokens : 0) : 0;
      rows.push(["prefill", `${prefilled} tokens in ${fmtS(t.first_token_s)}: ${fmtRate(prefilled, t.first_token_s)}` +
                 " (images and compaction included)"]);
      const decoded = u ? Math.max(0, u.completion_tokens - 1) : 0;
      rows.push(["decode", `${u ? u.completion_tokens : "?"} tokens: ${fmtRate(decoded, t.generate_s)}`]);
      rows.push(["server", `queue ${fmtS(t.queue_s)} · restore ${fmtS(t.restore_s)} · keep ${fmtS(t.keep_s)}`]);
    } else if (st.total_ms) {
      rows.push(["elapsed", fmtS(st.total_ms / 1000)]);
    }
    if (st.finish) rows.push(["finish", st.finish]);
    box.append(h("dl", { class: "numbers" }, rows.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: v })])));
    return box;
  }

  function renderLog() {
    const conv = current();
    const msgs = conv ? conv.messages : [];
    el.log.replaceChildren(...msgs.map(messageNode));
    if (!msgs.length) {
      el.log.append(h("li", { class: "empty", text: "Type a message, attach images, press Enter." }));
    }
    const last = el.log.lastElementChild;
    if (last) last.scrollIntoView({ block: "end" });
  }

  function renderBusy() {
    const busy = Boolean(active);
    el.stop.disabled = !busy;
    el.send.disabled = busy;
    el.newConv.disabled = busy;
    for (const b of el.list.querySelectorAll("button")) b.disabled = busy;   // no switching mid-answer
    document.body.classList.toggle("busy", busy);
  }

  function renderAll() {
    renderList();
    renderSettings();
    renderLog();
    renderAttachments();
    renderBusy();
  }

  // ---------------------------------------------------------------- events
  el.composer.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  el.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && active) {
      e.preventDefault();
      stop();
    }
  });
  el.stop.addEventListener("click", stop);
  el.newConv.addEventListener("click", () => {
    if (active) return;
    const c = current();
    if (!c || c.messages.length) newConversation();
    renderAll();
    el.prompt.focus();
  });
  el.attach.addEventListener("click", () => el.files.click());
  el.files.addEventListener("change", () => {
    addFiles(Array.from(el.files.files));
    el.files.value = "";
  });
  for (const input of [el.method, el.budget, el.maxTokens]) {
    input.addEventListener("change", () => {
      const c = current();
      if (c) {
        readSettings(c);
        save();
      }
    });
  }
  el.key.addEventListener("change", () => {
    sessionStorage.setItem(KEY, el.key.value.trim());
    loadInfo();
  });
  document.addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []);
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    if (e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files")) {
      dragDepth += 1;
      el.drop.hidden = false;
    }
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) el.drop.hidden = true;
  });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    el.drop.hidden = true;
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(Array.from(e.dataTransfer.files));
  });

  // ---------------------------------------------------------------- start
  // A reload mid-answer leaves a message marked as streaming: it was cut there.
  for (const c of convs) {
    for (const m of c.messages) {
      if (m.streaming) {
        delete m.streaming;
        m.stopped = true;
      }
    }
  }
  el.key.value = sessionStorage.getItem(KEY) || "";
  if (!current()) currentId = convs.length ? convs[0].id : null;
  renderAll();
  loadInfo().then((ok) => {
    if (ok) renderAll();
  });
})();
