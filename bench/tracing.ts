// What tracing costs: the same small data-parallel job run with `flotilla up` (separate
// processes over a local NATS server), with tracing off (no OTLP endpoint) and with
// tracing on, sampling every trace, exporting to a local OTLP receiver. Runs alternate
// off/on so machine drift hits both. Prints tokens/s (median), the ratio, spans exported.
//   node bench/tracing.ts [--rounds 2] [--steps 30] [--workers 1]
import { spawnSync } from "node:child_process"
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
const run = (traced: boolean): number => {
  const env: NodeJS.ProcessEnv = { ...process.env, FLOTILLA_LOG: "error" }
  delete env.OTEL_EXPORTER_OTLP_ENDPOINT
  if (traced) Object.assign(env, { OTEL_EXPORTER_OTLP_ENDPOINT: rx.url, OTEL_EXPORTER_OTLP_PROTOCOL: "http/json", OTEL_TRACES_SAMPLER: "always_on", OTEL_METRICS_EXPORTER: "none" })
  const r = spawnSync(process.execPath, ["bin/flotilla.ts", "up", jobFile, "--json", "--sample", "0"], { env, encoding: "utf8", cwd: join(import.meta.dirname, "..") })
  if (r.status !== 0) throw new Error(`flotilla up failed (${r.status}):\n${r.stderr.slice(-2000)}`)
  const summary = JSON.parse(r.stdout.trim().split("\n").pop()!)
  return summary.tokensPerSec as number
}

const off: number[] = []
const on: number[] = []
for (let i = 0; i < rounds; i++) {
  off.push(run(false))
  on.push(run(true))
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
