// Checks: post-training quantization (actors/quantizer/) on models trained here in-process:
// a tiny GPT (2 layers, width 32, 150 Adam steps on Moby Dick) and a tiny LSTM classifier
// (width 32, a synthetic labelled corpus with 10% label noise, 150 steps). Width 32, since
// int8's per-channel float32 scale costs 4 bytes a channel: 4·32 / (32 + 4) = 3.56×.
//   - the quantized forward with nothing quantized is the models' own forward (1e-5): it is
//     their maths, so a quantized loss differs only by what quantization does;
//   - per mode, the loss of the quantized model (read back from its file) is within a bound
//     of fp32: |Δ|/loss ≤ 1% for int8, ≤ 5% for int4 (measured: ~1e-4 and ~3e-3 on the GPT);
//     the classifier's accuracy within 2 (int8) / 5 (int4) points; the quantized weights are
//     ≥ 3.5× (int8) and ≥ 6× (int4) smaller than float32;
//   - a broken quantizer fails those bounds: scales off by 2×, int4 nibbles swapped, static
//     activation ranges 8× too small;
//   - the file round-trips (re-encoding gives the same bytes); a flipped payload or header
//     byte, a truncated file, a wrong magic and a checkpoint given as a model are refused;
//   - the CLI: `quantize --json` prints exactly one JSON object; `generate` samples from the
//     quantized file; `classify` labels texts from a quantized classifier;
//   - the service: a request over the in-process bus is answered with the report; a bad one
//     with QuantizeFailed and its reason.
// Run: npx vitest run test/ptq.test.ts   (~20-30 s on 2 cores)
import { spawnSync } from "node:child_process"
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import * as tf from "@tensorflow/tfjs"
import { Effect, Layer, References, Result } from "effect"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { encodeCheckpoint } from "../actors/param-server/checkpoint.ts"
import { makePlanForJob, type DataPlan } from "../actors/loader/tasks.ts"
import { quantizeCheckpoint, type QuantizeReport, type QuantizeRequest } from "../actors/quantizer/ptq.ts"
import { decodeQModel, encodeQModel, readQModelFile } from "../actors/quantizer/qfile.ts"
import { qForward, qGenerate, qScore } from "../actors/quantizer/qforward.ts"
import { quantizeModel, type QModel, type QTensor } from "../actors/quantizer/qmodel.ts"
import { QuantizerClient, quantizeSubject, serveQuantize } from "../actors/quantizer/service.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { Compute, initBackend } from "../shared/compute/backend.ts"
import { resolveJob, type JobConfig } from "../shared/config/job.ts"
import { addSums, forward, lossAndGrads, toTensors, type ModelDef } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { makeOptimizer, resolveOptimizer } from "../shared/optim/optimizers.ts"

const BIN = join(import.meta.dirname, "..", "bin", "flotilla.ts")
const dir = mkdtempSync(join(tmpdir(), "flotilla-ptq-"))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

interface Trained {
  readonly job: JobConfig
  readonly jobFile: string
  readonly checkpoint: string
  readonly def: ModelDef
  readonly plan: DataPlan
  readonly params: Map<string, Float32Array>
}

/** Train `steps` Adam steps in-process and write shard 0's checkpoint as a parameter server would. */
const train = (job: JobConfig, steps: number, lr: number): Trained => {
  const def = makeModel(job.model)
  const plan = makePlanForJob(job)
  const params = def.init(job.train.seed)
  const opt = makeOptimizer(Result.getOrThrow(resolveOptimizer({ kind: "adam" })))
  const slots = new Map(def.specs.map((s) => [s.name, opt.initState(params.get(s.name)!.length)]))
  for (let i = 0; i < steps; i++) {
    const { grads } = lossAndGrads(def, params, plan.trainBatch(Math.floor(i / plan.batchesPerEpoch), i % plan.batchesPerEpoch))
    for (const s of def.specs) opt.update(params.get(s.name)!, grads.get(s.name)!, slots.get(s.name)!, lr, i + 1)
  }
  const jobFile = join(dir, `${job.job}.json`)
  writeFileSync(jobFile, JSON.stringify(job))
  const folder = join(dir, "checkpoints", job.job)
  mkdirSync(join(folder, "ps-0"), { recursive: true })
  const data = { model: job.model, seed: job.train.seed, task: def.task, corpus: job.data.corpus, ...(plan.labels ? { labels: plan.labels, tokenizer: plan.tokenizer } : {}) }
  writeFileSync(join(folder, "ps-0", `v${String(steps).padStart(8, "0")}.ckpt`), encodeCheckpoint({
    job: job.job, shard: 0, version: steps, updates: steps, optimizer: opt.config, consistency: { mode: "sync" },
    log: { completeBelow: 0, epochs: [] }, data, params, shapes: new Map(def.specs.map((s) => [s.name, s.shape])), slots: new Map()
  }))
  return { job, jobFile, checkpoint: folder, def, plan, params }
}

