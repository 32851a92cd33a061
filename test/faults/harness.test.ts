// Checks: the fault-drill harness's own judgement (test/support/faults.ts), without any
// process: the surviving history after restarts, and the bit-for-bit params comparison.
// Run: npx vitest run test/faults/harness.test.ts   (< 1 s)
import { describe, expect, it } from "vitest"
import type { StepApplied } from "../../shared/protocol/messages.ts"
import { DRILL_EPOCH_BATCHES } from "../support/drill-job.ts"
import { sameParams, survivingChain } from "../support/faults.ts"

const ev = (shard: number, incarnation: number, version: number, batchIds: string[]): StepApplied => ({
  _tag: "StepApplied", v: 1, shard, incarnation, version, batchIds, contributors: batchIds.map(() => "w0"),
  samples: 4, tokens: 64, loss: 1, lr: 1e-3, gradNorm: 1, maxStaleness: 0, aggregateMs: 1, at: 0, final: false
})

describe("survivingChain", () => {
  it("drops the versions a restarted incarnation recomputes, and late news from the dead one", () => {
    const applied = [
      ev(0, 100, 1, ["e0-b0"]), ev(0, 100, 2, ["e0-b1"]), ev(0, 100, 3, ["e0-b2"]), ev(0, 100, 4, ["e0-b3"]),
      ev(1, 50, 1, ["e0-b0"]), // another shard: not mixed in
      ev(0, 200, 3, ["e0-b2"]), // resumed from the checkpoint at version 2
      ev(0, 100, 5, ["e0-b4"]), // the dead incarnation, arriving late
      ev(0, 200, 4, ["e0-b3"]), ev(0, 200, 5, ["e0-b4"])
    ]
    const chain = survivingChain(applied, 0)
    expect([...chain.keys()].sort()).toEqual([1, 2, 3, 4, 5])
    expect([...chain.values()].map((a) => a.incarnation)).toEqual([100, 100, 200, 200, 200])
    const ids = [...chain.values()].flatMap((a) => a.batchIds)
    expect(new Set(ids).size).toBe(ids.length)
  })

  it("a resume whose re-applied batches differ keeps only the new ones (no false duplicate)", () => {
    const applied = [ev(0, 1, 1, ["e0-b0"]), ev(0, 1, 2, ["e0-b1", "e0-b2"]), ev(0, 2, 2, ["e0-b2", "e0-b1"])]
    expect([...survivingChain(applied, 0).values()].map((a) => a.batchIds)).toEqual([["e0-b0"], ["e0-b2", "e0-b1"]])
  })
})

describe("sameParams", () => {
  it("is bit-exact: equal values pass, one flipped bit (or -0 vs 0) is named", () => {
    const a = new Map([["w", Float32Array.from([1, 2, 3])]])
    expect(sameParams(a, new Map([["w", Float32Array.from([1, 2, 3])]]))).toBeUndefined()
    const b = Float32Array.from([1, 2, 3])
    new Uint32Array(b.buffer)[1] ^= 1
    expect(sameParams(a, new Map([["w", b]]))).toMatch(/tensor w: 1\/3 values differ \(first at 1/)
    expect(sameParams(new Map([["z", Float32Array.from([0])]]), new Map([["z", Float32Array.from([-0])]]))).toMatch(/differ/)
    expect(sameParams(a, new Map())).toMatch(/only in the first/)
  })

  it("the drill corpus has 25 batches an epoch", () => {
    expect(DRILL_EPOCH_BATCHES).toBe(25)
  })
})
