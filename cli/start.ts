/**
 * Implements: `flotilla start` (= `npm start`) — every actor of a job in one process on
 * the in-process bus: loader, scheduler, parameter-server shards, workers and an
 * evaluator. Same actor code as `flotilla up`; only the Bus layer differs.
 * At the end: a summary, a text sample from the final params, the loss curve (SVG +
 * a terminal chart) and the checkpoint path.
 */
import { mkdirSync, writeFileSync } from "node:fs"
import { join } from "node:path"
import { Deferred, Effect, Layer } from "effect"
import { runController } from "../actors/controller/controller.ts"
import { runLoader } from "../actors/loader/loader.ts"
import { runParamServer } from "../actors/param-server/server.ts"
import { listCheckpoints } from "../actors/param-server/checkpoint.ts"
import { runScheduler } from "../actors/scheduler/scheduler.ts"
import { runWorker } from "../actors/worker/worker.ts"
import { stopRequested } from "../shared/actor/control-listener.ts"
import { Bus } from "../shared/bus/Bus.ts"
import { InProcessBus } from "../shared/bus/inprocess.ts"
import { Metrics } from "../shared/telemetry/metrics.ts"
import { Telemetry } from "../shared/telemetry/otel.ts"
import { TracedBus } from "../shared/telemetry/traced-bus.ts"
import { Compute, type BackendPreference } from "../shared/compute/backend.ts"
import type { JobConfig } from "../shared/config/job.ts"
import { decodeTokens, encodeText } from "../shared/data/corpus.ts"
import { generate } from "../shared/models/gpt.ts"
import { countParams } from "../shared/models/model.ts"
import { makeModel } from "../shared/models/zoo.ts"
import { encodeMessage } from "../shared/protocol/decode.ts"
import { PROTOCOL_VERSION, subjects } from "../shared/protocol/subjects.ts"
import { asciiChart, writeLossCurveSvg } from "../shared/ui/plot.ts"
import { requestBundle } from "../shared/wire/transport.ts"
import { observeJob, type RunSummary } from "./driver.ts"

export interface StartOptions {
  readonly job: JobConfig
  readonly backend?: BackendPreference
  readonly json?: boolean
  readonly sample?: number
  readonly runsDir?: string
}

/** Pull the final params of every shard (over whatever bus is provided). */
export const pullParams = (job: JobConfig, who: string) =>
  Effect.gen(function* () {
    const bus = yield* Bus
    const s = subjects(job.job)
    const params = new Map<string, Float32Array>()
    for (let k = 0; k < job.topology.psShards; k++) {
      const r = yield* requestBundle(bus, s.psPull(k), encodeMessage({ _tag: "PullParams", v: PROTOCOL_VERSION, worker: who, minVersion: 0 }), { timeoutMs: 10_000 })
      for (const t of r.bundle.tensors) params.set(t.name, Float32Array.from(t.data as Float32Array))
    }
    return params
  })

/** What every run prints at its end (start and up). */
export const report = (job: JobConfig, summary: RunSummary, params: Map<string, Float32Array> | undefined, o: { json?: boolean; sample?: number; runsDir?: string }) =>
  Effect.sync(() => {
    const dir = join(o.runsDir ?? "runs", job.job)
    mkdirSync(dir, { recursive: true })
    const svg = writeLossCurveSvg(join(dir, "loss.svg"), { ...summary.curves, title: `${job.job}: loss and learning rate` })
    writeFileSync(join(dir, "summary.json"), JSON.stringify({ ...summary, curves: undefined }, null, 2))
    let sample = ""
    if (params && job.model.kind === "gpt" && (o.sample ?? 200) > 0) {
      const model = makeModel(job.model)
      const prompt = encodeText("Call me ")
      sample = decodeTokens(generate(model, params, prompt, o.sample ?? 200, { temperature: 0.8, topK: 40, seed: job.train.seed }))
      sample = "Call me " + sample
    }
    const ckpt = listCheckpoints(job.train.checkpointDir, job.job, 0).pop()
    if (o.json) {
      process.stdout.write(JSON.stringify({ ...summary, curves: undefined, svg, checkpoint: ckpt ?? null, sample }) + "\n")
      return
    }
    const f = (x: number | null) => (x === null || !Number.isFinite(x) ? "n/a" : x.toFixed(4))
    const lines = [
      "",
      `job ${job.job}: ${summary.steps} steps in ${summary.seconds.toFixed(1)} s, ${Math.round(summary.tokensPerSec)} tokens/s, ${(summary.bytesOnWire / 1e6).toFixed(1)} MB of gradients sent`,
      `train loss ${f(summary.firstTrainLoss)} → ${f(summary.finalTrainLoss)}    validation loss ${f(summary.firstValLoss)} → ${f(summary.finalValLoss)}`,
      "",
      "train loss:",
      asciiChart(summary.curves.train.map(([, l]) => l), 64, 8),
      "",
      `loss curve: ${svg}`,
      ckpt ? `checkpoint: ${ckpt}` : "checkpoint: (none written)"
    ]
    if (sample) lines.push("", "sample:", "  " + sample.replace(/\n/g, "\n  "))
    process.stdout.write(lines.join("\n") + "\n")
  })

export const startEmbedded = (o: StartOptions) =>
  Effect.gen(function* () {
    const { job } = o
    const compute = yield* Compute
    const model = makeModel(job.model)
    if (!o.json) {
      process.stderr.write(`flotilla start: backend ${compute.reason}\n`)
      process.stderr.write(`model ${job.model.kind}: ${countParams(model).toLocaleString("en")} params; resolved job:\n${JSON.stringify(job)}\n`)
    }
    const observer = yield* observeJob(job, { progress: !o.json })
    yield* runLoader({ job, id: "loader-0" })
    yield* runScheduler({ job, id: "scheduler-0" })
    yield* runController({ job, id: "controller-0" })
    const stop = yield* stopRequested(subjects(job.job))
    const servers = []
    for (let k = 0; k < job.topology.psShards; k++) servers.push(yield* runParamServer({ job, shard: k, id: `ps-${k}`, resume: false }))
    if (job.train.evalEvery > 0 && job.data.valBatches > 0 && job.data.valFraction > 0) yield* runWorker({ job, id: "evaluator-0", mode: "eval" })
    for (let w = 0; w < job.topology.workers; w++) yield* runWorker({ job, id: `worker-${w}` })
    // a `stop` ends the run early: report what was trained so far
    const summary = yield* Effect.raceFirst(Deferred.await(observer.done), Deferred.await(stop).pipe(Effect.map(() => observer.summary())))
    const params = yield* pullParams(job, "driver")
    yield* report(job, summary, params, o)
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
