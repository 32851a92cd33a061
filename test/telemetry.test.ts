/**
 * Tests: telemetry end to end against a local OTLP receiver (test/support/otlp-receiver.ts).
 *   - off by default: no SDK, no export, propagation and metrics are no-ops;
 *   - one trace across two processes: a span made here, its traceparent carried in headers to a
 *     child `node` process that continues the trace (Effect spans and a plain OTel span);
 *   - the Effect→OTel bridge in-process: Effect.fn nesting, failures, OTel↔Effect hand-overs,
 *     no leaking of one fiber's span into another;
 *   - metrics on a Prometheus endpoint and over OTLP.
 * Run: npx vitest run test/telemetry.test.ts
 */
import * as api from "@opentelemetry/api"
import { describe, expect, it } from "@effect/vitest"
import { spawn } from "node:child_process"
import * as net from "node:net"
import * as path from "node:path"
import { fileURLToPath } from "node:url"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import * as Fiber from "effect/Fiber"
import * as Layer from "effect/Layer"
import { makeMetrics } from "../shared/telemetry/metrics.ts"
import {
  describeTelemetry,
  resolveTelemetryConfig,
  startTelemetry,
  Telemetry,
  type TelemetryHandle,
  tracingEnabled
} from "../shared/telemetry/otel.ts"
import { withOtelParent } from "../shared/telemetry/effect-tracer.ts"
import {
  extractSpanContext,
  formatTraceparent,
  injectTraceHeaders,
  parseTraceparent,
  traceHeaders,
  withRemoteParent
} from "../shared/telemetry/propagation.ts"
import { type OtlpReceiver, type ReceivedSpan, startOtlpReceiver } from "./support/otlp-receiver.ts"

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..")
const OTEL_VARS = Object.keys(process.env).filter((k) => k.startsWith("OTEL_") || k.startsWith("FLOTILLA_PROMETHEUS"))
for (const k of OTEL_VARS) delete process.env[k]

const options = (role: string, instanceId: string) => ({ role, instanceId, job: "telemetry-test" })

const freePort = (): Promise<number> =>
  new Promise((resolve, reject) => {
    const srv = net.createServer()
    srv.on("error", reject)
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo
      srv.close(() => resolve(port))
    })
  })

const byName = (spans: ReadonlyArray<ReceivedSpan>, name: string): ReceivedSpan => {
  const s = spans.find((x) => x.name === name)
  if (s === undefined) throw new Error(`no span ${name} in [${spans.map((x) => x.name).join(", ")}]`)
  return s
}
const has = (...names: Array<string>) => (spans: ReadonlyArray<ReceivedSpan>) =>
  names.every((n) => spans.some((s) => s.name === n))

/** The child process: continues the trace whose headers it gets in FLOTILLA_TEST_HEADERS. */
const CHILD = `
import * as api from "@opentelemetry/api"
import * as Deferred from "effect/Deferred"
import * as Effect from "effect/Effect"
import { Telemetry } from "./shared/telemetry/otel.ts"
import { extractTraceContext, withRemoteParent } from "./shared/telemetry/propagation.ts"
const headers = JSON.parse(process.env.FLOTILLA_TEST_HEADERS)
const step = Effect.fn("Worker.step")(function*(n) {
  yield* Effect.sleep(2)
  api.trace.getTracer("child").startSpan("B.plain", {}, extractTraceContext(headers)).end()
  return n
})
const program = withRemoteParent(headers, step(7), "Worker.receive", { "flotilla.step": 7 })
const n = await Effect.runPromise(
  program.pipe(Effect.provide(Telemetry.layer({ role: "worker", instanceId: "worker-B", job: "telemetry-test" })))
)
console.log("child done", n)
`

const runChild = (env: NodeJS.ProcessEnv): Promise<string> =>
  new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--input-type=module", "-e", CHILD], { cwd: ROOT, env, stdio: "pipe" })
    let out = ""
    child.stdout.on("data", (d) => (out += String(d)))
    child.stderr.on("data", (d) => (out += String(d)))
    child.on("error", reject)
    child.on("exit", (code) => (code === 0 ? resolve(out) : reject(new Error(`child exited ${code}:\n${out}`))))
  })

