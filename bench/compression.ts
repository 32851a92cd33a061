// What gradient compression costs and buys, side by side in ONE run, on gpt-mini's shape
// (jobs/gpt-mini.yaml: vocab 256, context 128, 4 layers, 4 heads, width 128; its AdamW,
// cosine schedule and clipping):
//   1. loss at equal steps and bytes per step, per codec: 2 data-parallel workers simulated
//      in-process along the real wire path (bench/compression-train.ts: GradEncoder with
//      per-worker, per-tensor error feedback → encodeBundle → decodeBundle → decodeTensor →
//      the parameter server's ShardState), the same init and batches for every codec; two
//      codecs train at once, one child process each (one core each);
//   2. encode / decode CPU time per codec on one full real gradient (every tensor through
//      the codec, with a residual), median of --reps;
//   3. tokens/s over a slow link: bench/throttle.ts (a token-bucket TCP proxy, --mbit each
//      way, shared by every connection) between the WORKERS and nats-server; loader,
//      scheduler and parameter server connect directly. Real actor processes
//      (`flotilla launch`), 2 workers, sync, per codec of --link-codecs, plus the same f32
//      job without the proxy (a link codec "C+bf16" also sends the params broadcast in bf16).
//      Counts the bytes the proxy carried up (grads, leases, heartbeats) and down (the
//      params broadcast, batches) per version, and the params pulls on top of the broadcast.
//   node bench/compression.ts [--quick] [--sections 1,2,3]
//     1: [--steps 300] [--batch 8] [--seq 64] [--val-batches 8] [--codecs f32,bf16,int8,int4,sign1,topk:0.01] [--parallel 2] [--min-elements N]
//     2: [--reps 20]
//     3: [--link-codecs f32,int8,sign1,sign1+bf16] [--link-steps 30] [--link-batch 8] [--warmup 4] [--window 4] [--mbit 100] [--latency-ms 0] [--timeout 300] [--heartbeat-ms 2000] [--log warn]
// --quick: 20 steps, f32 and int8, 3 reps, 5 link versions (a smoke test, ~1-2 minutes).
// Defaults: ~14 minutes on 2 quiet cores (section 1 ~9, section 3 ~4.5); 19 minutes measured
// with the machine's load at 3-11 (`npm run bench:compression`; not in `npm run bench`).
// Prints progress to stderr, tables to stdout. Figures: docs/QUANTIZATION.md.
// Owns nothing but measurement; asserts nothing.
import { fork } from "node:child_process"
import os from "node:os"
import { parseArgs } from "node:util"
import { Result } from "effect"
import { connect } from "nats"
import { makeLmPlan, trainBatch } from "../actors/loader/plan.ts"
import { startLocalNatsServer, type LocalNatsServer } from "../shared/bus/local-server.ts"
import { initBackend } from "../shared/compute/backend.ts"
import { loadJobFile } from "../shared/config/job.ts"
import { loadCorpus } from "../shared/data/corpus.ts"
import { gptBatch } from "../shared/models/gpt.ts"
import { countParams, lossAndGrads } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { decodeTensor, encodedBytes, encodeTensor } from "../shared/wire/codecs.ts"
import { specOf } from "../shared/wire/compression.ts"
import { encodeBundle } from "../shared/wire/tensor.ts"
import { subjects } from "../shared/protocol/subjects.ts"
import { makeCluster, observe } from "../test/support/cluster.ts"
import { DEFAULT_JOB_FILE, type TrainArgs, type TrainResult } from "./compression-train.ts"
import { median, tokenWindows } from "./stats.ts"
import { startThrottle, type LinkCounts } from "./throttle.ts"

