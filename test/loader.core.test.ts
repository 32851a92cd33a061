// Checks: the loader's pure reducer (actors/loader/core.ts) without NATS or clocks — the
// build from the parameter servers' applied logs (done = their intersection, undone indices
// in index order from the lowest open epoch, NoBatch "rebuilding" meanwhile, retries), a new
// PS incarnation (new gen, leases revoked), re-issues (expiry, owner's BatchFailed under the
// current gen only, owner left before every shard acknowledged), give-up, loader shards,
// pause and val batches, and bounded memory over many epochs.
import { describe, expect, it } from "vitest"
import { initialState, start, statusOf, step, type LoaderConfig, type LoaderEffect, type LoaderEvent, type LoaderState } from "../actors/loader/core.ts"
import type { BusMessage } from "../shared/bus/Bus.ts"
import { AppliedLog, batchId } from "../shared/protocol/applied-log.ts"
import type { AppliedLog as AppliedLogReply, BatchLeased, StepApplied } from "../shared/protocol/messages.ts"

const config = (over: Partial<LoaderConfig> = {}): LoaderConfig => ({
  id: "loader-t",
  indices: [0, 1, 2, 3, 4, 5],
  epochBatches: 6,
  psShards: 2,
  B: 2,
  T: 4,
  valBatches: 1,
  leaseMs: 1_000,
  maxAttempts: 3,
  logRetryMs: 500,
  refreshMs: 0,
  leaseSubject: "flotilla.t.data.lease",
  ...over
})

const inbox: BusMessage = { subject: "flotilla.t.data.lease", data: new Uint8Array(), headers: {}, reply: "_INBOX.t" }

/** A shard's applied log with these batch ids, as the PS answers GetAppliedLog. */
const logReply = (shard: number, incarnation: number, ids: readonly string[], epochBatches = 6, version = ids.length): AppliedLogReply => {
  const l = new AppliedLog()
  for (const id of ids) {
    const [e, b] = id.slice(1).split("-b").map(Number)
    l.add({ epoch: e, index: b }, epochBatches)
  }
  return { _tag: "AppliedLog", v: 1, shard, incarnation, version, log: l.toJSON() }
}

const stepApplied = (shard: number, incarnation: number, batchIds: readonly string[]): StepApplied => ({
  _tag: "StepApplied",
  v: 1,
  shard,
  incarnation,
  version: 1,
  batchIds,
  contributors: [],
  samples: 1,
  tokens: 1,
  loss: 1,
  lr: 1,
  gradNorm: 1,
  maxStaleness: 0,
  aggregateMs: 0,
  at: 0,
  final: false
})

/** Runs events through the reducer, keeping the effects. */
class Driver {
  st: LoaderState
  fx: LoaderEffect[] = []
  constructor(cfg: LoaderConfig, now = 1_000) {
    const [st, fx] = start(cfg, now)
    this.st = st
    this.fx = [...fx]
  }
  send(e: LoaderEvent): LoaderEffect[] {
    const [st, fx] = step(this.st, e)
    this.st = st
    this.fx.push(...fx)
    return [...fx]
  }
  /** Answer the newest log request of each shard. */
  answer(replies: readonly AppliedLogReply[], now = 1_000): LoaderEffect[] {
    return replies.flatMap((reply) => this.send({ _tag: "AppliedLogReceived", shard: reply.shard, seq: this.st.shards[reply.shard].seq, reply, now }))
  }
  lease(worker: string, now = 1_000): BatchLeased | string {
    const fx = this.send({ _tag: "LeaseRequested", request: { _tag: "LeaseBatch", v: 1, worker, split: "train" }, replyTo: inbox, now })
    const r = fx.find((f) => f._tag === "ReplyBatch" || f._tag === "ReplyNoBatch" || f._tag === "Reject")
    if (r?._tag === "ReplyBatch") return r.meta
    if (r?._tag === "ReplyNoBatch") return r.reason
    return r?._tag === "Reject" ? `rejected: ${r.rejection.reason}` : "no reply"
  }
  ids(worker: string, n: number, now = 1_000): string[] {
    return Array.from({ length: n }, () => {
      const l = this.lease(worker, now)
      return typeof l === "string" ? l : l.batchId
    })
  }
  applyAll(ids: readonly string[], inc: readonly number[] = [7, 8]) {
    inc.forEach((incarnation, k) => this.send({ _tag: "StepAppliedReceived", applied: stepApplied(k, incarnation, ids), now: 1_000 }))
  }
}

