// Benchmarks one training step (forward + backward, gradients read back; no optimizer
// step) of the seed's LSTM classifier at its own shape, B=32, L=100, V=10000, E=64, H=64,
// F=64: tfjs wasm with the recurrence spelled out as plain ops (lstmLogitsPlain in
// shared/models/lstm-classifier.ts) against the model as it trains (lstmLogits: the
// recurrence is lstm-fast.ts' custom-gradient op), and PyTorch 1.13 on the CPU
// (tools/refs/lstm_bench.py via bench/torch.ts, skipped with a reason when
// /usr/bin/python3 cannot import torch).
// Owns: nothing but measurement.
// Run: node bench/lstm.ts [--steps N]   (~15-30 s at the default 15; medians, machines are shared)

import os from "node:os"
import { torchLstmRows } from "./torch.ts"
import * as tf from "@tensorflow/tfjs"
import { initBackend } from "../shared/compute/backend.ts"
import { sigmoidCrossEntropy } from "../shared/compute/ops.ts"
import type { LstmClassifierConfig } from "../shared/models/lstm-classifier.ts"
import { lstmClassifierDefaults, lstmInit, lstmLogits as lstmLogitsFast, lstmLogitsPlain as lstmLogits, lstmSpecs } from "../shared/models/lstm-classifier.ts"
import type { ParamSpec } from "../shared/models/model.ts"
import { Rng } from "../shared/models/rng.ts"

const argSteps = process.argv.indexOf("--steps")
const STEPS = argSteps > 0 ? Number(process.argv[argSteps + 1]) : 15
const B = 32
const L = 100
const PAD = 20 // leading padding positions per row, as bench/model.ts and lstm_bench.py

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}


/** x: [B, L] ids row-major (0 = padding), y: [B] labels. */
interface Batch {
  readonly x: Int32Array
  readonly y: Float32Array
}

type Loss = (p: ReadonlyMap<string, tf.Tensor>, batch: Batch) => tf.Scalar

const oldLoss = (c: LstmClassifierConfig): Loss => (p, batch) =>
  sigmoidCrossEntropy(lstmLogits(c, p, tf.tensor2d(batch.x, [B, L], "int32")), tf.tensor1d(batch.y, "float32"))
const newLoss = (c: LstmClassifierConfig): Loss => (p, batch) =>
  sigmoidCrossEntropy(lstmLogitsFast(c, p, tf.tensor2d(batch.x, [B, L], "int32")), tf.tensor1d(batch.y, "float32"))

/** One training step's compute, as shared/models/model.ts lossAndGrads does it: params to
 *  tensors, loss and gradients through the tape, every gradient read back; no tensor left. */
const lossAndGrads = (specs: readonly ParamSpec[], params: ReadonlyMap<string, Float32Array>, loss: Loss, batch: Batch) => {
  const grads = new Map<string, Float32Array>()
  let value = Number.NaN
  tf.tidy(() => {
    const named = new Map(specs.map((s) => [s.name, tf.tensor(params.get(s.name)!, [...s.shape], "float32")]))
    const res = tf.engine().gradients(() => loss(named, batch), [...named.values()])
    specs.forEach((s, i) => grads.set(s.name, Float32Array.from(res.grads[i].dataSync())))
    value = res.value.dataSync()[0]
  })
  return { loss: value, grads }
}

interface Row {
  readonly run: string
  readonly msPerStep: number
  readonly samplesPerSec: number
}

/** One warm-up step, then `steps` timed ones; returns the median. */
const time = (run: string, specs: readonly ParamSpec[], params: Map<string, Float32Array>, loss: Loss, batch: Batch, steps: number): Row => {
  lossAndGrads(specs, params, loss, batch)
  const ms: number[] = []
  let value = Number.NaN
  for (let i = 0; i < steps; i++) {
    const t = performance.now()
    value = lossAndGrads(specs, params, loss, batch).loss
    ms.push(performance.now() - t)
    if (!Number.isFinite(value)) throw new Error(`${run}: loss is ${value}`)
  }
  const med = median(ms)
  console.log(`  ${run}: loss ${value.toFixed(6)}, steps ${ms.map((x) => x.toFixed(0)).join(", ")} ms`)
  return { run, msPerStep: med, samplesPerSec: (B / med) * 1000 }
}

