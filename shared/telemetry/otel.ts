/**
 * Implements: this process's OpenTelemetry switch. `startTelemetry` starts the NodeSDK from
 * the standard OTEL_* variables (traces over OTLP; metrics over OTLP and/or a Prometheus
 * endpoint on FLOTILLA_PROMETHEUS_PORT) with a resource naming the actor, and `Telemetry.layer`
 * does the same in a scope and installs the Effect→OpenTelemetry tracer bridge, so every
 * `Effect.fn("X.y")` / `Effect.withSpan` becomes an OTel span with the right parent.
 * Does not own: trace context on the wire (propagation.ts), metric instruments (metrics.ts).
 *
 * Off by default: with no OTEL_EXPORTER_OTLP_{,TRACES_,METRICS_}ENDPOINT and no
 * FLOTILLA_PROMETHEUS_PORT (or with OTEL_SDK_DISABLED=true) nothing is started and the SDK
 * is not even imported (it costs ~0.8 s to load); only @opentelemetry/api is loaded.
 *
 * The Effect→OpenTelemetry tracer bridge itself lives in effect-tracer.ts.
 */
import * as api from "@opentelemetry/api"
import type { IMetricReader } from "@opentelemetry/sdk-metrics"
import * as Context from "effect/Context"
import * as Data from "effect/Data"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Tracer from "effect/Tracer"
import { makeOtelTracer } from "./effect-tracer.ts"

// ---------------------------------------------------------------------------------------------
// Configuration (pure)
// ---------------------------------------------------------------------------------------------

export interface TelemetryOptions {
  /** Actor role (`worker`, `ps`, ...): service.name defaults to `flotilla-<role>`. */
  readonly role: string
  /** This actor instance's id: the resource's service.instance.id. */
  readonly instanceId: string
  /** Job name: the resource attribute flotilla.job. */
  readonly job: string
}

export interface TelemetryConfig {
  readonly enabled: boolean
  /** Why telemetry is off, when it is. */
  readonly reason: string | undefined
  readonly tracing: boolean
  readonly otlpMetrics: boolean
  readonly prometheusPort: number | undefined
  /** Traces endpoint as configured (informational; the exporter resolves it from the env). */
  readonly tracesEndpoint: string | undefined
  readonly tracesProtocol: string
  readonly metricsProtocol: string
  /** Periodic OTLP metric export interval. */
  readonly metricIntervalMs: number
  /** Base resource attributes; OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES override them. */
  readonly resourceAttributes: Readonly<Record<string, string>>
}

type Env = Readonly<Record<string, string | undefined>>

const nonEmpty = (s: string | undefined): string | undefined =>
  s !== undefined && s.trim() !== "" ? s.trim() : undefined

const listHas = (s: string | undefined, item: string): boolean =>
  (s ?? "").split(",").map((x) => x.trim().toLowerCase()).includes(item)

/** Default metric export interval: the SDK's 60 s default is longer than many short runs. */
const DEFAULT_METRIC_INTERVAL_MS = 10_000

/** What `startTelemetry` would do with this environment. Pure: reads only `env`. */
export const resolveTelemetryConfig = (options: TelemetryOptions, env: Env = process.env): TelemetryConfig => {
  const common = nonEmpty(env.OTEL_EXPORTER_OTLP_ENDPOINT)
  const tracesEndpoint = nonEmpty(env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) ?? common
  const metricsEndpoint = nonEmpty(env.OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) ?? common
  const protocol = nonEmpty(env.OTEL_EXPORTER_OTLP_PROTOCOL) ?? "http/protobuf"
  const portText = nonEmpty(env.FLOTILLA_PROMETHEUS_PORT)
  const port = portText === undefined ? undefined : Number(portText)
  const prometheusPort = port !== undefined && Number.isInteger(port) && port >= 0 && port < 65536 ? port : undefined
  const interval = Number(nonEmpty(env.OTEL_METRIC_EXPORT_INTERVAL) ?? DEFAULT_METRIC_INTERVAL_MS)
  const disabled = (nonEmpty(env.OTEL_SDK_DISABLED) ?? "").toLowerCase() === "true"
  const tracing = !disabled && tracesEndpoint !== undefined && !listHas(env.OTEL_TRACES_EXPORTER, "none")
  const otlpMetrics = !disabled && metricsEndpoint !== undefined && !listHas(env.OTEL_METRICS_EXPORTER, "none")
  const prometheus = disabled ? undefined : prometheusPort
  const enabled = tracing || otlpMetrics || prometheus !== undefined
  return {
    enabled,
    reason: disabled
      ? "OTEL_SDK_DISABLED=true"
      : enabled
      ? undefined
      : "no OTEL_EXPORTER_OTLP_*ENDPOINT or FLOTILLA_PROMETHEUS_PORT set",
    tracing,
    otlpMetrics,
    prometheusPort: prometheus,
    tracesEndpoint: tracing ? tracesEndpoint : undefined,
    tracesProtocol: nonEmpty(env.OTEL_EXPORTER_OTLP_TRACES_PROTOCOL) ?? protocol,
    metricsProtocol: nonEmpty(env.OTEL_EXPORTER_OTLP_METRICS_PROTOCOL) ?? protocol,
    metricIntervalMs: Number.isFinite(interval) && interval > 0 ? interval : DEFAULT_METRIC_INTERVAL_MS,
    resourceAttributes: {
      "service.name": `flotilla-${options.role}`,
      "service.instance.id": options.instanceId,
      "flotilla.job": options.job,
      "flotilla.role": options.role
    }
  }
}

