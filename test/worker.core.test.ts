// Checks: the training worker's mailbox reducer (actors/worker/core.ts), without NATS,
// clocks or tfjs. It keeps one batch ahead, computes only on params newer than its last
// (sync: every shard at one version), resends a push no shard acknowledged, hands back the
// batches of a push refused even after its ack, takes a restarted server's lower version
// and drops what it held, ignores leases of a table built before that restart (for a grace
// period), pulls when it has waited too long or a heartbeat shows params it lacks, and in
// async mode computes again only once its push is applied.
import { describe, expect, it } from "vitest"
import { initialWorker, step, type Batch, type WorkerEffect, type WorkerEvent, type WorkerState } from "../actors/worker/core.ts"
import type { BatchLeased } from "../shared/protocol/messages.ts"
import type { TensorBundle } from "../shared/wire/tensor.ts"

const cfg = { id: "w0", shards: 2, steps: 100, accumulate: 1, ackTimeoutMs: 1_000, watchdogMs: 2_000 }
const batch = (id: string, gen = 10): Batch => ({
  meta: { _tag: "BatchLeased", v: 1, batchId: id, epoch: 0, index: Number(id.split("-b")[1]), split: "train", B: 2, T: 4, attempt: 1, leaseMs: 1000, gen, epochBatches: 25 } as BatchLeased,
  data: { size: 2, tensors: new Map([["tokens", new Int32Array(10)]]) }
})
const params = (shard: number, version: number, incarnation = 1): WorkerEvent => ({ _tag: "ParamsReceived", shard, incarnation, version, params: new Map(), source: "pull" })
const bundle = { tensors: [], meta: { kind: "grads", job: "j", version: 0, step: 0, sender: "w0", codec: "f32" } } as unknown as TensorBundle
const tags = (fx: WorkerEffect[]) => fx.map((e) => e._tag)
const run = (s: WorkerState, e: WorkerEvent) => step(s, e)
/** A worker with params v0 on both shards and one batch in hand, computing. */
const computing = (mode: "sync" | "async" = "sync") => {
  const s = initialWorker(cfg, mode, 0)
  expect(tags(run(s, { _tag: "Tick", now: 0 }))).toEqual(["Lease"])
  run(s, params(0, 0))
  run(s, params(1, 0))
  const fx = run(s, { _tag: "LeaseReplied", batch: batch("e0-b0") })
  expect(tags(fx)).toEqual(["Lease", "Compute"]) // the next batch is asked for before computing
  return s
}
const computed = (s: WorkerState, id = "e0-b0", v = 0) =>
  run(s, { _tag: "Computed", key: `1:${v}/1:${v}`, versions: new Map([[0, v], [1, v]]), micro: [batch(id)], batchId: id, bundles: new Map([[0, bundle], [1, bundle]]) })
const ack = (shard: number, batchId: string, status: "held" | "applied" = "held"): WorkerEvent =>
  ({ _tag: "PushAcked", ack: { _tag: "PushAck", v: 1, shard, incarnation: 1, sender: "w0", batchId, version: 0, status } })

