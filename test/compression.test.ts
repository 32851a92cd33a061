// Checks the compression policy and its parties, in process (the wire path over NATS is
// test/relay.test.ts): which codec a version's gradients use (warm-up, live switches), the
// sender's error-feedback encoder (small tensors f32, a switch to f32 pays what is owed),
// the job's train.compression, the controller's choice of a switch version and the
// parameter server's stamp (a late switch starts at the next version), the saved sender
// state (round trip, corrupt files, residuals kept only within one run), and the relay's
// reducer (one combination per version: waits for its workers, leaves out a part that
// missed a shard, refuses stale pushes, fans the servers' answers out, splits a duplicate).
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Result } from "effect"
import { describe, expect, it } from "vitest"
import { compressionLead, validateCommand, type ControlView } from "../actors/controller/controller.ts"
import { ShardState } from "../actors/param-server/aggregate.ts"
import { initialState, step as psStep } from "../actors/param-server/core.ts"
import { paramsBundle } from "../actors/param-server/protocol.ts"
import { initialRelay, step, type RelayEffect, type RelayEvent, type RelayState } from "../actors/quantizer/relay-core.ts"
import { decodeSenderState, encodeSenderState, loadSenderState, restoreResiduals, saveSenderState, SenderResiduals, tensorLengths } from "../shared/checkpoint/sender-state.ts"
import { resolveJob } from "../shared/config/job.ts"
import type { ControlApplied } from "../shared/protocol/control.ts"
import type { GradMeta, PushAck } from "../shared/protocol/messages.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { decodeTensor, parseCodec } from "../shared/wire/codecs.ts"
import { DEFAULT_COMPRESSION, GradEncoder, gradCodecAt, specOf } from "../shared/wire/compression.ts"

describe("the compression policy", () => {
  it("a version's codec: f32 during warm-up, then the job's, then each switch from its version on", () => {
    const c = { ...DEFAULT_COMPRESSION, codec: "int8", warmupSteps: 5 }
    const switches = [{ fromVersion: 20, codec: "sign1" }, { fromVersion: 10, codec: "int4" }]
    expect([0, 4, 5, 9, 10, 19, 20, 99].map((v) => gradCodecAt(c, switches, v))).toEqual(["f32", "f32", "int8", "int8", "int4", "int4", "sign1", "sign1"])
  })

  it("the encoder sends small tensors f32, keeps a residual per tensor, and a switch to f32 pays what is owed", () => {
    const enc = new GradEncoder(8)
    const sign1 = specOf("sign1")
    const small = enc.encode(sign1, "b", [4], new Float32Array([1, 2, 3, 4]))
    expect(small[0].dtype).toBe("float32")
    const g = Float32Array.from({ length: 16 }, (_, i) => (i % 3) - 0.7)
    const sent = decodeTensor(enc.encode(sign1, "w", [16], Float32Array.from(g))[0])
    const owed = enc.residuals.get("w")!
    for (let i = 0; i < 16; i++) expect(sent[i] + owed[i]).toBeCloseTo(g[i], 6)
    // f32 now: this gradient plus what sign1 could not send, and nothing owed after
    const next = Float32Array.from({ length: 16 }, () => 0.25)
    const flushed = enc.encode(specOf("f32"), "w", [16], Float32Array.from(next))[0].data as Float32Array
    for (let i = 0; i < 16; i++) expect(flushed[i]).toBeCloseTo(next[i] + owed[i], 6)
    expect(enc.residuals.has("w")).toBe(false)
  })

  it("train.compression: a codec name or a block; an unknown codec is refused naming the known ones", () => {
    expect(resolveJob({ train: { compression: "int4" } }).train.compression).toEqual({ ...DEFAULT_COMPRESSION, codec: "int4" })
    expect(resolveJob({ train: { compression: { codec: "topk:0.05", warmupSteps: 50, params: "bf16" } } }).train.compression).toMatchObject({ codec: "topk:0.05", warmupSteps: 50, params: "bf16" })
    expect(() => resolveJob({ train: { compression: "int3" } })).toThrow(/train\.compression\.codec.*int3.*sign1/s)
    expect(() => resolveJob({ train: { compression: { codec: "int8", params: "int8" } } })).toThrow(/params/)
  })
})

