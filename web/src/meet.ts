// Braid's demo meeting page: the unmodified livekit-client SDK talking to a Braid dev server.
//
// Flow: the pre-join form asks for a name and a room, the page fetches a dev token from
// `/dev/token` (served by `braid-server --dev` only), connects, publishes camera and microphone
// (simulcast on, as the SDK defaults) and shows one tile per participant.
//
// Query parameters (all optional): room, name, identity, autojoin=1, res=180|360|540|720|1080,
// codec=vp8|h264|vp9|av1 (what the camera publishes; vp9 and av1 with SVC layers, as the SDK does), adaptive=0,
// dynacast=0, simulcast=0, singlepc=0, debug=1.
//
// Test hooks: `window.braidRoom` is the connected Room, `window.braidMeet` offers join/leave,
// data send/receive and per-track inbound stats; tiles carry data-identity, data-local,
// data-speaking, data-video and data-mic attributes.

import {
  ConnectionState,
  LogLevel,
  Participant,
  RemoteTrack,
  RemoteTrackPublication,
  Room,
  RoomEvent,
  Track,
  VideoPresets,
  VideoQuality,
  setLogLevel,
  videoCodecs,
  type RoomOptions,
  type VideoCodec,
  type VideoPreset,
} from 'livekit-client';

interface DataMessage {
  from: string;
  topic: string | undefined;
  text: string;
}

interface InboundStats {
  identity: string;
  trackSid: string;
  kind: 'audio' | 'video';
  source: string;
  packetsReceived: number;
  bytesReceived: number;
  framesDecoded: number;
  frameWidth: number;
  frameHeight: number;
  totalSamplesReceived: number;
}

interface Tile {
  el: HTMLElement;
  video: HTMLVideoElement;
  label: HTMLElement;
  attached?: Track;
}

const params = new URLSearchParams(location.search);
const flag = (name: string, fallback: boolean): boolean => {
  const v = params.get(name);
  return v === null ? fallback : !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
};

const RESOLUTIONS: Record<string, VideoPreset> = {
  '180': VideoPresets.h180,
  '360': VideoPresets.h360,
  '540': VideoPresets.h540,
  '720': VideoPresets.h720,
  '1080': VideoPresets.h1080,
};