/** The largest |a - b| over all gradients, relative to the largest |b|. */
const gradDiff = (a: ReadonlyMap<string, Float32Array>, b: ReadonlyMap<string, Float32Array>): number => {
  let diff = 0
  let scale = 0
  for (const [name, gb] of b) {
    const ga = a.get(name)!
    for (let i = 0; i < gb.length; i++) {
      diff = Math.max(diff, Math.abs(ga[i] - gb[i]))
      scale = Math.max(scale, Math.abs(gb[i]))
    }
  }
  return diff / scale
}

const main = async () => {
  const backend = await initBackend("wasm")
  console.log(`backend: ${backend.reason}`)
  console.log(`load average: ${os.loadavg().map((x) => x.toFixed(1)).join(" ")} on ${os.cpus().length} cores`)
  const c = lstmClassifierDefaults
  console.log(`lstm-classifier ${JSON.stringify(c)}, B=${B} L=${L}, first ${PAD} positions padding, ${STEPS} timed steps\n`)

  const rng = new Rng(1)
  const batch = (pad: number): Batch => ({
    x: Int32Array.from({ length: B * L }, (_, i) => (i % L < pad ? 0 : 1 + rng.int(c.vocabSize - 1))),
    y: Float32Array.from({ length: B }, (_, i) => i % 2)
  })
  const padded = batch(PAD)
  const full = batch(0)
  const specs = lstmSpecs(c)
  const params = lstmInit(c, specs, 0)
  const [oldL, newL] = [oldLoss(c), newLoss(c)]

  // Same maths: the two must agree before their speeds are worth comparing.
  const a = lossAndGrads(specs, params, oldL, padded)
  const b = lossAndGrads(specs, params, newL, padded)
  const rel = gradDiff(b.grads, a.grads)
  console.log(`agreement: loss ${a.loss.toFixed(7)} vs ${b.loss.toFixed(7)}, max gradient difference ${rel.toExponential(2)} of max |g|`)
  if (rel > 1e-4) throw new Error("bench/lstm: the fast model's gradients disagree with the plain-op model's")

  const rows: Row[] = []
  rows.push(time("tfjs wasm, plain ops (before)", specs, params, oldL, padded, Math.max(3, Math.ceil(STEPS / 3))))
  rows.push(time("tfjs wasm, lstm-fast (as trained)", specs, params, newL, padded, STEPS))
  rows.push(time("tfjs wasm, lstm-fast, no padding", specs, params, newL, full, STEPS))
  const torch = torchLstmRows(STEPS)
  rows.push(...torch.rows)

  const ref = torch.rows.find((r) => r.run.includes("1 thread"))
  const w = Math.max(...rows.map((r) => r.run.length))
  console.log(`\n| ${"run".padEnd(w)} | ms/step (median) | samples/s | ratio vs torch-1-thread |`)
  console.log(`| ${"-".repeat(w)} | ---: | ---: | ---: |`)
  for (const r of rows) {
    const ratio = ref === undefined ? "n/a" : `${(r.samplesPerSec / ref.samplesPerSec).toFixed(2)}x`
    console.log(`| ${r.run.padEnd(w)} | ${r.msPerStep.toFixed(1)} | ${r.samplesPerSec.toFixed(0)} | ${ratio} |`)
  }
  console.log("\nratio = samples/s over torch 1 thread's (> 1: faster). A step = forward + backward + gradients")
  console.log("read back; no optimizer step in any row. torch's nn.LSTM runs all 100 steps (no mask); the tfjs")
  console.log(`models freeze the state on padding, and lstmFinalState skips steps that are padding in every row`)
  if (torch.skipped !== undefined) console.log(torch.skipped)
}

await main()