/** A labelled corpus: class 1 texts tend to hold "spam words" (w0-w9), 10% of labels flipped. */
const labelledCorpus = (): string => {
  let s = 7
  const rnd = () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31)
  const lines = Array.from({ length: 640 }, () => {
    const spam = rnd() < 0.4
    const words = Array.from({ length: 4 + Math.floor(rnd() * 8) }, () => `w${spam && rnd() < 0.3 ? Math.floor(rnd() * 10) : 10 + Math.floor(rnd() * 140)}`)
    return JSON.stringify({ text: words.join(" "), label: (rnd() < 0.1) !== spam ? "spam" : "ham" })
  })
  const file = join(dir, "mail.jsonl")
  writeFileSync(file, lines.join("\n") + "\n")
  return file
}

const run = (req: QuantizeRequest): Promise<QuantizeReport> => Effect.runPromise(quantizeCheckpoint(req).pipe(Effect.provide(Compute.layer("wasm"))))

const valLoss = (qm: QModel, plan: DataPlan) => {
  const sums: Record<string, number> = {}
  for (let i = 0; i < plan.valBatches; i++) addSums(sums, qScore(qm, plan.valBatch(i)))
  return qm.def.summarize(sums)
}

/** The model with every quantized tensor changed by `f` (a broken quantizer). */
const broken = (qm: QModel, f: (t: QTensor) => QTensor): QModel => ({ ...qm, tensors: new Map([...qm.tensors].map(([k, t]) => [k, t.dtype === "float32" ? t : f(t)])) })

const cli = (args: string[]) => {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd: dir, encoding: "utf8", timeout: 60_000, env: { ...process.env, FLOTILLA_BACKEND: "wasm" } })
  expect(r.status, r.stderr.slice(-2000)).toBe(0)
  return r.stdout
}

let gpt: Trained
let lstm: Trained
const reports = new Map<string, QuantizeReport>()

beforeAll(async () => {
  await initBackend("wasm")
  gpt = train(resolveJob({ job: "ptq-gpt", model: { kind: "gpt", vocabSize: 256, contextLength: 32, layers: 2, heads: 2, width: 32 }, data: { corpus: "moby-dick", batchSize: 16, valBatches: 4 } }), 150, 3e-3)
  lstm = train(resolveJob({ job: "ptq-lstm", model: { kind: "lstm-classifier", vocabSize: 200, embedDim: 32, hidden: 32, dense: 8, maxLen: 12, maskPadding: true }, data: { corpus: labelledCorpus(), batchSize: 32, valFraction: 0.25, seed: 3 } }), 150, 1e-2)
  for (const t of [gpt, lstm]) for (const mode of ["int8-dynamic", "int8-static", "int4-weight"] as const) reports.set(`${t.job.job}:${mode}`, await run({ checkpoint: t.checkpoint, mode, jobFile: t.jobFile }))
})

describe("the quantized forward", () => {
  it("with nothing quantized is the models' own forward (GPT and LSTM, within 1e-5)", () => {
    for (const t of [gpt, lstm]) {
      const ref = quantizeModel(t.def, t.job.model, t.params, "float32")
      const batch = t.plan.valBatch(0)
      const [a, b] = tf.tidy(() => [qForward(ref, { kind: "float" }, batch).dataSync() as Float32Array, forward(t.def, toTensors(t.def, t.params), batch).dataSync() as Float32Array])
      const scale = b.reduce((m, x) => Math.max(m, Math.abs(x)), 0)
      const err = a.reduce((m, x, i) => Math.max(m, Math.abs(x - b[i])), 0)
      expect(err / scale, t.def.kind).toBeLessThan(1e-5)
    }
  })
})

