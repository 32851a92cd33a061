// Checks: the model contract's stages (shared/models/model.ts cutStages / runStage): a
// model cut into n consecutive stages computes exactly its loss when the stages run one
// after another (GPT and LSTM classifier); every param belongs to a stage; the GPT's head,
// tied to its token embedding, is the one param two stages share; cuts are balanced and
// bad cuts are refused. And the batch spec: a batch that does not fit is refused by name.
import * as tf from "@tensorflow/tfjs"
import { beforeAll, describe, expect, it } from "vitest"
import { initBackend } from "../shared/compute/backend.ts"
import { gptTiny, makeGpt } from "../shared/models/gpt.ts"
import { lstmTiny, makeLstmClassifier } from "../shared/models/lstm-classifier.ts"
import { batchOf, batchProblem, cutStages, evalLoss, runStage, toTensors, type Batch, type ModelDef } from "../shared/models/model.ts"
import { Rng } from "../shared/models/rng.ts"

beforeAll(async () => {
  await initBackend("cpu")
})

const staged = (def: ModelDef, params: Map<string, Float32Array>, batch: Batch, n: number): number =>
  tf.tidy(() => {
    const p = toTensors(def, params)
    let x: tf.Tensor | undefined
    for (const st of cutStages(def, n)) {
      // each stage sees only its own params
      const own = new Map([...p].filter(([k]) => st.params.some((s) => s.name === k)))
      x = runStage(st, own, x, batch)
    }
    return def.objective(x!, batch).dataSync()[0]
  })

const rng = new Rng(3)
const gpt = makeGpt(gptTiny)
const gptB = batchOf(2, { tokens: Int32Array.from({ length: 2 * 7 }, () => rng.int(gptTiny.vocabSize)) })
const lstm = makeLstmClassifier(lstmTiny)
const lstmB = batchOf(3, { tokens: Int32Array.from([0, 0, 3, 7, 1, 9, 4, 2, 8, 0, 0, 0, 5, 10, 6, 2, 2, 1]), labels: Float32Array.from([1, 0, 1]) })

describe("stages", () => {
  it("running the stages one after another is the model's loss, for every cut", () => {
    for (const [def, batch] of [[gpt, gptB], [lstm, lstmB]] as const) {
      const params = def.init(5)
      const whole = evalLoss(def, params, batch)
      for (let n = 1; n <= def.blocks.length; n++) expect(staged(def, params, batch, n), `${def.kind} in ${n} stages`).toBeCloseTo(whole, 6)
    }
  })

  it("every param is in a stage; only the GPT's tied embedding is shared; cuts balance params", () => {
    for (const def of [gpt, lstm]) {
      for (let n = 1; n <= def.blocks.length; n++) {
        const st = cutStages(def, n)
        expect(st).toHaveLength(n)
        expect(st.at(-1)!.last).toBe(true)
        const names = new Set(st.flatMap((s) => s.params.map((p) => p.name)))
        expect([...names].sort()).toEqual(def.specs.map((s) => s.name).sort())
      }
    }
    const [a, b] = cutStages(gpt, 2)
    expect(a.shared).toEqual(["wte"])
    expect(b.shared).toEqual(["wte"])
    expect(a.blocks[0].name).toBe("embed")
    expect(b.blocks.at(-1)!.name).toBe("head")
    expect(cutStages(lstm, 2).map((s) => s.blocks.map((x) => x.name))).toEqual([["lstm"], ["dense", "out"]])
    expect(() => cutStages(lstm, 4)).toThrow(/cannot cut 3 blocks \(lstm, dense, out\) into 4 stages/)
    expect(() => cutStages(lstm, 0)).toThrow(/cannot cut/)
  })
})

describe("batch spec", () => {
  it("names what does not fit: a missing tensor, a wrong dtype, a wrong length, an extra tensor", () => {
    expect(batchProblem(lstm, lstmB)).toBeUndefined()
    expect(batchProblem(lstm, batchOf(3, { tokens: lstmB.tensors.get("tokens")! }))).toMatch(/"labels" is missing/)
    expect(batchProblem(lstm, batchOf(3, { tokens: new Float32Array(18), labels: new Float32Array(3) }))).toMatch(/"tokens" must be int32/)
    expect(batchProblem(lstm, batchOf(3, { tokens: new Int32Array(17), labels: new Float32Array(3) }))).toMatch(/"tokens" has 17 values, shape \[3,6\] needs 18/)
    expect(batchProblem(lstm, batchOf(3, { tokens: new Int32Array(18), labels: new Float32Array(3), mask: new Float32Array(3) }))).toMatch(/unexpected tensor "mask"/)
    expect(batchProblem(gpt, batchOf(2, { tokens: new Int32Array(0) }))).toMatch(/positive multiple of 2/)
  })
})