if (flag('debug', false)) setLogLevel(LogLevel.debug);

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing from the page`);
  return el as T;
};

const joinForm = $<HTMLFormElement>('join-form');
const nameInput = $<HTMLInputElement>('name');
const roomInput = $<HTMLInputElement>('room');
const joinButton = $<HTMLButtonElement>('join');
const joinError = $<HTMLElement>('join-error');
const lobby = $<HTMLElement>('lobby');
const meeting = $<HTMLElement>('meeting');
const grid = $<HTMLElement>('grid');
const roomTitle = $<HTMLElement>('room-title');
const peopleCount = $<HTMLElement>('people-count');
const statusBadge = $<HTMLElement>('status');
const micButton = $<HTMLButtonElement>('toggle-mic');
const camButton = $<HTMLButtonElement>('toggle-cam');
const leaveButton = $<HTMLButtonElement>('leave');
const audioButton = $<HTMLButtonElement>('start-audio');
const audioSink = $<HTMLElement>('audio-sink');

let room: Room | undefined;
const tiles = new Map<string, Tile>();
const audioElements = new Map<string, HTMLMediaElement>();
const received: DataMessage[] = [];

nameInput.value = params.get('name') ?? localStorage.getItem('braid.name') ?? '';
roomInput.value = params.get('room') ?? 'demo';

function slug(text: string): string {
  return text.toLowerCase().replace(/[^a-z0-9_-]+/g, '-').replace(/^-+|-+$/g, '') || 'guest';
}

function initials(name: string): string {
  const parts = name.trim().split(/\s+/).filter(Boolean);
  return (parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : name.slice(0, 2)).toUpperCase() || '?';
}

async function fetchToken(roomName: string, identity: string, name: string): Promise<{ token: string; url: string }> {
  const query = new URLSearchParams({ room: roomName, identity, name });
  const resp = await fetch(`/dev/token?${query}`);
  if (resp.status === 404) {
    throw new Error('This server does not hand out dev tokens (start it with braid-server --dev).');
  }
  if (!resp.ok) throw new Error(`Token request failed: ${resp.status} ${await resp.text()}`);
  return resp.json();
}

function videoCodec(): VideoCodec | undefined {
  const codec = params.get('codec');
  return codec && (videoCodecs as readonly string[]).includes(codec) ? (codec as VideoCodec) : undefined;
}

function roomOptions(): RoomOptions {
  const resolution = RESOLUTIONS[params.get('res') ?? ''] ?? VideoPresets.h720;
  return {
    adaptiveStream: flag('adaptive', true),
    dynacast: flag('dynacast', true),
    singlePeerConnection: flag('singlepc', true),
    videoCaptureDefaults: { resolution: resolution.resolution },
    publishDefaults: { simulcast: flag('simulcast', true), videoCodec: videoCodec() },
  };
}

async function join(name: string, roomName: string, identity?: string): Promise<Room> {
  if (room) await leave();
  const id = identity || `${slug(name)}-${Math.random().toString(36).slice(2, 6)}`;
  const { token, url } = await fetchToken(roomName, id, name);

  const r = new Room(roomOptions());
  room = r;
  window.braidRoom = r;
  wireRoom(r);
  // ?relay=1: media only through the TURN servers the server hands out (as behind a network that allows nothing else)
  await r.connect(url, token, flag('relay', false) ? { rtcConfig: { iceTransportPolicy: 'relay' } } : {});

  roomTitle.textContent = r.name;
  lobby.hidden = true;
  meeting.hidden = false;
  // A shareable address: the same page with this room filled in (other options kept).
  const query = new URLSearchParams(location.search);
  query.set('room', roomName);
  query.delete('autojoin');
  query.delete('identity');
  history.replaceState(null, '', `${location.pathname}?${query}`);
  document.title = `${r.name} · Braid Meet`;
  syncTiles();

  // A device error should not throw the user out of the room: they still see and hear the others.
  try {
    await r.localParticipant.enableCameraAndMicrophone();
  } catch (err) {
    showStatus(`camera/microphone: ${(err as Error).message}`, 'warn');
  }
  syncTiles();
  return r;
}

async function leave(): Promise<void> {
  const r = room;
  room = undefined;
  if (r) await r.disconnect();
  for (const el of audioElements.values()) el.remove();
  audioElements.clear();
  for (const tile of tiles.values()) tile.el.remove();
  tiles.clear();
  meeting.hidden = true;
  lobby.hidden = false;
  document.title = 'Braid Meet';
  joinButton.disabled = false;
}

function wireRoom(r: Room): void {
  const sync = () => syncTiles();
  r.on(RoomEvent.ParticipantConnected, sync)
    .on(RoomEvent.ParticipantDisconnected, sync)
    .on(RoomEvent.ParticipantNameChanged, sync)
    .on(RoomEvent.TrackPublished, sync)
    .on(RoomEvent.TrackUnpublished, sync)
    .on(RoomEvent.TrackSubscribed, (track: RemoteTrack, _pub: RemoteTrackPublication, p: Participant) => {
      if (track.kind === Track.Kind.Audio) attachAudio(track, p);
      syncTiles();
    })
    .on(RoomEvent.TrackUnsubscribed, (track: RemoteTrack) => {
      const el = audioElements.get(track.sid ?? '');
      if (el) {
        track.detach(el);
        el.remove();
        audioElements.delete(track.sid ?? '');
      }
      syncTiles();
    })
    .on(RoomEvent.TrackMuted, sync)
    .on(RoomEvent.TrackUnmuted, sync)
    .on(RoomEvent.LocalTrackPublished, sync)
    .on(RoomEvent.LocalTrackUnpublished, sync)
    .on(RoomEvent.ActiveSpeakersChanged, sync)
    .on(RoomEvent.AudioPlaybackStatusChanged, () => {
      audioButton.hidden = r.canPlaybackAudio;
    })
    .on(RoomEvent.ConnectionStateChanged, (state: ConnectionState) => {
      if (state === ConnectionState.Connected) showStatus('', 'ok');
      else if (state === ConnectionState.Reconnecting || state === ConnectionState.SignalReconnecting) {
        showStatus('reconnecting…', 'warn');
      }
    })
    .on(RoomEvent.DataReceived, (payload: Uint8Array, p?: Participant, _kind?: unknown, topic?: string) => {
      received.push({ from: p?.identity ?? '', topic, text: new TextDecoder().decode(payload) });
    })
    .on(RoomEvent.Disconnected, () => {
      if (room === r) {
        void leave();
        showJoinError('Disconnected from the room.');
      }
    });
}

function attachAudio(track: RemoteTrack, p: Participant): void {
  const el = track.attach();
  el.dataset.identity = p.identity;
  audioSink.appendChild(el);
  audioElements.set(track.sid ?? '', el);
}

function participants(r: Room): Participant[] {
  return [r.localParticipant, ...r.remoteParticipants.values()];
}

function makeTile(p: Participant): Tile {
  const el = document.createElement('div');
  el.className = 'tile';
  el.dataset.identity = p.identity;
  el.dataset.local = String(p === room?.localParticipant);

  const video = document.createElement('video');
  video.autoplay = true;
  video.playsInline = true;
  video.muted = true;

  const avatar = document.createElement('div');
  avatar.className = 'avatar';

  const label = document.createElement('div');
  label.className = 'label';

  el.append(video, avatar, label);
  grid.appendChild(el);
  return { el, video, label };
}

function syncTiles(): void {
  const r = room;
  if (!r) return;
  const present = new Set<string>();
  for (const p of participants(r)) {
    present.add(p.identity);
    const tile = tiles.get(p.identity) ?? makeTile(p);
    tiles.set(p.identity, tile);
    updateTile(tile, p);
  }
  for (const [identity, tile] of tiles) {
    if (!present.has(identity)) {
      tile.attached?.detach(tile.video);
      tile.el.remove();
      tiles.delete(identity);
    }
  }
  const n = present.size;
  peopleCount.textContent = `${n} ${n === 1 ? 'person' : 'people'}`;
  grid.dataset.count = String(Math.min(n, 9));

  const mic = r.localParticipant.isMicrophoneEnabled;
  const cam = r.localParticipant.isCameraEnabled;
  micButton.setAttribute('aria-pressed', String(!mic));
  camButton.setAttribute('aria-pressed', String(!cam));
  micButton.title = mic ? 'Mute microphone' : 'Unmute microphone';
  camButton.title = cam ? 'Turn camera off' : 'Turn camera on';
}

function updateTile(tile: Tile, p: Participant): void {
  const camPub = p.getTrackPublication(Track.Source.Camera);
  const micPub = p.getTrackPublication(Track.Source.Microphone);
  const videoTrack = camPub && !camPub.isMuted ? camPub.track : undefined;

  if (tile.attached !== videoTrack) {
    tile.attached?.detach(tile.video);
    tile.attached = videoTrack;
    if (videoTrack) {
      videoTrack.attach(tile.video);
      tile.video.dataset.trackSid = videoTrack.sid ?? '';
    } else {
      delete tile.video.dataset.trackSid;
    }
  }

  const name = p.name || p.identity;
  const micOn = !!micPub && !micPub.isMuted;
  tile.el.dataset.video = videoTrack ? 'on' : 'off';
  tile.el.dataset.mic = micOn ? 'on' : 'muted';
  tile.el.dataset.speaking = String(p.isSpeaking);
  (tile.el.querySelector('.avatar') as HTMLElement).textContent = initials(name);
  tile.label.textContent = p === room?.localParticipant ? `${name} (you)` : name;
}

function showStatus(text: string, kind: 'ok' | 'warn'): void {
  statusBadge.textContent = text;
  statusBadge.dataset.kind = kind;
  statusBadge.hidden = !text;
}

function showJoinError(text: string): void {
  joinError.textContent = text;
  joinError.hidden = !text;
}

joinForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = nameInput.value.trim();
  const roomName = roomInput.value.trim();
  if (!name || !roomName) return;
  localStorage.setItem('braid.name', name);
  joinButton.disabled = true;
  showJoinError('');
  try {
    await join(name, roomName, params.get('identity') ?? undefined);
  } catch (err) {
    console.error('join failed', err);
    await leave();
    showJoinError((err as Error).message || String(err));
  } finally {
    joinButton.disabled = false;
  }
});

micButton.addEventListener('click', async () => {
  const lp = room?.localParticipant;
  if (lp) await lp.setMicrophoneEnabled(!lp.isMicrophoneEnabled);
  syncTiles();
});

camButton.addEventListener('click', async () => {
  const lp = room?.localParticipant;
  if (lp) await lp.setCameraEnabled(!lp.isCameraEnabled);
  syncTiles();
});

leaveButton.addEventListener('click', () => void leave());

audioButton.addEventListener('click', async () => {
  await room?.startAudio();
  audioButton.hidden = !!room?.canPlaybackAudio;
});

async function inboundStats(): Promise<InboundStats[]> {
  const r = room;
  if (!r) return [];
  const out: InboundStats[] = [];
  for (const p of r.remoteParticipants.values()) {
    for (const pub of p.trackPublications.values()) {
      const track = pub.track;
      if (!track) continue;
      const report = await track.getRTCStatsReport();
      report?.forEach((s) => {
        if (s.type !== 'inbound-rtp') return;
        out.push({
          identity: p.identity,
          trackSid: pub.trackSid,
          kind: s.kind,
          source: pub.source,
          packetsReceived: s.packetsReceived ?? 0,
          bytesReceived: s.bytesReceived ?? 0,
          framesDecoded: s.framesDecoded ?? 0,
          frameWidth: s.frameWidth ?? 0,
          frameHeight: s.frameHeight ?? 0,
          totalSamplesReceived: s.totalSamplesReceived ?? 0,
        });
      });
    }
  }
  return out;
}

async function sendData(text: string, topic?: string): Promise<void> {
  if (!room) throw new Error('not connected');
  await room.localParticipant.publishData(new TextEncoder().encode(text), { reliable: true, topic });
}

function setVideoQuality(identity: string, quality: 'low' | 'medium' | 'high'): void {
  const p = room?.remoteParticipants.get(identity);
  const pub = p?.getTrackPublication(Track.Source.Camera) as RemoteTrackPublication | undefined;
  if (!pub) throw new Error(`no camera publication from ${identity}`);
  pub.setVideoQuality({ low: VideoQuality.LOW, medium: VideoQuality.MEDIUM, high: VideoQuality.HIGH }[quality]);
}

const braidMeet = { join, leave, sendData, received, inboundStats, setVideoQuality };

declare global {
  interface Window {
    braidRoom?: Room;
    braidMeet: typeof braidMeet;
  }
}
window.braidMeet = braidMeet;

if (flag('autojoin', false) && nameInput.value && roomInput.value) joinForm.requestSubmit();
