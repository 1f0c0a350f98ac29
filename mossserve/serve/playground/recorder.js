// Microphone capture for a reference voice: the first click starts recording, the second stops
// it and hands the recording (webm/ogg, which the server decodes with FFmpeg) to `done`.
// `audioInput` pairs a file input with a record button: whichever was used last is the audio, and
// `changed` hears of each new one.

import { showError } from "./api.js";

export function recordButton(button, status, done) {
  let recorder = null;
  button.addEventListener("click", async () => {
    if (recorder) {
      recorder.stop();
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const parts = [];
      recorder = new MediaRecorder(stream);
      recorder.ondataavailable = (e) => parts.push(e.data);
      recorder.onstop = () => {
        stream.getTracks().forEach((t) => t.stop());
        const blob = new Blob(parts, { type: recorder.mimeType });
        recorder = null;
        button.textContent = "● Record";
        status.textContent = `recorded ${(blob.size / 1024).toFixed(0)} KiB`;
        done(blob);
      };
      recorder.start();
      button.textContent = "■ Stop recording";
      status.textContent = "recording…";
    } catch (error) {
      recorder = null;
      showError(`microphone: ${error.message}`);
    }
  });
}

export function audioInput(fileInput, button, status, changed = () => {}) {
  let recorded = null;
  fileInput.addEventListener("change", () => {
    recorded = null;
    status.textContent = "";
    if (fileInput.files.length) changed();
  });
  recordButton(button, status, (blob) => {
    recorded = blob;
    fileInput.value = "";
    changed();
  });
  return {
    audio: () => recorded || fileInput.files[0],
    clear: () => {
      recorded = null;
      fileInput.value = "";
      status.textContent = "";
    },
  };
}
