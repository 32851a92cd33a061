// Checks the model zoo's gradients and invariants on the wasm backend: both models'
// analytic gradients against central finite differences (every parameter tensor, a few
// coordinates each plus one random direction), and that the same check rejects a
// deliberately wrong gradient; matMul2d/batchMatMul custom gradients against tfjs'
// autodiff; GPT loss at init ≈ ln V; causality; padding masking; no tensor leaks;
// deterministic init and sampling.
// Run: npx vitest run test/models.grad.test.ts
import * as tf from "@tensorflow/tfjs"
import { beforeAll, describe, expect, it } from "vitest"
import { initBackend } from "../shared/compute/backend.ts"
import { batchMatMul, gelu, layerNorm, matMul2d, sigmoidCrossEntropy, softmaxCrossEntropy } from "../shared/compute/ops.ts"
import { generate, gptLogits, gptMini, gptTiny, makeGpt } from "../shared/models/gpt.ts"
import { lstmLogits, lstmTiny, makeLstmClassifier } from "../shared/models/lstm-classifier.ts"
import type { Batch, ModelDef } from "../shared/models/model.ts"
import { batchOf } from "../shared/models/model.ts"
import { countParams, evalLoss, lossAndGrads, toTensors } from "../shared/models/model.ts"
import { Rng } from "../shared/models/rng.ts"
import { finiteDifferences, mismatches } from "./support/gradcheck.ts"

beforeAll(async () => {
  expect((await initBackend("wasm")).name).toBe("wasm")
})

// ---------------------------------------------------------------------------------
// Finite-difference gradient check (the probes and tolerances: test/support/gradcheck.ts).

/** Params from init, then perturbed so gains/biases are not 1/0 and gradients are O(0.1). */
const perturbed = (def: ModelDef, seed: number, noise: number): Map<string, Float32Array> => {
  const rng = new Rng(seed + 1000)
  const params = def.init(seed)
  for (const v of params.values()) for (let i = 0; i < v.length; i++) v[i] += rng.normal() * noise
  return params
}



const scaled = (grads: ReadonlyMap<string, Float32Array>, k: number) =>
  new Map([...grads].map(([n, g]) => [n, g.map((v) => v * k)]))

const gradCheck = (def: ModelDef, batch: Batch) => {
  const params = perturbed(def, 1, 0.3)
  const { grads } = lossAndGrads(def, params, batch)
  const probes = finiteDifferences(def, params, batch, grads)
  const bad = mismatches(probes, grads)
  expect(bad, `gradient mismatch (a backward op or custom gradient is wrong):\n${bad.join("\n")}`).toEqual([])
  // Able to fail: a gradient 25% too large is caught on every tensor's largest coordinate.
  const wrong = mismatches(probes, scaled(grads, 1.25))
  for (const spec of def.specs) {
    expect(wrong.some((m) => m.startsWith(`${spec.name} coord`) && m.includes("largest")), spec.name).toBe(true)
  }
  // ... and so is a gradient of the wrong sign.
  expect(mismatches(probes, scaled(grads, -1)).length).toBeGreaterThanOrEqual(def.specs.length)
}

const gptBatch = (V: number, B: number, T: number, seed: number): Batch => {
  const rng = new Rng(seed)
  return batchOf(B, { tokens: Int32Array.from({ length: B * (T + 1) }, () => rng.int(V)) })
}

const lstmBatch = (): Batch => {
  // Row 0 pre-padded, row 1 post-padded, row 2 full; L = 6.
  const tokens = Int32Array.from([0, 0, 3, 7, 1, 9, 4, 2, 8, 0, 0, 0, 5, 10, 6, 2, 2, 1])
  return batchOf(3, { tokens, labels: Float32Array.from([1, 0, 1]) })
}

describe("gradients vs finite differences", () => {
  it("gpt (tiny): every parameter tensor", () => {
    gradCheck(makeGpt(gptTiny), gptBatch(gptTiny.vocabSize, 2, 5, 9))
  })

  it("lstm-classifier (tiny): every parameter tensor", () => {
    gradCheck(makeLstmClassifier(lstmTiny), lstmBatch())
  })
})