describe("configuration", () => {
  it("is off without an endpoint, and honours the standard switches", () => {
    const o = options("worker", "w-1")
    expect(resolveTelemetryConfig(o, {}).enabled).toBe(false)
    expect(describeTelemetry(resolveTelemetryConfig(o, {}))).toMatch(/^telemetry: off/)
    const on = resolveTelemetryConfig(o, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://jaeger:4318" })
    expect(on).toMatchObject({ enabled: true, tracing: true, otlpMetrics: true, tracesProtocol: "http/protobuf" })
    expect(on.resourceAttributes).toMatchObject({
      "service.name": "flotilla-worker",
      "service.instance.id": "w-1",
      "flotilla.job": "telemetry-test"
    })
    expect(resolveTelemetryConfig(o, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://x", OTEL_SDK_DISABLED: "true" }).enabled)
      .toBe(false)
    const tracesOnly = resolveTelemetryConfig(o, {
      OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: "http://x/v1/traces",
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/json"
    })
    expect(tracesOnly).toMatchObject({ tracing: true, otlpMetrics: false, tracesProtocol: "http/json" })
    const promOnly = resolveTelemetryConfig(o, { FLOTILLA_PROMETHEUS_PORT: "9464" })
    expect(promOnly).toMatchObject({ enabled: true, tracing: false, otlpMetrics: false, prometheusPort: 9464 })
    expect(resolveTelemetryConfig(o, { OTEL_EXPORTER_OTLP_ENDPOINT: "http://x", OTEL_TRACES_EXPORTER: "none" }).tracing)
      .toBe(false)
  })

  it("parses and formats traceparent per W3C", () => {
    const tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    const sc = parseTraceparent(tp, "vendor=abc")!
    expect(sc).toMatchObject({ traceId: "0af7651916cd43dd8448eb211c80319c", spanId: "b7ad6b7169203331", isRemote: true })
    expect(sc.traceState?.get("vendor")).toBe("abc")
    expect(formatTraceparent(sc)).toBe(tp)
    expect(parseTraceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01")).toBeUndefined()
    expect(parseTraceparent("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")).toBeUndefined()
    expect(parseTraceparent("garbage")).toBeUndefined()
    expect(extractSpanContext({ TraceParent: tp })?.spanId).toBe("b7ad6b7169203331")
    expect(extractSpanContext({})).toBeUndefined()
  })
})

describe("telemetry off", () => {
  it("starts nothing, exports nothing, and propagation and metrics are no-ops", async () => {
    const rx = await startOtlpReceiver()
    try {
      const handle = await startTelemetry(options("worker", "off-1"))
      expect(handle.enabled).toBe(false)
      expect(tracingEnabled()).toBe(false)
      const headers = { a: "1" }
      expect(injectTraceHeaders(headers)).toBe(headers)
      const program = Effect.fn("Off.work")(function*() {
        const h = yield* traceHeaders(headers)
        return h
      })
      const out = await Effect.runPromise(
        withRemoteParent({ traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" }, program(), "Off.recv")
          .pipe(Effect.provide(Telemetry.layer(options("worker", "off-1"))))
      )
      expect(out).toEqual(headers)
      expect(makeMetrics().enabled).toBe(false)
      await handle.shutdown()
      expect(rx.requests).toEqual({})
    } finally {
      await rx.close()
    }
  })
})

describe("telemetry on", () => {
  let rx: OtlpReceiver
  let handle: TelemetryHandle
  let promPort: number

  it("starts the SDK from the OTEL_* environment", async () => {
    rx = await startOtlpReceiver()
    promPort = await freePort()
    process.env.OTEL_EXPORTER_OTLP_ENDPOINT = rx.url
    process.env.OTEL_EXPORTER_OTLP_PROTOCOL = "http/json"
    process.env.OTEL_BSP_SCHEDULE_DELAY = "50"
    process.env.FLOTILLA_PROMETHEUS_PORT = String(promPort)
    handle = await startTelemetry(options("driver", "driver-A"))
    expect(handle).toMatchObject({ enabled: true, tracing: true, metrics: true })
    expect(tracingEnabled()).toBe(true)
  })

  it("carries one trace across processes in message headers", async () => {
    const tracer = api.trace.getTracer("test")
    const span = tracer.startSpan("A.publish")
    const headers = injectTraceHeaders({ "flotilla-v": "1" }, span)
    expect(headers["flotilla-v"]).toBe("1")
    expect(headers.traceparent).toBe(formatTraceparent(span.spanContext()))
    span.end()

    const env: NodeJS.ProcessEnv = {
      ...process.env,
      OTEL_EXPORTER_OTLP_PROTOCOL: "http/protobuf",
      FLOTILLA_TEST_HEADERS: JSON.stringify(headers)
    }
    delete env.FLOTILLA_PROMETHEUS_PORT
    expect(await runChild(env)).toContain("child done 7")

    const spans = await rx.waitFor(has("A.publish", "Worker.receive", "Worker.step", "B.plain"))
    const a = byName(spans, "A.publish")
    const recv = byName(spans, "Worker.receive")
    const step = byName(spans, "Worker.step")
    const plain = byName(spans, "B.plain")
    for (const s of [recv, step, plain]) expect(s.traceId).toBe(a.traceId)
    expect(recv.parentSpanId).toBe(a.spanId)
    expect(step.parentSpanId).toBe(recv.spanId)
    expect(plain.parentSpanId).toBe(a.spanId)
    expect(a).toMatchObject({ serviceName: "flotilla-driver", instanceId: "driver-A", encoding: "json" })
    for (const s of [recv, step, plain]) {
      expect(s).toMatchObject({ serviceName: "flotilla-worker", instanceId: "worker-B", encoding: "protobuf" })
    }
    expect(recv.attributes["flotilla.step"]).toBe(7)
    expect(recv.kind).toBe(5) // OTLP SPAN_KIND_CONSUMER
    expect(recv.resource["flotilla.job"]).toBe("telemetry-test")
  })

  it("bridges Effect spans into OpenTelemetry with the right parents", async () => {
    const inner = Effect.fn("Bridge.inner")(function*(n: number) {
      yield* Effect.sleep(1)
      return {
        n,
        plain: injectTraceHeaders(),
        effect: yield* traceHeaders(),
        active: api.trace.getActiveSpan()?.spanContext().spanId
      }
    })
    const outer = Effect.fn("Bridge.outer")(function*() {
      return yield* inner(1)
    })
    const failing = Effect.fn("Bridge.fails")(function*() {
      return yield* Effect.fail(new Error("boom"))
    })
    // A fiber with no span must not inherit another span through Node's async context: like a
    // socket opened inside a span, whose data callbacks later start fibers of their own.
    const seen = Deferred.makeUnsafe<string | undefined>()
    const connect = Effect.fn("Bridge.connect")(function*() {
      const tracer = yield* Effect.tracer
      const onData = Effect.gen(function*() {
        const active = api.trace.getActiveSpan()
        yield* Effect.withSpan(Effect.void, "Bridge.onData")
        yield* Deferred.succeed(seen, active === undefined ? undefined : "leaked")
      }).pipe(Effect.withTracer(tracer))
      yield* Effect.sync(() => setTimeout(() => Effect.runFork(onData), 2))
    })
    const otelParent = api.trace.getTracer("test").startSpan("Otel.parent")
    const adopted = withOtelParent(Effect.withSpan(Effect.void, "Bridge.adopted"), otelParent)

    const traced = Effect.gen(function*() {
      const result = yield* outer()
      const exit = yield* Effect.exit(failing())
      const f = yield* Effect.forkChild(Effect.withSpan(Effect.sleep(1), "Bridge.forked"))
      yield* Fiber.join(f)
      return { result, exit }
    }).pipe(Effect.withSpan("Bridge.root"))
    const program = Effect.gen(function*() {
      const { result, exit } = yield* traced
      yield* connect()
      const leaked = yield* Deferred.await(seen)
      yield* adopted
      return { result, exit, leaked }
    })

    const { result, exit, leaked } = await Effect.runPromise(
      program.pipe(Effect.provide(Layer.fresh(Telemetry.layer(options("driver", "driver-A")))))
    )
    otelParent.end()
    expect(exit._tag).toBe("Failure")
    expect(leaked).toBeUndefined()
    // The bridge layer shares the process's SDK: closing it must not stop tracing.
    expect(tracingEnabled()).toBe(true)

    const spans = await rx.waitFor(
      has("Bridge.root", "Bridge.outer", "Bridge.inner", "Bridge.fails", "Bridge.onData", "Bridge.adopted", "Bridge.forked", "Otel.parent")
    )
    const root = byName(spans, "Bridge.root")
    const outerS = byName(spans, "Bridge.outer")
    const innerS = byName(spans, "Bridge.inner")
    expect(root.parentSpanId).toBeUndefined()
    expect(outerS.parentSpanId).toBe(root.spanId)
    expect(innerS.parentSpanId).toBe(outerS.spanId)
    expect(innerS.traceId).toBe(root.traceId)
    expect(byName(spans, "Bridge.forked").parentSpanId).toBe(root.spanId)
    expect(byName(spans, "Bridge.fails")).toMatchObject({ parentSpanId: root.spanId, statusCode: 2 })
    expect(innerS.statusCode).toBe(1)
    expect(byName(spans, "Bridge.onData").parentSpanId).toBeUndefined()
    expect(byName(spans, "Bridge.adopted").parentSpanId).toBe(byName(spans, "Otel.parent").spanId)
    // Inside Effect code the OTel active span is the Effect span: both injections agree.
    expect(result.active).toBe(innerS.spanId)
    expect(result.plain.traceparent).toBe(`00-${innerS.traceId}-${innerS.spanId}-01`)
    expect(result.effect).toEqual(result.plain)
  })

  it("records metrics on the Prometheus endpoint", async () => {
    const m = makeMetrics({ attributes: { "flotilla.stage": 0 } })
    expect(m.enabled).toBe(true)
    m.recordLoss("train", 2.5)
    m.recordLoss("val", 2.75)
    m.recordLoss("train", NaN) // ignored
    m.recordTokensPerSec(12_345)
    m.recordStepTimes({ wait_batch: 3, compute: 120, push: 8 })
    m.addBytes("sent", 4096)
    m.addBytes("received", 1024, "params")
    m.recordStaleness(1)
    m.setLeasesOutstanding(3)
    m.addSteps()
    const text = await (await fetch(`http://127.0.0.1:${promPort}/metrics`)).text()
    expect(text).toMatch(/flotilla_loss\{[^}]*loss_kind="train"[^}]*\} 2\.5/)
    expect(text).toMatch(/flotilla_loss\{[^}]*loss_kind="val"[^}]*\} 2\.75/)
    expect(text).toMatch(/flotilla_step_duration[_a-z]*_bucket\{[^}]*step_phase="compute"/)
    expect(text).toContain("flotilla_bytes")
    expect(text).toContain("flotilla_leases_outstanding")
  })

  it("flushes spans and metrics on shutdown and stops", async () => {
    await handle.shutdown()
    expect(tracingEnabled()).toBe(false)
    expect(rx.metricNames).toContain("flotilla.loss")
    expect(rx.metricNames).toContain("flotilla.step.duration")
    // Stopped means stopped: a new span is not exported, and a fresh start works again.
    const before = rx.spans.length
    api.trace.getTracer("test").startSpan("After.shutdown").end()
    const again = await startTelemetry(options("driver", "driver-A2"))
    expect(again.enabled).toBe(true)
    api.trace.getTracer("test").startSpan("After.restart").end()
    await again.shutdown()
    await rx.waitFor(has("After.restart"))
    expect(rx.spans.slice(before).map((s) => s.name)).not.toContain("After.shutdown")
    await rx.close()

    // An unreachable collector must not make shutdown fail (it warns instead).
    process.env.OTEL_EXPORTER_OTLP_TIMEOUT = "300"
    const down = await startTelemetry(options("driver", "driver-A3"))
    api.trace.getTracer("test").startSpan("Nobody.listens").end()
    await expect(down.shutdown()).resolves.toBeUndefined()

    // A busy Prometheus port fails the start cleanly (typed in the layer) and leaves nothing behind.
    const blocker = net.createServer()
    await new Promise<void>((resolve) => blocker.listen(0, resolve))
    delete process.env.OTEL_EXPORTER_OTLP_ENDPOINT
    process.env.FLOTILLA_PROMETHEUS_PORT = String((blocker.address() as net.AddressInfo).port)
    const exit = await Effect.runPromiseExit(Effect.void.pipe(Effect.provide(Telemetry.layer(options("ps", "ps-0")))))
    expect(exit._tag === "Failure" && exit.cause.reasons[0]?._tag === "Fail" && exit.cause.reasons[0].error._tag)
      .toBe("TelemetryStartError")
    expect(tracingEnabled()).toBe(false)
    await new Promise((resolve) => blocker.close(resolve))
    for (const k of Object.keys(process.env)) if (k.startsWith("OTEL_") || k.startsWith("FLOTILLA_PROMETHEUS")) delete process.env[k]
  })
})
