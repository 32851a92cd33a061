// Implements: the bad inputs test/fuzz.test.ts sends to a live job — `fuzzInputs(ctx, n,
// seed)`: n inputs drawn by a seeded PRNG from KINDS (malformed control requests and
// forged control events; gradient pushes and params bundles with wrong shapes, dtypes,
// NaN/Inf, bad metadata numbers, stale or future versions and incarnations; raw frames
// that are oversize, truncated, corrupt, of unknown versions, with huge declared chunk
// counts or reused ids). Every input carries its own tag `fz<i>` — as its sender, and as
// the first part of its message id — so each refusal on `errors` (Rejected.sender or
// .messageId) names the input it answers; a control request is answered directly.
// Inputs that can only be refused when the reassembly times out (a missing chunk) come last.
// Does not own: sending them, or the job (test/fuzz.test.ts).
import { Result } from "effect"
import { mulberry32 } from "../../actors/loader/plan.ts"
import type { JobConfig } from "../../shared/config/job.ts"
import type { Spec } from "../../shared/protocol/sharding.ts"
import { PROTOCOL_VERSION, subjects } from "../../shared/protocol/subjects.ts"
import { frameMessage, H, type Frame } from "../../shared/wire/frames.ts"
import { encodeBundle, manifestToJson, type TensorBundle, type WireTensor } from "../../shared/wire/tensor.ts"

export type FuzzGroup = "control request" | "control event" | "push" | "params" | "frames"

/** What an input sends. */
export interface FuzzMessages {
  /** frames or messages to publish, in order. */
  readonly publish: ReadonlyArray<{ readonly subject: string; readonly data: Uint8Array; readonly headers?: Record<string, string> }>
  /** or a request (control.<verb>): its reply must be a ControlRejected. */
  readonly request?: { readonly subject: string; readonly data: Uint8Array }
}

export interface FuzzInput {
  readonly i: number
  readonly tag: string
  readonly kind: string
  readonly group: FuzzGroup
  /** refused only when its reassembly times out. */
  readonly pending: boolean
  /** a control request (answered directly). */
  readonly isRequest: boolean
  /** its messages, made against the job as it is when sent (the version, the incarnations). */
  build(c: FuzzContext): FuzzMessages
}

export interface FuzzContext {
  readonly job: JobConfig
  readonly specs: readonly Spec[]
  readonly shardOf: ReadonlyMap<string, number>
  /** each shard's incarnation and the version the job is at (when the inputs are made). */
  readonly incarnations: readonly number[]
  readonly version: number
  /** the controller's epoch and its newest seq (a legit command was sent first). */
  readonly epoch: number
  readonly seq: number
  readonly maxPayload: number
  readonly maxMessageBytes: number
}

const te = new TextEncoder()
const json = (x: unknown) => te.encode(JSON.stringify(x))
const numel = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1)

type Make = (c: FuzzContext, tag: string, r: () => number) => FuzzMessages

const framesOf = (c: FuzzContext, b: TensorBundle, id: string): Frame[] => {
  const { manifest, payload } = Result.getOrThrow(encodeBundle(b))
  return Result.getOrThrow(frameMessage(payload, { id, maxPayload: c.maxPayload, manifest: manifestToJson(manifest) }))
}
const idOf = (tag: string, n = 0) => `${tag}-0badf00d-${n}`
const pub = (subject: string, frames: readonly Frame[]) => ({ publish: frames.map((f) => ({ subject, data: f.data, headers: { ...f.headers } })) })

// ---------------------------------------------------------------- gradient pushes

const gradTensors = (c: FuzzContext, k: number, fill = 1e-3): WireTensor[] =>
  c.specs.filter((s) => c.shardOf.get(s.name) === k).map((s) => ({ name: s.name, dtype: "float32" as const, shape: s.shape, data: new Float32Array(numel(s.shape)).fill(fill) }))
const push = (o: { tensors?: (t: WireTensor[]) => WireTensor[]; meta?: Record<string, unknown>; extra?: Record<string, unknown> }): Make => (c, tag, r) => {
  const k = Math.floor(r() * c.job.topology.psShards)
  const extra = { samples: 2, tokens: 2 * 16, loss: 2, normSq: 1, micro: `e9-b${tag.slice(2)}`, gen: 1, epochBatches: 100, incarnation: c.incarnations[k], ...o.extra }
  const b: TensorBundle = {
    tensors: (o.tensors ?? ((t) => t))(gradTensors(c, k)),
    meta: { kind: "grads", job: c.job.job, version: c.version, step: c.version, sender: tag, batchId: `e9-b${tag.slice(2)}`, codec: "f32", extra: extra as never, ...o.meta }
  }
  // on the fuzz sender's own subject (a bundle naming another sender there is one of the kinds)
  return pub(subjects(c.job.job).psPush(k, tag), framesOf(c, b, idOf(tag)))
}
const edit0 = (f: (t: WireTensor) => WireTensor) => (ts: WireTensor[]) => ts.map((t, i) => (i === 0 ? f(t) : t))
const poke = (v: number) => edit0((t) => ({ ...t, data: Float32Array.from(t.data as Float32Array, (x, j) => (j === 1 ? v : x)) }))

