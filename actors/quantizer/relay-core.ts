/**
 * Implements: the quantizer relay's mailbox reducer — a relay for a slow link. Workers
 * launched with `--relay NAME` push their f32 gradients to it over the fast local link
 * (`relay.<name>.<k>.push`); it sums them and sends ONE compressed push per version and
 * shard to the parameter servers, as sender `relay-<name>`, and hands the servers' answers
 * back to each worker as if the servers had answered it (on `relay.<name>.<k>.ack.<worker>`).
 *
 * The protocol it keeps (docs/PROTOCOL.md, "Relays"):
 *  - sync: version v's combination is made once all the relay's live workers have pushed v
 *    to every shard (or after `waitMs` with at least one complete: a worker that cannot
 *    push does not stall the job); a worker that pushed only some shards is left out on all
 *    of them (the shards must hold one combination, or shard 0's choice would wait for
 *    ever). The sum is the sample-weighted mean in float64, in worker-id order, with the
 *    samples, tokens and loss of all, and its batch id lists every part's micro-batches, so
 *    the servers record each batch as applied exactly once, as for one worker that
 *    accumulated them;
 *  - bounded / async: each worker's complete gradient goes on alone, at once;
 *  - the combination is encoded once per shard under the codec the servers stamped on v
 *    (the workers report it), with the relay's own error-feedback residuals; it is kept
 *    until every shard answered, and sent again on a worker's resend or after `ackTimeoutMs`;
 *  - a server's ack or refusal goes to every part's worker. "duplicate" (a relay that
 *    restarted combined an applied batch with new ones) is not passed on: each part goes
 *    again on its own, so an applied one is acknowledged and the others refused or held;
 *  - a push for a version older than the newest combined is refused `stale`, so the worker
 *    hands its batch back to the loader at once.
 * State is mutated in place; no I/O, no clocks (time arrives in events).
 * Does not own: decoding and sending (relay.ts), the codecs (shared/wire/compression.ts).
 */
import type { GradMeta, PushAck, Rejected } from "../../shared/protocol/messages.ts"
import { BATCH_ID_SEPARATOR } from "../worker/accumulate.ts"
import { GradEncoder, specOf } from "../../shared/wire/compression.ts"
import type { TensorBundle } from "../../shared/wire/tensor.ts"

export interface RelayConfig {
  readonly job: string
  readonly name: string
  /** the relay's sender id at the servers: relay-<name>. */
  readonly id: string
  readonly shards: number
  readonly ackTimeoutMs: number
  /** sync: how long a version with a complete gradient waits for the rest. */
  readonly waitMs: number
  /** each tensor's shape (the combination's bundles carry them). */
  readonly shapes: ReadonlyMap<string, ReadonlyArray<number>>
}

/** One worker's gradient of one version (its parts per shard as they arrive). */
interface Entry {
  readonly worker: string
  readonly batchId: string
  readonly version: number
  readonly codec: string
  readonly shards: Map<number, { readonly meta: GradMeta; readonly grads: ReadonlyMap<string, Float32Array> }>
}

export interface Forwarded {
  readonly version: number
  readonly batchId: string
  /** the workers' gradients it was made of, in worker-id order (their acks go to each; a "duplicate" refusal sends them again one by one). */
  readonly entries: ReadonlyArray<Entry>
  readonly bundles: ReadonlyMap<number, TensorBundle>
  /** the servers' answers so far, by shard. */
  readonly answered: Map<number, PushAck>
  sentAt: number
}

export interface RelayState {
  readonly cfg: RelayConfig
  /** live workers of this relay (heartbeats with info.relay = name). */
  readonly members: Set<string>
  sync: boolean
  /** by version: each worker's entry. */
  readonly pending: Map<number, Map<string, Entry>>
  /** when the first complete entry of a version arrived. */
  readonly completeSince: Map<number, number>
  /** the newest combined version (sync): older pushes are stale. */
  newest: number
  forwarded: Forwarded[]
  readonly encoder: GradEncoder
  readonly stats: { combined: number; parts: number; resent: number; refused: number }
  now: number
}

export type RelayEvent =
  | { readonly _tag: "Received"; readonly shard: number; readonly worker: string; readonly version: number; readonly batchId: string; readonly codec: string; readonly meta: GradMeta; readonly grads: ReadonlyMap<string, Float32Array> }
  | { readonly _tag: "MemberJoined"; readonly id: string }
  | { readonly _tag: "MemberLeft"; readonly id: string }
  | { readonly _tag: "ServerAcked"; readonly ack: PushAck }
  | { readonly _tag: "ServerRefused"; readonly shard: number; readonly rejected: Rejected }
  | { readonly _tag: "ConsistencyChanged"; readonly mode: "sync" | "bounded" | "async" }
  | { readonly _tag: "Tick"; readonly now: number }

