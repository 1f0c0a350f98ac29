// The Voices tab: list, play, upload (file or microphone) and delete stored voices, and the
// voice pickers of the other tabs, which follow the library.

import { call, clearError, json, showError } from "./api.js";
import { audioInput } from "./recorder.js";

const $ = (id) => document.getElementById(id);
let voices = [];

// Fill a <select> with "no stored voice" (labelled "model's own voice" unless `data-blank` says
// otherwise) and the stored voices, keeping its choice.
export function voiceOptions(select) {
  const chosen = select.value;
  const blank = select.dataset.blank || "model's own voice";
  select.replaceChildren(new Option(blank, ""), ...voices.map((v) => new Option(v.id, v.id)));
  select.value = voices.some((v) => v.id === chosen) ? chosen : "";
}

export class VoicesTab {
  constructor() {
    this.sample = audioInput($("voice-file"), $("voice-record"), $("voice-rec-status")); // file or recording
    this.status = "idle";
    $("voice-form").addEventListener("submit", (e) => {
      e.preventDefault();
      this.upload();
    });
  }

  async refresh() {
    voices = (await json("/v1/audio/voices")).data;
    document.querySelectorAll(".voice-select").forEach(voiceOptions);
    $("voice-list").replaceChildren(...voices.map((voice) => this.row(voice)));
  }

  row(voice) {
    const row = document.createElement("tr");
    row.dataset.voice = voice.id;
    for (const text of [voice.id, voice.duration_s.toFixed(1), voice.transcript || ""]) {
      row.insertCell().textContent = text;
    }
    const actions = row.insertCell();
    const play = document.createElement("button");
    play.textContent = "▶ play";
    play.className = "play";
    play.addEventListener("click", () => this.play(voice.id));
    const remove = document.createElement("button");
    remove.textContent = "delete";
    remove.className = "delete";
    remove.addEventListener("click", () => this.remove(voice.id));
    actions.append(play, remove);
    return row;
  }

  async play(name) {
    try {
      clearError();
      const blob = await (await call(`/v1/audio/voices/${encodeURIComponent(name)}/audio`)).blob();
      const audio = $("voice-audio");
      audio.hidden = false;
      if (audio.src) URL.revokeObjectURL(audio.src); // the voice played before
      audio.src = URL.createObjectURL(blob);
      await audio.play();
    } catch (error) {
      showError(error);
    }
  }

  async upload() {
    clearError();
    const file = this.sample.audio();
    const form = new FormData();
    form.append("name", $("voice-name").value.trim());
    if (file) form.append("file", file, file.name || "recording.webm");
    if ($("voice-transcript").value.trim()) form.append("transcript", $("voice-transcript").value.trim());
    this.status = "uploading";
    try {
      await call("/v1/audio/voices", { method: "POST", body: form });
      $("voice-form").reset();
      this.sample.clear();
      await this.refresh();
      this.status = "uploaded";
    } catch (error) {
      this.status = "error";
      showError(error);
    }
  }

  async remove(name) {
    try {
      clearError();
      await call(`/v1/audio/voices/${encodeURIComponent(name)}`, { method: "DELETE" });
      await this.refresh();
    } catch (error) {
      showError(error);
    }
  }
}
