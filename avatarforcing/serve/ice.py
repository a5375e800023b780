"""ICE servers for WebRTC peers behind NAT (``serve --ice-server URL``, repeatable).

A URL is ``stun:HOST[:PORT]`` or ``turn:[USER:PASSWORD@]HOST[:PORT][?transport=udp|tcp]`` (also ``stuns:`` /
``turns:``). The server's peer connection uses all of them (a TURN server gives it a relay candidate a browser
behind any NAT can reach); the page is told the STUN URLs only (``/model``'s ``ice_servers``): TURN
credentials stay on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


@dataclass(frozen=True)
class IceServer:
    url: str  # without credentials
    username: str | None = None
    credential: str | None = None

    @classmethod
    def parse(cls, text: str) -> IceServer:
        scheme = next((s for s in SCHEMES if text.startswith(s)), None)
        if scheme is None:
            raise ValueError(f"ICE server {text!r}: expected a URL starting with one of {', '.join(SCHEMES)}")
        rest = text[len(scheme):]
        user = password = None
        if "@" in rest:
            if not scheme.startswith("turn"):
                raise ValueError(f"ICE server {text!r}: only TURN servers take USER:PASSWORD@")
            creds, rest = rest.rsplit("@", 1)
            user, sep, password = creds.partition(":")
            if not (user and sep and password):
                raise ValueError(f"ICE server {scheme}...@{rest}: credentials must be USER:PASSWORD")
        if not rest.split("?")[0].split(":")[0]:
            raise ValueError(f"ICE server {text!r}: no host")
        if scheme.startswith("turn") and user is None:
            raise ValueError(f"ICE server {text!r}: a TURN server needs USER:PASSWORD@ before its host")
        return cls(scheme + rest, user, password)

    @property
    def stun(self) -> bool:
        return self.url.startswith("stun")


def rtc_configuration(servers: tuple[str, ...]):
    """aiortc's configuration for a peer connection (None: host candidates only)."""
    if not servers:
        return None
    from aiortc import RTCConfiguration, RTCIceServer

    parsed = [IceServer.parse(s) for s in servers]
    return RTCConfiguration(iceServers=[RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
                                        for s in parsed])


def for_browsers(servers: tuple[str, ...]) -> list[dict]:
    """What the page may know: the STUN servers, as RTCPeerConnection's ``iceServers``."""
    return [{"urls": s.url} for s in map(IceServer.parse, servers) if s.stun]
