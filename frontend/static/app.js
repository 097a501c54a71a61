// Microphone -> service client speaking the FunASR-compatible 2pass WebSocket protocol.
import { Transcript, formatTime } from './transcript.js';

const TARGET_RATE = 16000;
const FRAME_SAMPLES = 960;            // 60 ms = chunk_size[1] * 60 ms / chunk_interval
const CHUNK_SIZE = [5, 10, 5];
const CHUNK_INTERVAL = 10;
const WAV_NAME = 'microphone';

const elements = {
  url: document.getElementById('server-url'),
  mode: document.getElementById('mode'),
  itn: document.getElementById('itn'),
  hotwords: document.getElementById('hotwords'),
  start: document.getElementById('start'),
  stop: document.getElementById('stop'),
  status: document.getElementById('status'),
  error: document.getElementById('error'),
  segments: document.getElementById('segments'),
  partial: document.getElementById('partial'),
};

let session = null;   // the stream in progress, or null

elements.url.value = defaultServerUrl();
elements.start.addEventListener('click', start);
elements.stop.addEventListener('click', stop);

function defaultServerUrl() {
  if (location.protocol === 'https:') return `wss://${location.host}/`;
  if (location.protocol === 'http:') return `ws://${location.host}/`;
  return 'ws://localhost:10095/';
}

function checkServerUrl(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    return `"${url}" is not a valid URL (expected e.g. ws://host:10095/)`;
  }
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    return `The WebSocket URL must start with ws:// or wss://, got "${url}"`;
  }
  return null;
}

function buildConfig(mode) {
  return {
    mode,
    chunk_size: CHUNK_SIZE,
    chunk_interval: CHUNK_INTERVAL,
    wav_name: WAV_NAME,
    wav_format: 'pcm',
    audio_fs: TARGET_RATE,
    is_speaking: true,
    hotwords: elements.hotwords.value.trim(),
    itn: elements.itn.checked,
  };
}

async function start() {
  if (session) return;
  const url = elements.url.value.trim();
  clearResults();
  hideError();
  const problem = checkServerUrl(url);
  if (problem) {
    showError(problem);
    return;
  }
  const mode = elements.mode.value;
  const current = {
    url,
    mode,
    state: 'connecting',
    transcript: new Transcript({ sessionMode: mode }),
    capture: null,
    socket: null,
    queuedFrames: [],
    samplesSent: 0,
  };
  session = current;
  setControlsBusy(true);
  setStatus('connecting', 'Opening the microphone…');

  // Created inside the click handler: browsers only let a user-started context run.
  const audioContext = new AudioContext();
  try {
    current.capture = await openMicrophone(audioContext);
  } catch (error) {
    audioContext.close();
    endSession(current, 'failed', 'Microphone unavailable');
    showError(describeMicrophoneError(error));
    return;
  }
  if (session !== current) {     // Stop was pressed while the permission prompt was open
    current.capture.close();
    return;
  }
  // Audio captured while the connection opens is queued, not lost.
  current.capture.onFrame = (frame) => sendAudio(current, frame);

  setStatus('connecting', `Connecting to ${url}…`);
  let socket;
  try {
    socket = new WebSocket(url);
  } catch (error) {
    endSession(current, 'failed', 'Not connected');
    showError(`Cannot open a WebSocket to "${url}": ${error.message}`);
    return;
  }
  socket.binaryType = 'arraybuffer';
  current.socket = socket;
  socket.onopen = () => {
    if (session !== current) return;
    socket.send(JSON.stringify(buildConfig(mode)));
    for (const frame of current.queuedFrames) sendAudio(current, frame);
    current.queuedFrames = [];
    current.state = 'streaming';
    setStatus('streaming', `Connected to ${url} — listening (mode ${mode}, microphone at ${current.capture.sampleRate} Hz)`);
  };
  socket.onmessage = (event) => handleMessage(current, event.data);
  socket.onclose = (event) => handleClose(current, event);
  // The close event that always follows carries the useful details.
  socket.onerror = () => {};
}

function sendAudio(current, frame) {
  const socket = current.socket;
  if (!socket || socket.readyState === WebSocket.CONNECTING) {
    current.queuedFrames.push(frame);
    return;
  }
  if (socket.readyState !== WebSocket.OPEN) return;
  socket.send(frame);
  current.samplesSent += frame.byteLength / 2;
}

function stop() {
  const current = session;
  if (!current) return;
  if (current.state !== 'streaming') {
    // Still connecting, or already waiting for the final result: give up on this stream.
    endSession(current, 'idle', 'Stopped');
    return;
  }
  current.state = 'finishing';
  setStatus('finishing', 'Stopping — waiting for the final result…');
  elements.stop.textContent = 'Abort';
  // The worklet hands over its last partial frame first, then the stream is ended.
  current.capture.onFlushed = () => {
    current.capture.close();
    if (current.socket.readyState === WebSocket.OPEN) {
      current.socket.send(JSON.stringify({ is_speaking: false }));
    }
  };
  current.capture.flush();
}