describe("ops", () => {
  const rng = new Rng(4)
  const rand = (shape: number[]) => tf.tensor(Float32Array.from({ length: shape.reduce((a, b) => a * b) }, () => rng.normal()), shape)

  it("matMul2d and batchMatMul gradients equal tf.matMul's autodiff", () => {
    const cases: Array<[number[], number[], (a: tf.Tensor, b: tf.Tensor) => tf.Tensor]> = [
      [[7, 5], [5, 3], (a, b) => matMul2d(a as tf.Tensor2D, b as tf.Tensor2D)],
      [[4, 6, 5], [4, 5, 3], (a, b) => batchMatMul(a as tf.Tensor3D, b as tf.Tensor3D)]
    ]
    for (const [sa, sb, op] of cases) {
      tf.tidy(() => {
        const a = rand(sa)
        const b = rand(sb)
        const w = rand([...sa.slice(0, -1), sb[sb.length - 1]]) // weights so dY is not all ones
        const ours = tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(op(x, y), w)))([a, b])
        const stock = tf.grads((x: tf.Tensor, y: tf.Tensor) => tf.sum(tf.mul(tf.matMul(x, y), w)))([a, b])
        for (let i = 0; i < 2; i++) {
          expect(ours[i].shape).toEqual(stock[i].shape)
          const diff = tf.max(tf.abs(tf.sub(ours[i], stock[i]))).dataSync()[0]
          expect(diff).toBeLessThan(1e-5)
        }
        expect(tf.max(tf.abs(tf.sub(op(a, b), tf.matMul(a, b)))).dataSync()[0]).toBeLessThan(1e-5)
      })
    }
  })

  it("gelu is GPT-2's tanh approximation; layerNorm normalises the last axis", () => {
    const xs = Array.from({ length: 41 }, (_, i) => -8 + i * 0.4)
    const want = xs.map((x) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3))))
    const got = tf.tidy(() => Array.from(gelu(tf.tensor1d(xs)).dataSync()))
    got.forEach((g, i) => expect(g).toBeCloseTo(want[i], 5))
    const rows = tf.tidy(() => layerNorm(tf.tensor2d([[1, 2, 3, 6], [-1, 0, 0, 5]]), tf.tensor1d([1, 1, 2, 2]), tf.tensor1d([0, 0, 0, 1])).arraySync())
    const inputs: number[][] = [[1, 2, 3, 6], [-1, 0, 0, 5]]
    inputs.forEach((src, i) => {
      const r = rows[i]
      const mean = src.reduce((a, b) => a + b) / 4
      const sd = Math.sqrt(src.reduce((a, b) => a + (b - mean) ** 2, 0) / 4 + 1e-5)
      const ref = src.map((v, j) => ((v - mean) / sd) * [1, 1, 2, 2][j] + [0, 0, 0, 1][j])
      r.forEach((v, j) => expect(v).toBeCloseTo(ref[j], 5))
    })
  })

  it("cross-entropies match the naive formulas and stay finite for huge logits", () => {
    tf.tidy(() => {
      const z = tf.tensor2d([[1, 2, 3], [-1, 0, 5]])
      const t = tf.tensor1d([2, 0], "int32")
      const naive = -(Math.log(Math.exp(3) / (Math.exp(1) + Math.exp(2) + Math.exp(3))) + Math.log(Math.exp(-1) / (Math.exp(-1) + 1 + Math.exp(5)))) / 2
      expect(softmaxCrossEntropy(z, t).dataSync()[0]).toBeCloseTo(naive, 5)
      expect(Number.isFinite(softmaxCrossEntropy(tf.tensor2d([[1000, -1000, 0]]), tf.tensor1d([1], "int32")).dataSync()[0])).toBe(true)
      const s = (v: number) => 1 / (1 + Math.exp(-v))
      const bce = -(Math.log(s(0.5)) + Math.log(1 - s(-2))) / 2
      expect(sigmoidCrossEntropy(tf.tensor1d([0.5, -2]), tf.tensor1d([1, 0])).dataSync()[0]).toBeCloseTo(bce, 5)
      expect(sigmoidCrossEntropy(tf.tensor1d([200, -200]), tf.tensor1d([0, 1])).dataSync()[0]).toBeCloseTo(200, 3)
    })
  })
})