const { values: v } = parseArgs({
  options: {
    quick: { type: "boolean" },
    sections: { type: "string" },
    steps: { type: "string" },
    batch: { type: "string" },
    seq: { type: "string" },
    "val-batches": { type: "string" },
    codecs: { type: "string" },
    parallel: { type: "string" },
    "min-elements": { type: "string" },
    reps: { type: "string" },
    "link-codecs": { type: "string" },
    "link-steps": { type: "string" },
    "link-batch": { type: "string" },
    warmup: { type: "string" },
    window: { type: "string" },
    mbit: { type: "string" },
    "latency-ms": { type: "string" },
    timeout: { type: "string" },
    "heartbeat-ms": { type: "string" },
    log: { type: "string" },
    job: { type: "string" }
  }
})
const Q = v.quick === true
const num = (x: string | undefined, full: number, quick = full) => (x === undefined ? (Q ? quick : full) : Number(x))
const list = (x: string | undefined, full: string, quick = full) => (x ?? (Q ? quick : full)).split(",").filter(Boolean)
const SECTIONS = new Set(list(v.sections, "1,2,3").map(Number))
const JOB_FILE = v.job ?? DEFAULT_JOB_FILE
const STEPS = num(v.steps, 300, 20)
const B = num(v.batch, 8)
const SEQ = num(v.seq, 64)
const VAL = num(v["val-batches"], 8, 2)
const CODECS = list(v.codecs, "f32,bf16,int8,int4,sign1,topk:0.01", "f32,int8")
const PARALLEL = num(v.parallel, 2)
const MIN_ELEMENTS = v["min-elements"] === undefined ? undefined : Number(v["min-elements"])
const REPS = num(v.reps, 20, 3)
const LINK_CODECS = list(v["link-codecs"], "f32,int8,sign1,sign1+bf16", "f32,int8")
const LINK_STEPS = num(v["link-steps"], 30, 5)
const LINK_B = num(v["link-batch"], 8)
const WARMUP = num(v.warmup, 4, 1)
const WINDOW = num(v.window, 4, 1)
const MBIT = num(v.mbit, 100)
const LATENCY = num(v["latency-ms"], 0)
const TIMEOUT_MS = num(v.timeout, 300) * 1000
/**
 * train.heartbeatMs of the link jobs. A worker's params watchdog fires after max(2 s, 4 ×
 * heartbeat) measured from when its last params ARRIVED, compute included: with a 500 ms
 * heartbeat every version whose compute takes ≥ 2 s (gpt-mini on a loaded machine) pulls the
 * whole params again right after the push, and the server answers at once with the version
 * the worker has (3.3 MB per worker per version, down the slow link). 2 s (watchdog 8 s)
 * keeps that out of the comparison; --heartbeat-ms 500 shows it (the pulls column).
 */
const HEARTBEAT_MS = num(v["heartbeat-ms"], 2000)

/** the goals of the compression issue: at most this much worse validation loss for at least this many times fewer bytes than dense f32. */
const GOALS: Record<string, { ratio: number; loss: number }> = { int8: { ratio: 3.9, loss: 0.01 }, int4: { ratio: 7, loss: 0.02 }, sign1: { ratio: 25, loss: 0.05 } }

// ---------------------------------------------------------------- drawing