// ---------------------------------------------------------------- params bundles

const paramsBundle = (c: FuzzContext, k: number, tag: string, o: { tensors?: (t: WireTensor[]) => WireTensor[]; version?: number; job?: string; sender?: string; extra?: Record<string, unknown> } = {}): TensorBundle => ({
  tensors: (o.tensors ?? ((t) => t))(gradTensors(c, k, 0.01)),
  meta: { kind: "params", job: o.job ?? c.job.job, version: o.version ?? c.version, step: 0, sender: o.sender ?? tag, codec: "f32", extra: { shard: k, incarnation: c.incarnations[k], ...o.extra } as never }
})
const params = (o: Parameters<typeof paramsBundle>[3] | ((c: FuzzContext) => Parameters<typeof paramsBundle>[3])): Make => (c, tag, r) => {
  const k = Math.floor(r() * c.job.topology.psShards)
  return pub(subjects(c.job.job).psVersion(k), framesOf(c, paramsBundle(c, k, tag, typeof o === "function" ? o(c) : o), idOf(tag)))
}

// ---------------------------------------------------------------- raw frames

/**
 * A small params bundle of wrong shape (refused by content if it ever completes), framed
 * under `tag`'s id, on a push or a version subject — or only a push subject (`pushOnly`:
 * for a message refused only at its reassembly timeout, the servers outlive the job; the
 * workers exit at its end, maybe before).
 */
const rawFrames = (tamper: (f: Frame, c: FuzzContext) => Frame[] | Frame, pushOnly = false): Make => (c, tag, r) => {
  const k = Math.floor(r() * c.job.topology.psShards)
  const subject = pushOnly || r() < 0.5 ? subjects(c.job.job).psPush(k, tag) : subjects(c.job.job).psVersion(k)
  const [f] = framesOf(c, paramsBundle(c, k, tag, { tensors: (t) => t.slice(0, 1).map((x) => ({ ...x, shape: [numel(x.shape)] })) }), idOf(tag))
  const out = tamper(f, c)
  return pub(subject, Array.isArray(out) ? out : [out])
}
const withH = (f: Frame, h: Record<string, string>): Frame => ({ headers: { ...f.headers, ...h }, data: f.data })

// ---------------------------------------------------------------- control

const request = (verb: string, body: Record<string, unknown> | string, tagged = true): Make => (c, tag) => ({
  publish: [],
  request: {
    subject: `${subjects(c.job.job).prefix}.control.${verb}`,
    data: typeof body === "string" ? te.encode(body.replace("$TAG", tag)) : json({ v: PROTOCOL_VERSION, job: c.job.job, ...(tagged ? { sender: tag } : {}), requestId: `r-${tag}`, ...body })
  }
})
const event = (o: { verb?: string; command?: Record<string, unknown>; ev?: Record<string, unknown>; raw?: string }): Make => (c, tag) => {
  const command = { _tag: "PauseJob", v: PROTOCOL_VERSION, job: c.job.job, sender: tag, requestId: `r-${tag}`, ...o.command }
  const ev = { _tag: "ControlApplied", v: PROTOCOL_VERSION, job: c.job.job, seq: c.seq + 1, verb: o.verb ?? "pause", command, sender: tag, requestId: `r-${tag}`, by: "scheduler-0-controller", at: Date.now(), epoch: c.epoch, ...o.ev }
  return { publish: [{ subject: subjects(c.job.job).controlApplied, data: o.raw !== undefined ? te.encode(o.raw.replace("$TAG", tag)) : json(ev) }] }
}

