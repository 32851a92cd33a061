/**
 * Implements: the training metrics every actor reports, as OpenTelemetry instruments on the
 * MeterProvider that `startTelemetry` registered (exported over OTLP and/or scraped by
 * Prometheus on FLOTILLA_PROMETHEUS_PORT), behind a small typed facade. With no MeterProvider
 * the facade is a no-op that allocates nothing.
 * Does not own: starting the SDK (otel.ts), the `metrics.<actor>` bus messages (actors publish
 * those themselves; this is the observability side).
 *
 * Instruments (Prometheus names replace `.` with `_`):
 *   flotilla.loss                 gauge      loss.kind=train|val
 *   flotilla.tokens.rate          gauge      tokens per second
 *   flotilla.lr                   gauge      learning rate in use
 *   flotilla.steps                counter    training steps done
 *   flotilla.step.duration        histogram  seconds, step.phase=wait_batch|wait_params|compute|push|aggregate|total
 *   flotilla.bytes                counter    bytes, direction=sent|received (+ optional message.kind)
 *   flotilla.staleness            histogram  versions between the params a gradient used and the current ones
 *   flotilla.leases.outstanding   gauge      batches leased and not yet acked
 */
import * as api from "@opentelemetry/api"
import * as Context from "effect/Context"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import * as Option from "effect/Option"
import { metricsEnabled } from "./otel.ts"

export type LossKind = "train" | "val"
export type StepPhase = "wait_batch" | "wait_params" | "compute" | "push" | "aggregate" | "total"
/** Milliseconds spent in each phase of one step; phases left out are not recorded. */
export type StepTimes = Partial<Readonly<Record<StepPhase, number>>>
export type ByteDirection = "sent" | "received"

export interface MetricsRecorder {
  /** False when nothing is recorded (no MeterProvider). */
  readonly enabled: boolean
  recordLoss(kind: LossKind, value: number): void
  recordTokensPerSec(value: number): void
  recordLearningRate(lr: number): void
  addSteps(n?: number): void
  recordStepTimes(times: StepTimes): void
  addBytes(direction: ByteDirection, n: number, messageKind?: string): void
  recordStaleness(versions: number): void
  setLeasesOutstanding(n: number): void
}

export interface MetricsOptions {
  /** Defaults to the global provider (the SDK's, once `startTelemetry` ran). */
  readonly meterProvider?: api.MeterProvider | undefined
  /** Defaults to `metricsEnabled()` when no provider is given, else true. */
  readonly enabled?: boolean | undefined
  /** Added to every data point (e.g. `{ "flotilla.stage": 1 }`); the resource already names the actor. */
  readonly attributes?: api.Attributes | undefined
}

const noop = (): void => {}

export const noopMetrics: MetricsRecorder = {
  enabled: false,
  recordLoss: noop,
  recordTokensPerSec: noop,
  recordLearningRate: noop,
  addSteps: noop,
  recordStepTimes: noop,
  addBytes: noop,
  recordStaleness: noop,
  setLeasesOutstanding: noop
}

/** Step phases span ~1 ms (a cached pull) to minutes (a cold start). */
const SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
const STALENESS_BUCKETS = [0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64]
const PHASES: ReadonlyArray<StepPhase> = ["wait_batch", "wait_params", "compute", "push", "aggregate", "total"]

/** The metrics facade over a meter; a no-op when disabled. */
export const makeMetrics = (options: MetricsOptions = {}): MetricsRecorder => {
  const enabled = options.enabled ?? (options.meterProvider !== undefined || metricsEnabled())
  if (!enabled) return noopMetrics
  const meter = (options.meterProvider ?? api.metrics.getMeterProvider()).getMeter("flotilla")
  const base = options.attributes ?? {}
  const withBase = (a: api.Attributes): api.Attributes => ({ ...base, ...a })

  const loss = meter.createGauge("flotilla.loss", { description: "Training or validation loss" })
  const tokens = meter.createGauge("flotilla.tokens.rate", { description: "Tokens per second", unit: "{token}/s" })
  const lr = meter.createGauge("flotilla.lr", { description: "Learning rate in use" })
  const steps = meter.createCounter("flotilla.steps", { description: "Training steps done", unit: "{step}" })
  const stepDuration = meter.createHistogram("flotilla.step.duration", {
    description: "Time spent in each phase of a training step",
    unit: "s",
    advice: { explicitBucketBoundaries: SECONDS_BUCKETS }
  })
  const bytes = meter.createCounter("flotilla.bytes", { description: "Payload bytes on the bus", unit: "By" })
  const staleness = meter.createHistogram("flotilla.staleness", {
    description: "Versions between the params a gradient was computed on and the current ones",
    unit: "{version}",
    advice: { explicitBucketBoundaries: STALENESS_BUCKETS }
  })
  const leases = meter.createGauge("flotilla.leases.outstanding", {
    description: "Batches leased and not yet acknowledged",
    unit: "{batch}"
  })

  // Attribute sets are built once: recording must not allocate on the hot path.
  const lossAttrs = { train: withBase({ "loss.kind": "train" }), val: withBase({ "loss.kind": "val" }) }
  const phaseAttrs = Object.fromEntries(PHASES.map((p) => [p, withBase({ "step.phase": p })])) as Record<
    StepPhase,
    api.Attributes
  >
  const dirAttrs = { sent: withBase({ direction: "sent" }), received: withBase({ direction: "received" }) }
  const finite = (v: number): boolean => typeof v === "number" && Number.isFinite(v)

  return {
    enabled: true,
    recordLoss: (kind, value) => {
      if (finite(value)) loss.record(value, lossAttrs[kind])
    },
    recordTokensPerSec: (value) => {
      if (finite(value)) tokens.record(value, base)
    },
    recordLearningRate: (value) => {
      if (finite(value)) lr.record(value, base)
    },
    addSteps: (n = 1) => {
      if (finite(n) && n > 0) steps.add(n, base)
    },
    recordStepTimes: (times) => {
      for (const p of PHASES) {
        const ms = times[p]
        if (ms !== undefined && finite(ms) && ms >= 0) stepDuration.record(ms / 1000, phaseAttrs[p])
      }
    },
    addBytes: (direction, n, messageKind) => {
      if (!finite(n) || n <= 0) return
      bytes.add(n, messageKind === undefined ? dirAttrs[direction] : withBase({ direction, "message.kind": messageKind }))
    },
    recordStaleness: (versions) => {
      if (finite(versions) && versions >= 0) staleness.record(versions, base)
    },
    setLeasesOutstanding: (n) => {
      if (finite(n)) leases.record(n, base)
    }
  }
}

/**
 * The metrics facade as a service. `Metrics.layer` builds it on the global MeterProvider (build
 * it after `Telemetry.layer`, e.g. `Metrics.layer.pipe(Layer.provide(Telemetry.layer(...)))`
 * or as a later layer); `Metrics.layerNoop` records nothing.
 */
export class Metrics extends Context.Service<Metrics, MetricsRecorder>()("flotilla/shared/telemetry/Metrics") {
  static readonly layer: Layer.Layer<Metrics> = Layer.sync(Metrics, () => makeMetrics())
  static readonly layerNoop: Layer.Layer<Metrics> = Layer.succeed(Metrics, noopMetrics)
}

/**
 * The recorder of the `Metrics` service when one is provided, else the no-op: actors take it
 * this way so that code (and tests) that never provide `Metrics` keep working unchanged.
 */
export const currentMetrics: Effect.Effect<MetricsRecorder> = Effect.map(
  Effect.serviceOption(Metrics),
  Option.getOrElse(() => noopMetrics)
)
