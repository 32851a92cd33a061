/**
 * Implements: `flotilla start` (= `npm start`) — every actor of a job in one process on
 * the in-process bus: loader, scheduler, parameter-server shards, workers and an
 * evaluator. Same actor code as `flotilla up`; only the Bus layer differs.
 * Which actors, and how each runs: cli/topology.ts.
 * At the end: a summary, a text sample from the final params, the loss curve (SVG +
 * a terminal chart) and the path of the checkpoint THIS run wrote (an earlier run of the
 * same job name may have left files with newer versions: they are not this run's).
 */
import { decodeTensor } from "../shared/wire/codecs.ts"
import { mkdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { Deferred, Effect, Layer } from "effect"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { makeFileStore, type CheckpointRef, type CheckpointStoreShape } from "../shared/checkpoint/store.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { Metrics } from "../shared/telemetry/metrics.ts"
import { Telemetry } from "../shared/telemetry/otel.ts"
import { TracedBus } from "../shared/telemetry/traced-bus.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { decodeTokens, encodeText } from "../shared/data/corpus.ts"
import { generate, type GptDef } from "../shared/models/gpt.ts"
import { countParams } from "../shared/models/model.ts"
import { modelForJob } from "../shared/models/zoo.ts"
import { encodeMessage } from "../shared/protocol/decode.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { asciiChart, writeLossCurveSvg } from "../shared/ui/plot.ts"
import { requestBundle } from "../shared/wire/transport.ts"
import { observeJob, type RunSummary } from "./driver.ts"
import { jobActors, runActor } from "./topology.ts"

export interface StartOptions {
  readonly job: JobConfig
  readonly backend?: BackendPreference
  readonly json?: boolean
  readonly sample?: number
  readonly runsDir?: string
}

/**
 * This run's newest checkpoint of each shard: ones written at or after `since` (the
 * run's start, ms), as the store lists them (default: the files under checkpointDir).
 * An earlier run of the same job name may have left checkpoints with higher versions;
 * they are not this run's. undefined for a shard that has written none yet.
 */
export const runCheckpoints = (
  job: JobConfig,
  since: number,
  store: CheckpointStoreShape = makeFileStore(job.train.checkpointDir)
): Effect.Effect<Array<CheckpointRef | undefined>> =>
  Effect.forEach(Array.from({ length: job.topology.psShards }, (_, k) => k), (k) =>
    store.list(job.job, k).pipe(
      Effect.map((refs) => {
        let best: CheckpointRef | undefined
        for (const r of refs) {
          if (r.writtenAt < since) continue
          // the newest write is the shard's state now (a restarted shard may rewrite a lower version)
          if (!best || r.writtenAt > best.writtenAt || (r.writtenAt === best.writtenAt && r.version > best.version)) best = r
        }
        return best
      }),
      Effect.orElseSucceed(() => undefined)
    )
  )

/**
 * Wait (at most `timeoutMs`) until every shard has a checkpoint of at least `version`
 * from this run: the last one is saved just after the final step is announced. Returns
 * what there is by then.
 */
export const awaitRunCheckpoints = (job: JobConfig, since: number, version: number, timeoutMs = 5_000, store?: CheckpointStoreShape) =>
  Effect.gen(function* () {
    const deadline = Date.now() + timeoutMs
    for (;;) {
      const found = yield* runCheckpoints(job, since, store)
      if (found.every((c) => c !== undefined && c.version >= version) || Date.now() >= deadline) return found
      yield* Effect.sleep(100)
    }
  })

/** Pull the final params of every shard (over whatever bus is provided). */
export const pullParams = (job: JobConfig, who: string) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(job.job)
    const params = new Map<string, Float32Array>()
    for (let k = 0; k < job.topology.psShards; k++) {
      const r = yield* requestBundle(bus, s.psPull(k), encodeMessage({ _tag: "PullParams", v: PROTOCOL_VERSION, worker: who, minVersion: 0 }), { timeoutMs: 10_000 })
      for (const t of r.bundle.tensors) params.set(t.name, Float32Array.from(decodeTensor(t))) // bf16 params (train.compression.params) widened
    }
    return params
  })

/**
 * What every run prints at its end (start and up). `startedAt` (ms) is when the run
 * began: only checkpoints written since then are this run's.
 */
