// Checks: the pipeline's pieces, in process. (1) The maths of shared/models/pipeline.ts:
// stage forwards and backwards over M micro-batches, summed and divided by the step's rows,
// with the last stage's part of the tied `wte` added on stage 0, give the gradient of the
// whole batch (GPT in 2, 3 and 4 stages, the LSTM classifier in 2 and 3) — the loss is
// scaled in one place. (2) The cut: partitions by layer counts, block counts, params and
// FLOPs; stage k's tensors on its own shards; bad cuts refused. (3) The stage reducer
// (actors/worker/stage-core.ts, stage-run.ts), driven with instant fake compute and in-order delivery:
// 1F1B's op order and its stash bound (at most S−k inputs per stage), GPipe's fill then
// drain (M stashed), one push per stage and step; a lost activation gradient makes stage 0
// run the step again as a new attempt, and the other stages drop the old one. (4) Job
// validation: M < S and the other unsupported pipeline topologies are refused clearly.
import { beforeAll, describe, expect, it } from "vitest"
import { initBackend } from "../shared/compute/backend.ts"
import { resolveJob } from "../shared/config/job.ts"
import { gptTiny, makeGpt } from "../shared/models/gpt.ts"
import { lstmTiny, makeLstmClassifier } from "../shared/models/lstm-classifier.ts"
import { batchOf, concatBatches, cutStages, lossAndGrads, type Batch, type ModelDef } from "../shared/models/model.ts"
import { ownerStage, partitionOf, shardOfForJob, stageBackward, stageForward, stageShards, stagesForJob, type Activation } from "../shared/models/pipeline.ts"
import { modelForJob } from "../shared/models/zoo.ts"
import { Rng } from "../shared/models/rng.ts"
import { initialStage, step, type StageConfig, type StageEffect, type StageEvent, type StageState } from "../actors/worker/stage-core.ts"
import { stashLimit, type LeasedBatch } from "../actors/worker/stage-run.ts"
import type { BatchLeased } from "../shared/protocol/messages.ts"
import { relErr } from "./support/replay.ts"

beforeAll(async () => {
  await initBackend("cpu")
})

/** The pipeline's gradient of `micros`, computed stage by stage as the stage workers do. */
const pipelined = (def: ModelDef, params: Map<string, Float32Array>, micros: Batch[], n: number) => {
  const stages = cutStages(def, n)
  const owner = ownerStage(stages)
  const all = new Set(def.specs.map((s) => s.name))
  const acc = new Map<string, Float64Array>()
  let lossSum = 0
  for (const mb of micros) {
    const xs: (Activation | undefined)[] = [undefined]
    for (let k = 0; k < n - 1; k++) xs.push(stageForward(stages[k], params, xs[k], mb))
    let dy: Activation | undefined
    for (let k = n - 1; k >= 0; k--) {
      const g = stageBackward(def, stages[k], params, xs[k], mb, dy, all)
      if (g.loss !== undefined) lossSum += g.loss * mb.size
      for (const [name, v] of g.grads) {
        const a = acc.get(name) ?? new Float64Array(v.length)
        for (let i = 0; i < v.length; i++) a[i] += v[i]
        acc.set(name, a)
      }
      dy = g.dx
    }
  }
  const rows = micros.reduce((r, b) => r + b.size, 0)
  void owner
  return { loss: lossSum / rows, grads: new Map([...acc].map(([k, a]) => [k, Float32Array.from(a, (x) => x / rows)])) }
}

