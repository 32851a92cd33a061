// Checks: checking pretrained weights against a model (actors/param-server/init.ts applyInit)
// — every difference listed in one error (missing, unexpected, another shape), ignore and
// allowMissing patterns, LoRA adapters always fresh; and a checkpoint folder of several
// shards read as one set of weights with its optimizer slots (init.optimizer).
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Effect } from "effect"
import { describe, expect, it } from "vitest"
import { encodeCheckpoint } from "../actors/param-server/checkpoint.ts"
import { applyInit, loadInitWeights, type InitWeights } from "../actors/param-server/init.ts"
import { makeFileStore } from "../shared/checkpoint/store.ts"
import { gptTiny, makeGpt } from "../shared/models/gpt.ts"

const def = makeGpt(gptTiny)
const fresh = def.init(1)
const weightsOf = (params: Map<string, Float32Array>): InitWeights => ({
  from: "test", params, shapes: new Map(def.specs.filter((s) => params.has(s.name)).map((s) => [s.name, s.shape]))
})

describe("applyInit", () => {
  it("takes every tensor from the weights when they fit", () => {
    const w = def.init(2)
    const out = applyInit(def, fresh, weightsOf(w), { from: "x" })
    for (const s of def.specs) expect(out.get(s.name)).toBe(w.get(s.name))
  })

  it("lists every difference in one error; ignore and allowMissing cover a changed tensor", () => {
    const w = new Map(def.init(2))
    w.delete("ln_f.bias")
    w.set("head.extra", new Float32Array(3))
    const ws = weightsOf(w)
    ws.shapes.set("wpe", [4, gptTiny.width])
    ws.shapes.set("head.extra", [3])
    const msg = (() => {
      try {
        applyInit(def, fresh, ws, { from: "x" })
        return ""
      } catch (e) {
        return (e as Error).message
      }
    })()
    expect(msg).toMatch(/does not fit model gpt \(3 tensors\)/)
    expect(msg).toMatch(/ln_f\.bias \[8\]: missing from the weights/)
    expect(msg).toMatch(/wpe: the weights have shape \[4,8\], the model \[8,8\]/)
    expect(msg).toMatch(/head\.extra: in the weights but not in the model/)
    const out = applyInit(def, fresh, ws, { from: "x", ignore: ["wpe", "head"], allowMissing: ["wpe", "ln_f.bias"] })
    expect(out.get("wpe")).toBe(fresh.get("wpe"))
    expect(out.get("ln_f.bias")).toBe(fresh.get("ln_f.bias"))
    expect(out.get("wte")).toBe(w.get("wte"))
    // a LoRA adapter is always fresh, whatever the weights hold
    expect(applyInit(def, fresh, weightsOf(def.init(2)), { from: "x" }, ["wte"]).get("wte")).toBe(fresh.get("wte"))
  })
})

describe("loadInitWeights from a checkpoint folder", () => {
  it("merges every shard at the newest common version, slots included", async () => {
    const dir = mkdtempSync(join(tmpdir(), "flotilla-init-"))
    const ck = (shard: number, version: number, name: string) => {
      mkdirSync(join(dir, "base", `ps-${shard}`), { recursive: true })
      writeFileSync(join(dir, "base", `ps-${shard}`, `v${String(version).padStart(8, "0")}.ckpt`), encodeCheckpoint({
        job: "base", shard, version, updates: version, optimizer: { kind: "sgd", momentum: 0.9, dampening: 0, nesterov: false, weightDecay: 0 } as never,
        consistency: { mode: "sync" }, log: { completeBelow: 0, epochs: [] }, params: new Map([[name, Float32Array.of(version)]]),
        shapes: new Map([[name, [1]]]), slots: new Map([[name, { momentum_buffer: Float32Array.of(-version) }]])
      }))
    }
    ck(0, 5, "a")
    ck(0, 9, "a")
    ck(1, 5, "b")
    const w = await Effect.runPromise(loadInitWeights({ from: join(dir, "base") }, makeFileStore(dir)))
    expect(w.version).toBe(5)
    expect([...w.params].map(([k, v]) => [k, v[0]])).toEqual([["a", 5], ["b", 5]])
    expect(w.slots?.get("b")?.["momentum_buffer"]?.[0]).toBe(-5)
    const one = await Effect.runPromise(loadInitWeights({ from: join(dir, "base", "ps-0", "v00000009.ckpt") }, makeFileStore(dir)).pipe(Effect.flip))
    expect(one.message).toMatch(/shard 1 has no checkpoint at version 9/)
    rmSync(dir, { recursive: true, force: true })
  })
})