describe("post-training quantization", () => {
  it("keeps the GPT's validation loss within 1% (int8) and 5% (int4) on weights 3.5× / 6× smaller", () => {
    for (const mode of ["int8-dynamic", "int8-static", "int4-weight"] as const) {
      const r = reports.get(`ptq-gpt:${mode}`)!
      expect(r.mode).toBe(mode)
      expect(r.jobSource).toBe(gpt.jobFile)
      expect(r.fp32ValLoss).toBeLessThan(3) // it learned something: a uniform byte model is ln 256 = 5.5
      expect(Math.abs(r.lossDeltaRel), mode).toBeLessThan(mode === "int4-weight" ? 0.05 : 0.01)
      expect(r.lossDelta).toBeCloseTo(r.quantValLoss - r.fp32ValLoss, 12)
      expect(r.weightSizeRatio).toBeGreaterThanOrEqual(mode === "int4-weight" ? 6 : 3.5)
      expect(r.sizeRatio).toBeGreaterThanOrEqual(mode === "int4-weight" ? 4.5 : 3) // the file: biases, LayerNorm and the header stay
      expect(r.quantBytes).toBe(readFileSync(r.out).length)
      expect(r.tensors.float32).toBe(18) // biases and LayerNorm of 2 blocks, ln_f
      expect(r.calibBatches).toBe(mode === "int8-static" ? 8 : 0)
    }
  })

  it("keeps the classifier's accuracy within 2 (int8) and 5 (int4) points", () => {
    for (const mode of ["int8-dynamic", "int8-static", "int4-weight"] as const) {
      const r = reports.get(`ptq-lstm:${mode}`)!
      expect(r.fp32Accuracy!).toBeGreaterThan(0.7) // measured 0.78; the majority class is ~0.57
      expect(Math.abs(r.accuracyDelta!), mode).toBeLessThanOrEqual(mode === "int4-weight" ? 0.05 : 0.02)
      expect(Math.abs(r.lossDeltaRel), mode).toBeLessThan(mode === "int4-weight" ? 0.1 : 0.02)
      expect(r.weightSizeRatio).toBeGreaterThanOrEqual(mode === "int4-weight" ? 6 : 3.5)
      expect(r.tensors).toEqual({ int8: mode === "int4-weight" ? 0 : 3, int4: mode === "int4-weight" ? 3 : 0, float32: 5 })
    }
  })

  it("a broken quantizer fails the bounds: scales off by 2×, int4 nibbles swapped, static ranges too small", () => {
    const i8 = readQModelFile(reports.get("ptq-gpt:int8-dynamic")!.out).qm
    const i4 = readQModelFile(reports.get("ptq-gpt:int4-weight")!.out).qm
    const st = readQModelFile(reports.get("ptq-gpt:int8-static")!.out).qm
    const fp32 = reports.get("ptq-gpt:int8-dynamic")!.fp32ValLoss
    const halfScales = valLoss(broken(i8, (t) => ({ ...t, scales: t.scales!.map((s) => s * 2) })), gpt.plan).loss
    const swapped = valLoss(broken(i4, (t) => ({ ...t, data: (t.data as Uint8Array).map((b) => ((b & 0xf) << 4) | (b >> 4)) })), gpt.plan).loss
    // static ranges 8× too small: most activations clamp
    const clamped = valLoss({ ...st, activations: Object.fromEntries(Object.entries(st.activations!).map(([k, v]) => [k, v / 8])) }, gpt.plan).loss
    expect((halfScales - fp32) / fp32).toBeGreaterThan(0.05)
    expect((clamped - fp32) / fp32).toBeGreaterThan(0.05)
    expect((swapped - fp32) / fp32).toBeGreaterThan(0.1) // measured +20% (scales ×2: +18%)
  })
})

describe("the quantized model file", () => {
  it("round-trips: decoding and re-encoding gives the same bytes, the header says the mode and ranges", () => {
    for (const mode of ["int8-dynamic", "int8-static", "int4-weight"] as const) {
      const bytes = new Uint8Array(readFileSync(reports.get(`ptq-lstm:${mode}`)!.out))
      const { qm, info, header } = decodeQModel(bytes)
      expect(header.mode).toBe(mode)
      expect(header.job).toBe("ptq-lstm")
      expect(Object.keys(header.activations ?? {}).sort()).toEqual(mode === "int8-static" ? ["dense.kernel", "lstm.kernel", "lstm.recurrent"].filter((n) => qm.tensors.get(n)!.dtype === "int8").sort() : [])
      expect(Buffer.from(encodeQModel(qm, info)).equals(Buffer.from(bytes))).toBe(true)
    }
  })

  it("refuses a corrupt, truncated or foreign file with a clear error", () => {
    const out = reports.get("ptq-gpt:int8-static")!.out
    const good = new Uint8Array(readFileSync(out))
    const flip = (at: number) => {
      const b = good.slice()
      b[at] ^= 0x40
      return b
    }
    expect(() => decodeQModel(flip(good.length - 10))).toThrow(/payload CRC32 mismatch/)
    expect(() => decodeQModel(flip(40))).toThrow(/header CRC32 mismatch/)
    expect(() => decodeQModel(good.subarray(0, good.length - 100))).toThrow(/truncated/)
    expect(() => decodeQModel(good.subarray(0, 12))).toThrow(/truncated/)
    expect(() => decodeQModel(flip(0))).toThrow(/bad magic/)
    const ckpt = join(gpt.checkpoint, "ps-0", "v00000150.ckpt")
    expect(() => readQModelFile(ckpt)).toThrow(/a Flotilla checkpoint, not a quantized model/)
    expect(() => readQModelFile(join(dir, "nope.qmodel"))).toThrow(/nope\.qmodel/)
  })
})

