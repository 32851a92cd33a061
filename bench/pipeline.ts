// What pipeline (model) parallelism over NATS costs and gains, measured side by side in ONE
// run, on one small GPT whose per-micro-batch compute dominates the message latency:
//   1. the bubble of GPipe and 1F1B at S=2 stages, M ∈ --micros micro-batches per step:
//      measured = 1 − (mean over the stages of forwardMs + backwardMs) / (stage 0's spanMs),
//      from the stages' StageStep reports, median over the steps after --warmup; beside the
//      theory (S−1)/(M+S−1) (which assumes equal stage times and free communication);
//   2. tokens/s of an S=2 pipeline (1F1B, M=4) against 2 data-parallel workers and against
//      1 worker, all on the same global batch per version (M × B rows: the DP workers use
//      train.accumulate M/2 and M), from the shards' StepApplied events (tokens per window
//      of --window versions after --warmup, median over the windows, as bench/dp.ts);
//   3. the stash: the most micro-batch inputs each stage held for their backward
//      (stashPeak, stashPeakBytes) under GPipe and 1F1B at S=4, M=8 (1F1B: at most S−k on
//      stage k, stage 0: S; GPipe: M; the middle stages hold activations);
//   4. the recompute overhead (tfjs keeps no tape between calls, so a stage that is not the
//      last reruns its forward inside its backward): stage 0's forward ÷ backward time per
//      micro-batch, over NATS (StageStep) and in this process (stageForward / stageBackward
//      on the job's stage 0, timed alone, wasm, no bus).
// Every configuration is a fresh cluster (loader, scheduler, one PS shard per stage, and the
// workers / stages, each its own `flotilla launch` process) on one local nats-server.
//   node bench/pipeline.ts [--layers 4] [--width 128] [--heads 4] [--context 64] [--batch 4]
//                          [--steps 10] [--warmup 3] [--window 3] [--micros 2,4,8]
//                          [--reps 10] [--timeout 300] [--log warn] [--nats URL]
// Defaults: vocab 256, context 64, 4 layers, width 128, 4 heads, B = 4 rows per micro-batch;
// --steps timed versions after --warmup (the job runs warmup + steps + 1); --reps timings per
// in-process op; a configuration not done after --timeout s is reported as STALLED (with its
// actors' last lines, --log sets their level) and the bench goes on. ~3-4 minutes on 2 quiet
// cores (8 clusters; more on a loaded machine). Also prints where a version's time goes and
// how many NormShare messages the two shards exchanged per version (2 when none is resent).
// Owns nothing but measurement; asserts nothing.
import os from "node:os"
import { median, tokenWindows } from "./stats.ts"
import { parseArgs } from "node:util"
import { Effect, Exit, Layer, References, Result, Scope } from "effect"
import { makePlanForJob } from "../actors/loader/loader.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { startLocalNatsServer } from "../shared/bus/local-server.ts"
import { NatsBus } from "../shared/bus/nats.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { resolveJob, type JobConfig } from "../shared/config/job.ts"
import { countParams, lossAndGrads, sizeOf } from "../shared/models/model.ts"
import { stageBackward, stageForward, stagesForJob } from "../shared/models/pipeline.ts"
import { makeModel, trainableNames } from "../shared/models/zoo.ts"
import { decodeBytes } from "../shared/protocol/decode.ts"
import { StageStep } from "../shared/protocol/messages.ts"
import { subjects } from "../shared/protocol/subjects.ts"
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
    micros: { type: "string" },
    reps: { type: "string" },
    timeout: { type: "string" },
    log: { type: "string" },
    nats: { type: "string" }
  }
})
const num = (x: string | undefined, d: number) => (x === undefined ? d : Number(x))
const model = { kind: "gpt" as const, vocabSize: 256, contextLength: num(v.context, 64), layers: num(v.layers, 4), heads: num(v.heads, 4), width: num(v.width, 128) }
const B = num(v.batch, 4)
const STEPS = num(v.steps, 10)
const WARMUP = num(v.warmup, 3)
const WINDOW = num(v.window, 3)
const MICROS = (v.micros ?? "2,4,8").split(",").map(Number)
const REPS = num(v.reps, 10)
/** a configuration that has not reached its last version after this long is reported as stalled, and the bench goes on. */
const TIMEOUT_MS = num(v.timeout, 300) * 1000
const T = model.contextLength
const S = 2
const M_DP = 4 // the pipeline of measurement 2, and the global batch of its DP comparison: M_DP × B rows
const M_STASH = Math.max(...MICROS)

