// Checks: an optimizer step is all or nothing (actors/param-server/aggregate.ts
// applyChecked, snapshot.ts). SGD with momentum and gradients near float32's largest value
// overflow on the second step (the momentum buffer adds up past 3.4e38 — the params stay
// finite one step longer, so the slots are checked too): the step is
// refused, the params AND the optimizer slots are bit-identical to before it, the version
// does not advance, and the pushes of it are refused `non-finite` to their senders; the
// job then goes on with the next (finite) gradients. A shard of a coordinated sync job
// makes the version with its params kept (its peers apply it) and says so on `errors`.
// Without the check the second step leaves Infinity in the momentum buffer and the third
// -Infinity in the params (a checkpoint of them would carry a valid CRC). No NATS, no clocks.
import { describe, expect, it } from "vitest"
import { ShardState, type GradientPush } from "../actors/param-server/aggregate.ts"
import { initialState, step, type PsEffect } from "../actors/param-server/core.ts"
import { subjects } from "../shared/protocol/subjects.ts"

const HUGE = 3e38
const specs = [{ name: "w", shape: [2, 2] }, { name: "b", shape: [2] }]
const shard = () =>
  new ShardState({
    specs,
    params: new Map([["w", new Float32Array([1, 2, 3, 4])], ["b", new Float32Array([0, 0])]]),
    optimizer: { kind: "sgd", momentum: 0.9, dampening: 0, nesterov: false, weightDecay: 0 },
    consistency: { mode: "sync" },
    clipNorm: 0
  })
const push = (sender: string, batchId: string, g: number, version: number): GradientPush => ({
  sender, version, batchId, samples: 1, tokens: 4, loss: 1,
  grads: new Map([["w", new Float32Array(4).fill(g)], ["b", new Float32Array(2).fill(g)]])
})
const copy = (s: ShardState) => ({
  params: new Map([...s.params].map(([k, v]) => [k, Float32Array.from(v)])),
  slots: new Map([...s.slots].map(([k, sl]) => [k, Object.fromEntries(Object.entries(sl).map(([n, a]) => [n, Float32Array.from(a)]))]))
})

describe("an optimizer step is all or nothing", () => {
  it("refuses a step whose params would not be finite, and leaves params, slots and version as they were", () => {
    const s = shard()
    expect(s.admit(push("w0", "e0-b0", HUGE, 0)).ok).toBe(true)
    s.apply(1e-2, s.choose(["w0"])) // finite: -3e36
    expect(s.version).toBe(1)
    const before = copy(s)
    expect(s.admit(push("w0", "e0-b1", HUGE, 1)).ok).toBe(true)
    const r = s.applyChecked(1e-2, s.choose(["w0"]), undefined, "refuse")
    expect(r.refused?.reason).toMatch(/version 2 made w\.momentum_buffer\[0\] Infinity/)
    expect(r.refused?.pushes.map((p) => p.batchId)).toEqual(["e0-b1"])
    expect(s.version).toBe(1)
    expect(s.updates).toBe(1)
    expect(s.heldCount).toBe(0)
    expect(s.isApplied("e0-b1")).toBe(false)
    for (const [k, v] of before.params) expect(s.params.get(k)).toEqual(v)
    for (const [k, sl] of before.slots) expect(s.slots.get(k)).toEqual(sl)
    // the next gradients go on from there
    expect(s.admit(push("w0", "e0-b2", 1, 1)).ok).toBe(true)
    expect(s.apply(1e-2, s.choose(["w0"])).step.version).toBe(2)
    for (const p of s.params.values()) expect(p.every(Number.isFinite)).toBe(true)
    // apply (the replays' entry point) throws on such a step instead of leaving NaN behind
    expect(s.admit(push("w0", "e0-b3", HUGE, 2)).ok).toBe(true)
    expect(() => s.apply(1e-2, s.choose(["w0"]))).toThrow(/version 3 made .*Infinity/)
    expect(s.version).toBe(2)
  })

  it("the reducer refuses every push of that version to its sender, keeps the version, and applies the next gradients", () => {
    const cfg = { subjects: subjects("j"), job: "j", id: "ps-0", shard: 0, shards: 1, steps: 100, epochs: 0, checkpointEvery: 0, minWorkers: 1, decisionWaitMs: 1_000, resendMs: 500, joinGraceMs: 2_000 }
    const s = initialState(cfg, shard(), { incarnation: 1000, now: 0 })
    step(s, { _tag: "MemberJoined", id: "w0" })
    const round = (batchId: string, g: number, version: number): PsEffect[] => {
      step(s, { _tag: "GradientsReceived", subject: "push", incarnation: 1000, push: push("w0", batchId, g, version) })
      return step(s, { _tag: "LrResolved", version: version + 1, lr: 1e-2 })
    }
    expect(round("e0-b0", HUGE, 0).map((e) => e._tag)).toContain("Applied")
    const fx = round("e0-b1", HUGE, 1)
    expect(fx.map((e) => e._tag)).not.toContain("Applied")
    expect(fx.map((e) => e._tag)).not.toContain("BroadcastParams")
    expect(fx.find((e) => e._tag === "Reject")).toMatchObject({ ackTo: "w0", rejection: { code: "non-finite", sender: "w0", step: 1, reason: expect.stringMatching(/version 2 was not made/) } })
    expect(s.core.version).toBe(1)
    expect(s.phase._tag).toBe("Idle")
    expect(round("e0-b2", 1, 1).map((e) => e._tag)).toContain("Applied")
    expect(s.core.version).toBe(2)
  })

  it("a shard of a coordinated sync job makes the version with its params kept, and reports it", () => {
    const s = shard()
    expect(s.admit(push("w0", "e0-b0", HUGE, 0)).ok).toBe(true)
    s.apply(1e-2, s.choose(["w0"]))
    const before = copy(s)
    expect(s.admit(push("w0", "e0-b1", HUGE, 1)).ok).toBe(true)
    const r = s.applyChecked(1e-2, s.choose(["w0"]), undefined, "keep")
    if (r.refused) throw new Error("keep never refuses")
    expect(r.kept).toMatch(/Infinity/)
    expect(r.step.version).toBe(2)
    expect(s.isApplied("e0-b1")).toBe(true)
    for (const [k, v] of before.params) expect(s.params.get(k)).toEqual(v)
    for (const [k, sl] of before.slots) expect(s.slots.get(k)).toEqual(sl)
  })
})
