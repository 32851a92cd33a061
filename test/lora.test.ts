// Checks LoRA on the GPT (shared/models/gpt.ts adapters, shared/models/lora.ts), cpu backend:
// at init the adapted model is exactly the base model (B = 0, same base values); merged and
// unmerged logits agree once the adapters are random; the adapters' gradients match central
// finite differences; SGD on the adapters alone lowers the loss and leaves the base alone;
// config errors name their field; spec order, blocks and parameter counts.
// Run: npx vitest run test/lora.test.ts
import * as tf from "@tensorflow/tfjs"
import { beforeAll, describe, expect, it } from "vitest"
import { initBackend } from "../shared/compute/backend.ts"
import type { GptConfig } from "../shared/models/gpt.ts"
import { gptLinears, gptLogits, gptTiny, makeGpt } from "../shared/models/gpt.ts"
import { isLoraParam, loraParamNames, loraTrainable, mergeLora, withoutLora } from "../shared/models/lora.ts"
import type { Batch, ModelDef } from "../shared/models/model.ts"
import { batchOf, countParams, cutStages, evalLoss, lossAndGrads, runStage, toTensors } from "../shared/models/model.ts"
import { Rng } from "../shared/models/rng.ts"
import { finiteDifferences, mismatches } from "./support/gradcheck.ts"

beforeAll(async () => {
  await initBackend("cpu")
})

const attn = { rank: 2, alpha: 4, targets: ["h.*.attn.c_attn", "h.*.attn.c_proj"] }
const every = { rank: 3, alpha: 6, targets: ["h.*.attn", "h.*.mlp"] }
const withLora = (lora: GptConfig["lora"]): GptConfig => ({ ...gptTiny, lora })

const tokens = (V: number, B: number, T: number, seed: number): Batch => {
  const rng = new Rng(seed)
  return batchOf(B, { tokens: Int32Array.from({ length: B * (T + 1) }, () => rng.int(V)) })
}

/** Logits [B*T, V] of the batch's input tokens, as a flat array. */
const logitsOf = (def: ModelDef & { config: GptConfig }, params: ReadonlyMap<string, Float32Array>, batch: Batch): Float32Array =>
  tf.tidy(() => {
    const toks = batch.tensors.get("tokens") as Int32Array
    const B = batch.size
    const T = toks.length / B - 1
    const x = Int32Array.from({ length: B * T }, (_, i) => toks[Math.floor(i / T) * (T + 1) + (i % T)])
    return new Float32Array(gptLogits(def.config, toTensors(def, params), tf.tensor2d(x, [B, T], "int32")).dataSync())
  })

/** Params from init, every adapter (A and B) set to N(0, std) noise. */
const randomAdapters = (def: ModelDef, seed: number, std: number): Map<string, Float32Array> => {
  const rng = new Rng(seed)
  const p = def.init(seed)
  for (const [n, v] of p) if (isLoraParam(n)) rng.fillNormal(v, std)
  return p
}

const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  expect(a.length).toBe(b.length)
  let m = 0
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]))
  return m
}

describe("init", () => {
  it("base params are those without LoRA; B = 0; the logits equal the base model's exactly", () => {
    const base = makeGpt(gptTiny)
    const batch = tokens(gptTiny.vocabSize, 2, 6, 1)
    for (const lora of [attn, every]) {
      const def = makeGpt(withLora(lora))
      const p = def.init(7)
      const q = base.init(7)
      for (const s of base.specs) expect(p.get(s.name), s.name).toEqual(q.get(s.name))
      for (const n of loraParamNames(def.config)) {
        const v = p.get(n)!
        if (n.endsWith(".lora_B")) expect(v.every((x) => x === 0), n).toBe(true)
        else expect(v.some((x) => x !== 0), n).toBe(true)
      }
      expect(logitsOf(def, p, batch)).toEqual(logitsOf(base, q, batch))
    }
  })

  it("lora_A ~ N(0, 1/r), deterministic in the seed", () => {
    const def = makeGpt(withLora({ rank: 4, alpha: 1, targets: ["*"] }))
    const a = [...def.init(3)].filter(([n]) => n.endsWith(".lora_A")).flatMap(([, v]) => [...v])
    const mean = a.reduce((s, x) => s + x, 0) / a.length
    const variance = a.reduce((s, x) => s + (x - mean) ** 2, 0) / a.length
    expect(Math.abs(mean)).toBeLessThan(0.05)
    expect(Math.abs(variance - 1 / 4)).toBeLessThan(0.03)
    expect(def.init(3).get("h.0.mlp.c_fc.lora_A")).toEqual(def.init(3).get("h.0.mlp.c_fc.lora_A"))
    expect(def.init(3).get("h.0.mlp.c_fc.lora_A")).not.toEqual(def.init(4).get("h.0.mlp.c_fc.lora_A"))
  })
})