const view = (): ControlView => ({
  optimizer: { kind: "sgd" } as never, schedule: { kind: "constant", lr: 0.1 } as never, consistency: { mode: "sync" }, paused: false, stopped: false,
  compression: { base: DEFAULT_COMPRESSION, switches: [] }
})
const setCompression = (codec: string, fromVersion?: number) =>
  ({ _tag: "SetCompression", v: 1, job: "j", sender: "ctl", requestId: "r", codec, ...(fromVersion === undefined ? {} : { fromVersion }) }) as const

describe("set-compression", () => {
  it("the controller checks the codec, and starts a switch about 2 s of the job's progress ahead", () => {
    const bad = validateCommand(view(), setCompression("int3", 10))
    expect(Result.isFailure(bad) && bad.failure.reason).toMatch(/int3/)
    const ok = validateCommand(view(), setCompression("topk:0.1", 10))
    expect(Result.isSuccess(ok) && ok.success.compression.switches).toEqual([{ fromVersion: 10, codec: "topk:0.1" }])
    expect(compressionLead([])).toBe(2)
    // 10 versions a second seen over the last 2 s: 2 + 20
    expect(compressionLead([{ version: 0, at: 0 }, { version: 20, at: 2_000 }])).toBe(22)
  })

  const ps = (version: number) => {
    const core = new ShardState({
      specs: [{ name: "w", shape: [2048] }], params: new Map([["w", new Float32Array(2048).fill(0.5)]]),
      optimizer: { kind: "sgd", momentum: 0, dampening: 0, nesterov: false, weightDecay: 0 }, consistency: { mode: "sync" }, clipNorm: 0, version
    })
    return initialState(
      { subjects: subjects("j"), job: "j", id: "ps-0", shard: 0, shards: 1, steps: 100, epochs: 0, checkpointEvery: 0, minWorkers: 1, decisionWaitMs: 1_000, resendMs: 500, joinGraceMs: 2_000, compression: { ...DEFAULT_COMPRESSION, codec: "int8", params: "bf16" } },
      core, { incarnation: 7, now: 0 }
    )
  }
  const applied = (codec: string, fromVersion: number): ControlApplied => ({
    _tag: "ControlApplied", v: 1, job: "j", seq: 1, verb: "set-compression", command: setCompression(codec, fromVersion) as never, sender: "ctl", requestId: "r", by: "c", at: 0
  })

  it("the parameter server stamps the codec on each version's params, and a switch that comes late starts at its next version", () => {
    const s = ps(3)
    expect(paramsBundle(s).meta.extra).toMatchObject({ codec: "int8", run: 7 })
    // bf16 params: the big tensor goes as bf16 (half the bytes), widened on receipt
    const t = paramsBundle(s).tensors[0]
    expect(t.dtype).toBe("bf16")
    expect(decodeTensor(t)[0]).toBe(0.5)
    psStep(s, { _tag: "ControlApplied", event: applied("sign1", 5) })
    expect(s.codecSwitches).toEqual([{ fromVersion: 5, codec: "sign1" }])
    expect(paramsBundle(s).meta.extra?.codec).toBe("int8") // still version 3
    s.core.version = 5
    expect(paramsBundle(s).meta.extra?.codec).toBe("sign1")
    const late = ps(9)
    const out = psStep(late, { _tag: "ControlApplied", event: applied("int4", 5) })
    expect(late.codecSwitches).toEqual([{ fromVersion: 10, codec: "int4" }])
    expect(out.some((e) => e._tag === "Log" && /arrived at version 9: it starts at 10/.test(e.message))).toBe(true)
  })
})