/** tokens/s of each window of WINDOW steps after WARMUP (bench/stats.ts). */
const windows = (ends: number[], tokens: number[]): number[] => tokenWindows(ends, tokens, WARMUP, WINDOW)

interface Config {
  readonly name: string
  readonly label: string
  readonly workers: number
  readonly stages: number
  readonly micros: number
  readonly schedule: "1f1b" | "gpipe"
  /** DP: micro-batches each worker accumulates per push. */
  readonly accumulate: number
}

const jobPatch = (c: Config) => ({
  job: c.name,
  model,
  data: { corpus: "moby-dick", batchSize: B, valBatches: 1 },
  train: {
    steps: WARMUP + STEPS + 1, evalEvery: 0, checkpointEvery: 0, clipNorm: 1, consistency: { mode: "sync" }, accumulate: c.accumulate,
    heartbeatMs: 200, livenessMs: 30_000, leaseTimeoutMs: 120_000
  },
  topology: c.stages > 1 ? { workers: c.workers, stages: c.stages, microBatches: c.micros, schedule: c.schedule, partition: "flops" } : { workers: c.workers, psShards: 1 }
})

interface Run {
  readonly config: Config
  readonly tokensPerSec: number
  readonly windows: number[]
  /** median ms between versions (timed ones). */
  readonly versionMs: number
  /** StageStep of each stage by version (the newest attempt). */
  readonly stageSteps: StageStep[]
  readonly attemptsOver0: number
  readonly rejected: number
  readonly warnLines: string[]
  readonly seconds: number
  /** NormShare messages (the shards' clipping exchange) seen per applied version: 2 per version with 2 shards when nothing is resent. */
  readonly normsPerVersion: number
  /** set when the run did not reach its last version within TIMEOUT_MS: what it was doing. */
  readonly stalled?: string
  /** medians over the timed versions, ms: a DP worker's phases (WorkerStep) and shard 0's apply (StepApplied.aggregateMs). */
  readonly phases: { lease: number; waitParams: number; compute: number; push: number; psApply: number }
}

/** A plain NATS subscriber to the job's StageStep reports (observe() records WorkerStep only). */
const watchStages = async (url: string, job: JobConfig) => {
  const scope = Scope.makeUnsafe()
  const quiet = Layer.succeed(References.MinimumLogLevel, "Warn")
  const ctx = await Effect.runPromise(
    Layer.buildWithScope(NatsBus.layer({ servers: url.split(","), name: `flotilla-${job.job}-bench-stages` }), scope).pipe(Effect.provide(quiet))
  )
  const steps: StageStep[] = []
  let bad = 0
  let norms = 0
  await Effect.runPromise(
    Effect.gen(function* () {
      const bus = yield* Bus
      yield* bus.subscribe(subjects(job.job).metrics("stage"), (m) => {
        const r = decodeBytes(StageStep, m.subject, m.data)
        if (Result.isSuccess(r)) steps.push(r.success)
        else bad++
        return Effect.void
      })
      yield* bus.subscribe(subjects(job.job).psNormAll, () => {
        norms++
        return Effect.void
      })
      yield* bus.flush()
    }).pipe(Scope.provide(scope), Effect.provideContext(ctx)) as Effect.Effect<void, unknown>
  )
  return { steps, bad: () => bad, norms: () => norms, close: () => Effect.runPromise(Scope.close(scope, Exit.void)) }
}