const logs = (fx: readonly LoaderEffect[]) => fx.flatMap((f) => (f._tag === "Log" ? [f.message] : []))
const requests = (fx: readonly LoaderEffect[]) => fx.flatMap((f) => (f._tag === "RequestLog" ? [f.shard] : []))

/** A loader built on two empty shards (incarnations 7 and 8). */
const ready = (over: Partial<LoaderConfig> = {}) => {
  const d = new Driver(config(over))
  d.answer(Array.from({ length: d.st.cfg.psShards }, (_, k) => logReply(k, 7 + k, [])))
  return d
}

describe("loader core: building from applied logs", () => {
  it("asks every shard at start, answers 'rebuilding' until all did, then serves epoch 0 in order", () => {
    const d = new Driver(config(), 1_000)
    expect(requests(d.fx)).toEqual([0, 1])
    expect(d.st.gen).toBe(1_000)
    expect(d.lease("w0")).toBe("rebuilding")
    d.answer([logReply(0, 7, [])])
    expect(d.lease("w0")).toBe("rebuilding")
    d.answer([logReply(1, 8, [])])
    const l = d.lease("w0")
    expect(typeof l === "string" ? l : [l.batchId, l.gen, l.epochBatches, l.attempt, l.leaseMs]).toEqual(["e0-b0", 1_000, 6, 1, 1_000])
    expect(d.ids("w0", 7)).toEqual(["e0-b1", "e0-b2", "e0-b3", "e0-b4", "e0-b5", "e1-b0", "e1-b1"])
  })

  it("done = the intersection of the shards' logs; serves the undone indices in index order from the lowest open epoch", () => {
    const d = new Driver(config())
    const all0 = Array.from({ length: 6 }, (_, i) => batchId(0, i))
    // shard 0 finished epoch 0 and has e1-b0, e1-b2; shard 1 misses e0-b4 and has e1-b0..b2
    d.answer([logReply(0, 7, [...all0, "e1-b0", "e1-b2"]), logReply(1, 8, [...all0.filter((x) => x !== "e0-b4"), "e1-b0", "e1-b1", "e1-b2"])])
    expect(statusOf(d.st)).toMatchObject({ done: 5 + 2, epoch: 0, rebuilding: false })
    expect(d.ids("w0", 6)).toEqual(["e0-b4", "e1-b1", "e1-b3", "e1-b4", "e1-b5", "e2-b0"])
  })

  it("retries a shard that does not answer on a later Tick, never stalls, and drops stale replies", () => {
    const d = new Driver(config(), 1_000)
    d.answer([logReply(0, 7, [])])
    const s1 = d.st.shards[1].seq
    d.send({ _tag: "AppliedLogFailed", shard: 1, seq: s1, reason: "NoRespondersError" })
    expect(requests(d.send({ _tag: "Tick", now: 1_200 }))).toEqual([]) // not yet: logRetryMs 500
    expect(requests(d.send({ _tag: "Tick", now: 1_500 }))).toEqual([1])
    expect(d.lease("w0", 1_500)).toBe("rebuilding")
    // the answer to the first request comes late: ignored (only the newest request counts)
    d.send({ _tag: "AppliedLogReceived", shard: 1, seq: s1, reply: logReply(1, 8, []), now: 1_600 })
    expect(statusOf(d.st).rebuilding).toBe(true)
    // a reply from an incarnation older than one already heard of is dropped too
    d.send({ _tag: "ServerSeen", shard: 1, incarnation: 9, now: 1_600 })
    d.answer([logReply(1, 8, [])], 1_600)
    expect(statusOf(d.st).rebuilding).toBe(true)
    d.send({ _tag: "Tick", now: 2_100 })
    d.answer([logReply(1, 9, [])], 2_100)
    expect(d.lease("w0", 2_100)).toMatchObject({ batchId: "e0-b0" })
  })

  it("replays StepApplied seen while a log request was in flight", () => {
    const d = new Driver(config())
    d.applyAll(["e0-b0", "e0-b1"]) // applied after the loader asked, before the PS answered
    d.answer([logReply(0, 7, []), logReply(1, 8, ["e0-b0"])])
    expect(statusOf(d.st).done).toBe(2)
    expect(d.lease("w0")).toMatchObject({ batchId: "e0-b2" })
  })

  it("a periodic refresh heals a lost StepApplied; a refresh that finds a new incarnation rebuilds", () => {
    const d = ready({ refreshMs: 2_000 })
    expect(d.ids("w0", 2)).toEqual(["e0-b0", "e0-b1"])
    d.applyAll(["e0-b0"], [7]) // shard 1's StepApplied for e0-b0 is lost
    expect(statusOf(d.st)).toMatchObject({ done: 0, leased: 2 })
    expect(requests(d.send({ _tag: "Tick", now: 2_500 }))).toEqual([])
    expect(requests(d.send({ _tag: "Tick", now: 3_000 }))).toEqual([0, 1])
    d.applyAll(["e0-b1"]) // during the refresh: kept in the log and replayed onto the reply
    d.answer([logReply(0, 7, ["e0-b0"]), logReply(1, 8, ["e0-b0"])], 3_000)
    expect(statusOf(d.st)).toMatchObject({ done: 2, leased: 0, rebuilding: false })
    d.send({ _tag: "Tick", now: 5_000 })
    const gen = d.st.gen
    d.answer([logReply(0, 7, ["e0-b0", "e0-b1"]), logReply(1, 30, [])], 5_000)
    expect(d.st.gen).toBeGreaterThan(gen)
    expect(statusOf(d.st).rebuilding).toBe(true)
  })

  it("a new PS incarnation (StepApplied or heartbeat) is a new gen: leases revoked, rebuilt from the (lower) logs", () => {
    const d = ready()
    const gen0 = d.st.gen
    expect(d.ids("w0", 4)).toEqual(["e0-b0", "e0-b1", "e0-b2", "e0-b3"])
    d.applyAll(["e0-b0", "e0-b1", "e0-b2"])
    expect(statusOf(d.st)).toMatchObject({ done: 3, leased: 1 })
    // shard 1 restarts from a checkpoint that had only e0-b0
    const fx = d.send({ _tag: "ServerSeen", shard: 1, incarnation: 20, now: 5_000 })
    expect(requests(fx)).toEqual([0, 1])
    expect(logs(fx).join("\n")).toMatch(/new incarnation 20.*\n.*revoking 1 lease/)
    expect(d.st.gen).toBeGreaterThan(gen0)
    expect(d.lease("w0", 5_000)).toBe("rebuilding")
    // a failure of the old gen's lease changes nothing
    d.send({ _tag: "BatchFailedReceived", failed: { _tag: "BatchFailed", v: 1, worker: "w0", batchId: "e0-b3", gen: gen0, reason: "stale" } })
    expect(d.st.reissue).toEqual([])
    d.answer([logReply(0, 7, ["e0-b0", "e0-b1", "e0-b2"]), logReply(1, 20, ["e0-b0"])], 5_000)
    expect(statusOf(d.st)).toMatchObject({ done: 1, leased: 0, rebuilding: false })
    // exactly the batches after the checkpoint, in the original order
    expect(d.ids("w0", 3, 5_000)).toEqual(["e0-b1", "e0-b2", "e0-b3"])
    // the same incarnation again is nothing new
    expect(requests(d.send({ _tag: "StepAppliedReceived", applied: stepApplied(1, 20, []), now: 5_000 }))).toEqual([])
  })
})