/** Every kind, by group; each input makes one of them with one defect. */
export const KINDS: ReadonlyArray<{ readonly kind: string; readonly group: FuzzGroup; readonly make: Make; readonly pending?: boolean }> = [
  { group: "control request", kind: "set-lr 1e30", make: request("set-lr", { _tag: "SetLr", lr: 1e30 }) },
  { group: "control request", kind: "set-lr -1", make: request("set-lr", { _tag: "SetLr", lr: -1 }) },
  { group: "control request", kind: "set-lr 1e999 (Infinity)", make: request("set-lr", `{"_tag":"SetLr","v":1,"job":"fuzz","sender":"$TAG","requestId":"r-$TAG","lr":1e999}`) },
  { group: "control request", kind: "set-lr \"fast\"", make: request("set-lr", { _tag: "SetLr", lr: "fast" }) },
  { group: "control request", kind: "set-schedule lr 50", make: request("set-schedule", { _tag: "SetSchedule", schedule: { kind: "constant", lr: 50 } }) },
  { group: "control request", kind: "set-schedule gamma -1", make: request("set-schedule", { _tag: "SetSchedule", schedule: { kind: "exponential", lr: 0.1, gamma: -1 } }) },
  { group: "control request", kind: "set-optimizer {}", make: request("set-optimizer", { _tag: "SetOptimizer", patch: {} }) },
  { group: "control request", kind: "set-consistency bounded, no staleness", make: request("set-consistency", { _tag: "SetConsistency", mode: "bounded" }) },
  { group: "control request", kind: "set-compression int3", make: request("set-compression", { _tag: "SetCompression", codec: "int3" }) },
  { group: "control request", kind: "unknown verb", make: request("launch-missiles", { _tag: "PauseJob" }) },
  { group: "control request", kind: "wrong job", make: request("pause", { _tag: "PauseJob", job: "someone-else" }) },
  { group: "control request", kind: "unknown field", make: request("pause", { _tag: "PauseJob", force: true }) },
  { group: "control request", kind: "not JSON", make: request("resume", `{"_tag":"ResumeJob","sender":"$TAG",`) },
  { group: "control event", kind: "by a non-controller", make: event({ ev: { by: "mallory" } }) },
  { group: "control event", kind: "set-lr 1e30 by the controller id", make: event({ verb: "set-lr", command: { _tag: "SetLr", lr: 1e30 } }) },
  { group: "control event", kind: "verb stop carrying set-lr", make: event({ verb: "stop", command: { _tag: "SetLr", lr: 0.1 } }) },
  { group: "control event", kind: "command of another job", make: event({ command: { job: "someone-else" } }) },
  { group: "control event", kind: "command of another sender", make: event({ command: { sender: "someone-else" } }) },
  { group: "control event", kind: "seq 5000 ahead", make: (c, tag, r) => event({ verb: "checkpoint", command: { _tag: "CheckpointJob" }, ev: { seq: c.seq + 5000 } })(c, tag, r) },
  { group: "control event", kind: "epoch in the future", make: event({ verb: "checkpoint", command: { _tag: "CheckpointJob" }, ev: { epoch: Date.now() + 30 * 86_400_000 } }) },
  { group: "control event", kind: "replay with latest 1e9", make: event({ verb: "checkpoint", command: { _tag: "CheckpointJob" }, ev: { replayed: true, latest: 1e9 } }) },
  { group: "control event", kind: "does not decode", make: event({ raw: `{"_tag":"ControlApplied","v":1,"sender":"$TAG","seq":"x"}` }) },
  { group: "push", kind: "wrong shape", make: push({ tensors: edit0((t) => ({ ...t, shape: [numel(t.shape) / 2, 2] })) }) },
  { group: "push", kind: "NaN value", make: push({ tensors: poke(Number.NaN) }) },
  { group: "push", kind: "Inf value", make: push({ tensors: poke(Number.POSITIVE_INFINITY) }) },
  { group: "push", kind: "missing tensor", make: push({ tensors: (t) => t.slice(1) }) },
  { group: "push", kind: "tensor of another shard", make: push({ tensors: (t) => [...t, { name: "h.99.attn.c_attn.weight", dtype: "float32", shape: [2], data: new Float32Array(2) }] }) },
  { group: "push", kind: "wrong job", make: push({ meta: { job: "someone-else" } }) },
  { group: "push", kind: "kind params on push", make: push({ meta: { kind: "params" } }) },
  { group: "push", kind: "samples 0", make: push({ extra: { samples: 0 } }) },
  { group: "push", kind: "samples 2^40", make: push({ extra: { samples: 2 ** 40 } }) },
  { group: "push", kind: "samples > batch", make: push({ extra: { samples: 3 } }) },
  { group: "push", kind: "tokens > samples × T", make: push({ extra: { tokens: 10_000 } }) },
  { group: "push", kind: "loss Infinity (null)", make: push({ extra: { loss: Number.POSITIVE_INFINITY } }) },
  { group: "push", kind: "normSq -1", make: push({ extra: { normSq: -1 } }) },
  { group: "push", kind: "bad batch id", make: push({ meta: { batchId: "x17" }, extra: { micro: "x17" } }) },
  { group: "push", kind: "stale version", make: (c, tag, r) => push({ meta: { version: 0, step: 0 } })(c, tag, r) },
  { group: "push", kind: "future version", make: (c, tag, r) => push({ meta: { version: c.version + 1000, step: c.version + 1000 } })(c, tag, r) },
  { group: "push", kind: "another incarnation", make: push({ extra: { incarnation: 12345 } }) },
  { group: "push", kind: "another sender's name on its own subject", make: push({ meta: { sender: "worker-a" } }) },
  { group: "params", kind: "wrong shape", make: params({ tensors: edit0((t) => ({ ...t, shape: [numel(t.shape)] })) }) },
  { group: "params", kind: "NaN value", make: params({ tensors: poke(Number.NaN) }) },
  { group: "params", kind: "missing tensor", make: params({ tensors: (t) => t.slice(1) }) },
  { group: "params", kind: "int32 dtype", make: params({ tensors: edit0((t) => ({ ...t, dtype: "int32", data: new Int32Array(t.data.length) })) }) },
  { group: "params", kind: "wrong job", make: params({ job: "someone-else" }) },
  { group: "params", kind: "version > steps", make: (c, tag, r) => params({ version: c.job.train.steps + 1 })(c, tag, r) },
  { group: "params", kind: "incarnation in the future", make: params({ extra: { incarnation: Date.now() + 30 * 86_400_000 } }) },
  { group: "params", kind: "shard mismatch", make: params({ extra: { shard: 99 } }) },
  { group: "params", kind: "not the shard's server", make: (c, tag, r) => params({ version: c.version + 1 })(c, tag, r) },
  { group: "params", kind: "forged last version as the server", make: (c, tag, r) => { const k = Math.floor(r() * c.job.topology.psShards); return pub(subjects(c.job.job).psVersion(k), framesOf(c, paramsBundle(c, k, tag, { version: c.job.train.steps, sender: `ps-${k}` }), idOf(tag))) } },
  { group: "params", kind: "stale version as the server", make: (c, tag, r) => { const k = Math.floor(r() * c.job.topology.psShards); return pub(subjects(c.job.job).psVersion(k), framesOf(c, paramsBundle(c, k, tag, { version: 0, sender: `ps-${k}` }), idOf(tag))) } },
  { group: "frames", kind: "declared total > limit", make: rawFrames((f, c) => withH(f, { [H.total]: String(c.maxMessageBytes + 1) })) },
  { group: "frames", kind: "huge declared chunk count", make: rawFrames((f) => withH(f, { [H.chunks]: "9999999999", [H.total]: String(f.data.length + 10) })) },
  { group: "frames", kind: "corrupt chunk", make: rawFrames((f) => ({ headers: f.headers, data: Uint8Array.from(f.data, (b, j) => (j === 7 ? b ^ 0xff : b)) })) },
  { group: "frames", kind: "unknown wire version", make: rawFrames((f) => withH(f, { [H.wire]: "9" })) },
  { group: "frames", kind: "malformed header", make: rawFrames((f) => withH(f, { [H.chunk]: "one" })) },
  { group: "frames", kind: "reused id of a complete message", make: rawFrames((f) => [f, f]) },
  { group: "frames", kind: "truncated (a chunk never comes)", pending: true, make: rawFrames((f) => withH(f, { [H.chunks]: "2", [H.total]: String(f.data.length + 5000) }), true) },
  { group: "frames", kind: "reused chunk of an incomplete message", pending: true, make: rawFrames((f) => { const g = withH(f, { [H.chunks]: "2", [H.total]: String(f.data.length + 5000) }); return [g, g] }, true) }
]

/**
 * `n` inputs whose kinds a PRNG seeded with `seed` draws from KINDS (each input's own
 * choices, e.g. its shard, from a PRNG of its own: the same at every run); the ones refused
 * only at a reassembly timeout last.
 */
export const fuzzInputs = (n: number, seed: number): FuzzInput[] => {
  const r = mulberry32(seed)
  const out: FuzzInput[] = []
  for (let i = 0; i < n; i++) {
    const k = KINDS[Math.floor(r() * KINDS.length)]
    const tag = `fz${i}`
    const own = Math.floor(r() * 2 ** 31)
    out.push({ i, tag, kind: k.kind, group: k.group, pending: k.pending === true, isRequest: k.group === "control request", build: (c) => k.make(c, tag, mulberry32(own)) })
  }
  return [...out.filter((x) => !x.pending), ...out.filter((x) => x.pending)]
}