const runConfig = async (url: string, c: Config): Promise<Run> => {
  const t0 = Date.now()
  const cluster = makeCluster(url, jobPatch(c), { FLOTILLA_LOG: v.log ?? "warn" })
  const job = cluster.job
  const obs = await observe(url, job)
  const stages = await watchStages(url, job)
  try {
    cluster.spawnServices()
    for (let r = 0; r < c.workers; r++) {
      if (c.stages === 1) cluster.spawn("worker", `worker-${r}`)
      else for (let k = 0; k < c.stages; k++) cluster.spawn("worker", k === 0 ? `worker-${r}` : `worker-${r}-s${k}`, ["--stage", String(k), "--replica", String(r)])
    }
    const last = job.train.steps
    let stalled: string | undefined
    await obs.until(() => obs.version() >= last, TIMEOUT_MS, () => `${c.label}: version ${last} (at ${obs.version()})`).catch((e: Error) => {
      stalled = `${e.message}; ${stages.norms()} NormShare messages; the actors' last lines:\n${cluster.logs(4)}`
    })
    // the StageStep of the last step is published before its push: give its delivery a moment
    if (c.stages > 1 && !stalled) {
      const have = () => new Set(stages.steps.map((s) => `${s.replica}/${s.stage}/${s.version}`)).size >= c.workers * c.stages * last
      await obs.until(have, 5_000, "every stage's StageStep").catch(() => undefined)
    }
    const applied = obs.appliedOf(0)
    const ends = applied.length === 0 ? [] : [applied[0].at - applied[0].aggregateMs, ...applied.map((a) => a.at)]
    const tokens = [0, ...applied.map((a) => a.tokens)]
    const w = windows(ends, tokens)
    const gaps = applied.filter((a) => a.version > WARMUP + 1).map((a, i, xs) => (i === 0 ? Number.NaN : a.at - xs[i - 1].at)).filter(Number.isFinite)
    // the newest attempt of each (replica, stage, version)
    const newest = new Map<string, StageStep>()
    for (const s of stages.steps) {
      const key = `${s.replica}/${s.stage}/${s.version}`
      const old = newest.get(key)
      if (!old || s.attempt >= old.attempt) newest.set(key, s)
    }
    const ws = obs.workerSteps.filter((s) => s.version >= WARMUP)
    const phases = {
      lease: median(ws.map((s) => s.waitBatchMs)),
      waitParams: median(ws.map((s) => s.waitParamsMs)),
      compute: median(ws.map((s) => s.computeMs)),
      push: median(ws.map((s) => s.pushMs)),
      psApply: median(applied.filter((a) => a.version > WARMUP).map((a) => a.aggregateMs))
    }
    const warnLines = cluster.actors.flatMap((a) => a.lines.filter((l) => /warn|error|retry|again|dropping/i.test(l) && !/no JetStream/.test(l)).map((l) => `${a.id}: ${l}`))
    return {
      config: c,
      tokensPerSec: median(w),
      windows: w,
      versionMs: median(gaps),
      stageSteps: [...newest.values()].sort((a, b) => a.version - b.version || a.stage - b.stage),
      attemptsOver0: stages.steps.filter((s) => s.attempt > 0).length + stages.bad(),
      rejected: obs.errors.length,
      warnLines,
      phases,
      normsPerVersion: stages.norms() / Math.max(1, applied.length),
      ...(stalled ? { stalled } : {}),
      seconds: (Date.now() - t0) / 1000
    }
  } finally {
    await stages.close()
    await obs.close()
    await cluster.stop()
  }
}

// ---------------------------------------------------------------- in-process recompute timing

interface InProc {
  readonly fwd0: number
  readonly bwd0: number
  readonly bwdLast: number
  readonly whole: number
  readonly cut: string
}

