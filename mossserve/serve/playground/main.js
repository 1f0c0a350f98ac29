// The playground's entry: read the loaded model from /v1/models, show the tabs and options it
// supports, and wire the tabs. `window.playground` exposes the tabs' state (tests read it).

import { apiKey, json, setApiKey, showError } from "./api.js";
import { RealtimeTab } from "./realtime.js";
import { SpeechTab } from "./speech.js";
import { VoicesTab } from "./voices.js";

const $ = (id) => document.getElementById(id);

// The options the loaded family takes and, of those, the ones its task reads (`task_fields`, the
// server's own table; null: the family's all).
function offerOptions(caps) {
  document.querySelectorAll("[data-family], [data-field]").forEach((el) => {
    const family = !el.dataset.family || el.dataset.family.split(" ").includes(caps.family);
    const field = !el.dataset.field || !caps.task_fields || caps.task_fields.includes(el.dataset.field);
    el.hidden = !(family && field);
  });
}

function showTab(name) {
  document.querySelectorAll("nav button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll("main > section").forEach((s) => (s.hidden = s.id !== `tab-${name}`));
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", () => {
    setApiKey($("api-key").value.trim());
    location.reload();
  });
  document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));
  try {
    const model = (await json("/v1/models")).data[0];
    const caps = model.mossserve;
    $("model").textContent = `${model.id} · ${caps.family}${caps.task ? ` (${caps.task})` : ""} · ${caps.sample_rate} Hz`;
    offerOptions(caps);
    document.querySelector('nav button[data-tab="realtime"]').hidden = !caps.sessions;
    const voices = new VoicesTab();
    window.playground = { model, speech: new SpeechTab(model), voices,
                          realtime: caps.sessions ? new RealtimeTab(model) : null, ready: false };
    await voices.refresh();
    window.playground.ready = true;
  } catch (error) {
    $("model").textContent = "not connected";
    showError(error);
  }
}

start();
