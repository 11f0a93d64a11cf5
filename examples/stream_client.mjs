#!/usr/bin/env node
// Generate a video and save it while it streams, from Node.js (22+, or 20/21 with --experimental-websocket):
//
//   node examples/stream_client.mjs "a red ball bouncing on a wooden floor" ball.mp4 [frames]
//
// SANA_SERVER (default http://localhost:8000) and SANA_API_KEY (when the server sets SANA_API_KEYS) come from
// the environment. The same protocol works in a browser: the JSON event before each binary message says what
// it is ("start" -> MP4 init segment, "chunk" -> one media segment, "tail" -> closing bytes); append them in
// order to a MediaSource SourceBuffer created with the start event's `mime` (server/static/app.js does that).
import { open, rename, rm } from "node:fs/promises";

const [prompt, out = "video.mp4", frames] = process.argv.slice(2);
if (!prompt) {
  console.error("usage: node stream_client.mjs PROMPT [OUT.mp4] [FRAMES]");
  process.exit(2);
}
if (typeof WebSocket === "undefined") {
  console.error("this Node.js has no WebSocket: use Node 22+, or run with --experimental-websocket");
  process.exit(2);
}
const server = (process.env.SANA_SERVER || "http://localhost:8000").replace(/\/$/, "");
const apiKey = process.env.SANA_API_KEY || "";

// 1. Submit the job.
const params = { prompt, mode: "stream" };
if (frames) params.frames = Number(frames);
const response = await fetch(`${server}/generate`, {
  method: "POST",
  headers: { "Content-Type": "application/json", ...(apiKey ? { Authorization: `Bearer ${apiKey}` } : {}) },
  body: JSON.stringify(params),
});
if (response.status !== 202) {
  console.error(`POST /generate: HTTP ${response.status}: ${await response.text()}`);
  process.exit(1);
}
const job = await response.json();
console.error(`job ${job.id}`);

// 2. Watch it: write each segment to OUT.part as it arrives; rename when the job succeeds.
const part = `${out}.part`;
const file = await open(part, "w");
const url = new URL(job.stream_url, server.replace(/^http/, "ws"));
url.searchParams.set("from_chunk", "0");
if (apiKey) url.searchParams.set("access_token", apiKey);  // websockets carry no Authorization header

const result = await new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.binaryType = "arraybuffer";
  let pending = null;  // what the next binary message is
  let writes = Promise.resolve();
  let offset = 0;
  let chunks = 0;
  let finished = false;
  ws.onmessage = ({ data }) => {
    if (typeof data !== "string") {
      const bytes = new Uint8Array(data);
      if (pending === "chunk") chunks += 1;
      pending = null;
      const at = offset;
      offset += bytes.length;
      writes = writes.then(() => file.write(bytes, 0, bytes.length, at));
      return;
    }
    const event = JSON.parse(data);
    switch (event.type) {
      case "start":
        console.error(`${event.frames_total} frames ${event.width}x${event.height} @ ${event.fps} fps, ${event.mime}`);
        pending = "start";
        break;
      case "chunk":
      case "tail":
        pending = event.type;
        break;
      case "restart":  // the job started over on another worker: so does the file
        offset = 0;
        chunks = 0;
        writes = writes.then(() => file.truncate(0));
        break;
      case "progress":
        process.stderr.write(`\rblock ${event.block}/${event.blocks_total} ` +
          `frames ${event.frames_done}/${event.frames_total} ${(100 * event.fraction).toFixed(1)}%`);
        break;
      case "done":
        finished = true;
        writes.then(() => (event.status === "succeeded" ? resolve({ ...event, chunks })
          : reject(new Error(`job ${event.status}`))));
        break;
      case "error":
        finished = true;
        reject(new Error(`job ${event.status}: ${event.error && event.error.message}`));
        break;
      default:
        break;
    }
  };
  ws.onerror = () => reject(new Error("websocket error"));
  ws.onclose = (ev) => finished || reject(new Error(`stream closed (code ${ev.code}) before the job ended`));
}).catch(async (err) => {
  await file.close();
  await rm(part, { force: true });
  console.error(`\nerror: ${err.message}`);
  process.exit(1);
});

await file.close();
await rename(part, out);
console.error("");
console.log(JSON.stringify({ id: job.id, path: out, chunks: result.chunks, bytes: result.bytes }));
