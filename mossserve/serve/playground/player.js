// Gap-free playback of streamed s16le PCM: each chunk becomes an AudioBuffer scheduled at the
// running end time of the ones before, so chunk boundaries are sample-exact. The received PCM is
// kept for the waveform and the download.

const LEAD_S = 0.1; // start this far ahead of now, so the first chunks never race the clock

let context = null;

function audioContext() {
  context = context || new AudioContext();
  if (context.state === "suspended") context.resume();
  return context;
}

export class StreamPlayer {
  constructor() {
    this.reset(24000, 1);
  }

  reset(sampleRate, channels) {
    this.stop();
    this.sampleRate = sampleRate;
    this.channels = channels;
    this.parts = [];
    this.samples = 0; // per channel
    this.underruns = 0; // chunks that arrived after the audio before them had finished playing
    this.sources = [];
    this.endTime = null;
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
    this.sources.push(source);
  }

  // Silence what is queued and what still arrives (a cancelled turn's last chunks) until reset().
  stop() {
    this.stopped = true;
    for (const source of this.sources || []) {
      try {
        source.stop();
      } catch {
        // not started yet
      }
    }
    this.sources = [];
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

// Min/max per pixel column of the first channel.
export function drawWave(canvas, pcm, channels) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  g.fillStyle = getComputedStyle(canvas).color;
  const frames = Math.floor(pcm.length / channels);
  if (!frames) return;
  const per = frames / width;
  for (let x = 0; x < width; x++) {
    const start = Math.floor(x * per);
    const end = Math.max(start + 1, Math.floor((x + 1) * per));
    if (start >= frames) break;
    let lo = 0;
    let hi = 0;
    for (let i = start; i < Math.min(end, frames); i++) {
      const v = pcm[i * channels] / 32768;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const top = ((1 - hi) * height) / 2;
    g.fillRect(x, top, 1, Math.max(1, ((hi - lo) * height) / 2));
  }
}