describe("a sender's saved state", () => {
  const st = { job: "j", sender: "worker-0", version: 40, runs: { "0": 111, "1": 222 }, residuals: new Map([["a", new Float32Array([1, -2, 3])], ["b", new Float32Array([0.5])]]) }

  it("round-trips, and a corrupt, truncated or foreign file is refused with the reason", () => {
    const bytes = encodeSenderState(st)
    const back = decodeSenderState(bytes, "j", "worker-0", "f")
    expect(back._tag).toBe("Loaded")
    if (back._tag === "Loaded") {
      expect(back.runs).toEqual(st.runs)
      expect([...back.residuals.get("a")!]).toEqual([1, -2, 3])
    }
    const flipped = Uint8Array.from(bytes)
    flipped[flipped.length - 1] ^= 1
    expect(decodeSenderState(flipped, "j", "worker-0", "f")).toMatchObject({ _tag: "Corrupt", reason: expect.stringMatching(/CRC32/) })
    expect(decodeSenderState(bytes.subarray(0, bytes.length - 4), "j", "worker-0", "f")).toMatchObject({ reason: expect.stringMatching(/truncated/) })
    expect(decodeSenderState(bytes, "j", "worker-1", "f")).toMatchObject({ reason: expect.stringMatching(/worker-0's of job j, not worker-1's/) })
    expect(decodeSenderState(new TextEncoder().encode("FLOTCKPT...."), "j", "worker-0", "f")).toMatchObject({ reason: expect.stringMatching(/magic/) })
  })

  it("is written atomically, and restored only into the run (and the model) it was made in", () => {
    const dir = mkdtempSync(join(tmpdir(), "flotilla-ef-"))
    const file = join(dir, "j", "senders", "worker-0.ef")
    expect(loadSenderState(file, "j", "worker-0")._tag).toBe("Missing")
    saveSenderState(file, st)
    const loaded = loadSenderState(file, "j", "worker-0")
    if (loaded._tag !== "Loaded") throw new Error(loaded._tag)
    const shardOf = new Map([["a", 0], ["b", 1]])
    const lengths = new Map([["a", 3], ["b", 1]])
    const into = new Map<string, Float32Array>()
    // shard 1 started afresh (a new run): only shard 0's residual comes back
    expect(restoreResiduals(into, loaded, (k) => (k === 0 ? 111 : 999), shardOf, lengths)).toEqual({ restored: 1, dropped: 1 })
    expect([...into.keys()]).toEqual(["a"])
    // another model: a length that does not fit is dropped
    expect(restoreResiduals(new Map(), loaded, (k) => (k === 0 ? 111 : 222), shardOf, new Map([["a", 4], ["b", 1]]))).toEqual({ restored: 1, dropped: 1 })
    writeFileSync(file, readFileSync(file).subarray(0, 20))
    expect(loadSenderState(file, "j", "worker-0")._tag).toBe("Corrupt")
  })

  it("every sender's rule (SenderResiduals): saves at the checkpoint cadence, nothing while nothing is owed, restores once", () => {
    const dir = mkdtempSync(join(tmpdir(), "flotilla-ef-"))
    const job = resolveJob({ job: "j", train: { checkpointDir: dir, checkpointEvery: 10 } }, "test")
    const shardOf = new Map([["a", 0], ["b", 1]])
    const lengths = tensorLengths([{ name: "a", shape: [3] }, { name: "b", shape: [1] }])
    const owed = new Map<string, Float32Array>()
    const first = new SenderResiduals(job, "worker-0", owed, shardOf, lengths)
    expect(first.corrupt).toBeUndefined()
    expect(first.waiting).toBe(false)
    expect(first.restore(() => 1)).toBeUndefined()
    expect(first.due(3)).toBe(true) // nothing saved yet
    first.save(10, new Map([[0, 111], [1, 222]]))
    expect(loadSenderState(first.file, "j", "worker-0")._tag).toBe("Missing") // nothing owed: nothing written
    owed.set("a", new Float32Array([1, -2, 3])).set("b", new Float32Array([0.5]))
    first.save(10, new Map([[0, 111], [1, 222]]))
    expect([first.lastSaved, first.due(19), first.due(20)]).toEqual([10, false, true])
    // a relaunch under the same id: restored once, into the same run only
    const into = new Map<string, Float32Array>()
    const again = new SenderResiduals(job, "worker-0", into, shardOf, lengths)
    expect(again.waiting).toBe(true)
    expect(again.restore((k) => (k === 0 ? 111 : 999))).toMatch(/residuals of 1 tensors restored from .*worker-0\.ef; 1 dropped/)
    expect([...into.keys()]).toEqual(["a"])
    expect([again.waiting, again.restore(() => 111)]).toEqual([false, undefined])
    // a corrupt file is said once, and the sender starts from zero
    writeFileSync(first.file, "FLOTEF01 and then nonsense")
    const bad = new SenderResiduals(job, "worker-0", new Map(), shardOf, lengths)
    expect(bad.corrupt).toMatch(/worker-0\.ef is unusable/)
    expect(bad.restore(() => 111)).toBeUndefined()
  })
})