/** One line for the start-up banner. */
export const describeTelemetry = (c: TelemetryConfig): string =>
  !c.enabled
    ? `telemetry: off (${c.reason})`
    : [
      "telemetry:",
      c.tracing ? `traces → ${c.tracesEndpoint} (${c.tracesProtocol})` : "traces off",
      c.otlpMetrics ? `metrics → otlp every ${c.metricIntervalMs} ms` : undefined,
      c.prometheusPort !== undefined ? `prometheus :${c.prometheusPort}/metrics` : undefined
    ].filter((s) => s !== undefined).join(" ")

// ---------------------------------------------------------------------------------------------
// Starting and stopping the SDK (one per process, reference counted)
// ---------------------------------------------------------------------------------------------

export interface TelemetryHandle {
  /** True when an SDK was started (traces and/or metrics). */
  readonly enabled: boolean
  readonly tracing: boolean
  readonly metrics: boolean
  readonly config: TelemetryConfig
  /** Flushes pending spans and metrics and stops the SDK (once the last user shuts down). */
  shutdown(): Promise<void>
}

interface Running {
  readonly config: TelemetryConfig
  readonly shutdown: () => Promise<void>
}

let shared: { refs: number; running: Promise<Running> } | undefined
let tracingOn = false
let metricsOn = false

/** True while this process exports traces: propagation is a no-op otherwise. */
export const tracingEnabled = (): boolean => tracingOn
/** True while this process has a MeterProvider: the Metrics facade is a no-op otherwise. */
export const metricsEnabled = (): boolean => metricsOn

const offHandle = (config: TelemetryConfig): TelemetryHandle => ({
  enabled: false,
  tracing: false,
  metrics: false,
  config,
  shutdown: () => Promise.resolve()
})

/** How long shutdown waits for the last spans and metrics to be exported. */
const SHUTDOWN_TIMEOUT_MS = 5_000

