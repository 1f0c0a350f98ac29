// The Speech tab: one POST /v1/audio/speech streamed as SSE (pcm deltas), played while it is
// generated; time to first audio, real-time factor, waveform, download in any format.

import { ApiError, clearError, dataUrl, fromBase64, postJson, showError, sseEvents } from "./api.js";
import { audioInput } from "./recorder.js";
import { StreamPlayer, Waveform, wavBlob } from "./player.js";
import { voiceOptions } from "./voices.js";

const $ = (id) => document.getElementById(id);
const MAX_SPEAKERS = 5; // MOSS-TTSD's [S1]..[S5]; Fish S2 Pro takes any number of <|speaker:N|>

export class SpeechTab {
  constructor(model) {
    this.model = model; // {id, mossserve: {sample_rate, channels, ...}}
    this.player = new StreamPlayer();
    this.wave = new Waveform($("wave"), this.player);
    // A stored voice or reference audio (a file or a recording), never both: choosing one drops the other.
    this.reference = audioInput($("ref-file"), $("ref-record"), $("ref-status"), () => ($("voice").value = ""));
    this.lastBody = null; // the request behind the audio on screen (with its seed), for downloads
    this.abort = null;
    this.status = "idle";
    this.ttfaMs = null;
    this.rtf = null;
    $("speak").addEventListener("click", () => this.speak());
    $("stop").addEventListener("click", () => this.stop());
    $("download").addEventListener("click", () => this.download());
    $("add-speaker").addEventListener("click", () => this.addSpeaker());
    $("voice").addEventListener("change", () => $("voice").value && this.reference.clear());
    $("ref-clear").addEventListener("click", () => this.reference.clear());
  }

  // The tag speaker i is named by in the text: the loaded family's spelling.
  speakerTag(i) {
    return this.model.mossserve.family === "fish" ? `<|speaker:${i}|>` : `[S${i + 1}]`;
  }

  addSpeaker() {
    const box = $("speakers");
    if (this.model.mossserve.family !== "fish" && box.children.length >= MAX_SPEAKERS) return;
    const row = document.createElement("div");
    row.className = "row speaker";
    row.innerHTML = `<span></span>
      <label>voice <select class="voice-select speaker-voice"></select></label>
      <label>transcript <input class="speaker-text" size="40"></label>
      <button type="button" class="remove">×</button>`;
    row.firstElementChild.textContent = this.speakerTag(box.children.length);
    // Fish S2 Pro clones every speaker from a voice; it has no own voice per speaker to fall back on.
    if (this.model.mossserve.family === "fish") {
      row.querySelector("select").dataset.blank = "choose a voice (required)";
    }
    row.querySelector(".remove").addEventListener("click", () => {
      row.remove();
      [...box.children].forEach((r, i) => (r.firstElementChild.textContent = this.speakerTag(i)));
    });
    box.appendChild(row);
    voiceOptions(row.querySelector("select"));
  }

  // The request from the form; only fields the user set are sent, and always a seed, so the
  // download in another format is the same audio.
  async body() {
    const body = { model: this.model.id, input: $("text").value };
    const text = (id) => $(id).value.trim();
    const number = (id) => (text(id) === "" ? undefined : Number(text(id)));
    // The loaded model takes this option (main.js hides the others).
    const offered = (id) => !$(id).closest("[data-family][hidden], [data-field][hidden]");
    if (offered("voice") && $("voice").value) body.voice = $("voice").value;
    const reference = offered("ref-file") && this.reference.audio();
    if (reference) body.ref_audio = await dataUrl(reference);
    if (offered("ref-text") && text("ref-text")) body.ref_text = text("ref-text");
    if (offered("instructions") && text("instructions")) body.instructions = text("instructions");
    if (offered("language") && text("language")) body.language = text("language");
    if (offered("duration")) body.duration_seconds = number("duration");
    if (offered("depth")) body.depth = number("depth");
    if (offered("chunk-length")) body.chunk_length = number("chunk-length");
    if (offered("speakers")) {
      const speakers = [...document.querySelectorAll("#speakers .speaker")].map((row) => {
        const speaker = {};
        const voice = row.querySelector(".speaker-voice").value;
        const transcript = row.querySelector(".speaker-text").value.trim();
        if (voice) speaker.voice = voice;
        if (transcript) speaker.ref_text = transcript;
        return speaker;
      });
      if (speakers.length) body.speakers = speakers;
    }
    body.seed = number("seed") ?? Math.floor(Math.random() * 2 ** 31);
    body.temperature = number("temperature");
    body.top_p = number("top-p");
    body.top_k = number("top-k");
    if (offered("repetition-penalty")) body.repetition_penalty = number("repetition-penalty");
    body.max_new_tokens = number("max-frames");
    body.speed = number("speed");
    return Object.fromEntries(Object.entries(body).filter(([, v]) => v !== undefined));
  }