describe("gpt", () => {
  it("loss at init is ≈ ln V (tiny and mini)", () => {
    for (const [cfg, B, T] of [[gptTiny, 2, 8], [gptMini, 2, 16]] as const) {
      const def = makeGpt(cfg)
      const loss = evalLoss(def, def.init(0), gptBatch(cfg.vocabSize, B, T, 1))
      expect(Math.abs(loss - Math.log(cfg.vocabSize)), `loss ${loss} vs ln V ${Math.log(cfg.vocabSize)}`).toBeLessThan(0.05)
    }
  })

  it("gpt-mini has the reference shape (tied head: 842,496 params)", () => {
    expect(countParams(makeGpt(gptMini))).toBe(842_496)
  })

  it("is causal: changing token t changes logits at t but none before", () => {
    const def = makeGpt(gptTiny)
    const params = perturbed(def, 2, 0.3)
    const T = 7
    const V = gptTiny.vocabSize
    const a = (gptBatch(V, 1, T, 5).tensors.get("tokens") as Int32Array).slice(0, T)
    const t0 = 4
    const b = a.slice()
    b[t0] = (a[t0] + 1) % V
    const [la, lb] = tf.tidy(() => {
      const p = toTensors(def, params)
      return [a, b].map((x) => gptLogits(def.config, p, tf.tensor2d(x, [1, T], "int32")).arraySync())
    })
    for (let t = 0; t < t0; t++) for (let v = 0; v < V; v++) expect(lb[t][v]).toBeCloseTo(la[t][v], 5)
    const moved = (t: number) => Math.max(...la[t].map((x, v) => Math.abs(x - lb[t][v])))
    expect(moved(t0)).toBeGreaterThan(1e-3)
    expect(moved(T - 1)).toBeGreaterThan(1e-3) // later positions see it
  })

  it("init and generate are deterministic in their seeds", () => {
    const def = makeGpt(gptTiny)
    expect(def.init(3).get("wte")).toEqual(def.init(3).get("wte"))
    expect(def.init(3).get("wte")).not.toEqual(def.init(4).get("wte"))
    const params = perturbed(def, 3, 0.5)
    const prompt = Int32Array.from([1, 2, 3])
    const opts = { temperature: 1, topK: 5, seed: 7 }
    const g1 = generate(def, params, prompt, 12, opts) // longer than contextLength: crops
    expect(g1.length).toBe(12)
    expect(generate(def, params, prompt, 12, opts)).toEqual(g1)
    for (const v of g1) expect(v >= 0 && v < gptTiny.vocabSize).toBe(true)
    const greedy = generate(def, params, prompt, 4, { temperature: 0, seed: 1 })
    expect(generate(def, params, prompt, 4, { temperature: 0, seed: 99 })).toEqual(greedy)
  })

  it("rejects a malformed batch and a sequence longer than the context", () => {
    const def = makeGpt(gptTiny)
    const params = def.init(0)
    expect(() => evalLoss(def, params, batchOf(2, { tokens: new Int32Array(5) }))).toThrow(/tokens.*5 values.*multiple of 2/)
    expect(() => evalLoss(def, params, batchOf(2, { tokens: new Float32Array(6) }))).toThrow(/tokens.*must be int32/)
    expect(() => evalLoss(def, params, batchOf(2, { tokens: new Int32Array(6), mask: new Float32Array(2) }))).toThrow(/unexpected tensor "mask"/)
    expect(() => evalLoss(def, params, gptBatch(13, 1, 9, 0))).toThrow(/exceeds contextLength/)
    expect(() => makeGpt({ width: 10, heads: 4 })).toThrow(/divisible/)
  })
})

describe("lstm-classifier", () => {
  it("padding steps leave the state unchanged (pre-padding = no padding)", () => {
    const def = makeLstmClassifier(lstmTiny)
    const params = perturbed(def, 4, 0.3)
    const [padded, plain] = tf.tidy(() => {
      const p = toTensors(def, params)
      return [
        lstmLogits(def.config, p, tf.tensor2d([[0, 0, 0, 3, 7, 1]], [1, 6], "int32")).dataSync()[0],
        lstmLogits(def.config, p, tf.tensor2d([[3, 7, 1]], [1, 3], "int32")).dataSync()[0]
      ]
    })
    expect(padded).toBeCloseTo(plain, 5)
  })
})

describe("no tensor leaks", () => {
  it("lossAndGrads, evalLoss and generate dispose everything", () => {
    const gpt = makeGpt(gptTiny)
    const gp = gpt.init(0)
    const gb = gptBatch(gptTiny.vocabSize, 2, 5, 1)
    const lstm = makeLstmClassifier(lstmTiny)
    const lp = lstm.init(0)
    const lb = lstmBatch()
    const run = () => {
      lossAndGrads(gpt, gp, gb)
      evalLoss(gpt, gp, gb)
      generate(gpt, gp, Int32Array.from([1]), 3, { temperature: 1, seed: 1 })
      lossAndGrads(lstm, lp, lb)
      evalLoss(lstm, lp, lb)
    }
    run() // warm-up: backends may keep one-off state
    const before = tf.memory().numTensors
    run()
    expect(tf.memory().numTensors).toBe(before)
  })

  it("lossAndGrads returns a gradient for every spec with the spec's size", () => {
    const def = makeLstmClassifier(lstmTiny)
    const { loss, grads } = lossAndGrads(def, def.init(0), lstmBatch())
    expect(Number.isFinite(loss)).toBe(true)
    expect([...grads.keys()]).toEqual(def.specs.map((s) => s.name))
    for (const s of def.specs) expect(grads.get(s.name)!.length).toBe(s.shape.reduce((a, b) => a * b, 1))
  })
})