describe("pipeline maths", () => {
  const rng = new Rng(9)
  const gpt = makeGpt({ ...gptTiny, layers: 3 })
  const gptBatch = () => batchOf(2, { tokens: Int32Array.from({ length: 2 * 7 }, () => rng.int(gptTiny.vocabSize)) })
  const lstm = makeLstmClassifier(lstmTiny)
  const lstmBatch = () => batchOf(3, { tokens: Int32Array.from({ length: 3 * lstmTiny.maxLen }, () => rng.int(lstmTiny.vocabSize)), labels: Float32Array.from([1, 0, 1]) })

  for (const [def, make, cuts] of [[gpt, gptBatch, [2, 3, 4]], [lstm, lstmBatch, [2, 3]]] as const) {
    it(`${def.kind}: summed stage gradients over micro-batches ÷ rows = the whole batch's gradient (stages ${cuts.join(", ")})`, () => {
      const params = def.init(4)
      const micros = [make(), make(), make()]
      const ref = lossAndGrads(def, params, concatBatches(micros))
      for (const n of cuts) {
        const p = pipelined(def, params, micros, n)
        expect(Math.abs(p.loss - ref.loss) / ref.loss, `${n} stages: loss`).toBeLessThan(1e-5)
        for (const s of def.specs) expect(relErr(p.grads.get(s.name)!, ref.grads.get(s.name)!), `${n} stages: ${s.name}`).toBeLessThan(1e-5)
      }
    })
  }

  it("the tied embedding's gradient needs both stages' parts", () => {
    const params = gpt.init(4)
    const micros = [gptBatch()]
    const ref = lossAndGrads(gpt, params, concatBatches(micros))
    const [s0, s1] = cutStages(gpt, 2)
    const x = stageForward(s0, params, undefined, micros[0])
    const last = stageBackward(gpt, s1, params, x, micros[0], undefined, new Set(["wte"]))
    const first = stageBackward(gpt, s0, params, undefined, micros[0], last.dx, new Set(["wte"]))
    const sum = Float32Array.from(first.grads.get("wte")!, (v, i) => (v + last.grads.get("wte")![i]) / micros[0].size)
    expect(relErr(sum, ref.grads.get("wte")!)).toBeLessThan(1e-5)
    // either part alone is far off
    expect(relErr(Float32Array.from(first.grads.get("wte")!, (v) => v / 2), ref.grads.get("wte")!)).toBeGreaterThan(1e-2)
  })
})

describe("pipeline cut and shards", () => {
  const job = (topology: Record<string, unknown>, model: Record<string, unknown> = { kind: "gpt", vocabSize: 64, contextLength: 8, layers: 4, heads: 2, width: 16 }) =>
    resolveJob({ job: "cut", model, topology }, "test")

  it("layer counts, block counts, params and FLOPs", () => {
    const j = job({ stages: 2, partition: [3, 1] })
    const m = modelForJob(j)
    expect(partitionOf(j, m)).toEqual({ blocks: [4, 2] }) // embed + 3 layers | 1 layer + head
    expect(stagesForJob(j, m).map((s) => s.blocks.map((b) => b.name))).toEqual([["embed", "h.0", "h.1", "h.2"], ["h.3", "head"]])
    const blocks = job({ stages: 3, partition: [2, 2, 2] })
    expect(stagesForJob(blocks, modelForJob(blocks)).map((s) => s.blocks.length)).toEqual([2, 2, 2])
    // FLOPs (the default): the head's matmul over the vocabulary is work, the embedding lookup is not
    const f = job({ stages: 2 }, { kind: "gpt", vocabSize: 4096, contextLength: 8, layers: 4, heads: 2, width: 16 })
    const byFlops = stagesForJob(f, modelForJob(f)).map((s) => s.blocks.map((b) => b.name))
    const byParams = stagesForJob({ ...f, topology: { ...f.topology, partition: "params" } }, modelForJob(f)).map((s) => s.blocks.map((b) => b.name))
    expect(byFlops[1]).toEqual(["head"])
    expect(byParams[1].length).toBeGreaterThan(1) // by params the embedding weighs as much as the head
    expect(() => partitionOf(job({ stages: 2, partition: [2, 1] }), m)).toThrow(/sums to 3: give the 4 layers or all 6 blocks/)
    expect(() => cutStages(m, 2, { blocks: [6, 0] })).toThrow(/at least one of the 6 blocks/)
  })

  it("stage k's tensors live on its own shards; the tied embedding on stage 0's; the last stage reads it from there", () => {
    const j = job({ stages: 2, psShards: 4 })
    const m = modelForJob(j)
    const shardOf = shardOfForJob(j, m)
    const stages = stagesForJob(j, m)
    const owner = ownerStage(stages)
    for (const s of m.specs) expect(Math.floor(shardOf.get(s.name)! / 2), s.name).toBe(owner.get(s.name))
    expect(owner.get("wte")).toBe(0)
    expect(new Set([...shardOf.values()])).toEqual(new Set([0, 1, 2, 3]))
    expect(stageShards(j, m, 1).owns).toEqual([2, 3])
    expect(stageShards(j, m, 1).reads).toContain(shardOf.get("wte"))
  })
})

