// Checks: the parameter server's pure core and its checkpoints. Admission says why it
// rejects (duplicate, stale, future, wrong tensors or shapes, NaN/Inf) and leaves the
// params untouched; the sync barrier waits for its members; aggregation is the
// sample-weighted mean; checkpoints round-trip, and a corrupt one is reported and skipped.
import { mkdtempSync, readFileSync, readdirSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { describe, expect, it } from "vitest"
import { ShardState, type GradientPush } from "../actors/param-server/aggregate.ts"
import { decodeCheckpoint, listCheckpoints, loadLatestCheckpoint, shardDir, writeCheckpoint, type ShardCheckpoint } from "../actors/param-server/checkpoint.ts"

const specs = [{ name: "w", shape: [2, 2] }, { name: "b", shape: [2] }]
const fresh = (mode: "sync" | "async" = "sync") =>
  new ShardState({
    specs,
    params: new Map([["w", new Float32Array([1, 2, 3, 4])], ["b", new Float32Array([0, 0])]]),
    optimizer: { kind: "sgd", momentum: 0, dampening: 0, nesterov: false, weightDecay: 0 },
    consistency: { mode },
    clipNorm: 0
  })
const push = (sender: string, batchId: string, g: number, o: Partial<GradientPush> = {}): GradientPush => ({
  sender, version: 0, batchId, samples: 1, tokens: 4, loss: 1,
  grads: new Map([["w", new Float32Array(4).fill(g)], ["b", new Float32Array(2).fill(g)]]),
  ...o
})

describe("parameter-server shard", () => {
  it("waits for every barrier member, then applies the sample-weighted mean", () => {
    const s = fresh()
    s.openBarrier(["w0", "w1"])
    expect(s.admit(push("w1", "e0-b1", 3, { samples: 3 })).ok).toBe(true)
    expect(s.ready()).toBe(false)
    expect(s.waitingFor()).toEqual(["w0"])
    expect(s.admit(push("w0", "e0-b0", -1, { samples: 1 })).ok).toBe(true)
    expect(s.ready()).toBe(true)
    const step = s.apply(0.5)
    // mean = (3·3 + 1·(−1)) / 4 = 2 → w −= 0.5·2
    expect(Array.from(s.params.get("w")!)).toEqual([0, 1, 2, 3])
    expect(step).toMatchObject({ version: 1, batchIds: ["e0-b0", "e0-b1"], contributors: ["w0", "w1"], samples: 4 })
  })

  it("drops a member that leaves without stalling the barrier", () => {
    const s = fresh()
    s.openBarrier(["w0", "w1"])
    s.admit(push("w0", "e0-b0", 1))
    s.dropMember("w1")
    expect(s.ready()).toBe(true)
  })

  it("rejects bad gradients with a reason and leaves the params untouched", () => {
    const s = fresh()
    s.openBarrier(["w0"])
    s.admit(push("w0", "e0-b0", 1))
    s.apply(0.1)
    const before = Array.from(s.params.get("w")!)
    const nan = push("w0", "e0-b9", 0, { version: 1 })
    nan.grads.get("b")![1] = Number.NaN
    const cases: Array<[GradientPush, string, RegExp]> = [
      [push("w0", "e0-b0", 1, { version: 1 }), "duplicate", /already applied/],
      [push("w0", "e0-b2", 1, { version: 0 }), "stale", /version 0/],
      [push("w0", "e0-b3", 1, { version: 5 }), "invalid-value", /future/],
      [push("w0", "e0-b4", 1, { version: 1, samples: 0 }), "invalid-value", /samples/],
      [{ ...push("w0", "e0-b5", 1, { version: 1 }), grads: new Map([["w", new Float32Array(4)]]) }, "bad-tensor", /b is missing/],
      [{ ...push("w0", "e0-b6", 1, { version: 1 }), grads: new Map([["w", new Float32Array(3)], ["b", new Float32Array(2)]]) }, "bad-tensor", /3 elements, expected 4/],
      [{ ...push("w0", "e0-b7", 1, { version: 1 }), grads: new Map([["w", new Float32Array(4)], ["b", new Float32Array(2)], ["x", new Float32Array(1)]]) }, "bad-tensor", /not owned.*x/],
      [nan, "non-finite", /b\[1\] is NaN/]
    ]
    for (const [p, code, re] of cases) {
      const r = s.admit(p)
      expect(r.ok, p.batchId).toBe(false)
      if (!r.ok) {
        expect(r.code, p.batchId).toBe(code)
        expect(r.reason, p.batchId).toMatch(re)
      }
    }
    expect(s.ready()).toBe(false)
    expect(Array.from(s.params.get("w")!)).toEqual(before)
    expect(s.version).toBe(1)
  })

  it("applies each gradient as it arrives in async mode, and records every micro-batch id", () => {
    const s = fresh("async")
    expect(s.admit(push("w0", "e0-b0+e0-b1", 1)).ok).toBe(true)
    expect(s.apply(0.1).batchIds).toEqual(["e0-b0", "e0-b1"])
    const stale = s.admit(push("w1", "e0-b2", 1, { version: 0 }))
    expect(stale).toEqual({ ok: true, staleness: 1 })
    expect(s.admit(push("w1", "e0-b1", 1, { version: 1 })).ok).toBe(false)
  })
})

describe("checkpoints", () => {
  const dir = mkdtempSync(join(tmpdir(), "flotilla-ckpt-"))
  const ckpt = (version: number): ShardCheckpoint => ({
    job: "j", shard: 0, version, updates: version, optimizer: { kind: "adamw", beta1: 0.9, beta2: 0.999, eps: 1e-8, weightDecay: 0, amsgrad: false },
    appliedBatches: ["e0-b0"], params: new Map([["w", new Float32Array([version, 2, 3, 4])]]), shapes: new Map([["w", [2, 2]]]),
    slots: new Map([["w", { exp_avg: new Float32Array([1, 1, 1, 1]), exp_avg_sq: new Float32Array(4) }]])
  })

  it("round-trips params, optimizer slots and state, keeping the newest files", () => {
    for (const v of [1, 2, 3, 4]) writeCheckpoint(dir, ckpt(v), 3)
    expect(listCheckpoints(dir, "j", 0).map((p) => p.slice(-14))).toEqual(["v00000002.ckpt", "v00000003.ckpt", "v00000004.ckpt"])
    expect(readdirSync(shardDir(dir, "j", 0)).some((f) => f.includes(".tmp"))).toBe(false)
    const back = loadLatestCheckpoint(dir, "j", 0)!.checkpoint
    expect(back.version).toBe(4)
    expect(Array.from(back.params.get("w")!)).toEqual([4, 2, 3, 4])
    expect(Array.from(back.slots.get("w")!.exp_avg)).toEqual([1, 1, 1, 1])
    expect(back.appliedBatches).toEqual(["e0-b0"])
    expect(back.optimizer.kind).toBe("adamw")
  })

  it("reports a corrupt newest checkpoint and falls back to the previous one", () => {
    const newest = listCheckpoints(dir, "j", 0).pop()!
    const bytes = readFileSync(newest)
    bytes[bytes.length - 3] ^= 0xff
    writeFileSync(newest, bytes)
    const corrupt: string[] = []
    const got = loadLatestCheckpoint(dir, "j", 0, (p, why) => corrupt.push(`${p}: ${why}`))!
    expect(got.checkpoint.version).toBe(3)
    expect(corrupt).toHaveLength(1)
    expect(corrupt[0]).toMatch(/CRC32 mismatch/)
    expect(() => decodeCheckpoint(bytes.subarray(0, 100))).toThrow(/corrupt/)
    expect(() => decodeCheckpoint(new TextEncoder().encode("NOTACKPT........"))).toThrow(/bad magic/)
  })
})
