// The voice mode's microphone tap: an AudioWorklet that hands the page
// its input as it comes, in blocks of about 20 ms (mono, float samples
// at the context's rate). The page does the rest (voice detection, WAV).
"use strict";

class PcmCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(Math.round(sampleRate / 50));
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (input && input[0]) {
      const ch = input[0];
      for (let i = 0; i < ch.length; i++) {
        this.block[this.fill++] = ch[i];
        if (this.fill === this.block.length) {
          this.port.postMessage(this.block.slice());
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("pcm-capture", PcmCapture);
