// Conversation over WebRTC (the server's POST /offer; docs/protocol.md): the avatar's video and voice arrive
// as media tracks on one clock, so the browser plays them in sync; speech and control go out on the "control"
// data channel (PCM as binary messages, JSON for segment_end / interrupt / end); a microphone, when used, is
// sent as the audio track (switched in without renegotiating).
"use strict";

class RtcConversation {
  // iceServers: RTCPeerConnection's (the server's STUN servers, from /model); [] on one network
  constructor(video, onMessage, iceServers = []) {
    this.video = video; this.onMessage = onMessage; this.iceServers = iceServers;
    this.pc = null; this.dc = null; this.audio = null;
  }

  // start: the fields of a live 'start' message (identity or image, seed, format)
  async open(start) {
    const pc = this.pc = new RTCPeerConnection({ iceServers: this.iceServers });
    pc.addTransceiver("video", { direction: "recvonly" });
    this.audio = pc.addTransceiver("audio", { direction: "sendrecv" });  // the voice in; a microphone out, later
    const dc = this.dc = pc.createDataChannel("control");
    dc.binaryType = "arraybuffer";
    dc.onmessage = (ev) => { if (typeof ev.data === "string") this.onMessage(JSON.parse(ev.data)); };
    const stream = new MediaStream();
    pc.ontrack = (ev) => { stream.addTrack(ev.track); this.video.srcObject = stream; };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);  // no trickle: the offer carries its candidates
    const r = await fetch("/offer", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp, start }) });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      this.close();
      throw { type: "error", code: j.error, message: j.message || `HTTP ${r.status}` };
    }
    const answer = await r.json();
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    await new Promise((resolve, reject) => {
      dc.onopen = resolve;
      pc.onconnectionstatechange = () => { if (pc.connectionState === "failed") reject({ type: "error",
        code: "connection", message: "the WebRTC connection failed (a firewall or NAT between you and the server?)" }); };
    });
    return answer;
  }

  get open_() { return this.dc && this.dc.readyState === "open"; }
  send(msg) { if (this.open_) this.dc.send(JSON.stringify(msg)); }

  sendPcm(pcm) {  // float32 at the model's rate, in messages of 0.25 s (a data channel message stays small)
    if (!this.open_) return;
    for (let i = 0; i < pcm.length; i += 4000) this.dc.send(pcm.slice(i, i + 4000).buffer);
  }

  async useMicrophone(track) { await this.audio.sender.replaceTrack(track); }

  close() {
    if (this.dc && this.dc.readyState === "open") { try { this.dc.send(JSON.stringify({ type: "end" })); } catch (e) {} }
    if (this.pc) this.pc.close();
    this.pc = this.dc = null;
  }
}

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000);  // whatever was gathered by then (host candidates come first)
  });
}