describe("loader core: leases", () => {
  it("re-issues expired leases first (attempt counted), never a done or leased batch", () => {
    const d = ready({ leaseMs: 100 })
    expect(d.ids("w0", 2, 0)).toEqual(["e0-b0", "e0-b1"])
    d.send({ _tag: "Tick", now: 50 })
    expect(d.st.leases.size).toBe(2)
    const fx = d.send({ _tag: "Tick", now: 100 })
    expect(logs(fx)).toEqual(["re-issuing e0-b0 (was leased to w0): lease expired", "re-issuing e0-b1 (was leased to w0): lease expired"])
    d.applyAll(["e0-b1"]) // its gradient was applied after all: not served again
    const again = d.lease("w1", 200)
    expect(typeof again === "string" ? again : [again.batchId, again.attempt]).toEqual(["e0-b0", 2])
    expect(d.ids("w1", 2, 200)).toEqual(["e0-b2", "e0-b3"])
  })

  it("a BatchFailed counts only from the lease's owner under the current gen; give up after maxAttempts faults", () => {
    const d = ready({ maxAttempts: 2 })
    const l = d.lease("w0") as BatchLeased
    const fail = (worker: string, gen: number, reason = "refused (non-finite): gradient w[3] is NaN") =>
      d.send({ _tag: "BatchFailedReceived", failed: { _tag: "BatchFailed", v: 1, worker, batchId: l.batchId, gen, reason } })
    fail("w1", l.gen)
    fail("w0", l.gen - 1)
    expect(d.st.leases.has("e0-b0")).toBe(true)
    // a stale gradient is not the batch's fault: however often, it is re-issued, never given up
    for (let i = 0; i < 5; i++) {
      expect(logs(fail("w0", l.gen, "stale: version 3 was made without this gradient"))).toEqual(["re-issuing e0-b0 (was leased to w0): worker w0: stale: version 3 was made without this gradient"])
      expect(d.lease("w0")).toMatchObject({ batchId: "e0-b0" })
    }
    expect(logs(fail("w0", l.gen))).toEqual(["re-issuing e0-b0 (was leased to w0): worker w0: refused (non-finite): gradient w[3] is NaN"])
    expect(d.lease("w1")).toMatchObject({ batchId: "e0-b0", attempt: 7 })
    const fx = d.send({ _tag: "BatchFailedReceived", failed: { _tag: "BatchFailed", v: 1, worker: "w1", batchId: "e0-b0", gen: l.gen, reason: "nan" } })
    expect(fx).toMatchObject([{ _tag: "Reject", rejection: { code: "internal", sender: "w1", reason: expect.stringMatching(/e0-b0 given up/) } }])
    expect(statusOf(d.st).givenUp).toBe(1)
    expect(d.lease("w1")).toMatchObject({ batchId: "e0-b1", attempt: 1 })
  })

  it("a worker that left gets its leases re-issued unless every shard acknowledged its push", () => {
    const d = ready()
    expect(d.ids("w0", 3)).toEqual(["e0-b0", "e0-b1", "e0-b2"])
    const ack = (shard: number, batchId: string, sender = "w0") =>
      d.send({ _tag: "PushAckReceived", ack: { _tag: "PushAck", v: 1, shard, incarnation: 7 + shard, sender, batchId, version: 0, status: "held" }, now: 1_500 })
    ack(0, "e0-b0+e0-b1") // an accumulated gradient names its micro-batches
    ack(1, "e0-b0+e0-b1")
    ack(0, "e0-b2") // only one shard of two has it
    ack(1, "e0-b2", "w9") // not the owner
    const fx = d.send({ _tag: "MemberLeft", role: "worker", id: "w0", why: "silent for 2000 ms" })
    expect(logs(fx)).toEqual(["re-issuing e0-b2 (was leased to w0): worker w0 silent for 2000 ms"])
    expect(d.st.leases.get("e0-b0")?.deadline).toBe(2_500) // extended by the ack
    expect(d.lease("w1")).toMatchObject({ batchId: "e0-b2", attempt: 2 })
    // other roles leaving change nothing
    expect(d.send({ _tag: "MemberLeft", role: "evaluator", id: "w1", why: "left cleanly" })).toEqual([])
  })

  it("loader shards serve disjoint indices; epochBatches is the whole epoch", () => {
    const d = ready({ indices: [1, 3, 5] })
    const ls = Array.from({ length: 4 }, () => d.lease("w0") as BatchLeased)
    expect(ls.map((l) => l.batchId)).toEqual(["e0-b1", "e0-b3", "e0-b5", "e1-b1"])
    expect(ls[0].epochBatches).toBe(6)
  })

  it("pause answers NoBatch 'paused', resume serves again; val batches are served any time", () => {
    const d = new Driver(config())
    const val = d.send({ _tag: "LeaseRequested", request: { _tag: "LeaseBatch", v: 1, worker: "e0", split: "val", index: 0 }, replyTo: inbox, now: 0 })
    expect(val).toMatchObject([{ _tag: "ReplyBatch", meta: { batchId: "val-0", split: "val" } }])
    const bad = d.send({ _tag: "LeaseRequested", request: { _tag: "LeaseBatch", v: 1, worker: "e0", split: "val", index: 1 }, replyTo: inbox, now: 0 })
    expect(bad).toMatchObject([{ _tag: "Reject", rejection: { code: "invalid-value" } }])
    d.answer([logReply(0, 7, []), logReply(1, 8, [])])
    expect(d.send({ _tag: "ControlApplied", verb: "pause" })).toMatchObject([{ _tag: "Status", status: { paused: true } }])
    expect(d.lease("w0")).toBe("paused")
    d.send({ _tag: "ControlApplied", verb: "resume" })
    expect(d.lease("w0")).toMatchObject({ batchId: "e0-b0" })
  })

  it("a bad message is rejected with its reason", () => {
    const d = ready()
    expect(d.send({ _tag: "BadMessageReceived", subject: "s", reason: "payload is not JSON", replyTo: inbox })).toMatchObject([
      { _tag: "Reject", to: inbox, rejection: { code: "bad-message", reason: "payload is not JSON" } }
    ])
  })
})