describe("merge", () => {
  it("merged weights in the base model give the adapted model's logits (within 1e-5)", () => {
    const batch = tokens(gptTiny.vocabSize, 2, 7, 2)
    const base = makeGpt(withoutLora(withLora(every)))
    for (const lora of [attn, every]) {
      const def = makeGpt(withLora(lora))
      const p = randomAdapters(def, 5, 0.5)
      const merged = mergeLora(def.config, p)
      expect([...merged.keys()]).toEqual(base.specs.map((s) => s.name))
      const unmergedLogits = logitsOf(def, p, batch)
      const mergedLogits = logitsOf(base, merged, batch)
      expect(maxDiff(unmergedLogits, mergedLogits)).toBeLessThan(1e-5)
      // the adapters did something: the unadapted base gives other logits
      expect(maxDiff(unmergedLogits, logitsOf(base, p, batch))).toBeGreaterThan(1e-3)
      // untargeted weights are the inputs' own arrays; targeted ones are new
      expect(merged.get("h.0.mlp.c_fc.weight") === p.get("h.0.mlp.c_fc.weight")).toBe(lora === attn)
      expect(merged.get("h.0.attn.c_attn.weight") === p.get("h.0.attn.c_attn.weight")).toBe(false)
    }
  })

  it("refuses a missing adapter by name; without lora it is the base params", () => {
    const def = makeGpt(withLora(attn))
    const p = def.init(0)
    p.delete("h.1.attn.c_proj.lora_B")
    expect(() => mergeLora(def.config, p)).toThrow(/missing parameter "h.1.attn.c_proj.lora_B"/)
    const q = makeGpt(gptTiny).init(0)
    const m = mergeLora(gptTiny, q)
    expect([...m.keys()]).toEqual([...q.keys()])
    for (const [n, v] of m) expect(v).toBe(q.get(n))
  })
})

// ---------------------------------------------------------------------------------
// Finite-difference gradient check (as in models.grad.test.ts): central differences at
// eps 1e-2 and 1e-3 (float32 loss noise ~1e-7, so eps 1e-2 keeps rounding near 1e-5),
// each adapter tensor probed along its largest-gradient coordinate, two random
// coordinates and one random ±1/√n direction; a probe passes if either eps agrees.




describe("gradients", () => {
  it("lora_A and lora_B gradients match finite differences (every adapted layer kind)", () => {
    const def = makeGpt(withLora(every))
    const params = randomAdapters(def, 1, 0.3) // B ≠ 0, so A's gradient is not zero
    const rng = new Rng(2)
    for (const [n, v] of params) if (!isLoraParam(n)) for (let i = 0; i < v.length; i++) v[i] += rng.normal() * 0.3
    const batch = tokens(gptTiny.vocabSize, 2, 5, 9)
    const { grads } = lossAndGrads(def, params, batch)
    const names = loraParamNames(def.config)
    expect(names).toHaveLength(2 * 4 * gptTiny.layers)
    const probes = finiteDifferences(def, params, batch, grads, names)
    const bad = mismatches(probes, grads)
    expect(bad, `adapter gradient mismatch:\n${bad.join("\n")}`).toEqual([])
    // able to fail: a gradient 25% too large is caught on every adapter's largest coordinate
    const wrong = mismatches(probes, new Map([...grads].map(([n, g]) => [n, g.map((x) => x * 1.25)])))
    for (const n of names) expect(wrong.some((m) => m.startsWith(`${n} coord`) && m.includes("largest")), n).toBe(true)
  })

  it("at init (B = 0) lora_A gets a zero gradient and lora_B a non-zero one", () => {
    const def = makeGpt(withLora(attn))
    const { grads } = lossAndGrads(def, def.init(0), tokens(gptTiny.vocabSize, 2, 5, 3))
    for (const n of loraParamNames(def.config)) {
      const nonzero = grads.get(n)!.some((x) => x !== 0)
      expect(nonzero, n).toBe(n.endsWith(".lora_B"))
    }
  })
})

