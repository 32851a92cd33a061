// Checks: with OTEL_EXPORTER_OTLP_ENDPOINT set, one training step is one trace across
// processes. A 2-worker, 2-shard job runs as separate processes over real NATS, exporting
// to a local OTLP/HTTP receiver; some `worker.step` trace holds spans from at least four
// distinct actor processes (service.instance.id) — the worker, the loader (lease), both
// parameter-server shards (gradient chunks, aggregate + apply), the scheduler (LR) — and
// every span's parent is in the same trace (no dangling links), with remote parents
// pointing at a span of another process.
// Run: npx vitest run test/trace.test.ts
import { describe, expect, it } from "vitest"
import { useCluster } from "./support/cluster.ts"
import { useOtlpReceiver, type ReceivedSpan } from "./support/otlp-receiver.ts"

const JOB = {
  job: "trace",
  model: { kind: "gpt", vocabSize: 256, contextLength: 16, layers: 1, heads: 2, width: 16 },
  data: { batchSize: 4 },
  train: { steps: 8, evalEvery: 0, checkpointEvery: 0, heartbeatMs: 200, livenessMs: 4_000 },
  topology: { workers: 2, psShards: 2 }
}

describe("tracing across actor processes", () => {
  const suite = useCluster()
  const receiver = useOtlpReceiver()

  it("puts one step's lease, compute, gradient chunks, aggregation and LR in one trace", async () => {
    const rx = receiver.current()
    const { cluster, obs } = await suite.start(JOB, {
      OTEL_EXPORTER_OTLP_ENDPOINT: rx.url,
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json",
      OTEL_TRACES_SAMPLER: "always_on",
      OTEL_METRICS_EXPORTER: "none",
      OTEL_BSP_SCHEDULE_DELAY: "200"
    })
    cluster.spawnServices()
    cluster.spawn("worker", "worker-0")
    cluster.spawn("worker", "worker-1")
    await obs.until(() => obs.version() >= JOB.train.steps, 90_000, () => `version ${JOB.train.steps}\n${cluster.logs()}`)
    // stop cleanly: every process flushes its spans on the way out
    await cluster.stop()

    const byTrace = new Map<string, ReceivedSpan[]>()
    for (const sp of rx.spans) byTrace.set(sp.traceId, [...(byTrace.get(sp.traceId) ?? []), sp])
    const stepTraces = [...byTrace.values()].filter((spans) => spans.some((sp) => sp.name === "worker.step"))
    expect(stepTraces.length, `traces with a worker.step among ${byTrace.size}`).toBeGreaterThan(0)

    const instances = (spans: ReceivedSpan[]) => new Set(spans.map((sp) => sp.instanceId))
    const best = stepTraces.reduce((a, b) => (instances(b).size > instances(a).size ? b : a))
    const ids = instances(best)
    const names = new Set(best.map((sp) => sp.name))
    console.info(`[trace] ${stepTraces.length} step traces; the widest spans ${[...ids].join(", ")}: ${[...names].join(", ")}`)
    expect(ids.size).toBeGreaterThanOrEqual(4)
    for (const n of ["worker.step", "worker.forward_backward", "ps.aggregate_apply"]) expect(names).toContain(n)

    // parent links: exactly one root (the worker.step), every other parent is in the trace
    const byId = new Map(best.map((sp) => [sp.spanId, sp]))
    const roots = best.filter((sp) => sp.parentSpanId === undefined)
    expect(roots.map((r) => r.name)).toEqual(["worker.step"])
    for (const sp of best) if (sp.parentSpanId !== undefined) expect(byId.has(sp.parentSpanId), `${sp.name}'s parent`).toBe(true)
    // a parameter-server span descends from the worker's step through a remote link
    const apply = best.find((sp) => sp.name === "ps.aggregate_apply")!
    let cur: ReceivedSpan | undefined = apply
    const chain: string[] = []
    while (cur) {
      chain.push(`${cur.name}@${cur.instanceId}`)
      cur = cur.parentSpanId === undefined ? undefined : byId.get(cur.parentSpanId)
    }
    expect(chain[chain.length - 1]).toMatch(/^worker\.step@worker-/)
    expect(apply.instanceId).toMatch(/^ps-/)
  }, 150_000)
})