const inProcess = async (job: JobConfig): Promise<InProc> => {
  await initBackend("wasm")
  const def = makeModel(job.model)
  const st = stagesForJob(job, def)
  const trainable = new Set(trainableNames(job, def))
  const params = def.init(job.train.seed)
  const batch = makePlanForJob(job).trainBatch(0, 0)
  const x0 = stageForward(st[0], params, undefined, batch)
  const dy = { data: new Float32Array(x0.data.length).map((_, i) => Math.sin(i) * 1e-3), shape: x0.shape }
  const time = (f: () => unknown): number => {
    for (let i = 0; i < 2; i++) f()
    const ms: number[] = []
    for (let i = 0; i < REPS; i++) {
      const t = performance.now()
      f()
      ms.push(performance.now() - t)
    }
    return median(ms)
  }
  const fwd0 = time(() => stageForward(st[0], params, undefined, batch))
  const bwd0 = time(() => stageBackward(def, st[0], params, undefined, batch, dy, trainable))
  const bwdLast = time(() => stageBackward(def, st[S - 1], params, x0, batch, undefined, trainable))
  const whole = time(() => lossAndGrads(def, params, batch, trainable))
  const cut = st.map((s) => `stage ${s.index}: ${s.blocks.map((b) => b.name).join(" ")} (${s.params.reduce((n, p) => n + sizeOf(p.shape), 0).toLocaleString("en")} params)`).join("; ")
  return { fwd0, bwd0, bwdLast, whole, cut }
}

// ---------------------------------------------------------------- main

const pipeCfg = (schedule: "1f1b" | "gpipe", M: number, stages = S): Config => ({ name: `bench-pipe-${schedule}-s${stages}-m${M}`, label: `${schedule === "1f1b" ? "1F1B" : "GPipe"} S=${stages} M=${M}`, workers: 1, stages, micros: M, schedule, accumulate: 1 })
/** the stash is measured at 4 stages: the middle ones hold activations, which S=2 has none of */
const S_STASH = 4
const dpCfg = (workers: number): Config => ({ name: `bench-pipe-dp${workers}`, label: `DP ${workers} worker${workers > 1 ? "s" : ""} (accumulate ${M_DP / workers})`, workers, stages: 1, micros: 1, schedule: "1f1b", accumulate: M_DP / workers })

const configs: Config[] = [
  ...MICROS.flatMap((M) => [pipeCfg("gpipe", M), pipeCfg("1f1b", M)]),
  ...(MICROS.includes(M_DP) ? [] : [pipeCfg("1f1b", M_DP)]),
  pipeCfg("gpipe", M_STASH, S_STASH),
  pipeCfg("1f1b", M_STASH, S_STASH),
  dpCfg(2),
  dpCfg(1)
]

const wall0 = Date.now()
const pipeJob = resolveJob(jobPatch(pipeCfg("1f1b", M_DP)), "bench job")
const def = makeModel(pipeJob.model)
console.log(`bench/pipeline: gpt ${JSON.stringify(model)}, ${countParams(def).toLocaleString("en")} params, B=${B} rows × T=${T} per micro-batch; ${os.cpus().length} cores (${os.cpus()[0]?.model ?? "?"}), load ${os.loadavg().map((x) => x.toFixed(1)).join(" ")}`)
console.log(`${STEPS} timed versions after ${WARMUP} warm-up per configuration; tokens/s windows of ${WINDOW}; optimizer ${pipeJob.optimizer.kind}, clip 1, sync`)

const ip = await inProcess(pipeJob)
console.log(`cut (partition flops, S=${S}): ${ip.cut}`)
console.log(`in-process timing done (${REPS} reps each)`)

const server = v.nats ? undefined : await startLocalNatsServer()
const url = v.nats ?? server!.url
const runs = new Map<string, Run>()
try {
  for (const c of configs) {
    const r = await runConfig(url, c)
    runs.set(c.name, r)
    if (r.stalled) console.log(`  ${c.label}: STALLED — ${r.stalled}`)
    console.log(`  ${c.label}: ${r.windows.map((x) => x.toFixed(0)).join(", ")} tok/s per window; ${r.stageSteps.length} StageStep; ${r.seconds.toFixed(0)} s with start-up`)
  }
} finally {
  await server?.stop()
}

// ---------------------------------------------------------------- the tables