export type RelayEffect =
  | { readonly _tag: "Forward"; readonly shard: number; readonly bundle: TensorBundle; readonly resend: boolean }
  | { readonly _tag: "AckWorker"; readonly worker: string; readonly ack: PushAck }
  | { readonly _tag: "RefuseWorker"; readonly worker: string; readonly shard: number; readonly rejected: Omit<Rejected, "_tag" | "v" | "at"> }
  | { readonly _tag: "Log"; readonly level: "info" | "warn"; readonly message: string }

export const initialRelay = (cfg: RelayConfig, sync: boolean, minElements: number, now: number): RelayState => ({
  cfg, members: new Set(), sync, pending: new Map(), completeSince: new Map(), newest: -1, forwarded: [],
  encoder: new GradEncoder(minElements), stats: { combined: 0, parts: 0, resent: 0, refused: 0 }, now
})

const KEEP_FORWARDED = 4

const complete = (s: RelayState, e: Entry) => e.shards.size === s.cfg.shards

export const step = (s: RelayState, e: RelayEvent): RelayEffect[] => {
  const out: RelayEffect[] = []
  switch (e._tag) {
    case "Received":
      received(s, e, out)
      break
    case "MemberJoined":
      s.members.add(e.id)
      break
    case "MemberLeft":
      s.members.delete(e.id)
      for (const v of [...s.pending.keys()]) tryCombine(s, v, out)
      break
    case "ServerAcked": {
      const f = s.forwarded.find((x) => x.batchId === e.ack.batchId && x.version === e.ack.version)
      if (!f) break
      f.answered.set(e.ack.shard, e.ack)
      for (const p of f.entries) out.push({ _tag: "AckWorker", worker: p.worker, ack: { ...e.ack, sender: p.worker, batchId: p.batchId } })
      break
    }
    case "ServerRefused": {
      const r = e.rejected
      const f = s.forwarded.find((x) => r.step === undefined || x.version === r.step)
      if (!f) break
      s.stats.refused++
      if (r.code === "duplicate" && f.entries.length > 1) {
        // some part was applied already (this relay restarted between a combination and its answer): each goes alone now
        s.forwarded = s.forwarded.filter((x) => x !== f)
        out.push({ _tag: "Log", level: "warn", message: `shard ${e.shard} refused the combination of v${f.version} (${r.reason}): its ${f.entries.length} parts go again one by one` })
        for (const en of f.entries) forward(s, f.version, [en], out)
        break
      }
      for (const p of f.entries) {
        out.push({ _tag: "RefuseWorker", worker: p.worker, shard: e.shard, rejected: { code: r.code, reason: `${r.reason} (via relay ${s.cfg.name})`, subject: r.subject, by: r.by, sender: p.worker, step: f.version } })
      }
      break
    }
    case "ConsistencyChanged":
      s.sync = e.mode === "sync"
      for (const v of [...s.pending.keys()]) tryCombine(s, v, out)
      break
    case "Tick":
      s.now = e.now
      for (const v of [...s.pending.keys()]) tryCombine(s, v, out)
      for (const f of s.forwarded) {
        if (f.answered.size >= s.cfg.shards || s.now - f.sentAt < s.cfg.ackTimeoutMs) continue
        f.sentAt = s.now
        for (const [k, b] of f.bundles) if (!f.answered.has(k)) out.push({ _tag: "Forward", shard: k, bundle: b, resend: true })
      }
      break
  }
  return out
}

const received = (s: RelayState, e: Extract<RelayEvent, { _tag: "Received" }>, out: RelayEffect[]) => {
  // a resend of a part already combined: the servers' answer again, or the combination again
  const f = s.forwarded.find((x) => x.version === e.version && x.entries.some((p) => p.worker === e.worker && p.batchId === e.batchId))
  if (f) {
    const ack = f.answered.get(e.shard)
    if (ack) out.push({ _tag: "AckWorker", worker: e.worker, ack: { ...ack, sender: e.worker, batchId: e.batchId } })
    else if (s.now - f.sentAt >= s.cfg.ackTimeoutMs / 2) {
      f.sentAt = s.now
      s.stats.resent++
      out.push({ _tag: "Forward", shard: e.shard, bundle: f.bundles.get(e.shard)!, resend: true })
    }
    return
  }
  if (s.sync && e.version <= s.newest) {
    out.push({
      _tag: "RefuseWorker", worker: e.worker, shard: e.shard,
      rejected: { code: "stale", reason: `relay ${s.cfg.name} already sent version ${e.version}'s combination without this gradient (batch ${e.batchId})`, subject: e.batchId, by: s.cfg.id, sender: e.worker, step: e.version }
    })
    return
  }
  const byWorker = s.pending.get(e.version) ?? new Map<string, Entry>()
  s.pending.set(e.version, byWorker)
  let en = byWorker.get(e.worker)
  // a new batch of the same worker and version replaces the old one (its process restarted, or it gave that batch up)
  if (!en || en.batchId !== e.batchId) byWorker.set(e.worker, (en = { worker: e.worker, batchId: e.batchId, version: e.version, codec: e.codec, shards: new Map() }))
  en.shards.set(e.shard, { meta: e.meta, grads: e.grads })
  if (complete(s, en) && !s.completeSince.has(e.version)) s.completeSince.set(e.version, s.now)
  tryCombine(s, e.version, out)
}