describe("loader core: bounded memory", () => {
  it("over 8 epochs with losses, pending, leases and each shard's log stay bounded", () => {
    const epochBatches = 64
    const d = ready({ indices: Array.from({ length: epochBatches }, (_, i) => i), epochBatches, leaseMs: 100 })
    let now = 0
    let maxLeases = 0
    let maxReissue = 0
    let maxLogBytes = 0
    let round = 0
    while (d.st.cursor.epoch < 8) {
      round++
      now += 10
      const ids = d.ids(`w${round % 3}`, 4, now).filter((id) => id.startsWith("e"))
      // every 7th batch's gradient is lost (its lease expires and it is re-issued)
      const kept = ids.filter((id) => Number(id.split("-b")[1]) % 7 !== round % 7)
      d.applyAll(kept)
      d.send({ _tag: "Tick", now })
      maxLeases = Math.max(maxLeases, d.st.leases.size)
      maxReissue = Math.max(maxReissue, d.st.reissue.length)
      for (const v of d.st.shards) maxLogBytes = Math.max(maxLogBytes, v.log?.bytes ?? 0)
    }
    expect(statusOf(d.st).done).toBeGreaterThan(7 * epochBatches - 20)
    expect(maxLeases).toBeLessThanOrEqual(4 * 12) // outstanding: what a lease timeout holds
    expect(maxReissue).toBeLessThanOrEqual(epochBatches)
    // at most a few open epochs of bits (64 batches = 8 bytes each); closed epochs cost nothing
    expect(maxLogBytes).toBeLessThanOrEqual(4 * (epochBatches / 8))
    for (const v of d.st.shards) expect(v.log!.openFrom).toBeGreaterThanOrEqual(6)
  })

  it("initialState has no leases, no pending, and asks nothing until started", () => {
    const st = initialState(config())
    expect([st.leases.size, st.reissue.length, st.shards.length]).toEqual([0, 0, 2])
  })
})
