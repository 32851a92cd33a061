// Checks: the actors report issue 5's training metrics through OpenTelemetry. A tiny job
// (loader, scheduler, one parameter-server shard, a worker and an evaluator, each its own
// process over real NATS) exports metrics over OTLP/HTTP JSON to a local receiver every
// 300 ms; every metric the actors record arrives by name: loss (train from the worker, val
// from the evaluator), step phase durations, bus bytes, staleness, learning rate, steps,
// tokens/s and the loader's leases outstanding. The parameter server also serves the
// optional Prometheus endpoint (FLOTILLA_PROMETHEUS_PORT): `/metrics` is Prometheus text
// with its flotilla metrics.
// Run: npx vitest run test/metrics.test.ts   (~20-30 s on 2 cores, mostly process start-up)
import { createServer, type AddressInfo } from "node:net"
import { describe, expect, it } from "vitest"
import { useCluster, waitUntil } from "./support/cluster.ts"
import { useOtlpReceiver } from "./support/otlp-receiver.ts"

const STEPS = 6

const JOB = {
  job: "metrics",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 4, valBatches: 1 },
  train: { steps: STEPS, evalEvery: 3, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 4_000 },
  topology: { workers: 1, psShards: 1 }
}

/** Every instrument of shared/telemetry/metrics.ts: each is recorded by some actor of the job. */
const EXPECTED = [
  "flotilla.loss",
  "flotilla.tokens.rate",
  "flotilla.lr",
  "flotilla.steps",
  "flotilla.step.duration",
  "flotilla.bytes",
  "flotilla.staleness",
  "flotilla.leases.outstanding"
]

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const srv = createServer()
    srv.once("error", reject)
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as AddressInfo
      srv.close(() => resolve(port))
    })
  })

describe("training metrics from actor processes", () => {
  const suite = useCluster()
  const receiver = useOtlpReceiver()

  it("exports loss, step times, bytes, staleness, leases and tokens/s over OTLP, and Prometheus text", async () => {
    const rx = receiver.current()
    const { cluster, obs } = await suite.start(JOB, {
      OTEL_EXPORTER_OTLP_ENDPOINT: rx.url,
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
      OTEL_TRACES_EXPORTER: "none",
      OTEL_METRIC_EXPORT_INTERVAL: "300"
    })
    const promPort = await freePort()
    cluster.spawn("loader", "loader-0")
    cluster.spawn("scheduler", "scheduler-0")
    cluster.spawn("param-server", "ps-0", ["--shard", "0", "--no-resume"], {
      FLOTILLA_PROMETHEUS_PORT: String(promPort),
      FLOTILLA_PROMETHEUS_HOST: "127.0.0.1"
    })
    cluster.spawn("evaluator", "evaluator-0")
    // the evaluator reports on version 0 before the (tiny, quick) job can run past it
    await obs.until(() => obs.validation.some((v) => v.version === 0), 60_000, () => `the evaluator's report on version 0\n${cluster.logs()}`)
    const worker = cluster.spawn("worker", "worker-0")
    await obs.until(() => obs.version() >= STEPS, 60_000, () => `version ${STEPS}\n${cluster.logs()}`)

    // Prometheus: the shard's metrics as text on /metrics (`.` → `_`, counters get `_total`)
    const res = await fetch(`http://127.0.0.1:${promPort}/metrics`)
    expect(res.status).toBe(200)
    const text = await res.text()
    expect(text).toMatch(/^flotilla_steps_total\{[^}]*\} [1-9]/m)
    expect(text).toMatch(/^flotilla_staleness_[a-z_]*bucket\{/m)
    expect(text).toMatch(/^flotilla_step_duration[a-z_]*_bucket\{[^}]*step_phase="aggregate"/m)
    expect(text).toMatch(/^flotilla_bytes[a-z_]*\{[^}]*direction="received"/m)
    expect(text).toMatch(/^flotilla_lr\{/m)

    // OTLP: every instrument by name (the worker flushes its last export as it exits)
    expect((await worker.exited).code).toBe(0)
    await waitUntil(
      () => EXPECTED.every((n) => rx.metricNames.has(n)),
      15_000,
      () => `metrics ${EXPECTED.filter((n) => !rx.metricNames.has(n)).join(", ")}; got [${[...rx.metricNames].join(", ")}]\n${cluster.logs()}`
    )
    // the bus messages agree that the job reported what the metrics carry
    expect(obs.workerSteps.length).toBeGreaterThan(0)
    expect(obs.validation.length).toBeGreaterThan(0)
    await cluster.stop()
  }, 90_000)
})
