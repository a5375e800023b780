"""Many streams, one window step: samplers that are each pushed one block are stepped together.

    push_together(samplers, audios)
      1. each sampler begins its push alone   (its anchor pass if new, its own noise block)
      2. samplers are grouped by ``signature`` (same levels, layouts, anchors present, options, shapes)
      3. each group: gather -> one window step over the batch -> scatter
             gather   references, contexts, window blocks concatenated along the batch; the KV buffers
                      stacked (their prefixes concatenated, a clean pass's keys written back to each)
             step     window.py's own step: the DiT calls run once for the group (batch = streams)
             scatter  each sampler gets its blocks back, and the latent blocks it emitted

A stream's noise comes from its own generator in the same order as alone (``noise_like``), its KV buffer and
anchors are its own, so a stream's frames are the same (to float rounding) whether it is stepped alone or in
a batch of any size, and streams may join (their first push runs the anchor pass) or leave between pushes.
Under the ``reindexed`` scheme every steady-state window has one signature, so all sessions that are past
their first L blocks share one group; under ``release`` the clean pass's positions depend on the block
number, so streams at different block numbers step in different groups.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from ..model import KVPrefix
from .passes import Passes
from .window import Block, Trace, WindowSampler


class StackedKV:
    """Several streams' KV buffers seen as one batch: reads concatenate, a clean pass's keys are split back."""

    def __init__(self, buffers: list):
        self.buffers = buffers
        self.sizes = [b.keys[0].shape[0] for b in buffers]
        self.temporal_frames = buffers[0].temporal_frames

    def prefix(self, use_anchor: bool, use_temporal: bool, cos: Tensor, sin: Tensor) -> KVPrefix | None:
        parts = [b.prefix(use_anchor, use_temporal, cos, sin) for b in self.buffers]
        if parts[0] is None:
            return None
        layers = range(len(parts[0].keys))
        return KVPrefix([torch.cat([p.keys[i] for p in parts]) for i in layers],
                        [torch.cat([p.values[i] for p in parts]) for i in layers], cos, sin)

    def write_block(self, kv: list[tuple[Tensor, Tensor]]) -> None:
        per_stream = [[(k.split(self.sizes)[j], v.split(self.sizes)[j]) for k, v in kv] for j in range(len(self.sizes))]
        for buf, part in zip(self.buffers, per_stream):
            buf.write_block(part)
        self.temporal_frames = self.buffers[0].temporal_frames


def _generators(sampler: WindowSampler) -> list[torch.Generator]:
    return [sampler.gens] if isinstance(sampler.gens, torch.Generator) else list(sampler.gens)


def _cat(tensors: list[Tensor | None]) -> Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


class _Merged(WindowSampler):
    """The group's streams as one sampler (made by ``gather``, never constructed): its clean pass is split by
    the positions each stream's own clean pass has (they differ under ``release`` at different block numbers)."""

    group: list[WindowSampler]

    def _clean_pass(self, x0: Tensor, audio: Tensor | None, layout, prefix) -> None:
        layouts = [s._layout(clean=True) for s in self.group]  # each stream's window still holds its block
        if len(set(layouts)) == 1:
            return super()._clean_pass(x0, audio, layout, prefix)
        sizes = [s.reference.shape[0] for s in self.group]
        rows = torch.arange(sum(sizes)).split(sizes)
        for clean in dict.fromkeys(layouts):
            members = [i for i, lay in enumerate(layouts) if lay == clean]
            idx = torch.cat([rows[i] for i in members])
            sub = [self.group[i] for i in members]
            self.trace.layouts.append(("clean", sub[0].window[0].index, clean))
            dit = Passes(self.model, self.reference[idx], self.n_temporal, self.T,
                         None if self.context is None else self.context[idx], self.opt,
                         kv=StackedKV([s.kv for s in sub]))
            dit.clean(x0[idx], None if audio is None else audio[idx], clean, dit.prefix(clean))
            self.dit.calls += dit.calls
        self.kv.temporal_frames = self.group[0].kv.temporal_frames


def gather(group: list[WindowSampler]) -> WindowSampler:
    """One sampler whose batch is the group's streams (they share a signature), sharing their KV buffers."""
    first = group[0]
    merged = _Merged.__new__(_Merged)  # not built by __init__: the model, config, schedule and options are the
    merged.__dict__.update(vars(first))  # group's (shared by reference); the tensors are replaced below
    merged.group = group
    merged.reference = torch.cat([s.reference for s in group])
    merged.context = _cat([s.context for s in group])
    merged.gens = [g for s in group for g in _generators(s)]
    merged.dit = Passes(first.model, merged.reference, first.n_temporal, first.T, merged.context, first.opt,
                        kv=StackedKV([s.kv for s in group]))
    merged.kv = merged.dit.kv
    merged.window = [Block(b.index, torch.cat([s.window[i].x for s in group]),
                           _cat([s.window[i].audio for s in group]), b.age) for i, b in enumerate(first.window)]
    merged.trace = Trace()  # this step only: scatter copies it to each stream's own trace
    return merged


def scatter(merged: WindowSampler, group: list[WindowSampler], emitted: list[Tensor]) -> list[list[Tensor]]:
    """Each stream's window back from the merged one; returns each stream's emitted blocks."""
    out, lo = [], 0
    for s in group:
        hi = lo + s.reference.shape[0]
        kept = s.window[len(s.window) - len(merged.window):]  # its own blocks (numbers), less the emitted one
        s.window = [Block(own.index, b.x[lo:hi].clone(), None if b.audio is None else b.audio[lo:hi], b.age)
                    for own, b in zip(kept, merged.window)]
        mine = [e[lo:hi].clone() for e in emitted]
        t = merged.trace  # what this step did, recorded in each stream's trace as if it had run alone
        s.trace.passes += t.passes
        s.trace.emitted += t.emitted
        s.trace.prefix_offsets += t.prefix_offsets
        s.trace.layouts += t.layouts
        s.dit.calls += merged.dit.calls
        s.trace.model_calls = s.dit.calls
        out.append(mine)
        lo = hi
    return out


@torch.no_grad()
def push_together(samplers: list, audios: list[Tensor | None], batch: bool = True) -> list[list[Tensor]]:
    """Push one block into each sampler (audio rows [N_i, B, pack, dim] each); returns each one's emitted latent
    blocks, as ``sampler.push`` would. Window samplers with equal signatures share one step; any other sampler
    (the teacher) is pushed alone, as is everything when ``batch`` is off."""
    if len(samplers) != len(audios):
        raise ValueError(f"{len(samplers)} samplers and {len(audios)} audio blocks")
    if len(set(map(id, samplers))) != len(samplers):
        raise ValueError("a sampler appears twice in one batched push")
    out: list[list[Tensor] | None] = [None] * len(samplers)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (s, a) in enumerate(zip(samplers, audios)):
        if isinstance(s, WindowSampler) and batch:
            s.begin(a)
            groups[s.signature()].append(i)
        else:
            out[i] = s.push(a)
    for members in groups.values():
        group = [samplers[i] for i in members]
        if len(group) == 1:
            out[members[0]] = group[0]._step()
            continue
        merged = gather(group)
        emitted = merged._step()
        for i, mine in zip(members, scatter(merged, group, emitted)):
            out[i] = mine
    return out