describe("training the adapters only", () => {
  it("SGD on lora_* lowers the loss on a fixed batch; the base params stay bit-identical", () => {
    // A stand-in for a pretrained base: init plus noise. (On a fresh init the tied head is
    // N(0, 0.02), so adapters below it barely move the logits: the loss stays ≈ ln V.)
    const def = makeGpt(withLora(every))
    const params = def.init(4)
    const noise = new Rng(9)
    for (const [n, v] of params) if (!isLoraParam(n)) for (let i = 0; i < v.length; i++) v[i] += noise.normal() * 0.3
    const base = new Map([...params].filter(([n]) => !isLoraParam(n)).map(([n, v]) => [n, Float32Array.from(v)]))
    const batch = tokens(gptTiny.vocabSize, 4, 8, 6)
    const trainable = new Set(loraTrainable(def.config))
    const losses: number[] = []
    for (let step = 0; step < 15; step++) {
      const { loss, grads } = lossAndGrads(def, params, batch)
      losses.push(loss)
      for (const n of trainable) {
        const v = params.get(n)!
        const g = grads.get(n)!
        for (let i = 0; i < v.length; i++) v[i] -= 0.03 * g[i]
      }
    }
    const final = evalLoss(def, params, batch)
    expect(final, `losses ${losses.map((l) => l.toFixed(4)).join(" ")} → ${final}`).toBeLessThan(losses[0] - 0.3) // seen: 2.955 → 2.149
    for (const [n, v] of base) expect(params.get(n), n).toEqual(v)
  })
})