const pad = (rows: string[][]): string => {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)))
  return rows.map((r, ri) => r.map((c, i) => (i === 0 || ri === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join("  ").trimEnd()).join("\n")
}
const f0 = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : "–")
const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : "–")
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : "–")
const pct = (x: number) => (Number.isFinite(x) ? `${(x * 100).toFixed(1)}%` : "–")
const kib = (x: number) => `${(x / 1024).toFixed(1)} KiB`

const timed = (r: Run) => r.stageSteps.filter((s) => s.version >= WARMUP)
const ofStage = (r: Run, k: number) => timed(r).filter((s) => s.stage === k)

/** per timed version: measured bubble (needs every stage's report of that version). */
const bubbles = (r: Run): number[] => {
  const out: number[] = []
  const versions = [...new Set(timed(r).map((s) => s.version))]
  for (const ver of versions) {
    const xs = timed(r).filter((s) => s.version === ver)
    const s0 = xs.find((s) => s.stage === 0)
    if (!s0 || xs.length < r.config.stages || s0.spanMs <= 0) continue
    const busy = xs.reduce((n, s) => n + s.forwardMs + s.backwardMs, 0) / xs.length
    out.push(1 - busy / s0.spanMs)
  }
  return out
}

console.log(`\n1. bubble at S=${S} (measured: 1 − mean over stages of compute ÷ stage 0's span; medians over the timed steps; theory (S−1)/(M+S−1))`)
{
  const rows = [["schedule", "M", "theory", "measured", "stage 0 span ms", "stage 0 fwd+bwd ms", "stage 1 fwd+bwd ms", "ms / version", "tokens/s", "steps"]]
  for (const M of MICROS) for (const sch of ["gpipe", "1f1b"] as const) {
    const r = runs.get(pipeCfg(sch, M).name)!
    const s0 = ofStage(r, 0)
    const s1 = ofStage(r, 1)
    rows.push([
      sch === "1f1b" ? "1F1B" : "GPipe", String(M), pct((S - 1) / (M + S - 1)), pct(median(bubbles(r))),
      f0(median(s0.map((s) => s.spanMs))), f0(median(s0.map((s) => s.forwardMs + s.backwardMs))), f0(median(s1.map((s) => s.forwardMs + s.backwardMs))),
      f0(r.versionMs), f0(r.tokensPerSec), String(bubbles(r).length)
    ])
  }
  console.log(pad(rows))
}

console.log(`\n2. throughput at the same global batch per version (${M_DP} × ${B} rows × ${T} = ${M_DP * B * T} tokens); StepApplied windows, median`)
{
  const pipe = runs.get(pipeCfg("1f1b", M_DP).name)!
  const dp2 = runs.get(dpCfg(2).name)!
  const one = runs.get(dpCfg(1).name)!
  const rows = [["run", "processes computing", "tokens/s", "× 1 worker", "× 2 DP workers", "ms / version", "windows"]]
  for (const [r, n] of [[one, 1], [dp2, 2], [pipe, 2]] as const) {
    rows.push([r.config.label, String(n), f0(r.tokensPerSec), f2(r.tokensPerSec / one.tokensPerSec), f2(r.tokensPerSec / dp2.tokensPerSec), f0(r.versionMs), r.windows.map(f0).join(" ")])
  }
  console.log(pad(rows))
  console.log(`where a version's time goes (medians, ms; DP: a worker's WorkerStep phases; pipeline: stage 0's span, the rest is push → apply → broadcast → next step)`)
  const ph = [["run", "lease", "wait for params", "compute", "push", "PS apply", "ms / version"]]
  for (const r of [one, dp2]) {
    const p = r.phases
    ph.push([r.config.label, f1(p.lease), f1(p.waitParams), f1(p.compute), f1(p.push), f1(p.psApply), f0(r.versionMs)])
  }
  const span0 = median(ofStage(pipe, 0).map((s) => s.spanMs))
  ph.push([pipe.config.label, "–", "–", `${f1(span0)} (stage 0 span)`, "–", f1(pipe.phases.psApply), f0(pipe.versionMs)])
  console.log(pad(ph))
}

