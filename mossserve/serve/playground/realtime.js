// The Realtime tab: one websocket session on /v1/realtime/speech. Text typed or pasted goes out
// as text.delta messages, audio.delta chunks play as they arrive, turns keep one context until
// "New context".
//
// A turn is open only once the server says so (turn.started): the text that opens it may be
// refused (a special token, past --max-input-chars, no free session), and then there is no turn to
// add text to, end or cancel. Until turn.started the rest of the turn's text, its text.done and a
// Cancel wait; an error in that time means the turn did not open.
//
// Once its text is done or it is cancelled, a turn takes no more text: what is typed meanwhile
// stays in the box for the next turn, which opens at the turn's audio.done (with "send while
// typing", or when Send was clicked meanwhile). Its audio plays after the turn's before it.

import { apiKey, clearError, fromBase64, showError, toBase64 } from "./api.js";
import { StreamPlayer, Waveform, wavBlob } from "./player.js";

const $ = (id) => document.getElementById(id);

// Browsers cannot set headers on a websocket: the API key travels as a subprotocol, base64url
// without padding, since a subprotocol must be an HTTP token and a key may hold `/`, `+` or `=`.
function keyProtocol(key) {
  const encoded = toBase64(new TextEncoder().encode(key)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return `mossserve-api-key-b64.${encoded}`;
}

export class RealtimeTab {
  constructor(model) {
    this.ws = null;
    this.ready = null; // resolves once session.created arrived
    this.player = new StreamPlayer();
    this.wave = new Waveform($("rt-wave"), this.player);
    this.sampleRate = model.mossserve.sample_rate;
    this.channels = model.mossserve.channels;
    this.fresh = true; // the next turn opens the context: the voice may still be set
    this.status = "idle";
    this.ttfaMs = null;
    this.turns = []; // {text, frames, finish, samples}
    this.urls = []; // the history's audio (object URLs), released by New context
    this.resetTurn();
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

  get turnOpen() {
    return this.turnId !== null;
  }

  // No turn: neither asked for nor open.
  resetTurn() {
    this.sent = ""; // the turn's text already sent
    this.pending = false; // its first text is sent, turn.started not here yet
    this.turnId = null; // set by turn.started; audio of any other turn is not this page's
    this.ended = false; // its text is complete (text.done sent, or due at turn.started)
    this.final = null; // its whole text, when complete before turn.started (more typed is the next turn's)
    this.cancelled = false; // Cancel was clicked (turn.cancel is sent, or due at turn.started)
    this.queued = false; // Send was clicked while the turn took no more text: the next turn is due
  }

  setStatus(status) {
    this.status = status;
    $("rt-status").textContent = status;
  }

  connect() {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) return this.ready;
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/realtime/speech`;
    const key = apiKey();
    const ws = (this.ws = key ? new WebSocket(url, [keyProtocol(key)]) : new WebSocket(url));
    this.fresh = true;
    this.ready = new Promise((resolve, reject) => {
      ws.onmessage = (m) => {
        if (ws !== this.ws) return; // a socket New context closed
        const event = JSON.parse(m.data);
        if (event.type === "session.created") {
          this.sampleRate = event.sample_rate;
          resolve();
        }
        this.onEvent(event);
      };
      ws.onclose = (e) => {
        const reason = `the realtime connection closed${e.reason ? `: ${e.reason}` : ""}`;
        reject(new Error(reason));
        if (ws === this.ws) this.dropped(reason);
      };
    });
    return this.ready;
  }

  // The socket went away on its own: a turn in progress is lost, the next Send opens a new socket.
  dropped(reason) {
    this.ws = null;
    if (this.pending || this.turnOpen) {
      showError(`${reason} during the turn`);
      this.setStatus("disconnected");
    }
    this.resetTurn();
  }

  message(event) {
    this.ws.send(JSON.stringify(event));
  }

  // Send the text not sent yet; `end`: the turn's text is complete.
  async send(end) {
    try {
      clearError();
      if (!this.pending && !this.turnOpen && !$("rt-text").value) return;
      await this.connect();
      this.flush(end);
    } catch (error) {
      showError(error);
    }
  }

  // What the turn has not had yet: its first text opens it; later text and text.done once it is open.
  flush(end) {
    if (this.ended || this.cancelled) {
      // It takes no more text: a Send with more in the box asks for the next turn, due at audio.done.
      if (end && this.rest()) {
        this.queued = true;
        this.setStatus("next turn queued");
      }
      return;
    }
    if (this.pending) {
      this.ended = end; // text.done goes out at turn.started
      if (end) this.final = $("rt-text").value;
      return;
    }
    // Read the text now, not before an await: keys typed meanwhile belong to this delta.
    const text = this.final ?? $("rt-text").value;
    if (!text.startsWith(this.sent)) {
      this.final = null; // the box, mended, is read again at the next Send
      throw new Error("text already sent cannot be changed; finish or cancel the turn");
    }
    if (!this.turnOpen) {
      if (text) this.openTurn(text, end);
      return;
    }
    if (text !== this.sent) this.message({ type: "text.delta", delta: text.slice(this.sent.length) });
    this.sent = text;
    if (end) {
      this.ended = true;
      this.message({ type: "text.done" });
      this.setStatus("speaking");
    }
  }

  // The box's text that is not the turn's: what was typed after it (all of it, if it was edited away).
  rest() {
    const text = $("rt-text").value;
    return text.startsWith(this.sent) ? text.slice(this.sent.length) : text;
  }

  openTurn(text, end) {
    const session = { response_format: "pcm" };
    // Every turn, cleared fields too (null: the server's default again), since the session keeps them.
    const temperature = $("rt-temperature").value.trim();
    session.temperature = temperature === "" ? null : Number(temperature);
    session.speed = Number($("rt-speed").value.trim() || 1);
    if (this.fresh && $("rt-voice").value) session.voice = $("rt-voice").value;
    this.message({ type: "session.update", session });
    this.message({ type: "text.delta", delta: text });
    this.sent = text;
    this.pending = true;
    this.ended = end;
    this.final = end ? text : null;
    this.started = performance.now();
    this.ttfaMs = null;
    this.player.begin(this.sampleRate, this.channels); // after the audio of the turn before, still playing
    this.wave.update();
    $("rt-ttfa").textContent = "–";
    $("rt-samples").textContent = "0";
    $("rt-frames").textContent = "–";
    $("rt-finish").textContent = "–";
    this.setStatus("listening");
  }

  onEvent(event) {
    if (event.type === "turn.started") {
      this.turnStarted(event);
    } else if (event.type === "audio.delta" && event.turn_id === this.turnId) {
      if (this.ttfaMs === null) {
        this.ttfaMs = performance.now() - this.started;
        $("rt-ttfa").textContent = this.ttfaMs.toFixed(0);
      }
      this.player.push(fromBase64(event.audio));
      $("rt-samples").textContent = this.player.samples;
      this.wave.update();
    } else if (event.type === "audio.done" && event.turn_id === this.turnId) {
      this.finishTurn(event);
    } else if (event.type === "error") {
      if (this.pending) {
        // The turn did not open (its session.update or first text was refused).
        this.resetTurn();
        this.setStatus("idle");
      }
      showError(event.error.message);
    }
  }

  turnStarted(event) {
    if (!this.pending) {
      // A turn the page gave up (an error came first, from its session.update): it does not run.
      this.message({ type: "turn.cancel" });
      return;
    }
    this.pending = false;
    this.turnId = event.turn_id;
    this.fresh = false;
    if (this.cancelled) {
      this.message({ type: "turn.cancel" });
      return;
    }
    const end = this.ended;
    this.ended = false; // until text.done is sent: a refused flush leaves Send working
    try {
      this.flush(end);
    } catch (error) {
      showError(error);
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
    this.urls.push(audio.src);
    item.append(`${turn.text} — ${turn.frames} frames, ${turn.finish} `, audio);
    $("rt-history").append(item);
    $("rt-text").value = this.rest();
    const queued = this.queued;
    this.resetTurn();
    this.setStatus(event.finish_reason === "stop" ? "done" : event.finish_reason);
    // The text typed meanwhile is the next turn's: sent now when live, or when Send was clicked.
    if ((queued || $("rt-live").checked) && $("rt-text").value) this.send(queued);
  }

  // Stop the audio (also a finished turn's, still playing), the turn (once the server opened it) and
  // a next turn queued; the text in the box stays for the next Send.
  cancel() {
    this.player.stop();
    this.queued = false;
    if (this.turnOpen && !this.cancelled) this.message({ type: "turn.cancel" });
    this.cancelled = this.pending || this.turnOpen;
  }

  // A fresh session: the socket closes, also in the middle of a turn, which the server then aborts.
  newContext() {
    this.player.stop();
    const ws = this.ws;
    this.ws = null;
    ws?.close();
    this.resetTurn();
    this.turns = [];
    this.urls.forEach((url) => URL.revokeObjectURL(url));
    this.urls = [];
    $("rt-history").replaceChildren();
    this.setStatus("idle");
  }
}