describe("running from the file", () => {
  it("quantize --json prints one JSON object; generate samples from the quantized file", () => {
    const out = join(dir, "cli.int8.qmodel")
    const lines = cli(["quantize", gpt.checkpoint, "--mode", "int8-dynamic", "--job", gpt.jobFile, "--out", out, "--json"]).trim().split("\n")
    expect(lines).toHaveLength(1)
    const r = JSON.parse(lines[0])
    for (const k of ["sizeRatio", "fp32ValLoss", "quantValLoss", "lossDelta", "mode"]) expect(r).toHaveProperty(k)
    expect(r.quantValLoss).toBeCloseTo(reports.get("ptq-gpt:int8-dynamic")!.quantValLoss, 5)
    const g = JSON.parse(cli(["generate", out, "--prompt", "Call me ", "--tokens", "24", "--json"]))
    expect(g).toMatchObject({ format: "quantized", mode: "int8-dynamic", prompt: "Call me " })
    expect(g.tokens).toHaveLength(24)
    expect(g.tokens.every((t: number) => Number.isInteger(t) && t >= 0 && t < 256)).toBe(true)
    // the same sampler in-process from the int4 file
    const i4 = readQModelFile(reports.get("ptq-gpt:int4-weight")!.out).qm
    expect(qGenerate(i4, new Int32Array([67]), 10, { temperature: 0, seed: 1 })).toHaveLength(10)
  })

  it("classify labels texts from a quantized classifier", () => {
    const r = JSON.parse(cli(["classify", reports.get("ptq-lstm:int4-weight")!.out, "w1 w2 w3 w4 w5", "w20 w30 w40", "--json"]))
    expect(r.job).toBe("ptq-lstm")
    expect(r.predictions).toHaveLength(2)
    for (const p of r.predictions) expect(["ham", "spam"]).toContain(p.label)
  })
})

describe("the quantizer service", () => {
  it("answers a request with the report, and a bad one with QuantizeFailed and its reason", async () => {
    const [ok, bad, missing] = await Effect.runPromise(
      Effect.gen(function* () {
        const bus = yield* Bus
        yield* serveQuantize("ptq-gpt")
        const ok = yield* QuantizerClient.quantize(bus, "ptq-gpt", { checkpoint: gpt.checkpoint, mode: "int4-weight", jobFile: gpt.jobFile, out: join(dir, "svc.qmodel") }, 60_000)
        const bad = yield* bus.request(quantizeSubject("ptq-gpt"), new TextEncoder().encode(JSON.stringify({ checkpoint: gpt.checkpoint, mode: "int9" })), { timeoutMs: 60_000 })
        const missing = yield* QuantizerClient.quantize(bus, "ptq-gpt", { checkpoint: join(dir, "nope"), mode: "int8-dynamic" }, 60_000).pipe(Effect.flip)
        return [ok, JSON.parse(new TextDecoder().decode(bad.data)), missing] as const
      }).pipe(Effect.scoped, Effect.provide(Layer.mergeAll(InProcessBus.layer(), Compute.layer("wasm"), Layer.succeed(References.MinimumLogLevel, "Error"))))
    )
    expect(quantizeSubject("ptq-gpt")).toBe("flotilla.ptq-gpt.quantize")
    expect(ok.quantValLoss).toBeCloseTo(reports.get("ptq-gpt:int4-weight")!.quantValLoss, 6)
    expect(bad).toMatchObject({ _tag: "QuantizeFailed", error: { code: "invalid-request" } })
    expect(bad.error.message).toMatch(/mode/)
    expect(missing).toMatchObject({ reason: "checkpoint" })
    expect(missing.message).toMatch(/does not exist/)
  })
})
