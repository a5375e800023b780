"""The live avatar inside voice-agent frameworks: Pipecat (``pipecat.py``) and LiveKit Agents (``livekit.py``),
both over one asyncio driver of a live session (``driver.py``)."""
