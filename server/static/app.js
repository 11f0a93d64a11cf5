// SANA-Video web page: submit a job, follow its progress, play the fragmented MP4 stream live through
// MediaSource while the video is generated, download the finished MP4, list this browser's recent jobs.
// Plain JS, no build step and no network dependency beyond the server itself.
"use strict";

const RECENT_KEY = "sana-video.recent-jobs";
const API_KEY_KEY = "sana-video.api-key";
const RECENT_MAX = 20;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);

// A record of what the page saw, in order; tests and curious users read it from the console.
const pageLog = [];
function logEvent(kind, data) {
  pageLog.push({ t: performance.now(), kind, ...data });
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP helpers

function apiKey() {
  return localStorage.getItem(API_KEY_KEY) || "";
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders(body ? { "Content-Type": "application/json" } : {}) };
  if (body) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  let payload = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("application/json")) payload = await response.json();
  if (!response.ok) {
    const error = new Error(describeError(response.status, payload));
    error.status = response.status;
    throw error;
  }
  return payload;
}

// FastAPI answers {detail: "..."} or {detail: [{loc, msg}, ...]}; our own errors may carry {error: {...}}.
function describeError(status, payload) {
  if (!payload) return `HTTP ${status}`;
  const detail = payload.detail ?? payload.error ?? payload.message ?? payload;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`).join("; ");
  }
  if (detail && typeof detail === "object" && detail.message) return detail.message;
  return `HTTP ${status}: ${JSON.stringify(detail)}`;
}

function websocketUrl(path) {
  if (/^wss?:\/\//.test(path)) return path;
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

// ---------------------------------------------------------------------------------------------------------------
// Fragmented MP4 playback through MediaSource

// The RFC 6381 codec string of the first avcC box in an MP4 init segment ("avc1.PPCCLL"), or null.
function codecFromInit(buffer) {
  const bytes = new Uint8Array(buffer);
  for (let i = 4; i + 7 < bytes.length; i++) {
    if (bytes[i] === 0x61 && bytes[i + 1] === 0x76 && bytes[i + 2] === 0x63 && bytes[i + 3] === 0x43) {
      const hex = (b) => b.toString(16).padStart(2, "0");
      return `avc1.${hex(bytes[i + 5])}${hex(bytes[i + 6])}${hex(bytes[i + 7])}`;
    }
  }
  return null;
}

class StreamPlayer {
  // Appends an fMP4 init segment and media segments, in order, to a SourceBuffer of `video`.
  constructor(video) {
    this.video = video;
    this.queue = [];
    this.codec = null;
    this.sourceBuffer = null;
    this.ending = false;
    this.ended = false;
    this.mediaSegments = 0;
    this.failed = null;
    this.mediaSource = new MediaSource();
    this.objectUrl = URL.createObjectURL(this.mediaSource);
    this.opened = new Promise((resolve) => {
      this.mediaSource.addEventListener("sourceopen", resolve, { once: true });
    });
    video.src = this.objectUrl;
    this.opened.then(() => this.ensureSourceBuffer());
  }

  setCodec(codec) {
    if (!this.codec && codec) this.codec = codec;
    this.ensureSourceBuffer();
  }

  push(buffer, isInit) {
    if (this.failed) return;
    if (isInit && !this.codec) this.codec = codecFromInit(buffer);
    this.queue.push({ buffer, isInit });
    this.ensureSourceBuffer();
    this.appendNext();
  }

  end() {
    this.ending = true;
    this.appendNext();
  }

  destroy() {
    this.queue = [];
    try {
      if (this.mediaSource.readyState === "open") this.mediaSource.endOfStream();
    } catch (_) { /* already closed */ }
    URL.revokeObjectURL(this.objectUrl);
  }

  ensureSourceBuffer() {
    if (this.sourceBuffer || !this.codec || this.mediaSource.readyState !== "open") return;
    const mime = `video/mp4; codecs="${this.codec}"`;
    if (!MediaSource.isTypeSupported(mime)) {
      this.fail(`this browser cannot play ${mime} through MediaSource`);
      return;
    }
    this.sourceBuffer = this.mediaSource.addSourceBuffer(mime);
    this.sourceBuffer.addEventListener("updateend", () => this.onUpdateEnd());
    this.sourceBuffer.addEventListener("error", () => this.fail("the browser rejected a video segment"));
    this.appendNext();
  }

  onUpdateEnd() {
    if (this.lastAppended && !this.lastAppended.isInit) {
      this.mediaSegments += 1;
      logEvent("segment-appended", { segments: this.mediaSegments });
      const buffered = this.sourceBuffer.buffered;
      // Joined late (or resumed): playback starts where the buffered range starts.
      if (buffered.length && this.video.currentTime < buffered.start(0)) this.video.currentTime = buffered.start(0);
      if (this.mediaSegments === 1) this.video.play().catch(() => { /* autoplay may need a click */ });
    }
    this.lastAppended = null;
    this.appendNext();
  }

  appendNext() {
    const sb = this.sourceBuffer;
    if (!sb || sb.updating || this.failed) return;
    if (this.queue.length === 0) {
      if (this.ending && !this.ended && this.mediaSource.readyState === "open") {
        this.ended = true;
        this.mediaSource.endOfStream();
      }
      return;
    }
    const item = this.queue[0];
    try {
      sb.appendBuffer(item.buffer);
      this.queue.shift();
      this.lastAppended = item;
    } catch (err) {
      if (err.name === "QuotaExceededError") {
        this.evictPlayed();
      } else {
        this.fail(`appendBuffer: ${err.message}`);
      }
    }
  }

  // Long streams outgrow the browser's buffer quota: drop what has already been watched, then retry.
  evictPlayed() {
    const sb = this.sourceBuffer;
    const keepFrom = this.video.currentTime - 10;
    if (sb.buffered.length && keepFrom > sb.buffered.start(0)) {
      sb.remove(sb.buffered.start(0), keepFrom);  // fires updateend, which retries the append
    } else {
      setTimeout(() => this.appendNext(), 1000);  // nothing played yet to drop: wait for playback
    }
  }

  fail(message) {
    this.failed = message;
    logEvent("player-error", { message });
    showJobError(message);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Following one job over its websocket (see server/stream.py for the protocol), with a status poll as a safety net.
// A JSON event announces each binary message: "start" -> init segment, "chunk" -> media segment, "tail" -> closing
// bytes. "restart" means the job started over on another worker: drop what was played and begin again.

class JobView {
  constructor(job) {
    this.id = job.id;
    this.job = job;
    this.status = job.status || "queued";
    this.player = null;
    this.socket = null;
    this.attempt = null;       // the attempt whose bytes the player holds
    this.initAttempt = null;   // the attempt whose init segment the player has
    this.nextChunk = 0;        // the next chunk index to play, i.e. from_chunk on a reconnect
    this.requestedFrom = 0;
    this.pendingBinary = null; // what the next binary message is, announced by the JSON event before it
    this.reconnects = 0;
    this.closed = false;
    this.streamDone = false;
    this.pollTimer = null;
    this.lastEta = null;
  }

  get chunksReceived() {
    return this.nextChunk;
  }

  start({ live }) {
    $("job").hidden = false;
    $("job-id").textContent = this.id;
    $("job-prompt").textContent = (this.job.params && this.job.params.prompt) || this.job.prompt || "";
    $("job-error").textContent = "";
    $("download").hidden = true;
    setProgress(0, "waiting for a worker…");
    this.setStatus(this.status);
    if (live) {
      this.player = new StreamPlayer($("player"));
      this.connect();
    } else if (this.status === "succeeded") {
      playFinished(this.id);
    }
    this.poll();
  }

  stop() {
    this.closed = true;
    clearTimeout(this.pollTimer);
    if (this.socket) this.socket.close();
    if (this.player) this.player.destroy();
  }

  connect() {
    if (this.closed) return;
    const url = new URL(websocketUrl(this.job.stream_url || `/jobs/${this.id}/stream`));
    url.searchParams.set("from_chunk", String(this.nextChunk));
    // Browsers cannot set headers on a websocket: the key travels as a query parameter instead.
    if (apiKey()) url.searchParams.set("access_token", apiKey());
    this.requestedFrom = this.nextChunk;
    this.pendingBinary = null;
    // Reconnecting into a restarted attempt: the socket that was reading the old one goes (it would stream the
    // rest of the job unread, and count as a second viewer).
    if (this.socket && this.socket.readyState <= WebSocket.OPEN) this.socket.close();
    const socket = new WebSocket(url.toString());
    socket.binaryType = "arraybuffer";
    this.socket = socket;
    socket.addEventListener("message", (msg) => {
      if (socket === this.socket) this.onMessage(msg);
    });
    socket.addEventListener("close", (ev) => {
      if (socket === this.socket) this.onClose(ev);
    });
    logEvent("ws-open", { from_chunk: this.nextChunk });
  }

  resetPlayer() {
    if (this.player) this.player.destroy();
    this.player = new StreamPlayer($("player"));
    this.initAttempt = null;
    this.nextChunk = 0;
  }

  onMessage(msg) {
    if (typeof msg.data !== "string") {
      this.onBinary(msg.data);
      return;
    }
    let event;
    try {
      event = JSON.parse(msg.data);
    } catch (_) {
      return;
    }
    logEvent(`ws-${event.type}`, { status: this.status, block: event.block ?? null, index: event.index ?? null });
    switch (event.type) {
      case "start":
        this.onStart(event);
        this.pendingBinary = { kind: "init" };
        break;
      case "chunk":
        this.pendingBinary = { kind: "chunk", index: event.index };
        break;
      case "tail":
        this.pendingBinary = { kind: "tail" };
        break;
      case "restart":
        this.resetPlayer();
        this.attempt = null;
        break;
      case "progress":
        this.setStatus("running");
        this.onProgress(event);
        break;
      case "status":
        this.setStatus(event.status);
        if (event.progress) this.onProgress(event.progress);
        if (event.reason) $("progress-text").textContent = event.reason;
        break;
      case "done":
        this.streamDone = true;
        this.setStatus(event.status);
        if (event.status === "cancelled") showJobError(errorMessage(event.error) || "cancelled");
        if (this.player) this.player.end();
        this.refresh();
        break;
      case "error":
        this.streamDone = true;
        showJobError(errorMessage(event.error) || "generation failed");
        if (event.status === "failed") this.setStatus("failed");
        if (this.player) this.player.end();
        this.refresh();
        break;
      default:
        break;
    }
  }

  onStart(event) {
    this.setStatus("running");
    if (this.attempt !== null && event.attempt !== this.attempt) {
      this.resetPlayer();
      if (this.requestedFrom > 0) {
        // A new attempt began while we were away: its chunks must be fetched from 0.
        this.attempt = event.attempt;
        this.connect();
        return;
      }
    }
    this.attempt = event.attempt;
    if (this.player) this.player.setCodec(event.codec || (/codecs="([^"]+)"/.exec(event.mime || "") || [])[1]);
    if (event.blocks_total) {
      setProgress($("progress").value, `0/${event.blocks_total} blocks · ${event.frames_total} frames ` +
        `${event.width}x${event.height} @ ${event.fps} fps`);
    }
  }

  onBinary(buffer) {
    const what = this.pendingBinary;
    this.pendingBinary = null;
    if (!what || !this.player) return;
    if (what.kind === "init") {
      if (this.initAttempt === this.attempt) return;  // the same init again after a reconnect
      this.initAttempt = this.attempt;
      logEvent("init-segment", { bytes: buffer.byteLength });
      this.player.push(buffer, true);
    } else if (what.kind === "chunk") {
      if (what.index < this.nextChunk) return;  // already played (never expected: the server sends each once)
      this.nextChunk = what.index + 1;
      logEvent("media-segment", { index: what.index, bytes: buffer.byteLength, status: this.status });
      this.player.push(buffer, false);
    } else if (what.kind === "tail" && buffer.byteLength > 0) {
      this.player.push(buffer, false);
    }
  }

  onClose(ev) {
    logEvent("ws-close", { code: ev.code });
    if (this.closed || this.streamDone || FINAL.has(this.status) || this.status === "expired") return;
    if (ev.code >= 4400 && ev.code < 4500) {
      showJobError(ev.reason || `stream refused (code ${ev.code})`);
      return;
    }
    // Resume from the next chunk: nothing is lost or repeated.
    this.reconnects += 1;
    if (this.reconnects <= 10) setTimeout(() => this.connect(), Math.min(500 * this.reconnects, 5000));
  }

  onProgress(progress) {
    if (!progress || typeof progress !== "object") return;
    if (progress.eta_s !== undefined) this.lastEta = progress.eta_s;
    const parts = [];
    if (progress.blocks_total) parts.push(`block ${progress.block ?? 0}/${progress.blocks_total}`);
    if (progress.steps_total) parts.push(`step ${progress.step ?? 0}/${progress.steps_total}`);
    if (progress.frames_total) parts.push(`${progress.frames_done ?? 0}/${progress.frames_total} frames`);
    if (this.lastEta != null && !FINAL.has(this.status)) parts.push(`ETA ${formatSeconds(this.lastEta)}`);
    setProgress(progress.fraction ?? 0, parts.join(" · "));
  }

  setStatus(status) {
    if (!status || status === this.status && this.statusShown) return;
    // Status only moves forward, except running -> queued when a worker was lost.
    if (FINAL.has(this.status) && !FINAL.has(status)) return;
    this.status = status;
    this.statusShown = true;
    const badge = $("job-status");
    badge.textContent = status;
    badge.dataset.state = status;
    $("cancel").hidden = FINAL.has(status) || status === "expired";
    if (status === "succeeded") {
      $("progress").value = 1;
      showDownload(this.id);
    }
    if (FINAL.has(status)) {
      this.lastEta = null;
      this.onProgressText();
    }
    updateRecent(this.id, { status });
  }

  onProgressText() {
    const text = $("progress-text");
    text.textContent = text.textContent.replace(/ · ETA .*$/, "");
  }

  async poll() {
    if (this.closed) return;
    await this.refresh();
    if (!FINAL.has(this.status) && this.status !== "expired") {
      this.pollTimer = setTimeout(() => this.poll(), 2000);
    }
  }

  async refresh() {
    try {
      const job = await api("GET", `/jobs/${this.id}`);
      this.job.params = job.params;
      if (!$("job-prompt").textContent && job.params) $("job-prompt").textContent = job.params.prompt || "";
      // The websocket's progress is fresher while it is connected.
      if (job.progress && (!this.socket || this.socket.readyState !== WebSocket.OPEN)) {
        this.onProgress(Object.assign({ eta_s: job.eta_s }, job.progress));
      }
      if (job.error) showJobError(errorMessage(job.error));
      this.setStatus(job.status);
      if (job.status === "succeeded" && !this.player) playFinished(this.id);
    } catch (err) {
      if (err.status === 404) {
        this.setStatus("expired");
        showJobError("this job is gone (expired, or submitted with another API key)");
      }
    }
  }

  async cancel() {
    try {
      await api("DELETE", `/jobs/${this.id}`);
      await this.refresh();
    } catch (err) {
      showJobError(err.message);
    }
  }
}

function errorMessage(error) {
  if (!error) return "";
  if (typeof error === "string") return error;
  const where = error.field ? ` (${error.field}${error.accepted ? `: accepted ${error.accepted}` : ""})` : "";
  return `${error.message || error.type || "error"}${where}`;
}

function setProgress(fraction, text) {
  $("progress").value = Math.max(0, Math.min(1, Number(fraction) || 0));
  if (text) $("progress-text").textContent = text;
}

function formatSeconds(s) {
  s = Math.max(0, Math.round(Number(s)));
  return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

function showJobError(message) {
  $("job-error").textContent = message;
}

// The finished MP4. A link cannot carry an Authorization header: the video route accepts ?access_token= instead.
function videoUrl(id) {
  const key = apiKey();
  return `/jobs/${encodeURIComponent(id)}/video` + (key ? `?access_token=${encodeURIComponent(key)}` : "");
}

function showDownload(id) {
  const link = $("download");
  link.href = videoUrl(id);
  link.download = `sana-video-${id}.mp4`;
  link.hidden = false;
}

function playFinished(id) {
  const video = $("player");
  const url = new URL(videoUrl(id), window.location.href).toString();
  if (video.src === url) return;  // already loading or playing it
  video.src = url;
  video.play().catch(() => { /* autoplay may need a click */ });
}

// ---------------------------------------------------------------------------------------------------------------
// Recent jobs (this browser's localStorage)

function loadRecent() {
  try {
    const items = JSON.parse(localStorage.getItem(RECENT_KEY) || "[]");
    return Array.isArray(items) ? items : [];
  } catch (_) {
    return [];
  }
}

function saveRecent(items) {
  localStorage.setItem(RECENT_KEY, JSON.stringify(items.slice(0, RECENT_MAX)));
}

function rememberJob(job, params) {
  const items = loadRecent().filter((item) => item.id !== job.id);
  items.unshift({
    id: job.id, prompt: params.prompt, model: params.model, mode: params.mode,
    status: job.status || "queued", created: Date.now(),
    stream_url: job.stream_url, status_url: job.status_url, video_url: job.video_url,
  });
  saveRecent(items);
  renderRecent();
}

function updateRecent(id, fields) {
  const items = loadRecent();
  const item = items.find((it) => it.id === id);
  if (!item || Object.keys(fields).every((k) => item[k] === fields[k])) return;
  Object.assign(item, fields);
  saveRecent(items);
  renderRecent();
}

function renderRecent() {
  const list = $("recent");
  const items = loadRecent();
  list.replaceChildren();
  $("recent-empty").hidden = items.length > 0;
  for (const item of items) {
    const li = document.createElement("li");
    li.dataset.jobId = item.id;

    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.state = item.status;
    badge.textContent = item.status;

    const what = document.createElement("span");
    what.className = "what";
    what.textContent = item.prompt || item.id;
    what.title = item.prompt || "";

    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${item.model || ""} ${item.mode || ""} · ${new Date(item.created).toLocaleTimeString()}`;

    const open = document.createElement("button");
    open.type = "button";
    open.className = "secondary";
    open.textContent = FINAL.has(item.status) ? "Open" : "Watch";
    open.addEventListener("click", () => openJob(item));

    li.append(badge, what, meta, open);
    list.append(li);
  }
}