describe("worker reducer", () => {
  it("pushes to every shard, resends what is not acknowledged, and computes only on newer params", () => {
    const s = computing()
    expect(tags(computed(s))).toEqual(["Push", "Push", "Pushed"])
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") })
    run(s, ack(0, "e0-b0"))
    // shard 1's ack was lost: the same bundle goes to shard 1 again
    const resent = run(s, { _tag: "Tick", now: 1_000 })
    expect(resent.filter((e) => e._tag === "Push").map((e) => (e as { shard: number }).shard)).toEqual([1])
    expect(tags(run(s, ack(1, "e0-b0")))).not.toContain("Compute") // same params: no second gradient on them
    expect(tags(run(s, params(0, 1)))).not.toContain("Compute") // sync: shard 1 still at 0
    expect(tags(run(s, params(1, 1)))).toContain("Compute")
  })

  it("sync: a push whose batch every shard had applied already (a re-issued copy) lets it compute again on the same params", () => {
    const s = computing()
    computed(s)
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") })
    run(s, ack(0, "e0-b0", "applied"))
    const fx = run(s, ack(1, "e0-b0", "applied"))
    expect(fx.find((e) => e._tag === "Compute")).toMatchObject({ micro: [{ meta: { batchId: "e0-b1" } }] })
  })

  it("a refusal after the ack still hands the batch back", () => {
    const s = computing()
    computed(s)
    run(s, ack(0, "e0-b0"))
    run(s, ack(1, "e0-b0"))
    const fx = run(s, { _tag: "PushRefused", shard: 0, rejected: { _tag: "Rejected", v: 1, code: "stale", reason: "version 1 was made without this gradient", subject: "x", by: "ps-0", sender: "w0", step: 0, at: 0 } })
    expect(fx.find((e) => e._tag === "Release")).toMatchObject({ batch: { meta: { batchId: "e0-b0" } } })
  })

  it("takes a restarted server's lower version, hands back what it held, and skips leases built before the restart", () => {
    const s = computing()
    computed(s)
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") }) // held while e0-b0's push is in flight
    const fx = run(s, params(0, 0, 50)) // shard 0 came back from its checkpoint: incarnation 50
    expect(s.cache.get(0)).toMatchObject({ version: 0, incarnation: 50 })
    expect(fx.filter((e) => e._tag === "Release").map((e) => (e as { batch: Batch }).batch.meta.batchId)).toEqual(["e0-b1"])
    expect(s.inflight).toBeUndefined()
    // a lease of generation 10 (< incarnation 50) right after: dropped and handed back
    const old = run(s, { _tag: "LeaseReplied", batch: batch("e0-b2", 10) })
    expect(tags(old)).toContain("Release")
    expect(s.held).toEqual([])
    // one of the rebuilt table (gen 60): kept
    run(s, { _tag: "Tick", now: 500 })
    const kept = run(s, { _tag: "LeaseReplied", batch: batch("e0-b3", 60) })
    // it computes on shard 0's new params at once (shard 1 is at version 0 too)
    expect(kept.find((e) => e._tag === "Compute")).toMatchObject({ micro: [{ meta: { batchId: "e0-b3" } }] })
  })

  it("pulls when a heartbeat shows params it lacks, and every shard after waiting watchdogMs", () => {
    const s = computing()
    computed(s)
    run(s, ack(0, "e0-b0"))
    run(s, ack(1, "e0-b0"))
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") })
    expect(run(s, { _tag: "ServerSeen", shard: 1, incarnation: 1, version: 1 })).toContainEqual({ _tag: "Pull", shard: 1, minVersion: 1 })
    expect(run(s, { _tag: "ServerSeen", shard: 1, incarnation: 1, version: 1 }).filter((e) => e._tag === "Pull")).toEqual([]) // already pulling
    run(s, { _tag: "PullEnded", shard: 1 })
    const late = run(s, { _tag: "Tick", now: 2_500 })
    expect(late.filter((e) => e._tag === "Pull").map((e) => (e as { shard: number }).shard)).toEqual([0, 1])
  })

  it("a step that computes longer than watchdogMs does not make it pull: the wait counts from the push", () => {
    const s = computing()
    expect(run(s, { _tag: "Tick", now: 5_000 }).filter((e) => e._tag === "Pull")).toEqual([]) // computing
    s.now = 5_000
    computed(s)
    run(s, ack(0, "e0-b0"))
    run(s, ack(1, "e0-b0"))
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") })
    expect(run(s, { _tag: "Tick", now: 5_500 }).filter((e) => e._tag === "Pull")).toEqual([])
    expect(run(s, { _tag: "Tick", now: 7_100 }).filter((e) => e._tag === "Pull").length).toBe(2) // a real wait still pulls
  })

  it("async: the next gradient waits until the push is applied, not merely held", () => {
    const s = computing("async")
    computed(s)
    run(s, { _tag: "LeaseReplied", batch: batch("e0-b1") })
    run(s, ack(0, "e0-b0"))
    run(s, ack(1, "e0-b0"))
    expect(tags(run(s, params(0, 1)))).not.toContain("Compute") // held, not applied yet
    run(s, ack(0, "e0-b0", "applied"))
    expect(tags(run(s, ack(1, "e0-b0", "applied")))).toContain("Compute")
  })
})