// ---------------------------------------------------------------- the reducer, simulated

interface Sim {
  readonly states: StageState[]
  readonly ops: string[][]
  readonly pushes: { stage: number; shard: number; stepId: string; version: number }[]
  readonly logs: string[]
  stashMax: number[]
}

/** S reducers wired as the shells wire them, compute instant, messages delivered in order; `drop` loses matching messages. */
const simulate = (S: number, M: number, schedule: "1f1b" | "gpipe", batches: number, o: { drop?: (to: number, e: StageEvent) => boolean; until?: (sim: Sim) => boolean; clock?: { now: number }; failFetches?: number; ack?: "held" | "applied" } = {}) => {
  let fetchFailures = o.failFetches ?? 0
  const clock = o.clock ?? { now: 0 }
  const cfg = (k: number): StageConfig => ({
    id: k === 0 ? "r0" : `r0-s${k}`, replica: "r0", job: "sim", stage: k, stages: S, micros: M, schedule, reads: [k],
    pushes: new Map([[k, [{ name: `p${k}`, shape: [1] }]]]), tied: [], steps: 100, ackTimeoutMs: 1e9, watchdogMs: 1e9, stepTimeoutMs: 5_000
  })
  const sim: Sim = { states: Array.from({ length: S }, (_, k) => initialStage(cfg(k), 0)), ops: Array.from({ length: S }, () => []), pushes: [], logs: [], stashMax: new Array(S).fill(0) }
  const queue: { to: number; e: StageEvent }[] = []
  let leased = 0
  const lease = (): LeasedBatch | undefined => {
    if (leased >= batches) return undefined
    const i = leased++
    const meta = { _tag: "BatchLeased", v: 1, batchId: `e0-b${i}`, epoch: 0, index: i, split: "train", B: 1, T: 1, attempt: 1, leaseMs: 1e9, gen: 1, epochBatches: 1000 } as BatchLeased
    return { meta, data: batchOf(1, { tokens: Int32Array.from([i, i]) }), micro: { batchId: meta.batchId, rows: 1, length: 1, units: 1, gen: 1, epochBatches: 1000 } }
  }
  const x: Activation = { data: new Float32Array(4), shape: [1, 4] }
  const perform = (k: number, fx: StageEffect) => {
    const st = sim.states[k]
    const send = (to: number, e: StageEvent) => {
      if (!o.drop?.(to, e)) queue.push({ to, e })
    }
    switch (fx._tag) {
      case "Lease": {
        const b = lease()
        send(k, b ? { _tag: "LeaseReplied", batch: b } : { _tag: "LeaseReplied", noBatch: { retryAfterMs: 1e9 } })
        break
      }
      case "Fetch":
        if (fetchFailures-- > 0) send(k, { _tag: "LabelsReplied", key: fx.key, micro: fx.micro, failed: "no responders on data.fetch" })
        else send(k, { _tag: "LabelsReplied", key: fx.key, micro: fx.micro, batch: batchOf(1, { tokens: Int32Array.from([0, 0]) }) })
        break
      case "Forward": {
        sim.ops[k].push(`F${fx.op.micro}`)
        const { version, attempt, stepId, micro, micros, meta } = fx.op
        send(k + 1, { _tag: "ActivationReceived", version, attempt, stepId, micro, micros, meta, x })
        run(k, { _tag: "ForwardDone", key: fx.op.key, micro, ms: 1 })
        const r = st.run
        if (r) sim.stashMax[k] = Math.max(sim.stashMax[k], [...r.forwarded].filter((m) => !r.done.has(m)).length)
        break
      }
      case "Backward": {
        sim.ops[k].push(`B${fx.op.micro}`)
        const { version, attempt, stepId, micro } = fx.op
        if (k > 0) send(k - 1, { _tag: "GradientReceived", version, attempt, stepId, micro, dy: x, loss: 2 })
        run(k, { _tag: "BackwardDone", key: fx.op.key, micro, ms: 1, grads: new Map([[`p${k}`, Float32Array.of(1)]]), loss: k === S - 1 ? 2 : undefined })
        break
      }
      case "Push":
        sim.pushes.push({ stage: k, shard: fx.shard, stepId: fx.bundle.meta.batchId!, version: fx.bundle.meta.version })
        if (o.ack) send(k, { _tag: "PushAcked", ack: { _tag: "PushAck", v: 1, shard: fx.shard, incarnation: 1, sender: "r0", batchId: fx.bundle.meta.batchId!, version: fx.bundle.meta.version, status: o.ack } })
        break
      case "Log":
        sim.logs.push(`${k}: ${fx.message}`)
        break
      default:
        break
    }
  }
  const run = (k: number, e: StageEvent) => {
    sim.states[k].now = clock.now
    for (const fx of step(sim.states[k], e)) perform(k, fx)
  }
  for (let k = 0; k < S; k++) run(k, { _tag: "ParamsReceived", shard: k, incarnation: 1, version: 0, params: new Map(), source: "pull" })
  for (let guard = 0; guard < 10_000 && !(o.until?.(sim) ?? false); guard++) {
    const next = queue.shift()
    if (!next) {
      // nothing in flight: time passes (the retry timer)
      clock.now += 1_000
      for (let k = 0; k < S; k++) run(k, { _tag: "Tick", now: clock.now })
      if (queue.length === 0 && clock.now > 60_000) break
      continue
    }
    run(next.to, next.e)
  }
  return sim
}

