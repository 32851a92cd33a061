// What data parallelism over NATS costs and gains, measured side by side in ONE run:
//   1. in-process: a plain TensorFlow.js training loop in this process — loss and
//      gradients (shared/models), global-norm clipping and AdamW (shared/optim), no bus;
//   2. 1 worker over NATS: loader, LR scheduler, parameter server(s) and one worker, each
//      its own process (`flotilla launch`), on a local nats-server;
//   3. 2 workers over NATS: the same with two workers, each with the same batch as 1.
// Same model, same per-worker batch B, wasm backend everywhere (one core per process).
// Throughput: tokens/s per window of --window steps after --warmup steps, median over the
// windows (a NATS run's windows are timed from the shards' StepApplied events). Prints
// the ratios the DP issue aims at (1 worker ≥ 0.95× in-process; 2 workers ≥ 1.8× one)
// and the bytes on the wire per step: gradients pushed, params broadcast to each worker,
// token batches leased (payload bytes, from the workers' reports and the model's size).
//   node bench/dp.ts [--layers 4] [--width 128] [--heads 4] [--context 128] [--batch 8]
//                    [--steps 24] [--warmup 4] [--window 4] [--ps-shards 1] [--nats URL]
// Defaults: gpt-mini's shape (PERF-NOTES) with a per-worker batch of 8, ~2-3 minutes on
// 2 cores. Also prints where a version's time goes (the workers' WorkerStep phases and
// the PS's apply time). Owns nothing but measurement.
import os from "node:os"
import { median, tokenWindows } from "./stats.ts"
import { parseArgs } from "node:util"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { resolveJob, type JobConfig } from "../shared/config/job.ts"
import { countParams, lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { clipByGlobalNorm } from "../shared/optim/clip.ts"
import { makeOptimizer, resolveOptimizer } from "../shared/optim/optimizers.ts"
import { lrAt, resolveSchedule, type ScheduleInput } from "../shared/schedule/schedules.ts"
import { makeCluster, observe } from "../test/support/cluster.ts"

const { values: v } = parseArgs({
  options: {
    layers: { type: "string" },
    width: { type: "string" },
    heads: { type: "string" },
    context: { type: "string" },
    batch: { type: "string" },
    steps: { type: "string" },
    warmup: { type: "string" },
    window: { type: "string" },
    "ps-shards": { type: "string" },
    nats: { type: "string" }
  }
})
const num = (x: string | undefined, d: number) => (x === undefined ? d : Number(x))
const model = { kind: "gpt" as const, vocabSize: 256, contextLength: num(v.context, 128), layers: num(v.layers, 4), heads: num(v.heads, 4), width: num(v.width, 128) }
const B = num(v.batch, 8)
const STEPS = num(v.steps, 24)
const WARMUP = num(v.warmup, 4)
const WINDOW = num(v.window, 4)
const PS_SHARDS = num(v["ps-shards"], 1)
const T = model.contextLength

/** tokens/s of each window of WINDOW steps after WARMUP (bench/stats.ts). */
const windows = (ends: number[], tokens: number[]): number[] => tokenWindows(ends, tokens, WARMUP, WINDOW)

const jobPatch = (name: string, workers: number) => ({
  job: name,
  model,
  data: { corpus: "moby-dick", batchSize: B, valBatches: 1 },
  train: { steps: WARMUP + STEPS + 1, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 500, livenessMs: 30_000, leaseTimeoutMs: 120_000 },
  topology: { workers, psShards: PS_SHARDS }
})

interface Row {
  readonly run: string
  readonly tokensPerSec: number
  readonly windows: number[]
  readonly stepMs: number
  readonly gradBytes: number
  readonly paramBytes: number
  readonly batchBytes: number
  /** medians over the timed steps, ms: a worker's phases (WorkerStep) and the PS's apply. */
  readonly phases?: { lease: number; waitParams: number; compute: number; push: number; psApply: number }
}

// ---------------------------------------------------------------- 1. in-process

const inProcess = async (job: JobConfig): Promise<Row> => {
  await initBackend("wasm")
  const def = makeModel(job.model)
  const plan = makePlanForJob(job)
  const opt = resolveOptimizer(job.optimizer as never)
  const sched = resolveSchedule(job.schedule as unknown as ScheduleInput)
  if (opt._tag !== "Success" || sched._tag !== "Success") throw new Error("job optimizer/schedule")
  const optimizer = makeOptimizer(opt.success)
  const params = def.init(job.train.seed)
  const slots = new Map(def.specs.map((s) => [s.name, optimizer.initState(params.get(s.name)!.length)]))
  const ends: number[] = [performance.now()]
  const tokens: number[] = [0]
  for (let step = 0; step < WARMUP + STEPS + 1; step++) {
    const batch = plan.trainBatch(0, step % plan.batchesPerEpoch)
    const { grads } = lossAndGrads(def, params, batch)
    if (job.train.clipNorm > 0) clipByGlobalNorm(grads.values(), job.train.clipNorm)
    const lr = lrAt(sched.success, step)
    for (const s of def.specs) optimizer.update(params.get(s.name)!, grads.get(s.name)!, slots.get(s.name)!, lr, step + 1)
    ends.push(performance.now())
    tokens.push(B * T)
  }
  const w = windows(ends, tokens)
  return { run: "in-process (no bus)", tokensPerSec: median(w), windows: w, stepMs: (B * T * 1000) / median(w), gradBytes: 0, paramBytes: 0, batchBytes: 0 }
}

// ---------------------------------------------------------------- 2./3. over NATS

const overNats = async (url: string, workers: number): Promise<Row> => {
  const cluster = makeCluster(url, jobPatch(`bench-dp-${workers}w`, workers), { FLOTILLA_LOG: "warn" })
  const job = cluster.job
  const obs = await observe(url, job)
  try {
    cluster.spawnServices()
    for (let w = 0; w < workers; w++) cluster.spawn("worker", `worker-${w}`)
    const last = job.train.steps
    await obs.until(() => obs.version() >= last, 15 * 60_000, () => `version ${last} (at ${obs.version()})\n${cluster.logs(10)}`)
    const applied = obs.appliedOf(0)
    // version v ended at applied[v-1].at; version 0 "ended" when the first one started
    const ends = [applied[0].at - applied[0].aggregateMs, ...applied.map((a) => a.at)]
    const tokens = [0, ...applied.map((a) => a.tokens)]
    const w = windows(ends, tokens)
    const timed = obs.workerSteps.filter((s) => s.version >= WARMUP)
    const versions = new Set(timed.map((s) => s.version)).size
    const gradBytes = timed.reduce((n, s) => n + s.bytesSent, 0) / Math.max(1, versions)
    const paramBytes = countParams(makeModel(job.model)) * 4 * workers
    const phases = {
      lease: median(timed.map((s) => s.waitBatchMs)),
      waitParams: median(timed.map((s) => s.waitParamsMs)),
      compute: median(timed.map((s) => s.computeMs)),
      push: median(timed.map((s) => s.pushMs)),
      psApply: median(applied.filter((a) => a.version > WARMUP).map((a) => a.aggregateMs))
    }
    return {
      run: `${workers} worker${workers > 1 ? "s" : ""} over NATS`,
      tokensPerSec: median(w),
      windows: w,
      stepMs: (workers * B * T * 1000) / median(w),
      gradBytes,
      paramBytes,
      batchBytes: workers * B * (T + 1) * 4,
      phases
    }
  } finally {
    await obs.close()
    await cluster.stop()
  }
}

// ---------------------------------------------------------------- main

const job = resolveJob(jobPatch("bench-dp", 1), "bench job")
const load0 = os.loadavg()
console.log(`bench/dp: gpt ${JSON.stringify(model)}, ${countParams(makeModel(job.model)).toLocaleString("en")} params, per-worker batch ${B}×${T} tokens`)
console.log(`${STEPS} timed steps in windows of ${WINDOW} after ${WARMUP} warm-up; ${PS_SHARDS} PS shard(s); optimizer ${job.optimizer.kind}, clip ${job.train.clipNorm}`)
console.log(`load average ${load0.map((x) => x.toFixed(1)).join(" ")} on ${os.cpus().length} cores\n`)

const server = v.nats ? undefined : await startLocalNatsServer()
const url = v.nats ?? server!.url
const rows: Row[] = []
try {
  for (const run of [() => inProcess(job), () => overNats(url, 1), () => overNats(url, 2)]) {
    const t0 = Date.now()
    const r = await run()
    rows.push(r)
    console.log(`  ${r.run}: ${r.windows.map((x) => x.toFixed(0)).join(", ")} tok/s per window (${((Date.now() - t0) / 1000).toFixed(0)} s with start-up)`)
  }
} finally {
  await server?.stop()
}

const [inproc, one, two] = rows
const kb = (x: number) => (x === 0 ? "0" : `${(x / 1024).toFixed(0)} KiB`)
console.log("")
console.log("| run | tokens/s (median) | ratio | ms per version | grads pushed / step | params to workers / step | batches / step |")
console.log("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
console.log(`| ${inproc.run} | ${inproc.tokensPerSec.toFixed(0)} | 1.00 | ${inproc.stepMs.toFixed(0)} | 0 | 0 | 0 |`)
console.log(`| ${one.run} | ${one.tokensPerSec.toFixed(0)} | ${(one.tokensPerSec / inproc.tokensPerSec).toFixed(2)} × in-process (goal ≥ 0.95) | ${one.stepMs.toFixed(0)} | ${kb(one.gradBytes)} | ${kb(one.paramBytes)} | ${kb(one.batchBytes)} |`)
console.log(`| ${two.run} | ${two.tokensPerSec.toFixed(0)} | ${(two.tokensPerSec / one.tokensPerSec).toFixed(2)} × 1 worker (goal ≥ 1.8) | ${two.stepMs.toFixed(0)} | ${kb(two.gradBytes)} | ${kb(two.paramBytes)} | ${kb(two.batchBytes)} |`)
console.log("\nwhere a version's time goes (medians, ms): a worker leases a batch, waits for the new params, computes, pushes; the PS applies")
console.log("| run | lease | wait for params | forward + backward | push | PS: LR + apply + broadcast |")
console.log("| --- | ---: | ---: | ---: | ---: | ---: |")
console.log(`| ${inproc.run} | – | – | ${inproc.stepMs.toFixed(0)} (incl. optimizer) | – | – |`)
for (const r of [one, two]) {
  const p = r.phases!
  console.log(`| ${r.run} | ${p.lease.toFixed(1)} | ${p.waitParams.toFixed(1)} | ${p.compute.toFixed(1)} | ${p.push.toFixed(1)} | ${p.psApply.toFixed(1)} |`)
}
console.log(`\nload average at the end ${os.loadavg().map((x) => x.toFixed(1)).join(" ")} (shared machines vary by up to ~1.8× run to run: compare the ratios)`)
