// The Realtime tab: one websocket session on /v1/realtime/speech. Text typed or pasted goes out
// as text.delta messages, audio.delta chunks play as they arrive, turns keep one context until
// "New context". Browsers cannot set headers on a websocket, so this tab needs a server without
// an API key.

import { apiKey, clearError, fromBase64, showError } from "./api.js";
import { drawWave, StreamPlayer, wavBlob } from "./player.js";

const $ = (id) => document.getElementById(id);

export class RealtimeTab {
  constructor(model) {
    this.ws = null;
    this.ready = null; // resolves once session.created arrived
    this.player = new StreamPlayer();
    this.sampleRate = model.mossserve.sample_rate;
    this.channels = model.mossserve.channels;
    this.fresh = true; // the next turn opens the context: the voice may still be set
    this.sent = ""; // the text of the open turn already sent
    this.turnOpen = false;
    this.ended = false; // the open turn's text is complete (text.done sent)
    this.status = "idle";
    this.ttfaMs = null;
    this.turns = []; // {text, frames, finish, samples}
    $("rt-send").addEventListener("click", () => this.send(true));
    $("rt-cancel").addEventListener("click", () => this.cancel());
    $("rt-new").addEventListener("click", () => this.newContext());
    $("rt-text").addEventListener("input", () => $("rt-live").checked && this.send(false));
    $("rt-text").addEventListener("keydown", (e) => {
      if ($("rt-live").checked && e.key === "Enter" && !e.shiftKey) {
        e.preventDefault();
        this.send(true);
      }
    });
  }

  setStatus(status) {
    this.status = status;
    $("rt-status").textContent = status;
  }

  connect() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return this.ready;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime/speech`;
    // Browsers cannot set headers on a websocket: the API key travels as a subprotocol.
    const key = apiKey();
    this.ws = key ? new WebSocket(url, [`mossserve-api-key.${key}`]) : new WebSocket(url);
    this.fresh = true;
    this.ready = new Promise((resolve, reject) => {
      this.ws.onmessage = (m) => {
        const event = JSON.parse(m.data);
        if (event.type === "session.created") {
          this.sampleRate = event.sample_rate;
          resolve();
        }
        this.onEvent(event);
      };
      this.ws.onclose = (e) => {
        reject(new Error(`the realtime connection closed${e.reason ? `: ${e.reason}` : ""}`));
        if (this.turnOpen) this.setStatus("disconnected");
        this.turnOpen = false;
      };
    });
    return this.ready;
  }

  message(event) {
    this.ws.send(JSON.stringify(event));
  }

  // Send the text not sent yet; `end`: the turn's text is complete.
  async send(end) {
    try {
      clearError();
      if (this.ended || (!this.turnOpen && !$("rt-text").value)) return;
      await this.connect();
      // Read the text after the await: keys typed meanwhile belong to this delta, not a later one.
      const text = $("rt-text").value;
      if (!text.startsWith(this.sent)) {
        throw new Error("text already sent cannot be changed; finish or cancel the turn");
      }
      const delta = text.slice(this.sent.length);
      if (!this.turnOpen && !delta) return;
      if (!this.turnOpen) this.openTurn();
      if (delta) this.message({ type: "text.delta", delta });
      this.sent = text;
      if (end) {
        this.ended = true;
        this.message({ type: "text.done" });
        this.setStatus("speaking");
      }
    } catch (error) {
      showError(error);
    }
  }

  openTurn() {
    const session = { response_format: "pcm" };
    const temperature = $("rt-temperature").value.trim();
    if (temperature !== "") session.temperature = Number(temperature);
    session.speed = Number($("rt-speed").value.trim() || 1); // every turn: a cleared field means 1 again
    if (this.fresh && $("rt-voice").value) session.voice = $("rt-voice").value;
    this.message({ type: "session.update", session });
    this.fresh = false;
    this.turnOpen = true;
    this.started = performance.now();
    this.ttfaMs = null;
    this.player.reset(this.sampleRate, this.channels);
    $("rt-ttfa").textContent = "–";
    $("rt-samples").textContent = "0";
    $("rt-frames").textContent = "–";
    $("rt-finish").textContent = "–";
    this.setStatus("listening");
  }

  onEvent(event) {
    if (event.type === "audio.delta") {
      if (this.ttfaMs === null) {
        this.ttfaMs = performance.now() - this.started;
        $("rt-ttfa").textContent = this.ttfaMs.toFixed(0);
      }
      this.player.push(fromBase64(event.audio));
      $("rt-samples").textContent = this.player.samples;
      drawWave($("rt-wave"), this.player.pcm(), this.channels);
    } else if (event.type === "audio.done") {
      this.finishTurn(event);
    } else if (event.type === "error") {
      showError(event.error.message);
    }
  }

  finishTurn(event) {
    const turn = { text: this.sent, frames: event.frames, finish: event.finish_reason, samples: this.player.samples };
    this.turns.push(turn);
    $("rt-frames").textContent = event.frames;
    $("rt-finish").textContent = event.finish_reason;
    const item = document.createElement("li");
    const audio = document.createElement("audio");
    audio.controls = true;
    audio.src = URL.createObjectURL(wavBlob(this.player.pcm(), this.sampleRate, this.channels));
    item.append(`${turn.text} — ${turn.frames} frames, ${turn.finish} `, audio);
    $("rt-history").append(item);
    $("rt-text").value = $("rt-text").value.slice(this.sent.length); // keep what was typed after the turn's text
    this.sent = "";
    this.turnOpen = this.ended = false;
    this.setStatus(event.finish_reason === "stop" ? "done" : event.finish_reason);
  }

  cancel() {
    if (!this.turnOpen) return;
    this.player.stop();
    this.message({ type: "turn.cancel" });
  }

  newContext() {
    if (this.turnOpen) {
      showError("finish or cancel the turn first");
      return;
    }
    this.ws?.close();
    this.ws = null;
    this.turns = [];
    $("rt-history").replaceChildren();
    this.setStatus("idle");
  }
}