describe("config, specs, blocks, counts", () => {
  it("errors name the field", () => {
    expect(() => makeGpt(withLora({ ...attn, targets: ["h.*.attn.qkv"] }))).toThrow(/lora\.targets "h\.\*\.attn\.qkv" matches no linear layer/)
    expect(() => makeGpt(withLora({ ...attn, targets: ["h.*.attn.c_attn.weight"] }))).toThrow(/lora\.targets.*without "\.weight"/)
    expect(() => makeGpt(withLora({ ...attn, targets: ["h.*.mlp", "wte", "h.9"] }))).toThrow(/lora\.targets "wte", "h\.9" match no/)
    expect(() => makeGpt(withLora({ ...attn, targets: [] }))).toThrow(/lora\.targets/)
    for (const rank of [0, -1, 1.5, Number.NaN]) expect(() => makeGpt(withLora({ ...attn, rank }))).toThrow(/lora\.rank/)
    for (const alpha of [0, -2, Number.NaN, Number.POSITIVE_INFINITY]) expect(() => makeGpt(withLora({ ...attn, alpha }))).toThrow(/lora\.alpha/)
    expect(makeGpt({ ...gptTiny, lora: undefined }).specs).toEqual(makeGpt(gptTiny).specs)
  })

  it("adapters come after the base specs, per layer A then B, and their h.N block reads them", () => {
    const base = makeGpt(gptTiny)
    const def = makeGpt(withLora({ rank: 2, alpha: 2, targets: ["h.1.mlp.c_proj", "h.0.attn.c_attn", "h.*.mlp.c_fc"] }))
    expect(def.specs.slice(0, base.specs.length)).toEqual(base.specs)
    expect(def.specs.slice(base.specs.length)).toEqual([
      { name: "h.0.attn.c_attn.lora_A", shape: [8, 2] },
      { name: "h.0.attn.c_attn.lora_B", shape: [2, 24] },
      { name: "h.0.mlp.c_fc.lora_A", shape: [8, 2] },
      { name: "h.0.mlp.c_fc.lora_B", shape: [2, 32] },
      { name: "h.1.mlp.c_fc.lora_A", shape: [8, 2] },
      { name: "h.1.mlp.c_fc.lora_B", shape: [2, 32] },
      { name: "h.1.mlp.c_proj.lora_A", shape: [32, 2] },
      { name: "h.1.mlp.c_proj.lora_B", shape: [2, 8] }
    ])
    expect(loraParamNames(def.config)).toEqual(def.specs.slice(base.specs.length).map((s) => s.name))
    const block = (name: string) => def.blocks.find((b) => b.name === name)!.params
    expect(block("h.0").filter(isLoraParam)).toEqual(["h.0.attn.c_attn.lora_A", "h.0.attn.c_attn.lora_B", "h.0.mlp.c_fc.lora_A", "h.0.mlp.c_fc.lora_B"])
    expect(block("h.1").filter(isLoraParam)).toEqual(["h.1.mlp.c_fc.lora_A", "h.1.mlp.c_fc.lora_B", "h.1.mlp.c_proj.lora_A", "h.1.mlp.c_proj.lora_B"])
    expect(block("embed").some(isLoraParam) || block("head").some(isLoraParam)).toBe(false)
    expect(loraParamNames(gptTiny)).toEqual([])
    expect(isLoraParam("h.0.attn.c_attn.weight")).toBe(false)
  })

  it("staged forward with adapters is the model's loss (each stage sees only its params)", () => {
    const def = makeGpt(withLora(every))
    const params = randomAdapters(def, 8, 0.3)
    const batch = tokens(gptTiny.vocabSize, 2, 6, 4)
    const whole = evalLoss(def, params, batch)
    for (let n = 1; n <= def.blocks.length; n++) {
      const got = tf.tidy(() => {
        const p = toTensors(def, params)
        let x: tf.Tensor | undefined
        for (const st of cutStages(def, n)) x = runStage(st, new Map([...p].filter(([k]) => st.params.some((s) => s.name === k))), x, batch)
        return def.objective(x!, batch).dataSync()[0]
      })
      expect(got, `${n} stages`).toBeCloseTo(whole, 6)
    }
  })

  it("trainable adapter params = Σ over targeted layers of r·(in + out)", () => {
    const C = gptTiny.width
    const L = gptTiny.layers
    const baseCount = countParams(makeGpt(gptTiny))
    const cases: Array<[GptConfig["lora"], number]> = [
      [attn, L * 2 * ((C + 3 * C) + (C + C))], // c_attn and attn c_proj: 2·(32 + 16) per block
      [{ rank: 4, alpha: 1, targets: ["h.*.mlp"] }, L * 4 * ((C + 4 * C) + (4 * C + C))],
      [{ rank: 1, alpha: 1, targets: ["h.0"] }, 1 * (4 * C + 2 * C + 5 * C + 5 * C)],
      [{ rank: 2, alpha: 1, targets: ["*"] }, L * 2 * (4 * C + 2 * C + 5 * C + 5 * C)]
    ]
    for (const [lora, want] of cases) {
      const def = makeGpt(withLora(lora))
      const size = new Map(def.specs.map((s) => [s.name, s.shape.reduce((a, b) => a * b, 1)]))
      const trainable = loraTrainable(def.config)
      expect(trainable.reduce((n, t) => n + size.get(t)!, 0), JSON.stringify(lora)).toBe(want)
      const targeted = gptLinears(def.config).filter((l) => trainable.includes(`${l.name}.lora_A`))
      expect(targeted.reduce((n, l) => n + lora!.rank * (l.inDim + l.outDim), 0)).toBe(want)
      expect(countParams(def)).toBe(baseCount + want)
    }
  })
})
