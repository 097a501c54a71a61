// AudioWorklet: microphone samples at the AudioContext rate -> 16 kHz mono int16 LE frames.
//
// Downsampling needs a low-pass filter first, otherwise everything above the new Nyquist
// frequency folds back into the speech band. The resampler below evaluates a
// Blackman-windowed sinc kernel centred on each output instant (a band-limited
// interpolator), so it handles any rate pair (48000, 44100, 22050 ... -> 16000).

const ZERO_CROSSINGS = 12;        // kernel half-width, in zero crossings of the sinc
const CUTOFF_FRACTION = 0.92;     // pass band ends at 92 % of the lower Nyquist frequency
const TABLE_STEPS_PER_SAMPLE = 128;

class StreamingResampler {
  constructor(inputRate, outputRate) {
    this.inputRate = inputRate;
    this.outputRate = outputRate;
    // Cutoff in cycles per input sample; below the output Nyquist when downsampling.
    const cutoff = 0.5 * CUTOFF_FRACTION * Math.min(1, outputRate / inputRate);
    this.halfWidth = ZERO_CROSSINGS / (2 * cutoff);   // in input samples
    this.reach = Math.ceil(this.halfWidth);
    this.kernelTable = buildKernelTable(cutoff, this.halfWidth);

    // Input samples not yet fully used; bufferStart is the stream index of buffer[0].
    // The stream starts after `reach` zeros so the first outputs have history.
    this.buffer = new Float32Array(8192);
    this.bufferLength = this.reach;
    this.bufferStart = -this.reach;
    this.inputCount = 0;
    this.outputCount = 0;
  }

  push(samples) {
    this.ensureCapacity(this.bufferLength + samples.length);
    this.buffer.set(samples, this.bufferLength);
    this.bufferLength += samples.length;
    this.inputCount += samples.length;
  }

  // Calls emit(value) for every output sample whose kernel support is fully buffered.
  drain(emit, outputLimit = Infinity) {
    const bufferEnd = this.bufferStart + this.bufferLength;
    while (this.outputCount < outputLimit) {
      // Exact product then division: no drift over long sessions.
      const position = (this.outputCount * this.inputRate) / this.outputRate;
      const centre = Math.floor(position);
      if (centre + this.reach >= bufferEnd) break;
      emit(this.interpolate(position, centre));
      this.outputCount += 1;
    }
    this.discardUsedInput();
  }

  // After the last input: zero-pad so the tail is emitted, but no output past the input's end.
  flush(emit) {
    this.push(new Float32Array(this.reach + 1));
    this.inputCount -= this.reach + 1;
    const lastOutput = Math.ceil((this.inputCount * this.outputRate) / this.inputRate);
    this.drain(emit, lastOutput);
  }

  interpolate(position, centre) {
    const table = this.kernelTable;
    let sum = 0;
    let weightSum = 0;
    for (let index = centre - this.reach + 1; index <= centre + this.reach; index++) {
      const distance = Math.abs(position - index);
      if (distance >= this.halfWidth) continue;
      const tablePosition = distance * TABLE_STEPS_PER_SAMPLE;
      const tableIndex = Math.floor(tablePosition);
      const fraction = tablePosition - tableIndex;
      const weight = table[tableIndex] + fraction * (table[tableIndex + 1] - table[tableIndex]);
      sum += weight * this.buffer[index - this.bufferStart];
      weightSum += weight;
    }
    // Normalising by the weight sum keeps the DC gain exactly 1 for every phase.
    return sum / weightSum;
  }

  discardUsedInput() {
    const nextPosition = (this.outputCount * this.inputRate) / this.outputRate;
    const firstNeeded = Math.floor(nextPosition) - this.reach + 1;
    const drop = firstNeeded - this.bufferStart;
    if (drop <= 0) return;
    this.buffer.copyWithin(0, drop, this.bufferLength);
    this.bufferLength -= drop;
    this.bufferStart += drop;
  }

  ensureCapacity(length) {
    if (length <= this.buffer.length) return;
    const grown = new Float32Array(Math.max(length, this.buffer.length * 2));
    grown.set(this.buffer.subarray(0, this.bufferLength));
    this.buffer = grown;
  }
}

function buildKernelTable(cutoff, halfWidth) {
  const size = Math.ceil(halfWidth * TABLE_STEPS_PER_SAMPLE) + 2;
  const table = new Float32Array(size);
  for (let step = 0; step < size; step++) {
    const distance = step / TABLE_STEPS_PER_SAMPLE;
    if (distance >= halfWidth) break;
    const x = 2 * cutoff * distance;
    const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
    // Blackman window over [-halfWidth, halfWidth], evaluated at its centre-relative offset.
    const phase = Math.PI * (distance / halfWidth + 1);
    const window = 0.42 - 0.5 * Math.cos(phase) + 0.08 * Math.cos(2 * phase);
    table[step] = 2 * cutoff * sinc * window;
  }
  return table;
}

class PcmCaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const { targetRate = 16000, frameSamples = 960 } = options.processorOptions || {};
    this.resampler = new StreamingResampler(sampleRate, targetRate);
    this.frameSamples = frameSamples;
    this.newFrame();
    this.mono = new Float32Array(128);
    this.stopped = false;
    this.emitSample = (value) => this.appendSample(value);
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === 'flush') this.flush();
    };
  }

  newFrame() {
    this.frameBuffer = new ArrayBuffer(this.frameSamples * 2);
    this.frameView = new DataView(this.frameBuffer);
    this.frameFill = 0;
  }

  appendSample(value) {
    const clipped = Math.max(-1, Math.min(1, value));
    const scaled = Math.round(clipped < 0 ? clipped * 32768 : clipped * 32767);
    this.frameView.setInt16(this.frameFill * 2, scaled, true);   // little-endian on any host
    this.frameFill += 1;
    if (this.frameFill === this.frameSamples) this.postFrame();
  }

  postFrame() {
    const frame = this.frameFill === this.frameSamples
      ? this.frameBuffer
      : this.frameBuffer.slice(0, this.frameFill * 2);
    this.port.postMessage(frame, [frame]);
    this.newFrame();
  }

  flush() {
    if (this.stopped) return;
    this.stopped = true;
    this.resampler.flush(this.emitSample);
    if (this.frameFill > 0) this.postFrame();
    this.port.postMessage({ type: 'flushed' });
  }

  process(inputs) {
    if (this.stopped) return false;
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;   // source not started yet
    const length = channels[0].length;
    if (this.mono.length !== length) this.mono = new Float32Array(length);
    // Down-mix: average the channels.
    this.mono.fill(0);
    for (const channel of channels) {
      for (let i = 0; i < length; i++) this.mono[i] += channel[i];
    }
    if (channels.length > 1) {
      for (let i = 0; i < length; i++) this.mono[i] /= channels.length;
    }
    this.resampler.push(this.mono);
    this.resampler.drain(this.emitSample);
    return true;
  }
}

registerProcessor('pcm-capture', PcmCaptureProcessor);