// Refresh the statuses of unfinished recent jobs (they may have finished while the page was closed).
async function refreshRecent() {
  for (const item of loadRecent()) {
    if (FINAL.has(item.status) || item.status === "expired") continue;
    try {
      const job = await api("GET", `/jobs/${item.id}`);
      updateRecent(item.id, { status: job.status });
    } catch (err) {
      if (err.status === 404) updateRecent(item.id, { status: "expired" });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Models and the form

let models = [];
let current = null;

async function loadModels() {
  let payload;
  try {
    payload = await api("GET", "/models");
  } catch (err) {
    $("form-error").textContent = err.status === 401
      ? "this server needs an API key: enter it under \u201cAPI key\u201d"
      : `cannot list models: ${err.message}`;
    return;
  }
  $("form-error").textContent = "";
  models = payload.models || [];
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const model of models) {
    const option = document.createElement("option");
    option.value = model.name;
    const workers = (model.workers || []).length;
    option.textContent = `${model.name}${workers ? "" : " (no worker yet)"}`;
    option.selected = previous ? model.name === previous : model.name === payload.default;
    select.append(option);
  }
  applyModelDefaults();
}

function selectedModel() {
  return models.find((m) => m.name === $("model").value) || {};
}

function applyModelDefaults() {
  const model = selectedModel();
  const defaults = model.defaults || {};
  for (const field of ["width", "height", "frames", "fps", "steps", "guidance_scale"]) {
    if (defaults[field] != null) $(field).value = defaults[field];
  }
  const limits = model.limits || {};
  // A block-causal model streams and a bidirectional one makes clips: offer only what the model does.
  const only = limits.mode || null;
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.disabled = only !== null && radio.value !== only;
    if (defaults.mode || only) radio.checked = radio.value === (defaults.mode || only);
  }
  const hints = [];
  if (limits.frames && limits.frames.max) hints.push(`frames 4k+1 up to ${limits.frames.max}`);
  if (limits.max_pixels) hints.push(`up to ${limits.max_pixels.toLocaleString()} pixels per frame`);
  if (model.causal != null) {
    hints.push(model.causal ? "block-causal: plays while it is generated" : "bidirectional: the clip plays when done");
  }
  if (model.queue_depth) hints.push(`${model.queue_depth} queued`);
  $("limits").textContent = hints.join(" · ");
}

function readForm() {
  const form = $("generate-form");
  const data = new FormData(form);
  const params = {
    prompt: String(data.get("prompt") || "").trim(),
    model: data.get("model") || undefined,
    mode: data.get("mode") || undefined,
  };
  const negative = String(data.get("negative_prompt") || "").trim();
  if (negative) params.negative_prompt = negative;
  for (const field of ["width", "height", "frames", "fps", "steps", "seed"]) {
    const value = String(data.get(field) || "").trim();
    if (value !== "") params[field] = parseInt(value, 10);
  }
  // An empty seed box means a new video each time: the page draws the seed (the job record shows it).
  if (params.seed === undefined) params.seed = Math.floor(Math.random() * 2 ** 31);
  const guidance = String(data.get("guidance_scale") || "").trim();
  if (guidance !== "") params.guidance_scale = parseFloat(guidance);
  return params;
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  const params = readForm();
  if (!params.prompt) {
    $("form-error").textContent = "a prompt is required";
    return;
  }
  const button = $("submit");
  button.disabled = true;
  try {
    const job = await api("POST", "/generate", params);
    logEvent("submitted", { id: job.id });
    rememberJob(job, params);
    watch(Object.assign({ params }, job), true);
  } catch (err) {
    $("form-error").textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

function watch(job, live) {
  if (current) current.stop();
  const video = $("player");
  video.removeAttribute("src");
  video.load();
  current = new JobView(job);
  window.sanaPage.job = current;
  current.start({ live });
}

function openJob(item) {
  const live = !FINAL.has(item.status) && item.status !== "expired";
  watch({ id: item.id, status: item.status, prompt: item.prompt, stream_url: item.stream_url }, live);
}

async function checkServer() {
  const badge = $("server-status");
  try {
    const response = await fetch("/readyz");
    badge.dataset.state = response.ok ? "ready" : "down";
    badge.textContent = response.ok ? "ready" : "not ready";
  } catch (_) {
    badge.dataset.state = "down";
    badge.textContent = "unreachable";
  }
}

function init() {
  window.sanaPage = { log: pageLog, job: null, codecFromInit };
  const keyInput = $("api-key");
  keyInput.value = apiKey();
  keyInput.addEventListener("change", () => {
    localStorage.setItem(API_KEY_KEY, keyInput.value.trim());
    loadModels();
  });
  $("generate-form").addEventListener("submit", submit);
  $("model").addEventListener("change", applyModelDefaults);
  $("cancel").addEventListener("click", () => current && current.cancel());
  const video = $("player");
  for (const name of ["playing", "waiting", "ended"]) {
    video.addEventListener(name, () => logEvent(`video-${name}`, {
      currentTime: video.currentTime,
      status: current ? current.status : null,
      streamDone: current ? current.streamDone : null,
      chunks: current ? current.chunksReceived : null,
    }));
  }
  renderRecent();
  checkServer();
  loadModels();
  refreshRecent();
}

document.addEventListener("DOMContentLoaded", init);