describe("stage reducer", () => {
  it("1F1B at S=2, M=4: stage 0 runs F0 F1 B0 F2 B1 F3 B2 B3 and stashes at most S−k", () => {
    const sim = simulate(2, 4, "1f1b", 4, { until: (s) => s.pushes.length >= 2 })
    expect(sim.ops[0]).toEqual(["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"])
    expect(sim.ops[1]).toEqual(["B0", "B1", "B2", "B3"]) // the last stage: forward and backward in one op
    expect(sim.stashMax[0]).toBe(2)
    expect(sim.pushes.map((p) => [p.stage, p.shard, p.stepId])).toEqual([[1, 1, "e0-b0+e0-b1+e0-b2+e0-b3"], [0, 0, "e0-b0+e0-b1+e0-b2+e0-b3"]])
  })

  it("1F1B at S=4, M=8: every stage k holds at most S−k inputs; GPipe fills then drains, holding M", () => {
    const one = simulate(4, 8, "1f1b", 8, { until: (s) => s.pushes.length >= 4 })
    expect(one.stashMax).toEqual([4, 3, 2, 0])
    for (let k = 0; k < 3; k++) expect(one.stashMax[k]).toBeLessThanOrEqual(stashLimit({ schedule: "1f1b", stage: k, stages: 4, micros: 8 }))
    const g = simulate(4, 8, "gpipe", 8, { until: (s) => s.pushes.length >= 4 })
    expect(g.ops[0]).toEqual(["F0", "F1", "F2", "F3", "F4", "F5", "F6", "F7", "B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7"])
    expect(g.stashMax.slice(0, 3)).toEqual([8, 8, 8])
    expect(g.pushes).toHaveLength(4)
  })

  it("a lost activation gradient: stage 0 runs the step again as attempt 1; each stage pushes that step once more (idempotent at the shards)", () => {
    let dropped = 0
    const sim = simulate(2, 2, "1f1b", 2, {
      drop: (to, e) => to === 0 && e._tag === "GradientReceived" && e.attempt === 0 && e.micro === 1 && ++dropped === 1,
      until: (s) => s.pushes.filter((p) => p.stage === 0).length >= 1
    })
    expect(dropped).toBe(1)
    expect(sim.logs.some((l) => l.startsWith("0: step v0 attempt 0: no progress"))).toBe(true)
    expect(sim.ops[0]).toEqual(["F0", "F1", "B0", "F0", "F1", "B0", "B1"])
    // stage 1 finished attempt 0 (pushed), then ran attempt 1 again: same step id, so the shard admits it once
    const p1 = sim.pushes.filter((p) => p.stage === 1)
    expect(p1.map((p) => p.stepId)).toEqual(["e0-b0+e0-b1", "e0-b0+e0-b1"])
    expect(sim.pushes.filter((p) => p.stage === 0)).toHaveLength(1)
  })
})