const pad = (rows: string[][]): string => {
  const w = rows[0].map((_, i) => Math.max(...rows.map((r) => (r[i] ?? "").length)))
  return rows.map((r, ri) => r.map((c, i) => (i === 0 || ri === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join("  ").trimEnd()).join("\n")
}
const f1 = (x: number) => (Number.isFinite(x) ? x.toFixed(1) : "–")
const f2 = (x: number) => (Number.isFinite(x) ? x.toFixed(2) : "–")
const f3 = (x: number) => (Number.isFinite(x) ? x.toFixed(3) : "–")
const f0 = (x: number) => (Number.isFinite(x) ? x.toFixed(0) : "–")
const kb = (x: number) => (Number.isFinite(x) ? `${(x / 1024).toFixed(1)} KiB` : "–")
const pct = (x: number) => (Number.isFinite(x) ? `${x >= 0 ? "+" : ""}${(x * 100).toFixed(2)}%` : "–")
const BARS = "▁▂▃▄▅▆▇█"
/** the means of `cols` equal runs of xs. */
const buckets = (xs: readonly number[], cols: number): number[] => {
  const n = Math.min(cols, xs.length)
  return Array.from({ length: n }, (_, i) => {
    const a = Math.floor((i * xs.length) / n)
    const b = Math.floor(((i + 1) * xs.length) / n)
    let s = 0
    for (let j = a; j < b; j++) s += xs[j]
    return s / (b - a)
  })
}
const spark = (xs: readonly number[], lo: number, hi: number): string =>
  xs.map((x) => (Number.isFinite(x) ? BARS[Math.max(0, Math.min(7, Math.round(((x - lo) / (hi - lo || 1)) * 7)))] : " ")).join("")
const load = () => os.loadavg().map((x) => x.toFixed(1)).join(" ")

// ---------------------------------------------------------------- header

const wall0 = Date.now()
const job = loadJobFile(JOB_FILE)
const def = makeModel(job.model)
const NUMEL = countParams(def)
const F32_DENSE = 4 * NUMEL
const minEl = MIN_ELEMENTS ?? job.train.compression.minElements
console.log(`bench/compression: gpt ${JSON.stringify(job.model)} (${JOB_FILE.split("/").slice(-2).join("/")}), ${NUMEL.toLocaleString("en")} params, dense f32 gradient ${kb(F32_DENSE)}`)
console.log(`${os.cpus().length} cores (${os.cpus()[0]?.model ?? "?"}), load ${load()}; optimizer ${JSON.stringify(job.optimizer)}, schedule ${JSON.stringify(job.schedule)}, clip ${job.train.clipNorm}`)
if (SECTIONS.has(1)) console.log(`1: ${STEPS} versions, 2 workers × batch ${B}×${SEQ} each (context cut to ${SEQ} for time), ${VAL} val batches; codecs ${CODECS.join(" ")}; tensors < ${minEl} elements travel f32; ${PARALLEL} at a time`)
if (SECTIONS.has(3)) console.log(`3: ${MBIT} Mbit/s each way${LATENCY > 0 ? `, +${LATENCY} ms one way` : ""}; ${LINK_STEPS} versions (${WARMUP} warm-up, windows of ${WINDOW}), 2 workers × batch ${LINK_B}×${job.model.kind === "gpt" ? job.model.contextLength : "?"}, sync; codecs ${LINK_CODECS.join(" ")}`)

// ---------------------------------------------------------------- 2. encode/decode CPU time

const cpuTimes = async () => {
  await initBackend("wasm")
  const corpus = loadCorpus(job.data.corpus)
  const plan = makeLmPlan(corpus.bytes, { T: SEQ, B, valFraction: job.data.valFraction, seed: job.data.seed, valBatches: 1 })
  const { grads } = lossAndGrads(def, def.init(job.train.seed), gptBatch(trainBatch(plan, 0, 0), plan.B))
  const rows = [["codec", "bytes", "× fewer than f32", "encode ms", "encode MB/s", "decode ms", "decode MB/s", "encodedBytes()"]]
  for (const name of CODECS) {
    const c = specOf(name)
    const residuals = new Map(def.specs.map((s) => [s.name, new Float32Array(grads.get(s.name)!.length)]))
    const outs = new Map(def.specs.map((s) => [s.name, new Float32Array(grads.get(s.name)!.length)]))
    const enc: number[] = []
    const dec: number[] = []
    let bytes = 0
    for (let r = 0; r < REPS + 2; r++) {
      const t0 = performance.now()
      const wire = def.specs.map((s) => encodeTensor(c, s.name, s.shape, grads.get(s.name)!, residuals.get(s.name)))
      const t1 = performance.now()
      for (const t of wire) decodeTensor(t, outs.get(t.name))
      const t2 = performance.now()
      if (r >= 2) {
        enc.push(t1 - t0)
        dec.push(t2 - t1)
      }
      if (r === 0) {
        const e = encodeBundle({ tensors: wire, meta: { kind: "grads", job: job.job, version: 0, step: 0, sender: "bench", codec: name } })
        if (Result.isFailure(e)) throw new Error(`${name}: encodeBundle: ${e.failure.message}`)
        bytes = e.success.payload.length
      }
    }
    const predicted = def.specs.reduce((n, s) => n + encodedBytes(c, grads.get(s.name)!.length), 0)
    const mbs = (ms: number) => F32_DENSE / 1e6 / (ms / 1000)
    rows.push([name, kb(bytes), f2(F32_DENSE / bytes), f2(median(enc)), f0(mbs(median(enc))), f2(median(dec)), f0(mbs(median(dec))), kb(predicted)])
  }
  return rows
}

// ---------------------------------------------------------------- 1. training runs, two at a time

const trainOne = (codec: string): Promise<TrainResult> =>
  new Promise((resolve, reject) => {
    const a: TrainArgs = { codec, steps: STEPS, batch: B, seq: SEQ, valBatches: VAL, job: JOB_FILE, ...(MIN_ELEMENTS !== undefined ? { minElements: MIN_ELEMENTS } : {}) }
    const args = ["--codec", a.codec, "--steps", String(a.steps), "--batch", String(a.batch), "--seq", String(a.seq), "--val-batches", String(a.valBatches), "--job", a.job]
    if (a.minElements !== undefined) args.push("--min-elements", String(a.minElements))
    const kid = fork(new URL("./compression-train.ts", import.meta.url).pathname, args, { stdio: ["ignore", "ignore", "inherit", "ipc"] })
    let result: TrainResult | undefined
    kid.on("message", (m) => (result = m as TrainResult))
    kid.on("exit", (code) => (result ? resolve(result) : reject(new Error(`training child for ${codec} exited with ${code} and no result`))))
  })

const trainAll = async (): Promise<Map<string, TrainResult | Error>> => {
  const out = new Map<string, TrainResult | Error>()
  const todo = [...CODECS]
  const lane = async () => {
    for (let c = todo.shift(); c !== undefined; c = todo.shift()) {
      const name = c
      out.set(name, await trainOne(name).catch((e: Error) => e))
    }
  }
  await Promise.all(Array.from({ length: Math.max(1, PARALLEL) }, lane))
  return out
}

const trainTables = (res: Map<string, TrainResult | Error>) => {
  const ok = CODECS.map((c) => res.get(c)).filter((r): r is TrainResult => r !== undefined && !(r instanceof Error))
  const f32 = ok.find((r) => r.codec === "f32")
  const rows = [["codec", "bytes/step", "× fewer than f32 sent", "× fewer than dense f32", "val loss", "Δ vs f32", "encode ms/grad", "decode ms/grad", "refused", "goal", "met?"]]
  for (const c of CODECS) {
    const r = res.get(c)
    if (r === undefined || r instanceof Error) {
      rows.push([c, "FAILED", String(r?.message ?? "no result").slice(0, 80), "", "", "", "", "", "", "", ""])
      continue
    }
    const dense = (2 * F32_DENSE) / r.bytesPerStep
    const d = f32 ? r.valLoss / f32.valLoss - 1 : Number.NaN
    const base = c.split(":")[0]
    const g = GOALS[base]
    const met = !g ? "–" : !f32 ? (dense >= g.ratio ? "ratio yes; no f32 run" : "NO") : dense >= g.ratio && d <= g.loss ? "yes" : "NO"
    rows.push([c, kb(r.bytesPerStep), f2(f32 ? f32.bytesPerStep / r.bytesPerStep : Number.NaN), f2(dense), r.valLoss.toFixed(4), pct(d), f2(r.encodeMs), f2(r.decodeMs), String(r.refused), g ? `≥${g.ratio}× & ≤${(g.loss * 100).toFixed(0)}%` : "–", met])
  }
  console.log(pad(rows))
  if (ok.length === 0) return
  const man = ok.reduce((n, r) => n + r.manifestBytesPerStep, 0) / ok.length
  console.log(`bytes/step: both workers' bundle payloads (encodeBundle); the manifests (header JSON) add ~${kb(man)} per step more. Dense f32: 2 × ${kb(F32_DENSE)};`)
  console.log(`f32 as sent has the embedding gradients as sparse rows (shared/wire/rows.ts). Goals count against dense f32. Δ: relative, on the mean of ${VAL} val batches.`)
  // the curves: train loss per version, bucket means, one scale for all; and the gap to f32
  const COLS = Math.min(60, STEPS)
  const curves = ok.map((r) => ({ r, b: buckets(r.trainLoss, COLS) }))
  const lo = Math.min(...curves.flatMap((c) => c.b))
  const hi = Math.max(...curves.flatMap((c) => c.b))
  const fb = f32 ? buckets(f32.trainLoss, COLS) : undefined
  console.log(`\ntrain loss per version (${COLS} bucket means of ${STEPS} versions; one scale ${f2(lo)}…${f2(hi)}), and its gap to f32 (each its own scale)`)
  const w = Math.max(...ok.map((r) => r.codec.length))
  for (const { r, b } of curves) {
    const head = `${r.codec.padEnd(w)}  ${f2(r.trainLoss[0])} ${spark(b, lo, hi)} ${f2(b[b.length - 1])}`
    if (!fb || r === f32) {
      console.log(head)
      continue
    }
    const gap = b.map((x, i) => x - fb[i])
    const glo = Math.min(0, ...gap)
    const ghi = Math.max(0, ...gap)
    const sg = (x: number) => `${x >= 0 ? "+" : ""}${x === 0 || Math.abs(x) >= 1e-3 ? x.toFixed(4) : x.toExponential(1)}`
    console.log(`${head}   gap ${spark(gap, glo, ghi)} (${sg(glo)}…${sg(ghi)}, last ${sg(gap[gap.length - 1])})`)
  }
}

// ---------------------------------------------------------------- 3. over a slow link

interface LinkRun {
  readonly label: string
  readonly codec: string
  readonly throttled: boolean
  readonly tokensPerSec: number
  readonly secPerStep: number
  readonly up: number
  readonly down: number
  readonly gradBytes: number
  /** params pulls per version (both workers), on top of the broadcast. */
  readonly pulls: number
  /** clients nats-server dropped as slow consumers during the run. */
  readonly slow: number
  readonly phases: { waitParams: number; compute: number; push: number }
  readonly problem?: string
}

/** why `flotilla launch --codec` would refuse the codec (cli/launch.ts), if it does. */
const launchRefuses = async (codec: string): Promise<string | undefined> => {
  try {
    const { codecFromFlag } = await import("../cli/main.ts")
    codecFromFlag(codec)
    return undefined
  } catch (e) {
    return (e as Error).message
  }
}

/** `codec` or `codec+bf16`: the gradient codec, and the params broadcast in bf16 (train.compression.params). */
/** nats-server's count of slow consumers so far (/varz): a client it disconnected because it could not write to it in time. */
const slowConsumers = async (monitorUrl: string | undefined): Promise<number> => {
  if (monitorUrl === undefined) return Number.NaN
  try {
    const r = await fetch(`${monitorUrl}/varz`, { signal: AbortSignal.timeout(2_000) })
    return ((await r.json()) as { slow_consumers?: number }).slow_consumers ?? 0
  } catch {
    return Number.NaN
  }
}

const linkRun = async (server: LocalNatsServer, spec: string, throttled: boolean): Promise<LinkRun> => {
  const url = server.url
  const slow0 = await slowConsumers(server.monitorUrl)
  const [codec, paramsCodec] = spec.split("+")
  const label = `${codec}${paramsCodec ? `, params ${paramsCodec}` : ""}${throttled ? ` over ${MBIT} Mbit/s` : ", no proxy"}`
  const empty = { label, codec, throttled, tokensPerSec: Number.NaN, secPerStep: Number.NaN, up: Number.NaN, down: Number.NaN, gradBytes: Number.NaN, pulls: Number.NaN, slow: Number.NaN, phases: { waitParams: Number.NaN, compute: Number.NaN, push: Number.NaN } }
  const refused = await launchRefuses(codec)
  if (refused) return { ...empty, problem: `launch refuses it: ${refused}` }
  const throttle = throttled ? await startThrottle({ target: url, mbit: MBIT, latencyMs: LATENCY }) : undefined
  const patch = {
    job: `bench-comp-${spec.replace(/[^A-Za-z0-9]/g, "")}-${throttled ? "slow" : "fast"}`,
    model: job.model,
    optimizer: job.optimizer,
    schedule: job.schedule,
    data: { corpus: job.data.corpus, batchSize: LINK_B, valBatches: 1 },
    train: { steps: LINK_STEPS, evalEvery: 0, checkpointEvery: 0, heartbeatMs: HEARTBEAT_MS, livenessMs: 30_000, leaseTimeoutMs: 120_000, consistency: { mode: "sync" }, compression: { codec, ...(paramsCodec ? { params: paramsCodec } : {}) } },
    topology: { workers: 2, psShards: 1 }
  }
  let cluster: ReturnType<typeof makeCluster>
  try {
    cluster = makeCluster(url, patch, { FLOTILLA_LOG: v.log ?? "warn" })
  } catch (e) {
    await throttle?.close()
    return { ...empty, problem: `job: ${(e as Error).message.split("\n")[0]}` }
  }
  const obs = await observe(url, cluster.job)
  // the params pulls (requests on ps.0.pull): a worker pulls when its params are late (watchdog) or a PS heartbeat is ahead of them
  const nc = await connect({ servers: url, name: "bench-compression-pulls" })
  let pulls = 0
  nc.subscribe(subjects(cluster.job.job).psPull(0), { callback: () => void pulls++ })
  await nc.flush()
  const t0 = Date.now()
  try {
    cluster.spawnServices()
    const viaProxy = throttle ? ["--nats", throttle.url] : []
    for (let w = 0; w < 2; w++) cluster.spawn("worker", `worker-${w}`, [...viaProxy, "--codec", codec])
    // until version `ver`; an actor that exits first (a crash, a bad job) ends the wait at once
    const waitFor = async (ver: number) => {
      const deadline = Date.now() + TIMEOUT_MS
      const why = (what: string) => new Error(`${label}: ${what} waiting for version ${ver} (at ${obs.version()}); proxy ${JSON.stringify(throttle?.counts())}\n${cluster.logs(30)}`)
      while (obs.version() < ver) {
        const dead = cluster.actors.find((a) => !a.running())
        if (dead) {
          await new Promise((r) => setTimeout(r, 2_000)) // a worker exits on the final version: its StepApplied may still be on the way
          if (obs.version() < ver) throw why(`${dead.id} exited (${dead.proc.exitCode ?? dead.proc.signalCode})`)
        }
        if (Date.now() > deadline) throw why(`timed out after ${TIMEOUT_MS} ms`)
        await new Promise((r) => setTimeout(r, 50))
      }
    }
    await waitFor(WARMUP)
    const c0: LinkCounts = throttle?.counts() ?? { up: 0, down: 0, connections: 0 }
    const p0 = pulls
    await waitFor(LINK_STEPS)
    const c1: LinkCounts = throttle?.counts() ?? { up: 0, down: 0, connections: 0 }
    const p1 = pulls
    const applied = obs.appliedOf(0)
    const ends = [applied[0].at - applied[0].aggregateMs, ...applied.map((a) => a.at)]
    const tokens = [0, ...applied.map((a) => a.tokens)]
    const w = tokenWindows(ends, tokens, WARMUP, WINDOW)
    const timed = obs.workerSteps.filter((s) => s.version >= WARMUP)
    const n = LINK_STEPS - WARMUP
    const tail = applied.filter((a) => a.version >= WARMUP)
    process.stderr.write(`  ${label}: ${w.map(f0).join(", ")} tok/s per window (${((Date.now() - t0) / 1000).toFixed(0)} s with start-up)\n`)
    return {
      label,
      codec,
      throttled,
      tokensPerSec: median(w),
      secPerStep: (tail[tail.length - 1].at - tail[0].at) / 1000 / Math.max(1, tail.length - 1),
      up: throttle ? (c1.up - c0.up) / n : Number.NaN,
      down: throttle ? (c1.down - c0.down) / n : Number.NaN,
      pulls: (p1 - p0) / n,
      slow: (await slowConsumers(server.monitorUrl)) - slow0,
      gradBytes: timed.reduce((s, x) => s + x.bytesSent, 0) / Math.max(1, new Set(timed.map((x) => x.version)).size),
      phases: { waitParams: median(timed.map((s) => s.waitParamsMs)), compute: median(timed.map((s) => s.computeMs)), push: median(timed.map((s) => s.pushMs)) }
    }
  } catch (e) {
    process.stderr.write(`  ${label}: ${(e as Error).message}\n`)
    return { ...empty, problem: (e as Error).message.split("\n")[0] }
  } finally {
    await nc.close()
    await obs.close()
    await cluster.stop()
    await throttle?.close()
  }
}

const linkTable = (runs: LinkRun[]) => {
  const fast = runs.find((r) => !r.throttled)
  const slowF32 = runs.find((r) => r.throttled && r.codec === "f32")
  const bps = (MBIT * 1e6) / 8
  const rows = [["run", "tokens/s", "s/version", "× f32 same link", "× unthrottled", "up/version", "down/version", "grads pushed/version", "pulls/version", "slow consumers", "link busy up|down", "wait params ms", "compute ms", "push ms", "not computing ms"]]
  for (const r of runs) {
    if (r.problem) {
      rows.push([r.label, "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", `${r.problem.slice(0, 90)}`])
      continue
    }
    const busy = r.throttled ? `${f0(((r.up / bps) * 100) / r.secPerStep)}% | ${f0(((r.down / bps) * 100) / r.secPerStep)}%` : "–"
    rows.push([
      r.label, f0(r.tokensPerSec), f2(r.secPerStep), r.throttled && slowF32 ? f2(r.tokensPerSec / slowF32.tokensPerSec) : "–", fast ? f2(r.tokensPerSec / fast.tokensPerSec) : "–",
      r.throttled ? kb(r.up) : "–", r.throttled ? kb(r.down) : "–", kb(r.gradBytes), f2(r.pulls), String(r.slow), busy, f1(r.phases.waitParams), f1(r.phases.compute), f1(r.phases.push),
      f0(r.secPerStep * 1000 - r.phases.compute)
    ])
  }
  console.log(pad(rows))
  console.log(`up = workers → nats-server through the proxy (both workers: grads, lease requests, heartbeats); down = nats-server → workers (the params`)
  console.log(`broadcast, once per worker, params pulls, batches, acks). pulls: params requests on ps.0.pull (a worker's watchdog, or a PS heartbeat ahead`)
  console.log(`of its params). link busy = bytes ÷ (${MBIT} Mbit/s) ÷ s/version. tokens/s: StepApplied windows, median. not computing = s/version − compute.`)
}

// ---------------------------------------------------------------- main

if (SECTIONS.has(2)) {
  console.log(`\n2. encode / decode CPU time on one real gradient (all ${def.specs.length} tensors through the codec, with a residual; median of ${REPS}; MB/s of f32 input)`)
  console.log(pad(await cpuTimes()))
}
if (SECTIONS.has(1)) {
  const t = Date.now()
  process.stderr.write(`section 1: ${CODECS.length} codecs × ${STEPS} versions, ${PARALLEL} at a time…\n`)
  const res = await trainAll()
  console.log(`\n1. loss at equal versions (${STEPS}) and bytes per version (2 workers, in-process wire path; ${((Date.now() - t) / 1000).toFixed(0)} s, load ${load()})`)
  trainTables(res)
}
if (SECTIONS.has(3)) {
  const t = Date.now()
  const server = await startLocalNatsServer({ httpPort: 0 })
  const runs: LinkRun[] = []
  try {
    runs.push(await linkRun(server, "f32", false))
    for (const c of LINK_CODECS) runs.push(await linkRun(server, c, true))
  } finally {
    await server.stop()
  }
  console.log(`\n3. tokens/s over a slow link (${MBIT} Mbit/s each way${LATENCY > 0 ? `, +${LATENCY} ms` : ""}, workers only; real processes; ${((Date.now() - t) / 1000).toFixed(0)} s, load ${load()})`)
  linkTable(runs)
}
console.log(`\nwall ${((Date.now() - wall0) / 1000).toFixed(0)} s; load average at the end ${load()} (shared machines vary run to run: compare within the run)`)
process.exit(0)