function handleMessage(current, data) {
  if (session !== current) return;
  if (typeof data !== 'string') {
    showError('The server sent a binary message; this protocol only uses JSON text messages.');
    return;
  }
  let message;
  try {
    message = JSON.parse(data);
  } catch {
    showError(`The server sent a message that is not JSON: ${data.slice(0, 200)}`);
    return;
  }
  if (message.error) {
    const code = message.code ? ` [${message.code}]` : '';
    showError(`Server error${code}: ${message.error}`);
  }
  current.transcript.apply(message, (current.samplesSent * 1000) / TARGET_RATE);
  renderTranscript(current.transcript);
  if (message.is_final) {
    if (message.error) endSession(current, 'failed', 'Stopped by a server error');
    else endSession(current, 'idle', finishedText(current.transcript));
  }
}

function finishedText(transcript) {
  const count = transcript.segments.length;
  return transcript.sessionMode === 'online' ? 'Finished' : `Finished — ${count} segment${count === 1 ? '' : 's'}`;
}

function handleClose(current, event) {
  if (session !== current) return;
  const detail = `code ${event.code}${event.reason ? `: ${event.reason}` : ''}`;
  if (current.state === 'connecting') {
    endSession(current, 'failed', 'Not connected');
    showError(`Could not connect to ${current.url} (${detail}). Is the server running and the URL right?`);
  } else {
    endSession(current, 'failed', 'Disconnected');
    showError(`The connection closed before the final result (${detail}).`);
  }
}

function endSession(current, state, statusText) {
  if (session !== current) return;
  session = null;
  if (current.capture) current.capture.close();
  const socket = current.socket;
  if (socket && (socket.readyState === WebSocket.OPEN || socket.readyState === WebSocket.CONNECTING)) {
    socket.close(1000);
  }
  setControlsBusy(false);
  setStatus(state, statusText);
}

async function openMicrophone(audioContext) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !audioContext.audioWorklet) {
    throw new Error(
      `Microphone capture needs a secure page: open this page over https:// or http://localhost (it is ${location.origin}).`,
    );
  }
  // Raw audio: the recogniser does better without browser voice processing.
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
  });
  try {
    await audioContext.audioWorklet.addModule(new URL('pcm-capture-worklet.js', import.meta.url));
    const source = audioContext.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(audioContext, 'pcm-capture', {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      processorOptions: { targetRate: TARGET_RATE, frameSamples: FRAME_SAMPLES },
    });
    let closed = false;
    const capture = {
      sampleRate: audioContext.sampleRate,
      onFrame: null,
      onFlushed: null,
      flush() {
        node.port.postMessage({ type: 'flush' });
      },
      close() {
        if (closed) return;
        closed = true;
        for (const track of stream.getTracks()) track.stop();
        source.disconnect();
        node.disconnect();
        audioContext.close();
      },
    };
    node.port.onmessage = (event) => {
      if (event.data instanceof ArrayBuffer) {
        if (capture.onFrame) capture.onFrame(event.data);
      } else if (event.data && event.data.type === 'flushed' && capture.onFlushed) {
        capture.onFlushed();
      }
    };
    source.connect(node);
    // Connected to the destination so the graph pulls the node; its output is silence.
    node.connect(audioContext.destination);
    if (audioContext.state === 'suspended') await audioContext.resume();
    return capture;
  } catch (error) {
    for (const track of stream.getTracks()) track.stop();
    throw error;
  }
}

function describeMicrophoneError(error) {
  switch (error.name) {
    case 'NotAllowedError':
      return 'Microphone access was denied. Allow it in the browser’s site settings and press Start again.';
    case 'NotFoundError':
      return 'No microphone was found on this computer.';
    case 'NotReadableError':
      return 'The microphone is in use by another application or could not be opened.';
    default:
      return `Cannot capture audio: ${error.message || error.name}`;
  }
}

function renderTranscript(transcript) {
  // Segments are only ever appended, so only the new ones are added to the list.
  for (let index = elements.segments.children.length; index < transcript.segments.length; index++) {
    elements.segments.append(segmentItem(transcript.segments[index]));
  }
  elements.partial.textContent = transcript.partialText;
  elements.partial.classList.toggle('final', transcript.finished);
}

function segmentItem(segment) {
  const item = document.createElement('li');
  const time = document.createElement('span');
  time.className = 'segment-time';
  if (segment.startMs !== null) {
    time.textContent = `${formatTime(segment.startMs)} – ${formatTime(segment.endMs)}`;
    item.dataset.startMs = segment.startMs;
    item.dataset.endMs = segment.endMs;
  }
  const text = document.createElement('span');
  text.className = 'segment-text';
  text.textContent = segment.text;
  item.append(time, text);
  return item;
}

function clearResults() {
  elements.segments.replaceChildren();
  elements.partial.textContent = '';
  elements.partial.classList.remove('final');
}

function setControlsBusy(busy) {
  elements.start.disabled = busy;
  elements.stop.disabled = !busy;
  elements.stop.textContent = 'Stop';
  for (const input of [elements.url, elements.mode, elements.itn, elements.hotwords]) input.disabled = busy;
}

function setStatus(state, text) {
  elements.status.dataset.state = state;
  elements.status.textContent = text;
}

function showError(text) {
  elements.error.textContent = text;
  elements.error.hidden = false;
}

function hideError() {
  elements.error.textContent = '';
  elements.error.hidden = true;
}