  setStatus(status) {
    this.status = status;
    $("stat-status").textContent = status;
  }

  async speak() {
    clearError();
    this.abort?.abort();
    const abort = (this.abort = new AbortController());
    const { sample_rate: rate, channels } = this.model.mossserve;
    this.player.reset(rate, channels);
    this.wave.update();
    this.ttfaMs = this.rtf = null;
    for (const id of ["stat-ttfa", "stat-rtf", "stat-duration", "stat-finish"]) $(id).textContent = "–";
    $("stat-samples").textContent = "0";
    $("stat-gaps").textContent = "0";
    $("download").disabled = true;
    this.setStatus("generating");
    try {
      const body = await this.body();
      $("stat-seed").textContent = body.seed;
      const started = performance.now();
      const response = await postJson("/v1/audio/speech",
        { ...body, stream: true, stream_format: "sse", response_format: "pcm" }, { signal: abort.signal });
      let finish = null;
      for await (const event of sseEvents(response)) {
        if (event.type === "speech.audio.delta") {
          if (this.ttfaMs === null) {
            this.ttfaMs = performance.now() - started;
            $("stat-ttfa").textContent = this.ttfaMs.toFixed(0);
          }
          this.player.push(fromBase64(event.audio));
          $("stat-samples").textContent = this.player.samples;
          $("stat-gaps").textContent = this.player.underruns;
          $("stat-duration").textContent = this.player.seconds().toFixed(2);
          this.wave.update();
        } else if (event.type === "speech.audio.done") {
          finish = event.finish_reason;
        } else if (event.type === "error") {
          throw new ApiError(event.error?.message || "the stream failed");
        }
      }
      if (finish === null) throw new ApiError("the stream ended before the audio was complete");
      const wall = (performance.now() - started) / 1000;
      this.rtf = this.player.seconds() > 0 ? wall / this.player.seconds() : null;
      $("stat-rtf").textContent = this.rtf === null ? "–" : this.rtf.toFixed(2);
      $("stat-finish").textContent = finish;
      this.lastBody = body;
      $("download").disabled = false;
      this.setStatus("done");
    } catch (error) {
      if (abort !== this.abort) return; // a newer Speak aborted this one: the state is the new one's
      this.player.stop();
      if (error.name === "AbortError") {
        this.setStatus("stopped");
      } else {
        this.setStatus("error");
        showError(error);
      }
    }
  }

  // The request, and the audio still playing after it finished (generation outruns playback).
  stop() {
    this.abort?.abort();
    this.player.stop();
  }

  // wav and pcm from the received samples; other formats: the same request (same seed) again.
  async download() {
    const format = $("download-format").value;
    const { sample_rate: rate, channels } = this.model.mossserve;
    try {
      let blob;
      if (format === "wav") {
        blob = wavBlob(this.player.pcm(), rate, channels);
      } else if (format === "pcm") {
        blob = new Blob([this.player.pcm()], { type: "audio/pcm" });
      } else {
        this.setStatus(`encoding ${format}`);
        blob = await (await postJson("/v1/audio/speech", { ...this.lastBody, response_format: format })).blob();
        this.setStatus("done");
      }
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = `speech.${format}`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
    } catch (error) {
      this.setStatus("error");
      showError(error);
    }
  }
}