export const report = (
  job: JobConfig,
  summary: RunSummary,
  params: Map<string, Float32Array> | undefined,
  o: { json?: boolean; sample?: number; runsDir?: string; startedAt: number; store?: CheckpointStoreShape }
) =>
  Effect.gen(function* () {
    const ckpts = yield* awaitRunCheckpoints(job, o.startedAt, summary.steps, 5_000, o.store)
    const dir = join(o.runsDir ?? "runs", job.job)
    mkdirSync(dir, { recursive: true })
    const classify = job.model.kind !== "gpt"
    const svg = writeLossCurveSvg(join(dir, "loss.svg"), {
      ...summary.curves,
      accuracy: classify ? summary.curves.valAccuracy : undefined,
      title: classify ? `${job.job}: loss, validation accuracy and learning rate` : `${job.job}: loss and learning rate`
    })
    writeFileSync(join(dir, "summary.json"), JSON.stringify({ ...summary, curves: undefined }, null, 2))
    // the data behind loss.svg: [version, value] pairs of train loss, validation loss and LR
    writeFileSync(join(dir, "curves.json"), JSON.stringify(summary.curves))
    let sample = ""
    if (params && job.model.kind === "gpt" && (o.sample ?? 200) > 0) {
      const model = modelForJob(job) as GptDef
      const prompt = encodeText("Call me ")
      sample = decodeTokens(generate(model, params, prompt, o.sample ?? 200, { temperature: 0.8, topK: 40, seed: job.train.seed }))
      sample = "Call me " + sample
    }
    const ckpt = ckpts[0]?.where
    if (o.json) {
      const checkpoints = ckpts.map((c) => c?.where ?? null)
      process.stdout.write(JSON.stringify({ ...summary, curves: undefined, svg, checkpoint: ckpt ?? null, checkpoints, sample }) + "\n")
      return
    }
    const written = ckpts.filter((c) => c !== undefined)
    const ckptLine =
      written.length === 0
        ? "checkpoint: (none written by this run)"
        : ckpts.length === 1
          ? `checkpoint: ${ckpt}`
          : `checkpoints:${ckpts.map((c, k) => `\n  shard ${k}: ${c?.where ?? "(none written by this run)"}`).join("")}`
    const f = (x: number | null) => (x === null || !Number.isFinite(x) ? "n/a" : x.toFixed(4))
    const pct = (x: number | null | undefined) => (x === null || x === undefined || !Number.isFinite(x) ? "n/a" : `${(100 * x).toFixed(2)}%`)
    const lines = [
      "",
      `job ${job.job}: ${summary.steps} steps${job.train.epochs > 0 ? ` (${summary.epochs} epochs)` : ""} in ${summary.seconds.toFixed(1)} s, ${Math.round(summary.tokensPerSec)} ${classify ? "samples" : "tokens"}/s, ${(summary.bytesOnWire / 1e6).toFixed(1)} MB of gradients sent`,
      `train loss ${f(summary.firstTrainLoss)} → ${f(summary.finalTrainLoss)}    validation loss ${f(summary.firstValLoss)} → ${f(summary.finalValLoss)}`,
      ...(summary.valMetrics && classify
        ? [`validation accuracy ${pct(summary.valAccuracy)}   precision ${pct(summary.valMetrics["precision"])}   recall ${pct(summary.valMetrics["recall"])}   F1 ${f(summary.valMetrics["f1"] ?? null)}`]
        : []),
      "",
      "train loss:",
      asciiChart(summary.curves.train.map(([, l]) => l), 64, 8),
      "",
      `loss curve: ${svg}`,
      ckptLine
    ]
    if (sample) lines.push("", "sample:", "  " + sample.replace(/\n/g, "\n  "))
    process.stdout.write(lines.join("\n") + "\n")
  })

export const startEmbedded = (o: StartOptions) =>
  Effect.gen(function* () {
    const { job } = o
    const startedAt = Date.now()
    const compute = yield* Compute
    const model = modelForJob(job)
    if (!o.json) {
      process.stderr.write(`flotilla start: backend ${compute.reason}\n`)
      process.stderr.write(`model ${job.model.kind}: ${countParams(model).toLocaleString("en")} params; resolved job:\n${JSON.stringify(job)}\n`)
    }
    const observer = yield* observeJob(job, { progress: !o.json })
    const stop = yield* stopRequested(subjects(job.job))
    // every actor shares this process's one backend; a fresh run (no resume)
    const shared = Layer.succeed(Compute, compute)
    for (const spec of jobActors(job)) yield* runActor(spec, { job, compute: shared, resume: false })
    // a `stop` ends the run early: report what was trained so far
    const summary = yield* Effect.raceFirst(Deferred.await(observer.done), Deferred.await(stop).pipe(Effect.map(() => observer.summary())))
    const params = yield* pullParams(job, "driver")
    yield* report(job, summary, params, { ...o, startedAt })
  }).pipe(
    Effect.scoped,
    Effect.provide(
      Layer.mergeAll(
        TracedBus.layer(InProcessBus.layer()),
        Compute.layer(o.backend),
        // Metrics after Telemetry: its instruments live on the MeterProvider Telemetry starts
        Metrics.layer.pipe(Layer.provideMerge(Telemetry.layer({ role: "embedded", instanceId: `embedded-${process.pid}`, job: o.job.job })))
      )
    )
  )