const boot = async (config: TelemetryConfig, env: Env): Promise<Running> => {
  const [{ NodeSDK }, resources] = await Promise.all([
    import("@opentelemetry/sdk-node"),
    import("@opentelemetry/resources")
  ])
  const { PeriodicExportingMetricReader } = await import("@opentelemetry/sdk-metrics")
  const readers: Array<IMetricReader> = []
  if (config.otlpMetrics) {
    const exporter = config.metricsProtocol === "http/json"
      ? new (await import("@opentelemetry/exporter-metrics-otlp-http")).OTLPMetricExporter()
      : config.metricsProtocol === "grpc"
      ? new (await import("@opentelemetry/exporter-metrics-otlp-grpc")).OTLPMetricExporter()
      : new (await import("@opentelemetry/exporter-metrics-otlp-proto")).OTLPMetricExporter()
    readers.push(
      new PeriodicExportingMetricReader({
        exporter,
        exportIntervalMillis: config.metricIntervalMs,
        exportTimeoutMillis: Math.min(30_000, config.metricIntervalMs)
      })
    )
  }
  let prometheus: { startServer(): Promise<void> } | undefined
  if (config.prometheusPort !== undefined) {
    const { PrometheusExporter } = await import("@opentelemetry/exporter-prometheus")
    const exporter = new PrometheusExporter({
      port: config.prometheusPort,
      host: nonEmpty(env.FLOTILLA_PROMETHEUS_HOST),
      preventServerStart: true
    })
    readers.push(exporter)
    prometheus = exporter
  }
  const sdk = new NodeSDK({
    resource: resources.defaultResource().merge(resources.resourceFromAttributes(config.resourceAttributes)),
    // No serviceinstance detector: it would replace our instance id with a random UUID. The env
    // detector comes last so OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
    resourceDetectors: nonEmpty(env.OTEL_NODE_RESOURCE_DETECTORS) !== undefined
      ? undefined
      : [resources.hostDetector, resources.processDetector, resources.envDetector],
    metricReaders: readers,
    logRecordProcessors: [],
    // undefined: exporter, protocol, batching and sampler come from the OTEL_* env vars.
    spanProcessors: config.tracing ? undefined : []
  })
  const shutdown = async (): Promise<void> => {
    tracingOn = false
    metricsOn = false
    let timer: ReturnType<typeof setTimeout> | undefined
    try {
      // An unreachable collector must never take an actor down, nor hold its exit for long.
      await Promise.race([
        sdk.shutdown(),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`no answer in ${SHUTDOWN_TIMEOUT_MS} ms`)), SHUTDOWN_TIMEOUT_MS)
          timer.unref()
        })
      ])
    } catch (e) {
      process.emitWarning(`telemetry: final export failed (${e instanceof Error ? e.message : String(e)})`)
    } finally {
      clearTimeout(timer)
      // Unregister the globals so a later start in the same process (tests) can register.
      api.trace.disable()
      api.metrics.disable()
      api.propagation.disable()
      api.context.disable()
      api.logs.disable()
    }
  }
  sdk.start()
  try {
    if (prometheus !== undefined) await prometheus.startServer()
  } catch (e) {
    await shutdown()
    throw new Error(`Prometheus endpoint on port ${config.prometheusPort}: ${e instanceof Error ? e.message : String(e)}`)
  }
  tracingOn = config.tracing
  metricsOn = readers.length > 0
  return { config, shutdown }
}

/**
 * Starts OpenTelemetry for this process as configured by the OTEL_* env vars, or does nothing
 * (`enabled: false`) when no exporter endpoint is set. A second call while running shares the
 * first SDK (and its resource); the SDK stops when every handle has been shut down.
 */
export const startTelemetry = async (options: TelemetryOptions): Promise<TelemetryHandle> => {
  const config = resolveTelemetryConfig(options, process.env)
  if (!config.enabled) return offHandle(config)
  if (shared === undefined) {
    const running = boot(config, process.env)
    shared = { refs: 0, running }
    running.catch(() => {
      shared = undefined
    })
  }
  const mine = shared
  mine.refs++
  let running: Running
  try {
    running = await mine.running
  } catch (e) {
    mine.refs--
    throw e
  }
  let closed = false
  return {
    enabled: true,
    tracing: running.config.tracing,
    metrics: running.config.otlpMetrics || running.config.prometheusPort !== undefined,
    config: running.config,
    shutdown: async () => {
      if (closed) return
      closed = true
      if (--mine.refs > 0) return
      if (shared === mine) shared = undefined
      await running.shutdown()
    }
  }
}

export class TelemetryStartError extends Data.TaggedError("TelemetryStartError")<{
  readonly message: string
  readonly cause: unknown
}> {}

/**
 * The process's telemetry handle, as a service. `Telemetry.layer(options)` starts the SDK in
 * the layer's scope (flushing and stopping it on close) and, when traces are exported, swaps
 * Effect's tracer for the OTel bridge; when telemetry is off it provides an inert handle and
 * leaves Effect's native tracer alone.
 */
export class Telemetry extends Context.Service<Telemetry, TelemetryHandle>()("flotilla/shared/telemetry/Telemetry") {
  static readonly layer = (options: TelemetryOptions): Layer.Layer<Telemetry, TelemetryStartError> =>
    Layer.effectContext(
      Effect.gen(function*() {
        const handle = yield* Effect.acquireRelease(
          Effect.tryPromise({
            try: () => startTelemetry(options),
            catch: (cause) => new TelemetryStartError({ message: `could not start telemetry: ${String(cause)}`, cause })
          }),
          (h) => Effect.promise(() => h.shutdown())
        )
        const ctx = Context.make(Telemetry, handle)
        return handle.tracing ? Context.add(ctx, Tracer.Tracer, makeOtelTracer()) : ctx
      })
    )

  /** No SDK, native tracer: for tests and tools that never export. */
  static readonly layerOff = (options: TelemetryOptions): Layer.Layer<Telemetry> =>
    Layer.succeed(Telemetry, offHandle({ ...resolveTelemetryConfig(options, {}), reason: "layerOff" }))
}
