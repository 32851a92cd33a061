// What tracing costs: the same small data-parallel job run with `flotilla up` (separate
// processes over a local NATS server), with tracing off (no OTLP endpoint) and with
// tracing on, sampling every trace, exporting to a local OTLP receiver. Runs alternate
// off/on so machine drift hits both. Prints tokens/s (median), the ratio, spans exported.
//   node bench/tracing.ts [--rounds 2] [--steps 30] [--workers 1]
import { spawn } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { parseArgs } from "node:util"
import { startOtlpReceiver } from "../test/support/otlp-receiver.ts"

const { values } = parseArgs({ options: { rounds: { type: "string" }, steps: { type: "string" }, workers: { type: "string" } } })
const rounds = Number(values.rounds ?? 2)
const steps = Number(values.steps ?? 30)
const workers = Number(values.workers ?? 1)
const dir = mkdtempSync(join(tmpdir(), "flotilla-bench-tracing-"))
const jobFile = join(dir, "job.json")
writeFileSync(jobFile, JSON.stringify({
  job: "bench-tracing",
  model: { kind: "gpt", vocabSize: 256, contextLength: 64, layers: 2, heads: 4, width: 64 },
  data: { corpus: "moby-dick", batchSize: 16 },
  train: { steps, evalEvery: 0, checkpointEvery: 0, checkpointDir: join(dir, "ckpt"), livenessMs: 20000 },
  topology: { workers, psShards: 1 }
}))

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
const rx = await startOtlpReceiver()
// async spawn: the OTLP receiver lives in this process and must keep serving meanwhile
const run = (traced: boolean): Promise<number> => {
  const env: NodeJS.ProcessEnv = { ...process.env, FLOTILLA_LOG: "error" }
  delete env.OTEL_EXPORTER_OTLP_ENDPOINT
  if (traced) Object.assign(env, { OTEL_EXPORTER_OTLP_ENDPOINT: rx.url, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_TRACES_SAMPLER: "always_on", OTEL_METRICS_EXPORTER: "none" })
  const child = spawn(process.execPath, ["bin/flotilla.ts", "up", jobFile, "--json", "--sample", "0"], { env, cwd: join(import.meta.dirname, ".."), stdio: ["ignore", "pipe", "pipe"] })
  let out = ""
  let err = ""
  child.stdout.on("data", (b) => (out += b))
  child.stderr.on("data", (b) => (err += b))
  return new Promise((resolve, reject) =>
    child.once("exit", (code) => {
      if (code !== 0) return reject(new Error(`flotilla up failed (${code}):\n${err.slice(-2000)}`))
      resolve(JSON.parse(out.trim().split("\n").pop()!).tokensPerSec as number)
    })
  )
}

const off: number[] = []
const on: number[] = []
for (let i = 0; i < rounds; i++) {
  off.push(await run(false))
  on.push(await run(true))
  process.stderr.write(`round ${i + 1}/${rounds}: off ${off[i].toFixed(0)} tok/s, on ${on[i].toFixed(0)} tok/s\n`)
}
const spans = rx.spans.length
await rx.close()
const mOff = median(off)
const mOn = median(on)
console.log(`\ntracing cost, ${workers} worker(s), ${steps} steps, ${rounds} rounds each (median tokens/s)`)
console.log("| tracing | tokens/s | ratio to off | spans exported |")
console.log("| --- | ---: | ---: | ---: |")
console.log(`| off | ${mOff.toFixed(0)} | 1.00 | 0 |`)
console.log(`| on, sample all | ${mOn.toFixed(0)} | ${(mOn / mOff).toFixed(2)} | ${spans} |`)

// "off" costs nothing by construction: with no OTLP endpoint, TracedBus.layer is the bare
// bus (shared/telemetry/traced-bus.ts) and no SDK is loaded (shared/telemetry/otel.ts).