// ---------------------------------------------------------------- the relay's reducer

const meta = (samples: number, loss = 1): GradMeta => ({ samples, tokens: samples * 4, loss, normSq: 1, micro: "", gen: 0, epochBatches: 100, incarnation: 5 })
const relay = (shards = 2, sync = true): RelayState =>
  initialRelay({ job: "j", name: "r", id: "relay-r", shards, ackTimeoutMs: 1_000, waitMs: 5_000, shapes: new Map([["w0", [2]], ["w1", [2]]]) }, sync, 1024, 0)
const push = (worker: string, shard: number, batchId: string, g: number, version = 0, samples = 1): RelayEvent => ({
  _tag: "Received", shard, worker, version, batchId, codec: "f32", meta: meta(samples, g), grads: new Map([[`w${shard}`, new Float32Array([g, 2 * g])]])
})
const forwards = (out: RelayEffect[]) => out.filter((e): e is Extract<RelayEffect, { _tag: "Forward" }> => e._tag === "Forward")

describe("the relay's reducer", () => {
  it("sync: one combination per version once every worker pushed every shard: the sample-weighted mean, all batch ids", () => {
    const s = relay()
    for (const w of ["wa", "wb"]) step(s, { _tag: "MemberJoined", id: w })
    expect(forwards([...step(s, push("wa", 0, "e0-b0", 1, 0, 1)), ...step(s, push("wa", 1, "e0-b0", 1, 0, 1)), ...step(s, push("wb", 0, "e0-b1", 4, 0, 3))])).toEqual([])
    const out = forwards(step(s, push("wb", 1, "e0-b1", 4, 0, 3)))
    expect(out.map((f) => f.shard)).toEqual([0, 1])
    const b = out[0].bundle
    expect(b.meta).toMatchObject({ sender: "relay-r", batchId: "e0-b0+e0-b1", version: 0, codec: "f32" })
    expect(b.meta.extra).toMatchObject({ samples: 4, tokens: 16, loss: (1 * 1 + 4 * 3) / 4 })
    expect([...(b.tensors[0].data as Float32Array)]).toEqual([(1 + 4 * 3) / 4, (2 + 8 * 3) / 4])
    // the servers' ack goes to each part's worker, with its own batch id
    const ack: PushAck = { _tag: "PushAck", v: 1, shard: 0, incarnation: 5, sender: "relay-r", batchId: "e0-b0+e0-b1", version: 0, status: "held" }
    expect(step(s, { _tag: "ServerAcked", ack }).map((e) => e._tag === "AckWorker" && [e.worker, e.ack.batchId])).toEqual([["wa", "e0-b0"], ["wb", "e0-b1"]])
    // a worker's resend after that is answered from the servers' answer, not sent again
    expect(step(s, push("wa", 0, "e0-b0", 1)).map((e) => e._tag)).toEqual(["AckWorker"])
    // a push for a version already combined is stale: the worker hands its batch back
    const stale = step(s, push("wc", 0, "e0-b9", 1))
    expect(stale).toMatchObject([{ _tag: "RefuseWorker", worker: "wc", rejected: { code: "stale" } }])
  })

  it("a worker that reached one shard only is left out on both; one that is gone is not waited for", () => {
    const s = relay()
    for (const w of ["wa", "wb", "wc"]) step(s, { _tag: "MemberJoined", id: w })
    step(s, push("wa", 0, "e0-b0", 1))
    step(s, push("wa", 1, "e0-b0", 1))
    step(s, push("wb", 0, "e0-b1", 1)) // wb dies before its push to shard 1
    expect(forwards(step(s, { _tag: "MemberLeft", id: "wc" }))).toEqual([])
    const out = step(s, { _tag: "MemberLeft", id: "wb" })
    expect(forwards(out).map((f) => f.bundle.meta.batchId)).toEqual(["e0-b0", "e0-b0"])
    expect(out.filter((e) => e._tag === "RefuseWorker").map((e) => e._tag === "RefuseWorker" && [e.worker, e.shard])).toEqual([["wb", 0]])
  })

  it("a live worker that never pushes holds a version for waitMs at most", () => {
    const s = relay(1)
    for (const w of ["wa", "wb"]) step(s, { _tag: "MemberJoined", id: w })
    step(s, push("wa", 0, "e0-b0", 1))
    expect(forwards(step(s, { _tag: "Tick", now: 4_999 }))).toEqual([])
    expect(forwards(step(s, { _tag: "Tick", now: 5_000 })).length).toBe(1)
  })

  it("a duplicate refusal (some part applied already) sends each part again on its own; bounded/async forward each at once", () => {
    const s = relay(1)
    for (const w of ["wa", "wb"]) step(s, { _tag: "MemberJoined", id: w })
    step(s, push("wa", 0, "e0-b0", 1))
    step(s, push("wb", 0, "e0-b1", 2))
    const again = step(s, { _tag: "ServerRefused", shard: 0, rejected: { _tag: "Rejected", v: 1, code: "duplicate", reason: "batch e0-b0 was already applied", subject: "x", by: "ps-0", step: 0, at: 0 } })
    expect(forwards(again).map((f) => f.bundle.meta.batchId)).toEqual(["e0-b0", "e0-b1"])
    expect(again.some((e) => e._tag === "RefuseWorker")).toBe(false)
    const a = relay(1, false)
    step(a, { _tag: "MemberJoined", id: "wa" })
    step(a, { _tag: "MemberJoined", id: "wb" })
    expect(forwards(step(a, push("wa", 0, "e0-b0", 1))).map((f) => f.bundle.meta.batchId)).toEqual(["e0-b0"])
  })

  it("encodes under the stamped codec with its own residuals", () => {
    const s = initialRelay({ job: "j", name: "r", id: "relay-r", shards: 1, ackTimeoutMs: 1_000, waitMs: 5_000, shapes: new Map([["w0", [4096]]]) }, true, 1024, 0)
    step(s, { _tag: "MemberJoined", id: "wa" })
    const g = Float32Array.from({ length: 4096 }, (_, i) => Math.sin(i))
    const out = forwards(step(s, { _tag: "Received", shard: 0, worker: "wa", version: 0, batchId: "e0-b0", codec: "int8", meta: meta(1), grads: new Map([["w0", g]]) }))
    expect(out[0].bundle.meta.codec).toBe("int8")
    expect(out[0].bundle.tensors[0].dtype).toBe("int8")
    expect(s.encoder.residuals.get("w0")!.some((x) => x !== 0)).toBe(true)
    expect(Result.isSuccess(parseCodec(out[0].bundle.meta.codec))).toBe(true)
  })
})