console.log(`\n3. inputs stashed for the backward at S=${S_STASH}, M=${M_STASH} (max over the timed steps; 1F1B limit S−k, stage 0: S; GPipe: M; stage 0 stashes token batches, the others activations; the last stage's are those that arrived before its forward + backward)`)
{
  const rows = [["schedule", "stage", "limit", "stashPeak", "stashPeakBytes", "per input"]]
  for (const sch of ["gpipe", "1f1b"] as const) {
    const r = runs.get(pipeCfg(sch, M_STASH, S_STASH).name)!
    for (let k = 0; k < S_STASH; k++) {
      const xs = ofStage(r, k)
      const peak = Math.max(0, ...xs.map((s) => s.stashPeak))
      const bytes = Math.max(0, ...xs.map((s) => s.stashPeakBytes))
      const limit = k === S_STASH - 1 ? "–" : String(sch === "gpipe" ? M_STASH : S_STASH - k)
      rows.push([sch === "1f1b" ? "1F1B" : "GPipe", String(k), limit, String(peak), kib(bytes), peak > 0 ? kib(bytes / peak) : "–"])
    }
  }
  console.log(pad(rows))
}

console.log(`\n4. recompute: stage 0's backward reruns its forward (overhead = forward ÷ backward per micro-batch, the share of the backward spent recomputing)`)
{
  const rows = [["where", "stage 0 fwd ms/micro", "stage 0 bwd ms/micro", "overhead", "last stage fwd+bwd ms/micro", "whole model fwd+bwd ms"]]
  for (const M of MICROS) for (const sch of ["gpipe", "1f1b"] as const) {
    const r = runs.get(pipeCfg(sch, M).name)!
    const s0 = ofStage(r, 0)
    const sl = ofStage(r, S - 1)
    const fw = median(s0.map((s) => s.forwardMs / s.micros))
    const bw = median(s0.map((s) => s.backwardMs / s.micros))
    rows.push([`NATS ${r.config.label}`, f1(fw), f1(bw), pct(fw / bw), f1(median(sl.map((s) => (s.forwardMs + s.backwardMs) / s.micros))), "–"])
  }
  rows.push([`in-process (wasm, median of ${REPS})`, f1(ip.fwd0), f1(ip.bwd0), pct(ip.fwd0 / ip.bwd0), f1(ip.bwdLast), f1(ip.whole)])
  console.log(pad(rows))
}

{
  const all = [...runs.values()]
  const retries = all.reduce((n, r) => n + r.attemptsOver0, 0)
  const rejected = all.reduce((n, r) => n + r.rejected, 0)
  const missing = all.filter((r) => r.config.stages > 1).map((r) => {
    const want = (WARMUP + STEPS + 1) * r.config.stages
    return r.stageSteps.length < want ? `${r.config.label}: ${r.stageSteps.length}/${want} StageStep` : ""
  }).filter(Boolean)
  console.log(`\nStageStep reports with attempt > 0: ${retries}; rejected messages: ${rejected}${missing.length > 0 ? `; missing: ${missing.join(", ")}` : "; every stage reported every step"}`)
  console.log(`NormShare messages per version (2 shards share their squared norms; 2 = none resent): ${all.filter((r) => r.config.stages > 1).map((r) => `${r.config.label} ${f1(r.normsPerVersion)}`).join(", ")}`)
  const stalled = all.filter((r) => r.stalled)
  if (stalled.length > 0) console.log(`STALLED (its numbers above are partial): ${stalled.map((r) => r.config.label).join(", ")}`)
  const warns = all.flatMap((r) => r.warnLines.map((l) => `  [${r.config.label}] ${l}`))
  if (warns.length > 0) console.log(`actor warnings (${warns.length}):\n${warns.slice(0, 20).join("\n")}`)
}
console.log(`\nwall ${((Date.now() - wall0) / 1000).toFixed(0)} s; load average at the end ${os.loadavg().map((x) => x.toFixed(1)).join(" ")} (shared machines vary run to run: compare within the run)`)
