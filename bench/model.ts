// Benchmarks one training step (forward + backward, gradients read back) of the model
// zoo on the wasm backend: gpt-mini with tfjs' stock matMul gradients against
// matMul2d/batchMatMul's plain-matMul gradients, and the seed's LSTM classifier (fused
// recurrence as trained, and the plain-op one it replaced) side by side with PyTorch 1.13
// on the same shape (bench/torch.ts; skipped with a reason without python3-torch).
// Owns: nothing but measurement. Run: node bench/model.ts [--steps N]   (~1-3 min)
// Numbers are medians; shared 2-core machines vary by up to ~1.8x between runs
// (PERF-NOTES.md has the reference numbers: ~290 tok/s stock, ~1,100 with the fixes).

import os from "node:os"
import { initBackend } from "../shared/compute/backend.ts"
import { setPlainMatMulGradients } from "../shared/compute/ops.ts"
import { gptMini, makeGpt } from "../shared/models/gpt.ts"
import { lstmClassifierDefaults, makeLstmClassifier } from "../shared/models/lstm-classifier.ts"
import type { Batch, ModelDef } from "../shared/models/model.ts"
import { batchOf } from "../shared/models/model.ts"
import { countParams, lossAndGrads } from "../shared/models/model.ts"
import { Rng } from "../shared/models/rng.ts"
import { torchLstmRows } from "./torch.ts"

const argSteps = process.argv.indexOf("--steps")
const STEPS = argSteps > 0 ? Number(process.argv[argSteps + 1]) : 3

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 === 1 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2
}

interface Row {
  readonly run: string
  readonly firstMs: number
  readonly medianMs: number
  /** Process CPU time of the step: on a shared machine, closer to what a quiet one gives. */
  readonly cpuMs: number
  readonly rate: string
  readonly cpuRate: string
}

/** One warm-up step (reported: the first step pays one-off costs), then `steps` timed. */
const time = (run: string, def: ModelDef, batch: Batch, items: number, unit: string, steps: number): Row => {
  const params = def.init(0)
  const t0 = performance.now()
  lossAndGrads(def, params, batch)
  const firstMs = performance.now() - t0
  const ms: number[] = []
  const cpu: number[] = []
  for (let i = 0; i < steps; i++) {
    const c = process.cpuUsage()
    const t = performance.now()
    const { loss } = lossAndGrads(def, params, batch)
    ms.push(performance.now() - t)
    const used = process.cpuUsage(c)
    cpu.push((used.user + used.system) / 1000)
    if (!Number.isFinite(loss)) throw new Error(`${run}: loss is ${loss}`)
  }
  const m = median(ms)
  const cm = median(cpu)
  const fmt = (perMs: number) => `${((items / perMs) * 1000).toFixed(unit === "tok/s" ? 0 : 1)} ${unit}`
  const row = { run, firstMs, medianMs: m, cpuMs: cm, rate: fmt(m), cpuRate: fmt(cm) }
  console.log(`  ${run}: steps ${ms.map((x) => x.toFixed(0)).join(", ")} ms`)
  return row
}

const main = async () => {
  const backend = await initBackend("wasm")
  console.log(`backend: ${backend.reason}`)
  console.log(`load average: ${os.loadavg().map((x) => x.toFixed(1)).join(" ")} on ${os.cpus().length} cores\n`)

  const B = 32
  const T = gptMini.contextLength
  const gpt = makeGpt(gptMini)
  console.log(`gpt-mini ${JSON.stringify(gpt.config)}, ${countParams(gpt).toLocaleString()} params, B=${B} T=${T}`)
  const rng = new Rng(1)
  const gptBatch = batchOf(B, { tokens: Int32Array.from({ length: B * (T + 1) }, () => rng.int(gptMini.vocabSize)) })

  const lstm = makeLstmClassifier(lstmClassifierDefaults)
  const L = 100
  console.log(`lstm-classifier ${JSON.stringify(lstm.config)}, ${countParams(lstm).toLocaleString()} params, B=${B} L=${L}`)
  const lstmBatch = batchOf(B, {
    tokens: Int32Array.from({ length: B * L }, (_, i) => (i % L < 20 ? 0 : 1 + rng.int(lstm.config.vocabSize - 1))),
    labels: Float32Array.from({ length: B }, (_, i) => i % 2)
  })

  const rows: Row[] = []
  setPlainMatMulGradients(true)
  rows.push(time("gpt-mini, matMul2d gradients", gpt, gptBatch, B * T, "tok/s", STEPS))
  rows.push(time("lstm-classifier (fused recurrence)", lstm, lstmBatch, B, "samples/s", STEPS))
  rows.push(time("lstm-classifier (plain-op recurrence)", makeLstmClassifier({ ...lstmClassifierDefaults, recurrence: "ops" }), lstmBatch, B, "samples/s", STEPS))
  setPlainMatMulGradients(false)
  rows.push(time("gpt-mini, stock matMul gradients", gpt, gptBatch, B * T, "tok/s", Math.max(1, STEPS - 1)))
  setPlainMatMulGradients(true)

  const w = Math.max(...rows.map((r) => r.run.length))
  console.log(`\n| ${"run".padEnd(w)} | first step ms | median step ms | throughput | step CPU ms | per CPU-second |`)
  console.log(`| ${"-".repeat(w)} | ---: | ---: | ---: | ---: | ---: |`)
  for (const r of rows) {
    const cells = [r.firstMs.toFixed(0), r.medianMs.toFixed(0), r.rate, r.cpuMs.toFixed(0), r.cpuRate]
    console.log(`| ${r.run.padEnd(w)} | ${cells.join(" | ")} |`)
  }
  const fast = rows.find((r) => r.run === "gpt-mini, matMul2d gradients")!
  const slow = rows.find((r) => r.run === "gpt-mini, stock matMul gradients")!
  console.log(
    `\nmatMul2d gradients vs stock on gpt-mini: ${(slow.medianMs / fast.medianMs).toFixed(2)}x wall, ` +
      `${(slow.cpuMs / fast.cpuMs).toFixed(2)}x CPU (same run)`
  )
  console.log("throughput = items / median wall time; per CPU-second = items / median process CPU time")
  console.log("(wasm runs one thread, so on a quiet machine the two agree; the first step pays heap growth)")

  // the seed model side by side with PyTorch on the same shape (tools/refs/lstm_bench.py)
  const torch = torchLstmRows(Math.max(5, STEPS))
  const lstmRows = rows.filter((r) => r.run.startsWith("lstm")).map((r) => ({ run: `tfjs wasm, ${r.run}`, msPerStep: r.medianMs, samplesPerSec: (B / r.medianMs) * 1000 }))
  const all = [...lstmRows, ...torch.rows]
  const ref = torch.rows.find((r) => r.run.includes("1 thread"))
  const wl = Math.max(...all.map((r) => r.run.length))
  console.log(`
seed classifier, B=${B} L=${L}, one training step (forward + backward, gradients read back):`)
  console.log(`| ${"run".padEnd(wl)} | ms/step | samples/s | vs torch 1 thread |`)
  console.log(`| ${"-".repeat(wl)} | ---: | ---: | ---: |`)
  for (const r of all) console.log(`| ${r.run.padEnd(wl)} | ${r.msPerStep.toFixed(1)} | ${r.samplesPerSec.toFixed(0)} | ${ref ? `${(r.samplesPerSec / ref.samplesPerSec).toFixed(2)}x` : "n/a"} |`)
  if (torch.skipped !== undefined) console.log(torch.skipped)
}

await main()