/** Combine version v when its inputs are there (sync), or send each complete entry on (bounded/async). */
const tryCombine = (s: RelayState, v: number, out: RelayEffect[]) => {
  const byWorker = s.pending.get(v)
  if (!byWorker) return
  const ready = [...byWorker.values()].filter((x) => complete(s, x))
  if (!s.sync) {
    for (const en of ready) {
      byWorker.delete(en.worker)
      forward(s, v, [en], out)
    }
    if (byWorker.size === 0) s.pending.delete(v)
    return
  }
  if (ready.length === 0) return
  if (v <= s.newest) {
    s.pending.delete(v)
    return
  }
  const waiting = [...s.members].filter((m) => !ready.some((x) => x.worker === m))
  const since = s.completeSince.get(v) ?? s.now
  if (waiting.length > 0 && s.now - since < s.cfg.waitMs) return
  if (waiting.length > 0) out.push({ _tag: "Log", level: "warn", message: `version ${v}: waited ${s.cfg.waitMs} ms for [${waiting.join(" ")}]; combining the ${ready.length} complete gradients` })
  // parts that are not complete are left out everywhere: their pushes are refused stale
  for (const en of byWorker.values()) {
    if (complete(s, en)) continue
    for (const k of en.shards.keys()) {
      out.push({ _tag: "RefuseWorker", worker: en.worker, shard: k, rejected: { code: "stale", reason: `relay ${s.cfg.name} combined version ${v} without this gradient: it had not reached every shard`, subject: en.batchId, by: s.cfg.id, sender: en.worker, step: v } })
    }
  }
  s.newest = v
  for (const old of [...s.pending.keys()]) if (old <= v) {
    s.pending.delete(old)
    s.completeSince.delete(old)
  }
  forward(s, v, ready, out)
}

/** Sum the entries (sample-weighted, float64, worker-id order), encode per shard under their codec, send. */
const forward = (s: RelayState, v: number, entries: readonly Entry[], out: RelayEffect[]) => {
  const parts = [...entries].sort((a, b) => (a.worker < b.worker ? -1 : a.worker > b.worker ? 1 : 0))
  const samples = parts.reduce((n, x) => n + x.shards.get(0)!.meta.samples, 0)
  const batchId = parts.map((x) => x.batchId).join(BATCH_ID_SEPARATOR)
  const codecName = parts[0].codec
  const codec = specOf(codecName)
  const sums = new Map<number, Map<string, Float32Array>>()
  let normSq = 0
  for (let k = 0; k < s.cfg.shards; k++) {
    const out = new Map<string, Float32Array>()
    for (const name of parts[0].shards.get(k)!.grads.keys()) {
      const acc = new Float64Array(parts[0].shards.get(k)!.grads.get(name)!.length)
      for (const p of parts) {
        const g = p.shards.get(k)!.grads.get(name)
        if (!g || g.length !== acc.length) continue // checked at receipt (relay.ts): every part has the same tensors
        const w = p.shards.get(0)!.meta.samples / samples
        for (let i = 0; i < g.length; i++) acc[i] += w * g[i]
      }
      const f = Float32Array.from(acc)
      // one part: its own norm is the combination's (below)
      if (parts.length > 1) for (let i = 0; i < f.length; i++) normSq += f[i] * f[i]
      out.set(name, f)
    }
    sums.set(k, out)
  }
  const bundles = new Map<number, TensorBundle>()
  for (let k = 0; k < s.cfg.shards; k++) {
    const metas = parts.map((p) => p.shards.get(k)!.meta)
    const extra: GradMeta = {
      samples, tokens: metas.reduce((n, m) => n + m.tokens, 0), loss: metas.reduce((l, m, i) => l + (m.loss * parts[i].shards.get(0)!.meta.samples) / samples, 0),
      normSq: parts.length === 1 ? metas[0].normSq : normSq, micro: batchId, gen: Math.max(...metas.map((m) => m.gen)),
      epochBatches: Math.max(...metas.map((m) => m.epochBatches)), incarnation: metas[0].incarnation
    }
    const tensors = [...sums.get(k)!].flatMap(([name, g]) => s.encoder.encode(codec, name, s.cfg.shapes.get(name) ?? [g.length], g))
    bundles.set(k, { tensors, meta: { kind: "grads", job: s.cfg.job, version: v, step: v, sender: s.cfg.id, batchId, codec: codecName, extra } })
  }
  const f: Forwarded = { version: v, batchId, entries: parts, bundles, answered: new Map(), sentAt: s.now }
  s.forwarded = [f, ...s.forwarded.filter((x) => !(x.version === v && x.batchId === batchId))].slice(0, KEEP_FORWARDED)
  s.stats.combined++
  s.stats.parts += parts.length
  for (const [k, b] of bundles) out.push({ _tag: "Forward", shard: k, bundle: b, resend: false })
}
