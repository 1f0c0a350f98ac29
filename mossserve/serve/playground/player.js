// Gap-free playback of streamed s16le PCM: each chunk becomes an AudioBuffer scheduled at the
// running end time of the ones before, so chunk boundaries are sample-exact. The received PCM is
// kept for the download, and its min/max per block of frames for the waveform.

const LEAD_S = 0.1; // start this far ahead of now, so the first chunks never race the clock
const BLOCK = 64; // frames per min/max pair: a redraw reads these pairs, never every sample

let context = null;

function audioContext() {
  context = context || new AudioContext();
  if (context.state === "suspended") context.resume();
  return context;
}

export class StreamPlayer {
  constructor() {
    this.sources = []; // {source, end}: the chunks queued or playing, in start order
    this.endTime = null; // when the last queued chunk ends (null: nothing queued)
    this.reset(24000, 1);
  }

  // Silence what is queued and start a new stream.
  reset(sampleRate, channels) {
    this.stop();
    this.begin(sampleRate, channels);
  }

  // A new stream with its own samples (waveform, download) that plays after the audio still queued:
  // the next realtime turn must not cut off the one before.
  begin(sampleRate, channels) {
    const now = context ? context.currentTime : 0;
    while (this.sources.length && this.sources[0].end <= now) this.sources.shift(); // played out
    if (!this.sources.length) this.endTime = null; // silence now: the stream's first chunk is no underrun
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.parts = [];
    this.samples = 0; // per channel
    this.lows = []; // min of the first channel per BLOCK frames (the last block may be partial)
    this.highs = []; // max, likewise
    this.underruns = 0; // chunks that arrived after the audio before them had finished playing
    this.odd = null; // a trailing byte of a sample split across chunks
    this.stopped = false; // stop() was called: later chunks are kept, not played
  }

  // Queue one chunk of s16le bytes (interleaved when there are several channels).
  push(bytes) {
    if (this.odd !== null) {
      const joined = new Uint8Array(bytes.length + 1);
      joined[0] = this.odd;
      joined.set(bytes, 1);
      bytes = joined;
      this.odd = null;
    }
    if (bytes.length % 2) {
      this.odd = bytes[bytes.length - 1];
      bytes = bytes.subarray(0, bytes.length - 1);
    }
    const pcm = new Int16Array(bytes.slice().buffer);
    const frames = Math.floor(pcm.length / this.channels);
    if (!frames) return;
    this.parts.push(pcm);
    this.addPeaks(pcm, frames);
    this.samples += frames;
    if (this.stopped) return;
    const ctx = audioContext();
    const buffer = ctx.createBuffer(this.channels, frames, this.sampleRate);
    for (let c = 0; c < this.channels; c++) {
      const channel = buffer.getChannelData(c);
      for (let i = 0; i < frames; i++) channel[i] = pcm[i * this.channels + c] / 32768;
    }
    const source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    if (this.endTime === null) {
      this.endTime = ctx.currentTime + LEAD_S;
    } else if (this.endTime < ctx.currentTime) {
      this.underruns += 1;
      this.endTime = ctx.currentTime + LEAD_S;
    }
    source.start(this.endTime);
    this.endTime += buffer.duration;
    this.sources.push({ source, end: this.endTime });
  }

  addPeaks(pcm, frames) {
    const { lows, highs, channels } = this;
    for (let i = 0; i < frames; i++) {
      const v = pcm[i * channels];
      if ((this.samples + i) % BLOCK === 0) {
        lows.push(v);
        highs.push(v);
      } else {
        const k = lows.length - 1;
        if (v < lows[k]) lows[k] = v;
        if (v > highs[k]) highs[k] = v;
      }
    }
  }

  // Silence what is queued and what still arrives (a cancelled turn's last chunks) until the next
  // stream (reset, begin).
  stop() {
    this.stopped = true;
    for (const { source } of this.sources) {
      try {
        source.stop();
      } catch {
        // not started yet
      }
    }
    this.sources = [];
    this.endTime = null;
  }

  seconds() {
    return this.samples / this.sampleRate;
  }

  pcm() {
    const all = new Int16Array(this.parts.reduce((n, p) => n + p.length, 0));
    let offset = 0;
    for (const part of this.parts) {
      all.set(part, offset);
      offset += part.length;
    }
    return all;
  }
}

// A WAV file (16-bit PCM) around interleaved samples.
export function wavBlob(pcm, sampleRate, channels) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, s) => [...s].forEach((ch, i) => header.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + pcm.byteLength, true);
  text(8, "WAVEfmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true);
  header.setUint16(22, channels, true);
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * channels * 2, true);
  header.setUint16(32, channels * 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, pcm.byteLength, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}

// A player's waveform on a canvas, min/max per pixel column of the first channel. Redrawn at most
// once per animation frame however many chunks arrive, from the player's per-block min/max, so a
// redraw costs the same at the start of a long output as at its end.
export class Waveform {
  constructor(canvas, player) {
    this.canvas = canvas;
    this.player = player;
    this.due = false; // a redraw waits for the next animation frame
  }

  update() {
    if (this.due) return;
    this.due = true;
    requestAnimationFrame(() => {
      this.due = false;
      this.draw();
    });
  }

  draw() {
    const { canvas } = this;
    const { lows, highs } = this.player;
    const g = canvas.getContext("2d");
    const { width, height } = canvas;
    g.clearRect(0, 0, width, height);
    g.fillStyle = getComputedStyle(canvas).color;
    const per = lows.length / width;
    for (let x = 0; x < width; x++) {
      const start = Math.floor(x * per);
      const end = Math.min(lows.length, Math.max(start + 1, Math.floor((x + 1) * per)));
      if (start >= lows.length) break;
      let lo = 0;
      let hi = 0;
      for (let i = start; i < end; i++) {
        if (lows[i] < lo) lo = lows[i];
        if (highs[i] > hi) hi = highs[i];
      }
      const top = ((1 - hi / 32768) * height) / 2;
      g.fillRect(x, top, 1, Math.max(1, ((hi - lo) / 32768 * height) / 2));
    }
  }
}