describe("stage reducer: pushes", () => {
  it("held: stage 0 waits for the next version; applied already (a re-issued copy): it runs a new step on the same params", () => {
    const held = simulate(2, 2, "1f1b", 4, { ack: "held" })
    expect(held.pushes.filter((p) => p.stage === 0).map((p) => p.stepId)).toEqual(["e0-b0+e0-b1"])
    const applied = simulate(2, 2, "1f1b", 4, { ack: "applied", until: (s) => s.pushes.filter((p) => p.stage === 0).length >= 2 })
    expect(applied.pushes.filter((p) => p.stage === 0).map((p) => [p.stepId, p.version])).toEqual([["e0-b0+e0-b1", 0], ["e0-b2+e0-b3", 0]])
  })
})

describe("stage reducer: the last stage's targets", () => {
  it("a fetch that failed is asked for again on the next Tick; the step completes without a retry", () => {
    const sim = simulate(2, 2, "1f1b", 2, { failFetches: 1, until: (s) => s.pushes.length >= 2 })
    expect(sim.pushes.map((p) => p.stage).sort()).toEqual([0, 1])
    expect(sim.logs.some((l) => /labels of e0-b0: no responders/.test(l))).toBe(true)
    expect(sim.logs.some((l) => /running it again/.test(l))).toBe(false)
  })
})

describe("pipeline job validation", () => {
  const bad = (topology: Record<string, unknown>, train: Record<string, unknown> = {}) => () => resolveJob({ job: "v", topology, train }, "job.yaml")
  it("refuses what a pipeline cannot run, saying why", () => {
    expect(bad({ stages: 4, microBatches: 2 })).toThrow(/microBatches \(2\) must be at least stages \(4\)/)
    expect(bad({ stages: 2, psShards: 3 })).toThrow(/psShards \(3\) must be a multiple of stages \(2\)/)
    expect(bad({ stages: 2 }, { consistency: { mode: "async" } })).toThrow(/updates synchronously/)
    expect(bad({ stages: 2 }, { accumulate: 2 })).toThrow(/train.accumulate must be 1/)
    expect(bad({ stages: 2, partition: [1, 1, 1] })).toThrow(/names 3 stages/)
  })
  it("defaults: a shard per stage and max(4, S) micro-batches", () => {
    const j = resolveJob({ job: "v", topology: { stages: 2 } }, "t")
    expect(j.topology).toMatchObject({ stages: 2, psShards: 2, microBatches: 4, schedule: "1f1b", partition: "flops" })
    expect(resolveJob({ job: "v", topology: { stages: 6, workers: 2 } }, "t").topology).toMatchObject({ psShards: 6, microBatches: 6 })
  })
})
